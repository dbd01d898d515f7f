"""The Python face of the toolchain: every command is one of these functions, returning a result object
instead of printing (`load_model`, `quantize`, `export`, `verify`, `report`, `inspect`).

A *source* is what a user has: a checkpoint path (an original training checkpoint, or a quantized file
written by `sdt-deploy quantize`), a `LoadedModel`, a `QuantizedModel`, or a `models` SDT in memory.
`load_model` opens a path; `quantize` turns any source into a `QuantizedModel` and returns a quantized
one as it is, so a command loads and quantizes at most once however many consumers follow.

*Inputs* (verify, report) are an array ([B,C,H,W] images, repeated over T, or [B,T,C,H,W] event frames),
or one of `input=` (a .npy file), `data=` (a dataset folder), `digits=N` (held-out digits), `random=N`,
as on the command line; the default is the first 32 held-out digits.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Union

import numpy as np

from models import MetaSpikeFormer, SpikeDrivenTransformer
from sdt_deploy import __version__
from sdt_deploy.errors import DeployError
from sdt_deploy.files.checkpoint import Checkpoint, LoadedModel, float_model, load_checkpoint
from sdt_deploy.files.configs import DataConfig, Resolved
from sdt_deploy.ir.graph import Graph
from sdt_deploy.ir.lower import lower
from sdt_deploy.ir.passes import fold_bn
from sdt_deploy.quant.bits import check_engine_bounds
from sdt_deploy.quant.contract import QuantOptions, fold_and_quantize
from sdt_deploy.quant.qmodel import QuantizedModel, load_quantized

Source = Union[str, os.PathLike, LoadedModel, QuantizedModel, SpikeDrivenTransformer, MetaSpikeFormer]


def load_model(path: Union[str, os.PathLike], flags: Optional[Mapping[str, Any]] = None, config: Optional[str] = None,
               ema: bool = False) -> Union[LoadedModel, QuantizedModel]:
    """Open a checkpoint: the float SDT it describes (`LoadedModel`), or the `QuantizedModel` of a file
    written by `sdt-deploy quantize`. `flags` override configuration fields, `config` names an original
    conf YAML or a published configuration."""
    ck = load_checkpoint(os.fspath(path), ema=ema)
    if ck.layout == "quantized":
        return load_quantized(ck, flags=flags)
    return float_model(ck, flags=flags, config=config)


def loaded(source: Source) -> Union[LoadedModel, QuantizedModel]:
    """Any source as a LoadedModel or a QuantizedModel (paths are opened)."""
    if isinstance(source, (LoadedModel, QuantizedModel)):
        return source
    if isinstance(source, (str, os.PathLike)):
        return load_model(source)
    if isinstance(source, SpikeDrivenTransformer):
        return LoadedModel(source, Resolved(source.cfg, DataConfig(), {}), Checkpoint("", {}, "none"))
    if isinstance(source, MetaSpikeFormer):
        from sdt_deploy.files.configs import v2_data_config

        source.record_taps_as_grids()     # the deploy graph's [C, H, W] layout for every tap
        return LoadedModel(source, Resolved(source.cfg, v2_data_config(None, source.cfg.img_size), {}),
                           Checkpoint("", {}, "none"))
    raise TypeError(f"expected a checkpoint path, a LoadedModel, a QuantizedModel or an SDT model, "
                    f"got {type(source).__name__}")


def deploy_graph(source: Source, reparam: bool = False) -> Graph:
    """The BatchNorm-folded float deploy graph of a model (the quantized graph of a quantized source);
    `reparam`: structurally re-parameterized (V2, `ir.reparam`)."""
    src = loaded(source)
    if isinstance(src, QuantizedModel):
        return src.graph
    g = fold_bn(lower(src.model))
    if reparam:
        from sdt_deploy.ir.reparam import reparameterize

        g = reparameterize(g)
    return g


def quantize(source: Source, weight_bits: int = 8, input_bits: int = 8, scale_search: str = "mse",
             input_range: Optional[float] = None, data: Optional[DataConfig] = None,
             consume: bool = False, progress: bool = False, reparam: Optional[bool] = None) -> QuantizedModel:
    """Fold BatchNorm, quantize to power-of-two per-channel grids (brevitas); `.model` of the result is
    the quantized torch model that carries the dequantized weights (runs with CuPy on a GPU, torch on a
    CPU), built on first use. A quantized source is returned as it is. `consume` (a LoadedModel source):
    its float weights are released layer by layer as they are quantized, and it holds no model
    afterwards (for a command that quantizes, writes and exits: the peak memory no longer holds the float
    checkpoint beside its quantization)."""
    src = loaded(source)
    if isinstance(src, QuantizedModel):
        return src
    opts = QuantOptions(weight_bits=weight_bits, input_bits=input_bits, scale_search=scale_search,
                        input_range=input_range, data=data or src.resolved.data)
    # the never-called talking_heads Conv1d keeps its trained values; the torch model itself is built
    # on first use (QuantizedModel.model)
    keep = {name: t.detach().clone() for name, t in src.model.state_dict().items()
            if name.endswith("talking_heads.weight")}
    # lowered as views of the model's tensors, folded and quantized one layer at a time: the float64
    # copies of a whole model (lowered, folded) are never made
    if reparam:     # folded and fused in float64 first, then quantized (the fused weights are new tensors)
        from sdt_deploy.ir.reparam import reparameterize
        from sdt_deploy.quant.contract import quantize_graph

        qg = quantize_graph(reparameterize(fold_bn(lower(src.model))), opts, progress=progress)
    else:
        graph = lower(src.model, copy=False)
        if consume:     # then the lowered graph's views are the last references to the float weights
            src.model = None
            src.checkpoint.state_dict.clear()
        qg = fold_and_quantize(graph, opts, consume=consume, progress=progress)
        del graph
    qg.meta["provenance"] = provenance(src.checkpoint)
    check_engine_bounds(qg)   # refuse, naming the layer, rather than hand on a graph that could wrap
    return QuantizedModel(None, qg, src.config, src.resolved.data, keep=keep, resolved=src.resolved,
                          checkpoint=src.checkpoint)


def provenance(ck: Checkpoint) -> dict:
    """What every artifact of a quantized model records of where it came from."""
    return {"checkpoint": os.path.basename(ck.path) if ck.path else None, "checkpoint_sha256": ck.sha256 or None,
            "tool_version": __version__}


def float_source(source: Source) -> LoadedModel:
    """The float model of a source; a quantized file has none."""
    src = loaded(source)
    if isinstance(src, QuantizedModel):
        raise DeployError(f"{src.checkpoint.path or 'the model'} is a quantized file: it holds no float model "
                          "to compare with (give the original checkpoint)")
    return src


def inspect_model(source: Source, graph: bool = False, bits: bool = False, weight_bits: int = 8,
                  input_bits: int = 8, scale_search: str = "mse", input_range: Optional[float] = None,
                  observe: Optional[dict] = None, batch_size: int = 16, progress: bool = False,
                  check: bool = False, reparam: Optional[bool] = None) -> dict:
    """What a model is, as plain data: checkpoint layout, the configuration with the source of every
    value, data settings, parameter count, the module listing; with `graph` the deploy graph's summary,
    with `bits` the bit-width analysis of its quantized form (quantized here unless it already is), and
    with `observe` (inputs as for `verify`: {"input": path, "digits": N, ...}) the largest integer each
    layer reached in a run of the integer engine over them; with `check` the dataflow check
    (`ir.dataflow`: every edge binary, integer or real, every synaptic op AC, integer-AC or MAC) of the
    BN-folded graph, `reparam` (V2) of the re-parameterized one with what that costs and gains."""
    from models import parameter_count
    from models.listing import layer_table
    from sdt_deploy.ir.graph import graph_summary
    from sdt_deploy.quant.bits import bit_report

    src = loaded(source)
    ck, data = src.checkpoint, src.resolved.data
    report = {
        "checkpoint": {"path": ck.path, "layout": ck.layout, "ddp_prefix": ck.ddp_prefix, "ema": ck.ema}
        if ck.path else None,
        "config": src.resolved.describe(),
        "data": {"dataset": data.dataset, "events": data.events, "mean": list(data.mean), "std": list(data.std),
                 "crop_pct": data.crop_pct},
        "params": parameter_count(src.model),
        "layers": layer_table(src.model, src.config),
    }
    stored = src.graph if isinstance(src, QuantizedModel) else None   # a quantized file carries its graph
    if graph:
        if stored is None and reparam:
            report["graph"] = graph_summary(deploy_graph(src, reparam=True))
        else:
            report["graph"] = graph_summary(stored if stored is not None else lower(src.model))
    if check:
        from sdt_deploy.ir.dataflow import dataflow

        checked = stored if stored is not None else deploy_graph(src, reparam=bool(reparam))
        report["check"] = dataflow(checked)
        if reparam and stored is None:
            from sdt_deploy.ir.reparam import reparam_cost

            report["check"]["reparam_cost"] = reparam_cost(deploy_graph(src), checked)
    if bits:
        qg = stored if stored is not None else quantize(src, weight_bits=weight_bits, input_bits=input_bits,
                                                        scale_search=scale_search, input_range=input_range,
                                                        reparam=reparam).graph
        observed = None
        if observe is not None:
            from sdt_deploy.console import progress as progress_bar
            from sdt_deploy.run.integer_engine import run_engine

            inputs = _inputs(src, **observe, default_digits=None)
            observed = {}
            with progress_bar(len(inputs), "engine", enabled=progress) as advance:
                for xb, _, _ in inputs.batches(batch_size):
                    for name, v in run_engine(qg, xb, record=False).observed.items():
                        observed[name] = max(observed.get(name, 0), v)
                    advance(len(xb))
            report["observed_on"] = inputs.source
        report["bits"] = bit_report(qg, observed)
    return report


# ---------------------------------------------------------------- the commands

def _inputs(src, x=None, input: Optional[str] = None, data: Optional[str] = None, digits: Optional[int] = None,
            random: Optional[int] = None, seed: int = 0, default_digits: Optional[int] = 32):
    from sdt_deploy.data.datasets import ArrayDataset
    from sdt_deploy.data.inputs import Inputs, choose_inputs
    from sdt_deploy.files.arrays import check_input

    if x is not None:
        if any(v is not None for v in (input, data, digits, random)):
            raise DeployError("give the inputs once: an array, or one of input=, data=, digits=, random=")
        return Inputs(ArrayDataset(check_input(np.asarray(x), src.config)), {"source": "array"})
    return choose_inputs(src.config, src.resolved.data, input, data, digits, random, seed,
                         default_digits=default_digits)


def export(source: Source, target: str, output: str, *, nir_profile: str = "standard", onnx_variant: str = "int",
           partition: bool = True, debug_outputs: bool = False, unroll: bool = False, float_weights: bool = False,
           weight_bits: int = 8, input_bits: int = 8, scale_search: str = "mse", input_range: Optional[float] = None,
           force: bool = False, consume: Optional[bool] = None, reparam: Optional[bool] = None):
    """Quantize (unless `float_weights`: the BN-folded float weights, NIR only) and write the files of one
    target, as `sdt-deploy export` does: a NIR export of a graph with the stem's max-pool over currents is
    partitioned (host stem ONNX + NIR + manifest) unless `partition=False`, which refuses it. Returns the
    files written and the note the user should read (`exporters.bundle.ExportResult`). `consume`: release
    the float weights layer by layer as they are quantized (default: when the source is a path, which
    nothing else holds; the command line's own loaded model too)."""
    from exporters.bundle import check_output_name, export_graph, planned_outputs
    from sdt_deploy.files.atomic import check_output_path
    from sdt_deploy.quant.float_export import float_nir_graph

    target = check_output_name(target, str(output))
    QuantOptions(weight_bits=weight_bits, input_bits=input_bits, scale_search=scale_search,
                 input_range=input_range)          # every option checked before any work
    if float_weights and target != "nir":
        raise DeployError("--no-quantize (float weights) applies to --target nir (ONNX has --onnx-variant float)")
    mode = "auto" if partition else "never"
    check_output_path(str(output), force)
    src = loaded(source)
    if float_weights:
        graph = float_nir_graph(deploy_graph(src, reparam=bool(reparam)))
    else:
        # the float checkpoint is not needed past the quantization: each layer's weights go once quantized
        consume = isinstance(source, (str, os.PathLike)) if consume is None else consume
        graph = quantize(src, weight_bits=weight_bits, input_bits=input_bits, scale_search=scale_search,
                         input_range=input_range, consume=consume, reparam=reparam).graph
    del src
    for p in planned_outputs(graph, target, str(output), mode):
        check_output_path(p, force)
    return export_graph(graph, target, str(output), onnx_variant=onnx_variant, nir_profile=nir_profile,
                        partition_mode=mode, debug_outputs=debug_outputs, unroll=unroll, force=force)


def verify(source: Source, x=None, *, input: Optional[str] = None, data: Optional[str] = None,
           digits: Optional[int] = None, random: Optional[int] = None, executors=None, artifacts=(),
           reference: str = "quantized", batch_size: int = 16, weight_bits: Optional[int] = None,
           input_bits: Optional[int] = None, scale_search: Optional[str] = None,
           input_range: Optional[float] = None, flags: Optional[Mapping[str, Any]] = None,
           config: Optional[str] = None, ema: bool = False, progress: bool = False, rank: int = 0,
           world: int = 1, max_memory=None, jobs: Optional[int] = None, notes=None,
           reparam: Optional[bool] = None, tune_heap: bool = False):
    """`sdt-deploy verify`: every executor against the quantized torch model on the inputs, every layer at
    every step; `artifacts`: exported files (.onnx, .nir) to check as they are, their settings read from
    them (a setting given here must agree). Returns a `VerifyResult` (`.ok`, `.to_json()`, the first
    divergence in `.tally.first`, the batch and processes it ran with in `.plan`), or with
    `reference="float"` the agreement with the float model (a dict), or with `reference="reparam"` (V2)
    the agreement of the quantized plain and re-parameterized graphs. `rank`/`world`: this process's share
    of the inputs under torchrun (the caller gathers the tallies). `max_memory`: the most memory the run
    may hold (bytes, '8G', '500M', or a fraction of the available memory; default a third of it): the
    batch is cut to fit, and `notes(sentence)` (if given) is told. `jobs`: processes taking whole batches
    (default `verification.verifier.auto_jobs`: 2 on a 2-CPU machine for 320 inputs or more, else 1; as
    many as the budget holds). `reparam` (V2): the re-parameterized graph. `tune_heap`: where the run is
    small against the budget, keep freed memory in this process's heap (`sdt_deploy.heap`; glibc's mmap
    and trim thresholds, process-wide and not undone; the command line does: about a fifth faster)."""
    from sdt_deploy.data.datasets import shard
    from sdt_deploy.run.memory import parse_memory
    from sdt_deploy.verification.executors import ALL_EXECUTORS
    from sdt_deploy.verification.provenance import (
        artifacts_by_kind,
        open_for_artifacts,
        quantization_for,
        read_artifact,
    )
    from sdt_deploy.verification.verifier import run_verify

    parse_memory(max_memory)            # a bad budget fails before any work
    names = list(ALL_EXECUTORS if executors is None else executors)
    for e in names:
        if e not in ALL_EXECUTORS:
            raise DeployError(f"unknown executor {e!r} (choose from {', '.join(ALL_EXECUTORS)})")
    if reference not in ("quantized", "float", "reparam"):
        raise DeployError(f"reference must be 'quantized', 'float' or 'reparam', got {reference!r}")
    files = [read_artifact(os.fspath(p)) for p in artifacts]
    by_kind = artifacts_by_kind(files)
    settings = quantization_for(files, {"weight_bits": weight_bits, "input_bits": input_bits,
                                        "scale_search": scale_search, "input_range": input_range,
                                        "reparam": reparam})
    if isinstance(source, (str, os.PathLike)):
        src = open_for_artifacts(os.fspath(source), dict(flags or {}), config, ema, files)
    else:
        src = loaded(source)
        if files:
            from sdt_deploy.verification.provenance import check_origin

            origin = (src.graph.meta.get("provenance") or {}) if isinstance(src, QuantizedModel) else {}
            check_origin(files, origin.get("checkpoint_sha256") or src.checkpoint.sha256 or None,
                         os.path.basename(src.checkpoint.path) or "the model", src.config.to_dict())
    inputs = _inputs(src, x, input, data, digits, random)
    if reference == "reparam":   # V2: the quantized plain and re-parameterized graphs side by side
        from sdt_deploy.verification.reparam_compare import compare_reparam

        fl = float_source(src)
        common = {k: v for k, v in settings.items() if k != "reparam"}
        return compare_reparam(fl.model, quantize(fl, **common, reparam=False), quantize(fl, **common, reparam=True),
                               deploy_graph(fl), deploy_graph(fl, reparam=True), inputs.dataset,
                               batch_size=batch_size)
    # a checkpoint opened here is not needed past its quantization (the spike-exact check runs the
    # quantized model): its float weights go layer by layer as they are quantized
    consume = isinstance(source, (str, os.PathLike)) and reference == "quantized" and isinstance(src, LoadedModel)
    q = quantize(src, **settings, consume=consume)
    if reference == "float":
        from sdt_deploy.verification.float_reference import compare_float

        return compare_float(float_source(src), q, inputs.dataset, batch_size=batch_size)
    return run_verify(q, inputs.dataset, names, artifacts={k: a.path for k, a in by_kind.items()},
                      batch_size=batch_size, indices=shard(len(inputs), rank, world), progress=progress,
                      max_memory=max_memory, jobs=1 if world > 1 else jobs, notes=notes, tune_heap=tune_heap)


def report(source: Source, x=None, *, input: Optional[str] = None, data: Optional[str] = None,
           digits: Optional[int] = None, random: Optional[int] = None, seed: int = 0, energy: str = "45nm-fp32",
           batch_size: int = 16, weight_bits: int = 8, input_bits: int = 8, scale_search: str = "mse",
           input_range: Optional[float] = None, float_model: bool = False, progress: bool = False,
           max_memory=None, notes=None, reparam: Optional[bool] = None) -> dict:
    """`sdt-deploy report`: operations, firing rates and energy per layer of the quantized model on the
    inputs, in the paper's convention and as the integer engine measured them, with the ANN baseline;
    `float_model=True` (`--float`) counts the float checkpoint as trained instead (its own spikes).
    Returns the report as plain data (`accounting.render` prints it, writes JSON, CSV and a plot).
    `max_memory`: as for `verify` (the batch is cut to fit; `notes(sentence)` is told)."""
    from sdt_deploy.accounting.energy import load_energy_table
    from sdt_deploy.accounting.measure import run_float_report, run_report

    table = load_energy_table(energy)
    src = loaded(source)
    inputs = _inputs(src, x, input, data, digits, random, seed)
    if float_model:
        if isinstance(src, QuantizedModel):
            raise DeployError("float_model: a quantized file holds no float model (give the original checkpoint)")
        return run_float_report(src.model, deploy_graph(src), inputs, table, batch_size=batch_size,
                                progress=progress, max_memory=max_memory, notes=notes)
    consume = isinstance(source, (str, os.PathLike)) and isinstance(src, LoadedModel)
    q = quantize(src, weight_bits=weight_bits, input_bits=input_bits, scale_search=scale_search,
                 input_range=input_range, consume=consume, progress=progress, reparam=reparam)
    return run_report(q, inputs, table, batch_size=batch_size, progress=progress, max_memory=max_memory,
                      notes=notes)


inspect = inspect_model
