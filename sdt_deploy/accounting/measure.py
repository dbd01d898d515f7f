"""The report's drivers.

- `operation_report` (the default, the deployed model): the integer engine run over the input batches,
  its spikes tallied, every layer's operations counted from the spikes (`report.counting`) and checked
  against the engine's own counters, layer by layer and in total: two independent counts of the same run.
- `float_operation_report` (`report --float`, the checkpoint as trained): the float torch model (float32,
  spikingjelly, BatchNorm unfolded: the model the paper's firing rates were measured on) run over the
  batches, its own spikes tallied and counted by the same rules on its BN-folded deploy graph (the same
  layers, shapes and fan-outs as the quantized graph). No engine runs, so there is nothing to check the
  count against: the report says so (`totals["engine"]["applicable"] is False`)."""
from __future__ import annotations

from typing import Callable, Iterable, Mapping, Optional

import numpy as np

from sdt_deploy.accounting.counting import (
    SpikeTally,
    add_ops,
    build_report,
    measured_ops_from_tally,
    ops_from_engine,
    ops_mismatches,
    tally_spikes,
)
from sdt_deploy.accounting.energy import EnergyTable
from sdt_deploy.errors import DeployError
from sdt_deploy.ir.graph import Broadcast, Graph, OrPool
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


def complete_spikes(g: Graph, spikes: Mapping[str, np.ndarray]) -> dict:
    """The torch model records every spike tensor but the wiring between them: the stem's OR-pools (a
    max-pool of spikes) and the talking-heads broadcasts are nodes of the graph the model computes
    without naming. Each missing one is computed here from its recorded input by the float executor's
    rule for that node (a max or a copy of 0/1 values: exact). Any other missing tensor is an error."""
    import torch

    from sdt_deploy.run.float_executor import FLOAT_EVAL

    out = dict(spikes)
    for n in g.spike_nodes():
        if n.name in out:
            continue
        if not isinstance(n, (OrPool, Broadcast)) or any(i not in out for i in n.inputs):
            raise DeployError(f"report: the float model recorded no spikes for {n.name}")
        ins = [torch.from_numpy(out[i]) for i in n.inputs]
        T = ins[0].shape[0]
        out[n.name] = FLOAT_EVAL[type(n)](n, ins, None, T, torch.float32, None).to(torch.uint8).numpy()
    return out


def float_operation_report(g: Graph, model, batches: Iterable[np.ndarray], table: EnergyTable,
                           progress: Optional[Callable[[int], None]] = None,
                           source: Optional[Mapping] = None) -> dict:
    """The report of the float model as trained: `model` (the checkpoint's torch SDT, float32) is run over
    `batches`, its own spikes are tallied and every layer counted on `g`, the model's BN-folded float
    deploy graph (`api.deploy_graph`), by the rules the engine counts with. `totals["engine"]` says
    that no engine count exists to compare with."""
    from sdt_deploy.run.torch_runner import run_model

    if g.meta.get("quantized"):
        raise DeployError("report: the float model's report counts on the float deploy graph, not the quantized one")
    tally: Optional[SpikeTally] = None
    static_input = True
    for xb in batches:
        static_input = xb.ndim == 4
        _, spikes = run_model(model, xb, batch_size=max(1, int(xb.shape[0])))
        t = tally_spikes(g, complete_spikes(g, spikes))
        tally = t if tally is None else tally + t
        del spikes
        if progress is not None:
            progress(int(xb.shape[0]))
    if tally is None:
        raise DeployError("report: no input samples")
    source = {**(source or {}), "static_input": static_input}
    return build_report(g, tally, table, engine_totals=None, source=source)


def run_float_report(model, graph: Graph, inputs, table: EnergyTable, batch_size: int = 8,
                     progress: bool = True, max_memory=None, notes: Optional[Callable[[str], None]] = None) -> dict:
    """The report of the float torch `model` (its deploy graph `graph`) over `inputs`, a batch at a time (cut
    to fit `max_memory`, as `run_report`)."""
    from sdt_deploy.console import progress as progress_bar
    from sdt_deploy.run import memory as M

    a = M.activations(graph)
    plan = M.plan_batch("report", batch_size, M.parse_memory(max_memory),
                        M.RUNTIME_BYTES + M.model_bytes("torch", a), a.spikes * a.T + M.executor_bytes("torch", a))
    if plan.note and notes is not None:
        notes(plan.note)
    with progress_bar(len(inputs), "float model", enabled=progress) as advance:
        batches = (x for x, _, _ in inputs.batches(plan.batch_size))
        return float_operation_report(graph, model, batches, table, progress=advance, source=inputs.source)


def report_memory(g: Graph) -> tuple[int, int]:
    """(the bytes the report's process holds besides its batches, the bytes a sample of a batch adds: the
    engine's working set and every spike tensor it records for the tally)."""
    from sdt_deploy.run import memory as M

    a = M.activations(g)
    return M.RUNTIME_BYTES + a.params + M.model_bytes("engine", a), a.spikes * a.T + M.executor_bytes("engine", a)


def run_report(q, inputs, table: EnergyTable, batch_size: int = 8, progress: bool = True, max_memory=None,
               notes: Optional[Callable[[str], None]] = None) -> dict:
    """The report of the quantized model `q` over `inputs` (`data.inputs.Inputs`), a batch at a time: at
    most `batch_size` samples, fewer where `max_memory` (`run.memory.parse_memory`) would not hold them --
    then `notes` is told so."""
    from sdt_deploy.console import progress as progress_bar
    from sdt_deploy.run.memory import parse_memory, plan_batch

    models, sample = report_memory(q.graph)
    plan = plan_batch("report", batch_size, parse_memory(max_memory), models, sample)
    if plan.note and notes is not None:
        notes(plan.note)
    with progress_bar(len(inputs), "engine", enabled=progress) as advance:
        batches = (x for x, _, _ in inputs.batches(plan.batch_size))
        return operation_report(q.graph, batches, table, progress=advance, source=inputs.source)
