"""Input arrays: read from .npy/.npz files and checked against the model before use."""
from __future__ import annotations

import os

import numpy as np

from models import SDTConfig, V2Config
from sdt_deploy.errors import DeployError


def load_array(path: str) -> np.ndarray:
    if not os.path.exists(path):
        raise DeployError(f"input {path!r}: no such file")
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DeployError(f"input {path!r}: not a .npy array ({str(exc).splitlines()[0][:120]})") from None
    if isinstance(arr, np.lib.npyio.NpzFile):
        keys = list(arr.keys())
        key = "input" if "input" in keys else (keys[0] if len(keys) == 1 else None)
        if key is None:
            raise DeployError(f"input {path!r}: an .npz with several arrays and none named 'input'")
        arr = arr[key]
    return arr


def check_input(x: np.ndarray, cfg: SDTConfig, name: str = "input") -> np.ndarray:
    """A [B,C,H,W] image batch or [B,T,C,H,W] event frames of the model's size, finite, as float32."""
    if not isinstance(x, np.ndarray):
        raise DeployError(f"{name}: expected a numpy array, got {type(x).__name__}")
    if x.dtype.kind not in "fiub":
        raise DeployError(f"{name}: dtype {x.dtype} is not numeric")
    if x.ndim not in (4, 5):
        raise DeployError(f"{name}: shape {x.shape} is neither [B,C,H,W] nor [B,T,C,H,W]")
    c, h, w = x.shape[-3:]
    want = (cfg.in_channels, cfg.img_size, cfg.img_size)
    if (c, h, w) != want:
        raise DeployError(f"{name}: shape {x.shape} does not end in [C,H,W] = {list(want)} of the model")
    if x.ndim == 5 and isinstance(cfg, V2Config):
        raise DeployError(f"{name}: shape {x.shape}: a V2 Meta-SpikeFormer takes [B,C,H,W] images, repeated over "
                          "T (the original cannot take [B,T,C,H,W] frames)")
    if x.shape[0] < 1 or (x.ndim == 5 and x.shape[1] < 1):
        raise DeployError(f"{name}: shape {x.shape} has an empty batch or time axis")
    if x.ndim == 5 and x.shape[1] != cfg.time_steps:
        # the frames would set T, but the bit analysis, the NIR thresholds and the exports are made for the
        # configuration's T: run with the frames' T only when it is the configuration's
        raise DeployError(f"{name}: {x.shape[1]} event frames per sample, the model's T is {cfg.time_steps}; "
                          f"give -T {x.shape[1]} to run {x.shape[1]} steps")
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise DeployError(f"{name}: contains NaN or Inf values")
    return x


def time_major(x: np.ndarray, T: int) -> np.ndarray:
    """[B,C,H,W] repeated to [T,B,C,H,W], or [B,T,C,H,W] transposed to it."""
    if x.ndim == 4:
        return np.broadcast_to(x[None], (T,) + x.shape)
    return np.ascontiguousarray(x.transpose(1, 0, 2, 3, 4))
