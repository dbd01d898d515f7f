"""The numeric contract: dyadic quantization of a BatchNorm-folded deploy graph, the rules that make the
float model, the integer engine and every export compute identical spikes (docs/numeric-contract.md).

- weights: per output channel, `w = w_int * 2**-e`, `w_int` a signed `weight_bits` integer (narrow
  range), the power-of-two scale chosen by brevitas' fixed-point quantizer (`quant.brevitas_backend`) —
  by default the MSE-minimising one (it compares candidate radix points and keeps the one with the least
  squared error), or the max-based one (`--scale-search max`: the smallest power of two that holds the
  channel's largest weight, then round-to-nearest);
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

Each node type's rule is one entry of `RULES`; a node type without an entry is refused.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Iterator, Optional

import numpy as np

from sdt_deploy.errors import DeployError
from sdt_deploy.files.configs import DataConfig
from sdt_deploy.ir.graph import (
    CURRENT,
    LIF,
    SYNAPTIC,
    Add,
    And,
    BNPad,
    Broadcast,
    Conv,
    Graph,
    Input,
    KdReadout,
    KVProduct,
    Linear,
    MaxPool,
    Node,
    OrPool,
    QKVProduct,
    Readout,
    SpatialMean,
    TokenSum,
)
from sdt_deploy.ir.passes import fold_nodes
from sdt_deploy.quant import brevitas_backend as backend

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


# what a quantized graph's meta records of the quantization, and every artifact repeats
SETTINGS = ("weight_bits", "input_bits", "scale_search", "input_range", "input_grid", "plif_tau")


def settings_of(meta: dict) -> dict:
    """The quantization settings a quantized graph (or an artifact's copy of its meta) records; `reparam`
    where the graph was structurally re-parameterized before quantization (V2, `ir.reparam`), so that a
    shipped file verifies as shipped (an artifact without it was not re-parameterized)."""
    out = {k: meta.get(k) for k in SETTINGS}
    if meta.get("reparam"):
        out["reparam"] = True
    return out


# ---------------------------------------------------------------- weights

def weight_exponents(scale: np.ndarray, w_int: np.ndarray, shape: tuple) -> tuple[np.ndarray, np.ndarray]:
    """(w_int shaped `shape`, e int64 per output channel) from a back end's per-channel scale and
    integers [O, -1]: weight ~= w_int * 2**-e. The scale must be a power of two."""
    e = -np.log2(scale)
    if not np.allclose(e, np.round(e)):
        raise DeployError("the weight quantizer returned a scale that is not a power of two")
    e = np.round(e).astype(np.int64)
    # A channel whose weights all round to 0 carries no information in its exponent; give it the
    # median exponent of the others so its bias keeps a sensible grid (brevitas returns ~2**-40).
    empty = ~np.any(w_int != 0, axis=1)
    if empty.any():
        e[empty] = int(np.median(e[~empty])) if (~empty).any() else 0
    return w_int.reshape(shape), e


def quantize_weight(weight: np.ndarray, bits: int, search: str = "mse") -> tuple[np.ndarray, np.ndarray]:
    """Per-output-channel power-of-two quantization: returns (w_int, e) with
    weight ~= w_int * 2**-e[:, None...], w_int in the narrow signed `bits` range."""
    with backend.quantizer_session():
        scale, ints = backend.scales_and_integers(weight, bits, search)
    w_int, e = weight_exponents(scale, ints, weight.shape)
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


# ---------------------------------------------------------------- thresholds and the head

def threshold_grid(theta: float, at_least: int) -> int:
    """The coarsest grid g >= at_least on which theta is an integer."""
    g = at_least
    while not float(theta * 2.0 ** g).is_integer():
        g += 1
        if g > at_least + 64:
            raise DeployError(f"threshold {theta!r} lies on no power-of-two grid")
    return g


def head_mean_as_sum(n: Node, meta: dict) -> Node:
    """One node of the head rewrite (see `rewrite_head_mean`): the LIF reading `head_mean` is the head's
    (`head_lif` in V1, `lif` in V2)."""
    if isinstance(n, SpatialMean):
        return TokenSum("head_sum", n.inputs, n.shape)
    if isinstance(n, LIF) and "head_mean" in n.inputs:
        H, W = meta["token_shape"][1:]
        return replace(n, inputs=tuple("head_sum" if i == "head_mean" else i for i in n.inputs),
                       v_threshold=float(n.v_threshold) * H * W)
    return n


def rewrite_head_mean(g: Graph) -> Graph:
    """mean over tokens -> head_lif becomes sum over tokens -> head_lif with threshold * H*W."""
    return g.replace_nodes([head_mean_as_sum(n, g.meta) for n in g.nodes], head_pool="sum")


# ---------------------------------------------------------------- the per-node rules

@dataclass
class _Pass:
    """What the rules of later nodes need from earlier ones."""

    opts: QuantOptions
    grids: dict = field(default_factory=dict)      # node -> per-channel output grid; None for spikes
    plif_tau: dict = field(default_factory=dict)   # PLIF layer -> its trained tau


def _channels(grid, c: int) -> np.ndarray:
    g = np.asarray(grid, dtype=np.int64)
    return np.full(c, int(g)) if g.ndim == 0 else g


def _input(n: Input, p: _Pass, weights=None) -> Input:
    return replace(n, grid=_channels(input_grid(p.opts), n.shape[0]), bits=p.opts.input_bits)


def group_input_grid(node, in_grid: np.ndarray) -> np.ndarray:
    """Per input channel, the grid a synaptic node reads it on: the finest grid among the channels of its
    group (all the input channels; one channel for a depthwise convolution). Coarser channels are shifted
    left onto it, exactly (`input_shift`)."""
    g = np.asarray(in_grid, dtype=np.int64)
    groups = int(getattr(node, "groups", 1))
    return np.repeat(g.reshape(groups, -1).max(axis=1), g.size // groups)


def input_shift(node, in_grid: np.ndarray) -> np.ndarray:
    """Per input channel, the left shift that puts it on `group_input_grid` (>= 0; all 0 where the grid is
    uniform, as for the image, and for a depthwise convolution)."""
    return group_input_grid(node, in_grid) - np.asarray(in_grid, dtype=np.int64)


def output_input_grid(node, in_grid: np.ndarray, out_channels: int) -> np.ndarray:
    """Per output channel, the grid of the inputs it sums (`group_input_grid` of its group)."""
    per_group = group_input_grid(node, in_grid).reshape(int(getattr(node, "groups", 1)), -1)[:, 0]
    return np.repeat(per_group, out_channels // per_group.size)


def _synaptic(node, p: _Pass, weights=None):
    """w = w_int * 2**-e per output channel; the output grid is e + the input's grid (0 for spikes); the
    bias rounded once onto it. `weights`: (the back end's future result, the weight's shape). A current
    whose channels lie on different grids (V2: after a depthwise convolution) is read on the finest grid
    of each group (`group_input_grid`)."""
    future, shape = weights
    (src,) = node.inputs
    in_grid = p.grids[src]
    if in_grid is None:           # spikes: integers 0/1
        in_exp = 0
    elif len(set(in_grid.tolist())) == 1:   # the encoder reads the input grid (uniform over channels)
        in_exp = int(in_grid[0])
    else:
        in_exp = output_input_grid(node, in_grid, shape[0])
    w_int, w_exp = weight_exponents(*future.result(), shape)
    out_exp = w_exp + in_exp
    bias = np.zeros(w_int.shape[0]) if node.bias is None else node.bias
    b_int = np.round(bias * np.exp2(out_exp.astype(np.float64))).astype(np.int64)
    return replace(node, w_int=w_int, w_exp=w_exp, b_int=b_int, grid=out_exp,
                   weight=None,            # float_weight() makes it from the integers when asked
                   bias=b_int * np.exp2(-out_exp.astype(np.float64)))


def _lif(n: LIF, p: _Pass, weights=None) -> LIF:
    """The state on the input's grid, refined until the threshold is an integer there; PLIF's decay 1/2."""
    (src,) = n.inputs
    c = n.shape[0]
    src_grid = p.grids[src] if p.grids[src] is not None else np.zeros(c, dtype=np.int64)
    # per distinct input grid (a handful among thousands of channels)
    distinct, where = np.unique(np.asarray(src_grid, dtype=np.int64), return_inverse=True)
    grid_of_distinct = np.array([threshold_grid(n.v_threshold, int(gc)) for gc in distinct], dtype=np.int64)
    lif_grid = grid_of_distinct[where.reshape(-1)]
    theta_int = np.array([int(n.v_threshold * 2.0 ** int(gc)) for gc in grid_of_distinct],
                         dtype=np.int64)[where.reshape(-1)]
    if n.plif_w is not None:
        p.plif_tau[n.name] = n.tau
        n = replace(n, plif_w=0.0, tau=2.0)
    return replace(n, grid=lif_grid, theta_int=theta_int)


def _add(n: Add, p: _Pass, weights=None) -> Add:
    """The sum on the finest of the contributors' grids."""
    return replace(n, grid=np.max(np.stack([p.grids[i] for i in n.inputs]), axis=0))


def _input_grid_kept(n, p: _Pass, weights=None):
    """A max or a sum keeps its input's grid; a sum of spikes counts integers (grid 0)."""
    src_grid = p.grids[n.inputs[0]]
    return replace(n, grid=np.zeros(n.shape[0], dtype=np.int64) if src_grid is None else src_grid.copy())


def _readout(n: Readout, p: _Pass, weights=None) -> Readout:
    grid = p.grids[n.inputs[0]]         # spikes (a V2 model without a head): integers 0/1
    return replace(n, grid=np.zeros(n.shape[0], dtype=np.int64) if grid is None else grid)


def _kd_readout(n: KdReadout, p: _Pass, weights=None) -> KdReadout:
    """head + head_kd on the finer of their grids, and one step finer still: the division by 2."""
    return replace(n, grid=np.max(np.stack([p.grids[i] for i in n.inputs]), axis=0) + 1)


def _kv_product(n: KVProduct, p: _Pass, weights=None) -> KVProduct:
    """Counts of coincidences of two spike tensors: integers (grid 0), per head."""
    if any(p.grids[i] is not None for i in n.inputs):
        raise DeployError(f"{n.name}: kv reads two spike tensors")
    return replace(n, grid=np.zeros(n.shape[0], dtype=np.int64))


def _qkv_product(n: QKVProduct, p: _Pass, weights=None) -> QKVProduct:
    """The integer q @ kv on grid `scale_exp`: the 2**-scale_exp scale is the grid, nothing is rounded."""
    q, kv = n.inputs
    if p.grids[q] is not None or p.grids[kv] is None or np.any(p.grids[kv] != 0):
        raise DeployError(f"{n.name}: qkv reads spikes and integer counts")
    return replace(n, grid=np.full(n.shape[0], int(n.scale_exp), dtype=np.int64))

def _spikes(n, p: _Pass, weights=None):
    """Spikes are integers 0/1: no grid to choose."""
    return n


def _removed_before(n, p: _Pass, weights=None):
    raise DeployError(f"internal: {n.name} ({n.op}) should have been rewritten before quantization")


RULES: dict[type, Callable] = {
    Input: _input, Conv: _synaptic, Linear: _synaptic, LIF: _lif, Add: _add, MaxPool: _input_grid_kept,
    TokenSum: _input_grid_kept, Readout: _readout, And: _spikes, OrPool: _spikes, Broadcast: _spikes,
    SpatialMean: _removed_before, BNPad: _removed_before, KVProduct: _kv_product, QKVProduct: _qkv_product,
    KdReadout: _kd_readout,
}


def quantize_node(n: Node, p: _Pass, weights=None) -> Node:
    """`n` quantized by its rule in `RULES`; a node type without one is refused."""
    rule = RULES.get(type(n))
    if rule is None:
        raise DeployError(f"no quantization rule for {n.name} ({n.op})")
    return rule(n, p, weights)


# ---------------------------------------------------------------- the pass

def quantize_graph(g: Graph, opts: QuantOptions, progress: bool = False) -> Graph:
    """The dyadic-quantized graph: integer fields on every node, float fields the exact dequantized values."""
    if not g.meta.get("folded"):
        raise DeployError("quantize needs a BatchNorm-folded graph (run fold_bn first)")
    return _quantize_nodes(g.nodes, g.meta, opts, _synaptic_count(g), progress)


def fold_and_quantize(g: Graph, opts: QuantOptions, consume: bool = False, progress: bool = False) -> Graph:
    """`quantize_graph(fold_bn(g), opts)`, the same graph, folding each layer just before it is quantized:
    one layer's folded weights exist at a time instead of the whole model's (8-768: 530 MB in float64).
    Folded straight into float32, what the back end reads: the same values as the float64 fold rounded
    afterwards."""
    layers = _synaptic_count(g)
    return _quantize_nodes(fold_nodes(g, consume, weight_dtype=np.float32), {**g.meta, "folded": True}, opts,
                           layers, progress)


def _synaptic_count(g: Graph) -> int:
    return sum(isinstance(n, SYNAPTIC) for n in g.nodes)


def _weights_out(nodes: Iterable[Node]) -> Iterator[tuple]:
    """((node, weight shape), float32 weight) for the back end; the weight leaves a synaptic node at once
    (the other nodes: ((node, None), None))."""
    for n in nodes:
        if isinstance(n, SYNAPTIC):
            weight = np.ascontiguousarray(n.weight, dtype=np.float32)
            yield (replace(n, weight=None), weight.shape), weight
        else:
            yield (n, None), None


def _quantize_nodes(nodes: Iterable, meta: dict, opts: QuantOptions, layers: int = 0,
                    progress: bool = False) -> Graph:
    """Quantize a stream of folded nodes in graph order (each node is dropped once quantized); with
    `progress`, a bar over the `layers` weights (on a terminal)."""
    from sdt_deploy.console import progress as progress_bar

    head_rewrite = meta.get("head_pool", "mean") == "mean"
    if head_rewrite:
        meta = {**meta, "head_pool": "sum"}
        nodes = (head_mean_as_sum(n, meta) for n in nodes)
    p = _Pass(opts)
    out = []
    with backend.quantizer_session(), progress_bar(layers, "quantize", unit="layers", enabled=progress) as advance:
        for (node, shape), future in backend.weights_ahead(_weights_out(nodes), opts.weight_bits,
                                                            opts.scale_search):
            n = quantize_node(node, p, None if future is None else (future, shape))
            p.grids[n.name] = n.grid if n.out_kind == CURRENT else None
            out.append(n)
            advance(future is not None)
    return Graph(out, {**meta, "quantized": True, "weight_bits": opts.weight_bits, "input_bits": opts.input_bits,
                       "scale_search": opts.scale_search, "input_grid": input_grid(opts),
                       "input_range": input_range(opts), "plif_tau": p.plif_tau})
