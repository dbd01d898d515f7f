"""REFERENCE for the tests: `verify` as it was before it compared layers as they are produced (commit
19dcc53, sdt_deploy/verification/executors.py and verifier.py in one file, unchanged but for the imports
and its NIR executor stepping the NIR interpreter of that commit, tests/nir_interpreter_reference.py):
every executor's whole output of a batch kept, then compared; the torch reference in float64 throughout
where the bit analysis does not prove float32 exact, and a second, float32 run of the torch model for the
float ONNX file's states. The faster verifier must report the same counts, divergences and predictions.
"""
from __future__ import annotations

import contextlib
import copy
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from exporters.bundle import export_graph
from sdt_deploy.errors import DeployError, MismatchError
from sdt_deploy.files.artifacts import sha256_of
from sdt_deploy.ir.graph import LIF
from sdt_deploy.quant.bits import bit_report
from sdt_deploy.quant.qmodel import QuantizedModel
from sdt_deploy.run.float_executor import execute
from sdt_deploy.run.integer_engine import run_engine
from sdt_deploy.run.torch_runner import predictions, run_model, run_model_state
from sdt_deploy.verification.compare import first_divergence, mismatch_table

import nir_interpreter_reference as NI

ALL_EXECUTORS = ("torch", "cupy", "engine", "onnx-int", "onnx-float", "nir")


@dataclass
class Output:
    """What an executor shows of one batch."""

    spikes: dict                                  # layer -> uint8 [T, B, ...] (empty: the file exposes none)
    logits: np.ndarray
    membranes: dict = field(default_factory=dict)  # LIF layer -> membrane after the step's reset [T, B, ...]
    per_step: Optional[np.ndarray] = None         # the head's output at every step [T, B, K]
    arithmetic: str = ""                          # of membranes/per_step: "int" (integers on the grid), "float32"


@dataclass
class Context:
    q: QuantizedModel
    workdir: str
    artifacts: dict = field(default_factory=dict)      # executor -> path of the file it runs
    user_files: set = field(default_factory=set)       # the executors whose file the user gave
    float64_reference: bool = False
    states: set = field(default_factory=set)           # the arithmetics whose membranes are compared
    cache: dict = field(default_factory=dict)          # models, sessions, opened files
    batch: dict = field(default_factory=dict)          # outputs of the current batch, by executor

    @property
    def graph(self):
        return self.q.graph


# ---------------------------------------------------------------- executors

def _torch_model(ctx: Context, dtype) -> torch.nn.Module:
    """The quantized torch model; in float64 built from the graph's integers directly (a float32 model made
    float64 would keep whatever float32 rounded on the way in)."""
    key = f"torch_model_{dtype}"
    if key not in ctx.cache:
        if dtype == torch.float64:
            from sdt_deploy.quant.qmodel import build_quantized_model

            ctx.cache[key] = build_quantized_model(ctx.graph, ctx.q.config, dtype=torch.float64)
        else:
            ctx.cache[key] = ctx.q.model
    return ctx.cache[key]


def _torch_run(ctx: Context, x: np.ndarray, dtype) -> Output:
    xs = x.astype(np.float64) if dtype == torch.float64 else x
    arithmetic = "float64" if dtype == torch.float64 else "float32"
    if arithmetic not in ctx.states:          # no one compares its membranes: spikes and logits only
        logits, spikes = run_model(_torch_model(ctx, dtype), xs, batch_size=len(x))
        return Output(spikes, logits)
    logits, spikes, membranes, per_step = run_model_state(_torch_model(ctx, dtype), xs)
    return Output(spikes, logits, membranes, per_step, arithmetic)


def _torch(ctx: Context, x: np.ndarray) -> Output:
    return _torch_run(ctx, x, torch.float64 if ctx.float64_reference else torch.float32)


def cuda_skip_reason() -> Optional[str]:
    from models import cupy_available

    if not torch.cuda.is_available():
        return "no CUDA device"
    if not cupy_available():
        return "CuPy is not installed (pip install 'sdt-deploy[gpu]')"
    return None


@contextlib.contextmanager
def deterministic_cuda():
    """The GPU must compute exact values: TF32 off (it would round the float32 products), cuDNN off —
    its Winograd / FFT convolutions transform the inputs and can round values that are exact integers on
    the grid, while PyTorch's native im2col + cuBLAS GEMM sums exact products — and deterministic
    algorithms on."""
    saved = (torch.backends.cudnn.enabled, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
             torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
             torch.are_deterministic_algorithms_enabled())
    torch.backends.cudnn.enabled = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        (torch.backends.cudnn.enabled, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
         torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic) = saved[:5]
        torch.use_deterministic_algorithms(saved[5])


def _cupy(ctx: Context, x: np.ndarray) -> Output:
    if "cuda_model" not in ctx.cache:
        ctx.cache["cuda_model"] = copy.deepcopy(ctx.q.model).cuda()
    with deterministic_cuda():
        logits, spikes, membranes, per_step = run_model_state(ctx.cache["cuda_model"], x, device="cuda")
    return Output(spikes, logits, membranes, per_step, "float32")


def _engine(ctx: Context, x: np.ndarray) -> Output:
    """The integer engine; its membranes (integers on each LIF's grid) are what an integer export's states
    are compared with."""
    if "int" not in ctx.states:
        r = run_engine(ctx.graph, x)
        return Output(r.spikes, r.logits)
    r = run_engine(ctx.graph, x, membranes=True)
    membranes = {k: np.where(r.spikes[k] != 0, 0, h) for k, h in r.membranes.items()}   # after the reset
    return Output(r.spikes, r.logits, membranes, r.logits_int, "int")


def _onnx(variant: str) -> Callable[[Context, np.ndarray], Output]:
    def run(ctx: Context, x: np.ndarray) -> Output:
        from sdt_deploy.run.onnx_runner import open_onnx, run_onnx  # onnxruntime: only where it runs

        key = f"onnx-{variant}-session"
        if key not in ctx.cache:   # one onnxruntime session for all batches
            ctx.cache[key] = open_onnx(ensure_artifact(ctx, f"onnx-{variant}"))
        res = run_onnx(ctx.cache[key], x, membranes=True)   # (an argument since the membranes are kept on request)
        per_step = res.logits_int if variant == "int" else res.per_step
        return Output(res.spikes, res.logits, res.membranes, per_step, "int" if variant == "int" else "float32")
    return run


def _nir(ctx: Context, x: np.ndarray) -> Output:
    from sdt_deploy.run.nir_artifact import host_feed, open_nir_artifact, readout

    if "nir-artifact" not in ctx.cache:   # read the file (and its host stem) once
        ctx.cache["nir-artifact"] = open_nir_artifact(ensure_artifact(ctx, "nir"))
    art = ctx.cache["nir-artifact"]
    spikes, feed = host_feed(art, x)
    outputs, nir_spikes = NI.run_nir(art.graph, feed)       # the interpreter as it was
    spikes.update(NI.nir_layer_spikes(art.graph, nir_spikes))
    return Output(spikes, readout(art.graph, next(iter(outputs.values()))))


RUNNERS: dict[str, Callable[[Context, np.ndarray], Output]] = {
    "torch": _torch, "cupy": _cupy, "engine": _engine, "onnx-int": _onnx("int"), "onnx-float": _onnx("float"),
    "nir": _nir,
}

# executors that show every spike tensor of the model: one missing is a failure, not a gap
SHOW_EVERY_SPIKE = ("torch", "cupy", "engine", "nir")


def run_executor(ctx: Context, name: str, x: np.ndarray) -> Output:
    """The executor's output for the current batch (run once per batch, whoever asks)."""
    if name not in ctx.batch:
        ctx.batch[name] = RUNNERS[name](ctx, x)
    return ctx.batch[name]


def state_reference(ctx: Context, arithmetic: str, x: np.ndarray) -> Output:
    """What a candidate's membranes and per-step outputs are compared with, in its own arithmetic: the
    integer engine's integers for an integer file; the float32 torch model's values for a float one
    (identical whenever the currents fit float32: the LIF's float updates round the same way in both)."""
    if arithmetic == "int":
        return run_executor(ctx, "engine", x)
    if arithmetic == "float32":
        if not ctx.float64_reference and "torch" in ctx.batch:
            return ctx.batch["torch"]
        key = "torch-float32"
        if key not in ctx.batch:
            ctx.batch[key] = _torch_run(ctx, x, torch.float32)
        return ctx.batch[key]
    raise DeployError(f"internal: no state reference for {arithmetic!r} arithmetic")


def ensure_artifact(ctx: Context, kind: str) -> str:
    """The file for an executor: given by the user, or exported now into the work folder."""
    if kind in ctx.artifacts:
        return ctx.artifacts[kind]
    path = export_artifact(ctx.graph, kind, ctx.workdir)
    ctx.artifacts[kind] = path
    return path


def export_artifact(graph, kind: str, workdir: str) -> str:
    """Export what an executor runs (`onnx-int`, `onnx-float` as `export` writes them by default, `nir`
    partitioned with its integer stem) into workdir."""
    if kind.startswith("onnx-"):
        path = os.path.join(workdir, f"model.{kind}.onnx")
        export_graph(graph, "onnx", path, onnx_variant=kind.split("-", 1)[1], force=True)
        return path
    if kind == "nir":
        path = os.path.join(workdir, "model.nir")
        export_graph(graph, "nir", path, force=True)
        return path
    raise DeployError(f"no artifact kind {kind!r}")


def skip_reason(name: str) -> Optional[str]:
    if name == "cupy":
        return cuda_skip_reason()
    return None


def membrane_detail(ctx: Context, executor: str, x: np.ndarray, layer: str, t: int, b: int, idx: tuple) -> dict:
    """Both sides' membrane H at a spike divergence (the exact float64 executor vs the candidate's own
    state where it has one)."""
    node = ctx.graph[layer]
    if not isinstance(node, LIF):
        return {"note": f"{layer} is a {node.op} node: it has no membrane; compare its inputs "
                        f"({', '.join(node.inputs)})"}
    c = idx[0]
    g = int(node.grid[c])
    _, _, mem = execute(ctx.graph, x[b:b + 1], dtype=torch.float64, membranes=True)
    detail = {"grid": f"2**-{g}", "theta": float(node.v_threshold), "theta_int": int(node.theta_int[c]),
              "reference_H": float(mem[layer][(t, 0) + idx])}
    if executor == "engine":
        r = run_engine(ctx.graph, x[b:b + 1], membranes=True)
        h_int = int(r.membranes[layer][(t, 0) + idx])
        detail["candidate_H"] = h_int * 2.0 ** -g
        detail["candidate_H_int"] = h_int
    return detail


# ---------------------------------------------------------------- the verifier





def _add(d: dict, ex: str, layer: str, value: int) -> None:
    row = d.setdefault(ex, {})
    row[layer] = row.get(layer, 0) + int(value)


def _merge_nested(mine: dict, theirs: dict) -> dict:
    out = {}
    for ex in dict.fromkeys(list(mine) + list(theirs)):          # keep the graph's order
        layers = dict.fromkeys(list(mine.get(ex, {})) + list(theirs.get(ex, {})))
        out[ex] = {k: mine.get(ex, {}).get(k, 0) + theirs.get(ex, {}).get(k, 0) for k in layers}
    return out


@dataclass
class Tally:
    """Counts accumulated over batches (and, with torchrun, over ranks)."""

    samples: int = 0
    spikes: dict = field(default_factory=dict)          # executor -> layer -> spike count (spikes compared)
    mismatches: dict = field(default_factory=dict)      # executor -> layer -> differing spikes
    membranes: dict = field(default_factory=dict)       # executor -> LIF layer -> membrane values compared
    membrane_mismatches: dict = field(default_factory=dict)   # executor -> LIF layer -> differing membranes
    per_step_mismatches: dict = field(default_factory=dict)   # executor -> {"output": differing values}
    agree_pred: dict = field(default_factory=dict)      # executor -> samples whose prediction equals the reference's
    correct: dict = field(default_factory=dict)         # executor -> correct predictions (when labels are known)
    labelled: int = 0
    first: Optional[dict] = None
    seconds: dict = field(default_factory=dict)

    NESTED = ("spikes", "mismatches", "membranes", "membrane_mismatches", "per_step_mismatches")

    def merge(self, other: "Tally") -> "Tally":
        out = Tally(self.samples + other.samples, labelled=self.labelled + other.labelled)
        for attr in self.NESTED:
            setattr(out, attr, _merge_nested(getattr(self, attr), getattr(other, attr)))
        for attr in ("agree_pred", "correct", "seconds"):
            mine, theirs = getattr(self, attr), getattr(other, attr)
            setattr(out, attr, {k: mine.get(k, 0) + theirs.get(k, 0) for k in dict.fromkeys(list(mine) + list(theirs))})
        firsts = [f for f in (self.first, other.first) if f]
        out.first = min(firsts, key=lambda f: (f["sample"], f["step"])) if firsts else None
        return out

    def record_first(self, first: dict) -> None:
        if self.first is None or (first["sample"], first["step"]) < (self.first["sample"], self.first["step"]):
            self.first = first

    @property
    def differing(self) -> int:
        return sum(v for attr in ("mismatches", "membrane_mismatches", "per_step_mismatches")
                   for layers in getattr(self, attr).values() for v in layers.values())


def layer_order(ctx: Context) -> list:
    return [n.name for n in ctx.graph.nodes if n.out_kind == "spike"]


def _first_state_divergence(ref: dict, cand: dict, order: list) -> Optional[tuple]:
    """(layer, step, sample, index, reference value, candidate value) of the earliest differing membrane."""
    best = None
    for rank, layer in enumerate(order):
        if layer not in cand:
            continue
        diff = np.asarray(ref[layer]) != np.asarray(cand[layer])
        if not diff.any():
            continue
        t = int(np.argmax(diff.reshape(diff.shape[0], -1).any(axis=1)))
        if best is None or (t, rank) < best[0]:
            at = tuple(int(i) for i in np.argwhere(diff[t])[0])
            best = ((t, rank), (layer, t, at[0], at[1:], ref[layer][(t,) + at].item(), cand[layer][(t,) + at].item()))
    return None if best is None else best[1]


def _compare_states(ctx: Context, ex: str, out, x: np.ndarray, offset: int, tally: Tally, order: list) -> None:
    """An ONNX file's membranes and per-step outputs against the same arithmetic's reference."""
    ref = state_reference(ctx, out.arithmetic, x)
    lifs = [n for n in order if n in ref.membranes]
    missing = [n for n in lifs if n not in out.membranes]
    if missing and out.membranes:
        raise MismatchError(f"{ex}: the file has no state for {missing[0]} (and {len(missing) - 1} more LIF layers)")
    for layer in lifs if out.membranes else []:
        a, b = np.asarray(ref.membranes[layer]), np.asarray(out.membranes[layer])
        if a.shape != b.shape:
            raise MismatchError(f"{ex}: the state of {layer} has shape {list(b.shape)}, the reference's "
                                f"{list(a.shape)}")
        _add(tally.membranes, ex, layer, a.size)
        _add(tally.membrane_mismatches, ex, layer, np.count_nonzero(a != b))
    if out.per_step is not None and ref.per_step is not None:
        a, b = np.asarray(ref.per_step), np.asarray(out.per_step).reshape(np.shape(ref.per_step))
        _add(tally.per_step_mismatches, ex, "output", np.count_nonzero(a != b))
    d = _first_state_divergence(ref.membranes, out.membranes, lifs)
    if d is not None:
        layer, t, b, idx, rv, cv = d
        node = ctx.graph[layer]
        g = int(np.asarray(node.grid)[idx[0]])
        first = {"executor": ex, "layer": layer, "step": t, "sample": offset + b, "neuron": list(idx),
                 "what": "membrane after the step", "reference_V": rv, "candidate_V": cv,
                 "arithmetic": out.arithmetic, "grid": f"2**-{g}", "theta": float(node.v_threshold),
                 "theta_int": int(node.theta_int[idx[0]])}
        tally.record_first(first)
    elif out.per_step is not None and ref.per_step is not None:
        a, b = np.asarray(ref.per_step), np.asarray(out.per_step).reshape(np.shape(ref.per_step))
        if np.any(a != b):
            at = tuple(int(i) for i in np.argwhere(a != b)[0])
            tally.record_first({"executor": ex, "layer": "output", "step": at[0], "sample": offset + at[1],
                                "neuron": list(at[2:]), "what": "output of the step, before the read-out",
                                "reference_value": a[at].item(), "candidate_value": b[at].item(),
                                "arithmetic": out.arithmetic})


def compare_batch(ctx: Context, x: np.ndarray, labels: Optional[np.ndarray], executors: list, offset: int,
                  tally: Tally, reference: str) -> None:
    ctx.batch = {}
    t0 = time.perf_counter()
    ref = run_executor(ctx, reference, x)
    tally.seconds[reference] = tally.seconds.get(reference, 0.0) + time.perf_counter() - t0
    ref_pred = predictions(ref.logits)
    order = layer_order(ctx)
    tally.samples += len(x)
    if labels is not None:
        tally.labelled += len(x)
    for ex in [reference] + [e for e in executors if e != reference]:
        t0 = time.perf_counter()
        out = run_executor(ctx, ex, x)
        tally.seconds[ex] = tally.seconds.get(ex, 0.0) + time.perf_counter() - t0
        if ex in SHOW_EVERY_SPIKE or out.spikes:      # an ONNX file with debug outputs shows them all too
            missing = [k for k in ref.spikes if k not in out.spikes]
            if missing:
                raise MismatchError(f"{ex}: no spikes for {missing[0]} (and {len(missing) - 1} more layers): the "
                                    "file does not compute that layer")
            table = mismatch_table(ref.spikes, out.spikes)
            for layer, row in table.items():
                _add(tally.spikes, ex, layer, row["candidate_spikes"])
                _add(tally.mismatches, ex, layer, row["mismatches"])
            if ex != reference and any(row["mismatches"] for row in table.values()):
                d = first_divergence(ref.spikes, out.spikes, order)
                first = {"executor": ex, "layer": d.layer, "step": d.step, "sample": offset + d.sample,
                         "neuron": list(d.index), "what": "spike", "reference_spike": d.reference,
                         "candidate_spike": d.candidate}
                first.update(membrane_detail(ctx, ex, x, d.layer, d.step, d.sample, d.index))
                tally.record_first(first)
        if ex.startswith("onnx-"):
            _compare_states(ctx, ex, out, x, offset, tally, order)
        pred = predictions(out.logits)
        tally.agree_pred[ex] = tally.agree_pred.get(ex, 0) + int((pred == ref_pred).sum())
        if labels is not None:
            tally.correct[ex] = tally.correct.get(ex, 0) + int((pred == labels).sum())
    ctx.batch = {}


@dataclass
class VerifyResult:
    tally: Tally
    reference: str
    executors: list
    skipped: dict
    bits: dict
    artifacts: dict          # executor -> {"path", "sha256", "origin"}: the file behind it

    @property
    def ok(self) -> bool:
        return self.tally.differing == 0

    def compared(self, ex: str) -> str:
        """What was compared for an executor, in a few words."""
        t = self.tally
        parts = []
        if ex in t.spikes:
            parts.append("spikes")
        if ex in t.membranes:
            parts.append("membranes (v_out) after every step")
        if ex in t.per_step_mismatches:
            parts.append("per-step output")
        return ", ".join(parts) or "predictions"

    def to_json(self) -> dict:
        t = self.tally
        layers = list(t.spikes.get(self.reference, {}))   # the graph's order
        ran = [self.reference] + [e for e in self.executors if e != self.reference]
        return {
            "ok": self.ok, "reference": self.reference, "samples": t.samples,
            "executors": {**{ex: {"ran": True, "compared": self.compared(ex), **(
                {"file": self.artifacts[ex]} if ex in self.artifacts else {})} for ex in ran},
                **{ex: {"ran": False, "skipped": why} for ex, why in self.skipped.items()}},
            "layers": {k: {ex: {"spikes": t.spikes.get(ex, {}).get(k), "mismatches": t.mismatches.get(ex, {}).get(k),
                                **({"membranes": t.membranes[ex][k],
                                    "membrane_mismatches": t.membrane_mismatches[ex][k]}
                                   if k in t.membranes.get(ex, {}) else {})}
                           for ex in ran if k in t.spikes.get(ex, {}) or k in t.membranes.get(ex, {})}
                       for k in layers},
            "per_step_output": {ex: {"mismatches": v["output"]} for ex, v in t.per_step_mismatches.items()},
            "prediction_agreement": {ex: t.agree_pred[ex] / max(t.samples, 1) for ex in t.agree_pred},
            "accuracy": ({ex: t.correct[ex] / t.labelled for ex in t.correct} if t.labelled else None),
            "first_divergence": t.first,
            "seconds": t.seconds,
            "bits": self.bits,
            "artifacts": self.artifacts,
        }


def run_verify(q: QuantizedModel, dataset, executors: list, artifacts: Optional[dict] = None,
               batch_size: int = 16, indices: Optional[list] = None, progress: bool = False,
               workdir: Optional[str] = None) -> VerifyResult:
    """Every batch of `dataset` through the reference and the `executors`, on the quantized model `q`.
    `artifacts`: {executor: path} of the user's files (the others are exported for the run)."""
    unknown = [e for e in executors if e not in RUNNERS]
    if unknown:
        raise DeployError(f"unknown executor {unknown[0]!r} (choose from {', '.join(ALL_EXECUTORS)})")
    bits = bit_report(q.graph)["summary"]
    skipped = {e: r for e in executors if (r := skip_reason(e))}
    active = [e for e in executors if e not in skipped]
    # The CuPy model is the reference on a GPU — unless the bit analysis says float32 may round, then
    # the exact side is the float64 torch model on the CPU and CuPy is checked against it.
    reference = "cupy" if ("cupy" in active and bits["float32_exact"]) else "torch"
    states = {"int" for e in active if e == "onnx-int"} | {"float32" for e in active if e == "onnx-float"}
    given = dict(artifacts or {})
    with contextlib.ExitStack() as stack:
        wd = workdir or stack.enter_context(tempfile.TemporaryDirectory(prefix="sdt-verify-"))
        ctx = Context(q, wd, dict(given), set(given), float64_reference=not bits["float32_exact"], states=states)
        if reference == "torch" and ctx.float64_reference:
            bits = {**bits, "reference_dtype": "float64"}
        idx = list(range(len(dataset))) if indices is None else list(indices)
        tally = Tally()
        from sdt_deploy.console import progress as progress_bar

        with progress_bar(len(idx), "verify", enabled=progress) as advance:
            for start in range(0, len(idx), batch_size):
                chunk = idx[start:start + batch_size]
                x, labels = dataset.batch(chunk)
                compare_batch(ctx, x, labels, active, chunk[0], tally, reference)
                advance(len(chunk))
        files = {ex: {"path": path if ex in given else os.path.basename(path), "sha256": sha256_of(path),
                      "origin": "your file" if ex in given else "exported for this run"}
                 for ex, path in ctx.artifacts.items() if ex in active}
        return VerifyResult(tally, reference, active, skipped, bits, files)
