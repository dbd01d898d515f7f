"""`sdt-deploy inspect`: what a checkpoint (or a config) is, as terminal tables or JSON."""
from __future__ import annotations

import click

from sdt_deploy.cli.options import (
    echo_json,
    input_options,
    json_option,
    model_options,
    open_model,
    quant_options,
    run_options,
)


@click.command()
@model_options
@json_option
@click.option("--graph", is_flag=True, help="show the deploy graph (nodes, edge kinds, shapes)")
@click.option("--bits", is_flag=True, help="bit-width analysis of the quantized integer path; with an input "
                                          "option, also the largest integers a run of the engine saw")
@click.option("--check", "check", is_flag=True,
              help="the dataflow check: every edge binary, integer (with its range) or real, every synaptic op "
                   "AC, integer-AC or MAC (with --reparam: after structural re-parameterization)")
@quant_options
@input_options(default_note="none: the worst case only")
@run_options
def inspect(ckpt, as_json, graph, bits, check, weight_bits, input_bits, scale_search, input_range, reparam, input_path,
            data_dir, digits, random_n, seed, batch_size, quiet, no_progress, **kw):
    """The resolved configuration (with the source of every value), parameter count and layers."""
    from sdt_deploy.api import inspect_model

    source = open_model(ckpt, kw, allow_config_only=True)
    observe = any(v is not None for v in (input_path, data_dir, digits, random_n))
    if observe and not bits:
        raise click.UsageError("--input/--data/--digits/--random fill the observed bits of --bits: give --bits")
    report = inspect_model(source, graph=graph, bits=bits, weight_bits=weight_bits, input_bits=input_bits,
                           scale_search=scale_search, input_range=input_range,
                           observe=dict(input=input_path, data=data_dir, digits=digits, random=random_n, seed=seed)
                           if observe else None, batch_size=batch_size, progress=not (quiet or no_progress),
                           check=check, reparam=reparam)
    if as_json:
        echo_json(report)
    else:
        print_inspect(report)


def print_inspect(report: dict, console=None) -> None:
    from rich.table import Table

    from sdt_deploy.console import console as _console

    console = console or _console()
    if report.get("checkpoint"):
        ck = report["checkpoint"]
        extra = " (module. prefix stripped)" if ck["ddp_prefix"] else ""
        console.print(f"[bold]checkpoint[/] {ck['path']}  layout: {ck['layout']}{extra}"
                      f"{'  weights: EMA' if ck['ema'] else ''}")
    t = Table(title="configuration", show_lines=False)
    t.add_column("field")
    t.add_column("value")
    t.add_column("source")
    for k, v in report["config"].items():
        t.add_row(k, str(v["value"]), v["source"])
    console.print(t)
    console.print(f"[bold]params[/] {report['params']:,}")
    if "graph" not in report and "bits" not in report and "check" not in report:
        lt = Table(title="layers")
        for col in ("module path", "kind", "shape", "params", "note"):
            lt.add_column(col)
        for row in report["layers"]:
            note = "" if row["called"] else "never called in forward"
            if "v_threshold" in row:
                note = (f"v_th {row['v_threshold']:g}, tau {row['tau']:g}" + ("; " + note if note else ""))
            lt.add_row(row["name"], row["kind"], "x".join(map(str, row["shape"])) or "-", f"{row['params']:,}", note)
        console.print(lt)
    if "graph" in report:
        print_graph_summary(report["graph"], console)
    if "bits" in report:
        print_bit_report(report["bits"], console)
    if "check" in report:
        print_dataflow(report["check"], console)


def print_graph_summary(summary: dict, console) -> None:
    from rich.table import Table

    t = Table(title="deploy graph")
    for col in ("node", "op", "inputs", "out", "shape", "params"):
        t.add_column(col, no_wrap=(col == "node"))
    for n in summary["nodes"]:
        t.add_row(n["name"], n["op"], ", ".join(n["inputs"]), n["kind"], "x".join(map(str, n["shape"])),
                  f"{n['params']:,}" if n["params"] else "")
    console.print(t)
    e = summary["edges"]
    console.print(f"[bold]edges[/] spike {e['spike']}, current {e['current']}; "
                  f"[bold]graph params[/] {summary['params']:,}; {summary['meta']}")


def print_bit_report(rep: dict, console) -> None:
    from rich.table import Table

    observed = any("observed" in r for r in rep["layers"])
    t = Table(title=f"bit widths (T = {rep['summary']['time_steps']}; worst case"
                    + (", and the largest integers the run saw)" if observed else ")"))
    cols = ["layer", "op", "grid", "worst |int|", "integer bits", "float32 needs", "float32 exact"]
    cols += ["observed |int|", "observed float32 needs"] if observed else []
    for col in cols:
        t.add_column(col, no_wrap=(col == "layer"))
    for r in rep["layers"]:
        grid = f"2^-{r['grid_min']}" if r["grid_min"] == r["grid_max"] else f"2^-{r['grid_min']}..2^-{r['grid_max']}"
        row = [r["name"], r["op"], grid, f"{r['bound']:.4g}", str(r["int_bits"]), f"{r['float32_bits'] - 1} bits",
               "yes" if r["float32_exact"] else "[red]no[/]"]
        if observed:
            row += [f"{r['observed']:.4g}" if "observed" in r else "-",
                    f"{r['observed_float32_bits'] - 1} bits" if "observed" in r else "-"]
        t.add_row(*row)
    console.print(t)
    s = rep["summary"]
    console.print(f"[bold]integer[/] needs {s['max_int_bits']} bits (signed; int32 accumulators: "
                  f"{'yes' if s['int32_accumulators'] else 'no'}); [bold]float32[/] needs {s['max_float32_bits'] - 1} "
                  f"bits; float32 is exact to 24. Exact side: {s['exact_side']}.", highlight=False, soft_wrap=True)


def print_dataflow(check: dict, console) -> None:
    """The synaptic ops by kind, the edges by class, and what is not spike-driven (issue #11's question)."""
    from rich.table import Table

    s = check["summary"]
    t = Table(title="synaptic ops" + (" (re-parameterized)" if s["reparam"] else ""))
    for col in ("op", "kind", "reads", "why"):
        t.add_column(col, no_wrap=(col == "op"))
    for o in check["ops"]:
        kind = {"MAC": "[red]MAC[/]", "integer-AC": "[yellow]integer-AC[/]"}.get(o["kind"], o["kind"])
        t.add_row(o["name"], kind + (" (encoder)" if o["encoder"] else ""), " x ".join(o["inputs"]), o["why"])
    console.print(t)
    e, k = s["edges"], s["ops"]
    console.print(f"[bold]edges[/] binary {e['binary']}, integer {e['integer']}, real {e['real']}; "
                  f"[bold]synaptic ops[/] AC {k['AC']}, integer-AC {k['integer-AC']}, MAC {k['MAC']} "
                  f"(encoder: {', '.join(s['encoder']) or 'none'})", highlight=False)
    if s["spike_driven"]:
        console.print("spike-driven: no op but the encoder multiplies"
                      + (f"; {len(s['integer_acs'])} integer-AC ops add integers that spikes select"
                         if s["integer_acs"] else ""), highlight=False)
    else:
        console.print(f"[bold]not spike-driven[/] in {len(s['macs_beyond_encoder'])} ops that read real values "
                      f"(MAC): {', '.join(s['macs_beyond_encoder'][:6])}"
                      f"{' ...' if len(s['macs_beyond_encoder']) > 6 else ''}", highlight=False, soft_wrap=True)
    cost = check.get("reparam_cost")
    if cost:
        console.print(f"re-parameterization: parameters {cost['params_plain']:,} -> {cost['params_reparam']:,} "
                      f"({cost['params_ratio']:.2f}x)", highlight=False)
