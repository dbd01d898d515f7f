"""The float executor: the executable meaning of a deploy graph.

It runs the graph node by node on [T, B, ...] tensors with torch's kernels, each LIF stepping through
T with its membrane as explicit state. The arithmetic of every node is spikingjelly's / torch's own
(convolutions on the time-flattened batch, eval BatchNorm, `v + (x - v) / tau`), so on an unfolded
graph it reproduces the torch model bit for bit, and on a quantized graph it is exact by construction.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from models.sdt import InputQuantizer, heads_or_pool
from models.sdt_v2 import to_heads
from sdt_deploy.errors import DeployError
from sdt_deploy.files.arrays import time_major
from sdt_deploy.ir.graph import (
    LIF,
    Add,
    And,
    BatchNorm,
    BNPad,
    Broadcast,
    Conv,
    Graph,
    Input,
    KdReadout,
    KVProduct,
    Linear,
    MaxPool,
    OrPool,
    QKVProduct,
    Readout,
    SpatialMean,
    TokenSum,
)
from sdt_deploy.run.lif import FloatLIFParameters, float_lif_step


def lif_run(node: LIF, x: torch.Tensor, states: Optional[dict] = None) -> torch.Tensor:
    """spikingjelly's multi-step LIF on [T, ...] (`run.lif.float_lif_step` at every step, from rest)."""
    decay = torch.sigmoid(torch.tensor(node.plif_w, dtype=x.dtype)) if node.plif_w is not None else None
    p = FloatLIFParameters(float(node.v_threshold), node.tau, decay, node.v_reset)
    v = torch.zeros_like(x[0])
    out = []
    for t in range(x.shape[0]):
        s, v, h = float_lif_step(x[t], v, p)
        out.append(s)
        if states is not None:
            states.setdefault(node.name, []).append(h)
    return torch.stack(out)


def _tb(fn, v: torch.Tensor) -> torch.Tensor:
    """Apply a 4-D op to [T, B, C, H, W] through the time-flattened batch, as the model does."""
    y = fn(v.flatten(0, 1))
    return y.reshape(v.shape[:2] + y.shape[1:])


def execute(g: Graph, x: np.ndarray, dtype: torch.dtype = torch.float32, record: bool = True,
            membranes: bool = False, currents: tuple = ()) -> tuple[np.ndarray, dict, dict]:
    """Run the graph on x ([B,C,H,W] repeated over T, or [B,T,C,H,W]).

    Returns (logits, spikes, membranes): logits as the read-out gives them, spikes as uint8 [T,B,...]
    keyed by node name (every spike-kind node), and — with `membranes` — each LIF's H per step. The
    nodes named in `currents` (V2's `kv`, say) join the spikes with their values, [T, B, ...] in `dtype`."""
    T = x.shape[1] if x.ndim == 5 else int(g.meta["time_steps"])
    values: dict[str, torch.Tensor] = {}
    spikes: dict[str, np.ndarray] = {}
    states: Optional[dict] = {} if membranes else None
    remaining = {n.name: sum(n.name in m.inputs for m in g.nodes) for n in g.nodes}
    for n in g.nodes:
        ins = [values[i] for i in n.inputs]
        y = _eval(n, ins, x, T, dtype, states)
        values[n.name] = y
        if record and n.out_kind == "spike":
            spikes[n.name] = y.to(torch.uint8).numpy()
        elif n.name in currents:
            spikes[n.name] = y.numpy().copy()
        for i in n.inputs:  # free what no later node reads
            remaining[i] -= 1
            if remaining[i] == 0 and i != g.output.name:
                values.pop(i, None)
    mem = {k: torch.stack(v).numpy() for k, v in states.items()} if membranes else {}
    return values[g.output.name].numpy(), spikes, mem


def _input(n: Input, ins, x, T, dtype, states):
    v = torch.from_numpy(np.array(time_major(x, T), dtype=np.float32)).to(dtype)
    if n.grid is not None and n.bits is not None:   # bits None: already on its grid (a cut's input)
        v = InputQuantizer(int(np.asarray(n.grid).flat[0]), int(n.bits))(v)
    return v


def _conv(n: Conv, ins, x, T, dtype, states):
    w = torch.from_numpy(n.float_weight()).to(dtype)
    b = None if n.bias is None else torch.from_numpy(n.bias).to(dtype)
    return _tb(lambda t: F.conv2d(t, w, b, n.stride, n.padding, 1, n.groups), ins[0])


def _batchnorm(n: BatchNorm, ins, x, T, dtype, states):
    p = {k: torch.from_numpy(getattr(n, k)).to(dtype) for k in ("weight", "bias", "mean", "var")}
    return _tb(lambda t: F.batch_norm(t, p["mean"], p["var"], p["weight"], p["bias"], False, 0.0, n.eps), ins[0])


def _bnpad(n: BNPad, ins, x, T, dtype, states):
    """BatchNorm, then the ring in the original's order (`models.sdt_v2.bn_pad_value`): `bias - mean *
    weight / sqrt(var + eps)`, torch's float arithmetic, so the ring equals the original's bit for bit."""
    p = {k: torch.from_numpy(getattr(n, k)).to(dtype) for k in ("weight", "bias", "mean", "var")}
    y = _batchnorm(n, ins, x, T, dtype, states)
    ring = p["bias"] - p["mean"] * p["weight"] / torch.sqrt(p["var"] + n.eps)
    P = int(n.pad)
    lead = y.shape[:2]
    out = ring.view(1, 1, -1, 1, 1).expand(*lead, -1, *n.shape[1:]).clone()
    out[..., P:P + y.shape[3], P:P + y.shape[4]] = y
    return out


def _kv_product(n: KVProduct, ins, x, T, dtype, states):
    """k^T v per head over the tokens, in the original's layout and order (`models.sdt_v2`)."""
    k, v = (to_heads(t, n.heads) for t in ins)
    return k.transpose(-2, -1) @ v


def _qkv_product(n: QKVProduct, ins, x, T, dtype, states):
    q = to_heads(ins[0], n.heads)
    y = (q @ ins[1]) * (2.0 ** -n.scale_exp)
    Tn, B = y.shape[:2]
    return y.transpose(3, 4).reshape(Tn, B, *n.shape)


def _orpool(n: OrPool, ins, x, T, dtype, states):
    if n.layout == "heads":
        return heads_or_pool(ins[0], n.heads)
    return _tb(lambda t: F.max_pool2d(t, n.kernel, n.stride, n.padding), ins[0])


def _maxpool(n: MaxPool, ins, x, T, dtype, states):
    return _tb(lambda t: F.max_pool2d(t, n.kernel, n.stride, n.padding), ins[0])


def _add(n: Add, ins, x, T, dtype, states):
    y = ins[0]
    for other in ins[1:]:
        y = y + other
    return y


def _linear(n: Linear, ins, x, T, dtype, states):
    w = torch.from_numpy(n.float_weight()).to(dtype)
    b = None if n.bias is None else torch.from_numpy(n.bias).to(dtype)
    return F.linear(ins[0], w, b)


# each node type's float meaning: fn(node, inputs, model input, T, dtype, membrane record) -> [T, B, ...]
FLOAT_EVAL = {
    Input: _input,
    Conv: _conv,
    BatchNorm: _batchnorm,
    LIF: lambda n, ins, x, T, dtype, states: lif_run(n, ins[0], states),
    And: lambda n, ins, x, T, dtype, states: ins[0] * ins[1],
    OrPool: _orpool,
    MaxPool: _maxpool,
    TokenSum: lambda n, ins, x, T, dtype, states: ins[0].flatten(3).sum(3),
    SpatialMean: lambda n, ins, x, T, dtype, states: ins[0].flatten(3).mean(3),
    Broadcast: lambda n, ins, x, T, dtype, states: ins[0][..., None, None].expand(
        ins[0].shape + tuple(n.shape[1:])).contiguous(),
    Add: _add,
    Linear: _linear,
    Readout: lambda n, ins, x, T, dtype, states: ins[0] if n.mode == "per_step" else ins[0].mean(0),
    BNPad: _bnpad,
    KVProduct: _kv_product,
    QKVProduct: _qkv_product,
    # the original's eval output: the mean of the two heads' means over T
    KdReadout: lambda n, ins, x, T, dtype, states: (ins[0].mean(0) + ins[1].mean(0)) / 2,
}


def _eval(n, ins, x, T, dtype, states):
    rule = FLOAT_EVAL.get(type(n))
    if rule is None:
        raise DeployError(f"no float semantics for node {n.name} ({n.op})")
    return rule(n, ins, x, T, dtype, states)
