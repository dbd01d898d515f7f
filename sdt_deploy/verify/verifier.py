"""`verify`: the same inputs through every executor (`verify.executors`), every spike of every layer at
every step compared bit for bit with the reference — the quantized torch model (spikingjelly's CuPy
kernel on a GPU, its torch backend on a CPU).

A mismatch is never a rate: the first divergence (executor, layer, time step, sample, neuron, both sides'
membrane values and the grid) and a per-layer mismatch table are reported.
"""
from __future__ import annotations

import contextlib
import tempfile
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from sdt_deploy.errors import DeployError
from sdt_deploy.quant.bits import bit_report
from sdt_deploy.quant.qmodel import QuantizedModel
from sdt_deploy.run.torch_runner import predictions
from sdt_deploy.verify.compare import first_divergence, mismatch_table
from sdt_deploy.verify.executors import ALL_EXECUTORS, RUNNERS, Context, membrane_detail, skip_reason


@dataclass
class Tally:
    """Counts accumulated over batches (and, with torchrun, over ranks)."""

    samples: int = 0
    spikes: dict = field(default_factory=dict)          # executor -> layer -> spike count
    mismatches: dict = field(default_factory=dict)      # executor -> layer -> differing spikes
    agree_pred: dict = field(default_factory=dict)      # executor -> samples whose prediction equals the reference's
    correct: dict = field(default_factory=dict)         # executor -> correct predictions (when labels are known)
    labelled: int = 0
    first: Optional[dict] = None
    seconds: dict = field(default_factory=dict)

    def merge(self, other: "Tally") -> "Tally":
        out = Tally(self.samples + other.samples, labelled=self.labelled + other.labelled)
        for attr in ("spikes", "mismatches"):
            mine, theirs = getattr(self, attr), getattr(other, attr)
            merged = {}
            for ex in dict.fromkeys(list(mine) + list(theirs)):          # keep the graph's order
                layers = dict.fromkeys(list(mine.get(ex, {})) + list(theirs.get(ex, {})))
                merged[ex] = {k: mine.get(ex, {}).get(k, 0) + theirs.get(ex, {}).get(k, 0) for k in layers}
            setattr(out, attr, merged)
        for attr in ("agree_pred", "correct", "seconds"):
            mine, theirs = getattr(self, attr), getattr(other, attr)
            setattr(out, attr, {k: mine.get(k, 0) + theirs.get(k, 0) for k in dict.fromkeys(list(mine) + list(theirs))})
        firsts = [f for f in (self.first, other.first) if f]
        out.first = min(firsts, key=lambda f: (f["sample"], f["step"])) if firsts else None
        return out


def layer_order(ctx: Context) -> list:
    return [n.name for n in ctx.graph.nodes if n.out_kind == "spike"]


def compare_batch(ctx: Context, x: np.ndarray, labels: Optional[np.ndarray], executors: list, offset: int,
                  tally: Tally, reference: str) -> None:
    t0 = time.perf_counter()
    ref = RUNNERS[reference](ctx, x)
    tally.seconds[reference] = tally.seconds.get(reference, 0.0) + time.perf_counter() - t0
    ref_pred = predictions(ref.logits)
    order = layer_order(ctx)
    tally.samples += len(x)
    if labels is not None:
        tally.labelled += len(x)
    for ex in [reference] + [e for e in executors if e != reference]:
        if ex == reference:
            out = ref
        else:
            t0 = time.perf_counter()
            out = RUNNERS[ex](ctx, x)
            tally.seconds[ex] = tally.seconds.get(ex, 0.0) + time.perf_counter() - t0
        table = mismatch_table(ref.spikes, out.spikes)
        missing = [k for k in ref.spikes if k not in out.spikes and ex != reference]
        if missing and ex != "nir":
            raise DeployError(f"{ex}: produced no spikes for {missing[0]} (and {len(missing) - 1} more layers)")
        sp = tally.spikes.setdefault(ex, {})
        mm = tally.mismatches.setdefault(ex, {})
        for layer, row in table.items():
            sp[layer] = sp.get(layer, 0) + row["candidate_spikes"]
            mm[layer] = mm.get(layer, 0) + row["mismatches"]
        pred = predictions(out.logits)
        tally.agree_pred[ex] = tally.agree_pred.get(ex, 0) + int((pred == ref_pred).sum())
        if labels is not None:
            tally.correct[ex] = tally.correct.get(ex, 0) + int((pred == labels).sum())
        if ex != reference and any(row["mismatches"] for row in table.values()):
            d = first_divergence(ref.spikes, out.spikes, order)
            first = {"executor": ex, "layer": d.layer, "step": d.step, "sample": offset + d.sample,
                     "neuron": list(d.index), "reference_spike": d.reference, "candidate_spike": d.candidate}
            first.update(membrane_detail(ctx, ex, x, d.layer, d.step, d.sample, d.index))
            if tally.first is None or (first["sample"], first["step"]) < (tally.first["sample"], tally.first["step"]):
                tally.first = first


@dataclass
class VerifyResult:
    tally: Tally
    reference: str
    executors: list
    skipped: dict
    bits: dict
    artifacts: dict

    @property
    def ok(self) -> bool:
        return not any(any(v for v in layers.values()) for layers in self.tally.mismatches.values())

    def to_json(self) -> dict:
        t = self.tally
        layers = list(t.spikes.get(self.reference, {}))   # the graph's order
        return {
            "ok": self.ok, "reference": self.reference, "samples": t.samples,
            "executors": {ex: ("skipped: " + self.skipped[ex]) if ex in self.skipped else "ran" for ex in
                          [self.reference] + [e for e in self.executors if e != self.reference] + list(self.skipped)},
            "layers": {k: {ex: {"spikes": t.spikes[ex].get(k, 0), "mismatches": t.mismatches[ex].get(k, 0)}
                           for ex in t.spikes if k in t.spikes[ex]} for k in layers},
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
    """Every batch of `dataset` through the reference and the `executors`, on the quantized model `q`."""
    unknown = [e for e in executors if e not in RUNNERS]
    if unknown:
        raise DeployError(f"unknown executor {unknown[0]!r} (choose from {', '.join(ALL_EXECUTORS)})")
    bits = bit_report(q.graph)["summary"]
    skipped = {e: r for e in executors if (r := skip_reason(e))}
    active = [e for e in executors if e not in skipped]
    # The CuPy model is the reference on a GPU — unless the bit analysis says float32 may round, then
    # the exact side is the float64 torch model on the CPU and CuPy is checked against it.
    reference = "cupy" if ("cupy" in active and bits["float32_exact"]) else "torch"
    with contextlib.ExitStack() as stack:
        wd = workdir or stack.enter_context(tempfile.TemporaryDirectory(prefix="sdt-verify-"))
        ctx = Context(q, wd, dict(artifacts or {}), float64_reference=not bits["float32_exact"])
        if reference == "torch" and ctx.float64_reference:
            bits = {**bits, "reference_dtype": "float64"}
        idx = list(range(len(dataset))) if indices is None else list(indices)
        tally = Tally()
        bar = _progress(len(idx), progress)
        for start in range(0, len(idx), batch_size):
            chunk = idx[start:start + batch_size]
            x, labels = dataset.batch(chunk)
            compare_batch(ctx, x, labels, active, chunk[0], tally, reference)
            bar(len(chunk))
        bar(None)
        return VerifyResult(tally, reference, active, skipped, bits, dict(ctx.artifacts) if artifacts else {})


def _progress(total: int, enabled: bool):
    if not enabled:
        return lambda n: None
    from tqdm import tqdm

    bar = tqdm(total=total, unit="img", desc="verify", leave=False)

    def step(n):
        if n is None:
            bar.close()
        else:
            bar.update(n)
    return step
