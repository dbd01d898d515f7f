"""`verify --reference float`: what folding and quantization change against the original float model.

Not exact by nature (docs/numeric-contract.md): BatchNorm folding re-rounds the weights in float32, and quantization
moves every weight onto a power-of-two grid (and, for PLIF, every decay to 1/2). So this reports
spike agreement per layer, the largest logit difference, prediction agreement and — where labels are
known — the accuracy of each form, instead of a pass/fail.
"""
from __future__ import annotations

import numpy as np

from sdt_deploy.files.checkpoint import LoadedModel
from sdt_deploy.ir.lower import lower
from sdt_deploy.ir.passes import fold_bn
from sdt_deploy.quant.qmodel import QuantizedModel
from sdt_deploy.run.float_executor import execute
from sdt_deploy.run.torch_runner import predictions, run_model
from sdt_deploy.verification.compare import agreement


def compare_float(loaded: LoadedModel, q: QuantizedModel, dataset, batch_size: int = 32) -> dict:
    """The float model `loaded`, its BN-folded graph and its quantized form `q` on `dataset`."""
    weight_bits = int(q.graph.meta["weight_bits"])
    folded = fold_bn(lower(loaded.model))
    sums = {"folded": {}, "quantized": {}}
    sizes: dict = {}
    correct = {"float": 0, "folded": 0, "quantized": 0}
    same_pred = {"folded": 0, "quantized": 0}
    max_logit_diff = {"folded": 0.0, "quantized": 0.0}
    n = labelled = 0
    for start in range(0, len(dataset), batch_size):
        x, labels = dataset.batch(range(start, min(start + batch_size, len(dataset))))
        ref_logits, ref = run_model(loaded.model, x, batch_size=len(x))
        f_logits, f_spikes, _ = execute(folded, x)
        q_logits, q_spikes = run_model(q.model, x, batch_size=len(x))
        for form, logits, spikes in (("folded", f_logits, f_spikes), ("quantized", q_logits, q_spikes)):
            for k, v in agreement(ref, spikes).items():
                sums[form][k] = sums[form].get(k, 0.0) + v * ref[k].size
            same_pred[form] += int((predictions(logits) == predictions(ref_logits)).sum())
            max_logit_diff[form] = max(max_logit_diff[form], float(np.abs(logits - ref_logits).max()))
        for k, v in ref.items():
            sizes[k] = sizes.get(k, 0) + v.size
        n += len(x)
        if labels is not None:
            labelled += len(x)
            for form, logits in (("float", ref_logits), ("folded", f_logits), ("quantized", q_logits)):
                correct[form] += int((predictions(logits) == labels).sum())
    layers = {k: {form: sums[form][k] / sizes[k] for form in sums} for k in sizes}
    return {
        "samples": n,
        "weight_bits": weight_bits,
        "layers": layers,
        "prediction_agreement": {form: same_pred[form] / n for form in same_pred},
        "max_logit_difference": max_logit_diff,
        "accuracy": {form: correct[form] / labelled for form in correct} if labelled else None,
        "plif_tau_changed": q.graph.meta.get("plif_tau", {}),
        "note": "agreement with the original float model; folding and quantization are not exact by nature",
    }


def print_float_report(rep: dict, console=None) -> None:
    from rich.table import Table

    from sdt_deploy.console import console as _console

    console = console or _console()
    t = Table(title=f"spike agreement with the original float model ({rep['samples']} samples)")
    t.add_column("layer", no_wrap=True)
    t.add_column("BN-folded float", justify="right")
    t.add_column(f"int{rep['weight_bits']} quantized", justify="right")
    for k, row in rep["layers"].items():
        t.add_row(k, f"{100 * row['folded']:.4f}%", f"{100 * row['quantized']:.4f}%")
    console.print(t)
    pa, ld = rep["prediction_agreement"], rep["max_logit_difference"]
    console.print(f"predictions equal to the float model's: folded {100 * pa['folded']:.2f}%, quantized "
                  f"{100 * pa['quantized']:.2f}%; largest logit difference: folded {ld['folded']:.3g}, "
                  f"quantized {ld['quantized']:.3g}")
    if rep["accuracy"]:
        a = rep["accuracy"]
        console.print(f"accuracy: float {100 * a['float']:.2f}%, folded {100 * a['folded']:.2f}%, quantized "
                      f"{100 * a['quantized']:.2f}% (delta {100 * (a['quantized'] - a['float']):+.2f} points)")
    if rep["plif_tau_changed"]:
        taus = ", ".join(f"{k} {v:.3f}" for k, v in rep["plif_tau_changed"].items())
        console.print(f"PLIF decays set to 1/2 (tau 2) from trained tau: {taus}")
