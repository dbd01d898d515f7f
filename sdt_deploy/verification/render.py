"""Verification results for people: the per-layer table, what ran on which file, and the sentence naming
the first divergence."""
from __future__ import annotations


def _cell(r: dict | None) -> str:
    """One executor's column of one layer: the spikes it showed, and its membranes where compared."""
    if r is None:
        return "-"
    parts = []
    if r.get("spikes") is not None:
        bad = r.get("mismatches") or 0
        parts.append(f"[red]{r['spikes']} ({bad} differ)[/]" if bad else str(r["spikes"]))
    if "membranes" in r:
        bad = r["membrane_mismatches"]
        parts.append(f"[red]V: {bad} differ[/]" if bad else "V =")
    return " ".join(parts) or "-"


def print_result(res, console=None) -> None:
    from rich.table import Table

    from sdt_deploy.console import console as _console

    console = console or _console()
    j = res.to_json()
    execs = [ex for ex, e in j["executors"].items() if e["ran"]]
    t = Table(title=f"every layer, every step ({j['samples']} samples; reference: {j['reference']}); "
                    "numbers: spikes; V =: every membrane equal")
    t.add_column("layer", no_wrap=True)
    for ex in execs:
        t.add_column(ex, justify="right")
    for layer, row in j["layers"].items():
        t.add_row(layer, *[_cell(row.get(ex)) for ex in execs])
    if j["per_step_output"]:
        cells = []
        for ex in execs:
            r = j["per_step_output"].get(ex)
            cells.append("-" if r is None else (f"[red]{r['mismatches']} differ[/]" if r["mismatches"] else "="))
        t.add_row("output at every step", *cells)
    console.print(t)
    for ex, e in j["executors"].items():
        if not e["ran"]:
            console.print(f"{ex}: skipped: {e['skipped']}")
        elif "file" in e:
            f = e["file"]
            console.print(f"{ex}: {f['path']} ({f['origin']}, sha256 {f['sha256'][:16]}...): {e['compared']}",
                          highlight=False)
    if j["accuracy"]:
        console.print("accuracy: " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in j["accuracy"].items()))
    b = j["bits"]
    console.print(f"bits: the integer side needs {b['max_int_bits']}; float32 is exact to 24 and needs "
                  f"{b['max_float32_bits'] - 1}; exact side: {b['exact_side']}")


def describe_divergence(first: dict) -> str:
    ex = first["executor"]
    where = (f"{ex} differs from the reference first at layer {first['layer']}, time step {first['step']}, "
             f"sample {first['sample']}, neuron {tuple(first['neuron'])}: ")
    if "reference_spike" in first:
        where += f"reference spike {first['reference_spike']}, {ex} spike {first['candidate_spike']}"
        if "reference_H" in first:
            where += f"; membrane H reference {first['reference_H']!r}"
            if "candidate_H" in first:
                where += f", {ex} {first['candidate_H']!r}"
            where += f"; threshold {first['theta']} (= {first['theta_int']} on grid {first['grid']})"
        elif "note" in first:
            where += f"; {first['note']}"
    elif "reference_V" in first:
        unit = f" (integers on grid {first['grid']})" if first["arithmetic"] == "int" else f" ({first['arithmetic']})"
        where += (f"membrane after the step: reference {first['reference_V']!r}, {ex} {first['candidate_V']!r}"
                  f"{unit}; threshold {first['theta']} (= {first['theta_int']} on grid {first['grid']})")
    else:
        where += (f"output of the step before the read-out: reference {first['reference_value']!r}, {ex} "
                  f"{first['candidate_value']!r} ({first['arithmetic']})")
    return where
