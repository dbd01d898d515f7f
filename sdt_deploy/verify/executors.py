"""The executors `verify` compares, one entry each in `RUNNERS`: a function from (context, input batch) to
the batch's spikes (uint8 [T, B, ...] under the layer names) and logits.

- `torch`      the quantized PyTorch model on the CPU (float32; float64 where the bit analysis says
               float32 may round);
- `cupy`       the same model object on a CUDA device with spikingjelly's CuPy LIF kernel (TF32 off,
               cuDNN off, deterministic algorithms); skipped, saying so, without CUDA or CuPy;
- `engine`     the integer engine;
- `onnx-int`, `onnx-float`   the exported ONNX variants in onnxruntime (CPU);
- `nir`        the exported NIR graph (read back with `nir.read`) in the project's NIR interpreter, fed by
               the host-side ONNX stem when the graph is partitioned.
Exports are made on the fly into a temporary folder, or the files given as artifacts are used.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from exporters.bundle import export_graph
from sdt_deploy.errors import DeployError
from sdt_deploy.files.artifacts import ONNX_META_PREFIX
from sdt_deploy.ir.graph import LIF
from sdt_deploy.quant.qmodel import QuantizedModel
from sdt_deploy.run.float_executor import execute
from sdt_deploy.run.integer_engine import run_engine
from sdt_deploy.run.torch_runner import run_model

ALL_EXECUTORS = ("torch", "cupy", "engine", "onnx-int", "onnx-float", "nir")


@dataclass
class Output:
    spikes: dict
    logits: np.ndarray


@dataclass
class Context:
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
        from sdt_deploy.run.onnx_runner import open_onnx, run_onnx  # onnxruntime: only where it runs

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
    path = export_artifact(ctx.graph, kind, ctx.workdir)
    ctx.artifacts[kind] = path
    return path


def export_artifact(graph, kind: str, workdir: str) -> str:
    """Export what an executor runs (`onnx-int`, `onnx-float` with debug outputs, `nir`) into workdir."""
    if kind.startswith("onnx-"):
        path = os.path.join(workdir, f"model.{kind}.onnx")
        export_graph(graph, "onnx", path, onnx_variant=kind.split("-", 1)[1], debug_outputs=True, force=True)
        return path
    if kind == "nir":
        path = os.path.join(workdir, "model.nir")
        export_graph(graph, "nir", path, onnx_variant="float", force=True)
        return path
    raise DeployError(f"no artifact kind {kind!r}")


def skip_reason(name: str) -> Optional[str]:
    if name == "cupy":
        return cuda_skip_reason()
    return None


def artifacts_by_kind(paths) -> dict:
    """--artifact files by the executor that runs them (ONNX variant read from its metadata)."""
    out = {}
    for p in paths:
        if not os.path.exists(p):
            raise DeployError(f"--artifact {p!r}: no such file")
        if p.endswith(".onnx"):
            import onnx

            try:
                m = onnx.load(p, load_external_data=False)
            except Exception as exc:  # noqa: BLE001 - an unreadable artifact is one message
                raise DeployError(f"--artifact {p!r}: not a readable ONNX file ({type(exc).__name__})") from None
            meta = {e.key[len(ONNX_META_PREFIX):]: e.value for e in m.metadata_props
                    if e.key.startswith(ONNX_META_PREFIX)}
            variant = meta.get("variant")
            if variant not in ("int", "float"):
                raise DeployError(f"--artifact {p!r}: not an sdt-deploy ONNX export (no variant in its metadata)")
            if meta.get("partition") == "host":
                raise DeployError(f"--artifact {p!r}: a partition's host stem; pass the .nir file (its manifest "
                                  "names the stem)")
            out[f"onnx-{variant}"] = p
        elif p.endswith(".nir"):
            out["nir"] = p
        else:
            raise DeployError(f"--artifact {p!r}: expected a .onnx or .nir file")
    return out


def membrane_detail(ctx: Context, executor: str, x: np.ndarray, layer: str, t: int, b: int, idx: tuple) -> dict:
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
