"""The integer engine: a quantized deploy graph run with integer arithmetic only (after the input is put
on its grid), event-driven, counting the operations it performs.

- currents are integer arrays on per-channel grids (value = integer * 2**-grid): int32 where the bit
  analysis (`quant.bits.channel_bounds`) bounds the node below 2**31 (a LIF: its V + X, twice its bound),
  int64 elsewhere -- never a wrap-around; the read-out and membrane traces are int64;
- a synaptic layer on spikes adds the weight columns of the inputs that spiked and nothing else; its
  count of additions is (event, tap) pairs x c_out (padding excluded). The additions run in the C
  kernels of `engine_kernels` (sdt_deploy/run/_engine_kernels.c): per output position, the weight rows of
  the events that reach it are added into int16 accumulators held in vector registers, emptied into an
  int32 row before they could overflow (budget: the events' largest |w|); the bias is added on writing
  the row. Where the C kernels are absent (no compiler at install) or a weight does not fit their
  integers (beyond int16, or a worst-case sum beyond int32), the numpy path: per kernel tap, the
  spikes as a sparse 0/1 matrix of input events times that tap's weights (scipy's public sparse
  product), in int16 where the weights bound a group of events below 2**15. The C kernels split a
  layer's output rows over `threads` (their own team of threads, a batch of one too); the numpy path
  splits the samples;
- the encoder (the only layer reading a real value) is a dense integer convolution (int32 in the C
  kernel where max |x| times the weights' sum bounds it, else int64 numpy): its multiply-accumulates
  are counted per valid (non-padding) tap;
- a LIF is `H = (V + X) >> 1` (arithmetic shift: floor), `S = H >= theta`, `V = H * (1 - S)`, on its
  channel's grid; contributions on a coarser grid are shifted left first (exact); one pass over the T
  steps in the C kernel (writing the membrane trace too where it is asked for; numpy without the C
  kernels), a large layer's samples (or, at batch 1, its neurons) on the same threads.

Because floor((floor(a) + n) / 2) = floor((a + n) / 2) for integer n, the integer state is the floor of
the exact state and every threshold decision matches the float model's exactly (docs/numeric-contract.md).
"""
from __future__ import annotations

import os
import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional, Union

import numpy as np
import scipy.sparse as sp

from sdt_deploy.errors import DeployError
from sdt_deploy.files.arrays import time_major
from sdt_deploy.ir.graph import (
    CURRENT,
    LIF,
    SPIKE,
    Add,
    And,
    Broadcast,
    Conv,
    Graph,
    Input,
    KdReadout,
    KVProduct,
    Linear,
    MaxPool,
    OrPool,
    QKVProduct,
    Readout,
    TokenSum,
)
from sdt_deploy.quant.bits import check_engine_bounds
from sdt_deploy.quant.contract import input_shift
from sdt_deploy.run import engine_kernels as K
from sdt_deploy.run.lif import integer_lif

INT = np.int64
AFTER_RESET = "after_reset"      # run_engine(membranes=...): the trace of V after each step's reset
I16_MAX = 2 ** 15 - 1            # int16 partial sums in the event kernels


@dataclass
class EngineResult:
    logits: np.ndarray                 # float read-out (dequantized), [B, K] or [T, B, K] with TET
    logits_int: np.ndarray             # int64 per step [T, B, K] on the head's grid
    logits_grid: np.ndarray            # per-class exponent: logit = logits_int * 2**-grid
    spikes: dict                       # node name -> uint8 [T, B, ...]
    ops: dict                          # node name -> {"acs", "macs", "bias_adds", ...}
    observed: dict                     # node name -> max |integer| seen (currents, LIF states)
    membranes: dict = field(default_factory=dict)   # LIF name -> int64 H per step (if asked; see run_engine)

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


def _check_shift(shift: np.ndarray) -> None:
    """A current is only ever brought onto a finer grid (shift >= 0: exact)."""
    if np.any(shift < 0):
        raise DeployError("internal: a current would be shifted to a coarser grid")


def _shift_left(a: np.ndarray, shift: np.ndarray, channel_axis: int = 2) -> np.ndarray:
    """a * 2**shift per channel (shift >= 0), exact."""
    if not np.any(shift):
        return a
    _check_shift(shift)
    shape = [1] * a.ndim
    shape[channel_axis] = -1
    return a << shift.astype(a.dtype).reshape(shape)


def accumulator_dtype(w_int: np.ndarray) -> type:
    """The narrowest of int16, int32, int64 that no output can overflow even with every input spiking
    (the sum of |w| over a row's inputs, as `bits.channel_bounds` bounds it). Narrower is faster: scipy's
    kernel adds ~17 G int16, ~4 G int32 and ~1.6 G int64 values per second on one core (measured)."""
    worst = np.abs(w_int.astype(np.int64)).reshape(w_int.shape[0], -1).sum(axis=1).max(initial=0)
    return np.int16 if worst <= I16_MAX else np.int32 if worst < 2 ** 31 else INT


def int16_plan(w_int: np.ndarray) -> Optional[list]:
    """Per kernel tap, the input-channel ranges [c0, c1) whose weights sum, in magnitude, to at most
    2**15 - 1 for every output -- with that bound per output: the groups of events that can be added in
    int16 without overflow (a whole tap, unless its channels must be split). None where a single
    weight does not fit int16 (never for int8 weights)."""
    O, C = w_int.shape[:2]
    taps = np.abs(w_int.astype(np.int64)).reshape(O, C, -1)
    if taps.max(initial=0) > I16_MAX:
        return None
    plan = []
    for t in range(taps.shape[2]):
        cum = np.cumsum(taps[:, :, t].T, axis=0)            # [C, O]: running sums over the channels
        ranges, c0, before = [], 0, np.zeros(O, np.int64)
        while c0 < C:                                       # greedy: the longest range that fits
            over = np.flatnonzero((cum[c0:] - before).max(axis=1) > I16_MAX)
            c1 = C if over.size == 0 else c0 + int(over[0])  # > c0: a single weight always fits
            ranges.append((c0, c1, cum[c1 - 1] - before))
            c0, before = c1, cum[c1 - 1]
        plan.append(ranges)
    return plan


# Where the C kernels split a layer over the engine's threads (their own team of spinning threads,
# engine_kernels): inputs x outputs of an event layer, neurons x steps of a LIF, and multiply-accumulates of
# the encoder's dense convolution, below which the layer runs on the calling thread. A round trip to the
# team costs about 0.4 us (a Python thread pool's, 85 us, kept batch-1 layers on one thread before); measured
# on CIFAR 2-256, 2 cores (Dec 5, 17:00): the 5 % model at batch 1 took 6.5 ms on one thread, 5.5 on two
# with these thresholds, 5.6 with every layer split, 6.4 with the previous thresholds (2**28 / 2**20).
KERNEL_PARALLEL_MIN_WORK = 1 << 20
KERNEL_PARALLEL_MIN_NEURONS = 1 << 14
DENSE_PARALLEL_MIN_MACS = 1 << 20
# The same for the numpy kernels (no compiler at install time), which split the samples on a Python thread
# pool: at batch 1 a split never paid there -- the 5 % model took 11.8 ms on two threads against 7.0 on one
# at 2**22 -- while at batch 32 (2**29-2**30) it gives 1.25-1.4x; 2**28 keeps the second only.
PARALLEL_MIN_WORK = 1 << 28
PARALLEL_MIN_NEURONS = 1 << 20


def kernel_parts(threads: int, work: int, limit: int) -> int:
    """How many of the engine's threads a C kernel splits a layer of `work` over: all of them from
    `limit` on, else the calling thread alone (the kernels split rows, samples or neurons themselves)."""
    return threads if work >= limit else 1


def default_threads() -> int:
    """Threads for the engine's additions: the CPUs this process may use (at most 8)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:   # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    return max(1, min(8, n))


def _add_event_rows(Y: np.ndarray, rows: np.ndarray, cols: np.ndarray, w_cols: np.ndarray) -> None:
    """Y[rows[i]] += w_cols[cols[i]] for every event i (rows nondecreasing): one weight row added per
    event, as a CSR matrix of the events (indptr from the row counts, no sorting) times w_cols -- scipy's
    public product. The numpy path, where the C kernels (`engine_kernels`) are absent or cannot take the
    weight."""
    M, n_in = Y.shape[0], w_cols.shape[0]
    index = np.int32 if max(M, n_in, rows.size) < 2 ** 31 else np.int64
    indptr = np.zeros(M + 1, dtype=index)
    np.cumsum(np.bincount(rows, minlength=M), out=indptr[1:])
    cols = cols.astype(index, copy=False)
    ones = np.ones(cols.size, dtype=Y.dtype)
    w_cols = np.ascontiguousarray(w_cols, dtype=Y.dtype)
    Y += sp.csr_matrix((ones, cols, indptr), shape=(M, n_in)) @ w_cols


def _over_samples(fn, n: int, parts: int) -> list:
    """[fn(a, b)] for the sample ranges [a, b) that split n samples into `parts`, on the engine's
    threads when there are several (each sample's integers are its own: the split changes nothing)."""
    return K.over_parts(fn, n, parts)


def _in_blocks(fn, S: np.ndarray, Y: np.ndarray, rows_per_sample: int, threads: int) -> int:
    """fn(S_block, Y_block) over blocks of the samples (axis 0 of S) and their output rows, in parallel
    threads when the layer is large enough; returns the sum of fn's results. Every output row belongs to
    one sample, so each is summed exactly as in one block (same integers, in the same order)."""
    N = S.shape[0]
    parts = min(threads, N) if S.size * Y.shape[1] >= PARALLEL_MIN_WORK else 1
    return sum(_over_samples(lambda a, b: fn(S[a:b], Y[a * rows_per_sample:b * rows_per_sample]), N, parts))


_WEIGHT_PLANS: dict = {}


def weight_plan(w_int: np.ndarray) -> tuple:
    """(accumulator_dtype, int16_plan) of a weight, remembered while the array lives and is unchanged
    (a copy is compared on every use: an array changed in place is planned anew) -- at batch 1 the
    planning took a quarter of the engine's time."""
    key = id(w_int)
    held = _WEIGHT_PLANS.get(key)
    if held is not None and held[0]() is w_int and np.array_equal(held[1], w_int):
        return held[2], held[3]
    for k in [k for k, v in _WEIGHT_PLANS.items() if v[0]() is None]:
        del _WEIGHT_PLANS[k]
    dtype, plan = accumulator_dtype(w_int), int16_plan(w_int)
    try:
        _WEIGHT_PLANS[key] = (weakref.ref(w_int), w_int.copy(), dtype, plan)
    except TypeError:   # pragma: no cover - not weak-referenceable: not remembered
        pass
    return dtype, plan


def synaptic_conv(S: np.ndarray, w_int: np.ndarray, padding: int, threads: int = 1,
                  out_dtype=INT, bias: Optional[np.ndarray] = None) -> tuple[np.ndarray, int]:
    """Event-driven conv of spikes [N, C, H, W] with integer weights [O, C, k, k], stride 1: `synaptic_conv_peak`
    without the peak."""
    out, adds, _ = synaptic_conv_peak(S, w_int, padding, threads, out_dtype, bias)
    return out, adds


def synaptic_conv_peak(S: np.ndarray, w_int: np.ndarray, padding: int, threads: int = 1, out_dtype=INT,
                       bias: Optional[np.ndarray] = None,
                       packed: Optional[K.EventWeights] = None) -> tuple[np.ndarray, int, Optional[int]]:
    """Event-driven conv of spikes [N, C, H, W] with integer weights [O, C, k, k], stride 1.

    Every input spike (n, c, y, x) adds, for each kernel tap (ky, kx) that lands on an output
    (n, y - ky + p, x - kx + p), the weight column w[:, c, ky, kx] into that output: one pass per tap
    over the events, nothing for the silent inputs. Accumulates in int32 where `accumulator_dtype`
    proves it safe; `threads` split the output rows (the C kernel) or the samples (numpy). Returns
    (out [N, O, H', W'] as out_dtype (int64 by default; int32 only where the caller knows the values fit),
    additions performed = (event, tap) pairs x O, max |out| where the C kernel wrote the whole output
    (else None: the caller measures it)).
    `bias` [O], where given, is added to every output (the caller counts those additions). `packed`: w_int
    packed for the C kernel where the caller holds it (else looked up: `engine_kernels.event_weights`)."""
    N, C, H, W = S.shape
    O, _, k, _ = w_int.shape
    Ho, Wo = H + 2 * padding - k + 1, W + 2 * padding - k + 1
    packed = K.event_weights(w_int) if packed is None else packed
    if packed is not None:     # the C kernel (engine_kernels.conv_events): int16 in registers, int32 rows
        parts = kernel_parts(threads, S.size * O, KERNEL_PARALLEL_MIN_WORK)
        in_kernel = bias is not None and K.bias_fits(packed, bias)
        Y, pairs, peak = K.conv_events(S, packed, padding, parts, bias if in_kernel else None)
        out = Y.reshape(N, Ho, Wo, O).transpose(0, 3, 1, 2).astype(out_dtype, copy=False)
        if bias is not None and not in_kernel:
            out += bias.astype(out.dtype)[None, :, None, None]
            peak = None
        return out, pairs * O, peak
    dtype, plan = weight_plan(w_int)
    Y = np.zeros((N * Ho * Wo, O), dtype=dtype)
    pairs = _in_blocks(lambda s, y: _conv_events(s, w_int, padding, y, plan), S, Y, Ho * Wo, threads)
    # [N, O, H', W'] over memory laid out [N, H', W', O] (no transposing copy; numpy's element-wise
    # operations follow the memory order, and the next synaptic layer reads this layout directly)
    out = Y.reshape(N, Ho, Wo, O).transpose(0, 3, 1, 2).astype(out_dtype, copy=False)
    if bias is not None:
        out += bias.astype(out.dtype)[None, :, None, None]
    return out, pairs * O, None


def _conv_events(S: np.ndarray, w_int: np.ndarray, padding: int, Y: np.ndarray, plan: Optional[list]) -> int:
    """Adds the events of S [N, C, H, W] into Y [N*H'*W', O]; returns the (event, tap) pairs.

    The additions run in int16 (4x the int32 rate): into Y itself where Y is int16, else into an int16
    scratch that is added into Y whenever the next group of events (`int16_plan`) could take it past
    2**15 - 1 -- exact, the same integers as adding into Y directly."""
    N, C, H, W = S.shape
    k = w_int.shape[2]
    Ho, Wo = H + 2 * padding - k + 1, W + 2 * padding - k + 1
    index = np.int32 if max(N * H * W, N * Ho * Wo, C) < 2 ** 31 else np.int64
    # the events in (n, y, x) order -- the order of the output rows n*Ho*Wo + yo*Wo + xo -- as
    # (position n*H*W + y*W + x, channel)
    pos, c = np.divmod(np.flatnonzero(S.transpose(0, 2, 3, 1)).astype(index), C)
    n, yx = np.divmod(pos, H * W)
    y, x = np.divmod(yx, W)
    base = (n * Ho + y) * Wo + x            # the output row of tap (padding, padding)
    del pos, n, yx
    pairs = 0
    if plan is None:         # weights beyond int16: every tap whole, straight into Y
        plan = [[(0, C, None)]] * (k * k)
        scratch, room = Y, None
    else:
        scratch, room = (Y, None) if Y.dtype == np.int16 else (None, np.zeros(Y.shape[1], np.int64))
    for ky in range(k):
        y_ok = None if (ky == padding and Ho == H) else (y >= ky - padding) & (y < Ho + ky - padding)
        for kx in range(k):
            x_ok = None if (kx == padding and Wo == W) else (x >= kx - padding) & (x < Wo + kx - padding)
            offset = (padding - ky) * Wo + (padding - kx)
            ok = x_ok if y_ok is None else (y_ok if x_ok is None else y_ok & x_ok)
            if ok is None:   # every event's tap lands inside the output
                rows, cols = (base + offset) if offset else base, c
            else:
                rows, cols = base[ok] + offset, c[ok]
            for c0, c1, bound in plan[ky * k + kx]:
                if room is not None:             # int16 scratch, emptied into Y before it could overflow
                    if scratch is None:
                        scratch = np.zeros(Y.shape, np.int16)
                    elif (room + bound).max() > I16_MAX:
                        Y += scratch
                        scratch.fill(0)
                        room[:] = 0
                    room += bound
                if c0 == 0 and c1 == C:
                    group_rows, group_cols = rows, cols
                else:
                    sel = (cols >= c0) & (cols < c1)
                    group_rows, group_cols = rows[sel], cols[sel]
                _add_event_rows(scratch, group_rows, group_cols, w_int[:, :, ky, kx].T)
                pairs += group_cols.size
    if room is not None and scratch is not None:
        Y += scratch
    return pairs


def synaptic_linear(S: np.ndarray, w_int: np.ndarray, threads: int = 1,
                    packed: Optional[K.EventWeights] = None) -> tuple[np.ndarray, int]:
    """Event-driven linear layer on spikes [N, C]; returns (out int64 [N, O], additions). `packed`: as
    `synaptic_conv_peak`'s."""
    packed = K.event_weights(w_int) if packed is None else packed
    if packed is not None:     # the event kernel, as a 1x1 convolution of [N, C, 1, 1]
        N, O = S.shape[0], w_int.shape[0]
        parts = kernel_parts(threads, S.size * O, KERNEL_PARALLEL_MIN_WORK)
        Y, events, _ = K.conv_events(S.reshape(N, -1, 1, 1), packed, 0, parts)
        return Y.astype(INT), events * O

    def add(s: np.ndarray, y: np.ndarray) -> int:
        rows, cols = np.nonzero(s)
        _add_event_rows(y, rows, cols, w_int.T)
        return int(rows.size)

    Y = np.zeros((S.shape[0], w_int.shape[0]), dtype=weight_plan(w_int)[0])
    events = _in_blocks(add, S, Y, 1, threads)
    return Y.astype(INT), events * w_int.shape[0]


def dense_conv(x: np.ndarray, w_int: np.ndarray, stride: int, padding: int, threads: int = 1,
               out_dtype=INT, bias: Optional[np.ndarray] = None) -> tuple[np.ndarray, int]:
    """Integer convolution of a real-valued (integer-coded) input: the encoder's MACs.

    Returns (out as out_dtype (int64 by default; int32 only where the caller knows the values fit),
    multiply-accumulates over valid, non-padding taps). Runs in int32 (the C kernel, `threads` splitting
    the output rows) where max |x| times every output's sum of |w| (plus |bias|) stays below 2**31, else in
    int64. `bias` [O], where given, is added to every output (the caller counts those additions)."""
    N, C, H, W = x.shape
    O, _, k, _ = w_int.shape
    macs = int(_valid_taps(H, W, k, stride, padding)) * C * O * N
    if K.dense_conv_fits_int32(x, w_int, bias):
        parts = kernel_parts(threads, macs, DENSE_PARALLEL_MIN_MACS)
        out = K.dense_conv_i32(x, w_int, stride, padding, parts, bias).astype(out_dtype, copy=False)
        return out, macs
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    Ho = (H + 2 * padding - k) // stride + 1
    Wo = (W + 2 * padding - k) // stride + 1
    out = np.zeros((N, O, Ho, Wo), dtype=INT)
    w = w_int.astype(INT)
    for ky in range(k):
        for kx in range(k):
            patch = xp[:, :, ky:ky + stride * Ho:stride, kx:kx + stride * Wo:stride]   # [N, C, Ho, Wo]
            out += np.einsum("nchw,oc->nohw", patch, w[:, :, ky, kx], dtype=INT, optimize=False)
    if bias is not None:
        out += bias.astype(INT)[None, :, None, None]
    return out.astype(out_dtype, copy=False), macs


def grouped_conv(x: np.ndarray, w_int: np.ndarray, stride: int, padding: int, groups: int,
                 bias: Optional[np.ndarray] = None) -> tuple[np.ndarray, int]:
    """Integer convolution of any stride and grouping (V2: the strided downsampling of spikes, the
    depthwise convolutions), int64, exact: per kernel tap, the strided window times that tap's weights,
    group by group. Returns (out [N, O, H', W'] int64, the nonzero (input, tap) pairs x the outputs each
    feeds: the additions an event-driven core performs for spikes)."""
    N, C, H, W = x.shape
    O, Cg, k, _ = w_int.shape
    Og = O // groups
    Ho, Wo = (H + 2 * padding - k) // stride + 1, (W + 2 * padding - k) // stride + 1
    xp = np.pad(x.astype(INT, copy=False), ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    xg = xp.reshape(N, groups, Cg, H + 2 * padding, W + 2 * padding)
    w = w_int.astype(INT).reshape(groups, Og, Cg, k, k)
    out = np.zeros((N, groups, Og, Ho, Wo), dtype=INT)
    events = 0
    for ky in range(k):
        for kx in range(k):
            patch = xg[..., ky:ky + stride * (Ho - 1) + 1:stride, kx:kx + stride * (Wo - 1) + 1:stride]
            out += np.einsum("ngchw,goc->ngohw", patch, w[:, :, :, ky, kx], optimize=False)
            events += int(np.count_nonzero(patch))
    out = out.reshape(N, O, Ho, Wo)
    if bias is not None:
        out += bias.astype(INT)[None, :, None, None]
    return out, events * Og


def _valid_taps(H: int, W: int, k: int, stride: int, padding: int) -> int:
    """Number of (output position, kernel tap) pairs that read a real pixel, not padding."""
    def axis(n):
        outs = (n + 2 * padding - k) // stride + 1
        pos = np.arange(outs)[:, None] * stride + np.arange(k)[None, :] - padding
        return ((pos >= 0) & (pos < n)).sum(axis=1)
    return int(np.outer(axis(H), axis(W)).sum())


def _pool_max(a: np.ndarray, k: int, stride: int, pad: int, fill) -> np.ndarray:
    """Max over k x k windows of [..., H, W] with constant padding `fill` (`engine_kernels.pool_max`)."""
    if a.size:
        return K.pool_max(a, k, stride, pad, fill)
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
    xh = (a.reshape(T, B, C, H * W).transpose(0, 1, 3, 2)
          .reshape(T, B, H * W, heads, C // heads).transpose(0, 1, 3, 2, 4))
    pooled = _pool_max(xh, 3, 1, 1, 0)
    return pooled.transpose(0, 1, 2, 4, 3).reshape(T, B, C, H, W)


def lif_int(X: np.ndarray, theta: np.ndarray, channel_axis: int = 2, membranes: Optional[list] = None,
            out: Optional[np.ndarray] = None):
    """`run.lif.integer_lif` (H = (V + X) >> 1, S = H >= theta, V = H * (1 - S) over T): the C kernel
    (`engine_kernels.lif`) where it is built and no membrane trace is asked for, the numpy steps else
    (the engine's own LIF layers go through `engine_kernels.lif_steps`, traces included).
    Returns (spikes uint8, the largest |H|); the spikes go into `out` where given."""
    if membranes is None and K.compiled_kernels() and X.ndim >= 2 and X.dtype.kind in "iu":
        spikes, peak = K.lif(X, theta, channel_axis)
        if out is None:
            return spikes, peak
        out[...] = spikes
        return out, peak
    return integer_lif(X, theta, channel_axis, membranes, out)


def _lif_parts(X: np.ndarray, threads: int) -> int:
    """How many threads step a LIF of [T, B, ...]: the samples split where the layer is large enough."""
    return min(threads, X.shape[1]) if X.size >= PARALLEL_MIN_NEURONS else 1


def lif_int_parallel(X: np.ndarray, theta: np.ndarray, threads: int):
    """`lif_int` of [T, B, ...] with the samples (axis 1) split over threads where the layer is large
    enough: every neuron's state is its own, so the spikes are the same; the peak is the parts' largest."""
    B = X.shape[1]
    parts = _lif_parts(X, threads)
    if K.compiled_kernels() and X.dtype.kind in "iu":
        return K.lif(X, theta, 2, parts)
    out = np.empty_like(X, dtype=np.uint8)     # X's memory layout, as `lif_int` keeps it
    peaks = _over_samples(lambda a, b: lif_int(X[:, a:b], theta, out=out[:, a:b])[1], B, parts)
    return out, max(peaks)


@dataclass(frozen=True)
class EnginePlan:
    """What the engine derives from a graph once (remembered with `engine_kernels.graph_memo` while the
    graph's integers are unchanged): every node's worst-case bound (`check_engine_bounds`, which refuses a
    graph that could wrap) and the synaptic layers' weights packed for the C kernel (by node name; absent
    where the kernel cannot take them). One comparison of the graph per run checks both (the packed
    weights were a second comparison of every weight before). `patterns`: per node, the per-neuron
    thresholds and grid multipliers its kernels use, per layout, filled as runs meet them (they follow
    from the graph's thresholds and grids, which the same comparison covers)."""
    bounds: dict
    packed: dict
    patterns: dict = field(default_factory=dict)

    def patterns_of(self, name: str) -> dict:
        return self.patterns.setdefault(name, {})


def engine_plan(qg: Graph) -> EnginePlan:
    bounds = check_engine_bounds(qg)
    kinds = {n.name: n.out_kind for n in qg.nodes}
    packed = {}
    for n in qg.nodes:
        event_layer = isinstance(n, Linear) or (isinstance(n, Conv) and n.stride == 1 and n.groups == 1)
        if event_layer and all(kinds.get(i) == SPIKE for i in n.inputs):      # (what _conv, _linear run)
            p = K.pack_event_weights(np.asarray(n.w_int))
            if p is not None:
                packed[n.name] = p
    return EnginePlan(bounds, packed)


@dataclass
class _Run:
    """One engine run: the step and batch sizes, the node bounds, threads, and what it records."""

    T: int
    B: int
    plan: EnginePlan
    threads: int
    membranes: Union[bool, str]      # False, True (H before the reset, int64), "after_reset" (V')
    ops: dict = field(default_factory=dict)
    observed: dict = field(default_factory=dict)
    measured: set = field(default_factory=set)      # nodes whose rule took max |output| itself
    traces: dict = field(default_factory=dict)

    def width(self, name: str, factor: int = 1):
        """int32 where the node's worst case (times factor) stays below 2**31, else int64."""
        return np.int32 if self.plan.bounds.get(name, np.inf) * factor < 2 ** 31 else INT

    def packed(self, name: str) -> Optional[K.EventWeights]:
        """The node's weights packed for the C kernel (None: look them up; and where the kernels are
        absent, as a test makes them, the numpy path)."""
        return self.plan.packed.get(name) if K.compiled_kernels() else None


def _input(n: Input, ins, grids, x, r: _Run):
    return input_integers(n, time_major(x, r.T))


def _conv(n: Conv, ins, grids, x, r: _Run):
    a = ins[0]
    flat = a.reshape((r.T * r.B,) + a.shape[2:])
    if grids[0] is None:
        if n.stride != 1 or n.groups != 1:     # V2's strided and depthwise convolutions of spikes
            out, adds = grouped_conv(flat, n.w_int, n.stride, n.padding, n.groups, bias=n.b_int)
        else:
            out, adds, peak = synaptic_conv_peak(flat, n.w_int, n.padding, r.threads, out_dtype=r.width(n.name),
                                                 bias=n.b_int, packed=r.packed(n.name))
            if peak is not None:       # measured by the kernel as it wrote the output: no pass of its own
                r.observed[n.name] = peak
                r.measured.add(n.name)
        r.ops[n.name] = {"acs": adds, "macs": 0}
    else:
        shift = input_shift(n, grids[0])
        if n.groups == 1 and not np.any(shift):
            out, macs = dense_conv(flat, n.w_int, n.stride, n.padding, r.threads, out_dtype=r.width(n.name),
                                   bias=n.b_int)
        else:   # V2: a current whose channels lie on different grids, or a depthwise convolution of one
            out, _ = grouped_conv(_shift_left(flat.astype(INT), shift, channel_axis=1), n.w_int, n.stride,
                                  n.padding, n.groups, bias=n.b_int)
            H, W = flat.shape[2:]
            macs = _valid_taps(H, W, n.weight_shape[2], n.stride, n.padding) * n.weight_shape[1] * \
                n.weight_shape[0] * flat.shape[0]
        r.ops[n.name] = {"acs": 0, "macs": macs}
    r.ops[n.name]["bias_adds"] = int(out.size)      # added by the kernels, one per output
    return out.reshape((r.T, r.B) + out.shape[1:])


def _linear(n: Linear, ins, grids, x, r: _Run):
    if grids[0] is not None:
        raise DeployError(f"{n.name}: a linear layer reading a current is not supported")
    out, adds = synaptic_linear(ins[0].reshape(r.T * r.B, -1), n.w_int, r.threads, packed=r.packed(n.name))
    out += n.b_int.astype(INT)[None, :]
    r.ops[n.name] = {"acs": adds, "macs": 0, "bias_adds": int(out.size)}
    return out.reshape(r.T, r.B, -1)


def _lif(n: LIF, ins, grids, x, r: _Run):
    if n.tau != 2.0 or n.plif_w not in (None, 0.0):
        raise DeployError(f"{n.name}: the integer LIF needs decay 1/2 (tau = 2); got tau = {n.tau}")
    src_grid = grids[0] if grids[0] is not None else np.zeros(n.shape[0], dtype=INT)
    X = np.asarray(ins[0], dtype=r.width(n.name, 2))
    shift = n.grid - src_grid
    after_reset = r.membranes == AFTER_RESET
    if K.compiled_kernels() and X.dtype.kind in "iu":
        # the shift onto the neuron's grid, the steps, max |x| and the spike count in one pass
        _check_shift(shift)
        trace = None if not r.membranes else "V" if after_reset else "H"
        parts = kernel_parts(r.threads, X.size, KERNEL_PARALLEL_MIN_NEURONS)
        res = K.lif_steps(X, n.theta_int, 2, parts, shift=shift, trace=trace, patterns=r.plan.patterns_of(n.name))
        y, peak, count = res.spikes, max(res.peak_h, res.peak_x), res.count
        if trace is not None:
            r.traces[n.name] = res.trace
    else:
        X = _shift_left(X, shift)
        if r.membranes:
            steps: list = []
            y, peak = lif_int(X, n.theta_int, membranes=steps)
            h = np.stack(steps)
            r.traces[n.name] = np.where(y != 0, 0, h).astype(X.dtype) if after_reset else h
        else:
            y, peak = lif_int_parallel(X, n.theta_int, r.threads)
        peak, count = max(peak, K.abs_max(X)), int(np.count_nonzero(y))
    r.observed[n.name] = peak
    r.ops[n.name] = {"neuron_updates": int(X.size), "spikes": count}
    return y


def _and(n: And, ins, grids, x, r: _Run):
    y = ins[0] & ins[1]
    r.ops[n.name] = {"and": int(y.size)}
    return y


def _orpool(n: OrPool, ins, grids, x, r: _Run):
    a = ins[0]
    y = heads_or_pool_np(a, n.heads) if n.layout == "heads" else _pool_max(a, n.kernel, n.stride, n.padding, 0)
    r.ops[n.name] = {"or_inputs": int(np.count_nonzero(a))}
    return y


def _maxpool(n: MaxPool, ins, grids, x, r: _Run):
    y = _pool_max(ins[0], n.kernel, n.stride, n.padding, np.iinfo(ins[0].dtype).min)
    r.ops[n.name] = {"comparisons": int(y.size) * (n.kernel * n.kernel - 1)}
    return y


def _tokensum(n: TokenSum, ins, grids, x, r: _Run):
    a = ins[0]
    r.ops[n.name] = {"adds": int(np.count_nonzero(a)) if grids[0] is None else int(a.size)}
    return a.reshape(a.shape[:3] + (-1,)).sum(axis=-1, dtype=INT)


def _broadcast(n: Broadcast, ins, grids, x, r: _Run):
    return np.broadcast_to(ins[0][..., None, None], ins[0].shape + tuple(n.shape[1:]))


def _add(n: Add, ins, grids, x, r: _Run):
    if len(ins) == 2 and K.compiled_kernels():      # one pass of the C kernel, the maximum taken with it
        width = r.width(n.name)
        a, b = (np.asarray(v, dtype=width) for v in ins)
        shifts = [n.grid - g for g in grids]
        for shift in shifts:
            _check_shift(shift)
        parts = kernel_parts(r.threads, a.size, KERNEL_PARALLEL_MIN_NEURONS)
        done = K.add_scaled(a, b, shifts[0], shifts[1], 2, parts, r.plan.patterns_of(n.name))
        if done is not None:
            y, r.observed[n.name] = done
            r.measured.add(n.name)
            r.ops[n.name] = {"adds": int(y.size)}
            return y
    y = None
    for a, g in zip(ins, grids):
        term = _shift_left(np.asarray(a, dtype=r.width(n.name)), n.grid - g)
        y = term if y is None else y + term
    r.ops[n.name] = {"adds": int(y.size) * (len(ins) - 1)}
    return y


def heads_layout(a: np.ndarray, heads: int) -> np.ndarray:
    """[T, B, C, H, W] -> [T, B, heads, N, d] (token n = y*W + x, channel c = h*d + i), as
    `models.sdt_v2.to_heads`."""
    T, B, C = a.shape[:3]
    return a.reshape(T, B, heads, C // heads, -1).transpose(0, 1, 2, 4, 3)


def _kv_product(n: KVProduct, ins, grids, x, r: _Run):
    """kv = k^T v per head: one increment per coincidence of a k spike and a v spike at a token (the
    count of additions is the sum of the counts)."""
    k, v = (heads_layout(a, n.heads).astype(INT) for a in ins)
    kv = np.einsum("tbhni,tbhnj->tbhij", k, v, optimize=False)
    r.ops[n.name] = {"acs": int(kv.sum())}
    return kv


def _qkv_product(n: QKVProduct, ins, grids, x, r: _Run):
    """q kv per head, on grid scale_exp: each query spike adds its row of kv (d integers): integer ACs."""
    q = heads_layout(ins[0], n.heads)
    d = q.shape[-1]
    y = np.einsum("tbhni,tbhij->tbhjn", q.astype(INT), ins[1].astype(INT), optimize=False)
    r.ops[n.name] = {"int_acs": int(np.count_nonzero(q)) * d}
    return y.reshape((r.T, r.B) + tuple(n.shape))


def _kd_readout(n: KdReadout, ins, grids, x, r: _Run):
    """head + head_kd on the node's grid less one (the node's grid holds the halving); the host's read-out,
    like `Readout`, not counted."""
    return sum(_shift_left(np.asarray(a, dtype=INT), n.grid - 1 - g) for a, g in zip(ins, grids))


# each node type's integer meaning: fn(node, inputs, their grids, model input, run) -> [T, B, ...] integers
INTEGER_EVAL = {
    Input: _input, Conv: _conv, Linear: _linear, LIF: _lif, And: _and, OrPool: _orpool, MaxPool: _maxpool,
    TokenSum: _tokensum, Broadcast: _broadcast, Add: _add,
    Readout: lambda n, ins, grids, x, r: ins[0],
    KVProduct: _kv_product, QKVProduct: _qkv_product, KdReadout: _kd_readout,
}


def run_engine(qg: Graph, x: np.ndarray, record: bool = True, membranes: Union[bool, str] = False,
               threads: Optional[int] = None, sink=None) -> EngineResult:
    """Run the quantized graph on x ([B, C, H, W] repeated over T, or [B, T, C, H, W] frames). `threads`:
    how many threads add the synaptic events (default: every CPU available; the result is the same).
    `membranes`: each LIF's trace [T, B, ...]: True, H before each step's reset (int64); "after_reset",
    V after it, in the LIF's integer type (what an ONNX file's `v_out` states hold).
    `sink(name, spikes, h)`: with `record`, every spike node's uint8 spikes [T, B, ...] are handed to it as
    the node is computed (with a LIF's trace when `membranes`, else None) instead of kept in the result:
    a verifier compares them and lets them go."""
    if membranes not in (False, True, AFTER_RESET):
        raise ValueError(f"membranes: False, True or {AFTER_RESET!r}, not {membranes!r}")
    threads = default_threads() if threads is None else max(1, int(threads))
    if not qg.meta.get("quantized"):
        raise DeployError("the integer engine runs quantized graphs only")
    T = x.shape[1] if x.ndim == 5 else int(qg.meta["time_steps"])
    r = _Run(T, x.shape[0], K.graph_memo(qg, engine_plan, threads), threads, membranes)
    vals: dict[str, np.ndarray] = {}
    grids: dict[str, Optional[np.ndarray]] = {}
    spikes = {}
    consumers = Counter(i for m in qg.nodes for i in set(m.inputs))      # (linear, not nodes x nodes)
    remaining = {n.name: consumers[n.name] for n in qg.nodes}
    for n in qg.nodes:
        rule = INTEGER_EVAL.get(type(n))
        if rule is None:
            raise DeployError(f"the integer engine has no rule for {n.name} ({n.op})")
        y = rule(n, [vals[i] for i in n.inputs], [grids[i] for i in n.inputs], x, r)
        vals[n.name] = y
        grids[n.name] = n.grid if n.out_kind == CURRENT else None
        if n.out_kind == CURRENT and not isinstance(n, (Input, Readout)) and n.name not in r.measured:
            parts = kernel_parts(r.threads, y.size, KERNEL_PARALLEL_MIN_NEURONS)   # (one pass over memory: a
            r.observed[n.name] = max(r.observed.get(n.name, 0), K.abs_max(y, parts))   # fifth of a run)
        if record and n.out_kind == SPIKE:
            if sink is None:
                spikes[n.name] = np.ascontiguousarray(y, dtype=np.uint8)
            else:
                sink(n.name, np.ascontiguousarray(y, dtype=np.uint8), r.traces.pop(n.name, None))
        for i in n.inputs:
            remaining[i] -= 1
            if remaining[i] == 0 and i != qg.output.name:
                vals.pop(i, None)
    out = qg.output
    logits_int = vals[out.name].astype(INT)
    grid = np.asarray(out.grid)
    per_step = logits_int * np.exp2(-grid.astype(np.float64))
    logits = per_step if (isinstance(out, Readout) and out.mode == "per_step") else per_step.sum(0) / T
    return EngineResult(logits.astype(np.float32), logits_int, grid, spikes, r.ops, r.observed, r.traces)
