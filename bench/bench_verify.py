"""Verify throughput on the CPU (issue 19, part 1): `sdt-deploy verify CKPT --random N --json` with every CPU
executor (torch, engine, onnx-int, onnx-float, nir; cupy is skipped without a GPU), default options,
beside what a user would otherwise run -- the torch model alone on the same images -- and beside the
previous verify (the code of commit 19dcc53, `_common.previous_code`), all in the same run, taking turns.

    python bench/bench_verify.py [--model cifar10/2_256_300E_t4] [--small 32] [--large 160] [--runs 2]
    python bench/bench_verify.py --model imagenet/8_512_300E_t4 --small 2 --large 6 --runs 1 --previous small
    python bench/bench_verify.py --also fd21ac3     # also beside the code before a change
    python bench/bench_verify.py --previous none --each   # also one executor at a time (one shipped file)

Random weights calibrated with `sdt_deploy.data.synth.random_model` (seed 0; calibration on 4 images for
224x224 models). Each figure is a whole child process (Python start, imports, loading, quantization, the
exports, every executor, the comparison): images / wall seconds. Two sizes: `--small` (the issue's 32
images) and `--large`; the marginal rate between them, (large - small) / (t_large - t_small), is the
throughput a dataset-sized run sees once the fixed start is paid (the figure for 10,000 images). The
torch model alone: a child loading the checkpoint and running the float torch model once on the same
images, batch 16, torch's default threads. In the same run, the reports of the current and the previous
verify are compared (every count, divergence and prediction; not the times): "identical".

Then what bounds the ratio (`--bound-runs`, at the `--large` size): the torch model's own computing time
(no start, no loading) beside each executor's seconds from verify's report, in one process and in two
(`--jobs 2`). Verify runs every executor on every input, so its ratio can be at most the model's time over
the executors' sum, whatever else it saves; the table gives that ceiling, and the ceiling of the three
executors whose kernels are torch's and onnxruntime's alone.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

EXECUTORS = "torch,engine,onnx-int,onnx-float,nir"


def checkpoint(config: str) -> str:
    name = config.replace("/", "_").replace("_300E_t4", "")
    path = os.path.join(C.OUT, f"sdt_{name}_random.pth" if "cifar10/2_256" not in config
                        else "sdt_cifar_2_256_random.pth")
    if not os.path.exists(path):
        sys.path.insert(0, C.ROOT)
        from sdt_deploy.data import synth
        from sdt_deploy.files.checkpoint import save_original_format
        from sdt_deploy.files.configs import resolve

        cfg = resolve(yaml_path=config).config
        model = synth.random_model(cfg, seed=0, calibration=16 if cfg.img_size <= 64 else 4)
        save_original_format(path, model, synth.checkpoint_args(cfg))
    return path


def torch_alone(ckpt: str, n: int) -> None:
    """The child process of the comparison: the original torch model on the same random images."""
    sys.path.insert(0, C.ROOT)
    from sdt_deploy.api import load_model
    from sdt_deploy.data.synth import random_inputs
    from sdt_deploy.run.torch_runner import run_model

    loaded = load_model(ckpt)
    x = random_inputs(loaded.config, n, seed=0)
    t0 = time.perf_counter()
    run_model(loaded.model, x, batch_size=16, record=False)
    print(json.dumps({"compute_seconds": time.perf_counter() - t0}))     # the model's own time, no start


def bound(ckpt: str, n: int, runs: int) -> tuple[dict, list]:
    """What bounds the ratio: the torch model's own computing time on n images (no start, no loading) beside
    each executor's (the report's `seconds`) in one process (the runtimes on every core) and in two (`--jobs
    2`, one thread each: the report sums the two processes' seconds, so half of it is the wall time of a
    perfect split). If verify cost nothing but running its executors, its ratio could be at most the model's
    time over theirs; the first three executors (torch, onnxruntime's two) run other projects' kernels."""
    cmds = {"torch alone": [C.PYTHON, os.path.abspath(__file__), "--torch-alone", ckpt, "--n", str(n)],
            "verify, 1 process": [C.SDT_DEPLOY, "verify", ckpt, "--random", str(n), "--executors", EXECUTORS,
                                  "--jobs", "1", "--json"],
            "verify, 2 processes": [C.SDT_DEPLOY, "verify", ckpt, "--random", str(n), "--executors", EXECUTORS,
                                    "--jobs", "2", "--json"]}
    seen: dict = {k: [] for k in cmds}
    for _ in range(runs):
        for who, cmd in cmds.items():
            r = C.run_child_tree(cmd)
            if r["rc"] != 0:
                raise SystemExit(f"{who} failed ({r['rc']}): {r['stderr']}")
            doc = json.loads(r["stdout"][r["stdout"].index("{"):])
            seen[who].append(doc["compute_seconds"] if who == "torch alone" else doc["seconds"])
    executors = EXECUTORS.split(",")
    doc = {"images": n, "model_compute_seconds": C.median(seen["torch alone"]), "runs": seen,
           "median": {who: {e: C.median([s[e] for s in seen[who]]) for e in executors}
                      for who in cmds if who != "torch alone"}}
    return doc, bound_rows(doc)


def bound_rows(doc: dict) -> list:
    """The bound's table from its record: per executor the report's seconds, the wall time they take (halved
    for two processes: a perfect split), that over the model's own time; then the ceilings."""
    model = doc["model_compute_seconds"]
    rows = [["torch model alone", f"its own computing, {doc['images']} images", model, model, 1.0]]
    for who, secs in doc["median"].items():
        processes = 2 if "2 processes" in who else 1
        wall = {e: s / processes for e, s in secs.items()}
        rows += [[who, e, secs[e], wall[e], wall[e] / model] for e in secs]
        third_party = sum(wall[e] for e in ("torch", "onnx-int", "onnx-float"))
        rows.append([who, "every executor: the ratio's ceiling", sum(secs.values()), sum(wall.values()),
                     f"ceiling {model / sum(wall.values()):.3f}x"])
        rows.append([who, "torch + onnx-int + onnx-float alone: their ceiling",
                     sum(secs[e] for e in ("torch", "onnx-int", "onnx-float")), third_party,
                     f"ceiling {model / third_party:.3f}x"])
    return rows


def comparable(doc: dict) -> str:
    """The report without what may differ between two correct verifiers: the times, the reference's
    precision (mixed since issue 19), and the sha256 of the files exported for the run, which each version
    exports its own way (the NIR file's HDF5 container since the file-object driver of commit 6f8c2fd,
    every dataset identical; the int ONNX file's weights as uint8 with a zero point since issue 19, the
    same integers: tests/test_artifact_hashes.py). Every count, divergence and prediction stays."""
    doc = json.loads(json.dumps(doc, default=float))
    doc.pop("seconds", None)
    doc["bits"] = {k: v for k, v in doc["bits"].items() if not k.startswith("reference_")}
    files = list(doc.get("artifacts", {}).values()) + [e.get("file") for e in doc.get("executors", {}).values()]
    for where in files:
        if isinstance(where, dict) and where.get("origin") == "exported for this run":
            where.pop("sha256", None)
    return json.dumps(doc, sort_keys=True)


def verify_doc(r: dict, what: str) -> dict:
    if r["rc"] != 0:
        raise SystemExit(f"{what} failed ({r['rc']}): {r['stderr']}")
    return json.loads(r["stdout"][r["stdout"].index("{"):])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="cifar10/2_256_300E_t4")
    p.add_argument("--small", type=int, default=32)
    p.add_argument("--large", type=int, default=160)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--previous", choices=["both", "small", "none"], default="both",
                   help="run the previous verify at both sizes, the small one only (its memory grows with the "
                        "batch: 7 GB for 2 images of SDT-8-768), or not at all")
    p.add_argument("--also", metavar="COMMIT", action="append", default=[],
                   help="another version's verify to run beside (e.g. the code before a change), both sizes")
    p.add_argument("--each", action="store_true",
                   help="also verify with one executor at a time (the reference and one file: what a user shipping "
                        "one file runs), both sizes")
    p.add_argument("--bound-runs", type=int, default=1,
                   help="rounds of the bound (each executor's own time against the model's; 0: none)")
    p.add_argument("--torch-alone", metavar="CKPT", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.torch_alone:
        return torch_alone(a.torch_alone, a.n)
    ckpt = checkpoint(a.model)
    prev = C.previous_code()
    also = {f"verify ({c})": C.previous_code(c) for c in a.also}
    sizes = (a.small, a.large)
    result = {"machine": C.machine(), "versions": C.versions(), "model": a.model, "sizes": sizes, "runs": [],
              "commands": {}}

    def commands(n: int) -> dict:
        cmds = {"torch alone": ([C.PYTHON, os.path.abspath(__file__), "--torch-alone", ckpt, "--n", str(n)], {}),
                "verify (this code)": ([C.SDT_DEPLOY, "verify", ckpt, "--random", str(n), "--executors", EXECUTORS,
                                        "--json"], {})}
        if a.previous == "both" or (a.previous == "small" and n == a.small):
            cmds["verify (previous, 19dcc53)"] = ([C.PYTHON, "-m", "sdt_deploy", "verify", ckpt, "--random", str(n),
                                                   "--executors", EXECUTORS, "--json"], prev)
        for who, code in also.items():
            cmds[who] = ([C.PYTHON, "-m", "sdt_deploy", "verify", ckpt, "--random", str(n), "--executors", EXECUTORS,
                          "--json"], code)
        for e in (EXECUTORS.split(",")[1:] if a.each else ()):
            cmds[f"verify, {e} only"] = ([C.SDT_DEPLOY, "verify", ckpt, "--random", str(n), "--executors", e, "--json"],
                                         {})
        return cmds

    for n in sizes:
        result["commands"][n] = {k: " ".join(v[0]) for k, v in commands(n).items()}
    for who, (cmd, extra) in commands(a.small).items():          # warm-up: file caches, compiled code
        if who != "verify (previous, 19dcc53)":
            C.run_child_tree(cmd, env=extra.get("env"), cwd=extra.get("cwd", C.ROOT))
    for i in range(a.runs):
        for n in sizes:
            docs = {}
            for who, (cmd, extra) in commands(n).items():
                r = C.run_child_tree(cmd, env=extra.get("env"), cwd=extra.get("cwd", C.ROOT))
                if who != "torch alone":
                    docs[who] = verify_doc(r, who)
                elif r["rc"] != 0:
                    raise SystemExit(f"torch alone failed: {r['stderr']}")
                row = {"round": i, "n": n, "who": who, "wall": r["seconds"], "peak_tree_mib": r["peak_tree_mib"],
                       "load1": r["load_before"][0], "stderr": r["stderr"][-400:]}
                if who in docs:
                    row["ok"] = docs[who]["ok"]
                    row["executor_seconds"] = docs[who]["seconds"]
                result["runs"].append(row)
                print(f"round {i} n {n} {who}: {r['seconds']:.1f} s, peak {r['peak_tree_mib']:.0f} MiB, "
                      f"load {r['load_before'][0]}", flush=True)
            for who in docs:
                if who != "verify (this code)" and not who.endswith(" only"):
                    same = comparable(docs["verify (this code)"]) == comparable(docs[who])
                    row = next(r for r in reversed(result["runs"]) if r["who"] == who)
                    row["identical_to_this_code"] = same
                    print(f"  reports of {who} and this code identical: {same}", flush=True)

    def walls(who, n):
        return [r["wall"] for r in result["runs"] if r["who"] == who and r["n"] == n]

    rows = []
    summary = {}
    torch_small, torch_large = C.median(walls("torch alone", a.small)), C.median(walls("torch alone", a.large))
    torch_marginal = (a.large - a.small) / max(torch_large - torch_small, 1e-9)
    each = [f"verify, {e} only" for e in EXECUTORS.split(",")[1:]] if a.each else []
    for who in ("verify (this code)", "verify (previous, 19dcc53)", *also, *each):
        entry = {}
        for n, t_torch in ((a.small, torch_small), (a.large, torch_large)):
            w = walls(who, n)
            if not w:
                continue
            t = C.median(w)
            entry[n] = t
            peaks = [r["peak_tree_mib"] for r in result["runs"] if r["who"] == who and r["n"] == n]
            loads = [r["load1"] for r in result["runs"] if r["who"] == who and r["n"] == n]
            rows.append([who, f"whole command, {n} images", n / t, n / t_torch, C.ratio(n / t, n / t_torch),
                         f"peak {C.median(peaks):.0f} MiB; load {loads}"])
        if len(entry) == 2:
            marginal = (a.large - a.small) / max(entry[a.large] - entry[a.small], 1e-9)
            fixed = entry[a.small] - a.small / marginal
            rows.append([who, f"dataset scale (marginal {a.small}->{a.large})", marginal, torch_marginal,
                         C.ratio(marginal, torch_marginal),
                         f"fixed start {fixed:.1f} s; 10,000 images: {(fixed + 10000 / marginal) / 60:.0f} min"])
            entry["marginal"] = marginal
            entry["fixed"] = fixed
        summary[who] = entry
    identical = [r["identical_to_this_code"] for r in result["runs"] if "identical_to_this_code" in r]
    result["summary"] = summary
    result["identical"] = identical
    md = C.md_table(["verify", "figure", "img/s", "torch model alone img/s", "ratio", "notes"], rows)
    ours = summary.get("verify (this code)", {})
    speed = [f"{who[len('verify '):]}, {n} images: {summary[who][n] / ours[n]:.2f}x" for who in summary
             if who != "verify (this code)" and who not in each for n in sizes if n in ours and n in summary[who]]
    md += (f"\n\n{a.model}, random calibrated weights; every CPU executor ({EXECUTORS}); median of {a.runs} rounds "
           f"after a warm-up, the commands taking turns. This code against the other versions (their wall time over "
           f"this code's): "
           f"{', '.join(speed) or '-'}; reports identical in every round where both ran: {all(identical)} "
           f"({len(identical)} compared). The machine is shared: the load average (1 min) at each run is given.")
    if a.bound_runs:
        result["bound"], bound_rows = bound(ckpt, a.large, a.bound_runs)
        md += ("\n\nWhat bounds the ratio (" + str(a.large) + " images; seconds of each executor, the torch model's "
               "own computing time without its start; two processes: the report sums the two processes' seconds, "
               "half of it is the wall time of a perfect split):\n\n")
        md += C.md_table(["run", "executor", "seconds (report)", "wall seconds", "over the model's time"], bound_rows)
    C.save("verify_" + a.model.replace("/", "_"), result, md)


if __name__ == "__main__":
    main()
