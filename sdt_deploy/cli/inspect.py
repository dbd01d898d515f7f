"""`sdt-deploy inspect`: what a checkpoint (or a config) is, as data and as terminal tables."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table

from models import parameter_count

from sdt_deploy.files.checkpoint import LoadedModel
from models.listing import layer_table


def inspect_model(loaded: LoadedModel, graph: bool = False, bits: bool = False, weight_bits: int = 8,
                  input_bits: int = 8) -> dict:
    cfg = loaded.config
    ck = loaded.checkpoint
    report = {
        "checkpoint": {"path": ck.path, "layout": ck.layout, "ddp_prefix": ck.ddp_prefix, "ema": ck.ema}
        if ck.path else None,
        "config": loaded.resolved.describe(),
        "data": {"dataset": loaded.resolved.data.dataset, "events": loaded.resolved.data.events,
                 "mean": list(loaded.resolved.data.mean), "std": list(loaded.resolved.data.std),
                 "crop_pct": loaded.resolved.data.crop_pct},
        "params": parameter_count(loaded.model),
        "layers": layer_table(loaded.model, cfg),
    }
    if graph or bits:
        from sdt_deploy.ir.graph import graph_summary
        from sdt_deploy.ir.lower import lower

        stored = loaded.quantized_graph             # a quantized file carries its graph
        g = stored if stored is not None else lower(loaded.model)
        if graph:
            report["graph"] = graph_summary(g)
        if bits:
            from sdt_deploy.api import quantize
            from sdt_deploy.quant.bits import bit_report

            qg = stored if stored is not None else quantize(loaded, weight_bits=weight_bits,
                                                            input_bits=input_bits).graph
            report["bits"] = bit_report(qg)
    return report


def print_inspect(report: dict, console: Console | None = None) -> None:
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
    if "graph" not in report and "bits" not in report:
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
        from sdt_deploy.ir.graph import print_graph_summary

        print_graph_summary(report["graph"], console)
    if "bits" in report:
        from sdt_deploy.quant.bits import print_bit_report

        print_bit_report(report["bits"], console)
