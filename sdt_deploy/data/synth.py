"""Synthetic SDTs: random weights with BatchNorm statistics set so that layers fire at useful rates.

Used by the property tests, the benchmarks and `verify --random`: an untrained SDT with default
initialisation never fires, which would make every equivalence check vacuous.
"""
from __future__ import annotations

import argparse
import math

import numpy as np
import torch
from spikingjelly.clock_driven import functional

from models import SDTConfig, build_model


def random_inputs(cfg: SDTConfig, n: int, seed: int = 0, events: bool = False) -> np.ndarray:
    """Standard-normal images [n, C, S, S], or Poisson event counts [n, T, C, S, S] with `events`."""
    rng = np.random.default_rng(seed)
    S = cfg.img_size
    if events:
        return rng.poisson(1.0, size=(n, cfg.time_steps, cfg.in_channels, S, S)).astype(np.float32)
    return rng.standard_normal((n, cfg.in_channels, S, S)).astype(np.float32)


# BatchNorms whose output joins the residual stream: the stream sums several of them, so they get a
# smaller, centred affine; the others drive one LIF each.
STREAM_BN_SUFFIXES = ("proj_bn3", "rpe_bn", "attn.proj_bn", "mlp.fc2_bn")


def calibrate(model: torch.nn.Module, x: np.ndarray, seed: int = 0, plif_tau=(1.89, 2.01)) -> None:
    """BatchNorm running statistics from one train-mode pass over x, then random affine parameters:
    a BN driving a LIF outputs about N(beta, gamma^2) with gamma ~ U(0.5, 1), beta ~ U(0.6, 1.1): a
    tau = 2 LIF fire at roughly 5-40 %; BNs feeding the residual stream get gamma ~ U(0.3, 0.6), beta ~
    U(0.2, 0.5); both scaled up for T < 4. PLIF decays are drawn from the range trained SDTs show."""
    g = torch.Generator().manual_seed(seed)
    bns = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]

    def uniform(shape, lo, hi):
        return lo + (hi - lo) * torch.rand(shape, generator=g)

    # A tau = 2 LIF under a constant input X reaches X * (1 - 2**-t) after t steps: with few steps it
    # needs a larger input to fire at all, so the affine grows for T < 4.
    T = getattr(getattr(model, "cfg", None), "time_steps", 4)
    boost = 1.0 / (1.0 - 2.0 ** -min(T, 4))
    for name, m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: after one pass, exactly the batch statistics
        stream = name.endswith(STREAM_BN_SUFFIXES)
        lo_g, hi_g = (0.3, 0.6) if stream else (0.5, 1.0)
        lo_b, hi_b = (0.2, 0.5) if stream else (0.6, 1.1)
        m.weight.data = uniform(m.weight.shape, lo_g * boost, hi_g * boost)
        m.bias.data = uniform(m.bias.shape, lo_b * boost, hi_b * boost)
    for m in model.modules():
        if hasattr(m, "w") and isinstance(m.w, torch.nn.Parameter):
            m.w.data = -torch.log(uniform((), *plif_tau) - 1.0)
    model.train()
    functional.reset_net(model)
    with torch.no_grad():
        model(torch.from_numpy(x))
    functional.reset_net(model)
    for _, m in bns:
        m.momentum = 0.1
    model.eval()


def random_model(cfg: SDTConfig, seed: int = 0, calibration: int = 16) -> torch.nn.Module:
    """An SDT with scaled-normal weights and calibrated BatchNorms (see `calibrate`)."""
    torch.manual_seed(seed)
    model = build_model(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()))
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
    events = cfg.dvs_mode or cfg.in_channels == 2
    calibrate(model, random_inputs(cfg, calibration, seed + 1, events=events), seed=seed + 2)
    return model


def checkpoint_args(cfg: SDTConfig, dataset: str = "synthetic") -> argparse.Namespace:
    """train.py-style args describing cfg (so a saved file resolves its configuration by itself)."""
    return argparse.Namespace(model="sdt", dataset=dataset, img_size=cfg.img_size, in_channels=cfg.in_channels,
                              num_classes=cfg.num_classes, dim=cfg.dim, layer=cfg.depth, num_heads=cfg.num_heads,
                              mlp_ratio=cfg.mlp_ratio, time_steps=cfg.time_steps, pooling_stat=cfg.pooling_stat,
                              spike_mode=cfg.spike_mode, dvs_mode=cfg.dvs_mode, TET=cfg.tet, patch_size=None)
