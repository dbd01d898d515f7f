"""Memory budgets: how much a command may hold (`--max-memory`), how much memory a sample of a graph
takes in each executor, and the batch that fits.

A budget is the peak resident memory the whole command may reach (its worker processes included): the
models and sessions it opens (`model_bytes`) plus, per sample of a batch, what the executors hold at
once (`sample_bytes`). Both are estimates from the graph -- the neurons of every layer times T times the
bytes each executor keeps of them -- calibrated on measurements (BENCHMARKS.md, "Verify: memory"); they
err on the large side. The batch is the largest that fits, never more than the one asked for, at least
one sample: a model that does not fit at one sample runs at one sample, and the command says so.

`--max-memory` takes bytes with a unit (`8G`, `500M`, `1.5GiB`; K/M/G/T are powers of 1024), or a
fraction of the memory available now (`0.5`); the default is `DEFAULT_FRACTION` of it.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np

from sdt_deploy.errors import DeployError

DEFAULT_FRACTION = 1 / 3
UNITS = {"": 1, "B": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}
GIB = 2 ** 30


def available_memory() -> int:
    """Bytes this process could still use: the kernel's MemAvailable (free memory plus what the page cache
    can give back), bounded by the cgroup's limit where one is set (a container)."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):   # pragma: no cover - not POSIX
            avail = 8 * GIB
    limit = _cgroup_room()
    return int(min(avail, limit)) if limit is not None else int(avail)


def _cgroup_room() -> Optional[int]:
    """memory.max - memory.current of this process's cgroup (v2), None where unlimited or unknown."""
    try:
        with open("/proc/self/cgroup") as f:
            path = next((line.strip().split(":", 2)[2] for line in f if line.startswith("0::")), None)
        if path is None:
            return None
        base = os.path.join("/sys/fs/cgroup", path.lstrip("/"))
        with open(os.path.join(base, "memory.max")) as f:
            limit = f.read().strip()
        if limit == "max":
            return None
        with open(os.path.join(base, "memory.current")) as f:
            used = int(f.read().strip())
        return max(0, int(limit) - used)
    except (OSError, ValueError, StopIteration):
        return None


def rss_bytes() -> int:
    """The resident memory of this process now."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):   # pragma: no cover - not Linux
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass(frozen=True)
class Budget:
    """A memory budget in bytes and how it was given (for the messages)."""

    bytes: int
    given: str

    def __str__(self) -> str:
        return f"{format_bytes(self.bytes)} ({self.given})"


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(I?B)?\s*$", re.IGNORECASE)


def parse_memory(value: Union[None, str, int, float], available: Optional[int] = None) -> Budget:
    """The budget `value` stands for: None (the default fraction of the available memory), a number of
    bytes (int), a fraction of the available memory (a float or a string in (0, 1]), or a size with a
    unit ('8G', '500M', '1.5GiB', '2048K'). Anything else is one clear DeployError."""
    if value is None:
        avail = available_memory() if available is None else available
        return Budget(int(avail * DEFAULT_FRACTION), f"default: 1/3 of the {format_bytes(avail)} available")
    if isinstance(value, bool):
        raise DeployError(f"--max-memory {value!r}: give a size such as 8G or 500M, or a fraction such as 0.5")
    if isinstance(value, int):
        if value <= 0:
            raise DeployError(f"--max-memory {value}: must be positive")
        return Budget(value, "given in bytes")
    text = str(value).strip()
    fraction = None
    if isinstance(value, float):
        fraction = value
    else:
        try:
            fraction = float(text) if "." in text or text in ("0", "1") else None
        except ValueError:
            fraction = None
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise DeployError(f"--max-memory {text}: a fraction of the available memory must lie in (0, 1]; "
                              "give a size with a unit (8G, 500M) for more")
        avail = available_memory() if available is None else available
        return Budget(int(avail * fraction), f"{fraction:g} of the {format_bytes(avail)} available")
    m = _SIZE.match(text)
    if not m or (not m.group(2) and not m.group(3)):
        raise DeployError(f"--max-memory {text!r}: give a size such as 8G or 500M, or a fraction such as 0.5")
    size = int(float(m.group(1)) * UNITS[m.group(2).upper()])
    if size <= 0:
        raise DeployError(f"--max-memory {text}: must be positive")
    return Budget(size, f"{text} given")


# ------------------------------------------------------------------------------------------- estimates

@dataclass(frozen=True)
class Activations:
    """Neurons per sample and step of a graph, by kind: the sizes every estimate starts from."""

    T: int
    spikes: int          # spike-kind nodes (0/1 values)
    lif: int             # LIF nodes (each has a membrane)
    currents: int        # current-kind nodes
    largest: int         # the largest node
    params: int          # weights of the synaptic layers
    family: str = "v1"   # the graph's model family ("v2": Meta-SpikeFormer, see WORKING_SET)

    @property
    def all(self) -> int:
        return self.spikes + self.currents


def activations(graph) -> Activations:
    """The neuron counts of a deploy graph (per sample, per step)."""
    from sdt_deploy.ir.graph import LIF, SPIKE

    spikes = lif = currents = largest = params = 0
    for n in graph.nodes:
        size = int(np.prod(n.shape)) if len(n.shape) else 1
        largest = max(largest, size)
        if n.out_kind == SPIKE:
            spikes += size
        else:
            currents += size
        if isinstance(n, LIF):
            lif += size
        w = getattr(n, "w_int", None)
        if w is not None:
            params += int(np.asarray(w).size)
    T = int(graph.meta.get("time_steps", 1))
    return Activations(T, spikes, lif, currents, largest, params, str(graph.meta.get("family", "v1")))


def choose_batch(wanted: int, budget: int, fixed: int, per_sample: int) -> int:
    """The largest batch <= `wanted` with fixed + batch * per_sample <= budget (at least 1)."""
    if per_sample <= 0:
        return max(1, wanted)
    room = (budget - fixed) // per_sample
    return int(max(1, min(wanted, room)))


@dataclass(frozen=True)
class BatchPlan:
    """What a command will run with: the batch size, the processes, and the sentence to say when the batch
    or the processes were cut to fit the budget (None when nothing was cut)."""

    batch_size: int
    jobs: int
    budget: Budget
    model_bytes: int
    sample_bytes: int
    note: Optional[str] = None

    @property
    def peak_estimate(self) -> int:
        return self.jobs * (self.model_bytes + self.batch_size * self.sample_bytes)


def plan_batch(command: str, wanted: int, budget: Budget, model_bytes: int, sample_bytes: int,
               jobs: int = 1) -> BatchPlan:
    """The batch (and the worker processes, each holding its own models and batch) that fit `budget`: the
    processes are cut first (down to 1) where the batch asked for would not fit them, then the batch. The
    note says what was cut and why."""
    jobs = max(1, int(jobs))
    asked = jobs
    while jobs > 1 and jobs * (model_bytes + wanted * sample_bytes) > budget.bytes:
        jobs -= 1
    batch = choose_batch(wanted, budget.bytes // jobs, model_bytes, sample_bytes)
    note = None
    what = []
    if batch < wanted:
        what.append(f"batch {wanted} -> {batch}")
    if jobs < asked:
        what.append(f"processes {asked} -> {jobs}")
    if what:
        need = model_bytes + sample_bytes
        tail = (f"; the models alone need about {format_bytes(model_bytes)} and one sample "
                f"{format_bytes(sample_bytes)}, more than the budget: running one sample at a time"
                if batch == 1 and need > budget.bytes else "")
        note = (f"{command}: {', '.join(what)} to stay within --max-memory {budget} (about "
                f"{format_bytes(sample_bytes)} a sample, {format_bytes(model_bytes)} for the models){tail}")
    return BatchPlan(batch, jobs, budget, int(model_bytes), int(sample_bytes), note)


# What each executor keeps, in bytes per neuron and step (the factors measured on SDT-8-768 at 224 and
# CIFAR 2-256; see BENCHMARKS.md): `lif`, `spikes`, `currents`, `largest` weigh the counts of
# `Activations`; a run holds its working set only while it runs, the verifier's references all batch long.
WORKING_SET = {
    # spikingjelly: the LIF's float state and its step temporaries, the stream, the conv outputs
    "torch": {"largest": 24.0, "lif": 1.0},
    "cupy": {"largest": 24.0, "lif": 1.0},
    # int32/int64 currents held until their last consumer, the LIF's H trace where asked
    "engine": {"largest": 40.0, "lif": 1.0},
    # the LIF states in and out of one step, onnxruntime's buffers
    "onnx-int": {"lif": 2.0, "largest": 12.0},
    "onnx-float": {"lif": 2.0, "largest": 12.0},
    # float64 state of every neuron, one step of every node's output, the host stem's run
    "nir": {"lif": 2.0, "currents": 2.0, "largest": 24.0},
    # a V2 torch model (its reference runs in float64 throughout): every current of all T steps is alive
    # at once in its forward pass -- measured on metaspikformer_8_768 at 224, T 4: 1.74 GiB a sample,
    # currents x T x 8 bytes being 1.77 GiB (the V1 factors above gave 0.56)
    "torch-v2": {"currents": 8.0, "lif": 1.0},
}


def executor_bytes(name: str, a: Activations) -> int:
    """The working set of one executor per sample (all T steps)."""
    if name in ("torch", "cupy") and a.family == "v2":
        name = "torch-v2"
    w = WORKING_SET.get(name, WORKING_SET["torch"])
    per_step = sum(getattr(a, k) * v for k, v in w.items())
    return int(per_step * a.T)


def model_bytes(name: str, a: Activations) -> int:
    """What one executor's models or sessions take, from the weights: float32 and float64 copies of every
    weight for the torch model, int16 packed weights for the engine, onnxruntime's weights and their
    packed copies, NIR's float64 weights."""
    per_param = {"torch": 6, "cupy": 4, "engine": 6, "onnx-int": 4, "onnx-float": 10, "nir": 12}.get(name, 8)
    if name == "torch" and a.family == "v2":
        per_param = 12          # the float32 model and a whole float64 one (V2's reference)
    return int(a.params * per_param)


RUNTIME_BYTES = 600 * 2 ** 20     # Python with torch, onnxruntime, numpy and the toolchain imported
