"""The dataflow check: what travels on every edge of a deploy graph, and what every synaptic op does with
it -- the question of BICLab/Spike-Driven-Transformer-V2 issue #11: is V2 still spike-driven when its
attention multiplies an integer matrix by a binary one, and when a depthwise convolution feeds real values
into the next convolution?

Every node's output is one of three classes, by what the model computes (not by how the quantized graph
stores it: there every current is an integer on a grid):

- `binary`: spikes, 0 or 1 (LIFs, spike AND, OR-pools, broadcasts of spikes);
- `integer`: a count that only spikes made, an integer in a range that does not depend on the weights:
  V2's `kv = k^T v` in [0, N] (N tokens), V2's `q kv` in [0, N d] (d channels a head) times its fixed
  2**-3, V1's token sum of k AND v in [0, N];
- `real`: anything a weight has touched: convolutions, BatchNorm, residual sums, the image.

Every synaptic op (a weighted sum, or a product of two activations) is then:

- `AC` when its input is binary: each input spike adds a weight (or a 1) -- spike-driven;
- `integer-AC` when it adds integers that spikes select: V2's `q kv`, where each query spike selects a
  row of the integer kv to add. No multiplication happens (q is 0 or 1), but the added values are
  multi-bit integers, not weights, and an event-driven core must read them from a dynamic memory;
- `MAC` when its input is real: a multiply per input value, whatever the spikes do. The first
  convolution (the image) is one in every SDT; in V2, also SepConv's pointwise 1x1 after the depthwise
  7x7, and RepConv's depthwise 3x3 and second 1x1 after the BN-and-pad; structural re-parameterization
  (`ir.reparam`) turns those into ACs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from sdt_deploy.ir.graph import (
    SPIKE,
    SYNAPTIC,
    Graph,
    Input,
    KVProduct,
    Node,
    QKVProduct,
    TokenSum,
)

BINARY, INTEGER, REAL = "binary", "integer", "real"
AC, INT_AC, MAC = "AC", "integer-AC", "MAC"


@dataclass(frozen=True)
class ValueClass:
    kind: str                       # binary, integer or real
    low: Optional[int] = None       # integer: values in [low, high] * 2**-scale_exp
    high: Optional[int] = None
    scale_exp: int = 0

    def describe(self) -> str:
        if self.kind == BINARY:
            return "binary {0, 1}"
        if self.kind == INTEGER:
            scale = f" x 2^-{self.scale_exp}" if self.scale_exp else ""
            return f"integer [{self.low}, {self.high}]{scale}"
        return "real"


def _tokens(shape: tuple) -> int:
    return int(np.prod(shape[1:]))


def value_class(g: Graph, n: Node, classes: dict) -> ValueClass:
    """The class of a node's output, from its op and its inputs' classes."""
    if n.out_kind == SPIKE:
        return ValueClass(BINARY, 0, 1)
    if isinstance(n, KVProduct):
        return ValueClass(INTEGER, 0, _tokens(g[n.inputs[0]].shape))
    if isinstance(n, QKVProduct):
        d = n.shape[0] // n.heads
        return ValueClass(INTEGER, 0, classes[n.inputs[1]].high * d, int(n.scale_exp))
    if isinstance(n, TokenSum) and classes[n.inputs[0]].kind == BINARY:
        return ValueClass(INTEGER, 0, _tokens(g[n.inputs[0]].shape))
    return ValueClass(REAL)


def value_classes(g: Graph) -> dict:
    classes: dict = {}
    for n in g.nodes:
        classes[n.name] = value_class(g, n, classes)
    return classes


def op_kind(g: Graph, n: Node, classes: dict) -> Optional[str]:
    """AC, integer-AC or MAC for a synaptic op (conv, linear, V2's attention products); None otherwise."""
    if isinstance(n, SYNAPTIC):
        kind = classes[n.inputs[0]].kind
        return {BINARY: AC, INTEGER: INT_AC, REAL: MAC}[kind]
    if isinstance(n, (KVProduct, QKVProduct)):
        kinds = {classes[i].kind for i in n.inputs}
        if kinds == {BINARY}:
            return AC
        return INT_AC if REAL not in kinds else MAC
    return None


def _why(g: Graph, n: Node, kind: str, classes: dict) -> str:
    src = g[n.inputs[0]]
    if isinstance(n, KVProduct):
        return "binary x binary: one increment per coincidence of a k and a v spike at a token"
    if isinstance(n, QKVProduct):
        return (f"binary x integer: each query spike adds a row of {n.inputs[1]} "
                f"({classes[n.inputs[1]].describe()}); no multiply, but multi-bit integers from a dynamic memory")
    if kind == AC:
        return f"reads the spikes of {src.name}"
    if isinstance(src, Input):
        return "reads the image: the encoder"
    return f"reads the {classes[src.name].describe()} output of {src.name} ({src.op})"


def dataflow(g: Graph) -> dict:
    """Every edge with its value class, every synaptic op with its kind, and the counts: the issue #11
    table. `spike_driven` is True when no op but the encoder multiplies (MAC)."""
    classes = value_classes(g)
    edges = []
    for n in g.nodes:
        for src in n.inputs:
            c = classes[src]
            edges.append({"src": src, "dst": n.name, "class": c.kind, "value": c.describe(),
                          "shape": list(g[src].shape)})
    ops = []
    for n in g.nodes:
        kind = op_kind(g, n, classes)
        if kind is None:
            continue
        encoder = kind == MAC and isinstance(g[n.inputs[0]], Input)
        ops.append({"name": n.name, "op": n.op, "kind": kind, "encoder": encoder,
                    "inputs": [classes[i].describe() for i in n.inputs], "why": _why(g, n, kind, classes),
                    "params": n.param_count()})
    count = lambda key, value, rows: sum(r[key] == value for r in rows)   # noqa: E731
    macs = [o["name"] for o in ops if o["kind"] == MAC and not o["encoder"]]
    return {
        "edges": edges,
        "ops": ops,
        "summary": {
            "edges": {k: count("class", k, edges) for k in (BINARY, INTEGER, REAL)},
            "ops": {k: count("kind", k, ops) for k in (AC, INT_AC, MAC)},
            "encoder": [o["name"] for o in ops if o["encoder"]],
            "macs_beyond_encoder": macs,
            "integer_acs": [o["name"] for o in ops if o["kind"] == INT_AC],
            "spike_driven": not macs,
            "reparam": bool(g.meta.get("reparam")),
        },
    }
