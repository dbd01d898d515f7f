"""Data the toolchain ships or makes without any download: the demo checkpoint, scikit-learn's digits,
dataset folders read with the original evaluation transform, synthetic calibrated models."""
import os

DEMO_CHECKPOINT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets",
                               "demo_sdt_digits.pth")
# a small SDT V2 (Meta-SpikeFormer) trained the same way (sdt_deploy/data/train_demo_v2.py)
DEMO_V2_CHECKPOINT = os.path.join(os.path.dirname(DEMO_CHECKPOINT), "demo_v2_digits.pth")
