"""An exported `.nir` file in the simulators people use, run as their users would (docs/nir-interop.md).

Each runner takes a NIR graph (or path) and the per-step NIR input x [B, T, ...] (what the host stem
feeds, `nir_feed`) and returns `run_nir`'s contract: ({Output node: float32 [T, B, ...]}, {spiking NIR
node: uint8 [T, B, ...]}). Spikes are recorded with forward hooks on the simulator's own neuron modules,
so a wrongly ordered executor shows up layer by layer.

- `run_norse(..., loader="from_nir")`: `norse.torch.from_nir(graph)` (norse 1.1; nirtorch's depth-first
  `GraphExecutor`), dt = norse's default 1e-3 unless given; exact for the `norse` profile.
- `run_norse(..., loader="nir_to_torch")`: the same norse neuron modules (norse's own node map) wired by
  `nirtorch.nir_to_torch`, which orders nodes by their inputs; exact for the portable and norse profiles
  with the graph's dt.
- `run_snntorch`: snntorch 1.0's `import_from_nir` (dt 1e-4 fixed), exact for the portable profile.

`readout` applies the graph's `readout` / `time_steps` metadata (`readout_rule` says it in words): the
mean over T in float32, as the torch model computes it, or TET's per-step logits.
"""
from __future__ import annotations

import contextlib
import copy
import io
from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional

import nir
import numpy as np
import torch

from sdt_deploy.errors import DeployError
from sdt_deploy.run.nir_artifact import host_feed, open_nir_artifact, readout
from sdt_deploy.run.nir_interpreter import load_graph, nir_layer_spikes, run_nir, torch_threads

NORSE_DEFAULT_DT = 1e-3          # norse.torch.from_nir(node, ..., dt=0.001)
SPIKING = (nir.LIF, nir.IF, nir.CubaLIF, nir.Threshold)


def torch_module_name(nir_name: str) -> str:
    """nirtorch's name for a NIR node's module (`nirtorch.nir_interpreter._sanitize_name`): dots become
    underscores, Python keywords get a `nir_node_` prefix."""
    import keyword

    name = nir_name.replace(".", "_")
    return "nir_node_" + name if keyword.iskeyword(name) else name


def graph_dt(graph: nir.NIRGraph) -> Optional[float]:
    meta = graph.metadata if isinstance(graph.metadata, dict) else {}
    return float(meta["dt"]) if "dt" in meta else None


# ---------------------------------------------------------------- the host side

def nir_feed(nir_path: str, x: np.ndarray) -> tuple[dict, np.ndarray]:
    """(the host stem's spikes by layer, the per-step NIR input [B, T, ...] float64) for model inputs x:
    `nir_artifact.host_feed` of the file."""
    return host_feed(open_nir_artifact(nir_path), x)


# ---------------------------------------------------------------- executors

def _step_module(net, x: np.ndarray, spiking: dict, threads: Optional[int], pass_state: bool = True
                 ) -> tuple[np.ndarray, dict]:
    """Call the module once per step (`net(x_t, state)`, or `net(x_t)` where the neurons keep their own
    state), recording each neuron module's spikes with a forward hook."""
    record: dict = {name: [] for name in spiking.values()}
    hooks = []
    for mod_name, module in net.named_modules():
        if mod_name in spiking:
            key = spiking[mod_name]

            def hook(_m, _i, out, key=key):
                z = out[0] if isinstance(out, tuple) else out
                record[key].append(z.detach().cpu().numpy().astype(np.uint8))
            hooks.append(module.register_forward_hook(hook))
    steps, state = [], None
    try:
        with torch.no_grad(), torch_threads(threads):
            for t in range(x.shape[1]):
                xt = torch.from_numpy(np.ascontiguousarray(x[:, t], dtype=np.float32))
                y, state = net(xt, state) if pass_state else net(xt)
                steps.append(y.detach().cpu().numpy())
    finally:
        for h in hooks:
            h.remove()
    return np.stack(steps), {k: np.stack(v) for k, v in record.items() if v}


def _spiking_modules(graph: nir.NIRGraph) -> dict:
    return {torch_module_name(n): n for n, node in graph.nodes.items() if isinstance(node, SPIKING)}


def _single_output(graph: nir.NIRGraph) -> str:
    outs = [n for n, node in graph.nodes.items() if isinstance(node, nir.Output)]
    if len(outs) != 1:
        raise DeployError(f"expected one Output node, the graph has {len(outs)}")
    return outs[0]


def norse_module(graph_or_path, dt: Optional[float] = None, loader: str = "from_nir"):
    """The torch module norse makes of a NIR graph.

    `from_nir`: `norse.torch.from_nir(graph)` -- with `dt` only when given (None: norse's default 1e-3,
    what a user who calls it plainly gets). `nir_to_torch`: norse's own node mapping
    (`norse.torch.utils.import_nir._import_norse_module`, what from_nir passes to nirtorch) for every
    node type it maps, wired by `nirtorch.nir_to_torch`."""
    import nirtorch
    import norse.torch
    from norse.torch.utils.import_nir import _import_norse_module

    graph = copy.deepcopy(load_graph(graph_or_path))
    if loader == "from_nir":
        return norse.torch.from_nir(graph) if dt is None else norse.torch.from_nir(graph, dt=dt)
    if loader == "nir_to_torch":
        make = partial(_import_norse_module, dt=NORSE_DEFAULT_DT if dt is None else dt)
        node_map = {t: make for t in (nir.Affine, nir.Conv2d, nir.Flatten, nir.Linear, nir.IF, nir.LIF,
                                      nir.CubaLIF, nir.SumPool2d)}
        return nirtorch.nir_to_torch(graph, node_map)
    raise DeployError(f"unknown norse loader {loader!r} (from_nir or nir_to_torch)")


def run_norse(graph_or_path, x: np.ndarray, dt: Optional[float] = None, loader: str = "from_nir",
              threads: Optional[int] = 1) -> tuple[dict, dict]:
    """Run a NIR graph in norse for T = x.shape[1] steps (float32): `run_nir`'s contract."""
    graph = load_graph(graph_or_path)
    net = norse_module(graph, dt, loader)
    out, spikes = _step_module(net, x, _spiking_modules(graph), threads)
    return {_single_output(graph): out}, spikes


def _snntorch_module(graph: nir.NIRGraph):
    from snntorch.import_nir import import_from_nir

    return import_from_nir(copy.deepcopy(graph))      # the importer edits the graph it is given


@dataclass(frozen=True)
class Executor:
    """A way to run a NIR file: `load(graph) -> module` (the step users take first), then one call per
    step; `pass_state`: the module returns (out, state) and takes the state back."""

    load: Callable
    pass_state: bool = True
    call: str = ""


EXECUTORS = {
    "sdt-deploy": Executor(lambda g: g, call="sdt_deploy.run.nir_interpreter.run_nir(graph, x)"),
    "snntorch": Executor(_snntorch_module, pass_state=False,
                         call="snntorch.import_nir.import_from_nir(graph); per step: out, _ = net(x_t)"),
    "norse.from_nir": Executor(lambda g: norse_module(g, None, "from_nir"),
                               call="norse.torch.from_nir(graph); per step: out, state = net(x_t, state)"),
    "norse.from_nir(dt)": Executor(lambda g: norse_module(g, graph_dt(g), "from_nir"),
                                   call="norse.torch.from_nir(graph, dt=graph.metadata['dt'])"),
    "norse.nir_to_torch(dt)": Executor(lambda g: norse_module(g, graph_dt(g), "nir_to_torch"),
                                       call="nirtorch.nir_to_torch(graph, {type: partial(norse.torch.utils."
                                            "import_nir._import_norse_module, dt=graph.metadata['dt'])})"),
}


def run_with(executor: str, graph: nir.NIRGraph, x: np.ndarray, net=None, threads: Optional[int] = 1
             ) -> tuple[dict, dict]:
    """`run_nir`'s contract through one executor of `EXECUTORS` (`net`: its loaded module, if loaded)."""
    ex = EXECUTORS[executor]
    net = ex.load(graph) if net is None else net
    if executor == "sdt-deploy":
        return run_nir(graph, x, threads=threads)
    out, spikes = _step_module(net, x, _spiking_modules(graph), threads, ex.pass_state)
    return {_single_output(graph): out}, spikes


def run_artifact_with(executor: str, nir_path: str, x: np.ndarray, feed=None) -> tuple[dict, np.ndarray]:
    """(spikes by SDT layer name -- the host stem's and the NIR graph's --, logits) of an exported file
    run by one executor of `EXECUTORS` on model inputs x. `feed`: `nir_feed`'s result, if already made."""
    graph = load_graph(nir_path)
    stem_spikes, nx = feed if feed is not None else nir_feed(nir_path, x)
    outs, spikes = run_with(executor, graph, nx)
    layers = dict(stem_spikes)
    layers.update(nir_layer_spikes(graph, spikes, check_broadcast=False))
    return layers, readout(graph, outs[_single_output(graph)])


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}".rstrip(": ")


def measure(executor: str, nir_path: str, x: np.ndarray, ref: dict, feed=None) -> dict:
    """One row of the interoperability matrix: does the file load, run, give every NIR layer's spikes and
    the logits of the quantized torch model (`ref`: `sdt-deploy run --quantize --dump`'s arrays)?"""
    row = {"executor": executor, "call": EXECUTORS[executor].call, "loads": False, "runs": False,
           "layers_exact": None, "layers": None, "logits_identical": None, "reason": ""}
    graph = load_graph(nir_path)
    layers = sorted({str(n.metadata["sdt_layer"]) for n in graph.nodes.values()
                     if isinstance(n.metadata, dict) and "sdt_layer" in n.metadata})
    row["layers"] = len(layers)
    try:
        with contextlib.redirect_stdout(io.StringIO()):       # snntorch prints every weight scale
            net = EXECUTORS[executor].load(graph)
    except Exception as exc:  # noqa: BLE001 - what the simulator says is the measurement
        row["reason"] = "load: " + _reason(exc)
        return row
    row["loads"] = True
    try:
        _, nx = feed if feed is not None else nir_feed(nir_path, x)
        outs, spikes = run_with(executor, graph, nx, net)
        named = nir_layer_spikes(graph, spikes, check_broadcast=False)
        logits = readout(graph, outs[_single_output(graph)])
    except Exception as exc:  # noqa: BLE001
        row["reason"] = "run: " + _reason(exc)
        return row
    row["runs"] = True
    exact = [k for k in layers if k in named and named[k].shape == ref[k].shape and np.array_equal(named[k], ref[k])]
    row["layers_exact"] = len(exact)
    want = ref["logits"]
    row["logits_identical"] = bool(logits.shape == want.shape and np.array_equal(logits, want))
    wrong = [k for k in layers if k not in exact]
    if wrong:
        k = wrong[0]
        if k not in named:
            row["reason"] = f"{k}: no spikes exposed"
        elif named[k].shape != ref[k].shape:
            row["reason"] = f"{k}: shape {list(named[k].shape)} vs {list(ref[k].shape)}"
        else:
            d = named[k] != ref[k]
            row["reason"] = (f"first wrong layer {k}: {int(d.sum())} of {d.size} spikes differ, first at (t, b, ...) "
                             f"= {tuple(int(i) for i in np.argwhere(d)[0])}")
    elif not row["logits_identical"]:
        row["reason"] = ("logits: shape " + str(list(logits.shape)) + " vs " + str(list(want.shape))
                         if logits.shape != want.shape else
                         f"logits differ by up to {float(np.abs(logits - want).max()):.3g}")
    return row


def run_snntorch(graph_or_path, x: np.ndarray, threads: Optional[int] = 1) -> tuple[dict, dict]:
    """A (portable-profile) NIR graph imported by snntorch's `import_from_nir` and run for T = x.shape[1]
    steps in float32, as snntorch does: `run_nir`'s contract."""
    return run_with("snntorch", load_graph(graph_or_path), x, threads=threads)
