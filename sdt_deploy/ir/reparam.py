"""Structural re-parameterization of a BN-folded V2 graph (optional: `--reparam`): chains of linear
convolutions that start on spikes become one convolution on those spikes, so that the ops that read
real values in between (MACs) become synaptic ones on binary input (ACs).

- RepConv (`<...>.q_conv` etc.), folded: a 1x1 convolution with zero padding 1 and bias b0 (the BN-and-pad
  folded), a depthwise 3x3 without padding (D), a 1x1 with bias b2 (both BNs folded). Their composition
  is one 3x3 convolution of the spikes with padding 1:

      K[o, i, ky, kx] = sum_c W2[o, c] D[c, ky, kx] W0[c, i]
      bias[o]         = b2[o] + sum_c W2[o, c] b0[c] sum_{ky,kx} D[c, ky, kx]

  exact: on the zero border of the spikes the 1x1 gives b0, which is what the bias term carries for
  every tap; named after the RepConv's module path (`block3.0.attn.q_conv`).
- SepConv's depthwise 7x7 (D, on spikes, no bias) and pointwise 1x1 (W2, bias b2): one 7x7 convolution,
  K[o, c, ky, kx] = W2[o, c] D[c, ky, kx], bias b2, named `<...>.Conv.dwconv_pwconv2`.

The same functions in exact arithmetic; in float64 the fused weights are rounded once more, and once
quantized they round onto their own grids, so the quantized plain and re-parameterized graphs are not
spike-identical by nature (`verify --reference reparam` measures how far apart they are). What it costs:
a RepConv's 2 C^2 + 9 C weights become 9 C^2, a SepConv's 2C (49 + C) become 98 C^2
(`reparam_cost`).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

import numpy as np

from sdt_deploy.errors import DeployError
from sdt_deploy.ir.graph import SPIKE, Conv, Graph, Node


def _only_consumer(g: Graph, name: str) -> Optional[Node]:
    cons = g.consumers(name)
    return cons[0] if len(cons) == 1 else None


def _is_depthwise(n: Node) -> bool:
    return isinstance(n, Conv) and n.groups > 1 and n.groups == n.weight_shape[0] and n.weight_shape[1] == 1


def _is_pointwise(n: Node, padding: int = 0) -> bool:
    return (isinstance(n, Conv) and n.groups == 1 and n.weight_shape[2:] == (1, 1) and n.stride == 1
            and n.padding == padding)


def _bias(n: Conv) -> np.ndarray:
    return np.zeros(n.weight_shape[0]) if n.bias is None else np.asarray(n.bias, dtype=np.float64)


def fuse_repconv(first: Conv, dw: Conv, last: Conv, name: str) -> Conv:
    """1x1 (padding 1, bias) -> depthwise k x k (no padding) -> 1x1 (bias) as one k x k convolution with
    padding 1 (see the module docstring)."""
    w0 = np.asarray(first.weight, np.float64)[:, :, 0, 0]           # [C, I]
    d = np.asarray(dw.weight, np.float64)[:, 0]                      # [C, k, k]
    w2 = np.asarray(last.weight, np.float64)[:, :, 0, 0]            # [O, C]
    kernel = np.einsum("oc,ckl,ci->oikl", w2, d, w0)
    bias = _bias(last) + w2 @ (_bias(first) * d.sum(axis=(1, 2))) + (w2 @ _bias(dw) if dw.bias is not None else 0)
    return Conv(name, first.inputs, tuple(last.shape), weight=kernel, bias=bias, stride=1,
                padding=int(first.padding), groups=1)


def fuse_sepconv(dw: Conv, pw: Conv, name: str) -> Conv:
    """Depthwise k x k (on spikes) -> 1x1 (bias) as one k x k convolution."""
    d = np.asarray(dw.weight, np.float64)[:, 0]                      # [C, k, k]
    w2 = np.asarray(pw.weight, np.float64)[:, :, 0, 0]              # [O, C]
    kernel = w2[:, :, None, None] * d[None]
    bias = _bias(pw) + (w2 @ _bias(dw) if dw.bias is not None else 0)
    return replace(dw, name=name, shape=tuple(pw.shape), weight=kernel, bias=bias, groups=1)


def _repconv_name(last: str) -> str:
    suffix = ".0.body.2.1"
    return last[: -len(suffix)] if last.endswith(suffix) else f"{last}.reparam"


def _sepconv_name(dw: str, pw: str) -> str:
    if dw.endswith(".dwconv") and pw.endswith(".pwconv2"):
        return dw[: -len("dwconv")] + "dwconv_pwconv2"
    return f"{pw}.reparam"


def find_fusions(g: Graph) -> list[tuple]:
    """The chains to fuse, in graph order: ("repconv", first, dw, last) and ("sepconv", dw, pw)."""
    out, taken = [], set()
    for n in g.nodes:
        if n.name in taken or not isinstance(n, Conv) or g[n.inputs[0]].out_kind != SPIKE:
            continue
        nxt = _only_consumer(g, n.name)
        if _is_pointwise(n, padding=1) and _is_depthwise(nxt) and nxt.padding == 0:
            last = _only_consumer(g, nxt.name)
            if _is_pointwise(last):
                out.append(("repconv", n, nxt, last))
                taken.update((n.name, nxt.name, last.name))
        elif _is_depthwise(n) and _is_pointwise(nxt):
            out.append(("sepconv", n, nxt))
            taken.update((n.name, nxt.name))
    return out


def reparameterize(g: Graph) -> Graph:
    """The re-parameterized graph of a BN-folded float graph (see the module docstring)."""
    if not g.meta.get("folded") or g.meta.get("quantized"):
        raise DeployError("re-parameterization takes a BN-folded float graph (before quantization)")
    fusions = find_fusions(g)
    if not fusions:
        raise DeployError("nothing to re-parameterize: no RepConv or SepConv chain (a V2 graph has them)")
    replaced: dict[str, Node] = {}      # the last node of a chain -> the fused node
    dropped: set = set()
    for f in fusions:
        if f[0] == "repconv":
            _, first, dw, last = f
            fused = fuse_repconv(first, dw, last, _repconv_name(last.name))
            dropped.update((first.name, dw.name))
        else:
            _, dw, pw = f
            fused = fuse_sepconv(dw, pw, _sepconv_name(dw.name, pw.name))
            last = pw
            dropped.add(dw.name)
        replaced[last.name] = fused
    renamed = {old: new.name for old, new in replaced.items()}
    nodes = []
    for n in g.nodes:
        if n.name in dropped:
            continue
        n = replaced.get(n.name, n)
        if any(i in renamed for i in n.inputs):
            n = replace(n, inputs=tuple(renamed.get(i, i) for i in n.inputs))
        nodes.append(n)
    return g.replace_nodes(nodes, reparam=True)


def reparam_cost(plain: Graph, fused: Graph) -> dict:
    """Parameters before and after, and the synaptic ops by kind (`ir.dataflow`), with their dense
    multiply-accumulates per sample and step (FLOPs, the paper's FL): what re-parameterization costs
    in parameters and gains in MACs turned into ACs."""
    from sdt_deploy.ir.dataflow import dataflow

    def by_kind(g: Graph) -> dict:
        out: dict = {}
        for o in dataflow(g)["ops"]:
            kind = "MAC (encoder)" if o["encoder"] else o["kind"]
            row = out.setdefault(kind, {"ops": 0, "flops": 0})
            row["ops"] += 1
            row["flops"] += _dense_flops(g, g[o["name"]])
        return out

    before, after = plain.param_count(), fused.param_count()
    return {"params_plain": before, "params_reparam": after, "params_added": after - before,
            "params_ratio": after / before if before else None,
            "ops_plain": by_kind(plain), "ops_reparam": by_kind(fused)}


def _dense_flops(g: Graph, n: Node) -> int:
    """Multiply-accumulates of one dense pass of a synaptic op, one sample and step."""
    from sdt_deploy.ir.graph import KVProduct, Linear, QKVProduct

    if isinstance(n, Conv):
        c_out, cg, kh, kw = n.weight_shape
        return int(kh * kw * cg * c_out * np.prod(n.shape[1:]))
    if isinstance(n, Linear):
        return int(np.prod(n.weight_shape))
    if isinstance(n, (KVProduct, QKVProduct)):
        C = g[n.inputs[0]].shape[0]
        return int(C * (C // n.heads) * np.prod(g[n.inputs[0]].shape[1:]))
    return 0
