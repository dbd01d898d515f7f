"""The Python face of the toolchain: every CLI command is one of these functions."""
from __future__ import annotations

from typing import Optional, Union

from models import SpikeDrivenTransformer

from sdt_deploy.files.checkpoint import LoadedModel, load_model
from sdt_deploy.quant.bits import check_engine_bounds
from sdt_deploy.files.configs import DataConfig
from sdt_deploy.ir.graph import Graph
from sdt_deploy.ir.lower import lower
from sdt_deploy.ir.passes import fold_bn
from sdt_deploy.quant.qmodel import QuantizedModel
from sdt_deploy.quant.contract import QuantOptions, fold_and_quantize

Source = Union[str, LoadedModel, SpikeDrivenTransformer]


def _loaded(source: Source) -> LoadedModel:
    if isinstance(source, LoadedModel):
        return source
    if isinstance(source, str):
        return load_model(source)
    if isinstance(source, SpikeDrivenTransformer):
        from sdt_deploy.files.checkpoint import Checkpoint
        from sdt_deploy.files.configs import Resolved

        return LoadedModel(source, Resolved(source.cfg, DataConfig(), {}), Checkpoint("", {}, "none"))
    raise TypeError(f"expected a checkpoint path, a LoadedModel or an SDT model, got {type(source).__name__}")


def deploy_graph(source: Source) -> Graph:
    """The BatchNorm-folded float deploy graph of a model (or the stored graph of a quantized file)."""
    loaded = _loaded(source)
    if loaded.quantized_graph is not None:
        return loaded.quantized_graph
    return fold_bn(lower(loaded.model))


def quantize(source: Source, weight_bits: int = 8, input_bits: int = 8, scale_search: str = "mse",
             input_range: Optional[float] = None, data: Optional[DataConfig] = None,
             consume: bool = False) -> QuantizedModel:
    """Fold BatchNorm, quantize to power-of-two per-channel grids (brevitas); `.model` of the result is
    the quantized torch model that carries the dequantized weights (runs with CuPy on a GPU, torch on a
    CPU), built on first use. `consume` (a LoadedModel source): its float weights are released layer by
    layer as they are quantized, and it holds no model afterwards (for a command that quantizes, writes
    and exits: the peak memory no longer holds the float checkpoint beside its quantization)."""
    loaded = _loaded(source)
    cfg = loaded.config
    if loaded.quantized_graph is not None:
        return QuantizedModel(loaded.model, loaded.quantized_graph, cfg, loaded.resolved.data)
    opts = QuantOptions(weight_bits=weight_bits, input_bits=input_bits, scale_search=scale_search,
                        input_range=input_range, data=data or loaded.resolved.data)
    # the never-called talking_heads Conv1d keeps its trained values; the torch model itself is built
    # on first use (QuantizedModel.model)
    keep = {name: t.detach().clone() for name, t in loaded.model.state_dict().items()
            if name.endswith("talking_heads.weight")}
    # lowered as views of the model's tensors, folded and quantized one layer at a time: the float64
    # copies of a whole model (lowered, folded) are never made
    graph = lower(loaded.model, copy=False)
    if consume:     # then the lowered graph's views are the last references to the float weights
        loaded.model = None
        loaded.checkpoint.state_dict.clear()
    qg = fold_and_quantize(graph, opts, consume=consume)
    del graph
    check_engine_bounds(qg)   # refuse, naming the layer, rather than hand on a graph that could wrap
    return QuantizedModel(None, qg, cfg, loaded.resolved.data, keep=keep)
