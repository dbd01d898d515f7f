"""Verification results for people: the per-layer spike table and the sentence naming the first divergence."""
from __future__ import annotations


def print_result(res, console=None) -> None:
    from rich.table import Table

    from sdt_deploy.console import console as _console

    console = console or _console()
    j = res.to_json()
    execs = [e for e in j["layers"][next(iter(j["layers"]))]] if j["layers"] else []
    t = Table(title=f"spikes per layer ({j['samples']} samples; reference: {j['reference']})")
    t.add_column("layer", no_wrap=True)
    for ex in execs:
        t.add_column(ex, justify="right")
    for layer, row in j["layers"].items():
        cells = []
        for ex in execs:
            r = row.get(ex)
            if r is None:
                cells.append("-")
            elif r["mismatches"]:
                cells.append(f"[red]{r['spikes']} ({r['mismatches']} differ)[/]")
            else:
                cells.append(str(r["spikes"]))
        t.add_row(layer, *cells)
    console.print(t)
    for ex, why in j["executors"].items():
        if why != "ran":
            console.print(f"{ex}: {why}")
    if j["accuracy"]:
        console.print("accuracy: " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in j["accuracy"].items()))
    b = j["bits"]
    console.print(f"bits: integer side {b['max_int_bits']}, float32 side {b['max_float32_bits']} of 25; "
                  f"exact side: {b['exact_side']}")


def describe_divergence(first: dict) -> str:
    where = (f"{first['executor']} differs from the reference first at layer {first['layer']}, time step "
             f"{first['step']}, sample {first['sample']}, neuron {tuple(first['neuron'])}: reference spike "
             f"{first['reference_spike']}, {first['executor']} spike {first['candidate_spike']}")
    if "reference_H" in first:
        where += f"; membrane H reference {first['reference_H']!r}"
        if "candidate_H" in first:
            where += f", {first['executor']} {first['candidate_H']!r}"
        where += f"; threshold {first['theta']} (= {first['theta_int']} on grid {first['grid']})"
    elif "note" in first:
        where += f"; {first['note']}"
    return where


