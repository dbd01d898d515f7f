"""The quantized model: a quantized deploy graph with the settings it was made with, the torch SDT that
carries its exactly representable dequantized weights (still spikingjelly LIF nodes, so the very same
object runs with the CuPy kernel on a GPU), and the file format that stores both (`q.pth`)."""
from __future__ import annotations

from typing import Any, Mapping, Optional

import numpy as np
import torch

from models import InputQuantizer, SDTConfig, V2Config, build_model, build_v2_model
from sdt_deploy import __version__
from sdt_deploy.errors import DeployError
from sdt_deploy.files.atomic import save_torch
from sdt_deploy.files.checkpoint import QUANTIZED_FORMAT, Checkpoint
from sdt_deploy.files.configs import DataConfig, Resolved
from sdt_deploy.ir.graph import LIF, SYNAPTIC, Graph


def build_quantized_v2_model(qg: Graph, cfg: V2Config, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The folded (or, for a re-parameterized graph, the re-parameterized) Meta-SpikeFormer holding qg's
    values, token sum before `lif` with its threshold times H*W: the original's modules, LIFs and forward,
    with the quantized weights. Every graph node of a conv/linear is the module of the same path (the
    MLP's Conv1d takes the [O, I, 1, 1] weight as [O, I, 1])."""
    H, W = qg.meta["token_shape"][1:]
    form = "reparam" if qg.meta.get("reparam") else "folded"
    model = build_v2_model(cfg, form=form, head_pool="sum", tokens=int(H * W)).to(dtype)
    modules = dict(model.named_modules())
    np_dtype = np.float64 if dtype == torch.float64 else None
    loaded = set()
    with torch.no_grad():
        for n in qg.nodes:
            if isinstance(n, SYNAPTIC):
                m = modules.get(n.name)
                if m is None:
                    raise DeployError(f"{n.name}: no module of that path in the {form} V2 model")
                m.weight.copy_(torch.from_numpy(n.float_weight(np_dtype)).reshape(m.weight.shape).to(m.weight.dtype))
                if m.bias is not None:
                    m.bias.copy_(torch.from_numpy(n.bias).to(m.bias.dtype))
                elif np.any(n.b_int != 0):
                    raise DeployError(f"{n.name}: a bias where the {form} V2 model has none")
                loaded.add(n.name)
            elif isinstance(n, LIF):
                m = modules[n.name]
                if float(m.v_threshold) != float(n.v_threshold):
                    raise DeployError(f"{n.name}: graph threshold {n.v_threshold} differs from the model's "
                                      f"{m.v_threshold}")
        missing = [name for name, m in modules.items() if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d,
                                                                          torch.nn.Linear)) and name not in loaded]
        if missing:
            raise DeployError(f"{missing[0]}: no graph node holds its weights")
        inp = qg.input
        model.input_quant = InputQuantizer(int(inp.grid[0]), int(inp.bits))
    return model.eval()


def build_quantized_model(qg: Graph, cfg: SDTConfig, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A folded SDT (conv biases, no BatchNorm, token *sum* before head_lif) holding qg's values, in `dtype`:
    float64 for a reference that must hold values float32 cannot (the values go into the parameters
    from the graph's integers, never through float32). A V2 graph gives the V2 model
    (`build_quantized_v2_model`)."""
    if not qg.meta.get("quantized"):
        raise DeployError("build_quantized_model needs a quantized graph")
    if isinstance(cfg, V2Config):
        return build_quantized_v2_model(qg, cfg, dtype)
    model = build_model(cfg, folded=True, head_pool="sum").to(dtype)
    modules = dict(model.named_modules())
    np_dtype = np.float64 if dtype == torch.float64 else None
    with torch.no_grad():
        for n in qg.nodes:
            if isinstance(n, SYNAPTIC):
                m = modules[n.name]
                m.weight.copy_(torch.from_numpy(n.float_weight(np_dtype)).to(m.weight.dtype))
                m.bias.copy_(torch.from_numpy(n.bias).to(m.bias.dtype))
            elif isinstance(n, LIF):
                m = modules[n.name]
                if float(m.v_threshold) != float(n.v_threshold):
                    raise DeployError(f"{n.name}: graph threshold {n.v_threshold} differs from the model's "
                                      f"{m.v_threshold}")
                if hasattr(m, "w"):
                    m.w.fill_(float(n.plif_w))
        for name, m in modules.items():
            if hasattr(m, "w") and name not in qg:   # PLIFs the forward never calls
                m.w.fill_(0.0)
            if name.endswith("talking_heads") and isinstance(m, torch.nn.Conv1d):
                m.weight.zero_()                    # never called in forward
        inp = qg.input
        model.input_quant = InputQuantizer(int(inp.grid[0]), int(inp.bits))
    return model.eval()


class QuantizedModel:
    """What `sdt_deploy.quantize` returns: the quantized graph, the configuration, the data settings and
    where it came from (`resolved`, `checkpoint`), and the torch model.

    The torch model may be given, or (model None) is built from the graph on first use of `.model`,
    with the `keep` parameters (the never-called talking_heads weights) copied in: an export needs
    the graph alone, and building the model costs a float32 copy of every weight (8-768: 265 MB)."""

    def __init__(self, model: Optional[torch.nn.Module], graph: Graph, config: SDTConfig, data: DataConfig,
                 keep: Optional[Mapping[str, torch.Tensor]] = None, resolved: Optional[Resolved] = None,
                 checkpoint: Optional[Checkpoint] = None):
        self._model = model
        self.graph = graph
        self.config = config
        self.data = data
        self._keep = dict(keep or {})
        self.resolved = resolved or Resolved(config, data, {})
        self.checkpoint = checkpoint or Checkpoint("", {}, "none")

    @property
    def model(self) -> torch.nn.Module:
        if self._model is None:
            model = build_quantized_model(self.graph, self.config)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if name in self._keep:
                        p.copy_(self._keep[name])
            self._model = model
        return self._model

    @model.setter
    def model(self, model: torch.nn.Module) -> None:
        self._model = model

    def __repr__(self) -> str:
        built = "built" if self._model is not None else "not built yet"
        return f"QuantizedModel(config={self.config!r}, graph={len(self.graph.nodes)} nodes, model {built})"

    def save(self, path: str) -> None:
        save_quantized(path, self)


def save_quantized(path: str, q: QuantizedModel) -> None:
    payload = {
        "format": QUANTIZED_FORMAT,
        "format_version": 1,
        "tool_version": __version__,
        "config": q.config.to_dict(),
        "data": {"dataset": q.data.dataset, "mean": list(q.data.mean), "std": list(q.data.std),
                 "crop_pct": q.data.crop_pct, "interpolation": q.data.interpolation},
        "graph": q.graph.to_json(arrays=True),
        "state_dict": q.model.state_dict(),
    }
    save_torch(path, payload)


def load_quantized(ck: Checkpoint, flags: Optional[Mapping[str, Any]] = None) -> QuantizedModel:
    """The QuantizedModel a `q.pth` file holds (its configuration is fixed: flags are refused)."""
    extra = ck.extra
    if extra.get("format_version") != 1:
        raise DeployError(f"checkpoint {ck.path!r}: unknown quantized format version {extra.get('format_version')!r}")
    if flags:
        raise DeployError(f"checkpoint {ck.path!r}: a quantized file fixes its configuration; "
                          f"drop the flags {', '.join(sorted(flags))}")
    try:
        graph = Graph.from_json(extra["graph"])
        cfg = (V2Config if graph.meta.get("family") == "v2" else SDTConfig)(**extra["config"])
        data = DataConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in extra["data"].items()})
    except (KeyError, TypeError, ValueError) as exc:
        raise DeployError(f"checkpoint {ck.path!r}: damaged quantized file ({exc})") from None
    model = build_quantized_model(graph, cfg)
    resolved = Resolved(cfg, data, {k: "quantized file" for k in cfg.to_dict()})
    return QuantizedModel(model, graph, cfg, data, resolved=resolved, checkpoint=ck)
