"""The deploy graph: one typed intermediate representation read by every consumer (exporters, integer
engine, operation report, verifier).

Plain data. A graph is a topologically ordered list of nodes; each node names its inputs and has one
output with a per-sample, per-time-step `shape` and a `kind`:

- `spike`   — binary 0/1 events (LIF outputs, AND, OR-pools, broadcasts of spikes);
- `current` — a real (or, once quantized, integer-on-a-grid) value: the image, synaptic outputs,
  BatchNorm, residual sums, max-pools of currents, token counts, means.

Node names are the layer names of the torch model (module paths such as `block.0.attn.q_conv`); nodes
with no module of their own get a descriptive suffix on the module that owns them
(`block.0.attn.kv_and`, `block.0.attn.add`).

Once quantized (see `sdt_deploy.quant.contract`), value-carrying nodes also hold their integer form: `w_int`/`w_exp`/
`b_int` on synaptic nodes (weight = w_int * 2**-w_exp per output channel; bias = b_int * 2**-out_exp),
and `grid` — the per-channel exponent g of the output (value = integer * 2**-g) — on every current.
The float `bias` is then exactly the dequantized value; the float weight is not stored but made on
demand by `float_weight()`, exactly (float32, which holds an 8-bit integer times a power of two; float64
where it would not).
"""
from __future__ import annotations

import base64
import copy
import json
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Iterable, Optional

import numpy as np

SPIKE = "spike"
CURRENT = "current"


@dataclass
class Node:
    name: str
    inputs: tuple
    shape: tuple            # output shape per sample and time step
    op: ClassVar[str] = "node"
    kind: ClassVar[str] = CURRENT
    grid: Optional[np.ndarray] = field(default=None, kw_only=True)   # per-channel exponent, once quantized

    def arrays(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if isinstance(getattr(self, f.name), np.ndarray)}

    def attrs(self) -> dict:
        skip = {"name", "inputs", "shape"}
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in skip and not isinstance(getattr(self, f.name), np.ndarray)}

    @property
    def out_kind(self) -> str:
        return self.kind

    def param_count(self) -> int:
        return 0


@dataclass
class Input(Node):
    """The model input at one time step: the image (repeated over T) or an event frame. Once quantized,
    `grid` and `bits` say how it is put on the integer grid (round half to even, saturate)."""

    bits: Optional[int] = None
    op: ClassVar[str] = "input"


def dequantized_weight(w_int: np.ndarray, w_exp: np.ndarray, dtype=None) -> np.ndarray:
    """w_int * 2**-w_exp per output channel, exactly: float32 where that holds every value exactly (an
    8-bit integer times a power of two always does, short of float32's exponent range), float64
    otherwise; or float64 when asked (`dtype`, for a consumer that stores float64)."""
    scale = np.exp2(-np.asarray(w_exp, dtype=np.float64)).reshape((-1,) + (1,) * (w_int.ndim - 1))
    if np.dtype(dtype or np.float32) == np.float64:
        return w_int * scale            # exact: an integer below 2**53 times a power of two
    if np.all((scale >= 2.0 ** -110) & (scale <= 2.0 ** 100)) and (
            w_int.dtype == np.int8 or np.abs(w_int).max(initial=0) < 2 ** 24):
        # |w_int| < 2**24 and a power of two well inside float32's normal range: every product is a
        # float32 value, and IEEE multiplication of exact operands with a representable result is exact
        return w_int.astype(np.float32) * scale.astype(np.float32)
    exact = w_int * scale
    single = exact.astype(np.float32)
    return single if np.array_equal(single, exact) else exact


class _Synaptic:
    """What conv and linear nodes share: their float weight, stored (before quantization) or made from
    the integers on demand (a quantized node stores the integers alone: SDT-8-768's float32 copy
    would be 265 MB that an integer export never reads)."""

    def float_weight(self, dtype=None) -> np.ndarray:
        if self.weight is None and self.w_int is not None:
            return dequantized_weight(self.w_int, self.w_exp, dtype)
        return self.weight if dtype is None else np.asarray(self.weight, dtype=dtype)

    @property
    def weight_shape(self) -> tuple:
        return tuple((self.weight if self.weight is not None else self.w_int).shape)

    def param_count(self) -> int:
        return int(np.prod(self.weight_shape)) + (0 if self.bias is None else int(self.bias.size))


@dataclass
class Conv(_Synaptic, Node):
    """2-D convolution `y = W * x + b`; synaptic (an accumulate per input event) when x is spikes.

    `groups` = channels is a depthwise convolution (V2's SepConv and RepConv): output channel c reads
    input channel c only, `y[c] = w[c] * x[c] + b[c]`. Reading a current whose channels lie on different
    grids (V2's convolutions after a depthwise one), each group's inputs are first shifted onto the
    finest grid among them (`input_shift`): exact, and the output grid is `w_exp + that grid`."""

    weight: Optional[np.ndarray] = None  # float64 [O, I/groups, kh, kw]; None once quantized: float_weight()
    bias: Optional[np.ndarray] = None    # float64 [O]
    stride: int = 1
    padding: int = 0
    groups: int = 1
    w_int: Optional[np.ndarray] = None
    w_exp: Optional[np.ndarray] = None
    b_int: Optional[np.ndarray] = None
    op: ClassVar[str] = "conv"


@dataclass
class Linear(_Synaptic, Node):
    """`y = W x + b` over the channel vector; synaptic when x is spikes."""

    weight: Optional[np.ndarray] = None  # float64 [O, I]; None once quantized: float_weight()
    bias: Optional[np.ndarray] = None
    w_int: Optional[np.ndarray] = None
    w_exp: Optional[np.ndarray] = None
    b_int: Optional[np.ndarray] = None
    op: ClassVar[str] = "linear"


@dataclass
class BatchNorm(Node):
    """Eval-mode BatchNorm `(x - mean) / sqrt(var + eps) * weight + bias`; removed by `fold_bn`."""

    weight: np.ndarray = None
    bias: np.ndarray = None
    mean: np.ndarray = None
    var: np.ndarray = None
    eps: float = 1e-5
    op: ClassVar[str] = "batchnorm"

    def param_count(self) -> int:
        return int(self.weight.size + self.bias.size)


@dataclass
class BNPad(Node):
    """V2's `BNAndPad`: eval-mode BatchNorm, then a ring of `pad` pixels around it holding what the
    BatchNorm gives a zero input, [C, H, W] -> [C, H + 2 pad, W + 2 pad]:

        y[c, p + i, p + j] = (x[c, i, j] - mean) / sqrt(var + eps) * weight + bias
        y[c, ring]         = bias - mean * weight / sqrt(var + eps)        (in this order, float32)

    The ring is BN(0) in exact arithmetic, but computed in this order it differs from BatchNorm applied
    to 0 by one float32 ulp in many channels, and the original computes it so. Removed by `fold_bn`
    after an unpadded 1x1 convolution: that is the same function as the convolution with the folded
    weights and its input zero-padded by `pad` (a 1x1 convolution of a zero border outputs its bias,
    which after the fold is BN(0))."""

    weight: np.ndarray = None
    bias: np.ndarray = None
    mean: np.ndarray = None
    var: np.ndarray = None
    eps: float = 1e-5
    pad: int = 1
    op: ClassVar[str] = "bnpad"

    def param_count(self) -> int:
        return int(self.weight.size + self.bias.size)


@dataclass
class LIF(Node):
    """Leaky integrate-and-fire, hard reset, decay_input (spikingjelly's multi-step LIF):

        H[t] = V[t-1] + (X[t] - V[t-1]) * decay        (decay = 1/tau; tau = 2, or sigmoid(w) for PLIF)
        S[t] = H[t] >= v_threshold
        V[t] = H[t] * (1 - S[t])                         (reset to v_reset = 0)

    Quantized: state on the per-channel grid 2**-grid, `H = (V + X) >> 1` (floor), fire when
    `H >= theta_int`."""

    v_threshold: float = 1.0
    tau: float = 2.0
    plif_w: Optional[float] = None      # PLIF's learned parameter (float32 value), None for LIF
    v_reset: float = 0.0
    theta_int: Optional[np.ndarray] = None
    op: ClassVar[str] = "lif"
    kind: ClassVar[str] = SPIKE

    def param_count(self) -> int:
        return 0 if self.plif_w is None else 1   # PLIF's learned w


@dataclass
class And(Node):
    """Spike AND of two same-shape spike inputs (the SDSA masks: k AND v, q AND g)."""

    op: ClassVar[str] = "and"
    kind: ClassVar[str] = SPIKE


@dataclass
class OrPool(Node):
    """Max-pool of spikes, i.e. OR over the window.

    layout `spatial`: over (H, W). layout `heads`: over (token index n = y*W + x, channel within head)
    of the [heads, N, C/heads] view, as the original's dvs_mode pool on k*v and the masked output."""

    kernel: int = 3
    stride: int = 1
    padding: int = 1
    layout: str = "spatial"
    heads: int = 1
    op: ClassVar[str] = "orpool"
    kind: ClassVar[str] = SPIKE


@dataclass
class MaxPool(Node):
    """Max-pool of currents (the stem's last pool): no exact spiking/NIR encoding exists."""

    kernel: int = 3
    stride: int = 2
    padding: int = 1
    op: ClassVar[str] = "maxpool"


@dataclass
class TokenSum(Node):
    """Sum over (H, W) per channel: [C, H, W] -> [C]. On spikes: per-channel token counts."""

    op: ClassVar[str] = "tokensum"


@dataclass
class SpatialMean(Node):
    """Mean over (H, W) per channel: [C, H, W] -> [C] (the head's global average of the stream)."""

    op: ClassVar[str] = "mean"


@dataclass
class Broadcast(Node):
    """[C] -> [C, H, W], the same value at every token (keeps the input's kind)."""

    op: ClassVar[str] = "broadcast"
    of_kind: str = SPIKE

    @property
    def out_kind(self) -> str:
        return self.of_kind


@dataclass
class Add(Node):
    """Sum of currents meeting in one membrane (the residual stream)."""

    op: ClassVar[str] = "add"


@dataclass
class KVProduct(Node):
    """V2's attention key-value product, per head h of d = C / heads channels, over the N = H*W tokens
    (token n = y*W + x, channel c = h*d + i), of two spike tensors [C, H, W]:

        kv[h, i, j] = sum_n k[h*d + i, n] * v[h*d + j, n]          -> [heads, d, d]

    A product of two binary tensors: a count of coincidences, an integer in [0, N] (grid 0)."""

    heads: int = 1
    op: ClassVar[str] = "kv_product"


@dataclass
class QKVProduct(Node):
    """V2's attention query product with its fixed scale, of spikes q [C, H, W] and the integer kv
    [heads, d, d], into the channel layout the next LIF reads:

        y[h*d + j, n] = 2**-scale_exp * sum_i q[h*d + i, n] * kv[h, i, j]    -> [C, H, W]

    The sum is an integer in [0, N*d] (the original's `q @ kv`, int32 in its taps), the scale (0.125 =
    2**-3 whatever the head width) a shift: the output is that integer on grid `scale_exp`. Binary x
    integer: each query spike selects a row of kv to add (an integer accumulate, not a multiply)."""

    heads: int = 1
    scale_exp: int = 3
    op: ClassVar[str] = "qkv_product"


@dataclass
class Readout(Node):
    """Host-side read-out of the per-step logits: `mean` over T, or `per_step` (TET)."""

    mode: str = "mean"
    op: ClassVar[str] = "readout"


@dataclass
class KdReadout(Readout):
    """V2 with knowledge distillation (`kd`): two heads, `head` and `head_kd`, read the same spikes; the
    eval output is the mean of the two heads' mean over T:

        logits = (mean_t head[t] + mean_t head_kd[t]) / 2

    Per step the node holds `head[t] + head_kd[t]` (integers on the finer of the two grids) on a grid one
    step finer, which is the division by 2 (exact); the read-out over T is then the plain mean."""

    op: ClassVar[str] = "kd_readout"


NODE_TYPES = {cls.op: cls for cls in (Input, Conv, Linear, BatchNorm, LIF, And, OrPool, MaxPool, TokenSum,
                                      SpatialMean, Broadcast, Add, Readout, BNPad, KVProduct, QKVProduct,
                                      KdReadout)}
SYNAPTIC = (Conv, Linear)


@dataclass(frozen=True)
class Edge:
    src: str
    dst: str
    kind: str
    shape: tuple


@dataclass
class Graph:
    nodes: list
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._index = {n.name: n for n in self.nodes}
        if len(self._index) != len(self.nodes):
            raise ValueError("duplicate node names in graph")

    def __getitem__(self, name: str) -> Node:
        return self._index[name]

    def __contains__(self, name: str) -> bool:
        return name in self._index

    def __iter__(self):
        return iter(self.nodes)

    @property
    def input(self) -> Input:
        return next(n for n in self.nodes if isinstance(n, Input))

    @property
    def output(self) -> Node:
        return self.nodes[-1]

    def edges(self) -> list[Edge]:
        out = []
        for n in self.nodes:
            for src in n.inputs:
                p = self._index[src]
                out.append(Edge(src, n.name, p.out_kind, tuple(p.shape)))
        return out

    def consumers(self, name: str) -> list[Node]:
        return [n for n in self.nodes if name in n.inputs]

    def of_type(self, cls) -> list:
        return [n for n in self.nodes if isinstance(n, cls)]

    def spike_nodes(self) -> list[Node]:
        return [n for n in self.nodes if n.out_kind == SPIKE]

    def param_count(self) -> int:
        return sum(n.param_count() for n in self.nodes)

    def replace_nodes(self, nodes: Iterable[Node], **meta) -> "Graph":
        return Graph(list(nodes), {**self.meta, **meta})

    def copy(self) -> "Graph":
        return Graph(copy.deepcopy(self.nodes), copy.deepcopy(self.meta))

    def take_nodes(self) -> list:
        """The nodes, removed from this graph (left empty): for a pass that consumes a graph, so that the
        graph holds none of what the pass has finished with."""
        nodes = list(self.nodes)
        self.nodes.clear()
        self._index.clear()
        return nodes

    # ---- serialisation ----
    def to_dict(self, arrays: bool = True) -> dict:
        return {"meta": self.meta, "nodes": [node_to_dict(n, arrays) for n in self.nodes]}

    def to_json(self, arrays: bool = True, indent: Optional[int] = None) -> str:
        return json.dumps(self.to_dict(arrays), indent=indent, default=json_default, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "Graph":
        return cls([node_from_dict(n) for n in d["nodes"]], dict(d.get("meta", {})))

    @classmethod
    def from_json(cls, text: str) -> "Graph":
        return cls.from_dict(json.loads(text))


def json_default(o):
    """`json.dumps(default=...)` for numpy scalars and arrays and tuples (the graph, reports, metadata)."""
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def encode_array(a: np.ndarray) -> dict:
    a = np.ascontiguousarray(a)
    return {"dtype": a.dtype.str, "shape": list(a.shape), "b64": base64.b64encode(a.tobytes()).decode("ascii")}


def decode_array(d: dict) -> np.ndarray:
    return np.frombuffer(base64.b64decode(d["b64"]), dtype=np.dtype(d["dtype"])).reshape(d["shape"]).copy()


def node_to_dict(n: Node, arrays: bool = True) -> dict:
    d: dict[str, Any] = {"op": n.op, "name": n.name, "inputs": list(n.inputs), "shape": list(n.shape),
                         "kind": n.out_kind}
    for k, v in n.attrs().items():
        if v is not None:
            d[k] = v
    for k, v in n.arrays().items():
        d[k] = encode_array(v) if arrays else {"dtype": v.dtype.str, "shape": list(v.shape)}
    return d


def node_from_dict(d: dict) -> Node:
    cls = NODE_TYPES[d["op"]]
    names = {f.name for f in fields(cls)}
    kw = {}
    for k, v in d.items():
        if k in ("op", "kind") or k not in names:
            continue
        if isinstance(v, dict) and "b64" in v:
            v = decode_array(v)
        kw[k] = v
    kw["inputs"] = tuple(kw["inputs"])
    kw["shape"] = tuple(kw["shape"])
    return cls(**kw)


# ---- summaries for people ----

def graph_summary(g: Graph) -> dict:
    edges = g.edges()
    return {
        "nodes": [{"name": n.name, "op": n.op, "inputs": list(n.inputs), "shape": list(n.shape),
                   "kind": n.out_kind, "params": n.param_count()} for n in g.nodes],
        "edges": {"spike": sum(e.kind == SPIKE for e in edges), "current": sum(e.kind == CURRENT for e in edges)},
        "params": g.param_count(),
        "meta": {k: v for k, v in g.meta.items() if k != "config"},
    }
