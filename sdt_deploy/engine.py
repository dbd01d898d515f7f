"""The integer engine: a quantized deploy graph run with integer arithmetic only (after the input is put
on its grid), event-driven, counting the operations it performs.

- currents are int64 arrays on per-channel grids (value = integer * 2**-grid);
- a synaptic layer on spikes adds the weight columns of the inputs that spiked and nothing else: the
  spikes become a sparse 0/1 matrix of (input event, kernel tap) pairs and one sparse x dense product
  (scipy, integer) adds exactly those columns; its count of additions is nnz(events x taps) x c_out;
- the encoder (the only layer reading a real value) is a dense integer convolution: its multiply-
  accumulates are counted per valid (non-padding) tap;
- a LIF is `H = (V + X) >> 1` (arithmetic shift: floor), `S = H >= theta`, `V = H * (1 - S)`, on its
  channel's grid; contributions on a coarser grid are shifted left first (exact).

Because floor((floor(a) + n) / 2) = floor((a + n) / 2) for integer n, the integer state is the floor of
the exact state and every threshold decision matches the float model's exactly (DESIGN.md §4).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import scipy.sparse as sp

from .errors import DeployError
from .graph import (Add, And, Broadcast, Conv, Graph, Input, LIF, Linear, MaxPool, OrPool, Readout, TokenSum)
from .io import time_major

INT = np.int64


@dataclass
class EngineResult:
    logits: np.ndarray                 # float read-out (dequantized), [B, K] or [T, B, K] with TET
    logits_int: np.ndarray             # int64 per step [T, B, K] on the head's grid
    logits_grid: np.ndarray            # per-class exponent: logit = logits_int * 2**-grid
    spikes: dict                       # node name -> uint8 [T, B, ...]
    ops: dict                          # node name -> {"acs", "macs", "bias_adds", ...}
    observed: dict                     # node name -> max |integer| seen (currents, LIF states)
    membranes: dict = field(default_factory=dict)   # LIF name -> int64 H per step (if asked)

    @property
    def total_acs(self) -> int:
        return int(sum(o.get("acs", 0) for o in self.ops.values()))

    @property
    def total_macs(self) -> int:
        return int(sum(o.get("macs", 0) for o in self.ops.values()))


def quantize_input(x: np.ndarray, grid: int, bits: int) -> np.ndarray:
    """round(x * 2**grid), half to even (as torch.round and ONNX Round), saturated to signed `bits`."""
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return np.clip(np.round(x.astype(np.float32) * np.float32(2.0 ** grid)), lo, hi).astype(INT)


def input_integers(n: Input, x: np.ndarray) -> np.ndarray:
    """The input node's integers: quantized here, or (a partition's cut, `bits` None) checked to lie
    on the node's per-channel grid already."""
    if n.bits is not None:
        return quantize_input(x, int(n.grid[0]), int(n.bits))
    scale = np.exp2(np.asarray(n.grid, dtype=np.float64)).reshape(-1, *([1] * (x.ndim - 3)))
    scaled = x.astype(np.float64) * scale
    ints = np.round(scaled)
    if not np.array_equal(ints, scaled):
        raise DeployError(f"input of {n.name}: values are not on the node's grid")
    return ints.astype(INT)


def _shift_left(a: np.ndarray, shift: np.ndarray, channel_axis: int = 2) -> np.ndarray:
    """a * 2**shift per channel (shift >= 0), exact."""
    if not np.any(shift):
        return a
    if np.any(shift < 0):
        raise DeployError("internal: a current would be shifted to a coarser grid")
    shape = [1] * a.ndim
    shape[channel_axis] = -1
    return a << shift.astype(INT).reshape(shape)


def _spatial_taps(S: np.ndarray, k: int, pad: int, Ho: int, Wo: int):
    """(rows, cols) of the 0/1 matrix pairing each input spike with each kernel tap it reaches.

    S: [N, C, H, W] (bool); row = n*Ho*Wo + yo*Wo + xo, col = c*k*k + ky*k + kx, stride 1."""
    n, c, y, x = np.nonzero(S)
    rows, cols = [], []
    for ky in range(k):
        yo = y - ky + pad
        for kx in range(k):
            xo = x - kx + pad
            ok = (yo >= 0) & (yo < Ho) & (xo >= 0) & (xo < Wo)
            rows.append(n[ok] * (Ho * Wo) + yo[ok] * Wo + xo[ok])
            cols.append(c[ok] * (k * k) + ky * k + kx)
    return np.concatenate(rows), np.concatenate(cols)


def synaptic_conv(S: np.ndarray, w_int: np.ndarray, padding: int) -> tuple[np.ndarray, int]:
    """Event-driven conv of spikes [N, C, H, W] with integer weights [O, C, k, k], stride 1.

    Returns (out int64 [N, O, H', W'], additions performed)."""
    N, C, H, W = S.shape
    O, _, k, _ = w_int.shape
    Ho, Wo = H + 2 * padding - k + 1, W + 2 * padding - k + 1
    if k == 1 and padding == 0:
        flat = S.transpose(0, 2, 3, 1).reshape(N * H * W, C)
        A = sp.csr_matrix(flat.astype(INT))
        wmat = w_int.reshape(O, C).T.astype(INT)
    else:
        rows, cols = _spatial_taps(S != 0, k, padding, Ho, Wo)
        A = sp.csr_matrix((np.ones(rows.size, dtype=INT), (rows, cols)), shape=(N * Ho * Wo, C * k * k))
        wmat = w_int.reshape(O, C * k * k).T.astype(INT)
    out = np.asarray(A @ wmat, dtype=INT)          # adds one weight column per (event, tap)
    return out.reshape(N, Ho, Wo, O).transpose(0, 3, 1, 2), int(A.nnz) * O


def synaptic_linear(S: np.ndarray, w_int: np.ndarray) -> tuple[np.ndarray, int]:
    """Event-driven linear layer on spikes [N, C]; returns (out [N, O], additions)."""
    A = sp.csr_matrix(S.astype(INT))
    out = np.asarray(A @ w_int.T.astype(INT), dtype=INT)
    return out, int(A.nnz) * w_int.shape[0]


def dense_conv(x: np.ndarray, w_int: np.ndarray, stride: int, padding: int) -> tuple[np.ndarray, int]:
    """Integer convolution of a real-valued (integer-coded) input: the encoder's MACs.

    Returns (out int64, multiply-accumulates over valid, non-padding taps)."""
    N, C, H, W = x.shape
    O, _, k, _ = w_int.shape
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    Ho = (H + 2 * padding - k) // stride + 1
    Wo = (W + 2 * padding - k) // stride + 1
    out = np.zeros((N, O, Ho, Wo), dtype=INT)
    w = w_int.astype(INT)
    for ky in range(k):
        for kx in range(k):
            patch = xp[:, :, ky:ky + stride * Ho:stride, kx:kx + stride * Wo:stride]   # [N, C, Ho, Wo]
            out += np.einsum("nchw,oc->nohw", patch, w[:, :, ky, kx], dtype=INT, optimize=False)
    valid = _valid_taps(H, W, k, stride, padding)
    return out, int(valid) * C * O * N


def _valid_taps(H: int, W: int, k: int, stride: int, padding: int) -> int:
    """Number of (output position, kernel tap) pairs that read a real pixel, not padding."""
    def axis(n):
        outs = (n + 2 * padding - k) // stride + 1
        pos = np.arange(outs)[:, None] * stride + np.arange(k)[None, :] - padding
        return ((pos >= 0) & (pos < n)).sum(axis=1)
    return int(np.outer(axis(H), axis(W)).sum())


def _pool_max(a: np.ndarray, k: int, stride: int, pad: int, fill) -> np.ndarray:
    """Max over k x k windows of [..., H, W] with constant padding `fill`."""
    H, W = a.shape[-2:]
    Ho, Wo = (H + 2 * pad - k) // stride + 1, (W + 2 * pad - k) // stride + 1
    widths = [(0, 0)] * (a.ndim - 2) + [(pad, pad), (pad, pad)]
    ap = np.pad(a, widths, constant_values=fill)
    out = None
    for ky in range(k):
        for kx in range(k):
            win = ap[..., ky:ky + stride * Ho:stride, kx:kx + stride * Wo:stride]
            out = win.copy() if out is None else np.maximum(out, win)
    return out


def heads_or_pool_np(a: np.ndarray, heads: int) -> np.ndarray:
    """numpy twin of models.sdt.heads_or_pool on [T, B, C, H, W] spikes."""
    T, B, C, H, W = a.shape
    xh = a.reshape(T, B, C, H * W).transpose(0, 1, 3, 2).reshape(T, B, H * W, heads, C // heads).transpose(0, 1, 3, 2, 4)
    pooled = _pool_max(xh, 3, 1, 1, 0)
    return pooled.transpose(0, 1, 2, 4, 3).reshape(T, B, C, H, W)


def lif_int(X: np.ndarray, theta: np.ndarray, channel_axis: int = 2, membranes: Optional[list] = None):
    """Integer LIF over T: H = (V + X) >> 1, S = H >= theta, V = H * (1 - S)."""
    shape = [1] * (X.ndim - 1)
    shape[channel_axis - 1] = -1
    th = theta.astype(INT).reshape(shape)
    V = np.zeros(X.shape[1:], dtype=INT)
    out = np.empty(X.shape, dtype=np.uint8)
    peak = 0
    for t in range(X.shape[0]):
        H = (V + X[t]) >> 1
        S = H >= th
        V = np.where(S, 0, H)
        out[t] = S
        peak = max(peak, int(np.abs(H).max(initial=0)))
        if membranes is not None:
            membranes.append(H)
    return out, peak


def check_engine_bounds(qg: Graph) -> None:
    from .bits import node_bounds

    for name, b in node_bounds(qg).items():
        if b >= 2 ** 62:
            raise DeployError(f"{name}: worst-case integer magnitude 2**{np.log2(b):.1f} exceeds the engine's "
                              "int64; refusing rather than risking a wrap-around")


def run_engine(qg: Graph, x: np.ndarray, record: bool = True, membranes: bool = False) -> EngineResult:
    if not qg.meta.get("quantized"):
        raise DeployError("the integer engine runs quantized graphs only")
    check_engine_bounds(qg)
    T = x.shape[1] if x.ndim == 5 else int(qg.meta["time_steps"])
    B = x.shape[0]
    vals: dict[str, np.ndarray] = {}
    grids: dict[str, Optional[np.ndarray]] = {}
    spikes, ops, observed, mems = {}, {}, {}, {}
    remaining = {n.name: sum(n.name in m.inputs for m in qg.nodes) for n in qg.nodes}
    for n in qg.nodes:
        ins = [vals[i] for i in n.inputs]
        in_grids = [grids[i] for i in n.inputs]
        if isinstance(n, Input):
            y = input_integers(n, time_major(x, T))
        elif isinstance(n, Conv):
            a = ins[0]
            flat = a.reshape((T * B,) + a.shape[2:])
            if in_grids[0] is None:
                if n.stride != 1 or n.groups != 1:
                    raise DeployError(f"{n.name}: only stride-1, ungrouped synaptic convolutions are supported")
                out, adds = synaptic_conv(flat, n.w_int, n.padding)
                ops[n.name] = {"acs": adds, "macs": 0}
            else:
                out, macs = dense_conv(flat, n.w_int, n.stride, n.padding)
                ops[n.name] = {"acs": 0, "macs": macs}
            out += n.b_int.astype(INT)[None, :, None, None]
            ops[n.name]["bias_adds"] = int(out.size)
            y = out.reshape((T, B) + out.shape[1:])
        elif isinstance(n, Linear):
            a = ins[0]
            if in_grids[0] is not None:
                raise DeployError(f"{n.name}: a linear layer reading a current is not supported")
            out, adds = synaptic_linear(a.reshape(T * B, -1), n.w_int)
            out += n.b_int.astype(INT)[None, :]
            ops[n.name] = {"acs": adds, "macs": 0, "bias_adds": int(out.size)}
            y = out.reshape(T, B, -1)
        elif isinstance(n, LIF):
            if n.tau != 2.0 or n.plif_w not in (None, 0.0):
                raise DeployError(f"{n.name}: the integer LIF needs decay 1/2 (tau = 2); got tau = {n.tau}")
            src_grid = in_grids[0] if in_grids[0] is not None else np.zeros(n.shape[0], dtype=INT)
            X = _shift_left(ins[0].astype(INT), n.grid - src_grid)
            trace: Optional[list] = [] if membranes else None
            y, peak = lif_int(X, n.theta_int, membranes=trace)
            observed[n.name] = max(peak, int(np.abs(X).max(initial=0)))
            ops[n.name] = {"neuron_updates": int(X.size), "spikes": int(y.sum(dtype=INT))}
            if membranes:
                mems[n.name] = np.stack(trace)
        elif isinstance(n, And):
            y = ins[0] & ins[1]
            ops[n.name] = {"and": int(y.size)}
        elif isinstance(n, OrPool):
            a = ins[0]
            if n.layout == "heads":
                y = heads_or_pool_np(a, n.heads)
            else:
                y = _pool_max(a, n.kernel, n.stride, n.padding, 0)
            ops[n.name] = {"or_inputs": int(a.sum(dtype=INT))}
        elif isinstance(n, MaxPool):
            y = _pool_max(ins[0], n.kernel, n.stride, n.padding, np.iinfo(INT).min)
            ops[n.name] = {"comparisons": int(y.size) * (n.kernel * n.kernel - 1)}
        elif isinstance(n, TokenSum):
            a = ins[0]
            y = a.reshape(a.shape[:3] + (-1,)).sum(axis=-1, dtype=INT)
            ops[n.name] = {"adds": int(np.count_nonzero(a)) if in_grids[0] is None else int(a.size)}
        elif isinstance(n, Broadcast):
            a = ins[0]
            y = np.broadcast_to(a[..., None, None], a.shape + tuple(n.shape[1:]))
        elif isinstance(n, Add):
            y = None
            for a, g in zip(ins, in_grids):
                term = _shift_left(a.astype(INT), n.grid - g)
                y = term if y is None else y + term
            ops[n.name] = {"adds": int(y.size) * (len(ins) - 1)}
        elif isinstance(n, Readout):
            y = ins[0]
        else:
            raise DeployError(f"the integer engine has no rule for {n.name} ({n.op})")
        vals[n.name] = y
        grids[n.name] = n.grid if n.out_kind == "current" else None
        if n.out_kind == "current" and not isinstance(n, (Input, Readout)):
            observed[n.name] = max(observed.get(n.name, 0), int(np.abs(y).max(initial=0)))
        if record and n.out_kind == "spike":
            spikes[n.name] = np.ascontiguousarray(y, dtype=np.uint8)
        for i in n.inputs:
            remaining[i] -= 1
            if remaining[i] == 0 and i != qg.output.name:
                vals.pop(i, None)
    out = qg.output
    logits_int = vals[out.name].astype(INT)
    grid = np.asarray(out.grid)
    per_step = logits_int * np.exp2(-grid.astype(np.float64))
    logits = per_step if (isinstance(out, Readout) and out.mode == "per_step") else per_step.sum(0) / T
    return EngineResult(logits.astype(np.float32), logits_int, grid, spikes, ops, observed, mems)
