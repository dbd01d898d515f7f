"""The integer engine (`sdt_deploy.run.integer_engine.run_engine`) on the CPU: throughput beside the quantized torch
model, additions (ACs) per second, and how its time follows the firing rate.

    python bench/bench_engine.py [--quick]

CIFAR 2-256 (32x32, T = 4), random weights calibrated with `sdt_deploy.data.synth.random_model` (seed 0),
standard-normal images (seed 5). Both sides compute the logits of all T steps (`record=False`: no
spike tensors handed back); the engine also counts every operation it performs, as it always does.
Both are timed with 1 and with 2 threads (torch: intra-op threads; the engine: `run_engine(threads=)`,
samples split over threads, scipy's CSR kernel releasing the GIL). Medians of several runs after a
warm-up. Spike check: the engine's spikes against the torch model's (float64 where the bit analysis
does not guarantee float32), every layer, step and sample.

Firing sweep: every BatchNorm beta of the calibrated model scaled by s (1.0 down to -0.6; lower betas,
fewer spikes), each model quantized and run by the engine (batch 8); time against the measured mean
firing rate (spikes / neuron updates over all LIF layers). Written to bench/out/engine_sweep.png.

Target (issue 9): within 3x of the torch model's time on CIFAR 2-256, and event-driven: time falls as
firing falls.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

sys.path.insert(0, C.ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from sdt_deploy.api import quantize  # noqa: E402
from sdt_deploy.data import synth  # noqa: E402
from sdt_deploy.files.configs import resolve  # noqa: E402
from sdt_deploy.quant.bits import bit_report  # noqa: E402
from sdt_deploy.run.integer_engine import run_engine  # noqa: E402
from sdt_deploy.run.torch_runner import run_model  # noqa: E402

CONFIG = "cifar10/2_256_300E_t4"
SCALES = (1.0, 0.8, 0.6, 0.4, 0.2, 0.0, -0.3, -0.6)


def firing_rate(ops: dict) -> float:
    lifs = [o for o in ops.values() if "neuron_updates" in o]
    return sum(o["spikes"] for o in lifs) / max(1, sum(o["neuron_updates"] for o in lifs))


def reference_spikes(q, x):
    model, xs = q.model, x
    if not bit_report(q.graph)["summary"]["float32_exact"]:
        model, xs = copy.deepcopy(q.model).double(), x.astype(np.float64)
    return run_model(model, xs, batch_size=len(x))[1], str(next(model.parameters()).dtype)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    runs = 1 if a.quick else 3
    cfg = resolve(yaml_path=CONFIG).config
    torch.set_num_threads(2)
    base = synth.random_model(cfg, seed=0)
    q = quantize(base)
    rows, result = [], {"machine": C.machine(), "versions": C.versions(), "throughput": [], "sweep": []}
    for batch in (1, 32):
        x = synth.random_inputs(cfg, batch, seed=5)
        torch.set_num_threads(1)
        ref, ref_dtype = reference_spikes(q, x)
        r = run_engine(q.graph, x)
        mism = sum(int(np.count_nonzero(ref[k] != r.spikes[k])) for k in ref)
        identical = mism == 0 and set(ref) <= set(r.spikes)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            t_torch = C.timed(lambda: run_model(q.model, x, batch_size=batch, record=False), runs)
            t_engine = C.timed(lambda: run_engine(q.graph, x, record=False, threads=threads), runs)
            ratio = C.ratio(t_engine["median"], t_torch["median"])
            rows.append([batch, threads, t_torch["median"], t_engine["median"], ratio, "<= 3",
                         "yes" if ratio <= 3 else "no", r.total_acs / t_engine["median"] / 1e9,
                         f"{firing_rate(r.ops):.3f}", f"yes ({ref_dtype})" if identical else f"NO ({mism})",
                         f"{t_torch['load1'][0]:.1f}"])
            result["throughput"].append({"batch": batch, "threads": threads, "torch": t_torch,
                                         "engine": t_engine, "ratio": ratio, "acs": r.total_acs,
                                         "firing_rate": firing_rate(r.ops), "spikes_identical": identical,
                                         "reference_dtype": ref_dtype})
            print(rows[-1], flush=True)
    md = C.md_table(["batch", "threads (both)", "torch s", "engine s", "engine / torch (time)", "target",
                     "met?", "engine G ACs/s", "mean firing rate", "spikes identical", "load (1 min)"], rows)
    # the firing sweep
    x = synth.random_inputs(cfg, 8, seed=5)
    torch.set_num_threads(1)
    sweep_rows = []
    for s in SCALES:
        m = copy.deepcopy(base)
        with torch.no_grad():
            for mod in m.modules():
                if isinstance(mod, torch.nn.BatchNorm2d):
                    mod.bias.mul_(s)
        qs = quantize(m)
        r = run_engine(qs.graph, x, record=False, threads=1)
        t_e = C.timed(lambda: run_engine(qs.graph, x, record=False, threads=1), runs)
        t_t = C.timed(lambda: run_model(qs.model, x, batch_size=8, record=False), runs)
        point = {"beta_scale": s, "firing_rate": firing_rate(r.ops), "acs": r.total_acs, "engine": t_e,
                 "torch": t_t}
        result["sweep"].append(point)
        sweep_rows.append([s, point["firing_rate"], r.total_acs / 1e6, t_e["median"], t_t["median"],
                           C.ratio(t_e["median"], t_t["median"])])
        print(sweep_rows[-1], flush=True)
    md += "\n\nFiring sweep (batch 8, engine and torch on 1 thread):\n\n" + C.md_table(
        ["beta scale", "mean firing rate", "ACs (M)", "engine s", "torch s", "engine / torch"], sweep_rows)
    rates = [pt["firing_rate"] for pt in result["sweep"]]
    times = [pt["engine"]["median"] for pt in result["sweep"]]
    slope = float(np.polyfit(rates, times, 1)[0])
    corr = float(np.corrcoef(rates, times)[0, 1])
    md += (f"\n\nEngine time against firing rate: least-squares slope {slope:.2f} s per unit rate, correlation "
           f"{corr:.3f} (torch's time does not depend on the rate). Plot: bench/out/engine_sweep.png.")
    result["sweep_fit"] = {"slope_s_per_rate": slope, "correlation": corr}
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(rates, times, "o-", label="integer engine")
        ax.plot(rates, [pt["torch"]["median"] for pt in result["sweep"]], "s--", label="torch model (dense)")
        ax.set_xlabel("mean firing rate (spikes / neuron update)")
        ax.set_ylabel("seconds per batch of 8 (T = 4)")
        ax.set_title("CIFAR 2-256: time against firing rate")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(C.OUT, "engine_sweep.png"), dpi=100)
    except ImportError:
        pass
    C.save("engine", result, md)


if __name__ == "__main__":
    main()
