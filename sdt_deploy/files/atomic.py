"""Files out, written atomically.

Every artifact is written to a temporary file beside its destination and renamed into place only when
complete, so an interrupted write (an error, Ctrl-C) never leaves a partial file under the real name.
The file gets the mode `open()` would have given it (0666 less the umask), not the temporary file's 0600.
A write the operating system refuses (no space left, a read-only file system, no permission, a directory
that takes no files) is one `DeployError` line naming the destination and the OS's reason, and leaves
neither the temporary file nor anything under the destination's name.
"""
from __future__ import annotations

import contextlib
import os
import re
import tempfile
from typing import Iterator, Optional

import numpy as np

from sdt_deploy.errors import DeployError

TEMP_PREFIX = ".sdt-deploy-"


def current_umask() -> int:
    """The process's umask, read without changing it (os.umask can only be read by setting it, which
    would briefly change it for every other thread): Linux's /proc/self/status, else the set-and-restore."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode `open(path, "w")` gives a new file: 0666 less the umask."""
    return 0o666 & ~current_umask()


def os_reason(exc: OSError) -> str:
    """The operating system's reason for `exc`, in its own words and on one line ("No space left on
    device"). h5py reports the C library's errno inside its message ("... errno = 28, ...")."""
    code = exc.errno
    if not code:
        m = re.search(r"errno\s*=\s*(\d+)", str(exc))
        code = int(m.group(1)) if m else None
    if code:
        return os.strerror(code)
    text = str(exc).strip().splitlines()
    return (text[0][:200] if text else type(exc).__name__)


def cannot_write(path: str, exc: OSError, tmp: Optional[str] = None) -> DeployError:
    """`cannot write 'PATH': REASON`, naming a third file only when the OS named one that is neither the
    destination nor its temporary file."""
    reason = os_reason(exc)
    others = [f for f in (exc.filename, exc.filename2) if f]
    known = {os.path.abspath(p) for p in (path, tmp) if p}
    for other in others:
        try:
            other = os.fsdecode(other)
        except TypeError:
            continue
        if os.path.abspath(other) not in known and not os.path.basename(other).startswith(TEMP_PREFIX):
            reason += f" ({other})"
            break
    return DeployError(f"cannot write {path!r}: {reason}")


def check_output_path(path: str, force: bool = False) -> str:
    """Refuse, before any work is done, an output that cannot or should not be written. The directory is
    asked for real: a file is created in it and removed (some refuse files although they look writable:
    /proc, /sys, a read-only mount, a full disk's last inode)."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    if os.path.isdir(path):
        raise DeployError(f"output {path!r} is a directory")
    if not os.path.isdir(parent):
        raise DeployError(f"output directory {parent!r} does not exist")
    if os.path.exists(path) and not force:
        raise DeployError(f"output {path!r} exists (use --force to overwrite)")
    try:
        fd, probe = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".probe", dir=parent)
    except OSError as exc:
        raise DeployError(f"cannot write {path!r}: directory {parent!r} is not writable "
                          f"({os_reason(exc)})") from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.remove(probe)
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
    """Yield a temporary path in the destination's directory; rename it to `path` on success only, with
    the mode a new file gets from `open()` (0666 less the umask).

    An OSError while writing, setting the mode or renaming becomes `DeployError("cannot write 'path':
    reason")`; whatever happens, the temporary file is removed and `path` is left as it was. The
    temporary name keeps the destination's extension (some writers, numpy's `savez` among them, append
    one otherwise)."""
    parent = os.path.dirname(os.path.abspath(path)) or "."
    ext = suffix if suffix is not None else os.path.splitext(path)[1]
    try:
        fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".partial" + ext, dir=parent)
    except OSError as exc:
        raise cannot_write(path, exc) from None
    os.close(fd)
    try:
        try:
            yield tmp
            # the mode is set on the complete file, whatever the writer did to it (reopened, recreated)
            os.chmod(tmp, file_mode())
            os.replace(tmp, path)
        except OSError as exc:
            raise cannot_write(path, exc, tmp) from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


class ErrorHoldingFile:
    """A binary file for writers that cannot survive an I/O error: HDF5 (through h5py's file-object
    driver) meeting "no space left" part-way through a file crashes the process during its own clean-up
    (a segmentation fault, measured with h5py 3 on a full tmpfs). The first OSError is held and every
    later write dropped, so the writer finishes as if all went well; `raise_held()` then raises it, and
    `atomic_write` turns it into one line and removes the temporary file. Reads, seeks and tell are the
    file's own (after an error the content is discarded anyway); the file must be unbuffered, or a seek
    would write (and could fail) too."""

    def __init__(self, f):
        self._f, self.held = f, None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while self.held is None and done < len(view):     # an unbuffered file may write part of it
            try:
                done += self._f.write(view[done:])
            except OSError as exc:
                self.held = exc
        return len(view)

    def flush(self) -> None:
        if self.held is None:
            try:
                self._f.flush()
            except OSError as exc:
                self.held = exc

    def truncate(self, size=None):
        if self.held is None:
            try:
                return self._f.truncate(size)
            except OSError as exc:
                self.held = exc
        return size

    def read(self, *a):
        return self._f.read(*a)

    def readinto(self, b):
        return self._f.readinto(b)

    def seek(self, *a):
        return self._f.seek(*a)

    def tell(self) -> int:
        return self._f.tell()

    def raise_held(self) -> None:
        self.flush()
        if self.held is not None:
            raise self.held


@contextlib.contextmanager
def atomic_file(path: str) -> Iterator[ErrorHoldingFile]:
    """`atomic_write` for writers that take an open binary file and must never see an I/O error
    (`ErrorHoldingFile`): the error is raised, as `cannot write 'PATH': REASON`, once the writer is done."""
    with atomic_write(path) as tmp, open(tmp, "w+b", buffering=0) as raw:   # unbuffered: a seek never writes
        f = ErrorHoldingFile(raw)
        try:
            yield f
        except Exception:
            if f.held is not None:      # the writer tripped over the data it was not given: the cause
                raise f.held from None
            raise
        f.raise_held()


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


class NpzStream:
    """An .npz file (what `np.savez_compressed` writes: a zip of compressed .npy files) filled a slice at a
    time, so that arrays larger than the memory a command may hold can be written: each array is
    first a .npy file in a temporary folder beside the destination, written through a memory map one
    slice at a time (the map is dropped after every slice), and `close` compresses them into the zip in
    order, streamed from disk, and renames the file into place (`atomic_write`).

        with NpzStream(path) as out:
            out.put("logits", logits)                      # a whole array
            out.slice("spikes", shape, np.uint8, (slice(None), slice(0, 8)), block)
    """

    def __init__(self, path: str):
        self.path = path
        self._write = atomic_write(path, suffix=".npz")
        self.tmp = None
        self.folder = None
        self.names: list = []

    def __enter__(self) -> "NpzStream":
        self.tmp = self._write.__enter__()
        try:
            self.folder = tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=os.path.dirname(os.path.abspath(self.path)))
        except OSError as exc:
            self._write.__exit__(type(exc), exc, None)
            raise cannot_write(self.path, exc) from None
        return self

    def _file(self, name: str) -> str:
        return os.path.join(self.folder, f"{len(self.names) if name not in self.names else self.names.index(name)}.npy")

    def put(self, name: str, array: np.ndarray) -> None:
        """A whole array."""
        array = np.asarray(array)
        self.slice(name, array.shape, array.dtype, (), array)

    def slice(self, name: str, shape: tuple, dtype, index: tuple, values: np.ndarray) -> None:
        """`values` into `name[index]` (the array, of `shape` and `dtype`, made on its first slice)."""
        f = self._file(name)
        try:
            if name not in self.names:
                m = np.lib.format.open_memmap(f, mode="w+", dtype=dtype, shape=tuple(shape))
                self.names.append(name)
            else:
                m = np.lib.format.open_memmap(f, mode="r+")
            m[index] = values
            m.flush()
            del m
        except OSError as exc:
            raise cannot_write(self.path, exc) from None

    def __exit__(self, kind, exc, tb) -> None:
        import shutil
        import zipfile

        try:
            if kind is None:
                try:
                    with zipfile.ZipFile(self.tmp, mode="w", compression=zipfile.ZIP_DEFLATED, allowZip64=True) as z:
                        for i, name in enumerate(self.names):
                            z.write(os.path.join(self.folder, f"{i}.npy"), arcname=f"{name}.npy")
                except OSError as e:
                    raise cannot_write(self.path, e) from None
        except BaseException as e:
            shutil.rmtree(self.folder, ignore_errors=True)
            self._write.__exit__(type(e), e, e.__traceback__)
            raise
        shutil.rmtree(self.folder, ignore_errors=True)
        if kind is None:
            self._write.__exit__(None, None, None)
        else:
            with contextlib.suppress(BaseException):
                self._write.__exit__(kind, exc, tb)
