"""The same measurements on several versions of sdt-deploy in the same run: did a restructuring cost
speed or memory? (issue 17: the redesign must not regress beyond noise.)

    python bench/bench_versions.py [--versions df7ef44,1b438e5,HEAD] [--runs 3] [--engine-runs 5]

Each version other than HEAD is extracted with `git archive` into bench/out/versions/<sha>/ and run from
there (its own `sdt_deploy`, `models` and `exporters` first on sys.path, the same interpreter and
packages); HEAD is this working tree. Measured per version, every command a whole child process, the
versions taking turns round by round (`--runs` rounds after a warm-up) so that the machine's load falls
on all of them alike; the figure is the median:

- `export CKPT --target onnx` and `--target nir` of SDT-8-768 (224x224, T = 4, random weights, the
  checkpoint bench/bench_export.py writes): wall seconds, CPU seconds and the child's peak RSS;
- the integer engine on CIFAR 2-256 (random calibrated weights, seed 0; standard-normal images, seed 5),
  batch 1 and 32, one thread: in-process medians of `--engine-runs` runs after a warm-up, each version in
  its own child; the children also print the engine's logits checksum, so that the versions are seen
  to compute the same thing.

The versions' graphs are byte-identical by test (tests/test_artifact_hashes.py), so their export files
differ only where the later version adds metadata.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_export import CONFIG as EXPORT_CONFIG  # noqa: E402
from bench_export import make_checkpoint  # noqa: E402

import _common as C  # noqa: E402

# Runs inside a version's tree: its own module paths (the layout changed with the redesign).
ENGINE_CHILD = r"""
import hashlib, json, sys, time
import numpy as np, torch
torch.set_num_threads(1)
try:
    from sdt_deploy.data.synth import random_inputs, random_model
    from sdt_deploy.files.configs import resolve
    from sdt_deploy.run.integer_engine import run_engine
except ImportError:                                   # before the redesign
    from sdt_deploy.synth import random_inputs, random_model
    from sdt_deploy.configs import resolve
    from sdt_deploy.engine import run_engine
from sdt_deploy.api import quantize
import sdt_deploy
runs = int(sys.argv[1])
cfg = resolve(yaml_path="cifar10/2_256_300E_t4").config
q = quantize(random_model(cfg, seed=0))
out = {"module": sdt_deploy.__file__}
for batch in (1, 32):
    x = random_inputs(cfg, batch, seed=5)
    r = run_engine(q.graph, x, record=False, threads=1)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        run_engine(q.graph, x, record=False, threads=1)
        times.append(time.perf_counter() - t0)
    out[f"batch {batch}"] = {"runs": times, "logits_int_sha256": hashlib.sha256(r.logits_int.tobytes()).hexdigest()}
print(json.dumps(out))
"""


def version_tree(rev: str) -> tuple[str, str]:
    """(sha, folder): HEAD is this working tree; another revision is extracted once."""
    sha = subprocess.run(["git", "rev-parse", "--short", rev], cwd=C.ROOT, capture_output=True, text=True,
                         check=True).stdout.strip()
    if rev == "HEAD":
        return sha + " (HEAD)", C.ROOT
    folder = os.path.join(C.OUT, "versions", sha)
    if not os.path.isdir(folder):
        os.makedirs(folder)
        with tempfile.TemporaryFile() as tar:
            subprocess.run(["git", "archive", rev], cwd=C.ROOT, stdout=tar, check=True)
            tar.seek(0)
            with tarfile.open(fileobj=tar) as t:
                t.extractall(folder, filter="data")
    return sha, folder


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--versions", default="df7ef44,1b438e5,HEAD")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--engine-runs", type=int, default=5)
    a = p.parse_args()
    os.makedirs(C.OUT, exist_ok=True)
    ckpt = os.path.join(C.OUT, "sdt_8_768.pth")
    if not os.path.exists(ckpt):
        make_checkpoint(ckpt)
    trees = dict(version_tree(v) for v in a.versions.split(","))
    env = {name: {"PYTHONPATH": folder} for name, folder in trees.items()}

    def export_cmd(name, target):
        out = os.path.join(C.OUT, f"versions_{name.split()[0]}.{target}")
        return [C.PYTHON, "-m", "sdt_deploy", "export", ckpt, "--target", target, "-o", out, "--force"]

    result = {"machine": C.machine(), "versions": C.versions(), "trees": trees, "checkpoint": ckpt,
              "export_config": EXPORT_CONFIG, "export": {}, "engine": {}}
    jobs = [(name, target) for target in ("onnx", "nir") for name in trees]
    for rnd in range(a.runs + 1):                         # round 0 is the warm-up
        for name, target in jobs:
            r = C.run_child(export_cmd(name, target), env=env[name], cwd=trees[name])
            if r["rc"] != 0:
                raise SystemExit(f"{name} export {target} failed:\n{r['stderr']}")
            if rnd:
                result["export"].setdefault(f"{name} | {target}", []).append(r)
            print(f"round {rnd} {name} {target}: {r['seconds']:.1f} s ({r['cpu_seconds']:.1f} CPU s), "
                  f"{r['peak_rss_mib']:.0f} MiB", flush=True)
        for name in trees:
            r = C.run_child([C.PYTHON, "-c", ENGINE_CHILD, str(a.engine_runs)], env=env[name], cwd=trees[name])
            if r["rc"] != 0:
                raise SystemExit(f"{name} engine failed:\n{r['stderr']}")
            got = json.loads(r["stdout"].strip().splitlines()[-1])
            assert os.path.dirname(os.path.dirname(got["module"])) == os.path.abspath(trees[name]), got["module"]
            if rnd:
                result["engine"].setdefault(name, []).append(got)
            print(f"round {rnd} {name} engine: " + ", ".join(
                f"{k} {C.median(v['runs']) * 1e3:.1f} ms" for k, v in got.items() if k != "module"), flush=True)

    base = next(iter(trees))
    rows = []
    for target in ("onnx", "nir"):
        base_runs = result["export"][f"{base} | {target}"]
        for name in trees:
            runs = result["export"][f"{name} | {target}"]
            sec, cpu, rss = (C.median(r[k] for r in runs) for k in ("seconds", "cpu_seconds", "peak_rss_mib"))
            sec0, cpu0, rss0 = (C.median(r[k] for r in base_runs) for k in ("seconds", "cpu_seconds", "peak_rss_mib"))
            rows.append([f"export --target {target}", name, f"{sec:.2f} s ({min(r['seconds'] for r in runs):.2f}"
                         f"-{max(r['seconds'] for r in runs):.2f})", f"{sec / sec0:.2f}", f"{cpu:.2f} s",
                         f"{cpu / cpu0:.2f}", f"{rss:.0f} MiB", f"{rss / rss0:.2f}"])
    sums = set()
    for batch in ("batch 1", "batch 32"):
        t0 = C.median(t for g in result["engine"][base] for t in g[batch]["runs"])
        for name in trees:
            ts = [t for g in result["engine"][name] for t in g[batch]["runs"]]
            sums.add((batch, result["engine"][name][0][batch]["logits_int_sha256"]))
            rows.append([f"engine, CIFAR 2-256, {batch}, 1 thread", name, f"{C.median(ts) * 1e3:.1f} ms "
                         f"({min(ts) * 1e3:.1f}-{max(ts) * 1e3:.1f})", f"{C.median(ts) / t0:.2f}", "-", "-", "-", "-"])
    result["same_logits_across_versions"] = len(sums) == 2
    md = C.md_table(["measurement", "version", "wall, median (range)", f"wall vs {base}", "CPU s",
                     f"CPU vs {base}", "peak RSS", f"RSS vs {base}"], rows)
    md += (f"\n\nSame engine logits in every version: {result['same_logits_across_versions']}. "
           f"Load average at the end: {C.load_average()}.")
    C.save("versions", result, md)


if __name__ == "__main__":
    main()
