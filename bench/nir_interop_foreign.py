"""The interoperability matrix's rows for simulators that cannot be installed beside sdt-deploy.

sinabs 3.1 needs nir <= 1.0.4 (the project needs 1.0.8), spyx needs jax, rockpool 3.1 is measured on its
own too. Each runs in its own environment, which needs only numpy, nir, h5py and the simulator (this file
imports nothing from sdt-deploy). First, in the project's environment, `python bench/nir_interop.py --out DIR`
writes DIR/cases.json (every exported .nir file, its per-step NIR input and the reference spikes); then,
for example:

    python3 -m venv /tmp/venv-spyx && /tmp/venv-spyx/bin/pip install spyx==1.0.0 nir==1.0.8 h5py
    /tmp/venv-spyx/bin/python bench/nir_interop_foreign.py DIR spyx

writes DIR/foreign_spyx.json, which `bench/nir_interop.py --out DIR` adds to the table. The exact
environments measured are in docs/nir-interop.md. Installs nothing.

Each row: does `nir.read` + the simulator's importer load the file, does it run, how many of the NIR
graph's layers have every spike identical to the quantized torch model (where the simulator exposes
them), are the logits identical, and the exact error where not.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import traceback
from importlib import metadata

import numpy as np

PACKAGES = ("nir", "nirtorch", "torch", "sinabs", "spyx", "jax", "rockpool", "numpy")


def versions() -> dict:
    out = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            pass
    return out


def reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    where = traceback.extract_tb(exc.__traceback__)[-1]
    origin = f" [{os.path.basename(where.filename)}:{where.lineno}]"
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}".rstrip(": ") + origin


def readout(meta: dict, per_step: np.ndarray) -> np.ndarray:
    """The logits from the per-step output [T, B, ...] as the graph's `readout` metadata says."""
    per_step = np.asarray(per_step, dtype=np.float32)
    per_step = per_step.reshape(per_step.shape[:2] + (-1,))
    if str(meta.get("readout")) == "per_step":
        return per_step
    try:
        import torch
    except ImportError:      # spyx's environment: float32 sum / T (torch.mean's result where the sum is exact)
        return (per_step.sum(0, dtype=np.float32) / np.float32(per_step.shape[0])).astype(np.float32)
    return torch.from_numpy(per_step).mean(0).numpy()


def compare_logits(meta: dict, per_step, ref: dict) -> tuple:
    T = int(meta["time_steps"])
    if per_step is None or np.asarray(per_step).shape[0] != T:
        return False, f"output has shape {None if per_step is None else list(np.asarray(per_step).shape)}"
    want = ref["logits"]
    try:
        got = readout(meta, per_step)
    except Exception as exc:  # noqa: BLE001
        return False, "read-out: " + reason(exc)
    if got.shape != want.shape:
        return False, f"logits shape {list(got.shape)} vs {list(want.shape)}"
    same = bool(np.array_equal(got, want))
    return same, "" if same else f"logits differ by up to {float(np.abs(got - want).max()):.3g}"


# ---------------------------------------------------------------- the simulators, as documented

def load_sinabs(graph, B: int, T: int):
    import sinabs

    return sinabs.from_nir(graph, batch_size=B, num_timesteps=T)


def run_sinabs(net, feed: np.ndarray) -> np.ndarray:
    import torch

    B, T = feed.shape[:2]
    x = torch.from_numpy(np.ascontiguousarray(feed.reshape((B * T,) + feed.shape[2:]), dtype=np.float32))
    with torch.no_grad():
        y = net(x)
    y = y[0] if isinstance(y, tuple) else y
    y = y.detach().numpy()
    return y.reshape((B, T) + y.shape[1:]).swapaxes(0, 1)


def load_rockpool(graph, B: int, T: int):
    from rockpool.nn.modules.torch.nir import from_nir

    return from_nir(graph)


def run_rockpool(net, feed: np.ndarray) -> np.ndarray:
    import torch

    x = torch.from_numpy(np.ascontiguousarray(feed, dtype=np.float32))      # rockpool: [B, T, ...]
    with torch.no_grad():
        y = net(x)
    y = y[0] if isinstance(y, tuple) else y
    return y.detach().numpy().swapaxes(0, 1)


def load_spyx(graph, B: int, T: int):
    return graph       # spyx.nir.from_nir builds and runs in one call


def run_spyx(graph, feed: np.ndarray, dt: float):
    import jax.numpy as jnp
    import spyx.nir

    x = jnp.asarray(np.ascontiguousarray(feed.swapaxes(0, 1), dtype=np.float32))   # time-major [T, B, ...]
    model, out = spyx.nir.from_nir(graph, x, dt=dt)
    n_modules = len(getattr(model, "layers", []) or [])
    return np.asarray(out), n_modules


SIMULATORS = {
    "sinabs": ("sinabs.from_nir(nir.read(path), batch_size=B, num_timesteps=T); net(x [B*T, ...])",
               load_sinabs, run_sinabs),
    "rockpool": ("rockpool.nn.modules.torch.nir.from_nir(nir.read(path)); net(x [B, T, ...])",
                 load_rockpool, run_rockpool),
    "spyx": ("spyx.nir.from_nir(nir.read(path), x [T, B, ...], dt=graph.metadata['dt'])", load_spyx, None),
}


def measure(sim: str, case: dict, profile: str) -> dict:
    import nir

    call, load, run = SIMULATORS[sim]
    files = case["files"][profile]
    row = {"executor": sim, "call": call, "loads": False, "runs": False, "layers_exact": None, "layers": None,
           "logits_identical": None, "reason": ""}
    try:
        graph = nir.read(files["nir"])
    except Exception as exc:  # noqa: BLE001 - the reader's error is the measurement
        row["reason"] = "nir.read: " + reason(exc)
        return row
    meta = graph.metadata if isinstance(graph.metadata, dict) else {}
    row["layers"] = sum(1 for n in graph.nodes.values() if "sdt_layer" in (n.metadata or {}))
    feed = np.load(files["feed"])
    with np.load(case["reference"]) as z:
        ref = {k: z[k] for k in z.files}
    B, T = feed.shape[:2]
    try:
        net = load(graph, B, T)
    except Exception as exc:  # noqa: BLE001
        row["reason"] = "load: " + reason(exc)
        return row
    row["loads"] = True
    try:
        if sim == "spyx":
            out, n_modules = run_spyx(net, feed, float(meta.get("dt", 1e-4)))
        else:
            out, n_modules = run(net, feed), None
    except Exception as exc:  # noqa: BLE001
        row["reason"] = "run: " + reason(exc)
        return row
    row["runs"] = True
    row["logits_identical"], why = compare_logits(meta, out, ref)
    if n_modules is not None:
        same = np.shape(out) == feed.swapaxes(0, 1).shape and np.array_equal(np.asarray(out), feed.swapaxes(0, 1))
        why = f"built {n_modules} modules{', returned its input unchanged' if same else ''}; " + why
    row["reason"] = ("no per-layer spikes exposed; " + why) if why else "no per-layer spikes exposed"
    return row


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[1] not in SIMULATORS:
        print(__doc__)
        return 2
    out, sim = argv
    with open(os.path.join(out, "cases.json")) as f:
        cases = json.load(f)
    rows = []
    for name, case in cases.items():
        for profile in case["files"]:
            row = measure(sim, case, profile)
            row.update(case=name, profile=profile)
            rows.append(row)
            print(f"{name:12s} {profile:9s} load {row['loads']!s:5s} run {row['runs']!s:5s} "
                  f"logits {row['logits_identical']} {row['reason']}")
    res = {"date": datetime.date.today().isoformat(), "versions": versions(), "rows": rows,
           "command": f"bench/nir_interop_foreign.py DIR {sim}"}
    with open(os.path.join(out, f"foreign_{sim}.json"), "w") as f:
        json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
