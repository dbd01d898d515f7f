"""Shared helpers of the benchmark scripts: the machine, whole-process measurements, medians, tables.

Every timed figure is a whole run (a child process for the command-line figures) after a warm-up;
the figure reported is the median of several runs. Peak memory is the child's own peak resident set
size as the OS accounts it (`ru_maxrss` from `os.wait4` of that child, started from a small launcher so
that it does not inherit the benchmark's own peak), never an estimate. The machine
is shared, so the load average is recorded next to every measurement.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "bench", "out")
os.makedirs(OUT, exist_ok=True)    # git-ignored: absent on a fresh clone
PYTHON = sys.executable
SDT_DEPLOY = os.path.join(os.path.dirname(PYTHON), "sdt-deploy")


def load_average() -> list:
    return [round(v, 2) for v in os.getloadavg()]


def machine() -> dict:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_kb = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    mem_kb = int(line.split()[1])
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(mem_kb / 2 ** 20, 1),
            "python": platform.python_version(), "platform": platform.platform(),
            "date": subprocess.run(["date"], capture_output=True, text=True).stdout.strip()}


def versions() -> dict:
    out = {}
    for name in ("torch", "numpy", "scipy", "onnx", "onnxruntime", "brevitas", "nir", "h5py", "spikingjelly"):
        try:
            from importlib.metadata import version

            out[name] = version(name)
        except Exception:  # noqa: BLE001 - a missing package is reported, not fatal
            out[name] = "absent"
    try:
        import onnxscript  # noqa: F401

        out["onnxscript"] = "present"
    except ImportError:
        out["onnxscript"] = "absent"
    return out


# Linux keeps a process's peak RSS across exec, and a child started by vfork/fork + exec begins with its
# parent's peak: a child of a benchmark that has imported torch would report at least the benchmark's own
# peak (measured: 734 MiB for every export, whatever it was). So the command runs under a small launcher
# that forks it from a fresh ~10 MiB interpreter and reports that grandchild's own `ru_maxrss`.
_LAUNCHER = (
    "import json, os, subprocess, sys\n"
    "p = subprocess.Popen(sys.argv[2:])\n"
    "_, status, usage = os.wait4(p.pid, 0)\n"
    "open(sys.argv[1], 'w').write(json.dumps({'rc': os.waitstatus_to_exitcode(status), 'kib': usage.ru_maxrss,\n"
    "                                          'cpu': usage.ru_utime + usage.ru_stime}))\n"
)


def run_child(cmd: Sequence[str], env: Optional[dict] = None, cwd: str = ROOT) -> dict:
    """Run a command to completion: wall seconds, CPU seconds (user + system, the command's own: steadier
    than wall time on a loaded machine), its own peak RSS (MiB, `ru_maxrss` of that process, measured
    through `_LAUNCHER`), exit status, the load average before and after, output tails."""
    load = load_average()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.NamedTemporaryFile("r", suffix=".json") as peak:
        t0 = time.perf_counter()
        subprocess.run([PYTHON, "-c", _LAUNCHER, peak.name, *cmd], cwd=cwd, env={**os.environ, **(env or {})},
                       stdout=out, stderr=err)
        seconds = time.perf_counter() - t0
        child = json.loads(open(peak.name).read())
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    return {"seconds": seconds, "cpu_seconds": child["cpu"], "peak_rss_mib": child["kib"] / 1024, "rc": child["rc"],
            "load_before": load, "load_after": load_average(), "stdout": stdout, "stderr": stderr[-3000:]}


def _tree_rss(root: int) -> int:
    """Resident bytes of a process and all its descendants now (from /proc; 0 once it is gone)."""
    children: dict = {}
    rss: dict = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ppid, pages = int(fields[1]), int(fields[21])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
        rss[int(entry)] = pages * os.sysconf("SC_PAGE_SIZE")
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo.extend(children.get(pid, []))
    return total


def run_child_tree(cmd: Sequence[str], env: Optional[dict] = None, cwd: str = ROOT, every: float = 0.05) -> dict:
    """`run_child`, plus the peak of the resident memory of the child and all its descendants together
    (worker processes included), sampled every `every` seconds from /proc (`peak_tree_mib`)."""
    import threading

    load = load_average()
    peak = [0]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(cmd), cwd=cwd, env={**os.environ, **(env or {})}, stdout=out, stderr=err)
        done = threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], _tree_rss(proc.pid))
                done.wait(every)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
        done.set()
        sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    return {"seconds": seconds, "peak_rss_mib": usage.ru_maxrss / 1024, "peak_tree_mib": peak[0] / 2 ** 20,
            "rc": proc.returncode, "load_before": load, "load_after": load_average(), "stdout": stdout,
            "stderr": stderr[-3000:]}


BASE_COMMIT = "19dcc53"          # main before issue 19's verify work: the "previous" code of bench_verify*


def previous_code(commit: str = BASE_COMMIT) -> dict:
    """The toolchain as it was at `commit`, to run beside the current one in the same benchmark: its files
    (`git archive`) in bench/out/base-<commit>/, its C extension built there from its own source where it
    has one (the kernels' signatures change between versions). Returns {"env": ..., "cwd": ...} for
    `run_child`: its packages come first on the path (PYTHONPATH; the working directory is that folder,
    not this checkout)."""
    import glob

    dest = os.path.join(OUT, f"base-{commit}")
    if not os.path.isdir(os.path.join(dest, "sdt_deploy")):
        os.makedirs(dest, exist_ok=True)
        archive = subprocess.run(["git", "-C", ROOT, "archive", commit], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", dest], input=archive, check=True)
    if glob.glob(os.path.join(dest, "sdt_deploy", "run", "_engine_kernels.c")) and \
            not glob.glob(os.path.join(dest, "sdt_deploy", "run", "_engine_kernels*.so")):
        subprocess.run([PYTHON, "setup.py", "-q", "build_ext", "--inplace"], cwd=dest, check=True,
                       capture_output=True)
    return {"env": {"PYTHONPATH": dest}, "cwd": dest}


def median(values) -> float:
    return float(statistics.median(values))


def timed(fn: Callable[[], object], runs: int, warmup: int = 1) -> dict:
    """In-process timing of fn: a warm-up, then the median (and all) of `runs` runs."""
    for _ in range(warmup):
        fn()
    times, loads = [], []
    for _ in range(runs):
        loads.append(load_average()[0])
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median": median(times), "runs": times, "load1": loads}


SETTLE_S = 0.05


def interleaved(fns: dict, runs: int, warmup: int = 1) -> dict:
    """Like `timed` for several functions taking turns (wall seconds, and the process's CPU seconds, all
    threads, per run: less sensitive to other processes' load on one thread): round r runs each in order,
    each time after SETTLE_S of idling, first once untimed, then once timed. A runtime's worker threads keep
    spinning for a while after a call -- onnxruntime's, OpenMP's (libgomp: up to ~300,000 pauses, several
    ms) and the engine's C kernels' (1 ms) do -- and would otherwise slow whichever contender runs next:
    the idling lets the previous contender's threads go to sleep, the untimed call puts the contender's own
    threads in the state repeated calls keep them in."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    out = {k: {"runs": [], "load1": [], "cpu_runs": []} for k in fns}
    for _ in range(runs):
        for k, fn in fns.items():
            time.sleep(SETTLE_S)
            fn()
            out[k]["load1"].append(load_average()[0])
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            out[k]["runs"].append(time.perf_counter() - t0)
            out[k]["cpu_runs"].append(time.process_time() - c0)
    for v in out.values():
        v["median"] = median(v["runs"])
        v["cpu_median"] = median(v["cpu_runs"])   # the process's CPU seconds (all its threads) per run
    return out


def ratio(ours: float, theirs: float) -> float:
    return float(ours) / float(theirs) if theirs else float("nan")


def md_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def save(name: str, result: dict, markdown: str) -> None:
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, f"{name}.json"), "w") as f:
        json.dump(result, f, indent=2, default=str)
    with open(os.path.join(OUT, f"{name}.md"), "w") as f:
        f.write(markdown + "\n")
    print(markdown)
