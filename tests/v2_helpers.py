"""Small random Meta-SpikeFormers (SDT V2) for the property tests, calibrated so that every layer fires,
the attention's `attn_lif` included (it is nearly silent in the shared fixture), after the recipe of
tests/data/oracle_v2/README.md: weights normal with std 1/sqrt(fan-in), biases U(-0.1, 0.1); BatchNorm
gamma/beta U(1.5, 2.5)/U(1.2, 2.2) after q/k/v (so that they fire often), U(0.5, 1.0)/U(-0.5, 0.5) for the
last BN of each transformer-block branch, U(0.5, 1.5)/U(0.3, 1.3) elsewhere; running statistics from a
train-mode pass over random inputs (cumulative average), variances clamped to >= 0.05."""
from __future__ import annotations

import numpy as np
import torch
from hypothesis import strategies as st
from spikingjelly.clock_driven import functional

from models import V2Config, build_v2_model


def _uniform(t: torch.Tensor, lo: float, hi: float, g: torch.Generator) -> None:
    t.copy_(torch.rand(t.shape, generator=g) * (hi - lo) + lo)


def random_v2_model(cfg: V2Config, seed: int = 0, calibration: int = 8):
    g = torch.Generator().manual_seed(seed)
    model = build_v2_model(cfg)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / fan_in ** 0.5)
                if m.bias is not None:
                    _uniform(m.bias, -0.1, 0.1, g)
            elif isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                if any(name.endswith(f"attn.{k}_conv.1") for k in "qkv"):
                    lo_w, hi_w, lo_b, hi_b = 1.5, 2.5, 1.2, 2.2
                elif name.endswith(("attn.proj_conv.1", "mlp.fc2_bn")):
                    lo_w, hi_w, lo_b, hi_b = 0.5, 1.0, -0.5, 0.5
                else:
                    lo_w, hi_w, lo_b, hi_b = 0.5, 1.5, 0.3, 1.3
                _uniform(m.weight, lo_w, hi_w, g)
                _uniform(m.bias, lo_b, hi_b, g)
                m.momentum = None            # cumulative average over the calibration pass
                m.reset_running_stats()
        model.train()
        x = torch.randn((calibration, cfg.in_channels, cfg.img_size, cfg.img_size), generator=g)
        model(x)
        functional.reset_net(model)
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                m.running_var.clamp_(min=0.05)
    return model.eval()


def random_images(cfg: V2Config, n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, cfg.in_channels, cfg.img_size, cfg.img_size)).astype(
        np.float32)


@st.composite
def small_v2_configs(draw):
    """Random small V2 configurations: kd or not, T 1..4, odd and even sizes, 1..4 heads. At least 3 x 3
    tokens and 2 channels a head, so that the attention can fire (q kv must reach 8 for 0.125 q kv to
    reach attn_lif's threshold 0.5 from rest at tau 2)."""
    heads = draw(st.sampled_from([1, 2, 4]))
    e0 = draw(st.sampled_from([2, 4, 6]))
    e1 = draw(st.sampled_from([4, 6, 8]))
    e2 = heads * draw(st.integers(2, 3))
    e3 = heads * draw(st.integers(2, 3))
    return V2Config(img_size=draw(st.sampled_from([40, 45, 48, 61, 64])), in_channels=draw(st.sampled_from([1, 3])),
                    num_classes=draw(st.integers(2, 5)), embed_dim=(e0, e1, e2, e3), num_heads=heads,
                    time_steps=draw(st.integers(1, 4)), kd=draw(st.booleans()))
