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

import contextlib
import math
import warnings
from dataclasses import dataclass, field, replace
from typing import Iterable, Optional

import numpy as np
import torch

from .configs import DataConfig
from .errors import DeployError
from .graph import (CURRENT, Add, Conv, Graph, Input, LIF, Linear, MaxPool, Readout, SpatialMean, TokenSum)

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
    from brevitas.quant.fixed_point import Int8WeightPerChannelFixedPoint, Int8WeightPerChannelFixedPointMSE

    return Int8WeightPerChannelFixedPointMSE if search == "mse" else Int8WeightPerChannelFixedPoint


@contextlib.contextmanager
def _torch_threads(n: int):
    """torch's intra-op threads set to n for the block. The quantizer's tensors are small (one layer)
    and its operations many: measured on a 2-core machine under load, 2 threads made brevitas' MSE
    search 6x slower than 1 (spinning OpenMP workers). Element-wise results do not depend on it."""
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _memoize_mse_grid_search(proxy) -> None:
    """Make brevitas' MSE scale search evaluate each distinct power-of-two scale once per channel.

    brevitas' grid search (`mse_grid_search`, 20 candidates between absmax/20 and absmax) quantizes
    the whole weight tensor once per candidate, but with a power-of-two restriction the 20 candidates
    of a channel map to only ~5 distinct scales, and a channel's loss depends on its own scale alone
    (zero point 0, fixed bit width; the loss is a per-row sum over the same row in a tensor of the same
    shape). So: map every candidate to its scale with brevitas' own scaling modules (cheap, one value
    per channel), evaluate brevitas' own loss once per distinct scale (J full evaluations, J = the
    largest number of distinct scales of a channel), and let brevitas' unchanged `mse_grid_search` run
    on those very loss values. Any candidate whose scale was not tabulated falls back to brevitas'
    evaluation, so the outcome is brevitas' by construction, whatever the grid. Searches of another
    kind (fibonacci, bipolar) are left alone."""
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

    def tabulate(x, first):
        # the candidates exactly as brevitas' mse_search and mse_grid_search form them
        init = mse.mse_init_op(mse.input_view_shape_impl(x)).detach()
        base = mse.mse_base_op(init)
        xl, xr = torch.minimum(base, init), torch.maximum(base, init)
        if first.shape != xl.shape or not torch.equal(first, xl):
            return None
        n = mse.num
        cands = [xl] + [(xl + (xr - xl) * ts).detach() for ts in torch.linspace(1. / (n - 1), 1., n - 1)]
        flat = torch.stack([c.reshape(-1) for c in cands])                  # [n, C]
        scales = scales_of(x, cands)                                         # [n, C]
        if scales.shape != flat.shape:
            return None
        # per channel, the first candidate of each distinct scale
        s = scales.numpy()
        order = np.argsort(s, axis=0, kind="stable")
        ranked = np.take_along_axis(s, order, axis=0)
        first_sorted = np.ones_like(ranked, dtype=bool)
        first_sorted[1:] = ranked[1:] != ranked[:-1]
        new = np.zeros_like(first_sorted)
        np.put_along_axis(new, order, first_sorted, axis=0)                 # [n, C]: a new scale here
        counts = new.sum(axis=0)
        rank = np.cumsum(new, axis=0) - 1
        cols = torch.arange(flat.shape[1])
        vecs = []
        for j in range(int(counts.max())):
            rows = (new & (rank == np.minimum(j, counts - 1)[None, :])).argmax(axis=0)
            vecs.append(flat[torch.from_numpy(rows), cols].reshape(xl.shape))
        losses = []
        for vec in vecs:                                                     # brevitas' own loss, J times
            loss = original(x, vec)
            state["loss_shape"] = loss.shape
            losses.append(loss.detach().reshape(-1))
        state["candidates"] = (cands, scales)
        return scales_of(x, vecs), torch.stack(losses)

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


def quantize_weight(weight: np.ndarray, bits: int, search: str = "mse") -> tuple[np.ndarray, np.ndarray]:
    """Per-output-channel power-of-two quantization with brevitas: returns (w_int, e) with
    weight ~= w_int * 2**-e[:, None...], w_int in the narrow signed `bits` range."""
    from brevitas.nn import QuantLinear

    flat = torch.from_numpy(np.ascontiguousarray(weight.reshape(weight.shape[0], -1), dtype=np.float64))
    with _torch_threads(1):
        layer = QuantLinear(flat.shape[1], flat.shape[0], bias=False, weight_quant=_brevitas_quantizer(search),
                            weight_bit_width=bits, dtype=torch.float64)
        with torch.no_grad():
            layer.weight.copy_(flat)
        layer.eval()
        _memoize_mse_grid_search(layer.weight_quant)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            qw = layer.quant_weight()
        scale = qw.scale.detach().reshape(-1).double().numpy()
        value = qw.value.detach().double().numpy()
    e = -np.log2(scale)
    if not np.allclose(e, np.round(e)):
        raise DeployError("brevitas returned a scale that is not a power of two")
    e = np.round(e).astype(np.int64)
    w_int = np.round(value / scale[:, None]).astype(np.int64)
    limit = 2 ** (bits - 1) - 1
    if np.abs(w_int).max(initial=0) > limit:
        raise DeployError(f"brevitas returned integers outside the {bits}-bit range")
    # A channel whose weights all round to 0 carries no information in its exponent; give it the
    # median exponent of the others so its bias keeps a sensible grid (brevitas returns ~2**-40).
    empty = ~np.any(w_int != 0, axis=1)
    if empty.any():
        e[empty] = int(np.median(e[~empty])) if (~empty).any() else 0
    return w_int.reshape(weight.shape), e


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
    return _quantize_nodes(g.nodes, g.meta, opts)


def fold_and_quantize(g: Graph, opts: QuantOptions) -> Graph:
    """`quantize_graph(fold_bn(g), opts)`, the same graph, folding each layer just before it is quantized:
    one layer's folded float64 weights exist at a time instead of the whole model's (8-768: 530 MB)."""
    from .passes import fold_nodes

    return _quantize_nodes(fold_nodes(g), {**g.meta, "folded": True}, opts)


def _quantize_nodes(nodes: Iterable, meta: dict, opts: QuantOptions) -> Graph:
    """Quantize a stream of folded nodes in graph order (each node is dropped once quantized)."""
    head_rewrite = meta.get("head_pool", "mean") == "mean"
    if head_rewrite:
        meta = {**meta, "head_pool": "sum"}
    grids: dict[str, Optional[np.ndarray]] = {}
    plif_tau: dict[str, float] = {}
    out = []
    for n in nodes:
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
            w_int, w_exp = quantize_weight(n.weight, opts.weight_bits, opts.scale_search)
            out_exp = w_exp + in_exp
            bias = np.zeros(n.weight.shape[0]) if n.bias is None else n.bias
            b_int = np.round(bias * np.exp2(out_exp.astype(np.float64))).astype(np.int64)
            shape = (-1,) + (1,) * (n.weight.ndim - 1)
            n = replace(n, w_int=w_int.astype(np.int8), w_exp=w_exp,
                        b_int=b_int, grid=out_exp,
                        weight=w_int * np.exp2(-w_exp.astype(np.float64)).reshape(shape),
                        bias=b_int * np.exp2(-out_exp.astype(np.float64)))
        elif isinstance(n, LIF):
            (src,) = n.inputs
            c = n.shape[0]
            src_grid = grids[src] if grids[src] is not None else np.zeros(c, dtype=np.int64)
            lif_grid = np.array([_threshold_grid(n.v_threshold, int(gc)) for gc in src_grid], dtype=np.int64)
            theta_int = np.array([int(n.v_threshold * 2.0 ** gc) for gc in lif_grid], dtype=np.int64)
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
        out.append(n)
    return Graph(out, {**meta, "quantized": True, "weight_bits": opts.weight_bits, "input_bits": opts.input_bits,
                       "scale_search": opts.scale_search, "input_grid": input_grid(opts),
                       "input_range": input_range(opts), "plif_tau": plif_tau})


def grid_of(g: Graph, name: str) -> Optional[np.ndarray]:
    n = g[name]
    return n.grid if n.out_kind == CURRENT else None
