"""spikingjelly's multi-step LIF neurons with the backend chosen from where the tensors live.

The original SDT builds every neuron with `backend="cupy"`, which fails on a machine without CuPy and
on CPU tensors. These subclasses are the same spikingjelly nodes (same state, same `w` parameter for
PLIF, same arithmetic); they only pick the CuPy kernel when the input is on a CUDA device and CuPy is
importable, and the torch backend otherwise.
"""
from __future__ import annotations

import os

import torch
from spikingjelly.clock_driven import neuron as sj_neuron
from spikingjelly.clock_driven.neuron import MultiStepLIFNode, MultiStepParametricLIFNode

TAU = 2.0

# Set SDT_DEPLOY_LIF_BACKEND=torch to force the torch backend on a GPU (for debugging the kernel).
_FORCED = os.environ.get("SDT_DEPLOY_LIF_BACKEND", "").strip().lower()


def cupy_available() -> bool:
    return getattr(sj_neuron, "cupy", None) is not None


def backend_for(x: torch.Tensor) -> str:
    if _FORCED in ("torch", "cupy"):
        return _FORCED
    return "cupy" if (x.is_cuda and cupy_available()) else "torch"


class LIF(MultiStepLIFNode):
    """Multi-step LIF, tau = 2, hard reset to 0, `H >= v_threshold` fires."""

    def __init__(self, v_threshold: float = 1.0):
        super().__init__(tau=TAU, v_threshold=v_threshold, detach_reset=True, backend="torch")

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        self.backend = backend_for(x_seq)
        return super().forward(x_seq)


class PLIF(MultiStepParametricLIFNode):
    """Multi-step parametric LIF: 1/tau = sigmoid(w), w learned per layer."""

    def __init__(self, v_threshold: float = 1.0):
        super().__init__(init_tau=TAU, v_threshold=v_threshold, detach_reset=True, backend="torch")

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        self.backend = backend_for(x_seq)
        return super().forward(x_seq)


def make_neuron(spike_mode: str, v_threshold: float = 1.0) -> torch.nn.Module:
    if spike_mode == "lif":
        return LIF(v_threshold)
    if spike_mode == "plif":
        return PLIF(v_threshold)
    raise ValueError(f"unknown spike_mode {spike_mode!r}")


def is_neuron(module: torch.nn.Module) -> bool:
    return isinstance(module, (MultiStepLIFNode, MultiStepParametricLIFNode))


def decay_of(module: torch.nn.Module) -> float:
    """1/tau of a neuron as float32 arithmetic computes it."""
    if isinstance(module, MultiStepParametricLIFNode):
        return float(module.w.detach().float().sigmoid())
    return 1.0 / float(module.tau)
