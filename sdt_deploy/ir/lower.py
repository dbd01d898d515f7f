"""Lowering: a `models` SDT (any variant) into the deploy graph.

The SDT's structure is fixed and known, so lowering walks it by name rather than tracing it: every
node is named after the module it comes from, and every spike tensor of the torch model's layer-name
contract (`models.spike_names`) is the output of the graph node of the same name.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from models import MetaSpikeFormer, SDTConfig, SpikeDrivenTransformer
from sdt_deploy.ir.graph import (
    LIF,
    SPIKE,
    Add,
    And,
    BatchNorm,
    Broadcast,
    Conv,
    Graph,
    Input,
    Linear,
    MaxPool,
    OrPool,
    Readout,
    SpatialMean,
    TokenSum,
)


def _f64(t: torch.Tensor | None):
    """A float64 copy of a parameter (one copy: `.double()` of a float64 tensor would be the tensor)."""
    if t is None:
        return None
    t = t.detach().cpu()
    return (t.clone() if t.dtype == torch.float64 else t.double()).numpy()


def _view(t: torch.Tensor | None):
    """The parameter's own memory as a read-only array, in its own dtype (no copy; float32/64 only)."""
    if t is None or t.dtype not in (torch.float32, torch.float64):
        return _f64(t)
    a = t.detach().cpu().numpy()
    a.flags.writeable = False
    return a


class _Builder:
    def __init__(self, copy: bool = True):
        self.nodes = []
        self.array = _f64 if copy else _view

    def add(self, node):
        self.nodes.append(node)
        return node.name


def _lif(module, name: str, src: str, shape: tuple) -> LIF:
    w = float(module.w.detach().float()) if hasattr(module, "w") else None
    tau = float(1.0 / torch.sigmoid(module.w.detach().float())) if w is not None else float(module.tau)
    return LIF(name, (src,), shape, v_threshold=float(module.v_threshold), tau=tau, plif_w=w,
               v_reset=float(module.v_reset))


def _conv(module: nn.Conv2d, name: str, src: str, shape: tuple, array=_f64) -> Conv:
    return Conv(name, (src,), shape, weight=array(module.weight), bias=array(module.bias),
                stride=module.stride[0], padding=module.padding[0], groups=module.groups)


def _conv_bn(b: _Builder, conv: nn.Conv2d, bn: nn.Module, conv_name: str, bn_name: str, src: str,
             shape: tuple) -> str:
    """Conv then BatchNorm (or nothing, in a folded model)."""
    out = b.add(_conv(conv, conv_name, src, shape, b.array))
    if isinstance(bn, nn.BatchNorm2d):
        out = b.add(BatchNorm(bn_name, (out,), shape, weight=b.array(bn.weight), bias=b.array(bn.bias),
                              mean=b.array(bn.running_mean), var=b.array(bn.running_var), eps=float(bn.eps)))
    return out


def lower(model: SpikeDrivenTransformer, copy: bool = True) -> Graph:
    """The deploy graph of a model: float64 copies of its parameters, or (`copy=False`, for a graph
    consumed at once by `fold_and_quantize`) read-only views of the model's own tensors, in their dtype
    -- then the graph changes if the model does. A V2 Meta-SpikeFormer is lowered by `ir.lower_v2`."""
    if isinstance(model, MetaSpikeFormer):
        from sdt_deploy.ir.lower_v2 import lower_v2

        return lower_v2(model, copy=copy)
    cfg: SDTConfig = model.cfg
    b = _Builder(copy)
    S = cfg.img_size
    x = b.add(Input("input", (), (cfg.in_channels, S, S)))
    pe = model.patch_embed
    size = S
    stages = ((pe.proj_conv, pe.proj_bn, pe.proj_lif, "", "maxpool"),
              (pe.proj_conv1, pe.proj_bn1, pe.proj_lif1, "1", "maxpool1"),
              (pe.proj_conv2, pe.proj_bn2, pe.proj_lif2, "2", "maxpool2"))
    for i, (conv, bn, lif, sfx, pool) in enumerate(stages):
        shape = (conv.out_channels, size, size)
        h = _conv_bn(b, conv, bn, f"patch_embed.proj_conv{sfx}", f"patch_embed.proj_bn{sfx}", x, shape)
        x = b.add(_lif(lif, f"patch_embed.proj_lif{sfx}", h, shape))
        if cfg.pooling_stat[i] == "1":
            size = (size + 1) // 2
            x = b.add(OrPool(f"patch_embed.{pool}", (x,), (conv.out_channels, size, size), kernel=3, stride=2,
                             padding=1))
    D = cfg.dim
    feat = _conv_bn(b, pe.proj_conv3, pe.proj_bn3, "patch_embed.proj_conv3", "patch_embed.proj_bn3", x,
                    (D, size, size))
    if cfg.pooling_stat[3] == "1":
        size = (size + 1) // 2
        feat = b.add(MaxPool("patch_embed.maxpool3", (feat,), (D, size, size), kernel=3, stride=2, padding=1))
    tok = (D, size, size)
    s = b.add(_lif(pe.proj_lif3, "patch_embed.proj_lif3", feat, tok))
    rpe = _conv_bn(b, pe.rpe_conv, pe.rpe_bn, "patch_embed.rpe_conv", "patch_embed.rpe_bn", s, tok)
    stream = b.add(Add("patch_embed.rpe_add", (rpe, feat), tok))

    for j, blk in enumerate(model.block):
        stream = _lower_attn(b, blk.attn, f"block.{j}.attn", stream, cfg, tok)
        stream = _lower_mlp(b, blk.mlp, f"block.{j}.mlp", stream, cfg, tok)

    if getattr(model, "head_pool", "mean") == "sum":
        pooled = b.add(TokenSum("head_sum", (stream,), (D,)))
    else:
        pooled = b.add(SpatialMean("head_mean", (stream,), (D,)))
    hs = b.add(_lif(model.head_lif, "head_lif", pooled, (D,)))
    head = model.head
    logits = b.add(Linear("head", (hs,), (cfg.num_classes,), weight=b.array(head.weight),
                          bias=b.array(head.bias)))
    b.add(Readout("readout", (logits,), (cfg.num_classes,), mode="per_step" if cfg.tet else "mean"))
    meta = {"config": cfg.to_dict(), "time_steps": cfg.time_steps, "folded": bool(model.folded),
            "quantized": False, "head_pool": getattr(model, "head_pool", "mean"), "token_shape": list(tok)}
    return Graph(b.nodes, meta)


def _lower_attn(b: _Builder, attn, p: str, stream: str, cfg: SDTConfig, tok: tuple) -> str:
    D, heads = cfg.dim, cfg.num_heads
    s = b.add(_lif(attn.shortcut_lif, f"{p}.shortcut_lif", stream, tok))
    branches = {}
    for key in ("q", "k", "v"):
        conv, bn, lif = getattr(attn, f"{key}_conv"), getattr(attn, f"{key}_bn"), getattr(attn, f"{key}_lif")
        h = _conv_bn(b, conv, bn, f"{p}.{key}_conv", f"{p}.{key}_bn", s, tok)
        branches[key] = b.add(_lif(lif, f"{p}.{key}_lif", h, tok))
    k, v = branches["k"], branches["v"]
    if cfg.dvs_mode:
        k = b.add(OrPool(f"{p}.k_pool", (k,), tok))
        v = b.add(OrPool(f"{p}.v_pool", (v,), tok))
    kv = b.add(And(f"{p}.kv_and", (k, v), tok))
    if cfg.dvs_mode:
        kv = b.add(OrPool(f"{p}.kv_pool", (kv,), tok, layout="heads", heads=heads))
    counts = b.add(TokenSum(f"{p}.kv_sum", (kv,), (D,)))
    g = b.add(_lif(attn.talking_heads_lif, f"{p}.talking_heads_lif", counts, (D,)))
    gb = b.add(Broadcast(f"{p}.talking_heads_broadcast", (g,), tok, of_kind=SPIKE))
    a = b.add(And(f"{p}.q_mask", (branches["q"], gb), tok))
    if cfg.dvs_mode:
        a = b.add(OrPool(f"{p}.q_mask_pool", (a,), tok, layout="heads", heads=heads))
    y = _conv_bn(b, attn.proj_conv, attn.proj_bn, f"{p}.proj_conv", f"{p}.proj_bn", a, tok)
    return b.add(Add(f"{p}.add", (y, stream), tok))


def _lower_mlp(b: _Builder, mlp, p: str, stream: str, cfg: SDTConfig, tok: tuple) -> str:
    hid = (cfg.hidden_dim,) + tok[1:]
    s = b.add(_lif(mlp.fc1_lif, f"{p}.fc1_lif", stream, tok))
    h = _conv_bn(b, mlp.fc1_conv, mlp.fc1_bn, f"{p}.fc1_conv", f"{p}.fc1_bn", s, hid)
    identity = stream
    if mlp.res:
        h = b.add(Add(f"{p}.hidden_add", (h, stream), hid))
        identity = h
    s2 = b.add(_lif(mlp.fc2_lif, f"{p}.fc2_lif", h, hid))
    y = _conv_bn(b, mlp.fc2_conv, mlp.fc2_bn, f"{p}.fc2_conv", f"{p}.fc2_bn", s2, tok)
    return b.add(Add(f"{p}.add", (y, identity), tok))


def spike_tensor_names(g: Graph) -> list[str]:
    """The graph's nodes that correspond to the torch model's recorded spike tensors."""
    skip_suffix = ("_broadcast",)
    names = []
    for n in g.spike_nodes():
        if n.name.endswith(skip_suffix) or (isinstance(n, OrPool) and n.name.startswith("patch_embed.maxpool")):
            continue
        names.append(n.name)
    return names
