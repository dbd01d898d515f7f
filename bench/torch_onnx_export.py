"""What a user would otherwise run: the SDT checkpoint loaded into the torch model (spikingjelly's torch
backend, the LIF looping over T) and exported with `torch.onnx.export`.

    python bench/torch_onnx_export.py CKPT OUT.onnx [--config imagenet/8_768_300E_t4]

torch 2.13 offers two exporters: `dynamo=True` (the default) needs `onnxscript`, which is not
installed here and cannot be downloaded (offline), so this uses the TorchScript-based exporter,
`dynamo=False`, opset 17, constant folding on (its default), input [1, 3, S, S]. The file holds the
float32 weights and one graph unrolled over the T time steps (the tracer records the LIF loop).
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
    a = p.parse_args()
    cfg = resolve(yaml_path=a.config).config
    model = build_model(cfg)
    payload = torch.load(a.ckpt, map_location="cpu", weights_only=False)   # the user's own file
    model.load_state_dict(payload["state_dict"])
    model.eval()
    x = torch.zeros(1, cfg.in_channels, cfg.img_size, cfg.img_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), a.out, dynamo=False, opset_version=17, input_names=["input"],
                          output_names=["logits"])
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
