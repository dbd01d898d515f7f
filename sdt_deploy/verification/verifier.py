"""`verify`: the same inputs through every executor (`verify.executors`), every layer at every step
compared bit for bit, never with a tolerance:

- spikes: every spike tensor an executor shows against the reference — the quantized torch model
  (spikingjelly's CuPy kernel on a GPU, its torch backend on a CPU). An executor that shows every spike
  tensor (the torch and CuPy models, the engine, a NIR file) must show every one; a missing layer fails.
- membranes: an ONNX file's state `v_out.<layer>` after every step, every LIF, against the membrane of
  the same arithmetic: the integer engine's integers for the int variant, the float32 model's values
  for the float variant. This is what makes a file without debug outputs — the file `export` writes —
  verifiable layer by layer: any differing spike changes some membrane or the output downstream.
- per-step outputs: an ONNX file's output at every step, before the read-out over T, the same way.

A mismatch is never a rate: the first divergence (executor, layer, time step, sample, neuron, both
sides' values) and a per-layer mismatch table are reported.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from sdt_deploy.errors import DeployError, MismatchError
from sdt_deploy.files.artifacts import sha256_of
from sdt_deploy.quant.bits import bit_report
from sdt_deploy.quant.qmodel import QuantizedModel
from sdt_deploy.run.torch_runner import predictions
from sdt_deploy.verification.compare import first_divergence, mismatch_table
from sdt_deploy.verification.executors import (
    ALL_EXECUTORS,
    RUNNERS,
    SHOW_EVERY_SPIKE,
    Context,
    membrane_detail,
    run_executor,
    skip_reason,
    state_reference,
)


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
    float_file = "float64" if q.graph.meta.get("family") == "v2" else "float32"   # V2: float64 currents
    states = {"int" for e in active if e == "onnx-int"} | {float_file for e in active if e == "onnx-float"}
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
