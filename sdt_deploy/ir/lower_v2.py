"""Lowering a Meta-SpikeFormer (SDT V2, `models.sdt_v2`) into the deploy graph.

Every node is named after the original module it computes (`downsample1_2.encode_conv`,
`ConvBlock1_1.0.Conv.dwconv`, `block3.0.attn.q_conv.0.body.1`, `lif`, `head`), so every LIF node has the
name of its tap in the original model; nodes without a module of their own get a suffix on their owner:

- `<conv block>.Conv.add` (x + SepConv(x)), `<conv block>.add` (the second residual),
  `<block>.attn.add`, `<block>.mlp.add` (the membrane shortcuts);
- `<block>.attn.kv` (`KVProduct`) and `<block>.attn.qkv` (`QKVProduct`, with the 0.125 scale), the
  names of the original's integer taps;
- `head_mean` (the mean over the tokens before `lif`), `readout`.

Tensors are laid out [C, H, W] throughout. The original feeds `attn_lif`, `mlp.fc1_lif` and `mlp.fc2_lif`
the same values flattened to [C, N] (N = H*W, token n = y*W + x): the same neurons in the same order,
reshaped (`original_tap_shape`). The MLP's `Conv1d(k=1)` and `BatchNorm1d` over [C, N] are the 1x1
convolution and BatchNorm over [C, H, W]; the linear layers' weights [O, I, 1] become [O, I, 1, 1].

The lowered graph holds the original's every op, BatchNorms and `BNAndPad` rings unfolded (`fold_bn`
folds them), for one input size: `input_hw`, by default the configuration's square `img_size`.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch.nn as nn

from models import MetaSpikeFormer, V2Config
from models.sdt_v2 import ATTN_SCALE, BNAndPad
from sdt_deploy.errors import DeployError
from sdt_deploy.ir.graph import (
    Add,
    BatchNorm,
    BNPad,
    Graph,
    Input,
    KdReadout,
    KVProduct,
    Linear,
    QKVProduct,
    Readout,
    SpatialMean,
)
from sdt_deploy.ir.lower import _Builder, _conv, _conv_bn, _lif

FAMILY = "v2"


def is_v2_graph(g: Graph) -> bool:
    return g.meta.get("family") == FAMILY


def _attn_scale_exp() -> int:
    e = -np.log2(ATTN_SCALE)
    if e != int(e):
        raise DeployError(f"the attention scale {ATTN_SCALE} is not a power of two")
    return int(e)


def _conv_maybe_bn(b: _Builder, conv: nn.Conv2d, bn: nn.Module, conv_name: str, bn_name: str, src: str,
                   shape: tuple) -> str:
    """A conv and the BatchNorm after it (none in a folded model); 1-D ones (the MLP's) as 1x1 2-D."""
    if isinstance(conv, nn.Conv1d):
        node = _conv(conv, conv_name, src, shape, b.array)
        node.weight = node.weight.reshape(node.weight.shape + (1,))     # [O, I, 1] -> [O, I, 1, 1]
        out = b.add(node)
        if isinstance(bn, nn.BatchNorm1d):
            out = b.add(BatchNorm(bn_name, (out,), shape, weight=b.array(bn.weight), bias=b.array(bn.bias),
                                  mean=b.array(bn.running_mean), var=b.array(bn.running_var), eps=float(bn.eps)))
        return out
    if isinstance(bn, nn.BatchNorm1d):
        raise DeployError(f"{bn_name}: a BatchNorm1d after a 2-D convolution")
    return _conv_bn(b, conv, bn, conv_name, bn_name, src, shape)


def _size_after(size: tuple, conv: nn.Conv2d) -> tuple:
    (k, _), (s, _), (p, _) = conv.kernel_size, conv.stride, conv.padding
    return tuple((n + 2 * p - k) // s + 1 for n in size)


def _downsample(b: _Builder, ds, p: str, x: str, size: tuple) -> tuple[str, tuple]:
    if hasattr(ds, "encode_lif"):
        x = b.add(_lif(ds.encode_lif, f"{p}.encode_lif", x, b.shape_of(x)))
    size = _size_after(size, ds.encode_conv)
    shape = (ds.encode_conv.out_channels,) + size
    return _conv_maybe_bn(b, ds.encode_conv, ds.encode_bn, f"{p}.encode_conv", f"{p}.encode_bn", x, shape), size


def _sepconv(b: _Builder, sep, p: str, x: str, shape: tuple) -> str:
    C, H, W = shape
    med = sep.pwconv1.out_channels
    s = b.add(_lif(sep.lif1, f"{p}.lif1", x, shape))
    h = _conv_maybe_bn(b, sep.pwconv1, sep.bn1, f"{p}.pwconv1", f"{p}.bn1", s, (med, H, W))
    s = b.add(_lif(sep.lif2, f"{p}.lif2", h, (med, H, W)))
    if hasattr(sep, "dwconv_pwconv2"):
        return _conv_maybe_bn(b, sep.dwconv_pwconv2, sep.bn2, f"{p}.dwconv_pwconv2", f"{p}.bn2", s, shape)
    h = b.add(_conv(sep.dwconv, f"{p}.dwconv", s, (med, H, W), b.array))
    return _conv_maybe_bn(b, sep.pwconv2, sep.bn2, f"{p}.pwconv2", f"{p}.bn2", h, shape)


def _conv_block(b: _Builder, blk, p: str, x: str, shape: tuple) -> str:
    C, H, W = shape
    y = _sepconv(b, blk.Conv, f"{p}.Conv", x, shape)
    x = b.add_node_add(f"{p}.Conv.add", (y, x), shape)
    s = b.add(_lif(blk.lif1, f"{p}.lif1", x, shape))
    hid = (blk.conv1.out_channels, H, W)
    h = _conv_maybe_bn(b, blk.conv1, blk.bn1, f"{p}.conv1", f"{p}.bn1", s, hid)
    s = b.add(_lif(blk.lif2, f"{p}.lif2", h, hid))
    y = _conv_maybe_bn(b, blk.conv2, blk.bn2, f"{p}.conv2", f"{p}.bn2", s, shape)
    return b.add_node_add(f"{p}.add", (y, x), shape)


def _repconv(b: _Builder, seq: nn.Module, p: str, s: str, shape: tuple) -> str:
    """`q_conv` etc.: RepConv (1x1 -> BNAndPad -> depthwise 3x3 -> 1x1 -> BN) then BN; or, folded, the 1x1
    with its zero padding; or, re-parameterized, one 3x3 convolution."""
    if isinstance(seq, nn.Conv2d):
        return b.add(_conv(seq, p, s, shape, b.array))
    rep, outer_bn = seq[0], seq[1]
    body = rep.body
    C, H, W = shape
    first = b.add(_conv(body[0], f"{p}.0.body.0", s, (C, H + 2 * body[0].padding[0], W + 2 * body[0].padding[0]),
                        b.array))
    pad_module = body[1]
    if isinstance(pad_module, BNAndPad):
        bn = pad_module.bn
        P = pad_module.pad_pixels
        first = b.add(BNPad(f"{p}.0.body.1", (first,), (C, H + 2 * P, W + 2 * P), weight=b.array(bn.weight),
                            bias=b.array(bn.bias), mean=b.array(bn.running_mean), var=b.array(bn.running_var),
                            eps=float(bn.eps), pad=P))
    padded = b.shape_of(first)
    dw = body[2][0]
    h = b.add(_conv(dw, f"{p}.0.body.2.0", first, (C,) + _size_after(padded[1:], dw), b.array))
    h = _conv_maybe_bn(b, body[2][1], body[2][2], f"{p}.0.body.2.1", f"{p}.0.body.2.2", h, shape)
    if isinstance(outer_bn, nn.BatchNorm2d):
        h = _conv_bn_after(b, outer_bn, f"{p}.1", h, shape)
    return h


def _conv_bn_after(b: _Builder, bn: nn.BatchNorm2d, name: str, src: str, shape: tuple) -> str:
    return b.add(BatchNorm(name, (src,), shape, weight=b.array(bn.weight), bias=b.array(bn.bias),
                           mean=b.array(bn.running_mean), var=b.array(bn.running_var), eps=float(bn.eps)))


def _attention(b: _Builder, attn, p: str, x: str, shape: tuple) -> str:
    s = b.add(_lif(attn.head_lif, f"{p}.head_lif", x, shape))
    qkv = {}
    for key in ("q", "k", "v"):
        h = _repconv(b, getattr(attn, f"{key}_conv"), f"{p}.{key}_conv", s, shape)
        qkv[key] = b.add(_lif(getattr(attn, f"{key}_lif"), f"{p}.{key}_lif", h, shape))
    C = shape[0]
    heads = int(attn.num_heads)
    d = C // heads
    kv = b.add(KVProduct(f"{p}.kv", (qkv["k"], qkv["v"]), (heads, d, d), heads=heads))
    a = b.add(QKVProduct(f"{p}.qkv", (qkv["q"], kv), shape, heads=heads, scale_exp=_attn_scale_exp()))
    a = b.add(_lif(attn.attn_lif, f"{p}.attn_lif", a, shape))
    return _repconv(b, attn.proj_conv, f"{p}.proj_conv", a, shape)


def _mlp(b: _Builder, mlp, p: str, x: str, shape: tuple) -> str:
    hid = (mlp.c_hidden,) + shape[1:]
    s = b.add(_lif(mlp.fc1_lif, f"{p}.fc1_lif", x, shape))
    h = _conv_maybe_bn(b, mlp.fc1_conv, mlp.fc1_bn, f"{p}.fc1_conv", f"{p}.fc1_bn", s, hid)
    s = b.add(_lif(mlp.fc2_lif, f"{p}.fc2_lif", h, hid))
    return _conv_maybe_bn(b, mlp.fc2_conv, mlp.fc2_bn, f"{p}.fc2_conv", f"{p}.fc2_bn", s, shape)


def _block(b: _Builder, blk, p: str, x: str, shape: tuple) -> str:
    y = _attention(b, blk.attn, f"{p}.attn", x, shape)
    x = b.add_node_add(f"{p}.attn.add", (y, x), shape)
    y = _mlp(b, blk.mlp, f"{p}.mlp", x, shape)
    return b.add_node_add(f"{p}.mlp.add", (y, x), shape)


class _V2Builder(_Builder):
    def shape_of(self, name: str) -> tuple:
        return next(n.shape for n in reversed(self.nodes) if n.name == name)

    def add_node_add(self, name: str, inputs: tuple, shape: tuple) -> str:
        return self.add(Add(name, inputs, shape))


def lower_v2(model: MetaSpikeFormer, copy: bool = True, input_hw: Optional[tuple] = None) -> Graph:
    """The deploy graph of a Meta-SpikeFormer for [C, H, W] inputs of `input_hw` (default img_size square):
    float64 copies of its parameters, or (`copy=False`) read-only views of the model's tensors."""
    cfg: V2Config = model.cfg
    H, W = input_hw or (cfg.img_size, cfg.img_size)
    b = _V2Builder(copy)
    x = b.add(Input("input", (), (cfg.in_channels, H, W)))
    size = (H, W)
    x, size = _downsample(b, model.downsample1_1, "downsample1_1", x, size)
    d0, e0, e1, e2, e3 = cfg.stage_dims
    x = _conv_block(b, model.ConvBlock1_1[0], "ConvBlock1_1.0", x, (d0,) + size)
    x, size = _downsample(b, model.downsample1_2, "downsample1_2", x, size)
    x = _conv_block(b, model.ConvBlock1_2[0], "ConvBlock1_2.0", x, (e0,) + size)
    x, size = _downsample(b, model.downsample2, "downsample2", x, size)
    x = _conv_block(b, model.ConvBlock2_1[0], "ConvBlock2_1.0", x, (e1,) + size)
    x = _conv_block(b, model.ConvBlock2_2[0], "ConvBlock2_2.0", x, (e1,) + size)
    x, size = _downsample(b, model.downsample3, "downsample3", x, size)
    for j, blk in enumerate(model.block3):
        x = _block(b, blk, f"block3.{j}", x, (e2,) + size)
    x, size = _downsample(b, model.downsample4, "downsample4", x, size)
    for j, blk in enumerate(model.block4):
        x = _block(b, blk, f"block4.{j}", x, (e3,) + size)
    if model.head_pool == "sum":
        raise DeployError("lower_v2 takes a model that averages its tokens (head_pool 'mean'); the quantizer "
                          "makes the sum")
    pooled = b.add(SpatialMean("head_mean", (x,), (e3,)))
    s = b.add(_lif(model.lif, "lif", pooled, (e3,)))
    K = cfg.num_classes
    if K > 0:
        heads = [b.add(Linear(name, (s,), (K,), weight=b.array(m.weight), bias=b.array(m.bias)))
                 for name, m in (("head", model.head), ("head_kd", getattr(model, "head_kd", None))) if m is not None]
    else:   # no head: the output is the mean over T of the features (the original's nn.Identity heads)
        heads = [s]
    out_shape = (K,) if K > 0 else (e3,)
    if len(heads) == 2:
        b.add(KdReadout("readout", tuple(heads), out_shape, mode="mean"))
    else:
        b.add(Readout("readout", (heads[0],), out_shape, mode="mean"))
    meta = {"family": FAMILY, "config": cfg.to_dict(), "time_steps": cfg.time_steps, "folded": bool(model.folded),
            "quantized": False, "head_pool": "mean", "token_shape": [e3, *size], "input_hw": [H, W],
            "reparam": model.form == "reparam"}
    return Graph(b.nodes, meta)


# the LIFs whose input the original flattens to [C, N] before the neuron
FLAT_TAPS = (".attn.attn_lif", ".mlp.fc1_lif", ".mlp.fc2_lif")


def original_tap_shape(name: str, shape: tuple) -> tuple:
    """The shape of the original's tap of a graph node (per sample, one step): [C, N] for the LIFs the
    original feeds flattened tokens, [heads, N, d] for `qkv` (the graph's [C, H, W] channel layout,
    before the scale), the node's shape otherwise."""
    if name.endswith(FLAT_TAPS):
        return (shape[0], int(np.prod(shape[1:])))
    return tuple(shape)


def qkv_to_original(values: np.ndarray, heads: int) -> np.ndarray:
    """The graph's `qkv` [T, B, C, H, W] (c = h*d + j, token n) as the original's `q @ kv` tap
    [T, B, heads, N, d]."""
    T, B, C, H, W = values.shape
    return values.reshape(T, B, heads, C // heads, H * W).transpose(0, 1, 2, 4, 3)
