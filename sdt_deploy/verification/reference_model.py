"""The torch reference in the precision the bit analysis asks for, layer by layer.

float32 holds every value of a layer exactly where the bit analysis (`quant.bits.bit_report`) says so;
only the layers it marks need float64. The reference model is the quantized torch model in float32 with
those layers -- and no more than it takes to feed them -- in float64:

- a synaptic layer (Conv, Linear) that needs float64 holds its weights in float64, made from the graph's
  integers (never through float32), and computes on a float64 copy of its input;
- a LIF that needs float64 steps in float64 (spikingjelly computes in its input's dtype);
- an operation of the model's forward code (a residual add, a token sum, a max-pool of currents) that
  needs float64 gets it by promotion: one of its current inputs is made float64 (the synaptic layer that
  produces it, else recursively the op that does), and torch computes a float32-float64 sum in float64,
  the float32 operand converted exactly;
- every synaptic layer and LIF casts its input to its own dtype first: a float64 value entering a float32
  layer is one that float32 holds exactly (that layer's own analysis bounds its input).

The spikes are therefore those of the float64 model, bit for bit, at float32's speed in the rest (on
CIFAR 2-256 with random weights: two layers of 46, the head's token sum and LIF, in float64). Where the
plan meets an operation it does not know how to promote, the whole model is float64, as before.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from sdt_deploy.ir.graph import CURRENT, LIF, Add, Conv, Graph, Input, Linear, MaxPool, Readout, TokenSum
from sdt_deploy.quant.bits import bit_report


@dataclass(frozen=True)
class PrecisionPlan:
    """Which layers of the reference run in float64: `synaptic` (weights and computation), `neurons`
    (LIF state); `needed`: the layers the bit analysis marks (the others are there to feed them);
    `whole` True: the whole model in float64 (a plan could not be made)."""

    needed: tuple = ()
    synaptic: frozenset = field(default_factory=frozenset)
    neurons: frozenset = field(default_factory=frozenset)
    whole: bool = False

    @property
    def float32_only(self) -> bool:
        return not self.whole and not self.synaptic and not self.neurons

    def describe(self) -> str:
        if self.whole:
            return "float64"
        if self.float32_only:
            return "float32"
        return "float64 in the layers float32 may round, float32 elsewhere"


class _NoPlan(Exception):
    pass


def precision_plan(qg: Graph, report: Optional[dict] = None) -> PrecisionPlan:
    """The layers that need float64 (the bit analysis' `float32_exact` False) and what feeds them."""
    rows = (report or bit_report(qg))["layers"]
    needed = tuple(r["name"] for r in rows if not r["float32_exact"])
    if not needed:
        return PrecisionPlan()
    synaptic: set = set()
    neurons: set = set()

    def make64(name: str, depth: int = 0) -> None:
        if depth > len(qg.nodes):
            raise _NoPlan(name)
        n = qg[name]
        if isinstance(n, (Conv, Linear)):
            synaptic.add(name)
        elif isinstance(n, LIF):
            neurons.add(name)
        elif isinstance(n, (Add, TokenSum, MaxPool, Readout)):
            currents = [i for i in n.inputs if qg[i].out_kind == CURRENT and not isinstance(qg[i], Input)]
            if not currents:
                raise _NoPlan(name)
            direct = [i for i in currents if isinstance(qg[i], (Conv, Linear))]
            make64(direct[0] if direct else currents[0], depth + 1)
        else:
            raise _NoPlan(name)

    try:
        for name in needed:
            make64(name)
    except _NoPlan:
        return PrecisionPlan(needed, whole=True)
    return PrecisionPlan(needed, frozenset(synaptic), frozenset(neurons))


def _cast_input(dtype: torch.dtype):
    def hook(_module, args):
        return tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() and a.dtype != dtype else a
                     for a in args)
    return hook


def mixed_model(model32: torch.nn.Module, qg: Graph, plan: PrecisionPlan) -> torch.nn.Module:
    """The reference model for `plan`: a copy of the float32 quantized model (sharing its float32 weights)
    with the plan's layers in float64 (new weights from the graph's integers) and every synaptic layer and
    LIF casting its input to its own dtype. `model32` itself when the plan is float32 throughout."""
    from models import is_neuron

    if plan.float32_only:
        return model32
    # the modules copied, the float32 parameters shared with model32 (the float64 ones are new tensors)
    model = copy.deepcopy(model32, memo={id(p): p for p in model32.parameters()})
    modules = dict(model.named_modules())
    dtypes = {}
    with torch.no_grad():
        for name in plan.synaptic:
            n, m = qg[name], modules[name]
            m.weight = torch.nn.Parameter(torch.from_numpy(n.float_weight(np.float64)).reshape(m.weight.shape),
                                          requires_grad=False)
            if m.bias is not None:
                m.bias = torch.nn.Parameter(torch.from_numpy(np.asarray(n.bias, dtype=np.float64).copy()),
                                            requires_grad=False)
    for name, m in modules.items():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv1d, torch.nn.Linear)) and name in qg:
            dtypes[name] = m.weight.dtype
        elif is_neuron(m) and name in qg:
            dtypes[name] = torch.float64 if name in plan.neurons else torch.float32
    for name, dtype in dtypes.items():
        modules[name].register_forward_pre_hook(_cast_input(dtype))
    return model.eval()
