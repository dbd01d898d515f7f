"""GPU check: spikingjelly's CuPy LIF kernel == the integer engine, spike for spike.

Run once on a machine with a CUDA GPU and CuPy (pip install -c constraints.txt -e '.[gpu]'):

    python bench/gpu_check.py [--shared ../shared] [--out gpu_check.json]

It quantizes the shipped demo checkpoint, every original-code variant under tests/data/oracle and,
where present, the shared fixture; runs each quantized model on the GPU with the CuPy backend
(TF32 off, cuDNN off, deterministic algorithms) and the integer engine on the CPU, and compares every
spike tensor with `==`. It also times the CuPy model. Budget: well under 10 minutes on one GPU.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from sdt_deploy import load_model, quantize  # noqa: E402
from sdt_deploy.data.digits import digits_split  # noqa: E402
from sdt_deploy.quant.bits import bit_report  # noqa: E402
from sdt_deploy.run.integer_engine import run_engine  # noqa: E402
from sdt_deploy.run.torch_runner import run_model  # noqa: E402
from sdt_deploy.verification.verifier import cuda_skip_reason, deterministic_cuda  # noqa: E402


def cases(shared: str):
    demo = os.path.join(ROOT, "sdt_deploy", "assets", "demo_sdt_digits.pth")
    if os.path.exists(demo):
        yield "demo", demo, digits_split("test").x[:64]
    for path in sorted(glob.glob(os.path.join(ROOT, "tests", "data", "oracle", "*.pth"))):
        with np.load(path.replace(".pth", "_ref.npz")) as z:
            yield os.path.basename(path)[:-4], path, z["input"]
    fixture = os.path.join(shared, "fixtures", "sdt_cifar_2_256.pth")
    if os.path.exists(fixture):
        yield "fixture", fixture, np.load(os.path.join(shared, "fixtures", "sdt_cifar_2_256_input.npy"))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--shared", default=os.path.join(ROOT, "..", "shared"))
    p.add_argument("--out", default="gpu_check.json")
    a = p.parse_args()
    why = cuda_skip_reason()
    if why:
        print(f"gpu_check: cannot run: {why}")
        return 2
    results = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "host": platform.node(),
               "date": time.strftime("%Y-%m-%d"), "cases": {}}
    ok = True
    for name, path, x in cases(a.shared):
        q = quantize(load_model(path))
        f32 = bit_report(q.graph)["summary"]["float32_exact"]
        model = q.model.cuda()
        with deterministic_cuda():
            run_model(model, x[:2], device="cuda")          # warm-up: kernel compilation
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            _, gpu = run_model(model, x, device="cuda", batch_size=len(x))
            torch.cuda.synchronize()
            secs = time.perf_counter() - t0
        eng = run_engine(q.graph, x)
        bad = {k: int((gpu[k] != eng.spikes[k]).sum()) for k in gpu if not np.array_equal(gpu[k], eng.spikes[k])}
        backends = sorted({m.backend for m in model.modules() if hasattr(m, "backend")})
        results["cases"][name] = {"samples": len(x), "equal": not bad, "differing": bad, "lif_backends": backends,
                                  "float32_exact_by_analysis": f32, "gpu_seconds": secs}
        ok &= not bad or not f32
        print(f"{name:16s} {'EQUAL' if not bad else 'DIFFER ' + str(bad)}  backends {backends}  "
              f"float32 exact by analysis: {f32}  {len(x) / secs:.1f} img/s")
    with open(a.out, "w") as f:
        json.dump(results, f, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
