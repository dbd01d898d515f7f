"""The operation report for people and machines: a terminal table, JSON, CSV and a PNG plot."""
from __future__ import annotations

import csv
import io
import json
from typing import Optional

import numpy as np


def human(x: Optional[float], digits: int = 3) -> str:
    if x is None:
        return "-"
    if x == 0:
        return "0"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.{digits}g}{unit}"
    return f"{x:.{digits}g}"


def joules(pj: Optional[float]) -> str:
    if pj is None:
        return "-"
    if pj == 0:
        return "0"
    for unit, scale in (("mJ", 1e9), ("uJ", 1e6), ("nJ", 1e3)):
        if abs(pj) >= scale:
            return f"{pj / scale:.3g} {unit}"
    return f"{pj:.3g} pJ"


def print_report(rep: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    from sdt_deploy.console import console as _console

    console = console or _console()
    if not console.is_terminal and console.width < 180:
        console = Console(width=180, file=console.file)
    tot = rep["totals"]
    t = Table(title=f"operations and energy per sample (T = {tot['time_steps']}, {tot['samples']} samples, "
                    f"energy table {rep['energy_table']['name']})")
    for col, just in (("layer", "left"), ("kind", "left"), ("input", "left"), ("in rate", "right"),
                      ("FLOPs", "right"), ("paper ops", "right"), ("ACs", "right"), ("MACs", "right"),
                      ("other ops", "right"), ("E paper", "right"), ("E measured", "right")):
        t.add_column(col, justify=just, no_wrap=(col == "layer"))
    for r in rep["layers"]:
        other = sum(v for k, v in r["ops_per_sample"].items() if k not in ("ac", "mac"))
        paper = f"{human(r['paper_ops'])} {r['paper_counted_as']}" if r["paper_counted_as"] else "-"
        t.add_row(r["name"], r["kind"], "x".join(map(str, r["input_shape"])),
                  "-" if r["input_rate"] is None else f"{r['input_rate']:.4f}",
                  human(r["flops"]) if r["flops"] else "-", paper, human(r["acs_per_sample"]),
                  human(r["macs_per_sample"]), human(other), joules(r["paper_energy_pj"]), joules(r["energy_pj"]))
    m, p, a = tot["measured"], tot["paper"], tot["ann"]
    other = sum(v for k, v in m["ops_per_sample"].items() if k not in ("ac", "mac"))
    t.add_section()
    t.add_row("total", "", "", "", human(p["flops"]), f"{human(p['sops'])} SOP + {human(p['macs'])} MAC",
              human(m["acs_per_sample"]), human(m["macs_per_sample"]), human(other),
              joules(p["energy_pj"]), joules(m["energy_pj"]))
    console.print(t)
    console.print(f"[bold]energy per sample[/]  paper convention {p['energy_mj']:.4g} mJ   measured "
                  f"{m['energy_mj']:.4g} mJ   ANN baseline {a['energy_mj']:.4g} mJ"
                  + (f"   (ANN / measured = {tot['ann_over_measured']:.3g}x)" if tot["ann_over_measured"] else ""))
    if "engine" in tot:
        e = tot["engine"]
        console.print(f"[bold]measured ACs[/] {m['acs']:,} over the run = the integer engine's counter "
                      f"{e['total_acs']:,} ({'match' if e['matches'] else 'MISMATCH'}); MACs {m['macs']:,}")
    if rep["blocks"]:
        b = Table(title="SDSA vs vanilla self-attention, per block and sample")
        for col in ("block", "N x D", "vanilla MACs", "vanilla other", "E vanilla", "SDSA ops", "E SDSA",
                    "vanilla / SDSA", "(all as AC)", "E proj (ANN)", "E proj (SDT)"):
            b.add_column(col, justify="left" if col == "block" else "right")
        for blk in rep["blocks"]:
            v, s, pr = blk["vanilla"], blk["sdsa"], blk["projections"]
            b.add_row(blk["block"], f"{blk['tokens']} x {blk['dim']}", human(v["ops"]["mac"]),
                      human(sum(x for k, x in v["ops"].items() if k != "mac")), joules(v["energy_pj"]),
                      human(sum(s["ops"].values())), joules(s["energy_pj"]),
                      f"{blk['vanilla_over_sdsa']:.3g}x" if blk["vanilla_over_sdsa"] else "-",
                      f"{blk['vanilla_over_sdsa_all_as_ac']:.3g}x" if blk["vanilla_over_sdsa_all_as_ac"] else "-",
                      joules(pr["ann_energy_pj"]), joules(pr["measured_energy_pj"]))
        console.print(b)
    console.print("[bold]energy table[/] " + ", ".join(f"{k} {v:g} pJ" for k, v in rep["energy_table"]["pj"].items()))
    console.print("[bold]convention[/]")
    for section, lines in rep["convention"].items():
        for line in lines:
            console.print(f"  [dim]{section}:[/] {line}", highlight=False)


OP_COLUMNS = ("ac", "mac", "bias_add", "and", "or", "compare", "count", "add", "neuron_update")


def report_csv(rep: dict) -> str:
    """One row per layer; counts are totals over the run, energies per sample (pJ)."""
    T = rep["totals"]["time_steps"]
    header = (["name", "kind", "op", "input_from", "input_shape", "output_shape", "input_rate"]
              + [f"input_rate_t{t}" for t in range(T)] + ["output_rate", "flops"]
              + [f"ops_{k}" for k in OP_COLUMNS]
              + ["acs_per_sample", "macs_per_sample", "energy_pj", "paper_counted_as", "paper_ops",
                 "paper_energy_pj", "ann_macs", "ann_energy_pj"])
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in rep["layers"]:
        steps = r["input_rate_per_step"] or [None] * T
        w.writerow([r["name"], r["kind"], r["op"], r["input_from"] or "", "x".join(map(str, r["input_shape"])),
                    "x".join(map(str, r["output_shape"])), _cell(r["input_rate"])]
                   + [_cell(v) for v in steps] + [_cell(r["output_rate"]), r["flops"]]
                   + [r["ops"].get(k, 0) for k in OP_COLUMNS]
                   + [_cell(r["acs_per_sample"]), _cell(r["macs_per_sample"]), _cell(r["energy_pj"]),
                      r["paper_counted_as"] or "", _cell(r["paper_ops"]), _cell(r["paper_energy_pj"]),
                      r["ann_ops"].get("mac", 0), _cell(r["ann_energy_pj"])])
    return buf.getvalue()


def _cell(v) -> str:
    return "" if v is None else repr(float(v))


def plot_report(rep: dict, path: str) -> None:
    """Per-layer input firing rate (mean and per step) and energy (measured, paper), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sdt_deploy.files.atomic import atomic_write

    layers = rep["layers"]
    names = [r["name"] for r in layers]
    x = np.arange(len(layers))
    fig, (ax_rate, ax_energy) = plt.subplots(2, 1, sharex=True, figsize=(max(8.0, 0.22 * len(layers) + 2), 8))
    rate = np.array([np.nan if r["input_rate"] is None else r["input_rate"] for r in layers])
    ax_rate.bar(x, np.nan_to_num(rate), color="tab:blue", label="mean over steps")
    T = rep["totals"]["time_steps"]
    for t in range(T):
        steps = np.array([np.nan if r["input_rate_per_step"] is None else r["input_rate_per_step"][t] for r in layers])
        ax_rate.plot(x, steps, ".", ms=3, alpha=0.7, label=f"t = {t}" if T <= 8 else None)
    out_rate = np.array([r["output_rate"] if r["kind"] == "neuron update" else np.nan for r in layers])
    ax_rate.plot(x, out_rate, "kx", ms=4, label="LIF output rate")
    ax_rate.set_ylabel("input firing rate")
    ax_rate.legend(fontsize=6, ncol=min(T + 1, 9))
    measured = np.array([r["energy_pj"] for r in layers])
    paper = np.array([r["paper_energy_pj"] for r in layers])
    ax_energy.bar(x - 0.2, measured, width=0.4, label="measured", color="tab:orange")
    ax_energy.bar(x + 0.2, paper, width=0.4, label="paper convention", color="tab:green")
    ax_energy.set_yscale("symlog", linthresh=1.0)
    ax_energy.set_ylabel(f"energy per sample (pJ, {rep['energy_table']['name']})")
    ax_energy.legend(fontsize=7)
    ax_energy.set_xticks(x)
    ax_energy.set_xticklabels(names, rotation=90, fontsize=6)
    tot = rep["totals"]
    fig.suptitle(f"T = {T}, {tot['samples']} samples: measured {tot['measured']['energy_mj']:.3g} mJ, "
                 f"paper {tot['paper']['energy_mj']:.3g} mJ, ANN {tot['ann']['energy_mj']:.3g} mJ per sample",
                 fontsize=9)
    fig.tight_layout()
    with atomic_write(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def report_json(rep: dict) -> str:
    from sdt_deploy.ir.graph import json_default

    return json.dumps(rep, indent=2, default=json_default)


def write_outputs(rep: dict, json_path: Optional[str], csv_path: Optional[str], plot_path: Optional[str]) -> None:
    from sdt_deploy.files.atomic import write_text

    if json_path:
        write_text(json_path, report_json(rep))
    if csv_path:
        write_text(csv_path, report_csv(rep))
    if plot_path:
        plot_report(rep, plot_path)


