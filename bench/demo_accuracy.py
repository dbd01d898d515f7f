"""Accuracy of the shipped demo checkpoint on its 360 held-out digits: float vs int8 / int4 / int2.

    python bench/demo_accuracy.py [--checkpoint PATH] [--markdown]

Each quantized model is the spikingjelly model carrying the dequantized weights (identical spikes to
the integer engine, which the tests check); "MSE" and "max" are brevitas' two power-of-two scale
choices.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from sdt_deploy import load_model, quantize  # noqa: E402
from sdt_deploy.data.digits import digits_split  # noqa: E402
from sdt_deploy.run.torch_runner import predictions, run_model  # noqa: E402


def accuracy(model, x, y) -> float:
    logits, _ = run_model(model, x, batch_size=120, record=False)
    return 100.0 * float((predictions(logits) == y).mean())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", default=os.path.join(ROOT, "sdt_deploy", "assets", "demo_sdt_digits.pth"))
    p.add_argument("--markdown", action="store_true")
    a = p.parse_args()
    lm = load_model(a.checkpoint)
    test = digits_split("test")
    rows = [("float32 (the checkpoint)", "-", accuracy(lm.model, test.x, test.y))]
    for bits in (8, 4, 2):
        for search in ("mse", "max"):
            t0 = time.time()
            q = quantize(lm, weight_bits=bits, scale_search=search)
            rows.append((f"int{bits} weights, 8-bit input", search, accuracy(q.model, test.x, test.y)))
            print(f"int{bits} {search}: {rows[-1][2]:.2f}% ({time.time() - t0:.0f}s)", file=sys.stderr)
    base = rows[0][2]
    if a.markdown:
        print(f"| model | scale search | top-1 on {len(test.y)} held-out digits | vs float |")
        print("|---|---|---|---|")
    for name, search, acc in rows:
        delta = "" if search == "-" else f"{acc - base:+.2f} pt"
        if a.markdown:
            print(f"| {name} | {search} | {acc:.2f}% | {delta} |")
        else:
            print(f"{name:28s} {search:4s} {acc:6.2f}%  {delta}")


if __name__ == "__main__":
    main()
