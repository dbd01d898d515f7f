"""What a user would otherwise run: the SDT checkpoint loaded into the torch model (spikingjelly's torch
backend, the LIF looping over T) and exported with `torch.onnx.export`.

    python bench/torch_onnx_export.py CKPT OUT.onnx [--config imagenet/8_768_300E_t4] [--dynamo]

torch 2.13 offers two exporters, both measured by bench_export.py:

- `dynamo=False` (default here): the TorchScript-based exporter, opset 17, constant folding on (its
  default);
- `--dynamo`: `dynamo=True`, torch's default exporter (torch.export, then onnxscript's translation;
  needs `onnxscript`: `pip install -c constraints.txt -e '.[bench]'`), opset 18 (its default),
  `optimize=True` (its default).

Input [1, 3, S, S]. Either file holds the float32 weights and one graph unrolled over the T time steps
(the tracer records the LIF loop).
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from models import build_model  # noqa: E402
from sdt_deploy.files.configs import resolve  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("ckpt")
    p.add_argument("out")
    p.add_argument("--config", default="imagenet/8_768_300E_t4")
    p.add_argument("--dynamo", action="store_true", help="torch.onnx.export(dynamo=True) (needs onnxscript)")
    a = p.parse_args()
    cfg = resolve(yaml_path=a.config).config
    model = build_model(cfg)
    payload = torch.load(a.ckpt, map_location="cpu", weights_only=False)   # the user's own file
    model.load_state_dict(payload["state_dict"])
    model.eval()
    x = torch.zeros(1, cfg.in_channels, cfg.img_size, cfg.img_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if a.dynamo:
            torch.onnx.export(model, (x,), a.out, dynamo=True, input_names=["input"], output_names=["logits"])
        else:
            torch.onnx.export(model, (x,), a.out, dynamo=False, opset_version=17, input_names=["input"],
                              output_names=["logits"])
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
