"""The integer engine's kernels: pure functions over numpy arrays, each stating what it computes and what
it counts. `sdt_deploy.run.integer_engine` calls them from `synaptic_conv`, `synaptic_linear`, `dense_conv`,
`lif_int`, `lif_int_parallel`, `_lif`, `_add` and `_pool_max`; and, in the same extension, the NIR interpreter's
float64 neuron step (`nir_lif`, the one-pass twin of `run.lif.nir_lif_step`).

The hot loops run in a small C extension, `sdt_deploy.run._engine_kernels` (sdt_deploy/run/_engine_kernels.c,
built by setup.py at install time; plain C over Python buffers, vectorised for AVX-512 / AVX2 where the
CPU has them). `compiled_kernels()` says whether it is there; where it is not (no compiler at install
time), or where a layer's integers fall outside what it handles (a weight beyond int16, a worst-case sum
beyond int32), the callers use numpy instead: the same integers, slower. Nothing here relies on another
library's private internals.

Threads: a kernel given `parts` > 1 splits its work (output rows, samples, or a sample's neurons) over
the extension's own team of threads, which spin for 1 ms between rounds before they sleep
(SDT_ENGINE_SPIN_US), so that a batch-1 layer of 0.1-0.3 ms can use the second core: a round trip costs
about 0.4 us, where a Python thread pool's cost 85 us on the project's VM. `over_parts` (a Python pool)
is left to the numpy path.

Exactness: every kernel computes exact integer sums (the order of additions is free), with widths
checked against worst-case bounds before it runs; the tests compare every result with the engine's
previous implementation and with the quantized torch model.
"""
from __future__ import annotations

import concurrent.futures
import weakref
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

try:
    from . import _engine_kernels as _c
except ImportError:   # pragma: no cover - built without a compiler: numpy kernels
    _c = None

I16_MAX = 2 ** 15 - 1
I32_LIMIT = 2 ** 31
TILES = (32, 64, 128, 256)      # output channels per pass of the event kernel (int16 lanes held in registers)


def compiled_kernels() -> bool:
    """Whether the C kernels were built (tests/test_engine_kernels.py fails loudly where they were not)."""
    return _c is not None


def kernel_isa() -> str:
    """The instruction set the C kernels run with on this CPU ('none' without them)."""
    return _c.isa() if _c is not None else "none"


# ---------------------------------------------------------------------------------------------------
# threads

_POOLS: dict = {}


def over_parts(fn: Callable[[int, int], object], n: int, parts: int) -> list:
    """[fn(a, b)] for the ranges [a, b) that split n items into `parts` near-equal ranges, run on a pool
    of `parts` threads when parts > 1: the engine's numpy path. (The C kernels split their own work, on the
    extension's team of threads, which spin between rounds: a round trip costs about 0.4 us there against
    85 us through this pool.)"""
    parts = max(1, min(int(parts), n))
    if parts <= 1:
        return [fn(0, n)]
    cuts = np.linspace(0, n, parts + 1).astype(int)
    if parts not in _POOLS:
        _POOLS[parts] = concurrent.futures.ThreadPoolExecutor(parts, thread_name_prefix="sdt-engine")
    jobs = [_POOLS[parts].submit(fn, int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:])]
    return [job.result() for job in jobs]


# ---------------------------------------------------------------------------------------------------
# event-driven synaptic layers


@dataclass(frozen=True)
class EventWeights:
    """A weight [O, C, k, k] packed for `conv_events`: per tile of L output channels (zero-padded past O),
    per tap, per input channel, the L weights as int16 (`wt` [tiles, k*k, C, L]); `mag` [tiles, k*k, C]
    is max over the tile's channels of |w| (the int16 accumulators' budget per event); `wsum` [O] the sum
    of |w| over each output's inputs and taps (int64: its worst case, every input spiking)."""
    wt: np.ndarray
    mag: np.ndarray
    wsum: np.ndarray
    L: int
    O: int
    C: int
    k: int


def pack_event_weights(w_int: np.ndarray) -> Optional[EventWeights]:
    """`EventWeights` of a conv weight [O, C, k, k] (or a linear weight [O, C]), or None where the C kernel
    cannot take it exactly: no C kernels, a weight beyond int16, or an output whose worst case (every
    input spiking: the sum of |w| over its inputs and taps) reaches 2**31 (its int32 row would overflow)."""
    if _c is None:
        return None
    w = w_int.reshape(w_int.shape[0], w_int.shape[1], -1)
    O, C, taps = w.shape
    k = int(round(taps ** 0.5))
    if k * k != taps or O == 0:
        return None
    a = np.abs(w.astype(np.int64))
    wsum = a.reshape(O, -1).sum(axis=1)
    if a.max(initial=0) > I16_MAX or wsum.max(initial=0) >= I32_LIMIT:
        return None
    L = next((t for t in TILES if t >= O), TILES[-1])
    tiles = -(-O // L)
    wt = np.zeros((tiles * L, taps, C), np.int16)
    wt[:O] = w.transpose(0, 2, 1)
    wt = aligned_copy(wt.reshape(tiles, L, taps, C).transpose(0, 2, 3, 1))
    mag = np.zeros((tiles * L, taps, C), np.int32)
    mag[:O] = a.transpose(0, 2, 1)
    mag = np.ascontiguousarray(mag.reshape(tiles, L, taps, C).max(axis=1))
    return EventWeights(wt, mag, wsum, L, O, C, k)


def aligned_copy(a: np.ndarray, alignment: int = 64) -> np.ndarray:
    """A C-contiguous copy of a starting on an `alignment`-byte boundary (a 64-byte vector load from a
    row that straddles two cache lines costs two: measured 1.5x on the event kernel)."""
    raw = np.empty(a.nbytes + alignment, np.uint8)
    start = -raw.ctypes.data % alignment
    out = raw[start:start + a.nbytes].view(a.dtype).reshape(a.shape)
    np.copyto(out, a)
    return out


SPLIT_COMPARE_BYTES = 1 << 16     # arrays from this size on are compared on `parts` threads


def same_array(a: np.ndarray, b: np.ndarray, parts: int = 1) -> bool:
    """Whether two arrays hold the same values (same dtype and shape): one memcmp where both are
    C-contiguous (the C kernels; a large array's bytes split over `parts` threads), np.array_equal
    otherwise."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if _c is not None and a.flags.c_contiguous and b.flags.c_contiguous:
        return bool(_c.same_bytes(a, b, parts if a.nbytes >= SPLIT_COMPARE_BYTES else 1))
    return bool(np.array_equal(a, b))


_PACKED: dict = {}


def event_weights(w_int: np.ndarray) -> Optional[EventWeights]:
    """`pack_event_weights`, remembered while the array lives and is unchanged (a copy is compared on
    every use: an array changed in place is packed anew)."""
    if _c is None:
        return None
    key = id(w_int)
    held = _PACKED.get(key)
    if held is not None and held[0]() is w_int and same_array(held[1], w_int):
        return held[2]
    for k in [k for k, v in _PACKED.items() if v[0]() is None]:
        del _PACKED[k]
    packed = pack_event_weights(w_int)
    try:
        _PACKED[key] = (weakref.ref(w_int), w_int.copy(), packed)
    except TypeError:   # pragma: no cover - not weak-referenceable: not remembered
        pass
    return packed


_GRAPH_FIELDS = ("w_int", "b_int", "theta_int", "grid")


def _graph_snapshot(qg) -> tuple:
    """What a graph-wide computation over the integers reads: per node its type, name, inputs, shape,
    output kind, input bits and (copied) integer arrays; the graph's cut bound."""
    nodes = []
    for n in qg.nodes:
        arrays = tuple(None if getattr(n, f, None) is None else np.array(getattr(n, f), copy=True)
                       for f in _GRAPH_FIELDS)
        nodes.append((type(n), n.name, tuple(n.inputs), tuple(n.shape), n.out_kind, getattr(n, "bits", None), arrays))
    cut = qg.meta.get("cut_bound")
    return tuple(nodes), (None if cut is None else np.array(cut, copy=True))


def _same_snapshot(qg, held: tuple, parts: int = 1) -> bool:
    nodes, cut = held
    if len(nodes) != len(qg.nodes):
        return False
    for n, (typ, name, inputs, shape, kind, bits, arrays) in zip(qg.nodes, nodes):
        if type(n) is not typ or n.name != name or tuple(n.inputs) != inputs or tuple(n.shape) != shape \
                or n.out_kind != kind or getattr(n, "bits", None) != bits:
            return False
        for f, a in zip(_GRAPH_FIELDS, arrays):
            v = getattr(n, f, None)
            if (v is None) != (a is None) or (v is not None and not same_array(np.asarray(v), a, parts)):
                return False
    now = qg.meta.get("cut_bound")
    return (now is None) == (cut is None) and (now is None or same_array(np.asarray(now), cut))


_GRAPH_MEMO: dict = {}


def graph_memo(qg, fn: Callable, parts: int = 1):
    """fn(qg), remembered per graph (and per fn) while the graph lives and the integers, grids, bits and
    structure fn can read are unchanged -- compared with a copy on every use (one memcmp per array:
    ~30x cheaper than the engine's bit analysis of CIFAR 2-256, which took a fifth of a batch-1 run).
    `parts` threads compare the large arrays (the graph's weights are read from memory, not cache, when
    another model ran in between: 0.68 against 0.49 ms for CIFAR 2-256's 2.75 MB). Exceptions are not
    remembered."""
    key = (id(qg), fn)
    held = _GRAPH_MEMO.get(key)
    if held is not None and held[0]() is qg and _same_snapshot(qg, held[1], parts):
        return held[2]
    for k in [k for k, v in _GRAPH_MEMO.items() if v[0]() is None]:
        del _GRAPH_MEMO[k]
    value = fn(qg)
    try:
        _GRAPH_MEMO[key] = (weakref.ref(qg), _graph_snapshot(qg), value)
    except TypeError:   # pragma: no cover - not weak-referenceable: not remembered
        pass
    return value


def spikes_channel_last(S: np.ndarray) -> np.ndarray:
    """Spikes [N, C, H, W] as a C-contiguous uint8 array [N, H, W, C] (nonzero = spike): a view where the
    memory is already laid out so (the engine's synaptic layers write that layout), else a copy."""
    v = S.transpose(0, 2, 3, 1)
    if v.dtype == np.bool_:
        v = v.view(np.uint8)
    elif v.dtype != np.uint8:
        v = v != 0
        v = v.view(np.uint8)
    return np.ascontiguousarray(v)


def bias_fits(pw: EventWeights, bias: np.ndarray) -> bool:
    """Whether every output's worst case plus its bias stays below 2**31 (the kernel may add the bias)."""
    return _kernel_bias(pw, bias) is not None


_BIASES: dict = {}


def _kernel_bias(pw: EventWeights, bias: Optional[np.ndarray]) -> Optional[np.ndarray]:
    """The bias as the kernel takes it (int32, zero-padded to the tiles; zeros where None), or None where
    an output's worst case plus its bias could reach 2**31; remembered per (weights, bias) while the bias
    array lives and is unchanged (compared with a copy)."""
    if bias is None:
        return np.zeros(pw.wt.shape[0] * pw.L, np.int32)
    key = (id(pw), id(bias))
    held = _BIASES.get(key)
    if held is not None and held[0]() is bias and held[1]() is pw and same_array(held[2], bias):
        return held[3]
    if len(_BIASES) > 4096:
        _BIASES.clear()
    b = np.asarray(bias).astype(np.int64)
    fits = b.shape == (pw.O,) and int((pw.wsum + np.abs(b)).max(initial=0)) < I32_LIMIT
    b32 = None
    if fits:
        b32 = np.zeros(pw.wt.shape[0] * pw.L, np.int32)
        b32[:pw.O] = b
    try:
        _BIASES[key] = (weakref.ref(bias), weakref.ref(pw), np.array(bias, copy=True), b32)
    except TypeError:   # pragma: no cover
        pass
    return b32


def conv_events(S: np.ndarray, pw: EventWeights, padding: int, parts: int = 1,
                bias: Optional[np.ndarray] = None) -> tuple[np.ndarray, int]:
    """Event-driven stride-1 convolution of spikes S [N, C, H, W] (nonzero = spike) with the packed weight
    `pw` ([O, C, k, k] integers): returns (Y int32 [N * H' * W', O], rows in (n, y', x') order; the
    number of (event, tap) pairs; max |Y|, taken as Y is written).

    Computes Y[(n, y', x'), o] = bias[o] + the sum over the taps (ky, kx) and the channels c that spiked
    at the input (n, y' + ky - p, x' + kx - p) inside the input of w[o, c, ky, kx]: exactly the weight
    columns of the spikes, nothing for silent inputs or padding; the bias (where given; the caller checks
    `bias_fits`) is one addition per output, on writing it. Counted: the (event, tap) pairs whose output lies inside
    the output (padding excluded) -- each one's O additions are the layer's ACs (pairs x O). Executed: the
    same additions, O rounded up to the tile width L (32, 64, 128 or 256 channels; padded lanes add 0),
    in int16 held in registers, emptied into an int32 row before an event could take a lane past
    2**15 - 1 (budget: the sum of the events' max |w| over the tile): exact. `parts` threads (the C
    kernels' team) split the input positions' event lists, then the output rows (n, y'): each output is
    summed by one thread, as on one, so the integers are the same."""
    N, C, H, W = S.shape
    if C != pw.C:
        raise ValueError(f"conv_events: {C} input channels, the weight has {pw.C}")
    Ho, Wo = H + 2 * padding - pw.k + 1, W + 2 * padding - pw.k + 1
    Sc = spikes_channel_last(S)
    Y = np.empty((N * Ho * Wo, pw.O), np.int32)
    b32 = _kernel_bias(pw, bias)
    if b32 is None:
        raise ValueError("conv_events: the bias could take an output past int32 (check bias_fits first)")

    pairs, peak = _c.conv_events(Sc, N, H, W, C, pw.k, padding, pw.wt, pw.mag, pw.L, pw.O, b32, Y, max(1, parts))
    return Y, int(pairs), int(peak)


# ---------------------------------------------------------------------------------------------------
# integer LIF


def memory_layout(X: np.ndarray, channel_axis: int):
    """(Xp, perm, B): X [T, ...] viewed in its memory order, T first, the permutation used, and B, the
    number of samples (the outermost axis after T, where it is not the channel axis; else 1: the whole
    step one sample); None where that view is not C-contiguous."""
    perm = [0] + sorted(range(1, X.ndim), key=lambda a: -abs(X.strides[a]))
    Xp = X.transpose(perm)
    if not Xp.flags.c_contiguous:
        return None
    return Xp, perm, Xp.shape[1] if X.ndim >= 3 and perm[1] != channel_axis else 1


def lif_layout(X: np.ndarray, channel_axis: int):
    """`memory_layout` of X as int32 / int64, X copied to C order (other integer types as int64) where
    it is not a permuted C-contiguous array of one of those."""
    held = memory_layout(X, channel_axis) if X.dtype in (np.int32, np.int64) else None
    if held is None:
        X = np.ascontiguousarray(X, dtype=X.dtype if X.dtype in (np.int32, np.int64) else np.int64)
        held = memory_layout(X, channel_axis)
    return held


def lif(X: np.ndarray, theta: np.ndarray, channel_axis: int, parts: int = 1) -> tuple[np.ndarray, int]:
    """Integer LIF over the T steps of axis 0 (int32 or int64 X; other integer types as int64), thresholds
    per channel along `channel_axis`: H = (V + X[t]) >> 1 (arithmetic shift: floor), S = H >= theta,
    V = H * (1 - S), V starting at 0. Returns (spikes uint8, X's shape, laid out in memory as X is; the
    largest |H|). The caller guarantees |V + X| fits X's type (`bits`: twice the node's bound). Counts
    nothing (the engine counts one neuron update per element of X). `parts` threads split the samples,
    or every sample's neurons where there are fewer samples than parts (every neuron's state is its own:
    the same spikes)."""
    r = lif_steps(X, theta, channel_axis, parts)
    return r.spikes, r.peak_h


@dataclass(frozen=True)
class LIFSteps:
    """What `lif_steps` gives: the spikes (uint8, X's shape, laid out in memory as X is), the largest |H|
    and the largest |x| (the input on the neuron's grid), the number of spikes, and the trace asked for."""
    spikes: np.ndarray
    peak_h: int
    peak_x: int
    count: int
    trace: Optional[np.ndarray]


def lif_steps(X: np.ndarray, theta: np.ndarray, channel_axis: int, parts: int = 1, shift: Optional[np.ndarray] = None,
              trace: Optional[str] = None, patterns: Optional[dict] = None) -> LIFSteps:
    """`lif` on x = X * 2**shift (per channel, shift >= 0: the input brought onto the neuron's grid, as the
    engine's `_shift_left`; None: x = X), in one pass that also gives the largest |x| and the number of
    spikes (each a pass of its own before: about 50 ms of a 216 ms profiled run, the 5 % model of CIFAR 2-256
    at batch 32 on two threads). `trace`: None, "H"
    (every H before the reset, int64) or "V" (every V after it, X's type). The caller guarantees that
    x and V + x fit X's type. `patterns`: a dict the caller keeps while theta and shift are unchanged (the
    engine: per node, with its plan), where the per-neuron thresholds and multipliers are kept per layout
    (building them was about a third of a batch-1 LIF's 35 us)."""
    Xp, perm, B = lif_layout(X, channel_axis)
    T = Xp.shape[0]
    per_sample = X.ndim >= 3 and perm[1] != channel_axis
    key = ("lif", X.shape, tuple(perm), Xp.dtype.char, per_sample)
    kept = None if patterns is None else patterns.get(key)
    if kept is None:
        kept = (_theta_pattern(theta, X.shape, perm, Xp.dtype, channel_axis, per_sample),
                _multipliers(shift, X.shape, perm, Xp.dtype, channel_axis, per_sample))
        _keep(patterns, key, kept)
    pattern, mult = kept
    P = pattern.size
    out = np.empty(Xp.shape, np.uint8)
    H = np.empty(Xp.shape if trace == "H" else 0, np.int64)
    VT = np.empty(Xp.shape if trace == "V" else 0, Xp.dtype)
    peak_h, peak_x, count = _c.lif(Xp, pattern, mult, out, H, VT, Xp.itemsize, T, B, P, max(1, parts)) \
        if Xp.size else (0, 0, 0)
    inverse = [0] * len(perm)
    for i, p in enumerate(perm):
        inverse[p] = i
    held = {"H": H, "V": VT}.get(trace)
    return LIFSteps(out.transpose(inverse), int(peak_h), int(peak_x), int(count),
                    None if held is None else held.transpose(inverse))


def _channel_pattern(values: np.ndarray, shape: tuple, perm: list, dtype, channel_axis: int, per_sample: bool):
    """Per-channel `values` for every neuron of one sample (per_sample) or of one whole step, in the memory
    order `perm` of an X of `shape`, as a contiguous array of `dtype`."""
    th_shape = [1] * (len(shape) - 1)
    th_shape[channel_axis - 1] = -1
    th = np.broadcast_to(values.astype(dtype).reshape(th_shape), shape[1:]).transpose([p - 1 for p in perm[1:]])
    return np.ascontiguousarray(th[0] if per_sample else th)


def _multipliers(shift: Optional[np.ndarray], shape: tuple, perm: list, dtype, channel_axis: int, per_sample: bool):
    """`_channel_pattern` of 2**shift, or an empty array where nothing is shifted (the kernels' "none")."""
    if shift is None or not np.any(shift):
        return np.empty(0, dtype)
    return _channel_pattern(np.left_shift(1, np.asarray(shift, dtype=np.int64)), shape, perm, dtype, channel_axis,
                            per_sample)


def _keep(patterns: Optional[dict], key: tuple, value) -> None:
    """value kept in the caller's `patterns` under key (a layout: one per batch size met, at most 16)."""
    if patterns is not None:
        if len(patterns) >= 16:
            patterns.clear()
        patterns[key] = value


_PATTERNS: dict = {}


def _theta_pattern(theta: np.ndarray, shape: tuple, perm: list, dtype, channel_axis: int, per_sample: bool):
    """`_channel_pattern` of the thresholds, remembered per theta array while it lives and is unchanged
    (compared with a copy)."""
    key = (id(theta), shape, tuple(perm), np.dtype(dtype).char, channel_axis, per_sample)
    held = _PATTERNS.get(key)
    if held is not None and held[0]() is theta and same_array(held[1], theta):
        return held[2]
    if len(_PATTERNS) > 4096:
        _PATTERNS.clear()
    pattern = _channel_pattern(theta, shape, perm, dtype, channel_axis, per_sample)
    try:
        _PATTERNS[key] = (weakref.ref(theta), theta.copy(), pattern)
    except TypeError:   # pragma: no cover
        pass
    return pattern


# ---------------------------------------------------------------------------------------------------
# the residual addition


def add_scaled(a: np.ndarray, b: np.ndarray, shift_a: np.ndarray, shift_b: np.ndarray, channel_axis: int,
               parts: int = 1, patterns: Optional[dict] = None) -> Optional[tuple[np.ndarray, int]]:
    """(y, max |y|) for y = a * 2**shift_a + b * 2**shift_b (per channel along `channel_axis`, shifts >= 0:
    the engine's residual addition on the node's grid), [T, B, ...] int32 or int64 arrays of one type, shape
    and memory layout, in one pass of the C kernel that also takes the maximum (three passes in numpy, and
    a fourth for the maximum). y has a's layout and type; the caller guarantees it fits the type (each term
    may not: the kernel adds in int64). None where the kernel cannot take the arrays (the caller uses numpy).
    `parts` threads split the rows; `patterns`: as `lif_steps`'."""
    if _c is None or a.dtype != b.dtype or a.dtype not in (np.int32, np.int64) or a.shape != b.shape or a.ndim < 3:
        return None
    layout = memory_layout(a, channel_axis)
    if layout is None:
        return None
    ap, perm, B = layout
    bp = b.transpose(perm)
    if not bp.flags.c_contiguous:           # not laid out as a (strides of length-1 axes do not matter)
        return None
    per_sample = perm[1] != channel_axis
    key = ("add", a.shape, tuple(perm), ap.dtype.char, per_sample)
    kept = None if patterns is None else patterns.get(key)
    if kept is None:
        kept = tuple(_multipliers(s, a.shape, perm, ap.dtype, channel_axis, per_sample) for s in (shift_a, shift_b))
        _keep(patterns, key, kept)
    rows = a.shape[0] * B
    P = ap.size // rows if rows else 0
    out = np.empty(ap.shape, ap.dtype)
    peak = _c.add_scaled(ap, bp, kept[0], kept[1], out, ap.itemsize, rows, P, max(1, parts)) if a.size else 0
    inverse = [0] * len(perm)
    for i, p in enumerate(perm):
        inverse[p] = i
    return out.transpose(inverse), int(peak)


# ---------------------------------------------------------------------------------------------------
# the encoder's dense convolution


def dense_conv_fits_int32(x: np.ndarray, w_int: np.ndarray, bias: Optional[np.ndarray] = None) -> bool:
    """Whether every partial sum of `dense_conv_i32` fits int32: max |x| times an output channel's sum of
    |w| over its inputs and taps, plus |bias|, below 2**31 for every channel (and the C kernels present)."""
    if _c is None or x.size == 0:
        return False
    xmax = max(int(x.max()), -int(x.min()))
    wsum = np.abs(w_int.astype(np.int64)).reshape(w_int.shape[0], -1).sum(axis=1)
    b = np.zeros_like(wsum) if bias is None else np.abs(bias.astype(np.int64))
    if xmax >= I32_LIMIT or int(wsum.max(initial=0)) * xmax >= I32_LIMIT:
        return False
    return int((wsum * xmax + b).max(initial=0)) < I32_LIMIT


def dense_conv_i32(x: np.ndarray, w_int: np.ndarray, stride: int, padding: int, parts: int = 1,
                   bias: Optional[np.ndarray] = None) -> np.ndarray:
    """Dense integer convolution of x [N, C, H, W] (integers) with w [O, C, k, k]: out [N, O, H', W'] int32
    (laid out channel-last in memory, as the synaptic layers' outputs), out[n, o, y, x] = bias[o] (0 where
    not given; one addition per output) + the sum over c and the taps inside the input of
    w[o, c, ky, kx] * x[n, c, y*s + ky - p, x*s + kx - p]. The caller checks `dense_conv_fits_int32`
    (with the same bias) first. Counts nothing (the engine counts a multiply-accumulate per valid tap,
    C x O per output position); executes exactly those. `parts` threads split the output rows."""
    N, C, H, W = x.shape
    O, _, k, _ = w_int.shape
    Ho, Wo = (H + 2 * padding - k) // stride + 1, (W + 2 * padding - k) // stride + 1
    xc = np.ascontiguousarray(x, dtype=np.int32)
    wc = np.ascontiguousarray(w_int.transpose(2, 3, 1, 0), dtype=np.int32)      # [k, k, C, O]
    out = np.empty((N, Ho, Wo, O), np.int32)
    b32 = np.zeros(O, np.int32) if bias is None else np.ascontiguousarray(bias, dtype=np.int32)
    if N:
        _c.dense_conv(xc, wc, b32, out, N, C, H, W, O, k, stride, padding, max(1, parts))
    return out.transpose(0, 3, 1, 2)


def memory_order(a: np.ndarray) -> Optional[np.ndarray]:
    """a's axes permuted into its memory order (outermost first), where that is a C-contiguous array
    (a transposed view of one, as the engine's layers hand over); else None."""
    v = a.transpose(sorted(range(a.ndim), key=lambda i: -abs(a.strides[i])))
    return v if v.flags.c_contiguous else None


def abs_max(a: np.ndarray, parts: int = 1) -> int:
    """max |a| as a Python int, exact at the type's minimum too: one pass of the C kernel over int32 /
    int64 arrays in their memory order (split in `parts` stretches on as many threads: the maximum of
    their maxima is the same), numpy's max and min otherwise."""
    if a.size == 0:
        return 0
    if _c is not None and a.dtype in (np.int32, np.int64):
        v = a if a.flags.c_contiguous else memory_order(a)
        if v is not None:
            return int(_c.abs_max(v.reshape(-1), a.itemsize, max(1, parts)))
    return max(int(a.max()), -int(a.min()))


# ---------------------------------------------------------------------------------------------------
# pools


def pool_max(a: np.ndarray, k: int, stride: int, pad: int, fill) -> np.ndarray:
    """Max over k x k windows (stride, padding `pad` of value `fill`) of the last two axes of a: the
    maximum of the window's values and, where the window reaches into the padding, `fill`. Separable: the
    maximum over the window's columns first, then over its rows (2k passes instead of k*k), no padded
    copy, the result laid out in memory as `a`; arrays [..., C, H, W] over channel-last memory (what the
    synaptic layers and the LIFs write) in one pass of the C kernel, channel rows at a time. Counts
    nothing (the engine counts per output, as before)."""
    H, W = a.shape[-2:]
    Ho, Wo = (H + 2 * pad - k) // stride + 1, (W + 2 * pad - k) // stride + 1
    if _c is not None and a.ndim >= 3 and a.dtype in (np.uint8, np.int32, np.int64) and a.size:
        lead = list(range(a.ndim - 3))
        v = a.transpose(lead + [a.ndim - 2, a.ndim - 1, a.ndim - 3])     # [..., H, W, C]
        info = np.iinfo(a.dtype)
        if v.flags.c_contiguous and info.min <= fill <= info.max:         # channel-last memory: the C kernel
            C = a.shape[-3]
            out = np.empty(a.shape[:-3] + (Ho, Wo, C), a.dtype)
            _c.pool_max(v, out, a.itemsize, int(fill), int(np.prod(a.shape[:-3])), H, W, C, k, stride, pad)
            return out.transpose(lead + [a.ndim - 1, a.ndim - 3, a.ndim - 2])
    return _max_along(_max_along(a, a.ndim - 1, W, Wo, k, stride, pad, fill), a.ndim - 2, H, Ho, k, stride, pad, fill)


def _max_along(src: np.ndarray, axis: int, n: int, n_out: int, k: int, stride: int, pad: int, fill) -> np.ndarray:
    """Windowed max along one axis: out[o] = max(src[o*stride + t - pad] for t < k inside [0, n), and fill
    where a window reaches outside)."""
    def at(arr, sl):
        idx = [slice(None)] * arr.ndim
        idx[axis] = sl
        return arr[tuple(idx)]

    shape = list(src.shape)
    shape[axis] = n_out
    out = np.empty_like(src, shape=shape)
    started = np.zeros(n_out, bool)
    for t in range(k):
        o0 = max(0, -(-(pad - t) // stride))             # outputs whose input o*stride + t - pad is in [0, n)
        o1 = min(n_out, (n - 1 - t + pad) // stride + 1)
        if o1 <= o0:
            continue
        i0 = o0 * stride + t - pad
        win = at(src, slice(i0, i0 + (o1 - o0 - 1) * stride + 1, stride))
        dst = at(out, slice(o0, o1))
        new = ~started[o0:o1]
        if not new.any():
            np.maximum(dst, win, out=dst)
        elif new.all():
            np.copyto(dst, win)
        else:   # the first outputs this tap reaches: its value; the others: the maximum so far
            m = new.reshape([-1 if d == axis else 1 for d in range(out.ndim)])
            np.copyto(dst, win, where=m)
            np.maximum(dst, win, out=dst, where=~m)
        started[o0:o1] = True
    edge = (np.arange(n_out) * stride - pad < 0) | (np.arange(n_out) * stride - pad + k - 1 >= n)
    if edge.any():   # windows that reach into the padding take `fill` into their maximum
        idx = [slice(None)] * out.ndim
        idx[axis] = np.flatnonzero(edge & ~started)
        out[tuple(idx)] = fill
        idx[axis] = np.flatnonzero(edge & started)
        out[tuple(idx)] = np.maximum(out[tuple(idx)], np.asarray(fill, dtype=out.dtype))
    return out


# ---------------------------------------------------------------------------------------------------
# the NIR interpreter's neuron (float64; not the engine's, but the same extension)


@dataclass(frozen=True)
class NIRLIFGroups:
    """A NIR neuron's parameters (`run.lif.NIRLIFParameters`) for `nir_lif`: each as G float64 values, one
    per run of P consecutive neurons of the layer (a per-channel threshold of [C, H, W] neurons: G = C,
    P = H * W; the same value everywhere: G = 1)."""
    gain: np.ndarray
    r: np.ndarray
    v_leak: np.ndarray
    v_threshold: np.ndarray
    v_reset: np.ndarray
    P: int
    leaky: bool
    fires: bool


def _constant_run(value, shape: tuple) -> int:
    """The neurons (of a layer of `shape`) over which `value`, broadcast to it, is constant by its shape:
    the product of the trailing dims it does not vary over."""
    a = np.asarray(value)
    dims = (1,) * (len(shape) - a.ndim) + a.shape
    run = 1
    for n, d in zip(reversed(shape), reversed(dims)):
        if d != 1:
            break
        run *= n
    return run


def nir_lif_groups(p, shape: tuple) -> Optional[NIRLIFGroups]:
    """`p` (NIRLIFParameters) for `nir_lif` on a layer of neurons `shape` (no batch), or None without the C
    kernels or where a parameter does not broadcast to the layer."""
    if _c is None:
        return None
    values = (p.gain, p.r, p.v_leak, 0.0 if p.v_threshold is None else p.v_threshold, p.v_reset)
    try:
        full = [np.broadcast_to(np.asarray(v, dtype=np.float64), shape) for v in values]
    except ValueError:
        return None
    n = int(np.prod(shape))
    P = min(_constant_run(v, shape) for v in values) if n else 1
    G = n // P if P else 0
    groups = [np.ascontiguousarray(f.reshape(-1)[::P][:G]) for f in full]
    return NIRLIFGroups(*groups, P=P, leaky=bool(p.leaky), fires=p.v_threshold is not None)


def nir_lif(i: np.ndarray, v: Optional[np.ndarray], g: NIRLIFGroups):
    """`run.lif.nir_lif_step` in one pass (the C kernel, the same float64 operations in the same order):
    (output, V', H) for the input current i [B, *shape] (float64) and the state v (None: at rest)."""
    i = np.ascontiguousarray(i, dtype=np.float64)
    B = i.shape[0]
    G = (i.size // B // g.P) if B and g.P else 0
    h = np.empty_like(i)
    empty = np.empty(0, np.float64)
    vin = empty if v is None else np.ascontiguousarray(v, dtype=np.float64)
    if not g.fires:
        _c.nir_lif(i, vin, h, empty, np.empty(0, np.uint8), g.gain, g.r, g.v_leak, g.v_threshold, g.v_reset,
                   B, G, g.P, g.leaky, False)
        return h, h, h
    s = np.empty(i.shape, np.bool_)
    v_next = np.empty_like(i)
    _c.nir_lif(i, vin, h, v_next, s.view(np.uint8), g.gain, g.r, g.v_leak, g.v_threshold, g.v_reset,
               B, G, g.P, g.leaky, True)
    return s, v_next, h
