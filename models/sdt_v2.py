"""Spike-Driven Transformer V2, Meta-SpikeFormer (Yao et al., ICLR 2024), in PyTorch + spikingjelly.

State-dict compatible with the original `Spiking_vit_MetaFormer` (BICLab/Spike-Driven-Transformer-V2,
`classification/models.py`): every module has the original's path (`downsample1_1`,
`ConvBlock1_1.0.Conv.lif1`, `block3.0.attn.q_conv.0.body.1.bn`, `lif`, `head`, `head_kd`), so
`load_state_dict(strict=True)` takes an original checkpoint's `model` as is.

The network, per time step t (state carried across steps, every LIF tau = 2, hard reset to 0, fires on
`H >= v_th`, v_th = 1 except `attn_lif`, 0.5); currents flow between blocks (membrane shortcut):

- `downsample*`: [LIF →] conv (7x7 s2 first, then 3x3 s2, 3x3 s1 into stage 4, with bias) → BN.
- conv block (stages 1, 2): `x = x + SepConv(x)`, SepConv = LIF → 1x1 → BN → LIF → 7x7 depthwise →
  1x1 → BN; then `x = x + BN(conv3x3(LIF(BN(conv3x3(LIF(x))))))` through 4*dim channels.
- transformer block (stages 3, 4): `x = x + attn(x)`, `x = x + mlp(x)`.
  attn: `s = head_lif(x)`; q, k, v = LIF(BN(RepConv(s))) each; per head
  `kv = k^T v` (a [C/h, C/h] integer count), `qkv = q kv`, `a = attn_lif(qkv * 0.125)`;
  out = BN(RepConv(a)). RepConv = 1x1 → BN with a 1-pixel ring of its value for 0 input → 3x3 depthwise
  (no padding) → 1x1 → BN. mlp: `BN(fc2(LIF(BN(fc1(LIF(x))))))`, 1x1 Conv1d over the tokens.
- head: mean over H, W → `lif` → `head` Linear → mean over T; with `kd` the mean of `head` and
  `head_kd` (in training mode the pair, as the original returns it).

The arithmetic follows the original op for op (convolutions on the time-flattened batch, Conv1d for the
MLP, eval-mode BatchNorm, spikingjelly's LIF, the ring value of `BNAndPad` computed in the original's
order), so a float checkpoint computes bit-identical spikes on the same machine.

Input: a [B, C, H, W] image is repeated T = `model.T` times. The original does
`x.unsqueeze(0).repeat(T, 1, 1, 1, 1)`: a [C, H, W] tensor runs as a batch of one (so does it here),
and a 5-D [B, T, C, H, W] tensor is an error there (the repeat has fewer dims than the tensor). V2 has
no event-frame path; a 5-D input is refused here with a sentence saying so.

Deployable forms (`form`), the shapes a quantized model's weights come in, module paths kept:
- `folded`: every BatchNorm folded away (`nn.Identity` at its path), every convolution with a bias; a
  `BNAndPad` becomes zero-padding of the 1x1 convolution before it (`body.0`, padding 1): a 1x1
  convolution of a zero border outputs its bias, which after the fold is BN(0), the ring's value.
- `reparam`: folded, and structurally re-parameterized: each RepConv with its outer BN is one 3x3
  convolution (padding 1) at the RepConv's path (`block3.0.attn.q_conv`), each SepConv's depthwise 7x7
  and pointwise 1x1 one 7x7 convolution `Conv.dwconv_pwconv2`; every synaptic layer then reads spikes.
The deployable forms record the taps of `attn_lif`, `fc1_lif` and `fc2_lif` in the [C, H, W] layout of
every other tap (the deploy graph's), where the original form records the [C, N] it computes them in.
With `head_pool="sum"` the tokens are summed before `lif`, whose threshold takes the factor H*W
(`tokens`): exact where dividing by H*W is not. `input_quant` puts the image on its grid.

`forward(x, taps)` records into the dict `taps`, keyed by the original module path, every LIF's output
spikes ([T, B, ...], float 0/1, as the model computed them), `<block>.attn.kv` [T, B, heads, C/h, C/h]
and `<block>.attn.qkv` [T, B, heads, N, C/h] as int32 (before the 0.125 scale), and `head.out`
(and `head_kd.out`) [T, B, classes], the Linear outputs before the mean over T. See `v2_spike_names`.
"""
from __future__ import annotations

import torch
from torch import nn

from .config_v2 import STAGE3_BLOCKS, STAGE4_BLOCKS, V2Config
from .neurons import LIF

Taps = dict | None

ATTN_SCALE = 0.125       # the original's fixed scale of q @ (k^T v), whatever the head width
ATTN_THRESHOLD = 0.5     # attn_lif's v_threshold


def _record(taps: Taps, name: str, x: torch.Tensor) -> None:
    if taps is not None:
        taps[name] = x.detach()


def bn_pad_value(bn: nn.BatchNorm2d) -> torch.Tensor:
    """What an eval-mode `bn` outputs for a zero input, per channel, in the original's float32 order:
    `beta - mean * gamma / sqrt(var + eps)`. BatchNorm itself computes `(0 - mean) / sqrt(var + eps) *
    gamma + beta` in another order, which differs by one ulp in many channels; the ring must be this."""
    return bn.bias.detach() - bn.running_mean * bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)


class BNAndPad(nn.Module):
    """BatchNorm, then a ring of `pad_pixels` filled with `bn_pad_value` (the BN of a zero border), so a
    following unpadded conv sees what a padded conv before the BN would. Module path `<...>.bn`."""

    def __init__(self, channels: int, pad_pixels: int = 1):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.pad_pixels = pad_pixels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(x)
        p = self.pad_pixels
        if p <= 0:
            return y
        n, c, h, w = y.shape
        out = bn_pad_value(self.bn).view(1, c, 1, 1).expand(n, c, h + 2 * p, w + 2 * p).clone()
        out[:, :, p:p + h, p:p + w] = y
        return out


FORMS = ("original", "folded", "reparam")


def _bn2d(c: int, form: str) -> nn.Module:
    return nn.BatchNorm2d(c) if form == "original" else nn.Identity()


class RepConv(nn.Module):
    """1x1 conv → BNAndPad → 3x3 depthwise (unpadded) → 1x1 conv → BN, all without bias, as `body`.
    Folded: the 1x1 pads its input by 1 and carries the BN's bias, the BNs are identities."""

    def __init__(self, cin: int, cout: int, form: str = "original"):
        super().__init__()
        folded = form != "original"
        self.body = nn.Sequential(
            nn.Conv2d(cin, cin, 1, padding=1 if folded else 0, bias=folded),
            nn.Identity() if folded else BNAndPad(cin, pad_pixels=1),
            nn.Sequential(
                nn.Conv2d(cin, cin, 3, groups=cin, bias=False),
                nn.Conv2d(cin, cout, 1, bias=folded),
                _bn2d(cout, form),
            ),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _repconv_bn(dim: int, form: str = "original") -> nn.Module:
    """The attention's `q_conv`/`k_conv`/`v_conv`/`proj_conv`: RepConv then one more BN; re-parameterized,
    one 3x3 convolution with padding 1 and a bias."""
    if form == "reparam":
        return nn.Conv2d(dim, dim, 3, padding=1, bias=True)
    return nn.Sequential(RepConv(dim, dim, form), _bn2d(dim, form))


class DownSampling(nn.Module):
    """[encode_lif →] encode_conv (with bias) → encode_bn on [T, B, C, H, W]. The first one has no LIF:
    it sees the image."""

    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int, padding: int, path: str,
                 first_layer: bool = False, form: str = "original"):
        super().__init__()
        self.path = path
        self.encode_conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding)
        self.encode_bn = _bn2d(cout, form)
        if not first_layer:
            self.encode_lif = LIF()

    def forward(self, x: torch.Tensor, taps: Taps = None) -> torch.Tensor:
        T, B = x.shape[:2]
        if hasattr(self, "encode_lif"):
            x = self.encode_lif(x)
            _record(taps, f"{self.path}.encode_lif", x)
        y = self.encode_conv(x.flatten(0, 1))
        return self.encode_bn(y).reshape(T, B, *y.shape[1:]).contiguous()


class SepConv(nn.Module):
    """Inverted separable conv: LIF → 1x1 (2*dim) → BN → LIF → 7x7 depthwise → 1x1 (dim) → BN."""

    def __init__(self, dim: int, path: str, form: str = "original"):
        super().__init__()
        med = 2 * dim
        self.path = path
        self.lif1 = LIF()
        self.pwconv1 = nn.Conv2d(dim, med, 1, bias=form != "original")
        self.bn1 = _bn2d(med, form)
        self.lif2 = LIF()
        if form == "reparam":   # depthwise 7x7 then pointwise 1x1 as one 7x7 convolution of the spikes
            self.dwconv_pwconv2 = nn.Conv2d(med, dim, 7, padding=3, bias=True)
        else:
            self.dwconv = nn.Conv2d(med, med, 7, padding=3, groups=med, bias=False)
            self.pwconv2 = nn.Conv2d(med, dim, 1, bias=form != "original")
        self.bn2 = _bn2d(dim, form)

    def forward(self, x: torch.Tensor, taps: Taps = None) -> torch.Tensor:
        T, B, _C, H, W = x.shape
        s = self.lif1(x)
        _record(taps, f"{self.path}.lif1", s)
        h = self.bn1(self.pwconv1(s.flatten(0, 1))).reshape(T, B, -1, H, W)
        s = self.lif2(h)
        _record(taps, f"{self.path}.lif2", s)
        if hasattr(self, "dwconv_pwconv2"):
            return self.bn2(self.dwconv_pwconv2(s.flatten(0, 1))).reshape(T, B, -1, H, W)
        h = self.dwconv(s.flatten(0, 1))
        return self.bn2(self.pwconv2(h)).reshape(T, B, -1, H, W)


class ConvBlock(nn.Module):
    """`x = x + Conv(x)`, then `x + BN(conv3x3(LIF(BN(conv3x3(LIF(x))))))` through 4*dim channels."""

    def __init__(self, dim: int, mlp_ratio: int, path: str, form: str = "original"):
        super().__init__()
        self.path = path
        folded = form != "original"
        self.Conv = SepConv(dim, f"{path}.Conv", form)
        self.lif1 = LIF()
        self.conv1 = nn.Conv2d(dim, dim * mlp_ratio, 3, padding=1, bias=folded)
        self.bn1 = _bn2d(dim * mlp_ratio, form)
        self.lif2 = LIF()
        self.conv2 = nn.Conv2d(dim * mlp_ratio, dim, 3, padding=1, bias=folded)
        self.bn2 = _bn2d(dim, form)

    def forward(self, x: torch.Tensor, taps: Taps = None) -> torch.Tensor:
        T, B, C, H, W = x.shape
        x = self.Conv(x, taps) + x
        s = self.lif1(x)
        _record(taps, f"{self.path}.lif1", s)
        h = self.bn1(self.conv1(s.flatten(0, 1))).reshape(T, B, -1, H, W)
        s = self.lif2(h)
        _record(taps, f"{self.path}.lif2", s)
        h = self.bn2(self.conv2(s.flatten(0, 1))).reshape(T, B, C, H, W)
        return x + h


def to_heads(s: torch.Tensor, heads: int) -> torch.Tensor:
    """[T, B, C, H, W] -> [T, B, heads, N, C/heads]: token n = y*W + x, channel c = head*C/heads + j."""
    T, B, C, H, W = s.shape
    return (s.flatten(3).transpose(-1, -2).reshape(T, B, H * W, heads, C // heads)
            .permute(0, 1, 3, 2, 4).contiguous())


class Attention(nn.Module):
    """The V2 spike-driven self-attention (`MS_Attention_RepConv_qkv_id`); returns BN(RepConv(a))."""

    def __init__(self, dim: int, num_heads: int, path: str, form: str = "original"):
        super().__init__()
        self.path = path
        self.num_heads = num_heads
        self.flat_taps = form == "original"
        self.head_lif = LIF()
        self.q_conv = _repconv_bn(dim, form)
        self.k_conv = _repconv_bn(dim, form)
        self.v_conv = _repconv_bn(dim, form)
        self.q_lif = LIF()
        self.k_lif = LIF()
        self.v_lif = LIF()
        self.attn_lif = LIF(v_threshold=ATTN_THRESHOLD)
        self.proj_conv = _repconv_bn(dim, form)

    def forward(self, x: torch.Tensor, taps: Taps = None) -> torch.Tensor:
        T, B, C, H, W = x.shape
        p = self.path
        s = self.head_lif(x)
        _record(taps, f"{p}.head_lif", s)
        flat = s.flatten(0, 1)
        q = self.q_conv(flat).reshape(T, B, C, H, W)
        k = self.k_conv(flat).reshape(T, B, C, H, W)
        v = self.v_conv(flat).reshape(T, B, C, H, W)
        q = self.q_lif(q)
        _record(taps, f"{p}.q_lif", q)
        k = self.k_lif(k)
        _record(taps, f"{p}.k_lif", k)
        v = self.v_lif(v)
        _record(taps, f"{p}.v_lif", v)
        q, k, v = (to_heads(t, self.num_heads) for t in (q, k, v))
        kv = k.transpose(-2, -1) @ v            # [T, B, heads, C/h, C/h], counts of k AND v over tokens
        qkv = q @ kv                            # [T, B, heads, N, C/h], integers
        if taps is not None:
            taps[f"{p}.kv"] = kv.detach().to(torch.int32)
            taps[f"{p}.qkv"] = qkv.detach().to(torch.int32)
        a = (qkv * ATTN_SCALE).transpose(3, 4).reshape(T, B, C, H * W).contiguous()
        a = self.attn_lif(a)
        _record(taps, f"{p}.attn_lif", a if self.flat_taps else a.reshape(T, B, C, H, W))
        return self.proj_conv(a.reshape(T, B, C, H, W).flatten(0, 1)).reshape(T, B, C, H, W)


class MLP(nn.Module):
    """LIF → fc1 (Conv1d k=1, bias) → BN1d → LIF → fc2 → BN1d over the N = H*W tokens."""

    def __init__(self, dim: int, hidden: int, path: str, form: str = "original"):
        super().__init__()
        self.path = path
        self.flat_taps = form == "original"
        self.c_hidden = hidden
        self.c_output = dim
        bn1d = (lambda c: nn.BatchNorm1d(c)) if form == "original" else (lambda c: nn.Identity())
        self.fc1_conv = nn.Conv1d(dim, hidden, kernel_size=1)
        self.fc1_bn = bn1d(hidden)
        self.fc1_lif = LIF()
        self.fc2_conv = nn.Conv1d(hidden, dim, kernel_size=1)
        self.fc2_bn = bn1d(dim)
        self.fc2_lif = LIF()

    def forward(self, x: torch.Tensor, taps: Taps = None) -> torch.Tensor:
        T, B, C, H, W = x.shape
        s = self.fc1_lif(x.flatten(3))
        _record(taps, f"{self.path}.fc1_lif", s if self.flat_taps else s.reshape(T, B, C, H, W))
        h = self.fc1_bn(self.fc1_conv(s.flatten(0, 1))).reshape(T, B, self.c_hidden, H * W).contiguous()
        s = self.fc2_lif(h)
        _record(taps, f"{self.path}.fc2_lif", s if self.flat_taps else s.reshape(T, B, -1, H, W))
        return self.fc2_bn(self.fc2_conv(s.flatten(0, 1))).reshape(T, B, C, H, W).contiguous()


class MetaBlock(nn.Module):
    """`x = x + attn(x)`, `x = x + mlp(x)` (`MS_Block`)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int, path: str, form: str = "original"):
        super().__init__()
        self.attn = Attention(dim, num_heads, f"{path}.attn", form)
        self.drop_path = nn.Identity()   # built by the original (DropPath only if a rate is given), never called
        self.mlp = MLP(dim, int(dim * mlp_ratio), f"{path}.mlp", form)

    def forward(self, x: torch.Tensor, taps: Taps = None) -> torch.Tensor:
        x = x + self.attn(x, taps)
        return x + self.mlp(x, taps)


class MetaSpikeFormer(nn.Module):
    """`Spiking_vit_MetaFormer`: 4 stages (two of conv blocks, two of transformer blocks) and a head."""

    def __init__(self, cfg: V2Config, form: str = "original", head_pool: str = "mean", tokens: int = 1):
        super().__init__()
        if form not in FORMS:
            raise ValueError(f"form must be one of {', '.join(FORMS)}, got {form!r}")
        if head_pool not in ("mean", "sum"):
            raise ValueError(f"head_pool must be 'mean' or 'sum', got {head_pool!r}")
        self.cfg = cfg
        self.form = form
        self.folded = form != "original"
        self.head_pool = head_pool
        self.num_classes = cfg.num_classes
        self.T = cfg.time_steps
        self.kd = cfg.kd
        self.input_quant: nn.Module = nn.Identity()
        d0, e0, e1, e2, e3 = cfg.stage_dims
        r = cfg.mlp_ratio
        f = form
        self.downsample1_1 = DownSampling(cfg.in_channels, d0, 7, 2, 3, "downsample1_1", first_layer=True, form=f)
        self.ConvBlock1_1 = nn.ModuleList([ConvBlock(d0, r, "ConvBlock1_1.0", f)])
        self.downsample1_2 = DownSampling(d0, e0, 3, 2, 1, "downsample1_2", form=f)
        self.ConvBlock1_2 = nn.ModuleList([ConvBlock(e0, r, "ConvBlock1_2.0", f)])
        self.downsample2 = DownSampling(e0, e1, 3, 2, 1, "downsample2", form=f)
        self.ConvBlock2_1 = nn.ModuleList([ConvBlock(e1, r, "ConvBlock2_1.0", f)])
        self.ConvBlock2_2 = nn.ModuleList([ConvBlock(e1, r, "ConvBlock2_2.0", f)])
        self.downsample3 = DownSampling(e1, e2, 3, 2, 1, "downsample3", form=f)
        self.block3 = nn.ModuleList([MetaBlock(e2, cfg.num_heads, r, f"block3.{j}", f) for j in range(STAGE3_BLOCKS)])
        self.downsample4 = DownSampling(e2, e3, 3, 1, 1, "downsample4", form=f)
        self.block4 = nn.ModuleList([MetaBlock(e3, cfg.num_heads, r, f"block4.{j}", f) for j in range(STAGE4_BLOCKS)])
        # summed tokens (head_pool "sum"): the threshold times the H*W tokens, exact where a division is not
        self.lif = LIF(v_threshold=1.0 * (tokens if head_pool == "sum" else 1))
        self.head = nn.Linear(e3, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        if cfg.kd:
            self.head_kd = nn.Linear(e3, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()

    def record_taps_as_grids(self, on: bool = True) -> MetaSpikeFormer:
        """Record the taps of `attn_lif`, `fc1_lif` and `fc2_lif` as [C, H, W] (the layout of every other tap)
        instead of the original's [C, N]: the same neurons, reshaped. The deployable forms always do."""
        for m in self.modules():
            if hasattr(m, "flat_taps"):
                m.flat_taps = not on
        return self

    def time_major(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [T, B, C, H, W] (a [C, H, W] tensor becomes a batch of one, as in the original)."""
        if x.dim() not in (3, 4):
            raise ValueError(f"expected a [B,C,H,W] image batch, got shape {tuple(x.shape)} (the original V2 "
                             f"repeats one image over T and cannot take [B,T,C,H,W] frames)")
        return x.unsqueeze(0).repeat(self.T, 1, 1, 1, 1)

    def forward_features(self, x: torch.Tensor, taps: Taps = None) -> torch.Tensor:
        """[T, B, C, H, W] input -> the residual stream after block4, [T, B, e3, H', W']."""
        x = self.downsample1_1(x, taps)
        for blk in self.ConvBlock1_1:
            x = blk(x, taps)
        x = self.downsample1_2(x, taps)
        for blk in self.ConvBlock1_2:
            x = blk(x, taps)
        x = self.downsample2(x, taps)
        for blk in (*self.ConvBlock2_1, *self.ConvBlock2_2):
            x = blk(x, taps)
        x = self.downsample3(x, taps)
        for blk in self.block3:
            x = blk(x, taps)
        x = self.downsample4(x, taps)
        for blk in self.block4:
            x = blk(x, taps)
        return x

    def forward(self, x: torch.Tensor, taps: Taps = None):
        x = self.forward_features(self.time_major(self.input_quant(x)), taps)
        x = x.flatten(3).sum(3) if self.head_pool == "sum" else x.flatten(3).mean(3)
        s = self.lif(x)
        _record(taps, "lif", s)
        y = self.head(s)
        _record(taps, "head.out", y)
        y = y.mean(0)
        if not self.kd:
            return y
        y_kd = self.head_kd(s)
        _record(taps, "head_kd.out", y_kd)
        y_kd = y_kd.mean(0)
        return (y, y_kd) if self.training else (y + y_kd) / 2


def build_v2_model(cfg: V2Config, form: str = "original", head_pool: str = "mean",
                   tokens: int = 1) -> MetaSpikeFormer:
    """A Meta-SpikeFormer in eval mode with `T = cfg.time_steps` (load the weights with strict=True);
    `form` "folded" / "reparam" for the deployable forms (see the module docstring)."""
    return MetaSpikeFormer(cfg, form, head_pool, tokens).eval()


def v2_lif_names(cfg: V2Config) -> list[str]:
    """The module path of every LIF, in the order forward calls them."""
    names = []

    def conv_block(p: str) -> None:
        names.extend([f"{p}.Conv.lif1", f"{p}.Conv.lif2", f"{p}.lif1", f"{p}.lif2"])

    def block(p: str) -> None:
        names.extend(f"{p}.attn.{n}" for n in ("head_lif", "q_lif", "k_lif", "v_lif", "attn_lif"))
        names.extend([f"{p}.mlp.fc1_lif", f"{p}.mlp.fc2_lif"])

    conv_block("ConvBlock1_1.0")
    names.append("downsample1_2.encode_lif")
    conv_block("ConvBlock1_2.0")
    names.append("downsample2.encode_lif")
    conv_block("ConvBlock2_1.0")
    conv_block("ConvBlock2_2.0")
    names.append("downsample3.encode_lif")
    for j in range(STAGE3_BLOCKS):
        block(f"block3.{j}")
    names.append("downsample4.encode_lif")
    for j in range(STAGE4_BLOCKS):
        block(f"block4.{j}")
    return names + ["lif"]


def v2_spike_names(cfg: V2Config) -> list[str]:
    """Every tap `forward(x, taps)` records, in execution order: the LIFs, and `kv`, `qkv` (int32) after
    each block's `v_lif`, then `head.out` (and `head_kd.out`)."""
    names = []
    for n in v2_lif_names(cfg):
        names.append(n)
        if n.endswith(".attn.v_lif"):
            prefix = n[: -len("v_lif")]
            names += [prefix + "kv", prefix + "qkv"]
    return names + ["head.out"] + (["head_kd.out"] if cfg.kd else [])
