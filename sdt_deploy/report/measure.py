"""The report's driver: the integer engine run over the input batches, its spikes tallied, every layer's
operations counted from the spikes (`report.counting`) and checked against the engine's own counters,
layer by layer and in total: two independent counts of the same run."""
from __future__ import annotations

from typing import Callable, Iterable, Mapping, Optional

import numpy as np

from sdt_deploy.errors import DeployError
from sdt_deploy.ir.graph import Graph
from sdt_deploy.report.counting import (
    SpikeTally,
    add_ops,
    build_report,
    measured_ops_from_tally,
    ops_from_engine,
    ops_mismatches,
    tally_spikes,
)
from sdt_deploy.report.energy import EnergyTable
from sdt_deploy.run.integer_engine import run_engine


def operation_report(qg: Graph, batches: Iterable[np.ndarray], table: EnergyTable,
                     progress: Optional[Callable[[int], None]] = None, source: Optional[Mapping] = None) -> dict:
    """Run the integer engine over `batches` ([B,C,H,W] images or [B,T,C,H,W] event frames), tally the
    spikes, count every layer's operations, check them against the engine's counters, and build the
    report. `progress(n)` is called with each batch's size."""
    if not qg.meta.get("quantized"):
        raise DeployError("the report counts what the integer engine performs: it needs a quantized graph")
    tally: Optional[SpikeTally] = None
    engine_ops: dict = {}
    engine_totals = {"acs": 0, "macs": 0}
    static_input = True
    for xb in batches:
        static_input = xb.ndim == 4
        result = run_engine(qg, xb, record=True)
        t = tally_spikes(qg, result.spikes)
        tally = t if tally is None else tally + t
        engine_ops = add_ops(engine_ops, ops_from_engine(qg, result.ops))
        engine_totals["acs"] += result.total_acs
        engine_totals["macs"] += result.total_macs
        del result
        if progress is not None:
            progress(int(xb.shape[0]))
    if tally is None:
        raise DeployError("report: no input samples")
    problems = ops_mismatches(measured_ops_from_tally(qg, tally), engine_ops)
    if problems:
        raise DeployError("report: the count from the spikes disagrees with the engine's counters: "
                          + "; ".join(problems[:4]) + (" ..." if len(problems) > 4 else ""))
    source = {**(source or {}), "static_input": static_input}
    report = build_report(qg, tally, table, engine_totals=engine_totals, source=source)
    if not report["totals"]["engine"]["matches"]:
        raise DeployError("report: total ACs/MACs counted from the spikes differ from the engine's counters")
    return report


def run_report(q, inputs, table: EnergyTable, batch_size: int = 8, progress: bool = True) -> dict:
    """The report of the quantized model `q` over `inputs` (`data.inputs.Inputs`), a batch at a time."""
    from sdt_deploy.console import progress as progress_bar

    with progress_bar(len(inputs), "engine", enabled=progress) as advance:
        batches = (x for x, _, _ in inputs.batches(batch_size))
        return operation_report(q.graph, batches, table, progress=advance, source=inputs.source)
