"""What the toolchain asks of the C library's heap (glibc's malloc; nothing anywhere else).

Two settings, both measured, because numpy, torch and onnxruntime allocate their tensors with malloc:

- `release_freed_memory(above)`: hand the freed heap memory back to the OS (`malloc_trim`), only while the
  process holds more than `above` bytes. Without it a run of executors one after the other could hold the
  freed blocks of each; with it on every call, every executor faults its memory in afresh.
- `keep_large_blocks_in_heap()`: blocks up to 1 GiB come from the heap (glibc's mmap threshold, normally
  128 KiB rising with what was freed), and free() no longer shrinks the heap by itself (its trim
  threshold), so a freed tensor's pages serve the next one instead of going back to the kernel and being
  faulted in and zeroed again; `release_freed_memory` decides when they go back.

Measured (`verify` of CIFAR 2-256, 160 images, every CPU executor, one process, Dec 5; BENCHMARKS.md):
27.5 s wall and 8.9 s of system time (page faults) with a trim after every executor and glibc's defaults; 20.6 s and
0.7 s with both settings, at 1.05 GiB peak RSS against 0.89. `verify` keeps the heap only where the run is
small against its memory budget (`verification.verifier.small_against_budget`); SDT-8-768 at 224 runs
with glibc's defaults.
"""
from __future__ import annotations

import ctypes
import functools
import os
from typing import Optional

M_TRIM_THRESHOLD = -1   # glibc's malloc.h
M_MMAP_THRESHOLD = -3
LARGE_BLOCK = 2 ** 30   # the mmap and trim thresholds `keep_large_blocks_in_heap` sets


@functools.lru_cache(maxsize=None)
def libc(name: str):
    """A function of glibc (`mallopt`, `malloc_trim`), or None where the C library has none."""
    try:
        return getattr(ctypes.CDLL(None), name)
    except (AttributeError, OSError):
        return None


def resident_bytes() -> Optional[int]:
    """This process's resident memory now (Linux's /proc/self/statm), None where unknown."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def release_freed_memory(above: int = 0) -> bool:
    """Hand the heap memory freed so far back to the OS (glibc's malloc_trim) when the process holds more
    than `above` bytes (always with 0, and where its size is unknown). True when it trimmed."""
    trim = libc("malloc_trim")
    if trim is None:
        return False
    if above > 0:
        held = resident_bytes()
        if held is not None and held <= above:
            return False
    trim(0)
    return True


def user_set_thresholds(environ) -> bool:
    """Whether the user set glibc's mmap or trim threshold (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_,
    or glibc.malloc.mmap_threshold / trim_threshold in GLIBC_TUNABLES): theirs are kept."""
    tunables = dict(item.partition("=")[::2] for item in environ.get("GLIBC_TUNABLES", "").split(":") if item)
    return any(environ.get(f"MALLOC_{k.upper()}_") or tunables.get(f"glibc.malloc.{k}")
               for k in ("mmap_threshold", "trim_threshold"))


def keep_large_blocks_in_heap(environ=None) -> bool:
    """Serve blocks up to `LARGE_BLOCK` from the heap for the rest of this process (see the module's
    docstring), unless the user set either threshold. True when both were set. Process-wide and not undone:
    the command line calls it for `verify` and its workers; a program of your own may call it too."""
    if user_set_thresholds(os.environ if environ is None else environ):
        return False
    mallopt = libc("mallopt")
    return mallopt is not None and mallopt(M_MMAP_THRESHOLD, LARGE_BLOCK) == 1 and \
        mallopt(M_TRIM_THRESHOLD, LARGE_BLOCK) == 1
