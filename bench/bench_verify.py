"""Verify throughput on the CPU: `sdt-deploy verify CKPT --random N --json` with every executor (torch,
engine, onnx-int, onnx-float, nir; cupy is skipped without a GPU) on the fixture's configuration, CIFAR
2-256, random weights calibrated with `sdt_deploy.data.synth.random_model` (seed 0).

    python bench/bench_verify.py [--n 32] [--runs 3]

Per executor: images / its seconds in the result (`seconds`: the time spent in that executor, the
first batch including its export); whole command: images / wall time of the child process (start,
imports, quantization, exports, all executors, the comparison). Beside it, what a user would otherwise
run: the torch model alone on the same images (a child process: load, one forward pass, no check).
Run twice: with the default threads, and with OMP_NUM_THREADS=1 (torch single-threaded; onnxruntime
keeps its own pool), since on this shared 2-core machine torch's second thread mostly waits.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

CONFIG = "cifar10/2_256_300E_t4"


def make_checkpoint(path: str) -> None:
    sys.path.insert(0, C.ROOT)
    from sdt_deploy.data import synth
    from sdt_deploy.files.checkpoint import save_original_format
    from sdt_deploy.files.configs import resolve

    cfg = resolve(yaml_path=CONFIG).config
    save_original_format(path, synth.random_model(cfg, seed=0), synth.checkpoint_args(cfg))


def torch_alone(ckpt: str, n: int) -> None:
    """The child process of the comparison: the original torch model on the same random images."""
    sys.path.insert(0, C.ROOT)
    from sdt_deploy.api import load_model
    from sdt_deploy.data.synth import random_inputs
    from sdt_deploy.run.torch_runner import run_model

    loaded = load_model(ckpt)
    run_model(loaded.model, random_inputs(loaded.config, n, seed=0), batch_size=16, record=False)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--torch-alone", metavar="CKPT", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.torch_alone:
        return torch_alone(a.torch_alone, a.n)
    os.makedirs(C.OUT, exist_ok=True)
    ckpt = os.path.join(C.OUT, "sdt_cifar_2_256_random.pth")
    if not os.path.exists(ckpt):
        make_checkpoint(ckpt)
    verify = [C.SDT_DEPLOY, "verify", ckpt, "--random", str(a.n), "--json"]
    alone = [C.PYTHON, os.path.abspath(__file__), "--torch-alone", ckpt, "--n", str(a.n)]
    rows, result = [], {"machine": C.machine(), "versions": C.versions(), "n": a.n, "settings": {}}
    for label, env in (("default threads", {}), ("OMP_NUM_THREADS=1", {"OMP_NUM_THREADS": "1"})):
        runs, theirs = [], []
        for i in range(a.runs + 1):                  # run 0: warm-up
            r = C.run_child(verify, env=env)
            if r["rc"] != 0:
                raise SystemExit(f"verify failed ({r['rc']}): {r['stderr']}")
            doc = json.loads(r["stdout"][r["stdout"].index("{"):])
            t = C.run_child(alone, env=env)
            if t["rc"] != 0:
                raise SystemExit(f"torch alone failed: {t['stderr']}")
            print(label, i, f"verify {r['seconds']:.1f} s ok={doc['ok']} {doc['seconds']}; "
                  f"torch alone {t['seconds']:.1f} s", flush=True)
            if i:
                runs.append({"wall": r["seconds"], "peak_rss_mib": r["peak_rss_mib"], "ok": doc["ok"],
                             "seconds": doc["seconds"], "load1": r["load_before"][0]})
                theirs.append(t["seconds"])
        med_wall, med_alone = C.median(x["wall"] for x in runs), C.median(theirs)
        per = {ex: C.median(x["seconds"][ex] for x in runs) for ex in runs[0]["seconds"]}
        result["settings"][label] = {"runs": runs, "torch_alone": theirs, "median_wall": med_wall,
                                     "median_torch_alone": med_alone, "median_seconds": per}
        for ex, sec in per.items():
            rows.append([label, f"executor {ex}", a.n / sec, "-", "-", "-"])
        rows.append([label, "whole `verify` command", a.n / med_wall, a.n / med_alone,
                     C.ratio(a.n / med_wall, a.n / med_alone),
                     f"all ok: {all(x['ok'] for x in runs)}; "
                     f"peak RSS {C.median(x['peak_rss_mib'] for x in runs):.0f} MiB; "
                     f"load {[x['load1'] for x in runs]}"])
    md = C.md_table(["threads", "figure", "ours img/s", "torch model alone img/s", "ratio", "notes"], rows)
    md += (f"\n\n{a.n} random images, batch 16, median of {a.runs} runs after a warm-up. `torch model alone`: a "
           "child process loading the checkpoint and running the original float torch model once on the same "
           "images (what a user runs without any check); whole-process times on both sides.")
    C.save("verify", result, md)


if __name__ == "__main__":
    main()
