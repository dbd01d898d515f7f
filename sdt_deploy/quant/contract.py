"""Dyadic quantization of a folded deploy graph, and the quantized PyTorch model built from it.

The numeric contract (DESIGN.md §4):

- weights: per output channel, `w = w_int * 2**-e`, `w_int` a signed `weight_bits` integer (narrow
  range), the power-of-two scale chosen by brevitas' fixed-point quantizer — by default the
  MSE-minimising one (`Int8WeightPerChannelFixedPointMSE`: it compares candidate radix points and keeps
  the one with the least squared error), or the max-based one (`--scale-search max`: the smallest power
  of two that holds the channel's largest weight, then round-to-nearest);
- biases: rounded once onto their channel's output grid `2**-(e + input grid)` (integers of any width);
- the input: rounded (half to even) onto `2**-g_in` and saturated to `input_bits`; `g_in` is the finest
  grid on which the expected input range fits (from the data's mean/std for images, integers for events);
- every current then is an integer on a known per-channel grid. Where currents meet in one membrane (the
  residual stream, the MLP's inner residual) the sum is taken on the finest of the contributors' grids:
  coarser contributions are shifted left — exact, never rounded a second time;
- each LIF keeps its state on the grid of its input, refined where needed so that its threshold is an
  integer there (`talking_heads_lif`'s 0.5 needs one fractional bit);
- the head's mean over the H*W tokens becomes a sum with `head_lif`'s threshold multiplied by H*W
  (exact, where dividing by H*W is not unless H*W is a power of two);
- PLIF: a trained decay 1/tau = sigmoid(w) is not dyadic, and only a decay of exactly 1/2 keeps the
  floor-state integer LIF exact (floor((floor(a)+n)/2) = floor((a+n)/2) has no analogue for other
  decays). The quantizer therefore sets every PLIF decay to 1/2 (w = 0, tau = 2) and records each
  layer's trained tau in `meta["plif_tau"]`; `verify --reference float` measures what that costs.
"""
from __future__ import annotations

import collections
import contextlib
import ctypes
import functools
import math
import os
import warnings
from dataclasses import dataclass, field, replace
from typing import Iterable, Optional

import numpy as np
import torch

from sdt_deploy.quant.brevitas_import import import_brevitas
from sdt_deploy.files.configs import DataConfig
from sdt_deploy.errors import DeployError
from sdt_deploy.ir.graph import (CURRENT, Add, Conv, Graph, Input, LIF, Linear, MaxPool, Readout, SpatialMean, TokenSum)

SCALE_SEARCHES = ("mse", "max")


@dataclass(frozen=True)
class QuantOptions:
    weight_bits: int = 8
    input_bits: int = 8
    scale_search: str = "mse"
    input_range: Optional[float] = None     # largest |input| to represent; default from `data`
    data: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self):
        for name in ("weight_bits", "input_bits"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 2 <= v <= 8:
                raise DeployError(f"--{name.replace('_', '-')} must be an integer from 2 to 8, got {v!r}")
        if self.scale_search not in SCALE_SEARCHES:
            raise DeployError(f"--scale-search must be one of {', '.join(SCALE_SEARCHES)}, got {self.scale_search!r}")
        if self.input_range is not None and not (math.isfinite(self.input_range) and self.input_range > 0):
            raise DeployError(f"--input-range must be a positive number, got {self.input_range!r}")


# ---------------------------------------------------------------- weights (brevitas)

def _brevitas_quantizer(search: str):
    import_brevitas()
    from brevitas.quant.fixed_point import Int8WeightPerChannelFixedPoint, Int8WeightPerChannelFixedPointMSE

    return Int8WeightPerChannelFixedPointMSE if search == "mse" else Int8WeightPerChannelFixedPoint


@contextlib.contextmanager
def _torch_threads(n: int):
    """torch's intra-op threads set to n for the block. The quantizer's tensors are small (a block of
    one layer) and its operations many: measured on a 2-core machine under load, 2 threads made
    brevitas' MSE search 6x slower than 1 (OpenMP workers waiting for a core); on the idle machine 2
    were 1.45x faster. One is the predictable choice; the results do not depend on it (checked)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _distinct_scale_slots(scales: np.ndarray, mask: np.ndarray) -> list:
    """Slots of candidate rows, [C] each: for every channel (column), the first masked row of each of
    its distinct masked scales appears in one slot, largest scale first (a channel with fewer repeats
    its last; one with none has -1 throughout)."""
    remaining, columns, slots = mask.copy(), np.arange(scales.shape[1]), []
    while remaining.any():
        big = np.where(remaining, scales, -np.inf).max(axis=0)
        rows = np.where(remaining.any(axis=0), (remaining & (scales == big[None, :])).argmax(axis=0), -1)
        if slots:
            rows = np.where(rows >= 0, rows, slots[-1])
        slots.append(rows)
        taken = rows >= 0
        remaining &= ~((scales == scales[np.maximum(rows, 0), columns][None, :]) & taken[None, :])
    return slots


def _prune_mse_grid_search(proxy) -> None:
    """Make brevitas' MSE scale search evaluate only the power-of-two scales that can win.

    brevitas' grid search (`mse_grid_search`, 20 candidates between absmax/20 and absmax) quantizes
    the whole weight tensor once per candidate, but with a power-of-two restriction the 20 candidates
    of a channel map to only ~5 distinct scales, and a channel's loss depends on its own scale alone
    (zero point 0, fixed bit width; the loss is a per-row sum over the same row in a tensor of the same
    shape). So: map every candidate to its scale with brevitas' own scaling modules (cheap, one value
    per channel); evaluate brevitas' own loss at each channel's largest scale; then at each other
    scale unless a lower bound of its loss (the error of clipping the channel's weights to that scale's
    range, alone) already exceeds that loss, in which case the bound stands in for it (it can never be
    the minimum);
    and let brevitas' unchanged `mse_grid_search` run on those values. About 2 full evaluations
    instead of 20 (SDT-8-768: 7.6 s -> 2.1 s with the float32 weights). Any candidate whose scale was
    not tabulated falls back to brevitas' evaluation, so the choice is brevitas' whatever the grid
    (tests compare with brevitas run plainly). Searches of another kind (fibonacci, bipolar) are left
    alone."""
    import_brevitas()
    from brevitas.core.stats.stats_op import MSE

    mses = [m for m in proxy.modules() if isinstance(m, MSE)]
    riq = getattr(proxy, "tensor_quant", None)
    if len(mses) != 1 or riq is None or not hasattr(riq, "scaling_impl"):
        return
    mse = mses[0]
    if mse.search_method != "grid" or mse.bipolar_search or mse.num < 2:
        return
    original = mse.evaluate_loss
    state: dict = {}

    def scales_of(x, candidates: list) -> torch.Tensor:
        """The per-channel scales brevitas' quantizer uses for these candidates (what evaluate_loss
        would run), [len(candidates), C]: its own scaling modules in its local-loss mode."""
        mse.set_local_loss_mode(True)
        mse.set_observer_mode(False)
        try:
            out = []
            for candidate in candidates:
                mse.internal_candidate = candidate
                scale = riq.scaling_impl(x, riq.int_scaling_impl(riq.msb_clamp_bit_width_impl()))
                out.append(scale.detach().reshape(-1))
        finally:
            mse.set_local_loss_mode(False)
            mse.restore_observer_mode()
        return torch.stack(out)

    def scales_stacked(candidates: list):
        """All candidates' scales at once: brevitas' scale restriction is element-wise, and its
        local-loss forward is `stats_scaling_impl(candidate + 0 * value, threshold)`; one call instead of
        one per candidate. None where that structure is not there (checked against `scales_of` below)."""
        impl = riq.scaling_impl
        restrict, value = getattr(impl, "stats_scaling_impl", None), getattr(impl, "value", None)
        if restrict is None or not isinstance(value, torch.Tensor):
            return None
        try:
            stacked = torch.stack([c.reshape(value.shape) for c in candidates])
            out = restrict(stacked + 0. * value, riq.int_scaling_impl(riq.msb_clamp_bit_width_impl()))
        except (RuntimeError, TypeError, ValueError):
            return None
        return out.detach().reshape(len(candidates), -1)

    def tabulate(x, first):
        # the candidates exactly as brevitas' mse_search and mse_grid_search form them
        view = mse.input_view_shape_impl(x).detach()
        init = mse.mse_init_op(view).detach()
        base = mse.mse_base_op(init)
        xl, xr = torch.minimum(base, init), torch.maximum(base, init)
        if first.shape != xl.shape or not torch.equal(first, xl):
            return None
        n = mse.num
        cands = [xl] + [(xl + (xr - xl) * ts).detach() for ts in torch.linspace(1. / (n - 1), 1., n - 1)]
        flat = torch.stack([c.reshape(-1) for c in cands])                  # [n, C]
        scales = scales_stacked(cands)                                       # [n, C]
        if scales is None or scales.shape != flat.shape or view.dim() != 2 or view.shape[0] != flat.shape[1]:
            return None
        s, cols = scales.numpy(), torch.arange(flat.shape[1])
        bits = riq.msb_clamp_bit_width_impl()
        top = max(abs(float(riq.int_quant.max_int(bits))), abs(float(riq.int_quant.min_int(bits))))
        magnitude = view.abs()

        def brevitas_loss(rows):
            """brevitas' own scale and loss with each channel's candidate `rows`, its scale checked
            against its own scale path"""
            vec = flat[rows, cols].reshape(xl.shape)
            got = scales_of(x, [vec])
            if not torch.equal(got[0], scales[rows, cols]):
                return None
            loss = original(x, vec)
            state["loss_shape"] = loss.shape
            return got[0], loss.detach().reshape(-1)

        def clipping(rows):
            """a lower bound of brevitas' loss (the per-channel sum of squared errors) at each channel's
            scale in `rows`: an integer of at most `top` in magnitude times the scale comes no closer to
            a weight w than |w| - top * scale. Summed in float32 on the very values brevitas sees and
            lowered by 0.1 %, more than float32's summation error over a row, so still a lower bound."""
            reach = (top * scales[rows, cols].double()).to(magnitude.dtype)[:, None]   # exact: a power of two
            bound = (magnitude - reach).clamp_(min=0.0).square_().sum(dim=1)
            return bound.double() * (1.0 - 1e-3)

        # 1. each channel's largest scale (the one that clips least): brevitas' loss there
        largest = torch.from_numpy(s.argmax(axis=0))
        head = brevitas_loss(largest)
        if head is None:
            return None
        table_scales, table_losses = [head[0]], [head[1]]
        # 2. each other scale: brevitas' loss where its clipping alone does not already lose to that
        #    (1 % margin: brevitas sums in float32); where it does, it can never be the minimum, and
        #    the bound stands in for its loss
        other = s != s[largest.numpy(), np.arange(s.shape[1])][None, :]
        for slot in _distinct_scale_slots(s, other):
            has = torch.from_numpy(slot >= 0)
            rows = torch.where(has, torch.from_numpy(slot), largest)
            bound = clipping(rows)
            hopeful = has & (bound <= 1.01 * head[1].double())
            loss = head[1]
            if bool(hopeful.any()):
                got = brevitas_loss(torch.where(hopeful, rows, largest))
                if got is None:
                    return None
                loss = got[1]
            table_scales.append(scales[rows, cols])
            table_losses.append(torch.where(hopeful | ~has, loss, bound.to(loss.dtype)))
        state["candidates"] = (cands, scales)
        return torch.stack(table_scales), torch.stack(table_losses)

    def evaluate_loss(x, candidate):
        if "table" not in state:
            state["table"] = tabulate(x, candidate)
        table = state["table"]
        if table is not None:
            scales, losses = table
            cands, cand_scales = state["candidates"]
            k = state.get("calls", 0)
            state["calls"] = k + 1
            if k < len(cands) and candidate.shape == cands[k].shape and torch.equal(candidate, cands[k]):
                scale = cand_scales[k]
            else:
                scale = scales_of(x, [candidate])[0]
            hit = scales == scale[None, :]                                   # [J, C]
            if bool(hit.any(dim=0).all()):
                mse.internal_candidate = candidate
                row = hit.to(torch.int8).argmax(dim=0)
                return losses.gather(0, row[None, :]).reshape(state["loss_shape"])
        return original(x, candidate)

    mse.evaluate_loss = evaluate_loss


@contextlib.contextmanager
def _quiet_single_threaded():
    """One torch intra-op thread (see `_torch_threads`) and brevitas' warnings silenced, entered once
    around a whole graph's quantization rather than per weight."""
    with _torch_threads(1), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


CHUNK_ELEMENTS = 1 << 20   # weight values brevitas quantizes at once (4 MiB of float32)


def _brevitas_weight(weight: np.ndarray, bits: int, search: str) -> tuple[np.ndarray, np.ndarray]:
    """brevitas' per-output-channel quantization of the weight, flattened to [O, -1]: (scale float64 [O],
    w_int int8 [O, -1]) with brevitas' dequantized value = w_int * scale. Runs inside
    `_quiet_single_threaded`.

    brevitas works on the weight in float32, the precision the float model computes with (the folded
    float64 weight rounded once); float64 doubled the time of its MSE search (memory-bound: ~10
    temporaries per candidate) for a difference only where a weight sits within float32's rounding of
    a half-step.

    Every output channel is quantized on its own (its own scale search over its own row), so the rows
    go to brevitas a block of about CHUNK_ELEMENTS values at a time: the same result (checked equal on
    SDT-8-768 and every test model), while brevitas' temporaries stay in reused heap memory instead of
    fresh pages (measured on SDT-8-768: 10.7 s -> 7.6 s, the difference page faults); each block's
    values go into the int8 result at once."""
    import_brevitas()
    from brevitas.nn import QuantLinear

    flat = np.ascontiguousarray(weight.reshape(weight.shape[0], -1), dtype=np.float32)
    rows = max(1, CHUNK_ELEMENTS // max(1, flat.shape[1]))
    limit = 2 ** (bits - 1) - 1
    # the results, made before the block temporaries: one long-lived allocation per weight, not one per
    # block between them (which would fragment the heap the temporaries are reused from)
    scales, ints = np.empty(flat.shape[0]), np.empty(flat.shape, dtype=np.int8)
    for start in range(0, flat.shape[0], rows):
        block = torch.from_numpy(flat[start:start + rows])
        with torch.no_grad():
            # built with one input feature, then given the block as the weight's data: the same
            # Parameter object (the one brevitas' scale statistics track), without the random
            # initialisation of a full-size weight (half the construction time)
            layer = QuantLinear(1, block.shape[0], bias=False, weight_quant=_brevitas_quantizer(search),
                                weight_bit_width=bits, dtype=torch.float32)
            layer.weight.data = block
            layer.eval()
            _prune_mse_grid_search(layer.weight_quant)
            qw = layer.quant_weight()
            scale = qw.scale.detach().reshape(-1, 1)
            # brevitas' value is an integer times its power-of-two scale in float32, so the division is
            # exact and the rounding changes nothing; a scale that is not a power of two is refused in
            # `_weight_integers`
            w_int = torch.round(qw.value.detach() / scale)
        if bool((w_int.abs() > limit).any()):
            raise DeployError(f"brevitas returned integers outside the {bits}-bit range")
        stop = start + block.shape[0]
        scales[start:stop] = scale.reshape(-1).double().numpy()
        ints[start:stop] = w_int.numpy()
    return scales, ints


@functools.lru_cache(maxsize=None)
def _libc(name: str):
    """A function of glibc (`mallopt`, `malloc_trim`), or None where the C library has none."""
    try:
        return getattr(ctypes.CDLL(None), name)
    except (AttributeError, OSError):
        return None


M_ARENA_MAX = -8        # glibc's malloc.h


@contextlib.contextmanager
def _one_heap_for_new_threads():
    """The threads started inside the block allocate from the heap that already exists, not each from
    a heap (glibc "arena") of its own.

    glibc gives a thread that allocates under contention an arena of its own and keeps what the thread
    frees there for that thread's next allocation. The quantizer threads' brevitas temporaries (tens
    of MiB a weight block) then stay with each thread: SDT-8-768's export peaked at 772 MiB (3.0x its
    checkpoint). Handing the freed memory back after each weight (malloc_trim) brought that to 668 MiB
    but made every weight fault its temporaries in again (0.4 s of a 3.8 s export). One shared heap
    lets each thread reuse what the other freed: ~700 MiB at the faster time (measured, 4 runs each).
    The limit applies only to arenas made while it is set (a thread keeps its heap), so it is lifted
    again afterwards (`arena_max_after`). No effect off glibc."""
    mallopt = _libc("mallopt")
    if mallopt is None or mallopt(M_ARENA_MAX, 1) != 1:
        yield
        return
    try:
        yield
    finally:
        mallopt(M_ARENA_MAX, arena_max_after(os.environ))


def arena_max_after(environ) -> int:
    """The arena limit to restore: the user's own (MALLOC_ARENA_MAX, or glibc.malloc.arena_max in
    GLIBC_TUNABLES, both read by glibc at start-up), else glibc's default for 64-bit, 8 per CPU."""
    tunables = dict(item.partition("=")[::2] for item in environ.get("GLIBC_TUNABLES", "").split(":") if item)
    for value in (tunables.get("glibc.malloc.arena_max"), environ.get("MALLOC_ARENA_MAX")):
        if value and value.strip().isdigit() and int(value) > 0:
            return int(value)
    return 8 * (os.cpu_count() or 1)


def _return_freed_memory() -> None:
    """Hand the heap memory freed so far back to the OS (glibc's malloc_trim), once the quantizer's
    temporaries are gone: what comes next (the export's serialized model, 64 MiB for SDT-8-768) would
    otherwise be allocated beside ~80 MiB of free heap that no longer serves anything."""
    trim = _libc("malloc_trim")
    if trim is not None:
        trim(0)


def _weight_integers(weight: np.ndarray, bits: int, search: str) -> tuple[np.ndarray, np.ndarray]:
    """(w_int int8 shaped like weight, e int64 per output channel): weight ~= w_int * 2**-e."""
    scale, w_int = _brevitas_weight(weight, bits, search)
    e = -np.log2(scale)
    if not np.allclose(e, np.round(e)):
        raise DeployError("brevitas returned a scale that is not a power of two")
    e = np.round(e).astype(np.int64)
    # A channel whose weights all round to 0 carries no information in its exponent; give it the
    # median exponent of the others so its bias keeps a sensible grid (brevitas returns ~2**-40).
    empty = ~np.any(w_int != 0, axis=1)
    if empty.any():
        e[empty] = int(np.median(e[~empty])) if (~empty).any() else 0
    return w_int.reshape(weight.shape), e


def quantize_weight(weight: np.ndarray, bits: int, search: str = "mse") -> tuple[np.ndarray, np.ndarray]:
    """Per-output-channel power-of-two quantization with brevitas: returns (w_int, e) with
    weight ~= w_int * 2**-e[:, None...], w_int in the narrow signed `bits` range."""
    with _quiet_single_threaded():
        w_int, e = _weight_integers(weight, bits, search)
    return w_int.astype(np.int64), e


# ---------------------------------------------------------------- input grid

def input_range(opts: QuantOptions) -> float:
    """The largest |input| the grid must hold: given, or from the training normalisation."""
    if opts.input_range is not None:
        return float(opts.input_range)
    data = opts.data
    if data.events:
        return float(2 ** (opts.input_bits - 1) - 1)   # event counts: integers
    mean, std = np.asarray(data.mean, float), np.asarray(data.std, float)
    return float(np.max(np.maximum(np.abs(0 - mean) / std, np.abs(1 - mean) / std)))


def input_grid(opts: QuantOptions) -> int:
    """The finest power-of-two grid 2**-g on which [-range, range] fits in `input_bits` signed bits."""
    r = input_range(opts)
    if opts.data.events and opts.input_range is None:
        return 0
    return int((opts.input_bits - 1) - math.ceil(math.log2(r)))


# ---------------------------------------------------------------- the pass

def _threshold_grid(theta: float, at_least: int) -> int:
    """The coarsest grid g >= at_least on which theta is an integer."""
    g = at_least
    while not float(theta * 2.0 ** g).is_integer():
        g += 1
        if g > at_least + 64:
            raise DeployError(f"threshold {theta!r} lies on no power-of-two grid")
    return g


def _channels(grid, c: int) -> np.ndarray:
    g = np.asarray(grid, dtype=np.int64)
    return np.full(c, int(g)) if g.ndim == 0 else g


def _head_mean_as_sum(n, meta: dict):
    """One node of the head rewrite (see `_rewrite_head_mean`)."""
    if isinstance(n, SpatialMean):
        return TokenSum("head_sum", n.inputs, n.shape)
    if n.name == "head_lif":
        H, W = meta["token_shape"][1:]
        return replace(n, inputs=tuple("head_sum" if i == "head_mean" else i for i in n.inputs),
                       v_threshold=float(n.v_threshold) * H * W)
    return n


def _rewrite_head_mean(g: Graph) -> Graph:
    """mean over tokens -> head_lif becomes sum over tokens -> head_lif with threshold * H*W."""
    return g.replace_nodes([_head_mean_as_sum(n, g.meta) for n in g.nodes], head_pool="sum")


def quantize_graph(g: Graph, opts: QuantOptions) -> Graph:
    """The dyadic-quantized graph: integer fields on every node, float fields the exact dequantized values."""
    if not g.meta.get("folded"):
        raise DeployError("quantize needs a BatchNorm-folded graph (run fold_bn first)")
    return _quantize_nodes(g.nodes, g.meta, opts, _synaptic_count(g))


def fold_and_quantize(g: Graph, opts: QuantOptions, consume: bool = False) -> Graph:
    """`quantize_graph(fold_bn(g), opts)`, the same graph, folding each layer just before it is quantized:
    one layer's folded weights exist at a time instead of the whole model's (8-768: 530 MB in float64)."""
    from sdt_deploy.ir.passes import fold_nodes

    layers = _synaptic_count(g)
    # folded straight into float32, what brevitas reads (`_brevitas_weight`): the same values as the
    # float64 fold rounded afterwards
    return _quantize_nodes(fold_nodes(g, consume, weight_dtype=np.float32), {**g.meta, "folded": True}, opts,
                           layers)


def _synaptic_count(g: Graph) -> int:
    return sum(isinstance(n, (Conv, Linear)) for n in g.nodes)


def _quantize_nodes(nodes: Iterable, meta: dict, opts: QuantOptions, layers: int = 0) -> Graph:
    """Quantize a stream of folded nodes in graph order (each node is dropped once quantized); a
    progress bar over the `layers` weights on a terminal (none when stderr is not one)."""
    from tqdm import tqdm

    import_brevitas()   # here, before the worker threads: the import is bound to the GIL anyway
    head_rewrite = meta.get("head_pool", "mean") == "mean"
    if head_rewrite:
        meta = {**meta, "head_pool": "sum"}
    grids: dict[str, Optional[np.ndarray]] = {}
    plif_tau: dict[str, float] = {}
    out = []
    with _quiet_single_threaded(), tqdm(total=layers, desc="quantize", unit="layer", leave=False,
                                        disable=None if layers > 8 else True) as bar:
        for n, weights in _weights_ahead(nodes, opts):
            out.append(_quantize_node(n, weights, grids, plif_tau, head_rewrite, meta, opts))
            bar.update(weights is not None)
    _return_freed_memory()
    return Graph(out, {**meta, "quantized": True, "weight_bits": opts.weight_bits, "input_bits": opts.input_bits,
                       "scale_search": opts.scale_search, "input_grid": input_grid(opts),
                       "input_range": input_range(opts), "plif_tau": plif_tau})


def quantization_workers() -> int:
    """Threads for the weight quantization: the CPUs this process may use, at most 4 (brevitas' search
    is memory-bound; more threads than that only compete for the memory bus)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:      # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(4, cpus))


def _weights_ahead(nodes: Iterable, opts: QuantOptions, workers: Optional[int] = None):
    """(node, future of its `_weight_integers` or None) in graph order, the weights of up to 2 * workers
    conv/linear nodes being quantized ahead on a thread pool. Each weight is quantized on its own
    (per output channel, nothing shared), and torch releases the GIL inside brevitas' tensor operations,
    so the layers run in parallel (each op on one intra-op thread: `_quiet_single_threaded` around the
    caller, torch's setting being process-wide); the bounded window keeps the streamed, folded float
    weights of only a few layers alive at once."""
    from concurrent.futures import ThreadPoolExecutor

    workers = workers or quantization_workers()
    pending: collections.deque = collections.deque()
    in_flight = 0
    with _one_heap_for_new_threads(), \
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="quantize") as pool:
        try:
            for n in nodes:
                job = None
                if isinstance(n, (Conv, Linear)):
                    # brevitas reads float32 (see `_brevitas_weight`); the folded float64 goes at once
                    weight = np.ascontiguousarray(n.weight, dtype=np.float32)
                    n = replace(n, weight=None)
                    job = pool.submit(_weight_integers, weight, opts.weight_bits, opts.scale_search)
                pending.append((n, job))
                in_flight += job is not None
                while in_flight > 2 * workers:      # the window counts weights, not nodes
                    node, done = pending.popleft()
                    in_flight -= done is not None
                    yield node, done
            while pending:
                yield pending.popleft()
        finally:
            for _, job in pending:      # stopped early (an error downstream): drop what has not started
                if job is not None:
                    job.cancel()


def _quantize_node(n, weights, grids: dict, plif_tau: dict, head_rewrite: bool, meta: dict, opts: QuantOptions):
    """One node of the quantized graph (`grids`, `plif_tau` collect what the later nodes need);
    `weights`: the future of a conv/linear node's `_weight_integers`."""
    if head_rewrite:
        n = _head_mean_as_sum(n, meta)
    if isinstance(n, Input):
        gi = input_grid(opts)
        n = replace(n, grid=_channels(gi, n.shape[0]), bits=opts.input_bits)
    elif isinstance(n, (Conv, Linear)):
        (src,) = n.inputs
        in_grid = grids[src]
        if in_grid is None:           # spikes: integers 0/1
            in_exp = 0
        else:                          # the encoder reads the input grid (uniform over channels)
            if len(set(in_grid.tolist())) != 1:
                raise DeployError(f"{n.name}: input grid differs between channels; not supported")
            in_exp = int(in_grid[0])
        w_int, w_exp = weights.result()
        out_exp = w_exp + in_exp
        bias = np.zeros(w_int.shape[0]) if n.bias is None else n.bias
        b_int = np.round(bias * np.exp2(out_exp.astype(np.float64))).astype(np.int64)
        n = replace(n, w_int=w_int, w_exp=w_exp, b_int=b_int, grid=out_exp,
                    weight=None,            # float_weight() makes it from the integers when asked
                    bias=b_int * np.exp2(-out_exp.astype(np.float64)))
    elif isinstance(n, LIF):
        (src,) = n.inputs
        c = n.shape[0]
        src_grid = grids[src] if grids[src] is not None else np.zeros(c, dtype=np.int64)
        # per distinct input grid (a handful among thousands of channels)
        distinct, where = np.unique(np.asarray(src_grid, dtype=np.int64), return_inverse=True)
        grid_of_distinct = np.array([_threshold_grid(n.v_threshold, int(gc)) for gc in distinct], dtype=np.int64)
        lif_grid = grid_of_distinct[where.reshape(-1)]
        theta_int = np.array([int(n.v_threshold * 2.0 ** int(gc)) for gc in grid_of_distinct],
                             dtype=np.int64)[where.reshape(-1)]
        if n.plif_w is not None:
            plif_tau[n.name] = n.tau
            n = replace(n, plif_w=0.0, tau=2.0)
        n = replace(n, grid=lif_grid, theta_int=theta_int)
    elif isinstance(n, Add):
        n = replace(n, grid=np.max(np.stack([grids[i] for i in n.inputs]), axis=0))
    elif isinstance(n, (MaxPool, TokenSum)):
        src_grid = grids[n.inputs[0]]   # a sum of spikes counts integers: grid 0
        n = replace(n, grid=np.zeros(n.shape[0], dtype=np.int64) if src_grid is None else src_grid.copy())
    elif isinstance(n, Readout):
        n = replace(n, grid=grids[n.inputs[0]])
    elif isinstance(n, SpatialMean):
        raise DeployError("internal: a spatial mean survived the head rewrite")
    grids[n.name] = n.grid if n.out_kind == CURRENT else None
    return n


def grid_of(g: Graph, name: str) -> Optional[np.ndarray]:
    n = g[name]
    return n.grid if n.out_kind == CURRENT else None
