"""`verify --reference reparam`: the quantized plain and re-parameterized V2 graphs side by side.

Each is spike-exact across every executor on its own (`verify`, `verify --reparam`); between the two the
spikes are not identical by nature: the fused weights are other numbers, rounded onto their own grids.
This measures how far apart they are -- spike agreement per LIF, prediction agreement, the accuracy of
the float model and of both quantized forms where labels are known -- and what re-parameterization
costs and gains (`ir.reparam.reparam_cost`: parameters, MACs turned into ACs).
"""
from __future__ import annotations

import numpy as np

from sdt_deploy.ir.reparam import reparam_cost
from sdt_deploy.quant.qmodel import QuantizedModel
from sdt_deploy.run.integer_engine import run_engine
from sdt_deploy.run.torch_runner import predictions, run_model
from sdt_deploy.verification.compare import agreement


def compare_reparam(float_model, plain: QuantizedModel, fused: QuantizedModel, plain_float_graph, fused_float_graph,
                    dataset, batch_size: int = 16) -> dict:
    """Spike agreement per LIF of the quantized plain and re-parameterized graphs (the integer engine runs
    both: each is spike-exact with every other executor), prediction agreement, accuracies."""
    sums: dict = {}
    sizes: dict = {}
    correct = {"float": 0, "plain": 0, "reparam": 0}
    same_pred = {"plain_vs_reparam": 0, "plain_vs_float": 0, "reparam_vs_float": 0}
    n = labelled = 0
    for start in range(0, len(dataset), batch_size):
        x, labels = dataset.batch(range(start, min(start + batch_size, len(dataset))))
        ref_logits, _ = run_model(float_model, x, batch_size=len(x), record=False)
        a, b = run_engine(plain.graph, x), run_engine(fused.graph, x)
        for k, v in agreement(a.spikes, {k: b.spikes[k] for k in a.spikes if k in b.spikes}).items():
            sums[k] = sums.get(k, 0.0) + v * a.spikes[k].size
            sizes[k] = sizes.get(k, 0) + a.spikes[k].size
        preds = {"float": predictions(ref_logits), "plain": predictions(a.logits), "reparam": predictions(b.logits)}
        same_pred["plain_vs_reparam"] += int((preds["plain"] == preds["reparam"]).sum())
        same_pred["plain_vs_float"] += int((preds["plain"] == preds["float"]).sum())
        same_pred["reparam_vs_float"] += int((preds["reparam"] == preds["float"]).sum())
        n += len(x)
        if labels is not None:
            labelled += len(x)
            for form, p in preds.items():
                correct[form] += int((p == np.asarray(labels)).sum())
    accuracy = {form: correct[form] / labelled for form in correct} if labelled else None
    return {
        "samples": n,
        "weight_bits": int(plain.graph.meta["weight_bits"]),
        "layers": {k: sums[k] / sizes[k] for k in sizes},
        "prediction_agreement": {k: v / n for k, v in same_pred.items()},
        "accuracy": accuracy,
        "accuracy_delta_reparam_minus_plain": (accuracy["reparam"] - accuracy["plain"]) if accuracy else None,
        "cost": reparam_cost(plain_float_graph, fused_float_graph),
        "note": "spike agreement of the quantized plain and re-parameterized graphs (each spike-exact on every "
                "executor on its own); not exact by nature: the fused weights round onto their own grids",
    }


def print_reparam_report(rep: dict, console=None) -> None:
    from rich.table import Table

    from sdt_deploy.console import console as _console

    console = console or _console()
    t = Table(title=f"quantized plain vs re-parameterized: spike agreement ({rep['samples']} samples, "
                    f"int{rep['weight_bits']})")
    t.add_column("layer", no_wrap=True)
    t.add_column("agreement", justify="right")
    for k, v in rep["layers"].items():
        t.add_row(k, f"{100 * v:.4f}%")
    console.print(t)
    pa = rep["prediction_agreement"]
    console.print(f"predictions equal: plain vs reparam {100 * pa['plain_vs_reparam']:.2f}%, plain vs float "
                  f"{100 * pa['plain_vs_float']:.2f}%, reparam vs float {100 * pa['reparam_vs_float']:.2f}%",
                  highlight=False)
    if rep["accuracy"]:
        a = rep["accuracy"]
        delta = 100 * rep["accuracy_delta_reparam_minus_plain"]
        console.print(f"accuracy: float {100 * a['float']:.2f}%, quantized plain {100 * a['plain']:.2f}%, quantized "
                      f"reparam {100 * a['reparam']:.2f}% (reparam - plain {delta:+.2f} points)", highlight=False)
    c = rep["cost"]
    console.print(f"parameters: {c['params_plain']:,} -> {c['params_reparam']:,} ({c['params_ratio']:.2f}x)",
                  highlight=False)
    for form in ("plain", "reparam"):
        ops = ", ".join(f"{k} {v['ops']} ops / {v['flops']:,} dense MACs" for k, v in c[f"ops_{form}"].items())
        console.print(f"{form}: {ops}", highlight=False)
