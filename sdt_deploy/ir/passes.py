"""Graph passes that need no data: BatchNorm folding and the binary-spike-only dataflow check."""
from __future__ import annotations

import collections
from dataclasses import replace
from typing import Iterator

import numpy as np

from sdt_deploy.errors import DeployError
from sdt_deploy.ir.graph import CURRENT, SYNAPTIC, BatchNorm, BNPad, Conv, Graph, Input, Linear


def fold_bn_params(weight: np.ndarray, bias, bn: BatchNorm,
                   weight_dtype=np.float64) -> tuple[np.ndarray, np.ndarray]:
    """W' = W * gamma / sqrt(var + eps);  b' = beta + (b - mean) * gamma / sqrt(var + eps), in float64.

    `weight_dtype` float32: W' computed in float64 and rounded once to float32 as it is written (numpy
    casts the float64 products chunk by chunk into the output), the same values as the float64 W'
    rounded afterwards, without a float64 copy of the weight and of W' (one pass instead of three)."""
    scale = bn.weight.astype(np.float64) / np.sqrt(bn.var.astype(np.float64) + bn.eps)
    b = np.zeros(weight.shape[0]) if bias is None else bias.astype(np.float64)
    w = np.empty(np.shape(weight), dtype=weight_dtype)
    # float32 x float64 runs numpy's float64 loop: the product is the float64 one either way
    np.multiply(weight, scale.reshape((-1,) + (1,) * (w.ndim - 1)), out=w, casting="same_kind")
    return w, bn.bias.astype(np.float64) + (b - bn.mean.astype(np.float64)) * scale


def fold_bn(g: Graph) -> Graph:
    """Fold every BatchNorm into the conv/linear that feeds it; no BatchNorm survives.

    The folded node keeps the conv's name; consumers of the BatchNorm now read the conv. A chain of
    BatchNorms (V2's RepConv ends in two) folds one after the other, in float64, rounded once. V2's
    `BNPad` after an unpadded 1x1 convolution folds like a BatchNorm, with the convolution's input
    zero-padded by the ring's width: the same function (the 1x1 convolution of a zero border outputs its
    folded bias, BN(0), the ring's value)."""
    return g.replace_nodes(list(fold_nodes(g)), folded=True)


def _bn_chains(g: Graph) -> dict:
    """{conv/linear name: [the BatchNorms (and a first BNPad) that follow it, in order]}, every one checked
    foldable: each follows the previous one or the conv, which has that single consumer."""
    plan: dict[str, list] = {}
    tail_of: dict[str, str] = {}       # last BN of a chain -> its conv
    for n in g.nodes:
        if not isinstance(n, (BatchNorm, BNPad)):
            continue
        (src,) = n.inputs
        if len(g.consumers(src)) != 1:
            raise DeployError(f"cannot fold {n.name}: it does not follow a conv/linear with a single consumer")
        if src in tail_of and isinstance(n, BatchNorm):
            conv = tail_of.pop(src)
            plan[conv].append(n)
        elif src not in plan and isinstance(g[src], (Conv, Linear)):
            if isinstance(n, BNPad):
                c = g[src]
                if not (isinstance(c, Conv) and c.weight_shape[2:] == (1, 1) and c.stride == 1 and c.padding == 0):
                    raise DeployError(f"cannot fold {n.name}: its ring is the convolution's zero padding only after "
                                      f"an unpadded 1x1 convolution, and {src} is not one")
            conv = src
            plan[conv] = [n]
        else:
            raise DeployError(f"cannot fold {n.name}: it does not follow a conv/linear with a single consumer")
        tail_of[n.name] = conv
    return plan


def _fold_chain(n, chain: list, weight_dtype):
    """The conv/linear `n` with its chain of BatchNorms folded in (the first possibly a BNPad)."""
    if len(chain) == 1 and isinstance(chain[0], BatchNorm):    # one BatchNorm: rounded once as it is written
        w, b = fold_bn_params(n.weight, n.bias, chain[0], weight_dtype)
        return replace(n, weight=w, bias=b)
    w, b = n.weight, n.bias
    for bn in chain:                                           # float64 throughout, rounded once at the end
        w, b = fold_bn_params(w, b, bn, np.float64)
    changes = {"weight": w.astype(weight_dtype, copy=False), "bias": b}
    if isinstance(chain[0], BNPad):
        changes.update(padding=int(chain[0].pad), shape=tuple(chain[0].shape))
    return replace(n, **changes)


def fold_nodes(g: Graph, consume: bool = False, weight_dtype=np.float64) -> Iterator:
    """The nodes of `fold_bn(g)`, made one at a time as they are consumed, so that a streaming consumer
    (`quantization.fold_and_quantize`) holds one layer's folded weights at once, not the model's.
    Checks every BatchNorm before the first node is made. `weight_dtype`: of the folded weights, and of
    a conv/linear without a BatchNorm, which passes through (biases are float64 either way); float32
    for a consumer that reads nothing finer (brevitas: `quant.brevitas_backend.scales_and_integers`). `consume`: g
    is emptied here and each of its nodes dropped once its folded node is made, so that nothing of g
    outlives its layer's turn."""
    plan = _bn_chains(g)
    renamed = {bn.name: src for src, chain in plan.items() for bn in chain}

    queue = collections.deque(g.take_nodes() if consume else g.nodes)

    def nodes():
        while queue:
            n = queue.popleft()
            if isinstance(n, (BatchNorm, BNPad)):
                continue
            if n.name in plan:
                n = _fold_chain(n, plan[n.name], weight_dtype)
            elif isinstance(n, (Conv, Linear)) and (n.weight.dtype != weight_dtype or
                                                    (n.bias is not None and n.bias.dtype != np.float64)):
                n = replace(n, weight=n.weight.astype(weight_dtype),
                            bias=None if n.bias is None else n.bias.astype(np.float64))
            if any(i in renamed for i in n.inputs):
                n = replace(n, inputs=tuple(renamed.get(i, i) for i in n.inputs))
            yield n
    return nodes()


def check(g: Graph) -> dict:
    """The binary-spike-only dataflow check. Every synaptic node (conv, linear) must read spikes, except
    the encoder, which reads the model input itself; no BatchNorm may be left unfolded. Returns
    `ok`, the `violations` (one sentence each), the `encoder_exceptions` and the BatchNorms left."""
    exceptions, violations = [], []
    for n in g.nodes:
        if not isinstance(n, SYNAPTIC):
            continue
        for src in n.inputs:
            p = g[src]
            if p.out_kind != CURRENT:
                continue
            if isinstance(p, Input):
                exceptions.append(n.name)
            else:
                violations.append(f"{n.name} ({n.op}) reads the current {src} ({p.op}); only the encoder may read "
                                  "a real value")
    bn_left = [n.name for n in g.of_type(BatchNorm)]
    violations += [f"{name} is not folded" for name in bn_left]
    return {"ok": not violations, "violations": violations, "encoder_exceptions": exceptions,
            "batchnorm": bn_left, "synaptic_nodes": sum(isinstance(n, SYNAPTIC) for n in g.nodes)}
