"""Files in and out: input arrays checked before use, artifacts written atomically.

Every artifact is written to a temporary file beside its destination and renamed into place only when
complete, so an interrupted write (an error, Ctrl-C) never leaves a partial file under the real name.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Iterator, Optional

import numpy as np

from models import SDTConfig

from .errors import DeployError


def check_output_path(path: str, force: bool = False) -> str:
    """Refuse, before any work is done, an output that cannot or should not be written."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    if os.path.isdir(path):
        raise DeployError(f"output {path!r} is a directory")
    if not os.path.isdir(parent):
        raise DeployError(f"output directory {parent!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DeployError(f"output directory {parent!r} is not writable")
    if os.path.exists(path) and not force:
        raise DeployError(f"output {path!r} exists (use --force to overwrite)")
    return path


@contextlib.contextmanager
def atomic_write(path: str, suffix: Optional[str] = None) -> Iterator[str]:
    """Yield a temporary path in the destination's directory; rename it to `path` on success only.

    The temporary name keeps the destination's extension (some writers, numpy's `savez` among them,
    append one otherwise)."""
    parent = os.path.dirname(os.path.abspath(path)) or "."
    ext = suffix if suffix is not None else os.path.splitext(path)[1]
    fd, tmp = tempfile.mkstemp(prefix=".sdt-deploy-", suffix=".partial" + ext, dir=parent)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_bytes(path: str, data: bytes) -> None:
    with atomic_write(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def save_npz(path: str, arrays: dict) -> None:
    with atomic_write(path, suffix=".npz") as tmp:
        np.savez_compressed(tmp, **arrays)


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
    if x.shape[0] < 1 or (x.ndim == 5 and x.shape[1] < 1):
        raise DeployError(f"{name}: shape {x.shape} has an empty batch or time axis")
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise DeployError(f"{name}: contains NaN or Inf values")
    return x


def time_steps_of(x: np.ndarray, cfg: SDTConfig) -> int:
    return x.shape[1] if x.ndim == 5 else cfg.time_steps


def time_major(x: np.ndarray, T: int) -> np.ndarray:
    """[B,C,H,W] repeated to [T,B,C,H,W], or [B,T,C,H,W] transposed to it."""
    if x.ndim == 4:
        return np.broadcast_to(x[None], (T,) + x.shape)
    return np.ascontiguousarray(x.transpose(1, 0, 2, 3, 4))
