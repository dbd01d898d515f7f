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


