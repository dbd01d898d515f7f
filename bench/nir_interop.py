"""The NIR interoperability matrix (README "NIR in simulators", docs/nir-interop.md).

Exports each checkpoint with every NIR profile through the command line (`sdt-deploy export --target nir
--nir-profile P`, partitioned: stem ONNX + NIR + manifest), takes the expected values from
`sdt-deploy run --quantize --dump` (the quantized torch model), and runs every file in every simulator
installed in this environment, as its users load it. Per simulator call and profile: does it load, does it
run, how many of the NIR graph's layers have every spike identical (`==`), are the logits identical
(formed by the read-out the file's metadata states), and the exact reason where not. Installs nothing.

    python bench/nir_interop.py                       # project env: sdt-deploy, snntorch, norse
    python bench/nir_interop.py --cases demo,plif_1111 --out /tmp/interop
    python bench/nir_interop.py --table-only          # the table again, with foreign rows added since

It also writes, under --out, what the simulators that cannot be installed beside the project need
(`cases.json`: each .nir file, its per-step NIR input and the reference), for
`bench/nir_interop_foreign.py`, run in each such simulator's own environment (sinabs, spyx, rockpool);
their rows (`foreign_<sim>.json`) join the table when present. The table is printed as Markdown and
saved with the raw rows in `<out>/nir_interop.json` and `<out>/nir_interop.md`.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from importlib import metadata

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from sdt_deploy.cli import main as cli  # noqa: E402
from sdt_deploy.run.nir_simulators import EXECUTORS, measure, nir_feed  # noqa: E402

SHARED = os.environ.get("SDT_DEPLOY_SHARED", os.path.join(os.path.dirname(ROOT), "shared"))
CASES = {
    # name: (checkpoint, input)
    "fixture": (os.path.join(SHARED, "fixtures", "sdt_cifar_2_256.pth"),
                os.path.join(SHARED, "fixtures", "sdt_cifar_2_256_input.npy")),
    "demo": (os.path.join(ROOT, "sdt_deploy", "assets", "demo_sdt_digits.pth"), "digits"),
    "plif_1111": (os.path.join(ROOT, "tests", "data", "oracle", "plif_1111.pth"),
                  os.path.join(ROOT, "tests", "data", "oracle", "plif_1111_ref.npz") + ":input"),
    "dvs_tet_t16": (os.path.join(ROOT, "tests", "data", "variants", "dvs_tet_t16.pth"),
                    os.path.join(ROOT, "tests", "data", "variants", "dvs_tet_t16_input.npy")),
}
PROFILES = ("standard", "portable", "norse")
PACKAGES = ("nir", "nirtorch", "snntorch", "norse", "torch", "sinabs", "spyx", "jax", "rockpool")


def load_input(spec: str) -> np.ndarray:
    if spec == "digits":
        from sdt_deploy.data.digits import digits_split

        return digits_split("test").x[:4]
    if ":" in spec:
        path, key = spec.rsplit(":", 1)
        with np.load(path) as z:
            return z[key]
    return np.load(spec)


def versions() -> dict:
    out = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            pass
    return out


def available(executor: str) -> bool:
    mod = {"snntorch": "snntorch", "norse": "norse"}.get(executor.split(".")[0])
    if mod is None:
        return True
    try:
        __import__(mod)
        return True
    except ImportError:
        return False


def prepare(name: str, out: str) -> dict:
    """Export the case with every profile and dump the reference; returns the case's description."""
    ckpt, spec = CASES[name]
    folder = os.path.join(out, name)
    os.makedirs(folder, exist_ok=True)
    x = load_input(spec)
    np.save(os.path.join(folder, "x.npy"), x)
    ref = os.path.join(folder, "ref.npz")
    assert cli(["run", ckpt, "--input", os.path.join(folder, "x.npy"), "--quantize", "--dump", ref, "--force"]) == 0
    files = {}
    for prof in PROFILES:
        path = os.path.join(folder, f"{prof}.nir")
        assert cli(["export", ckpt, "--target", "nir", "--nir-profile", prof, "-o", path, "--force"]) == 0
        stem_spikes, feed = nir_feed(path, x)
        np.save(os.path.join(folder, f"{prof}.feed.npy"), feed)
        files[prof] = {"nir": path, "feed": os.path.join(folder, f"{prof}.feed.npy")}
    return {"checkpoint": ckpt, "input": spec, "reference": ref, "files": files}


def run(cases: list, out: str) -> dict:
    os.makedirs(out, exist_ok=True)
    described, rows = {}, []
    for name in cases:
        if not os.path.exists(CASES[name][0]):
            print(f"skip {name}: {CASES[name][0]} is absent", file=sys.stderr)
            continue
        described[name] = d = prepare(name, out)
        with np.load(d["reference"]) as z:
            ref = {k: z[k] for k in z.files}
        x = np.load(os.path.join(out, name, "x.npy"))
        for prof in PROFILES:
            path = d["files"][prof]["nir"]
            feed = ({}, np.load(d["files"][prof]["feed"]))
            for ex in EXECUTORS:
                if not available(ex):
                    continue
                t0 = time.perf_counter()
                row = measure(ex, path, x, ref, feed)
                row.update(case=name, profile=prof, seconds=round(time.perf_counter() - t0, 2))
                rows.append(row)
                print(f"{name:12s} {prof:9s} {ex:24s} load {row['loads']!s:5s} run {row['runs']!s:5s} "
                      f"layers {row['layers_exact']}/{row['layers']} logits {row['logits_identical']} "
                      f"{row['reason']}", file=sys.stderr)
    with open(os.path.join(out, "cases.json"), "w") as f:
        json.dump(described, f, indent=1)
    return {"date": datetime.date.today().isoformat(), "versions": versions(), "rows": rows,
            "command": "python bench/nir_interop.py"}


# ---------------------------------------------------------------- the table

def _cell(rows: list, key) -> str:
    return ", ".join(key(r) for r in rows)


def table(results: list) -> str:
    """Markdown: one line per (simulator call, profile), the cases side by side."""
    lines = ["| simulator | call | profile | loads | runs | NIR layers with every spike identical | "
             "logits identical | why not |", "|---|---|---|---|---|---|---|---|"]
    for res in results:
        v = res["versions"]
        rows = res["rows"]
        groups: dict = {}
        for r in rows:
            groups.setdefault((r["executor"], r["profile"]), []).append(r)
        for (ex, prof), rs in groups.items():
            sim = ex.split(".")[0]
            label = {"sdt-deploy": "sdt-deploy interpreter"}.get(sim, f"{sim} {v.get(sim, '')}".strip())
            if sim in ("norse", "snntorch", "sinabs", "rockpool") and "nirtorch" in v:
                label += f" (nirtorch {v['nirtorch']})"
            yes = lambda b: "yes" if b else "no"  # noqa: E731
            layers = _cell(rs, lambda r: f"{r['case']} {r['layers_exact']}/{r['layers']}"
                           if r["layers_exact"] is not None else f"{r['case']} -")
            logits = _cell(rs, lambda r: f"{r['case']} {yes(r['logits_identical'])}"
                           if r["logits_identical"] is not None else f"{r['case']} -")
            reasons = [f"{r['case']}: {r['reason']}" for r in rs if r["reason"]]
            why = reasons[0] + (f" (and {len(reasons) - 1} more cases)" if len(reasons) > 1 else "") if reasons else ""
            lines.append(f"| {label} | `{rs[0]['call']}` | {prof} | {yes(all(r['loads'] for r in rs))} | "
                         f"{yes(all(r['runs'] for r in rs))} | {layers} | {logits} | {why or '-'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    ap.add_argument("--out", default=os.path.join("/tmp", "sdt-nir-interop"))
    ap.add_argument("--table-only", action="store_true",
                    help="remake the table from <out>/nir_interop.json and the foreign rows, measuring nothing")
    args = ap.parse_args(argv)
    if args.table_only:
        with open(os.path.join(args.out, "nir_interop.json")) as fh:
            results = [json.load(fh)[0]]
    else:
        import torch

        torch.set_num_threads(1)
        results = [run([c for c in args.cases.split(",") if c], args.out)]
    for f in sorted(os.listdir(args.out)):
        if f.startswith("foreign_") and f.endswith(".json"):
            with open(os.path.join(args.out, f)) as fh:
                results.append(json.load(fh))
    with open(os.path.join(args.out, "nir_interop.json"), "w") as f:
        json.dump(results, f, indent=1)
    md = "\n".join([f"Measured {r['date']} with `{r['command']}`: " +
                    ", ".join(f"{k} {v}" for k, v in r["versions"].items()) for r in results]) + "\n\n" + table(results)
    with open(os.path.join(args.out, "nir_interop.md"), "w") as f:
        f.write(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
