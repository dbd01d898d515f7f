"""Train the shipped V2 demo (a small Meta-SpikeFormer) on scikit-learn's digits and save it in the original
V2 checkpoint format.

    python -m sdt_deploy.data.train_demo_v2 -o sdt_deploy/assets/demo_v2_digits.pth

The model is the repository's own `models.sdt_v2` (state-dict compatible with the original
`Spiking_vit_MetaFormer`); the file is what the original `util/misc.py save_model` writes (`model`,
`optimizer`, `epoch`, `scaler`, `args` an `argparse.Namespace` with `main_finetune.get_args_parser()`'s
fields that the loader reads), so it goes through the loading path of the checkpoints users bring.

The recipe is the shared V2 fixture's (see ../shared/fixtures/v2/README.md), made smaller and steadier:
digits / 16, bilinear to 32x32, 3 channels, timm's ImageNet mean/std (V2's evaluation transform); AdamW,
label smoothing 0.1, warm-up then cosine; the BatchNorms of every `attn.proj_conv` kept in eval mode (at
32x32 the attention sees 2x2 tokens, `attn_lif` is often silent for a whole batch, and a BatchNorm of an
all-zero input multiplies the surrogate gradient by 1/sqrt(eps)); plus, as the V1 demo, random shifts
and input noise of about the input grid's step. Seeded, one CPU thread by default: the same run gives the
same file on one machine.
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
from spikingjelly.clock_driven import functional

from models import V2Config, build_v2_model
from sdt_deploy.data.digits import digits_split
from sdt_deploy.data.train_demo import train_epoch
from sdt_deploy.files.checkpoint import save_v2_original_format

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# 8 heads, the factories' number: heads shape no parameter and the args do not record them, so a V2
# checkpoint loads with 8 unless told otherwise (`--num-heads`)
DEMO_V2_CONFIG = V2Config(img_size=32, in_channels=3, num_classes=10, embed_dim=(12, 24, 48, 64), num_heads=8,
                          mlp_ratio=4, time_steps=2, kd=False)


def demo_v2_args(cfg: V2Config, epochs: int, **extra) -> argparse.Namespace:
    """The `main_finetune.py` args the loader reads (`model` is a label: no factory has this size, as in the
    shared fixture), with the parser's defaults for the rest it needs."""
    return argparse.Namespace(
        model="v2_demo_" + "_".join(str(e) for e in cfg.embed_dim), model_mode="ms", input_size=cfg.img_size,
        time_steps=cfg.time_steps, nb_classes=cfg.num_classes, kd=cfg.kd, data_path="sklearn_digits",
        batch_size=32, epochs=epochs, device="cpu", seed=0, distributed=False, **extra)


def _freeze_proj_bn(model) -> None:
    for name, m in model.named_modules():
        if ".attn.proj_conv" in name and isinstance(m, torch.nn.BatchNorm2d):
            m.eval()


def evaluate(model, x: np.ndarray, y: np.ndarray, batch: int = 128) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(y), batch):
            functional.reset_net(model)
            correct += int((model(torch.from_numpy(x[i:i + batch])).argmax(-1).numpy() == y[i:i + batch]).sum())
    functional.reset_net(model)
    return 100.0 * correct / len(y)


def train(out: str, epochs: int = 12, batch: int = 32, lr: float = 2e-3, seed: int = 0, noise: float = 0.05) -> float:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    cfg = DEMO_V2_CONFIG
    split = dict(img_size=cfg.img_size, channels=cfg.in_channels, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    tr, te = digits_split("train", **split), digits_split("test", **split)
    model = build_v2_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * math.ceil(len(tr.y) / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    xtr, ytr = torch.from_numpy(tr.x), torch.from_numpy(tr.y)
    acc = 0.0
    for epoch in range(epochs):
        model.train()
        _freeze_proj_bn(model)
        t0 = time.time()
        loss = train_epoch(model, xtr, ytr, batch, gen, noise, opt, sched)
        acc = evaluate(model, te.x, te.y)
        print(f"epoch {epoch + 1}/{epochs} loss {loss:.4f} test top-1 {acc:.2f}% ({time.time() - t0:.0f}s)",
              flush=True)
    # the final weights (no choice of epoch by test accuracy: the test split stays unseen); the optimizer's
    # parameter groups without its moment buffers, which would triple the file
    optimizer = {"state": {}, "param_groups": opt.state_dict()["param_groups"]}
    save_v2_original_format(out, model, demo_v2_args(cfg, epochs), epoch=epochs - 1, optimizer=optimizer)
    print(f"saved {out}: test top-1 {acc:.2f}% on {len(te.y)} held-out digits")
    return acc


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-o", "--out", required=True)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--noise", type=float, default=0.05, help="std of the Gaussian input noise in training")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; the sums' order, hence the file, depends on it (1: the shipped file; "
                        "also the fastest on a busy 2-core machine, where 2 threads ran 5x slower)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    train(a.out, epochs=a.epochs, seed=a.seed, noise=a.noise)


if __name__ == "__main__":
    main()
