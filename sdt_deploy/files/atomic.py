"""Files out, written atomically.

Every artifact is written to a temporary file beside its destination and renamed into place only when
complete, so an interrupted write (an error, Ctrl-C) never leaves a partial file under the real name.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Iterator, Optional

import numpy as np

from sdt_deploy.errors import DeployError


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


def check_output_paths(paths: dict, force: bool = False) -> None:
    """`check_output_path` for every given output of a command ({option: path or None}), and no two of
    them the same file."""
    seen: dict = {}
    for opt, p in paths.items():
        if not p:
            continue
        full = check_output_path(p, force)
        if full in seen:
            raise DeployError(f"{seen[full]} and {opt} name the same file {p!r}")
        seen[full] = opt


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


def save_torch(path: str, obj) -> None:
    """`torch.save(obj)` written atomically. Serialized in memory first: torch names the archive inside
    the file after the file it writes to, so saving to the temporary file would put its random name
    into the bytes (two saves of the same object would differ)."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes(path, buffer.getvalue())


def save_npz(path: str, arrays: dict) -> None:
    with atomic_write(path, suffix=".npz") as tmp:
        np.savez_compressed(tmp, **arrays)


