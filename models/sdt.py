"""The Spike-Driven Transformer (Yao et al., NeurIPS 2023) in PyTorch + spikingjelly.

State-dict compatible with the original BICLab code: the module tree has the same paths and
parameter names (`patch_embed.proj_conv`, `block.0.attn.q_bn`, `head`, ...), including the modules the
original builds but never calls in forward (`patch_embed.rpe_lif`, `attn_lif`, `talking_heads`), so
`load_state_dict(strict=True)` takes an original checkpoint as is.

The arithmetic follows the original op for op (convolutions on the time-flattened batch, eval-mode
BatchNorm, spikingjelly's LIF), so a float checkpoint computes bit-identical spikes. The SDSA is computed
in the [T, B, C, H, W] layout: the products and token sums are of 0/1 values, hence exact in any layout;
only the `dvs_mode` pools need the [heads, N, C/heads] layout, and get it.

`forward(x, taps)` records every spike tensor under its contract name (see `spike_names`).

A *folded* model (`folded=True`) has a bias on every convolution and no BatchNorm: the form that carries
BN-folded or quantized weights. `head_pool="sum"` sums instead of averaging the tokens before
`head_lif`; the quantized model uses it with the threshold scaled by H*W, which is exact where a float
division by H*W is not.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import SDTConfig
from .neurons import make_neuron

Taps = Optional[dict]


def _conv(cin: int, cout: int, k: int, bias: bool) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=k, stride=1, padding=k // 2, bias=bias)


def _bn(c: int, folded: bool) -> nn.Module:
    return nn.Identity() if folded else nn.BatchNorm2d(c)


def _record(taps: Taps, name: str, x: torch.Tensor) -> None:
    if taps is not None:
        taps[name] = x.detach()


def spatial_or_pool(x: torch.Tensor) -> torch.Tensor:
    """3x3, stride 1, pad 1 max (= OR on spikes) over (H, W) of a [T, B, C, H, W] tensor."""
    T, B = x.shape[:2]
    return F.max_pool2d(x.flatten(0, 1), 3, 1, 1).reshape(x.shape)


def to_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[T, B, C, H, W] -> [T, B, heads, N, C/heads] with token n = y*W + x, channel c = head*C/heads + j."""
    T, B, C, H, W = x.shape
    return x.flatten(3).transpose(-1, -2).reshape(T, B, H * W, heads, C // heads).permute(0, 1, 3, 2, 4)


def from_heads(x: torch.Tensor, H: int, W: int) -> torch.Tensor:
    T, B, heads, N, ch = x.shape
    return x.transpose(3, 4).reshape(T, B, heads * ch, H, W)


def heads_or_pool(x: torch.Tensor, heads: int) -> torch.Tensor:
    """The dvs_mode pool as the original applies it to k*v and to the masked output: a 3x3 max over
    (token index, channel within head) of the [heads, N, C/heads] layout, so token neighbours wrap
    across rows of the token grid and channels never cross a head."""
    T, B, C, H, W = x.shape
    xh = to_heads(x, heads)
    pooled = F.max_pool2d(xh.flatten(0, 2), 3, 1, 1).reshape(xh.shape)
    return from_heads(pooled, H, W)


class MS_SPS(nn.Module):
    """Spiking patch splitting: four conv-BN(-LIF) stages with optional max-pools, then the relative
    position embedding; returns the residual stream (a current) [T, B, dim, H', W']."""

    def __init__(self, cfg: SDTConfig, folded: bool = False):
        super().__init__()
        c0, c1, c2, c3 = cfg.stem_dims
        self.pooling_stat = cfg.pooling_stat
        mode = cfg.spike_mode
        self.proj_conv = _conv(cfg.in_channels, c0, 3, folded)
        self.proj_bn = _bn(c0, folded)
        self.proj_lif = make_neuron(mode)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.proj_conv1 = _conv(c0, c1, 3, folded)
        self.proj_bn1 = _bn(c1, folded)
        self.proj_lif1 = make_neuron(mode)
        self.maxpool1 = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.proj_conv2 = _conv(c1, c2, 3, folded)
        self.proj_bn2 = _bn(c2, folded)
        self.proj_lif2 = make_neuron(mode)
        self.maxpool2 = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.proj_conv3 = _conv(c2, c3, 3, folded)
        self.proj_bn3 = _bn(c3, folded)
        self.proj_lif3 = make_neuron(mode)
        self.maxpool3 = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.rpe_conv = _conv(c3, c3, 3, folded)
        self.rpe_bn = _bn(c3, folded)
        self.rpe_lif = make_neuron(mode)  # built by the original, never called

    def forward(self, x: torch.Tensor, taps: Taps = None) -> torch.Tensor:
        T, B = x.shape[:2]
        stages = (
            (self.proj_conv, self.proj_bn, self.proj_lif, self.maxpool, "proj_lif"),
            (self.proj_conv1, self.proj_bn1, self.proj_lif1, self.maxpool1, "proj_lif1"),
            (self.proj_conv2, self.proj_bn2, self.proj_lif2, self.maxpool2, "proj_lif2"),
        )
        h = x.flatten(0, 1)
        for i, (conv, bn, lif, pool, name) in enumerate(stages):
            h = bn(conv(h))
            s = lif(h.reshape(T, B, *h.shape[1:]).contiguous())
            _record(taps, f"patch_embed.{name}", s)
            h = s.flatten(0, 1).contiguous()
            if self.pooling_stat[i] == "1":
                h = pool(h)
        x_feat = self.proj_bn3(self.proj_conv3(h))
        if self.pooling_stat[3] == "1":
            x_feat = self.maxpool3(x_feat)  # on currents: the only real-valued max-pool
        s = self.proj_lif3(x_feat.reshape(T, B, *x_feat.shape[1:]).contiguous())
        _record(taps, "patch_embed.proj_lif3", s)
        rpe = self.rpe_bn(self.rpe_conv(s.flatten(0, 1).contiguous()))
        return (rpe + x_feat).reshape(T, B, *x_feat.shape[1:]).contiguous()


class Erode(nn.Module):
    """The original's dvs_mode pool module (kept for the module tree; forward uses the helpers)."""

    def __init__(self):
        super().__init__()
        self.pool = nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 1, 1), padding=(0, 1, 1))

    def forward(self, x):
        return self.pool(x)


class MS_SSA_Conv(nn.Module):
    """Spike-driven self-attention (SDSA) with the membrane shortcut: returns x + BN(proj(q AND g))."""

    def __init__(self, cfg: SDTConfig, path: str, folded: bool = False):
        super().__init__()
        dim, mode = cfg.dim, cfg.spike_mode
        self.path = path
        self.num_heads = cfg.num_heads
        self.dvs = cfg.dvs_mode
        if self.dvs:
            self.pool = Erode()
        self.q_conv = _conv(dim, dim, 1, folded)
        self.q_bn = _bn(dim, folded)
        self.q_lif = make_neuron(mode)
        self.k_conv = _conv(dim, dim, 1, folded)
        self.k_bn = _bn(dim, folded)
        self.k_lif = make_neuron(mode)
        self.v_conv = _conv(dim, dim, 1, folded)
        self.v_bn = _bn(dim, folded)
        self.v_lif = make_neuron(mode)
        self.attn_lif = make_neuron(mode, v_threshold=0.5)  # built by the original, never called
        self.talking_heads = nn.Conv1d(cfg.num_heads, cfg.num_heads, kernel_size=1, bias=False)  # never called
        self.talking_heads_lif = make_neuron(mode, v_threshold=0.5)
        self.proj_conv = _conv(dim, dim, 1, True)
        self.proj_bn = _bn(dim, folded)
        self.shortcut_lif = make_neuron(mode)

    def _branch(self, conv, bn, lif, flat, shape):
        return lif(bn(conv(flat)).reshape(shape).contiguous())

    def forward(self, x: torch.Tensor, taps: Taps = None) -> torch.Tensor:
        T, B, C, H, W = x.shape
        p = self.path
        s = self.shortcut_lif(x)
        _record(taps, f"{p}.shortcut_lif", s)
        flat = s.flatten(0, 1)
        q = self._branch(self.q_conv, self.q_bn, self.q_lif, flat, x.shape)
        _record(taps, f"{p}.q_lif", q)
        k = self._branch(self.k_conv, self.k_bn, self.k_lif, flat, x.shape)
        _record(taps, f"{p}.k_lif", k)
        v = self._branch(self.v_conv, self.v_bn, self.v_lif, flat, x.shape)
        _record(taps, f"{p}.v_lif", v)
        if self.dvs:
            k = spatial_or_pool(k)
            _record(taps, f"{p}.k_pool", k)
            v = spatial_or_pool(v)
            _record(taps, f"{p}.v_pool", v)
        kv = k * v
        _record(taps, f"{p}.kv_and", kv)
        if self.dvs:
            kv = heads_or_pool(kv, self.num_heads)
            _record(taps, f"{p}.kv_pool", kv)
        g = self.talking_heads_lif(kv.sum(dim=(3, 4)))  # per-channel token count, [T, B, C]
        _record(taps, f"{p}.talking_heads_lif", g)
        a = q * g[..., None, None]
        _record(taps, f"{p}.q_mask", a)
        if self.dvs:
            a = heads_or_pool(a, self.num_heads)
            _record(taps, f"{p}.q_mask_pool", a)
        y = self.proj_bn(self.proj_conv(a.flatten(0, 1))).reshape(T, B, C, H, W).contiguous()
        return y + x


class MS_MLP_Conv(nn.Module):
    """The MLP with membrane shortcut: x + BN(fc2(LIF(BN(fc1(LIF(x)))))) (inner residual when hidden == dim)."""

    def __init__(self, cfg: SDTConfig, path: str, folded: bool = False):
        super().__init__()
        dim, hidden, mode = cfg.dim, cfg.hidden_dim, cfg.spike_mode
        self.path = path
        self.res = dim == hidden
        self.c_hidden = hidden
        self.fc1_conv = _conv(dim, hidden, 1, True)
        self.fc1_bn = _bn(hidden, folded)
        self.fc1_lif = make_neuron(mode)
        self.fc2_conv = _conv(hidden, dim, 1, True)
        self.fc2_bn = _bn(dim, folded)
        self.fc2_lif = make_neuron(mode)

    def forward(self, x: torch.Tensor, taps: Taps = None) -> torch.Tensor:
        T, B, C, H, W = x.shape
        identity = x
        s = self.fc1_lif(x)
        _record(taps, f"{self.path}.fc1_lif", s)
        h = self.fc1_bn(self.fc1_conv(s.flatten(0, 1))).reshape(T, B, self.c_hidden, H, W).contiguous()
        if self.res:
            h = identity + h
            identity = h
        s = self.fc2_lif(h)
        _record(taps, f"{self.path}.fc2_lif", s)
        y = self.fc2_bn(self.fc2_conv(s.flatten(0, 1))).reshape(T, B, C, H, W).contiguous()
        return y + identity


class MS_Block_Conv(nn.Module):
    def __init__(self, cfg: SDTConfig, index: int, folded: bool = False):
        super().__init__()
        self.attn = MS_SSA_Conv(cfg, f"block.{index}.attn", folded)
        self.mlp = MS_MLP_Conv(cfg, f"block.{index}.mlp", folded)

    def forward(self, x: torch.Tensor, taps: Taps = None) -> torch.Tensor:
        return self.mlp(self.attn(x, taps), taps)


class SpikeDrivenTransformer(nn.Module):
    def __init__(self, cfg: SDTConfig, folded: bool = False, head_pool: str = "mean"):
        super().__init__()
        if head_pool not in ("mean", "sum"):
            raise ValueError(f"head_pool must be 'mean' or 'sum', got {head_pool!r}")
        self.cfg = cfg
        self.folded = folded
        self.head_pool = head_pool
        self.T = cfg.time_steps
        self.TET = cfg.tet
        self.input_quant: nn.Module = nn.Identity()
        self.patch_embed = MS_SPS(cfg, folded)
        self.block = nn.ModuleList([MS_Block_Conv(cfg, j, folded) for j in range(cfg.depth)])
        # With head_pool="sum" the tokens are summed, not averaged: the threshold takes the factor H*W.
        tokens = cfg.token_size ** 2 if head_pool == "sum" else 1
        self.head_lif = make_neuron(cfg.spike_mode, v_threshold=1.0 * tokens)
        self.head = nn.Linear(cfg.dim, cfg.num_classes)

    def time_major(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] images are repeated T times; [B, T, C, H, W] event frames set T themselves."""
        if x.dim() == 4:
            return x.unsqueeze(0).repeat(self.T, 1, 1, 1, 1)
        if x.dim() == 5:
            return x.transpose(0, 1).contiguous()
        raise ValueError(f"expected a [B,C,H,W] or [B,T,C,H,W] input, got shape {tuple(x.shape)}")

    def forward(self, x: torch.Tensor, taps: Taps = None) -> torch.Tensor:
        x = self.time_major(self.input_quant(x))
        x = self.patch_embed(x, taps)
        for blk in self.block:
            x = blk(x, taps)
        x = x.flatten(3).sum(3) if self.head_pool == "sum" else x.flatten(3).mean(3)
        s = self.head_lif(x)
        _record(taps, "head_lif", s)
        y = self.head(s)
        return y if self.TET else y.mean(0)


def build_model(cfg: SDTConfig, folded: bool = False, head_pool: str = "mean") -> SpikeDrivenTransformer:
    return SpikeDrivenTransformer(cfg, folded=folded, head_pool=head_pool).eval()


def spike_names(cfg: SDTConfig) -> list[str]:
    """Every spike tensor `forward(x, taps)` records, in execution order (the layer-name contract)."""
    names = [f"patch_embed.proj_lif{s}" for s in ("", "1", "2", "3")]
    for j in range(cfg.depth):
        a = f"block.{j}.attn"
        names += [f"{a}.shortcut_lif", f"{a}.q_lif", f"{a}.k_lif", f"{a}.v_lif"]
        if cfg.dvs_mode:
            names += [f"{a}.k_pool", f"{a}.v_pool"]
        names += [f"{a}.kv_and"]
        if cfg.dvs_mode:
            names += [f"{a}.kv_pool"]
        names += [f"{a}.talking_heads_lif", f"{a}.q_mask"]
        if cfg.dvs_mode:
            names += [f"{a}.q_mask_pool"]
        names += [f"block.{j}.mlp.fc1_lif", f"block.{j}.mlp.fc2_lif"]
    return names + ["head_lif"]


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class InputQuantizer(nn.Module):
    """Puts the input on the power-of-two grid 2**-grid: round half to even, saturate to `bits` signed."""

    def __init__(self, grid: int, bits: int):
        super().__init__()
        self.grid, self.bits = int(grid), int(bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = float(2.0 ** self.grid)
        lo, hi = -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1
        return torch.clamp(torch.round(x * scale), lo, hi) / scale

    def extra_repr(self) -> str:
        return f"grid=2**-{self.grid}, bits={self.bits}"
