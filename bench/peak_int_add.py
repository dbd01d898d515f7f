"""The machine's peak integer-add rate: the "limit" the integer engine's additions per second are compared
with (BENCHMARKS.md, section 3).

    python bench/peak_int_add.py [--quick]

Measured, on 1 and on 2 threads (each thread its own arrays; the rate is the threads' total):

- numpy: `np.add(a, b, out=a)` on int16 and int32 arrays resident in L1 (16 KiB per operand) and in L2
  (256 KiB per operand), repeated; additions = elements x repetitions;
- the engine's C extension (`sdt_deploy.run._engine_kernels.peak_adds`), the same instructions the event
  kernel uses (int16 lanes, vector width of the clone the CPU selects: `kernel_isa()`):
  - "registers": 16 independent int16 vector accumulators, nothing loaded: the arithmetic peak;
  - "rows, L1" / "rows, L2": rows of 256 int16 weights loaded from a table of 32 KiB / 1 MiB and added
    into 8 register accumulators: the event kernel's inner loop with the weights in L1 / in L2 (the
    event kernel's weights are 128 KiB-1.2 MiB per tile for CIFAR 2-256: L2).

Each figure is the best of several timed runs (the machine is shared; the best is the least disturbed).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

sys.path.insert(0, C.ROOT)

import numpy as np  # noqa: E402

from sdt_deploy.run import engine_kernels  # noqa: E402


def _best_rate(work, threads: int, runs: int) -> float:
    """Additions per second of `work()` (returns the additions it made) run on `threads` threads at once,
    best of `runs`."""
    pool = concurrent.futures.ThreadPoolExecutor(threads)
    best = 0.0
    try:
        for _ in range(runs + 1):          # the first is a warm-up
            t0 = time.perf_counter()
            adds = sum(f.result() for f in [pool.submit(work) for _ in range(threads)])
            dt = time.perf_counter() - t0
            best = max(best, adds / dt)
    finally:
        pool.shutdown()
    return best


def numpy_add(dtype, nbytes: int, reps: int):
    def work() -> int:
        a = np.ones(nbytes // np.dtype(dtype).itemsize, dtype)
        b = np.ones_like(a)
        for _ in range(reps):
            np.add(a, b, out=a)
        return a.size * reps
    return work


def kernel_add(mode: int, table_bytes: int, rounds: int):
    def work() -> int:
        table = np.ones(table_bytes // 2, np.int16)
        return engine_kernels._c.peak_adds(mode, rounds, table)[1]
    return work


def peak_rates(threads_list=(1, 2), quick: bool = False) -> dict:
    """{(name, threads): additions per second}; also used by bench_engine.py (same run, same machine)."""
    runs = 3 if quick else 7
    scale = 4 if quick else 1
    cases = [
        ("numpy int16, L1", numpy_add(np.int16, 16 << 10, 20000 // scale)),
        ("numpy int32, L1", numpy_add(np.int32, 16 << 10, 20000 // scale)),
        ("numpy int16, L2", numpy_add(np.int16, 256 << 10, 1500 // scale)),
        ("numpy int32, L2", numpy_add(np.int32, 256 << 10, 1500 // scale)),
    ]
    if engine_kernels.compiled_kernels():
        cases += [
            ("C kernel int16, registers", kernel_add(0, 512, 20_000_000 // scale)),
            ("C kernel int16, rows, L1", kernel_add(1, 32 << 10, 10_000_000 // scale)),
            ("C kernel int16, rows, L2", kernel_add(1, 1 << 20, 5_000_000 // scale)),
        ]
    out = {}
    for name, work in cases:
        for threads in threads_list:
            out[(name, threads)] = _best_rate(work, threads, runs)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    rates = peak_rates(quick=a.quick)
    rows = []
    names = sorted({k[0] for k in rates}, key=lambda n: list(dict.fromkeys(k[0] for k in rates)).index(n))
    for name in names:
        rows.append([name, rates[(name, 1)] / 1e9, rates[(name, 2)] / 1e9, rates[(name, 2)] / rates[(name, 1)]])
    md = (f"Kernel instruction set on this CPU: {engine_kernels.kernel_isa()}.\n\n"
          + C.md_table(["what", "1 thread (G adds/s)", "2 threads (G adds/s)", "2 / 1"], rows))
    result = {"machine": C.machine(), "versions": C.versions(), "isa": engine_kernels.kernel_isa(),
              "load": C.load_average(), "rates": {f"{k[0]} | {k[1]} threads": v for k, v in rates.items()}}
    C.save("peak_int_add", result, md)


if __name__ == "__main__":
    main()
