"""Running an exported SDT ONNX model with onnxruntime over T time steps (for `verify` and for users).

One session per call (`open_onnx` keeps one across calls, e.g. the batches of a verify run); the state
starts at zero and each step's `v_out.<lif>` is fed back as the next step's `v_in.<lif>` (an unrolled
export takes the whole sequence in one call). The read-out is the graph's:

- `logits`: mean over T of the per-step logits ([B, K]), or the per-step logits ([T, B, K]) with TET
  (`per_step`); for a graph without a Readout (a partition's host part) the per-step output values
  [T, B, ...], as `sdt_deploy.run.float_executor.execute` returns them;
- int variant: `logits_int` (int64 [T, B, K], the per-step integers) and `logits_grid` (per class/channel
  exponent g): logit = logits_int * 2**-g. `logits` is computed from them exactly as the integer engine
  does (float64 sum over T divided by T, then float32), so it equals `run_engine(...).logits`;
- `spikes`: with debug outputs in the model, uint8 [T, B, ...] per spike layer, else empty.

The default session runs with onnxruntime's *basic* graph optimizations only (constant folding and
redundant-node removal): the extended fusions may reorder float additions, and a verifier should run
the arithmetic the file states. For throughput, `optimization="all"` (and `threads=`) or your own
`session_options` choose otherwise; the values are integers on power-of-two grids, so a reordered sum is
exact wherever the bit analysis says float32 is (bench/bench_inference.py checks the spikes).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import numpy as np

from sdt_deploy.errors import DeployError
from sdt_deploy.files.arrays import time_major
from sdt_deploy.files.artifacts import ONNX_META_PREFIX, STATE_IN, STATE_OUT

META = ONNX_META_PREFIX
ORT_TYPES = {"tensor(float)": np.float32, "tensor(int32)": np.int32, "tensor(int64)": np.int64,
             "tensor(uint8)": np.uint8, "tensor(int8)": np.int8, "tensor(double)": np.float64}


@dataclass
class OnnxRun:
    logits: np.ndarray                          # the read-out (see the module docstring), float32
    spikes: dict = field(default_factory=dict)  # layer -> uint8 [T, B, ...] (debug exports only)
    logits_int: Optional[np.ndarray] = None     # int variant: int64 [T, B, ...] per-step integers
    logits_grid: Optional[np.ndarray] = None    # int variant: per-channel exponent of logits_int
    variant: str = "float"
    per_step: Optional[np.ndarray] = None       # the output at every step [T, B, ...], before the read-out
    membranes: dict = field(default_factory=dict)   # step model, membranes=True: LIF -> its v_out after every step
    arithmetic: str = "float32"                 # of membranes and per_step: "int", "float32", "float64" (V2)


@dataclass(frozen=True)
class ModelInfo:
    """What run_onnx needs from the model's metadata."""

    variant: str
    unrolled: bool
    time_steps: int
    readout: str
    input: str
    output: str
    output_grid: Optional[np.ndarray]
    spikes: tuple
    arithmetic: str = "float32"


def read_info(session) -> ModelInfo:
    """The model's `sdt_deploy.*` metadata, as onnxruntime read it."""
    props = session.get_modelmeta().custom_metadata_map
    meta = {k[len(META):]: v for k, v in props.items() if k.startswith(META)}
    if "variant" not in meta:
        raise DeployError("not an sdt-deploy ONNX export (no sdt_deploy.* metadata)")
    grid = json.loads(meta["output_grid"])
    arithmetic = meta.get("arithmetic", "int" if meta["variant"] == "int" else "float32")
    return ModelInfo(meta["variant"], json.loads(meta["unrolled"]), int(meta["time_steps"]), meta["readout"],
                     meta["input"], meta["output"], None if grid is None else np.asarray(grid, np.int64),
                     tuple(json.loads(meta["spikes"])), arithmetic)


def model_bytes_of(source) -> bytes:
    if isinstance(source, (bytes, bytearray)):
        return bytes(source)
    if isinstance(source, str):
        try:
            with open(source, "rb") as f:
                return f.read()
        except OSError as exc:
            raise DeployError(f"ONNX model {source!r}: {exc.strerror}") from None
    if hasattr(source, "SerializeToString"):
        return source.SerializeToString()
    raise TypeError(f"expected a path, bytes or an onnx.ModelProto, got {type(source).__name__}")


OPTIMIZATION_LEVELS = ("basic", "extended", "all")


def make_session(model_bytes: bytes, providers: Optional[Sequence[str]] = None, session_options=None,
                 optimization: str = "basic", threads: Optional[int] = None, arena: bool = True):
    """An onnxruntime session: `session_options` as given, or onnxruntime's `optimization` level (basic
    by default, what `verify` runs) with `threads` intra-op threads (onnxruntime's choice if None).
    `arena=False`: no CPU memory arena (onnxruntime's arena keeps the largest run's intermediate tensors
    for the session's life; without it they are freed after every run -- what a verifier that runs
    several sessions one after the other within a memory budget needs)."""
    import onnxruntime as ort

    if session_options is None:
        if optimization not in OPTIMIZATION_LEVELS:
            raise DeployError(f"optimization must be one of {', '.join(OPTIMIZATION_LEVELS)}, got {optimization!r}")
        session_options = ort.SessionOptions()
        session_options.graph_optimization_level = {
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[optimization]
        session_options.log_severity_level = 3
        if threads is not None:
            session_options.intra_op_num_threads = int(threads)
        if not arena:
            session_options.enable_cpu_mem_arena = False
    return ort.InferenceSession(model_bytes, sess_options=session_options,
                                providers=list(providers or ["CPUExecutionProvider"]))


def check_frames(x: np.ndarray, session, info: ModelInfo) -> tuple[np.ndarray, int]:
    """x as float32 [B, C, ...] (repeated over T) or [B, T, C, ...]; returns it time-major and T."""
    spec = next(i for i in session.get_inputs() if i.name == info.input)
    frame_shape = tuple(spec.shape[2:]) if info.unrolled else tuple(spec.shape[1:])
    x = np.asarray(x)
    if x.dtype.kind not in "fiub":
        raise DeployError(f"input: dtype {x.dtype} is not numeric")
    if x.ndim == len(frame_shape) + 1 and tuple(x.shape[1:]) == frame_shape:
        T = info.time_steps
    elif x.ndim == len(frame_shape) + 2 and tuple(x.shape[2:]) == frame_shape:
        T = x.shape[1]
    else:
        raise DeployError(f"input: shape {x.shape} is neither [B, {', '.join(map(str, frame_shape))}] nor "
                          f"[B, T, {', '.join(map(str, frame_shape))}] of the model")
    if x.shape[0] < 1 or T < 1:
        raise DeployError(f"input: shape {x.shape} has an empty batch or time axis")
    if info.unrolled and T != info.time_steps:
        raise DeployError(f"input: {T} time steps, but the unrolled model holds {info.time_steps}")
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise DeployError("input: contains NaN or Inf values")
    return time_major(x, T) if x.ndim == len(frame_shape) + 1 else swap_batch_time(x), T


def swap_batch_time(x: np.ndarray) -> np.ndarray:
    """[B, T, ...] <-> [T, B, ...]."""
    return np.ascontiguousarray(np.swapaxes(x, 0, 1))


def run_steps(session, info: ModelInfo, frames: np.ndarray, on_step=None,
              keep_membranes: bool = False) -> tuple[np.ndarray, dict, dict]:
    """The step model driven over T with its state; returns (per-step output [T, B, ...], spikes,
    membranes: with `keep_membranes`, every LIF's `v_out` after every step [T, B, ...], else empty --
    stacking them cost 40 % of a plain run's time on CIFAR 2-256). With `on_step(t, membranes, spikes)`
    each step's `v_out` and spikes ({layer: [B, ...]}) are handed to it instead of kept (the returned
    dicts are empty): a verifier compares a step and lets it go."""
    B = frames.shape[1]
    states = {i.name: np.zeros([B] + list(i.shape[1:]), dtype=ORT_TYPES[i.type])
              for i in session.get_inputs() if i.name.startswith(STATE_IN)}
    wanted = [info.output] + [STATE_OUT + s[len(STATE_IN):] for s in states] + list(info.spikes)
    outs, spikes = [], {name: [] for name in info.spikes}
    membranes: dict = {s[len(STATE_IN):]: [] for s in states} if keep_membranes or on_step is not None else {}
    for t in range(frames.shape[0]):
        feed = {info.input: np.ascontiguousarray(frames[t]), **states}
        got = dict(zip(wanted, session.run(wanted, feed)))
        states = {STATE_IN + k[len(STATE_OUT):]: v for k, v in got.items() if k.startswith(STATE_OUT)}
        outs.append(got[info.output])
        if on_step is not None:
            on_step(t, {name: got[STATE_OUT + name] for name in membranes},
                    {name: got[name].astype(np.uint8, copy=False) for name in info.spikes})
            continue
        for name in info.spikes:
            spikes[name].append(got[name])
        for name in membranes:
            membranes[name].append(got[STATE_OUT + name])
    if on_step is not None:
        return np.stack(outs), {}, {}
    return (np.stack(outs), {k: np.stack(v).astype(np.uint8, copy=False) for k, v in spikes.items()},
            {k: np.stack(v) for k, v in membranes.items()})


def run_unrolled(session, info: ModelInfo, frames: np.ndarray, on_step=None,
                 keep_membranes: bool = False) -> tuple[np.ndarray, dict, dict]:
    """The unrolled model (no state tensors: no membranes to return); `on_step` as for `run_steps`."""
    wanted = [info.output] + list(info.spikes)
    got = dict(zip(wanted, session.run(wanted, {info.input: swap_batch_time(frames)})))
    spikes = {k: got[k].astype(np.uint8, copy=False) for k in info.spikes}
    if on_step is not None:
        for t in range(frames.shape[0]):
            on_step(t, {}, {k: v[t] for k, v in spikes.items()})
        return got[info.output], {}, {}
    return got[info.output], spikes, {}


def read_out(per_step: np.ndarray, info: ModelInfo) -> OnnxRun:
    """The graph's read-out of the per-step outputs [T, B, ...]."""
    T = per_step.shape[0]
    if info.variant == "int" and info.output_grid is not None:   # a current on its grid (not spikes)
        ints = per_step.astype(np.int64)
        shape = (-1,) + (1,) * (ints.ndim - 3)
        values = ints * np.exp2(-info.output_grid.astype(np.float64)).reshape(shape)   # float64: exact
        logits = values.sum(0) / T if info.readout == "mean" else values
        return OnnxRun(logits.astype(np.float32), logits_int=ints, logits_grid=info.output_grid, variant="int")
    values = per_step.astype(np.float32, copy=False)
    logits = values.mean(0) if info.readout == "mean" else values
    return OnnxRun(logits, variant="float")


@dataclass(frozen=True)
class OnnxSession:
    """An opened export: one onnxruntime session and the model's metadata, reusable across batches."""

    session: object
    info: ModelInfo

    def run(self, x: np.ndarray, batch_size: Optional[int] = None, on_step=None,
            membranes: bool = False) -> OnnxRun:
        """The model on x, in batches of `batch_size` (all at once by default). `on_step(t, membranes,
        spikes)`: every step's states and spikes handed on instead of kept (`run_steps`; one batch).
        `membranes`: keep every LIF's `v_out` after every step in the result (a step model's)."""
        frames, _ = check_frames(x, self.session, self.info)
        run = run_unrolled if self.info.unrolled else run_steps
        step = frames.shape[1] if on_step is not None else (batch_size or frames.shape[1])
        outs, spikes, states = [], {}, {}
        for start in range(0, frames.shape[1], step):
            out, sp, mem = run(self.session, self.info, frames[:, start:start + step], on_step, membranes)
            outs.append(out)
            for k, v in sp.items():
                spikes.setdefault(k, []).append(v)
            for k, v in mem.items():
                states.setdefault(k, []).append(v)
        per_step = np.concatenate(outs, axis=1)
        result = read_out(per_step, self.info)
        result.per_step = per_step
        result.arithmetic = self.info.arithmetic
        result.spikes = {k: np.concatenate(v, axis=1) for k, v in spikes.items()}
        result.membranes = {k: np.concatenate(v, axis=1) for k, v in states.items()}
        return result


def open_onnx(source, providers: Optional[Sequence[str]] = None, session_options=None, optimization: str = "basic",
              threads: Optional[int] = None, arena: bool = True) -> OnnxSession:
    """Open an sdt-deploy ONNX export (path, bytes or onnx.ModelProto) once, to run many batches.
    `optimization="all"` lets onnxruntime fuse and re-layout (measured 5-10 % faster on the float
    variant on an x86 CPU; the benchmarks check its spikes too), `threads` sets its intra-op threads,
    `arena=False` frees every run's intermediate tensors after it (`make_session`)."""
    session = make_session(model_bytes_of(source), providers, session_options, optimization, threads, arena)
    return OnnxSession(session, read_info(session))


def run_onnx(source: Union[str, bytes, OnnxSession, "object"], x: np.ndarray, batch_size: Optional[int] = None,
             providers: Optional[Sequence[str]] = None, session_options=None, optimization: str = "basic",
             threads: Optional[int] = None, membranes: bool = False) -> OnnxRun:
    """Run an sdt-deploy ONNX export (path, bytes, ModelProto, or an `open_onnx` session) on x,
    [B,C,H,W] repeated over T or [B,T,C,H,W], in batches of `batch_size` (all at once by default).
    `membranes`: also return every LIF's state after every step (`OnnxRun.membranes`)."""
    opened = source if isinstance(source, OnnxSession) else open_onnx(source, providers, session_options,
                                                                        optimization, threads)
    return opened.run(x, batch_size, membranes=membranes)
