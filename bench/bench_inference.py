"""Inference speed on the CPU: the exported ONNX step model in onnxruntime (float and int variants,
`sdt_deploy.run.onnx_runner`) beside the quantized spikingjelly torch model (`sdt_deploy.run.torch_runner.run_model` on
`sdt_deploy.quantize(...).model`, spikingjelly's torch backend), spikes checked identical in the same
run.

    python bench/bench_inference.py [--quick]

Cases: CIFAR 2-256 (32x32, T = 4) at batch 1 and 32, ImageNet 8-512 (224x224, T = 4) at batch 1; random
weights calibrated with `sdt_deploy.data.synth.random_model` (seed 0) so that layers fire, standard-normal
images (seed 5). Each runtime runs with 1 and with 2 intra-op threads (torch.set_num_threads;
onnxruntime intra_op_num_threads), each figure the median of several whole forward passes (all T
steps, state reset) after a warm-up, the runtimes taking turns round by round (so that a change in the
machine's load falls on all of them alike). The onnxruntime sessions are the ones `run_onnx` opens by default
(basic graph optimisations, what `verify` runs) and, for the float variant, sessions with onnxruntime's
full optimisation (ORT_ENABLE_ALL, `open_onnx(..., optimization="all")`), exported without debug
outputs; the spike check runs the debug-output exports once per level against the torch model's
recorded spikes.

Target (issue 9): the float variant at least 1.5x the torch model's throughput.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

sys.path.insert(0, C.ROOT)

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

from exporters.onnx import write_onnx  # noqa: E402
from sdt_deploy.api import quantize  # noqa: E402
from sdt_deploy.data import synth  # noqa: E402
from sdt_deploy.files.configs import resolve  # noqa: E402
from sdt_deploy.quant.bits import bit_report  # noqa: E402
from sdt_deploy.run.onnx_runner import open_onnx  # noqa: E402
from sdt_deploy.run.torch_runner import run_model  # noqa: E402

CASES = (("cifar10/2_256_300E_t4", 1, 16, 15), ("cifar10/2_256_300E_t4", 32, 16, 5),
         ("imagenet/8_512_300E_t4", 1, 4, 5))        # config, batch, calibration images, timed rounds


LEVELS = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,    # run_onnx's default (verify runs it)
          "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}       # onnxruntime's full optimisation


def session_options(threads: int, level: str = "basic"):
    so = ort.SessionOptions()
    so.graph_optimization_level = LEVELS[level]
    so.log_severity_level = 3
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return so


def spike_check(torch_spikes: dict, run) -> dict:
    keys = [k for k in torch_spikes if k in run.spikes]
    mismatches = sum(int(np.count_nonzero(torch_spikes[k] != run.spikes[k])) for k in keys)
    total = sum(int(torch_spikes[k].size) for k in keys)
    return {"layers": len(keys), "of": len(torch_spikes), "mismatches": mismatches, "compared": total,
            "identical": mismatches == 0 and len(keys) == len(torch_spikes)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="fewer runs (a smoke test, not for the record)")
    a = p.parse_args()
    results, rows = [], []
    models = {}
    with tempfile.TemporaryDirectory(prefix="sdt-bench-") as tmp:
        for name, batch, calib, runs in CASES:
            runs = 1 if a.quick else runs
            cfg = resolve(yaml_path=name).config
            if name not in models:
                torch.set_num_threads(2)
                q = quantize(synth.random_model(cfg, seed=0, calibration=calib))
                paths = {}
                for variant in ("float", "int"):
                    for debug in (False, True):
                        paths[(variant, debug)] = os.path.join(tmp, f"{name.replace('/', '_')}.{variant}.{debug}.onnx")
                        write_onnx(q.graph, paths[(variant, debug)], variant=variant, debug_outputs=debug)
                models[name] = (q, paths)
            q, paths = models[name]
            x = synth.random_inputs(cfg, batch, seed=5)
            # the spike check: every LIF (and AND/OR) tensor, every step, every sample
            torch.set_num_threads(1)
            _, ref = run_model(q.model, x, batch_size=batch)
            checks = {(v, lvl): spike_check(ref, open_onnx(paths[(v, True)],
                                                           session_options=session_options(1, lvl)).run(x))
                      for v in ("float", "int") for lvl in LEVELS}
            f32 = bit_report(q.graph)["summary"]["float32_exact"]
            for threads in (1, 2):
                torch.set_num_threads(threads)
                combos = (("float", "basic"), ("float", "all"), ("int", "basic"))
                fns = {"torch": lambda: run_model(q.model, x, batch_size=batch, record=False)}
                for variant, level in combos:
                    sess = open_onnx(paths[(variant, False)], session_options=session_options(threads, level))
                    fns[(variant, level)] = (lambda s: lambda: s.run(x))(sess)
                times = C.interleaved(fns, runs)
                t_torch = times["torch"]
                for variant, level in combos:
                    t_ort = times[(variant, level)]
                    r = C.ratio(t_torch["median"], t_ort["median"])     # throughput ratio
                    check = checks[(variant, level)]
                    met = ("yes" if r >= 1.5 else "no") if variant == "float" else "-"
                    rows.append([f"{name.split('/')[0]} {name.split('/')[1][:5]}", batch, threads, variant, level,
                                 batch / t_torch["median"], batch / t_ort["median"], r,
                                 ">= 1.5" if variant == "float" else "-", met,
                                 "yes" if check["identical"] else f"NO ({check['mismatches']})",
                                 f"{t_torch['load1'][0]:.1f}"])
                    results.append({"config": name, "batch": batch, "threads": threads, "variant": variant,
                                    "optimization": level, "torch": t_torch, "onnxruntime": t_ort,
                                    "throughput_ratio": r, "spike_check": check, "float32_exact_by_bound": f32})
                    print(rows[-1], flush=True)
    md = C.md_table(["config", "batch", "threads", "ONNX variant", "ort optimisation", "torch img/s",
                     "onnxruntime img/s", "ratio (ort / torch)", "target", "met?", "spikes identical",
                     "load (1 min)"], rows)
    md += ("\n\nimg/s = batch / median seconds of a whole forward pass (T = 4 steps). Spike check: every spike "
           "tensor of the debug-output export vs the torch model's recorded spikes (mismatching spikes in "
           "brackets).")
    C.save("inference", {"machine": C.machine(), "versions": C.versions(), "results": results}, md)


if __name__ == "__main__":
    main()
