"""Evaluation data for `verify` and `report`: ImageFolder-style directories and the original repository's
CIFAR / ImageNet layouts, read with the original evaluation transform, plus the built-in digits.

The transform is timm's eval transform as the original `train.py` builds it from the conf: resize the
shorter side to floor(img_size / crop_pct) (bicubic), center-crop img_size, scale to [0, 1], normalise
with the conf's mean / std. CIFAR's python batches are pickles: they are read with an unpickler that
allows only the few numpy globals those files use, so a hostile file cannot run code.
"""
from __future__ import annotations

import io
import math
import os
import pickle
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from models import SDTConfig
from sdt_deploy.errors import DeployError
from sdt_deploy.files.configs import DataConfig

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class ArrayDataset:
    """Samples already in memory: x [N, ...] float32 and optional labels [N]."""

    x: np.ndarray
    labels: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self.x)

    def batch(self, indices: Sequence[int]) -> tuple[np.ndarray, Optional[np.ndarray]]:
        idx = np.asarray(indices, dtype=np.int64)
        return self.x[idx], (None if self.labels is None else self.labels[idx])


@dataclass
class FileDataset:
    """Images on disk decoded on demand with the evaluation transform."""

    files: list
    labels: np.ndarray
    load: Callable[[str], np.ndarray]

    def __len__(self) -> int:
        return len(self.files)

    def batch(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        return np.stack([self.load(self.files[i]) for i in indices]), self.labels[np.asarray(indices, dtype=np.int64)]


def eval_transform(cfg: SDTConfig, data: DataConfig) -> Callable:
    """PIL image -> float32 [C, S, S] as timm's eval transform does it for the conf."""
    from PIL import Image

    size = cfg.img_size
    scale_size = int(math.floor(size / (data.crop_pct or 1.0)))
    resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}.get(
        data.interpolation, Image.BICUBIC)
    mean = np.asarray(data.mean, np.float32).reshape(-1, 1, 1)
    std = np.asarray(data.std, np.float32).reshape(-1, 1, 1)

    def apply(img) -> np.ndarray:
        img = img.convert("RGB" if cfg.in_channels == 3 else "L")
        w, h = img.size
        if (w <= h and w != scale_size) or (h < w and h != scale_size):
            if w <= h:
                nw, nh = scale_size, int(scale_size * h / w)
            else:
                nw, nh = int(scale_size * w / h), scale_size
            img = img.resize((nw, nh), resample)
        w, h = img.size
        left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
        img = img.crop((left, top, left + size, top + size))
        arr = np.asarray(img, dtype=np.float32) / 255.0
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        return ((arr - mean[: arr.shape[0]]) / std[: arr.shape[0]]).astype(np.float32)

    return apply


def _image_folder(root: str, cfg: SDTConfig, data: DataConfig) -> FileDataset:
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    files, labels = [], []
    for i, c in enumerate(classes):
        for dirpath, _, names in sorted(os.walk(os.path.join(root, c))):
            for name in sorted(names):
                if name.lower().endswith(IMAGE_EXTENSIONS):
                    files.append(os.path.join(dirpath, name))
                    labels.append(i)
    if not files:
        raise DeployError(f"--data {root!r}: no images found in class folders")
    transform = eval_transform(cfg, data)

    def load(path: str) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as img:
                return transform(img)
        except (OSError, UnidentifiedImageError) as exc:
            raise DeployError(f"--data: cannot read image {path!r} ({type(exc).__name__})") from None

    return FileDataset(files, np.asarray(labels, dtype=np.int64), load)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise DeployError(f"--data: CIFAR batch asks for the pickled global {module}.{name}; refused")


def _cifar_batch(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            return _NumpyOnlyUnpickler(io.BytesIO(f.read()), encoding="latin1").load()
    except DeployError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoding failure of an untrusted file is one message
        raise DeployError(f"--data: {path!r} is not a readable CIFAR batch ({type(exc).__name__})") from None


def _cifar(root: str, cfg: SDTConfig, data: DataConfig) -> ArrayDataset:
    for sub, key in (("cifar-10-batches-py", "labels"), ("cifar-100-python", "fine_labels")):
        folder = os.path.join(root, sub)
        if os.path.isdir(folder):
            path = os.path.join(folder, "test_batch" if key == "labels" else "test")
            d = _cifar_batch(path)
            raw = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            labels = np.asarray(d[key], dtype=np.int64)
            from PIL import Image

            transform = eval_transform(cfg, data)
            x = np.stack([transform(Image.fromarray(im.transpose(1, 2, 0))) for im in raw])
            return ArrayDataset(x, labels)
    raise DeployError(f"--data {root!r}: no cifar-10-batches-py or cifar-100-python folder")


def open_dataset(root: str, cfg: SDTConfig, data: DataConfig) -> ArrayDataset | FileDataset:
    """The evaluation split under `root`, in whichever layout it is:
    - the original repository's CIFAR layout (`root/cifar-10-batches-py/test_batch`, `cifar-100-python/test`);
    - the original ImageNet layout (`root/val/<wnid>/*.JPEG`);
    - any ImageFolder-style directory (`root/<class>/<image>`), classes indexed in sorted order."""
    if not os.path.isdir(root):
        raise DeployError(f"--data {root!r}: not a directory")
    if any(os.path.isdir(os.path.join(root, sub)) for sub in ("cifar-10-batches-py", "cifar-100-python")):
        return _cifar(root, cfg, data)
    if os.path.isdir(os.path.join(root, "val")):
        return _image_folder(os.path.join(root, "val"), cfg, data)
    return _image_folder(root, cfg, data)


def shard(n: int, rank: int, world: int) -> list[int]:
    """Sample indices of one rank: a strided split, so every rank sees a similar mix."""
    return list(range(rank, n, world))
