"""Train the shipped demo SDT on scikit-learn's digits and save it in the original checkpoint format.

    python -m sdt_deploy.data.train_demo -o sdt_deploy/assets/demo_sdt_digits.pth

The model is the repository's own `models` SDT (spikingjelly LIF, surrogate gradients); the file is
written as the original `train.py` writes through timm's CheckpointSaver (`state_dict`, `optimizer`,
`args` as an `argparse.Namespace`, `epoch`, `arch`, `version`, `metric`), so it exercises the same
loading path as the checkpoints users bring.
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from spikingjelly.clock_driven import functional

from models import SDTConfig, build_model
from sdt_deploy.data.digits import CIFAR10_MEAN, CIFAR10_STD, digits_split
from sdt_deploy.files.checkpoint import save_original_format

DEMO_CONFIG = SDTConfig(img_size=32, in_channels=3, num_classes=10, dim=128, depth=2, num_heads=8,
                        mlp_ratio=4, time_steps=4, pooling_stat="0011", spike_mode="lif")


def demo_args(cfg: SDTConfig, **extra) -> argparse.Namespace:
    """train.py-style args for the checkpoint (the keys the loader and original tools read)."""
    return argparse.Namespace(
        model="sdt", dataset="sklearn/digits", img_size=cfg.img_size, in_channels=cfg.in_channels,
        num_classes=cfg.num_classes, dim=cfg.dim, layer=cfg.depth, num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_ratio, time_steps=cfg.time_steps, pooling_stat=cfg.pooling_stat,
        spike_mode=cfg.spike_mode, dvs_mode=cfg.dvs_mode, TET=cfg.tet, patch_size=None,
        mean=list(CIFAR10_MEAN), std=list(CIFAR10_STD), crop_pct=1.0, interpolation="bilinear", **extra)


def shift_augment(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Random translation by up to `max_shift` pixels (zero-padded), one shift per batch."""
    dy, dx = (int(v) for v in torch.randint(-max_shift, max_shift + 1, (2,), generator=gen))
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def evaluate(model, x: np.ndarray, y: np.ndarray, batch: int = 128) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(y), batch):
            functional.reset_net(model)
            out = model(torch.from_numpy(x[i:i + batch]))
            correct += int((out.argmax(-1).numpy() == y[i:i + batch]).sum())
    functional.reset_net(model)
    return 100.0 * correct / len(y)


def train_epoch(model, xtr: torch.Tensor, ytr: torch.Tensor, batch: int, gen: torch.Generator, noise: float, opt,
                sched) -> float:
    """One epoch of the demos' recipe (V1 and V2): shuffled batches, +-2-pixel shifts, Gaussian input noise
    of about the deployment input grid's step (2**-5: robustness to the rounding of the 8-bit input and,
    like any small perturbation, to the rounding of int8 weights), label smoothing 0.1, the schedule
    stepped per batch. The model is in the mode the caller set. Returns the mean loss."""
    perm = torch.randperm(len(ytr), generator=gen)
    total = 0.0
    for i in range(0, len(ytr), batch):
        idx = perm[i:i + batch]
        xb = shift_augment(xtr[idx], 2, gen)
        xb = xb + noise * torch.randn(xb.shape, generator=gen)
        functional.reset_net(model)
        loss = F.cross_entropy(model(xb), ytr[idx], label_smoothing=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        total += float(loss.detach()) * len(idx)
    return total / len(ytr)


def train(out: str, epochs: int = 15, batch: int = 32, lr: float = 2e-3, seed: int = 0, noise: float = 0.05) -> float:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    cfg = DEMO_CONFIG
    tr, te = digits_split("train"), digits_split("test")
    model = build_model(cfg)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    steps = epochs * math.ceil(len(tr.y) / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    xtr, ytr = torch.from_numpy(tr.x), torch.from_numpy(tr.y)
    for epoch in range(epochs):
        model.train()
        t0 = time.time()
        loss = train_epoch(model, xtr, ytr, batch, gen, noise, opt, sched)
        acc = evaluate(model, te.x, te.y)
        print(f"epoch {epoch + 1}/{epochs} loss {loss:.4f} test top-1 {acc:.2f}% ({time.time() - t0:.0f}s)", flush=True)
    # The final weights are saved (no choice of epoch by test accuracy: the test split stays unseen).
    save_original_format(out, model, demo_args(cfg), epoch=epochs - 1, metric=acc, optimizer=opt.state_dict())
    print(f"saved {out}: test top-1 {acc:.2f}% on {len(te.y)} held-out digits")
    return acc


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-o", "--out", required=True)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--noise", type=float, default=0.05, help="std of the Gaussian input noise in training")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    train(a.out, epochs=a.epochs, seed=a.seed, noise=a.noise)


if __name__ == "__main__":
    main()
