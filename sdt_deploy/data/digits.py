"""Data the toolchain can use without any download: scikit-learn's digits, prepared like the fixture
(8x8 grey digits / 16, bilinearly upsampled, copied to every channel, normalised with mean/std)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
TEST_FRACTION = 0.2
SPLIT_SEED = 0


@dataclass(frozen=True)
class Split:
    x: np.ndarray  # float32 [N, C, S, S], normalised
    y: np.ndarray  # int64 [N]


def digits_images(img_size: int = 32, channels: int = 3, mean=CIFAR10_MEAN,
                  std=CIFAR10_STD) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]
    x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False)
    x = x.repeat(1, channels, 1, 1)
    m = torch.tensor(_per_channel(mean, channels)).view(1, channels, 1, 1)
    s = torch.tensor(_per_channel(std, channels)).view(1, channels, 1, 1)
    return ((x - m) / s).numpy().astype(np.float32), d.target.astype(np.int64)


def _per_channel(values, channels: int) -> list[float]:
    values = list(values)
    return (values * channels)[:channels] if len(values) != channels else values


def digits_split(split: str = "test", img_size: int = 32, channels: int = 3, mean=CIFAR10_MEAN,
                 std=CIFAR10_STD) -> Split:
    """The fixed stratified 80/20 split (seed 0) the demo checkpoint was trained and tested on."""
    from sklearn.model_selection import train_test_split

    x, y = digits_images(img_size, channels, mean, std)
    idx = np.arange(len(y))
    train_idx, test_idx = train_test_split(idx, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=y)
    chosen = {"train": train_idx, "test": test_idx}[split]
    return Split(x[chosen], y[chosen])


def digit_events(n: int, time_steps: int, img_size: int, channels: int = 2, seed: int = 0) -> np.ndarray:
    """Event-frame stand-ins [n, T, C, S, S] (spike counts of a digit drawn as Poisson events), for
    checking DVS-shaped models without a DVS dataset."""
    from sklearn.datasets import load_digits

    rng = np.random.default_rng(seed)
    d = load_digits()
    x = torch.from_numpy(d.images[:n].astype(np.float32) / 16.0)[:, None]
    x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False).numpy()
    rate = np.repeat(x[:, None], time_steps, axis=1).repeat(channels, axis=2)
    return rng.poisson(rate * 1.5).astype(np.float32)
