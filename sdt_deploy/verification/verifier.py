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
from typing import Callable, Optional

import numpy as np

from sdt_deploy.errors import DeployError, MismatchError
from sdt_deploy.files.artifacts import sha256_of
from sdt_deploy.heap import keep_large_blocks_in_heap, release_freed_memory
from sdt_deploy.quant.bits import bit_report
from sdt_deploy.quant.qmodel import QuantizedModel
from sdt_deploy.run.torch_runner import predictions
from sdt_deploy.verification.executors import (  # noqa: F401 - cuda_skip_reason, deterministic_cuda: bench/gpu_check.py
    ALL_EXECUTORS,
    RUNNERS,
    SHOW_EVERY_SPIKE,
    Context,
    Sink,
    cuda_skip_reason,
    deterministic_cuda,
    ensure_artifact,
    membrane_detail,
    onnx_arithmetic,
    onnx_session,
    reference_model,
    reference_plan,
    shares_float32_prefix,
    skip_reason,
    torch_in,
)
from sdt_deploy.verification.stream import ReferenceSpikes, SpikeCheck, StateCheck, StateReference


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


@dataclass
class ExecutorRun:
    """What one executor showed of a batch, compared as it came (`stream`)."""

    name: str
    seconds: float
    logits: np.ndarray
    spikes: SpikeCheck
    states: Optional[StateCheck] = None


class Collector(Sink):
    """The sink one executor's run streams into: its spikes are compared with the reference's (or, for the
    reference itself, kept); its membranes and per-step outputs are kept where they are a state reference
    some file is compared with, or compared where the executor is such a file."""

    def __init__(self, spikes: SpikeCheck, reference: Optional[ReferenceSpikes] = None,
                 keep: Optional[StateReference] = None, states: Optional[StateCheck] = None):
        self.check, self.reference, self.keep, self.states = spikes, reference, keep, states

    def spikes(self, layer: str, a: np.ndarray, t0: int = 0) -> None:
        if self.reference is not None:         # the reference run: held (packed) and counted
            self.reference.add(layer, a)
            self.check.own(layer, a)
        else:
            self.check.add(layer, a, t0)

    def membranes(self, layer: str, v: np.ndarray) -> None:
        if self.keep is not None:
            self.keep.keep(layer, v)

    def step(self, t: int, membranes: dict, spikes: dict) -> None:
        if self.states is not None:
            self.states.step(t, membranes)
        for layer, a in spikes.items():
            self.check.add(layer, a[None], t)

    def per_step(self, y: np.ndarray) -> None:
        if self.keep is not None:
            self.keep.per_step = np.asarray(y)
        if self.states is not None:
            self.states.per_step(y)

    def wants(self, arithmetic: str) -> bool:
        return self.keep is not None and self.keep.arithmetic == arithmetic


class BatchRun:
    """One batch through the reference and every executor: each executor's layers compared with the
    reference's as they are produced, the reference's spikes held packed, a state reference (the engine's
    integers, the float32 model's membranes) held only until the file compared with it has run."""

    def __init__(self, ctx: Context, x: np.ndarray, reference: str, executors: list):
        self.ctx, self.x, self.reference = ctx, x, reference
        self.order = layer_order(ctx)
        self.rank = {name: i for i, name in enumerate(self.order)}
        self.ref_spikes = ReferenceSpikes()
        self.executors = [reference] + [e for e in executors if e != reference]
        self.runs: dict = {}
        self.state_refs: dict = {}
        self.pending = set(ctx.states)          # the arithmetics some file of this batch is compared in

    def _keep_for(self, name: str, arithmetic: str) -> Optional[StateReference]:
        """A state reference to fill from this run, where one is still wanted and this run gives it."""
        if arithmetic in self.pending and arithmetic not in self.state_refs:
            return StateReference(arithmetic)
        return None

    def _execute(self, name: str, run, keep: Optional[StateReference] = None,
                 states: Optional[StateCheck] = None, count: bool = True) -> ExecutorRun:
        check = SpikeCheck(self.ref_spikes, self.rank)
        sink = Collector(check, self.ref_spikes if name == self.reference and count else None, keep, states)
        t0 = time.perf_counter()
        out = run(self.ctx, self.x, sink)
        seconds = time.perf_counter() - t0
        release_freed_memory(self.ctx.trim_above)
        if keep is not None and (keep.membranes or keep.per_step is not None):
            self.state_refs[keep.arithmetic] = keep
        return ExecutorRun(name, seconds, out.logits, check, states)

    def _keep(self, name: str) -> Optional[StateReference]:
        """The state reference a run of `name` fills: the engine's integers; the torch model's membranes
        in its arithmetic (float32 where the bit analysis lets the whole model run in float32)."""
        if name == "engine":
            return self._keep_for(name, "int")
        if name == "torch":
            return self._keep_for(name, reference_model(self.ctx)[1])
        return None

    def run_reference(self) -> ExecutorRun:
        run = self._execute(self.reference, RUNNERS[self.reference], self._keep(self.reference))
        self.runs[self.reference] = run
        return run

    def state_reference(self, arithmetic: str) -> StateReference:
        """The membranes and per-step outputs of `arithmetic` for this batch, computed now if no run gave
        them yet: the engine's integers for "int"; the torch model in that dtype throughout otherwise."""
        if arithmetic in self.state_refs:
            return self.state_refs[arithmetic]
        keep = StateReference(arithmetic)
        if arithmetic == "int":
            if "engine" in self.runs:       # ran without keeping its states (not wanted then): again
                self.runs.pop("engine")
            self.runs["engine"] = self._execute("engine", RUNNERS["engine"], keep)
        elif arithmetic in ("float32", "float64"):
            self._execute(f"torch-{arithmetic}", lambda c, x, s: torch_in(c, x, s, arithmetic), keep)
        else:
            raise DeployError(f"internal: no state reference for {arithmetic!r} arithmetic")
        self.state_refs[arithmetic] = keep
        return keep

    def run_executor(self, name: str) -> ExecutorRun:
        if name in self.runs:
            return self.runs[name]
        if name.startswith("onnx-"):
            arithmetic = onnx_arithmetic(onnx_session(self.ctx, name.split("-", 1)[1]))
            ref = self.state_reference(arithmetic)
            lifs = [n for n in self.order if n in ref.membranes]
            states = StateCheck(ref, name, lifs)
            run = self._execute(name, RUNNERS[name], states=states)
            self.pending.discard(arithmetic)
            if not (self.pending & {arithmetic}):
                self.state_refs.pop(arithmetic, None)      # no file left to compare with it
                release_freed_memory(self.ctx.trim_above)
        else:
            run = self._execute(name, RUNNERS[name], self._keep(name))
        self.runs[name] = run
        return run


def _apply_spikes(ctx: Context, batch: BatchRun, run: ExecutorRun, offset: int, tally: Tally) -> None:
    """One executor's spike comparison into the tally, layers in the reference's order."""
    check, ex = run.spikes, run.name
    if not (ex in SHOW_EVERY_SPIKE or check.seen):
        return
    ref_layers = list(batch.ref_spikes)
    missing = [k for k in ref_layers if k not in check.rows]
    if missing:
        raise MismatchError(f"{ex}: no spikes for {missing[0]} (and {len(missing) - 1} more layers): the "
                            "file does not compute that layer")
    for layer in ref_layers:
        spikes, bad = check.rows[layer]
        _add(tally.spikes, ex, layer, spikes)
        _add(tally.mismatches, ex, layer, bad)
    if ex != batch.reference and check.first is not None:
        d = check.first
        first = {"executor": ex, "layer": d.layer, "step": d.step, "sample": offset + d.sample,
                 "neuron": list(d.index), "what": "spike", "reference_spike": d.reference,
                 "candidate_spike": d.candidate}
        first.update(membrane_detail(ctx, ex, batch.x, d.layer, d.step, d.sample, d.index))
        tally.record_first(first)


def _apply_states(ctx: Context, run: ExecutorRun, offset: int, tally: Tally) -> None:
    """An ONNX file's membranes and per-step outputs against the same arithmetic's reference."""
    st, ex = run.states, run.name
    if st.has_membranes:
        for layer in st.lifs:
            size, bad = st.rows[layer]
            _add(tally.membranes, ex, layer, size)
            _add(tally.membrane_mismatches, ex, layer, bad)
    if st.per_step_mismatches is not None:
        _add(tally.per_step_mismatches, ex, "output", st.per_step_mismatches)
    if st.first is not None:
        d = st.first
        node = ctx.graph[d.layer]
        g = int(np.asarray(node.grid)[d.index[0]])
        tally.record_first({"executor": ex, "layer": d.layer, "step": d.step, "sample": offset + d.sample,
                            "neuron": list(d.index), "what": "membrane after the step", "reference_V": d.reference,
                            "candidate_V": d.candidate, "arithmetic": st.ref.arithmetic, "grid": f"2**-{g}",
                            "theta": float(node.v_threshold), "theta_int": int(node.theta_int[d.index[0]])})
    elif st.per_step_first is not None:
        d = st.per_step_first
        tally.record_first({"executor": ex, "layer": "output", "step": d.step, "sample": offset + d.sample,
                            "neuron": list(d.index), "what": "output of the step, before the read-out",
                            "reference_value": d.reference, "candidate_value": d.candidate,
                            "arithmetic": st.ref.arithmetic})


def compare_batch(ctx: Context, x: np.ndarray, labels: Optional[np.ndarray], executors: list, offset: int,
                  tally: Tally, reference: str) -> None:
    """One batch: the reference, then every executor in order, each compared layer by layer as it runs
    (`BatchRun`); the counts, the first divergence, the predictions and the times go into `tally`."""
    batch = BatchRun(ctx, x, reference, executors)
    ref = batch.run_reference()
    if shares_float32_prefix(ctx):
        # the float32 file first: its state reference resumes the reference's float32 prefix, which is let
        # go then (the runs are applied to the tally in the executors' order below)
        first = [ex for ex in batch.executors if ex.startswith("onnx-")
                 and onnx_arithmetic(onnx_session(ctx, ex.split("-", 1)[1])) == "float32"]
        if first:
            batch.run_executor(first[0])
    ref_pred = predictions(ref.logits)
    tally.samples += len(x)
    if labels is not None:
        tally.labelled += len(x)
    for ex in batch.executors:
        run = batch.run_executor(ex)
        tally.seconds[ex] = tally.seconds.get(ex, 0.0) + run.seconds
        _apply_spikes(ctx, batch, run, offset, tally)
        if ex.startswith("onnx-"):
            _apply_states(ctx, run, offset, tally)
        pred = predictions(run.logits)
        tally.agree_pred[ex] = tally.agree_pred.get(ex, 0) + int((pred == ref_pred).sum())
        if labels is not None:
            tally.correct[ex] = tally.correct.get(ex, 0) + int((pred == labels).sum())
        if ex != reference:
            batch.runs.pop(ex, None)      # its results are in the tally: nothing of it is kept


@dataclass
class VerifyResult:
    tally: Tally
    reference: str
    executors: list
    skipped: dict
    bits: dict
    artifacts: dict          # executor -> {"path", "sha256", "origin"}: the file behind it
    plan: object = None      # run.memory.BatchPlan: the batch and processes the budget allowed
    jobs: int = 1            # the processes that ran batches

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


def memory_per_process(q: QuantizedModel, active: list, reference: str, states: set) -> tuple[int, int]:
    """(the bytes one verifying process holds for its models and sessions, the bytes a sample of a batch
    adds): the reference's spikes packed, the state references held for the ONNX files, and the largest
    executor's working set while it runs (`run.memory`)."""
    from sdt_deploy.run import memory as M

    a = M.activations(q.graph)
    runs = set(active) | {reference} | ({"engine"} if "int" in states else set()) | \
        ({"torch"} if states - {"int"} else set())
    held = a.spikes * a.T / 8 + (a.lif * a.T * 4 if states else 0)     # one state reference at a time
    sample = held + max(M.executor_bytes(e, a) for e in runs)
    models = M.RUNTIME_BYTES + a.params + sum(M.model_bytes(e, a) for e in runs)
    return int(models), int(sample)


AUTO_JOBS_MIN_SAMPLES = 320     # where a second process starts to pay on a 2-CPU machine (measured: ~230)


def auto_jobs(samples: int, cpus: Optional[int] = None) -> int:
    """The processes `verify` runs without --jobs: two on a machine with exactly two CPUs for runs of at
    least AUTO_JOBS_MIN_SAMPLES samples, else one. Measured on CIFAR 2-256, 2 cores (BENCHMARKS.md): two
    single-threaded processes verify 7.8 img/s once started against 6.3 for one process whose runtimes use
    both cores (less CPU time in all: 90 s against 105 s for 480 images), but the second one's start costs
    about 7 s (28.6 s against 26.5 s for 160 images; 69.8 s against 77.1 s for 480). With more CPUs the
    runtimes' own threads use them, and processes were not measured there: one process."""
    if cpus is None:
        try:
            cpus = len(os.sched_getaffinity(0))
        except AttributeError:   # pragma: no cover - not Linux
            cpus = os.cpu_count() or 1
    return 2 if cpus == 2 and samples >= AUTO_JOBS_MIN_SAMPLES else 1


def trim_above(plan, jobs: int) -> int:
    """The resident memory above which a process hands its freed heap back to the OS between executors:
    half its share of the budget. Below it the freed blocks serve the next executor (a trim after every
    executor made each fault its memory in again: 8.9 s of system time in a 27.5 s run, CIFAR 2-256, 160
    images); above it the budget is what matters."""
    return int(plan.budget.bytes // (2 * max(1, jobs)))


def small_against_budget(plan) -> bool:
    """Whether a process's estimated peak (its models and its batch) stays under `trim_above`: then its
    freed memory may stay in the heap (`heap.keep_large_blocks_in_heap`). A larger run keeps glibc's
    defaults, whose large blocks go back to the kernel as they are freed: with the heap kept, SDT-8-768 at
    224 (batch 4) peaked at 7.37 GiB against the budget's 7.5."""
    return plan.model_bytes + plan.batch_size * plan.sample_bytes <= trim_above(plan, plan.jobs)


def _slim(q: QuantizedModel) -> QuantizedModel:
    """What a worker process needs of the quantized model: the graph and settings, no torch model or
    checkpoint tensors (it builds its own model from the graph)."""
    from sdt_deploy.files.checkpoint import Checkpoint

    ck = q.checkpoint
    return QuantizedModel(None, q.graph, q.config, q.data, keep=q._keep, resolved=q.resolved,
                          checkpoint=Checkpoint(ck.path, {}, ck.layout, sha256=ck.sha256))


def run_verify(q: QuantizedModel, dataset, executors: list, artifacts: Optional[dict] = None,
               batch_size: int = 16, indices: Optional[list] = None, progress: bool = False,
               workdir: Optional[str] = None, max_memory=None, jobs: Optional[int] = None,
               notes: Optional[Callable[[str], None]] = None, tune_heap: bool = False) -> VerifyResult:
    """Every batch of `dataset` through the reference and the `executors`, on the quantized model `q`.
    `artifacts`: {executor: path} of the user's files (the others are exported for the run).
    `max_memory`: the budget (`run.memory.parse_memory`: bytes, '8G', a fraction; default a third of the
    available memory); the batch and the worker processes are cut to fit it, and `notes` is told so in
    one sentence. `jobs`: processes (default `auto_jobs`), each taking whole batches (`parallel`) with
    one intra-op thread; one process runs the runtimes with their own thread counts. `tune_heap`: keep
    freed memory in the heap (`heap.keep_large_blocks_in_heap`) where `small_against_budget` (process-wide)."""
    from sdt_deploy.run.memory import parse_memory, plan_batch
    from sdt_deploy.verification import parallel

    unknown = [e for e in executors if e not in RUNNERS]
    if unknown:
        raise DeployError(f"unknown executor {unknown[0]!r} (choose from {', '.join(ALL_EXECUTORS)})")
    budget = parse_memory(max_memory)
    bits = bit_report(q.graph)["summary"]
    skipped = {e: r for e in executors if (r := skip_reason(e))}
    active = [e for e in executors if e not in skipped]
    # The CuPy model is the reference on a GPU — unless the bit analysis says float32 may round, then
    # the exact side is the float64 torch model on the CPU and CuPy is checked against it.
    reference = "cupy" if ("cupy" in active and bits["float32_exact"]) else "torch"
    float_file = "float64" if q.graph.meta.get("family") == "v2" else "float32"   # V2: float64 currents
    states = {"int" for e in active if e == "onnx-int"} | {float_file for e in active if e == "onnx-float"}
    given = dict(artifacts or {})
    idx = list(range(len(dataset))) if indices is None else list(indices)
    models, sample = memory_per_process(q, active, reference, states)
    wanted_jobs = auto_jobs(len(idx)) if jobs is None else max(1, int(jobs))
    if "cupy" in active:
        wanted_jobs = 1                      # one process holds the GPU
    plan = plan_batch("verify", batch_size, budget, models, sample, jobs=wanted_jobs)
    if jobs is None and plan.jobs < wanted_jobs:      # a second process the user did not ask for: no word on it
        plan = plan_batch("verify", batch_size, budget, models, sample, jobs=1)
    chunks = [idx[i:i + plan.batch_size] for i in range(0, len(idx), plan.batch_size)]
    n_jobs = max(1, min(plan.jobs, len(chunks)))
    if plan.note and notes is not None:
        notes(plan.note)
    keep_heap = tune_heap and small_against_budget(plan)
    if keep_heap:
        keep_large_blocks_in_heap()
    with contextlib.ExitStack() as stack:
        wd = workdir or stack.enter_context(tempfile.TemporaryDirectory(prefix="sdt-verify-"))
        ctx = Context(q, wd, dict(given), set(given), float64_reference=not bits["float32_exact"], states=states,
                      threads=1 if n_jobs > 1 else None, trim_above=trim_above(plan, n_jobs))
        if reference == "torch" and ctx.float64_reference:
            rplan = reference_plan(ctx)
            bits = {**bits, "reference_dtype": rplan.describe(),
                    "reference_float64_layers": "all" if rplan.whole else sorted(rplan.synaptic | rplan.neurons)}
        for ex in active:       # the files exported before the first batch (and once for every process)
            if ex.startswith("onnx-") or ex == "nir":
                ensure_artifact(ctx, ex)
                release_freed_memory(ctx.trim_above)     # an export's temporaries are not the batches' memory
        workers = None
        if n_jobs > 1:
            setup = {"q": _slim(q), "workdir": wd, "artifacts": ctx.artifacts, "user_files": ctx.user_files,
                     "float64_reference": ctx.float64_reference, "states": states, "active": active,
                     "trim_above": ctx.trim_above, "keep_heap": keep_heap,
                     "reference": reference}
            workers = stack.enter_context(parallel.Workers(n_jobs - 1, setup))
        stack.enter_context(parallel.torch_single_thread(n_jobs > 1))
        from sdt_deploy.console import progress as progress_bar

        def local(x, labels, offset):
            t = Tally()
            compare_batch(ctx, x, labels, active, offset, t, reference)
            return t

        with progress_bar(len(idx), "verify", enabled=progress) as advance:
            parts = parallel.run_batches(chunks, dataset.batch, local, workers, advance)
        tally = Tally()
        for t in parts:
            tally = tally.merge(t)
        files = {ex: {"path": path if ex in given else os.path.basename(path), "sha256": sha256_of(path),
                      "origin": "your file" if ex in given else "exported for this run"}
                 for ex, path in ctx.artifacts.items() if ex in active}
        return VerifyResult(tally, reference, active, skipped, bits, files, plan, n_jobs)
