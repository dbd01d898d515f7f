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

import math
import warnings
from dataclasses import dataclass, field, replace
from typing import Optional

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


def quantize_weight(weight: np.ndarray, bits: int, search: str = "mse") -> tuple[np.ndarray, np.ndarray]:
    """Per-output-channel power-of-two quantization with brevitas: returns (w_int, e) with
    weight ~= w_int * 2**-e[:, None...], w_int in the narrow signed `bits` range."""
    from brevitas.nn import QuantLinear

    flat = torch.from_numpy(np.ascontiguousarray(weight.reshape(weight.shape[0], -1), dtype=np.float64))
    layer = QuantLinear(flat.shape[1], flat.shape[0], bias=False, weight_quant=_brevitas_quantizer(search),
                        weight_bit_width=bits, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(flat)
    layer.eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        qw = layer.quant_weight()
    scale = qw.scale.detach().reshape(-1).double().numpy()
    e = -np.log2(scale)
    if not np.allclose(e, np.round(e)):
        raise DeployError("brevitas returned a scale that is not a power of two")
    e = np.round(e).astype(np.int64)
    w_int = np.round(qw.value.detach().double().numpy() / scale[:, None]).astype(np.int64)
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


def _rewrite_head_mean(g: Graph) -> Graph:
    """mean over tokens -> head_lif becomes sum over tokens -> head_lif with threshold * H*W."""
    nodes = []
    for n in g.nodes:
        if isinstance(n, SpatialMean):
            n = TokenSum("head_sum", n.inputs, n.shape)
        elif n.name == "head_lif":
            H, W = g.meta["token_shape"][1:]
            n = replace(n, inputs=tuple("head_sum" if i == "head_mean" else i for i in n.inputs),
                        v_threshold=float(n.v_threshold) * H * W)
        nodes.append(n)
    return g.replace_nodes(nodes, head_pool="sum")


def quantize_graph(g: Graph, opts: QuantOptions) -> Graph:
    """The dyadic-quantized graph: integer fields on every node, float fields the exact dequantized values."""
    if not g.meta.get("folded"):
        raise DeployError("quantize needs a BatchNorm-folded graph (run fold_bn first)")
    if g.meta.get("head_pool", "mean") == "mean":
        g = _rewrite_head_mean(g)
    grids: dict[str, Optional[np.ndarray]] = {}
    plif_tau: dict[str, float] = {}
    nodes = []
    for n in g.nodes:
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
        nodes.append(n)
    meta = {"quantized": True, "weight_bits": opts.weight_bits, "input_bits": opts.input_bits,
            "scale_search": opts.scale_search, "input_grid": input_grid(opts),
            "input_range": input_range(opts), "plif_tau": plif_tau}
    return g.replace_nodes(nodes, **meta)


def grid_of(g: Graph, name: str) -> Optional[np.ndarray]:
    n = g[name]
    return n.grid if n.out_kind == CURRENT else None
