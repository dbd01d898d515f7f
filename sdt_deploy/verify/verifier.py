"""`sdt-deploy verify`: the same inputs through every executor, every spike compared bit for bit with the
reference — the quantized torch model (spikingjelly's CuPy kernel on a GPU, its torch backend on a CPU).

Executors:
- `torch`      the quantized PyTorch model on the CPU (float32; float64 where the bit analysis says
               float32 may round — then named `torch-f64`);
- `cupy`       the same model object on a CUDA device with spikingjelly's CuPy LIF kernel (TF32 off,
               deterministic algorithms); skipped, saying so, without CUDA or CuPy;
- `engine`     the integer engine;
- `onnx-int`, `onnx-float`   the exported ONNX variants in onnxruntime (CPU);
- `nir`        the exported NIR graph (read back with `nir.read`) in the project's NIR interpreter, fed by
               the host-side ONNX stem when the graph is partitioned.
Exports are made on the fly into a temporary folder, or the very files given with `--artifact` are used.

A mismatch is never a rate: the first divergence (executor, layer, time step, sample, neuron, both sides'
membrane values and the grid) and a per-layer mismatch table are reported and the exit status is 1.
"""
from __future__ import annotations

import contextlib
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from sdt_deploy.quant.bits import bit_report
from sdt_deploy.files.checkpoint import LoadedModel
from sdt_deploy.verify.compare import first_divergence, mismatch_table
from sdt_deploy.run.integer_engine import run_engine
from sdt_deploy.errors import DeployError
from sdt_deploy.run.float_executor import execute
from sdt_deploy.ir.graph import LIF
from sdt_deploy.quant.qmodel import QuantizedModel
from sdt_deploy.run.torch_runner import predictions, run_model

ALL_EXECUTORS = ("torch", "cupy", "engine", "onnx-int", "onnx-float", "nir")


@dataclass
class Output:
    spikes: dict
    logits: np.ndarray


@dataclass
class Context:
    loaded: LoadedModel
    q: QuantizedModel
    workdir: str
    artifacts: dict = field(default_factory=dict)      # kind -> path ("onnx-int", "onnx-float", "nir", ...)
    float64_reference: bool = False
    cache: dict = field(default_factory=dict)

    @property
    def graph(self):
        return self.q.graph


# ---------------------------------------------------------------- executors

def _torch(ctx: Context, x: np.ndarray) -> Output:
    model = ctx.cache.get("torch_model")
    if model is None:
        import copy

        model = copy.deepcopy(ctx.q.model).double() if ctx.float64_reference else ctx.q.model
        ctx.cache["torch_model"] = model
    xs = x.astype(np.float64) if ctx.float64_reference else x
    logits, spikes = run_model(model, xs, batch_size=len(x))
    return Output(spikes, logits)


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
    model = ctx.cache.get("cuda_model")
    if model is None:
        import copy

        model = copy.deepcopy(ctx.q.model).cuda()
        ctx.cache["cuda_model"] = model
    with deterministic_cuda():
        logits, spikes = run_model(model, x, batch_size=len(x), device="cuda")
    return Output(spikes, logits)


def _engine(ctx: Context, x: np.ndarray) -> Output:
    r = run_engine(ctx.graph, x)
    ctx.cache.setdefault("engine_acs", 0)
    ctx.cache["engine_acs"] += r.total_acs
    return Output(r.spikes, r.logits)


def _onnx(variant: str) -> Callable[[Context, np.ndarray], Output]:
    def run(ctx: Context, x: np.ndarray) -> Output:
        from sdt_deploy.run.onnx_runner import open_onnx, run_onnx

        key = f"onnx-{variant}-session"
        if key not in ctx.cache:   # one onnxruntime session for all batches
            ctx.cache[key] = open_onnx(ensure_artifact(ctx, f"onnx-{variant}"))
        res = run_onnx(ctx.cache[key], x)
        if not res.spikes:
            raise DeployError(f"onnx-{variant}: the file has no debug outputs (export with --debug-outputs "
                              "to verify it layer by layer)")
        return Output(res.spikes, res.logits)
    return run


def _nir(ctx: Context, x: np.ndarray) -> Output:
    from sdt_deploy.run.nir_artifact import open_nir_artifact, run_artifact

    if "nir-artifact" not in ctx.cache:   # read the file (and its host stem) once
        ctx.cache["nir-artifact"] = open_nir_artifact(ensure_artifact(ctx, "nir"))
    spikes, logits = run_artifact(ctx.cache["nir-artifact"], x)
    return Output(spikes, logits)


RUNNERS: dict[str, Callable[[Context, np.ndarray], Output]] = {
    "torch": _torch, "cupy": _cupy, "engine": _engine, "onnx-int": _onnx("int"), "onnx-float": _onnx("float"),
    "nir": _nir,
}


def ensure_artifact(ctx: Context, kind: str) -> str:
    """The file for an executor: given with --artifact, or exported now into the work folder."""
    if kind in ctx.artifacts:
        return ctx.artifacts[kind]
    from exporters.bundle import export_artifact

    path = export_artifact(ctx.q, kind, ctx.workdir)
    ctx.artifacts[kind] = path
    return path


def skip_reason(name: str) -> Optional[str]:
    if name == "cupy":
        return cuda_skip_reason()
    return None


# ---------------------------------------------------------------- the comparison

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


def _membrane_detail(ctx: Context, executor: str, x: np.ndarray, layer: str, t: int, b: int, idx: tuple) -> dict:
    """Both sides' membrane H at the divergence (exact float64 executor vs the candidate's own state)."""
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
            first.update(_membrane_detail(ctx, ex, x, d.layer, d.step, d.sample, d.index))
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


def run_verify(loaded: LoadedModel, dataset, executors: list, artifacts: Optional[dict] = None,
               weight_bits: int = 8, input_bits: int = 8, batch_size: int = 16, indices: Optional[list] = None,
               progress: bool = False, workdir: Optional[str] = None) -> VerifyResult:
    from sdt_deploy.api import quantize

    unknown = [e for e in executors if e not in RUNNERS]
    if unknown:
        raise DeployError(f"unknown executor {unknown[0]!r} (choose from {', '.join(ALL_EXECUTORS)})")
    q = quantize(loaded, weight_bits=weight_bits, input_bits=input_bits)
    bits = bit_report(q.graph)["summary"]
    skipped = {e: r for e in executors if (r := skip_reason(e))}
    active = [e for e in executors if e not in skipped]
    # The CuPy model is the reference on a GPU — unless the bit analysis says float32 may round, then
    # the exact side is the float64 torch model on the CPU and CuPy is checked against it.
    reference = "cupy" if ("cupy" in active and bits["float32_exact"]) else "torch"
    with contextlib.ExitStack() as stack:
        wd = workdir or stack.enter_context(tempfile.TemporaryDirectory(prefix="sdt-verify-"))
        ctx = Context(loaded, q, wd, dict(artifacts or {}), float64_reference=not bits["float32_exact"])
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
