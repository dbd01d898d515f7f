"""Peak memory of `verify` (and `report`, `run`) on SDT-8-768 at 224x224 (issue 19, part 2): the whole
process tree's resident memory (worker processes included; sampled every 50 ms from /proc), default
options, beside the previous verify (commit 19dcc53, `_common.previous_code`) in the same run.

    python bench/bench_verify_memory.py [--n 8] [--previous-n 2]

Random weights calibrated with `sdt_deploy.data.synth.random_model` (seed 0, calibration on 4 images),
every CPU executor. The previous verify held every tensor of every executor for its whole batch (16 by
default): 7.0 GB for 2 images and 17.1 GB for 8 on the issue's measurement, ~31 GB at its default batch;
here it runs `--previous-n` images only (more would take the shared machine's memory from others).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_verify import EXECUTORS, checkpoint, verify_doc  # noqa: E402

import _common as C  # noqa: E402

CONFIG = "imagenet/8_768_300E_t4"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--previous-n", type=int, default=2)
    a = p.parse_args()
    ckpt = checkpoint(CONFIG)
    prev = C.previous_code()
    x = os.path.join(C.OUT, f"imagenet_random_{a.n}.npy")
    if not os.path.exists(x):
        import numpy as np

        np.save(x, np.random.default_rng(0).standard_normal((a.n, 3, 224, 224)).astype(np.float32))
    verify = [C.SDT_DEPLOY, "verify", ckpt, "--executors", EXECUTORS, "--json"]
    runs = {
        f"verify, {a.previous_n} images (this code)": (verify + ["--random", str(a.previous_n)], {}),
        f"verify, {a.previous_n} images (previous, 19dcc53)": (
            [C.PYTHON, "-m", "sdt_deploy", "verify", ckpt, "--executors", EXECUTORS, "--json", "--random",
             str(a.previous_n)], prev),
        f"verify, {a.n} images (this code)": (verify + ["--random", str(a.n)], {}),
        f"report, {a.n} images (this code)": ([C.SDT_DEPLOY, "report", ckpt, "-i", x, "--json"], {}),
        f"run --quantize, {a.n} images (this code)": ([C.SDT_DEPLOY, "run", ckpt, "-i", x, "--quantize", "--json"], {}),
    }
    result = {"machine": C.machine(), "versions": C.versions(), "config": CONFIG, "runs": {}}
    rows = []
    for who, (cmd, extra) in runs.items():
        r = C.run_child_tree(cmd, env=extra.get("env"), cwd=extra.get("cwd", C.ROOT))
        ok = verify_doc(r, who)["ok"] if who.startswith("verify") else (r["rc"] == 0)
        notes = [line for line in r["stderr"].splitlines() if line.startswith(("verify:", "report:", "run:"))]
        result["runs"][who] = {"command": " ".join(cmd), "wall": r["seconds"], "peak_tree_mib": r["peak_tree_mib"],
                               "peak_self_mib": r["peak_rss_mib"], "rc": r["rc"], "ok": ok, "load": r["load_before"],
                               "note": notes}
        print(f"{who}: {r['seconds']:.0f} s, peak {r['peak_tree_mib']:.0f} MiB (tree), ok {ok}; {notes}", flush=True)
        rows.append([who, f"{r['peak_tree_mib']:,.0f}", f"{r['seconds']:.0f}", ok, r["load_before"][0],
                     "; ".join(notes) or "-"])
    ours = result["runs"][f"verify, {a.previous_n} images (this code)"]["peak_tree_mib"]
    theirs = result["runs"][f"verify, {a.previous_n} images (previous, 19dcc53)"]["peak_tree_mib"]
    big = result["runs"][f"verify, {a.n} images (this code)"]["peak_tree_mib"]
    md = C.md_table(["command", "peak RSS, process tree (MiB)", "wall (s)", "ok", "load (1 min)", "note"], rows)
    md += (f"\n\nThis code / previous at {a.previous_n} images: {ours / theirs:.2f}. {a.n} images with the default "
           f"options: {big / 1024:.2f} GiB (goal: under 8 GB; the previous verify: 17.1 GB for 8 images in the "
           "issue's measurement). The machine is shared.")
    C.save("verify_memory", result, md)


if __name__ == "__main__":
    main()
