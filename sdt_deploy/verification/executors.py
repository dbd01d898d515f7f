"""The executors `verify` compares, one entry each in `RUNNERS`: a function from (context, input batch, sink)
to what the executor shows of the batch. What it shows layer by layer -- spikes (uint8 [T, B, ...] under
the layer names), membranes, per-step outputs -- goes to the `sink` as it is produced (the verifier
compares it there and lets it go: nothing of a batch is kept but the reference); the function returns
the rest (`Output`: the logits, the arithmetic of its states).

- `torch`      the quantized PyTorch model on the CPU: float32, and float64 in the layers where the bit
               analysis says float32 may round (`reference_model`);
- `cupy`       the same model object on a CUDA device with spikingjelly's CuPy LIF kernel (TF32 off,
               cuDNN off, deterministic algorithms); skipped, saying so, without CUDA or CuPy;
- `engine`     the integer engine;
- `onnx-int`, `onnx-float`   an ONNX export in onnxruntime (CPU): every LIF's state `v_out.<layer>`
               after every step and the per-step output, plus every spike tensor where the file has
               debug outputs, step by step;
- `nir`        a NIR export (read back with `nir.read`) in the project's NIR interpreter, fed by the
               host-side ONNX stem when the export is partitioned.
Exports are made on the fly into a temporary folder, or the files the user gives are run as they are.
"""
from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from exporters.bundle import export_graph
from sdt_deploy.errors import DeployError
from sdt_deploy.ir.graph import LIF
from sdt_deploy.quant.qmodel import QuantizedModel
from sdt_deploy.run.float_executor import execute
from sdt_deploy.run.integer_engine import AFTER_RESET, run_engine
from sdt_deploy.run.torch_runner import run_model_stream

ALL_EXECUTORS = ("torch", "cupy", "engine", "onnx-int", "onnx-float", "nir")


@dataclass
class Output:
    """What an executor returns of one batch besides what it streamed to the sink."""

    logits: np.ndarray
    arithmetic: str = ""          # of its membranes and per-step outputs: "int", "float32", "float64", "mixed"


class Sink:
    """Where an executor's layers go as it produces them (a no-op here; the verifier's `Collector`
    compares them). `wants(arithmetic)`: whether membranes and per-step outputs of that arithmetic are
    wanted (a runner computes them only then)."""

    def spikes(self, layer: str, a: np.ndarray, t0: int = 0) -> None:
        """Spikes of `layer` at steps t0 .. t0 + len(a) - 1: [steps, B, ...]."""

    def membranes(self, layer: str, v: np.ndarray) -> None:
        """A LIF's membrane after every step's reset, [T, B, ...]."""

    def step(self, t: int, membranes: dict, spikes: dict) -> None:
        """A step model's step t: every LIF's state after it ({layer: [B, ...]}) and its spikes."""

    def per_step(self, y: np.ndarray) -> None:
        """The output at every step, before the read-out [T, B, ...]."""

    def wants(self, arithmetic: str) -> bool:
        return False


@dataclass
class Context:
    q: QuantizedModel
    workdir: str
    artifacts: dict = field(default_factory=dict)      # executor -> path of the file it runs
    user_files: set = field(default_factory=set)       # the executors whose file the user gave
    float64_reference: bool = False                    # float32 may round somewhere: the reference is exact
    states: set = field(default_factory=set)           # the arithmetics whose membranes are compared
    cache: dict = field(default_factory=dict)          # models, sessions, opened files
    threads: Optional[int] = None                      # intra-op threads of every runtime (None: their own)
    plan: object = None                                # reference_model.PrecisionPlan of the torch reference
    trim_above: int = 0                                # freed heap memory goes back to the OS above this RSS

    @property
    def graph(self):
        return self.q.graph


# ---------------------------------------------------------------- executors

def torch_model(ctx: Context, dtype) -> torch.nn.Module:
    """The quantized torch model in float32, or in float64 built from the graph's integers directly (a
    float32 model made float64 would keep whatever float32 rounded on the way in)."""
    key = f"torch_model_{dtype}"
    if key not in ctx.cache:
        if dtype == torch.float64:
            from sdt_deploy.quant.qmodel import build_quantized_model

            ctx.cache[key] = build_quantized_model(ctx.graph, ctx.q.config, dtype=torch.float64)
        else:
            ctx.cache[key] = ctx.q.model
    return ctx.cache[key]


def reference_plan(ctx: Context):
    from sdt_deploy.verification.reference_model import PrecisionPlan, precision_plan

    if ctx.plan is None:
        if not ctx.float64_reference:
            ctx.plan = PrecisionPlan()
        elif ctx.graph.meta.get("family") == "v2":
            # V2's module tree (folded and fused forms) is not the one the mixed plan patches layer by
            # layer: its reference stays float64 throughout, as exact and slower
            ctx.plan = PrecisionPlan(whole=True)
        else:
            ctx.plan = precision_plan(ctx.graph)
    return ctx.plan


def reference_model(ctx: Context) -> tuple[torch.nn.Module, str]:
    """(the torch executor's model, the arithmetic of its membranes): float32 where the bit analysis says
    float32 is exact, float64 in the layers where it may round (`reference_model.mixed_model`)."""
    from sdt_deploy.verification.reference_model import mixed_model

    plan = reference_plan(ctx)
    if plan.whole:
        return torch_model(ctx, torch.float64), "float64"
    if plan.float32_only:
        return torch_model(ctx, torch.float32), "float32"
    if "torch_model_mixed" not in ctx.cache:
        ctx.cache["torch_model_mixed"] = mixed_model(torch_model(ctx, torch.float32), ctx.graph, plan)
    return ctx.cache["torch_model_mixed"], "mixed"


def _stream_torch(model, x: np.ndarray, sink: Sink, arithmetic: str, device: Optional[str] = None,
                  also_membranes: Optional[Callable] = None) -> Output:
    """One batch through a torch model into the sink; `also_membranes(layer, v)` is shown every membrane
    too (whether or not the sink wants them)."""
    states = sink.wants(arithmetic)
    on_membranes = sink.membranes if states else None
    if also_membranes is not None:
        def on_membranes(layer, v, to_sink=on_membranes):
            also_membranes(layer, v)
            if to_sink is not None:
                to_sink(layer, v)
    logits, per_step = run_model_stream(model, x, sink.spikes, on_membranes, per_step=states, device=device)
    if states:
        sink.per_step(per_step)
    return Output(logits, arithmetic)


# ---------------------------------------------------------------- the float32 state reference, shared

FLOAT32_PREFIX = "float32-prefix"    # ctx.cache: the `SharedPrefix` of the batch the reference last ran


@dataclass
class SharedPrefix:
    """What the mixed-precision reference computed for the float32 model on one batch: the leading stages
    (`shared_float32_stages`) run in float32 in both models, operation for operation, so the float32 state
    reference only runs the rest. `membranes`: the stages' LIF membranes; `value`: the last stage's
    output (the next stage's input)."""

    x: np.ndarray
    stages: tuple
    membranes: dict = field(default_factory=dict)
    value: Optional[torch.Tensor] = None

    def holds(self, layer: str) -> bool:
        return any(layer == s or layer.startswith(s + ".") for s in self.stages)


def shared_float32_stages(ctx: Context) -> tuple:
    """The leading stages of an SDT-V1 model (`patch_embed`, `block.0`, ...) in which the mixed reference
    has no float64 layer: there it is the float32 model itself (the same float32 weights; its input casts
    are no-ops on float32 values). Empty where the reference is not mixed, the model is not V1, or no
    float32 file needs the float32 state reference."""
    model = ctx.q.model
    plan = reference_plan(ctx)
    if plan.whole or plan.float32_only or "float32" not in ctx.states or \
            not hasattr(model, "patch_embed") or not hasattr(model, "block"):
        return ()
    wide = plan.synaptic | plan.neurons
    shared = []
    for stage in ["patch_embed"] + [f"block.{i}" for i in range(len(model.block))]:
        if any(name == stage or name.startswith(stage + ".") for name in wide):
            break
        shared.append(stage)
    return tuple(shared)


@contextlib.contextmanager
def resumed(model: torch.nn.Module, prefix: SharedPrefix):
    """The model with its shared stages skipped: the first returns the prefix's value, the others pass it
    on (the instance's forward shadows the class's while this lasts)."""
    modules = dict(model.named_modules())
    stages = [modules[s] for s in prefix.stages]
    stages[0].forward = lambda *_args, **_kw: prefix.value
    for m in stages[1:]:
        m.forward = lambda x, *_args, **_kw: x
    try:
        yield model
    finally:
        for m in stages:
            del m.forward


def _torch(ctx: Context, x: np.ndarray, sink: Sink) -> Output:
    model, arithmetic = reference_model(ctx)
    xs = x.astype(np.float64) if arithmetic == "float64" else x   # the mixed model's input grid is float32's
    stages = shared_float32_stages(ctx) if arithmetic == "mixed" else ()
    ctx.cache.pop(FLOAT32_PREFIX, None)
    if not stages:
        return _stream_torch(model, xs, sink, arithmetic)
    prefix = SharedPrefix(x, stages)

    def keep(layer: str, v: np.ndarray) -> None:
        if prefix.holds(layer):
            prefix.membranes[layer] = v

    def last_stage_done(_module, _inputs, out) -> None:
        prefix.value = out.detach()

    hook = dict(model.named_modules())[stages[-1]].register_forward_hook(last_stage_done)
    try:
        out = _stream_torch(model, xs, sink, arithmetic, also_membranes=keep)
    finally:
        hook.remove()
    ctx.cache[FLOAT32_PREFIX] = prefix
    return out


def torch_in(ctx: Context, x: np.ndarray, sink: Sink, arithmetic: str) -> Output:
    """The quantized torch model in one dtype throughout ("float32", "float64"): a state reference. The
    float32 one resumes after the stages the reference shared with it on this very batch."""
    dtype = torch.float64 if arithmetic == "float64" else torch.float32
    xs = x.astype(np.float64) if dtype == torch.float64 else x
    model = torch_model(ctx, dtype)
    prefix = ctx.cache.pop(FLOAT32_PREFIX, None)
    if dtype != torch.float32 or prefix is None or prefix.x is not x or prefix.value is None:
        return _stream_torch(model, xs, sink, arithmetic)
    for layer, v in prefix.membranes.items():
        sink.membranes(layer, v)
    with resumed(model, prefix):
        return _stream_torch(model, xs, sink, arithmetic)


def shares_float32_prefix(ctx: Context) -> bool:
    """Whether the reference's last run left a float32 prefix for the float32 state reference to resume."""
    return FLOAT32_PREFIX in ctx.cache


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


def _cupy(ctx: Context, x: np.ndarray, sink: Sink) -> Output:
    if "cuda_model" not in ctx.cache:
        ctx.cache["cuda_model"] = copy.deepcopy(ctx.q.model).cuda()
    with deterministic_cuda():
        return _stream_torch(ctx.cache["cuda_model"], x, sink, "float32", device="cuda")


def _engine(ctx: Context, x: np.ndarray, sink: Sink) -> Output:
    """The integer engine; its membranes (integers on each LIF's grid, after the reset) and per-step
    integers are what an integer export's states are compared with."""
    states = sink.wants("int")

    def layer(name: str, s: np.ndarray, v: Optional[np.ndarray]) -> None:
        sink.spikes(name, s)
        if v is not None:
            sink.membranes(name, v)

    # the membranes after each step's reset, in the LIF's integer type, written by the engine's LIF kernel
    # as it steps (resetting a copied int64 H trace here, and narrowing it, took half the engine's time)
    r = run_engine(ctx.graph, x, membranes=AFTER_RESET if states else False, threads=ctx.threads, sink=layer)
    if states:
        sink.per_step(r.logits_int)
    return Output(r.logits, "int")


def onnx_session(ctx: Context, variant: str):
    """The opened ONNX file of an executor (one onnxruntime session for all batches)."""
    from sdt_deploy.run.onnx_runner import open_onnx  # onnxruntime: only where it runs

    key = f"onnx-{variant}-session"
    if key not in ctx.cache:
        # no memory arena: each run's intermediate tensors go back after it (the sessions take turns)
        ctx.cache[key] = open_onnx(ensure_artifact(ctx, f"onnx-{variant}"), threads=ctx.threads, arena=False)
    return ctx.cache[key]


def onnx_arithmetic(session) -> str:
    """The arithmetic of an ONNX file's states: "int" for the integer variant, else the file's own."""
    info = session.info
    return "int" if info.variant == "int" else getattr(info, "arithmetic", "float32")


def _onnx(variant: str) -> Callable[[Context, np.ndarray, Sink], Output]:
    def run(ctx: Context, x: np.ndarray, sink: Sink) -> Output:
        session = onnx_session(ctx, variant)
        res = session.run(x, on_step=sink.step)
        per_step = res.logits_int if session.info.variant == "int" else res.per_step
        if per_step is not None:
            sink.per_step(per_step)
        return Output(res.logits, onnx_arithmetic(session))
    return run


def _nir(ctx: Context, x: np.ndarray, sink: Sink) -> Output:
    from sdt_deploy.run.nir_artifact import open_nir_artifact, run_artifact

    if "nir-artifact" not in ctx.cache:   # read the file (and its host stem) once
        ctx.cache["nir-artifact"] = open_nir_artifact(ensure_artifact(ctx, "nir"), threads=ctx.threads,
                                                      arena=False)
    _, logits = run_artifact(ctx.cache["nir-artifact"], x, on_spikes=sink.spikes)
    return Output(logits)


RUNNERS: dict[str, Callable[[Context, np.ndarray, Sink], Output]] = {
    "torch": _torch, "cupy": _cupy, "engine": _engine, "onnx-int": _onnx("int"), "onnx-float": _onnx("float"),
    "nir": _nir,
}

# executors that show every spike tensor of the model: one missing is a failure, not a gap
SHOW_EVERY_SPIKE = ("torch", "cupy", "engine", "nir")


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
