"""The layer listing of a torch SDT: module path, kind, shape, and whether forward ever calls it."""
from __future__ import annotations

import torch.nn as nn

from models import SDTConfig
from models.neurons import decay_of, is_neuron

# Built by the original code, present in its state dict, never called in forward.
UNCALLED_SUFFIXES = ("patch_embed.rpe_lif", ".attn.attn_lif", ".attn.talking_heads")


def uncalled(name: str) -> bool:
    return any(name == s or name.endswith(s) for s in UNCALLED_SUFFIXES)


def unused_pools(cfg: SDTConfig) -> set[str]:
    names = ("maxpool", "maxpool1", "maxpool2", "maxpool3")
    return {f"patch_embed.{n}" for n, bit in zip(names, cfg.pooling_stat) if bit == "0"}


def layer_table(model: nn.Module, cfg) -> list[dict]:
    """One row per module; V2 (a `V2Config`) calls every module it builds (its `attn_lif` is called)."""
    rows = []
    v1 = isinstance(cfg, SDTConfig)
    skip_pools = unused_pools(cfg) if v1 else set()
    for name, m in model.named_modules():
        if not name or list(m.children()) and not is_neuron(m):
            continue
        if is_neuron(m):
            kind = type(m).__name__
            info = {"v_threshold": float(m.v_threshold), "tau": round(1.0 / decay_of(m), 6)}
            shape = ()
        elif isinstance(m, nn.Conv2d):
            kind, shape = "Conv2d", tuple(m.weight.shape)
            info = {"stride": m.stride[0], "padding": m.padding[0], "bias": m.bias is not None}
            if m.groups != 1:
                info["groups"] = m.groups
        elif isinstance(m, nn.Conv1d):
            kind, shape, info = "Conv1d", tuple(m.weight.shape), {}
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            kind, shape, info = type(m).__name__, (m.num_features,), {"eps": m.eps}
        elif isinstance(m, nn.Linear):
            kind, shape, info = "Linear", tuple(m.weight.shape), {"bias": m.bias is not None}
        elif isinstance(m, (nn.MaxPool2d, nn.MaxPool3d)):
            kind, shape = type(m).__name__, ()
            info = {"kernel": m.kernel_size, "stride": m.stride}
        else:
            continue
        params = sum(p.numel() for p in m.parameters(recurse=False))
        called = not ((v1 and uncalled(name)) or name in skip_pools)
        rows.append({"name": name, "kind": kind, "shape": list(shape), "params": params,
                     "called": called, **info})
    return rows
