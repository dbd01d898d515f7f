"""The executors `verify` compares, one entry each in `RUNNERS`: a function from (context, input batch) to
what the executor shows of the batch (`Output`): spikes (uint8 [T, B, ...] under the layer names), the
logits, and where it has them the membranes and per-step outputs.

- `torch`      the quantized PyTorch model on the CPU (float32; float64 where the bit analysis says
               float32 may round);
- `cupy`       the same model object on a CUDA device with spikingjelly's CuPy LIF kernel (TF32 off,
               cuDNN off, deterministic algorithms); skipped, saying so, without CUDA or CuPy;
- `engine`     the integer engine;
- `onnx-int`, `onnx-float`   an ONNX export in onnxruntime (CPU): every LIF's state `v_out.<layer>`
               after every step and the per-step output, plus every spike tensor where the file has
               debug outputs;
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
from sdt_deploy.run.integer_engine import run_engine
from sdt_deploy.run.torch_runner import run_model, run_model_state

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
        res = run_onnx(ctx.cache[key], x)
        per_step = res.logits_int if variant == "int" else res.per_step
        return Output(res.spikes, res.logits, res.membranes, per_step, res.arithmetic)
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
    if arithmetic == "float64":   # a V2 float file: its currents and states are float64
        if ctx.float64_reference and "torch" in ctx.batch and ctx.batch["torch"].arithmetic == "float64":
            return ctx.batch["torch"]
        key = "torch-float64"
        if key not in ctx.batch:
            ctx.batch[key] = _torch_run(ctx, x, torch.float64)
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
