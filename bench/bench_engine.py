"""The integer engine (`sdt_deploy.run.integer_engine.run_engine`) on the CPU: throughput against the quantized torch
model at the calibrated (~21 %) and at a 5 % mean firing rate, its additions per second against the
machine's peak integer-add rate, and how its time follows the firing rate.

    python bench/bench_engine.py [--quick] [--runs N]

CIFAR 2-256 (32x32, T = 4), random weights calibrated with `sdt_deploy.data.synth.random_model` (seed 0),
standard-normal images (seed 5). The 5 % model: every BatchNorm beta of the calibrated model scaled by
the factor (found by bisection, printed) that brings the engine's mean firing rate (spikes / neuron
updates over all LIF layers, on 8 images) to 5 %. Both sides compute the logits of all T steps
(`record=False`: no spike tensors handed back); the engine also counts every operation it performs, as
it always does. On one thread the ratio of the process's CPU seconds per run is given too (it does not
count the time the process waits for a core while other processes run; on a shared machine it is the
steadier figure). Three contenders take turns round by round (`_common.interleaved`): the torch model
(`sdt_deploy.run.torch_runner.run_model` on the quantized model, spikingjelly's torch backend; intra-op threads =
the thread count), the engine (`run_engine(threads=)`) and the previous engine (tests/engine_reference.py,
the engine before its C kernels: the "before" figures, measured in the same run). Median of the runs.

Checks in the same run: the engine's spikes against the torch model's (float64 where the bit analysis
does not guarantee float32), every layer, step and sample; its spikes, logits and operation counts
against the previous engine's.

Peak: `bench/peak_int_add.py` run first in the same process (int16 adds in registers, and rows of int16
weights loaded from L1 / L2 as the event kernel does); the engine's ACs per second are given as a
fraction of them ("distance to the limit").

Firing sweep: every BatchNorm beta scaled by s (1.0 down to -0.6), each model quantized and run on 8
images, engine, previous engine and torch on 1 thread; time against the measured rate. Plot:
bench/out/engine_sweep.png.

Targets (issue 19, part 3): the engine's throughput >= 2x the torch model's at the calibrated ~21 % and
>= 5x at 5 %, batch 1 and 32, 1 and 2 threads. A row counts as met when both its ratio against the torch
model on the same thread count and its ratio against the torch model at whichever thread count was
faster in this run reach the target (on a loaded machine torch's OpenMP threads can make its 2-thread
run far slower than its 1-thread run; that would flatter the engine).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peak_int_add  # noqa: E402

import _common as C  # noqa: E402

sys.path.insert(0, C.ROOT)
sys.path.insert(0, os.path.join(C.ROOT, "tests"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from sdt_deploy.api import quantize  # noqa: E402
from sdt_deploy.data import synth  # noqa: E402
from sdt_deploy.files.configs import resolve  # noqa: E402
from sdt_deploy.quant.bits import bit_report  # noqa: E402
from sdt_deploy.run import engine_kernels  # noqa: E402
from sdt_deploy.run.integer_engine import run_engine  # noqa: E402
from sdt_deploy.run.torch_runner import run_model  # noqa: E402

import engine_reference  # noqa: E402  (tests/engine_reference.py: the engine before its C kernels)

CONFIG = "cifar10/2_256_300E_t4"
SCALES = (1.0, 0.8, 0.6, 0.4, 0.2, 0.0, -0.3, -0.6)
TARGETS = {"calibrated": 2.0, "5 %": 5.0}


def firing_rate(ops: dict) -> float:
    lifs = [o for o in ops.values() if "neuron_updates" in o]
    return sum(o["spikes"] for o in lifs) / max(1, sum(o["neuron_updates"] for o in lifs))


def reference_spikes(q, x):
    model, xs = q.model, x
    if not bit_report(q.graph)["summary"]["float32_exact"]:
        model, xs = copy.deepcopy(q.model).double(), x.astype(np.float64)
    return run_model(model, xs, batch_size=len(x))[1], str(next(model.parameters()).dtype)


def scaled(base, s: float):
    m = copy.deepcopy(base)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.bias.mul_(s)
    return quantize(m)


def model_at_rate(base, x, target: float, tol: float = 0.002):
    """(scale, quantized model) whose engine firing rate on x is within tol of target (bisection on the
    BatchNorm beta scale; the rate rises with it)."""
    lo, hi = -0.6, 1.0
    best = None
    for _ in range(12):
        s = (lo + hi) / 2
        q = scaled(base, s)
        rate = firing_rate(run_engine(q.graph, x, record=False).ops)
        if best is None or abs(rate - target) < abs(best[2] - target):
            best = (s, q, rate)
        if abs(rate - target) <= tol:
            break
        lo, hi = (s, hi) if rate < target else (lo, s)
    return best


def same_as_previous(new, old) -> bool:
    return (new.spikes.keys() == old.spikes.keys()
            and all(np.array_equal(new.spikes[k], old.spikes[k]) for k in old.spikes)
            and np.array_equal(new.logits_int, old.logits_int) and new.ops == old.ops)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--runs", type=int, default=None)
    a = p.parse_args()
    runs = a.runs or (1 if a.quick else 5)
    os.makedirs(C.OUT, exist_ok=True)
    result = {"machine": C.machine(), "versions": C.versions(), "kernel_isa": engine_kernels.kernel_isa(),
              "compiled_kernels": engine_kernels.compiled_kernels(), "throughput": [], "sweep": []}
    peaks = peak_int_add.peak_rates(quick=a.quick)
    result["peak"] = {f"{k[0]} | {k[1]} threads": v for k, v in peaks.items()}
    print({k: round(v / 1e9, 1) for k, v in result["peak"].items()}, flush=True)
    cfg = resolve(yaml_path=CONFIG).config
    base = synth.random_model(cfg, seed=0)
    x8 = synth.random_inputs(cfg, 8, seed=5)
    s5, q5, r5 = model_at_rate(base, x8, 0.05)
    result["five_percent_model"] = {"beta_scale": s5, "rate_on_8_images": r5}
    print(f"5 % model: beta scale {s5:.4f}, rate {r5:.4f}", flush=True)
    models = {"calibrated": quantize(base), "5 %": q5}
    rows = []
    for label, q in models.items():
        for batch in (1, 32):
            x = synth.random_inputs(cfg, batch, seed=5)
            torch.set_num_threads(1)
            ref, ref_dtype = reference_spikes(q, x)
            r = run_engine(q.graph, x)
            mism = sum(int(np.count_nonzero(ref[k] != r.spikes[k])) for k in ref)
            identical = mism == 0 and set(ref) <= set(r.spikes)
            as_before = same_as_previous(r, engine_reference.run_engine(q.graph, x, threads=1))
            rate = firing_rate(r.ops)
            timings = {}
            for threads in (1, 2):
                torch.set_num_threads(threads)
                t = C.interleaved({
                    "torch": lambda: run_model(q.model, x, batch_size=batch, record=False),
                    "engine": lambda: run_engine(q.graph, x, record=False, threads=threads),
                    "previous": lambda: engine_reference.run_engine(q.graph, x, record=False, threads=threads),
                }, runs)
                timings[threads] = t
            torch_best = min(timings[1]["torch"]["median"], timings[2]["torch"]["median"])
            for threads in (1, 2):
                t = timings[threads]
                speedup = C.ratio(t["torch"]["median"], t["engine"]["median"])
                fair = C.ratio(torch_best, t["engine"]["median"])
                cpu = C.ratio(t["torch"]["cpu_median"], t["engine"]["cpu_median"]) if threads == 1 else None
                before = C.ratio(t["torch"]["median"], t["previous"]["median"])
                acs_s = r.total_acs / t["engine"]["median"]
                reg = peaks.get(("C kernel int16, registers", threads), float("nan"))
                l2 = peaks.get(("C kernel int16, rows, L2", threads), float("nan"))
                target = TARGETS[label]
                rows.append([label, f"{rate:.3f}", batch, threads, t["torch"]["median"], t["engine"]["median"],
                             speedup, fair, "-" if cpu is None else cpu, f">= {target:g}",
                             "yes" if min(speedup, fair) >= target else "no",
                             t["previous"]["median"], before, acs_s / 1e9, acs_s / reg, acs_s / l2,
                             f"yes ({ref_dtype})" if identical else f"NO ({mism})", "yes" if as_before else "NO",
                             f"{t['torch']['load1'][0]:.1f}"])
                result["throughput"].append({
                    "model": label, "firing_rate": rate, "batch": batch, "threads": threads, "times": t,
                    "speedup_vs_torch": speedup, "speedup_vs_torch_faster_thread_count": fair,
                    "cpu_time_ratio_1_thread": cpu,
                    "previous_speedup_vs_torch": before, "acs": r.total_acs,
                    "acs_per_s": acs_s, "fraction_of_register_peak": acs_s / reg,
                    "fraction_of_l2_rows_peak": acs_s / l2,
                    "spikes_identical_to_torch": identical, "reference_dtype": ref_dtype,
                    "identical_to_previous_engine": as_before})
                print(rows[-1], flush=True)
    md = C.md_table(["model", "mean firing rate", "batch", "threads (both)", "torch s", "engine s",
                     "engine throughput / torch", "/ torch at its faster thread count",
                     "CPU-time ratio (1 thread)", "target",
                     "met? (both ratios)", "previous engine s", "previous / torch",
                     "engine G ACs/s", "ACs/s / register peak", "ACs/s / L2-rows peak", "spikes = torch",
                     "= previous engine (spikes, logits, op counts)", "load (1 min)"], rows)
    # the firing sweep
    torch.set_num_threads(1)
    sweep_rows = []
    for s in SCALES:
        qs = scaled(base, s)
        r = run_engine(qs.graph, x8, record=False, threads=1)
        t = C.interleaved({
            "torch": lambda: run_model(qs.model, x8, batch_size=8, record=False),
            "engine": lambda: run_engine(qs.graph, x8, record=False, threads=1),
            "previous": lambda: engine_reference.run_engine(qs.graph, x8, record=False, threads=1),
        }, runs)
        point = {"beta_scale": s, "firing_rate": firing_rate(r.ops), "acs": r.total_acs, "times": t}
        result["sweep"].append(point)
        sweep_rows.append([s, point["firing_rate"], r.total_acs / 1e6, t["engine"]["median"], t["previous"]["median"],
                           t["torch"]["median"], C.ratio(t["torch"]["median"], t["engine"]["median"]),
                           C.ratio(t["torch"]["median"], t["previous"]["median"]),
                           t["engine"]["cpu_median"], t["previous"]["cpu_median"], t["torch"]["cpu_median"],
                           C.ratio(t["torch"]["cpu_median"], t["engine"]["cpu_median"]),
                           r.total_acs / t["engine"]["median"] / 1e9])
        print(sweep_rows[-1], flush=True)
    md += "\n\nFiring sweep (batch 8, all on 1 thread):\n\n" + C.md_table(
        ["beta scale", "mean firing rate", "ACs (M)", "engine s", "previous engine s", "torch s",
         "engine throughput / torch", "previous / torch", "engine CPU s", "previous CPU s", "torch CPU s",
         "CPU-time ratio torch / engine", "engine G ACs/s"], sweep_rows)
    rates = [pt["firing_rate"] for pt in result["sweep"]]
    times = [pt["times"]["engine"]["median"] for pt in result["sweep"]]
    cpu = {k: [pt["times"][k]["cpu_median"] for pt in result["sweep"]] for k in ("engine", "previous", "torch")}
    slope = float(np.polyfit(rates, times, 1)[0])
    corr = float(np.corrcoef(rates, times)[0, 1])
    cslope = float(np.polyfit(rates, cpu["engine"], 1)[0])
    ccorr = float(np.corrcoef(rates, cpu["engine"])[0, 1])
    md += (f"\n\nEngine time against firing rate: least-squares slope {slope:.3f} s per unit rate, correlation "
           f"{corr:.3f} (wall); CPU seconds: slope {cslope:.3f}, correlation {ccorr:.3f} (torch's time does not "
           "depend on the rate). Plot (CPU seconds per batch): bench/out/engine_sweep.png.")
    result["sweep_fit"] = {"slope_s_per_rate": slope, "correlation": corr, "cpu_slope_s_per_rate": cslope,
                           "cpu_correlation": ccorr}
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        ax.plot(rates, cpu["engine"], "o-", label="integer engine (C kernels)")
        ax.plot(rates, cpu["previous"], "^:", label="previous engine (numpy/scipy)")
        ax.plot(rates, cpu["torch"], "s--", label="torch model (dense)")
        ax.set_xlabel("mean firing rate (spikes / neuron update)")
        ax.set_ylabel("CPU seconds per batch of 8 (T = 4), 1 thread")
        ax.set_title("CIFAR 2-256: time against firing rate")
        ax.set_ylim(bottom=0)
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(C.OUT, "engine_sweep.png"), dpi=100)
    except ImportError:
        pass
    C.save("engine", result, md)


if __name__ == "__main__":
    main()
