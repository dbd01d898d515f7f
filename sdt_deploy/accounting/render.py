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


def counted_of(rep: dict) -> str:
    """Which model a report counted, in words (reports written before `model.counted` existed counted the
    quantized model)."""
    return rep.get("model", {}).get("counted", "quantized (the deployed integer model)")


def print_report(rep: dict, console=None, explain: bool = False) -> None:
    from rich.console import Console
    from rich.table import Table

    from sdt_deploy.console import console as _console

    console = console or _console()
    if not console.is_terminal and console.width < 180:
        console = Console(width=180, file=console.file)
    tot = rep["totals"]
    is_float = counted_of(rep).startswith("float")
    measured_label = "counted" if is_float else "measured"
    t = Table(title=f"operations and energy per sample (T = {tot['time_steps']}, {tot['samples']} samples, "
                    f"energy table {rep['energy_table']['name']})\nmodel counted: {counted_of(rep)}")
    for col, just in (("layer", "left"), ("kind", "left"), ("input", "left"), ("in rate", "right"),
                      ("FLOPs", "right"), ("paper ops", "right"), ("ACs", "right"), ("MACs", "right"),
                      ("other ops", "right"), ("E paper", "right"), (f"E {measured_label}", "right")):
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
    console.print(f"[bold]energy per sample[/]  paper convention {p['energy_mj']:.4g} mJ   {measured_label} "
                  f"{m['energy_mj']:.4g} mJ   ANN baseline {a['energy_mj']:.4g} mJ"
                  + (f"   (ANN / {measured_label} = {tot['ann_over_measured']:.3g}x)"
                     if tot["ann_over_measured"] else ""))
    e = tot.get("engine")
    if e is not None and e.get("applicable", True):
        console.print(f"[bold]measured ACs[/] {m['acs']:,} over the run = the integer engine's counter "
                      f"{e['total_acs']:,} ({'match' if e['matches'] else 'MISMATCH'}); MACs {m['macs']:,}")
    elif e is not None:
        console.print(f"[bold]counted ACs[/] {m['acs']:,} over the run, MACs {m['macs']:,}, from the float "
                      f"model's spikes; engine check {e['why']}", highlight=False)
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
    if not explain:
        n = sum(len(lines) for lines in rep["convention"].values())
        console.print(f"[dim]what every number counts ({n} notes): --explain, and `convention` in the JSON[/]")
        return
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


# The plot's geometry, in inches and points: one row per layer, so a model of any depth keeps legible
# labels; the width is fixed, the height grows with the layers.
PLOT_WIDTH_IN = 14.0
PLOT_ROW_IN = 0.17
PLOT_TICK_PT = 8.0
PLOT_GROUP_PT = 10.0


def layer_group(name: str) -> str:
    """The block a layer belongs to: "stem" (patch_embed), "block.j", or "head" (everything after)."""
    parts = name.split(".")
    if parts[0] == "patch_embed":
        return "stem"
    if parts[0] == "block" and len(parts) > 1:
        return f"block.{parts[1]}"
    return "head"


def _short_name(name: str, group: str) -> str:
    """A layer's name within its group (the group is labelled once beside its rows)."""
    prefix = {"stem": "patch_embed."}.get(group, f"{group}." if group.startswith("block.") else "")
    return name[len(prefix):] if prefix and name.startswith(prefix) else name


def layer_groups(names: list) -> list:
    """[(group, first row, last row)] in order, for consecutive rows of one group."""
    spans: list = []
    for i, name in enumerate(names):
        g = layer_group(name)
        if spans and spans[-1][0] == g:
            spans[-1] = (g, spans[-1][1], i)
        else:
            spans.append((g, i, i))
    return spans


def report_figure(rep: dict):
    """The report's figure (a matplotlib Figure, not yet saved): one row per layer, top to bottom in the
    network's order, grouped by block (stem, block.0, ..., head: shaded spans, separators and a label per
    block on the right); left, the input firing rate (mean over steps as a bar, each step as a dot coloured
    by its step t, with a colourbar for t, and a LIF's own output rate); right, the energy per sample
    (measured or counted, and the paper's convention). The width is fixed; the height grows with the layers,
    so the labels keep their size at any depth. The figure is not registered with pyplot (no backend is
    switched, nothing to close): it draws on its own Agg canvas."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    layers = rep["layers"]
    names = [r["name"] for r in layers]
    n = len(layers)
    y = np.arange(n)
    T = int(rep["totals"]["time_steps"])
    is_float = counted_of(rep).startswith("float")
    measured_label = "counted from the float model's spikes" if is_float else "measured (integer engine)"
    groups = layer_groups(names)
    short = [_short_name(nm, layer_group(nm)) for nm in names]

    # geometry in inches: a fixed band above (title, legends, colourbar) and below (axis labels)
    top_in, bottom_in, legend_top_in = (2.0 if n > 40 else 1.75), 0.75, 1.05
    left_in = 0.35 + 0.62 * PLOT_TICK_PT / 72 * max(len(s) for s in short)
    right_in = 1.25
    rows_in = max(3.0, PLOT_ROW_IN * n)
    H = top_in + rows_in + bottom_in
    W = PLOT_WIDTH_IN
    fig = Figure(figsize=(W, H))
    FigureCanvasAgg(fig)
    gap_in = 0.35
    panel_w = (W - left_in - right_in - gap_in) / 2
    ax_rate = fig.add_axes((left_in / W, bottom_in / H, panel_w / W, rows_in / H))
    ax_energy = fig.add_axes(((left_in + panel_w + gap_in) / W, bottom_in / H, panel_w / W, rows_in / H),
                             sharey=ax_rate)
    ax_rate.set_label("firing rates")
    ax_energy.set_label("energy")

    # blocks: alternate shading, a separator between blocks, the block's name on the right
    for k, (_, lo, hi) in enumerate(groups):
        for ax in (ax_rate, ax_energy):
            if k % 2:
                ax.axhspan(lo - 0.5, hi + 0.5, color="0.92", zorder=0, lw=0)
            if k:
                ax.axhline(lo - 0.5, color="0.45", lw=0.8, zorder=1)
    blocks = ax_energy.secondary_yaxis("right")
    blocks.set_yticks([(lo + hi) / 2 for _, lo, hi in groups], labels=[g for g, _, _ in groups],
                      fontsize=PLOT_GROUP_PT, fontweight="bold")
    blocks.tick_params(length=0)
    blocks.set_label("blocks")

    # firing rates
    rate = np.array([np.nan if r["input_rate"] is None else r["input_rate"] for r in layers])
    ax_rate.barh(y, np.nan_to_num(rate), height=0.8, color="#9ecae1", zorder=2, label="input rate, mean over steps")
    cmap = ListedColormap(matplotlib.colormaps["viridis"](np.linspace(0.0, 0.85, T)))   # no pale yellow on white
    norm = BoundaryNorm(np.arange(T + 1) - 0.5, T)
    px, py, pt = [], [], []
    for i, r in enumerate(layers):
        steps = r["input_rate_per_step"]
        if steps is None:
            continue
        for t, v in enumerate(steps):   # step t drawn at its own height within the row: t = 0 on top
            px.append(v)
            py.append(i - 0.32 + 0.64 * (t + 0.5) / T)
            pt.append(t)
    dots = ax_rate.scatter(px, py, c=pt, cmap=cmap, norm=norm, s=9, linewidths=0, zorder=3)
    out_rate = np.array([r["output_rate"] if r["kind"] == "neuron update" else np.nan for r in layers])
    ax_rate.plot(out_rate, y, "x", color="#d62728", ms=4, mew=1.0, zorder=4)
    ax_rate.set_xlim(0, max(1e-3, float(np.nanmax(np.concatenate([rate, out_rate, [0.0]] + [np.asarray(px)])))) * 1.05)
    ax_rate.set_xlabel("firing rate (spikes per neuron per step)")
    ax_rate.set_yticks(y, labels=short)
    ax_rate.tick_params(axis="y", labelsize=PLOT_TICK_PT, length=2)
    ax_rate.set_ylim(n - 0.5, -0.5)          # the first layer on top
    ax_rate.legend(handles=[Patch(color="#9ecae1", label="input rate, mean over steps"),
                            Line2D([], [], ls="", marker="o", ms=4, color=cmap(T - 1),
                                   label=f"input rate per step (colour: step t, {T} steps)"),
                            Line2D([], [], ls="", marker="x", ms=5, color="#d62728", label="LIF output rate")],
                   loc="upper left", bbox_to_anchor=(left_in / W, 1 - legend_top_in / H),
                   bbox_transform=fig.transFigure, fontsize=PLOT_TICK_PT, ncol=1, frameon=False, borderaxespad=0.0)

    # a colourbar for the step colours, above the rate panel's legend
    cb_w = min(3.2, panel_w * 0.6)
    cax = fig.add_axes(((left_in + panel_w - cb_w) / W, (H - 0.62) / H, cb_w / W, 0.13 / H))
    cb = fig.colorbar(dots, cax=cax, orientation="horizontal")
    cb.set_ticks(MaxNLocator(nbins=min(T, 16), integer=True).tick_values(0, T - 1) if T > 1 else [0])
    cb.ax.tick_params(labelsize=PLOT_TICK_PT)
    cb.set_label("time step t of the per-step dots", fontsize=PLOT_TICK_PT)
    cax.set_label("time step colourbar")

    # energy
    measured = np.array([r["energy_pj"] for r in layers])
    paper = np.array([r["paper_energy_pj"] for r in layers])
    ax_energy.barh(y - 0.2, measured, height=0.4, color="tab:orange", zorder=2, label=measured_label)
    ax_energy.barh(y + 0.2, paper, height=0.4, color="tab:green", zorder=2, label="paper convention")
    ax_energy.set_xscale("symlog", linthresh=1.0)
    ax_energy.set_xlim(0, max(10.0, float(max(measured.max(initial=0), paper.max(initial=0)))) * 3)
    ax_energy.set_xlabel(f"energy per sample (pJ, {rep['energy_table']['name']})")
    ax_energy.tick_params(axis="y", labelleft=False, length=0)
    ax_energy.legend(loc="upper left", bbox_to_anchor=((left_in + panel_w + gap_in) / W, 1 - legend_top_in / H),
                     bbox_transform=fig.transFigure, fontsize=PLOT_TICK_PT, ncol=1, frameon=False, borderaxespad=0.0)
    for ax in (ax_rate, ax_energy):
        ax.tick_params(axis="x", labelsize=PLOT_TICK_PT)
        ax.grid(axis="x", color="0.85", lw=0.5, zorder=0)
        if n > 40:   # a tall figure: the scale at the top too
            ax.tick_params(axis="x", top=True, labeltop=True)

    tot = rep["totals"]
    which = "float model (the checkpoint as trained)" if is_float else "quantized model (the deployed integer model)"
    S = tot["samples"]
    fig.suptitle(f"{which}: T = {T}, {S} sample{'s' if S != 1 else ''}, {n} layers in {len(groups)} blocks\n"
                 f"{'counted' if is_float else 'measured'} {tot['measured']['energy_mj']:.3g} mJ, "
                 f"paper {tot['paper']['energy_mj']:.3g} mJ, ANN {tot['ann']['energy_mj']:.3g} mJ per sample",
                 fontsize=PLOT_GROUP_PT, x=0.02, y=1 - 0.08 / H, ha="left", va="top")
    return fig


def plot_report(rep: dict, path: str) -> None:
    """`report_figure(rep)` as a PNG."""
    from sdt_deploy.files.atomic import atomic_write

    fig = report_figure(rep)
    with atomic_write(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)


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


