"""The Python face of the toolchain: loading and quantizing, once, for every command and every user.

A *source* is what a user has: a checkpoint path (an original training checkpoint, or a quantized file
written by `sdt-deploy quantize`), a `LoadedModel`, a `QuantizedModel`, or a `models` SDT in memory.
`load_model` opens a path; `quantize` turns any source into a `QuantizedModel` and returns a quantized
one as it is, so a command quantizes at most once however many consumers follow.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Union

from models import SpikeDrivenTransformer
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

Source = Union[str, os.PathLike, LoadedModel, QuantizedModel, SpikeDrivenTransformer]


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
    raise TypeError(f"expected a checkpoint path, a LoadedModel, a QuantizedModel or an SDT model, "
                    f"got {type(source).__name__}")


def deploy_graph(source: Source) -> Graph:
    """The BatchNorm-folded float deploy graph of a model (the quantized graph of a quantized source)."""
    src = loaded(source)
    if isinstance(src, QuantizedModel):
        return src.graph
    return fold_bn(lower(src.model))


def quantize(source: Source, weight_bits: int = 8, input_bits: int = 8, scale_search: str = "mse",
             input_range: Optional[float] = None, data: Optional[DataConfig] = None,
             consume: bool = False) -> QuantizedModel:
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
    graph = lower(src.model, copy=False)
    if consume:     # then the lowered graph's views are the last references to the float weights
        src.model = None
        src.checkpoint.state_dict.clear()
    qg = fold_and_quantize(graph, opts, consume=consume)
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
                  input_bits: int = 8) -> dict:
    """What a model is, as plain data: checkpoint layout, the configuration with the source of every
    value, data settings, parameter count, the module listing; with `graph` the deploy graph's summary,
    with `bits` the bit-width analysis of its quantized form (quantized here unless it already is)."""
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
        report["graph"] = graph_summary(stored if stored is not None else lower(src.model))
    if bits:
        qg = stored if stored is not None else quantize(src, weight_bits=weight_bits, input_bits=input_bits).graph
        report["bits"] = bit_report(qg)
    return report
