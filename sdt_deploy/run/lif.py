"""The LIF neuron's update, each arithmetic written once, as pure steps over plain arrays (the shape of
norse's `lif_feed_forward_step`: parameters and state in, spikes and the new state out).

Three arithmetics of the same neuron, each exact where the numeric contract says so
(docs/numeric-contract.md):

- `float_lif_step`: spikingjelly's multi-step LIF (decay_input, hard reset), operation for operation as
  its torch backend computes it, so a float model reproduces the torch SDT bit for bit:

      H = V + (X - (V - v_reset)) / tau          (PLIF: ... * decay, decay = sigmoid(w), as spikingjelly)
      S = (H - v_threshold) >= 0
      V' = (1 - S) * H + S * v_reset

- `integer_lif_step`: the quantized contract's integer neuron on its channel grid (tau = 2, v_reset 0):

      H = (V + X) >> 1                           (arithmetic shift: floor)
      S = H >= theta_int
      V' = H where not S, else 0

  Because floor((floor(a) + n) / 2) = floor((a + n) / 2) for integer n, the integer state is the floor of
  the exact state and every threshold decision matches the float neuron's.

- `nir_lif_step`: NIR's continuous-time LIF (`tau dv/dt = (v_leak - v) + r I`) stepped by forward Euler,
  as NIR consumers run it, firing on `>`:

      H = V + dt/tau * (v_leak - V + r * I);  S = H > v_threshold;  V' = v_reset where S, else H

The ONNX exporter emits the first two as graph operations (`exporters.onnx.lower_lif`).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np


class FloatLIFParameters(NamedTuple):
    v_threshold: float
    tau: float = 2.0
    decay: Optional[object] = None     # PLIF: sigmoid(w) (a tensor of the input's dtype); None: divide by tau
    v_reset: float = 0.0


def float_lif_step(x, v, p: FloatLIFParameters):
    """One step of spikingjelly's LIF on torch tensors: returns (spikes as x's dtype, V', H)."""
    if p.decay is None:
        h = v + (x - (v - p.v_reset)) / p.tau
    else:
        h = v + (x - (v - p.v_reset)) * p.decay
    s = (h - p.v_threshold >= 0).to(x.dtype)
    return s, (1.0 - s) * h + s * p.v_reset, h


def integer_lif_step(x: np.ndarray, v: np.ndarray, theta: np.ndarray, spikes_out: Optional[np.ndarray] = None):
    """One step of the integer LIF on arrays of one integer dtype (theta broadcast against them): returns
    (spikes, V', H). `spikes_out` receives the spikes where given. V' reuses H's memory (H is returned as
    the membrane before the reset only when the caller copies it first: see `integer_lif`)."""
    h = v + x
    h >>= 1
    s = h >= theta
    if spikes_out is not None:
        spikes_out[...] = s
    return s, h, h


def integer_lif(X: np.ndarray, theta: np.ndarray, channel_axis: int = 2, membranes: Optional[list] = None,
                out: Optional[np.ndarray] = None):
    """`integer_lif_step` over the T steps of X [T, ...] from rest: returns (spikes uint8 [T, ...], the
    largest |H|); the spikes go into `out` where given; with `membranes`, each step's H (int64) is
    appended to it."""
    shape = [1] * (X.ndim - 1)
    shape[channel_axis - 1] = -1
    th = theta.astype(X.dtype).reshape(shape)
    v = np.zeros_like(X[0])                     # X's dtype and memory layout
    out = np.empty_like(X, dtype=np.uint8) if out is None else out
    peak = 0
    for t in range(X.shape[0]):
        s, v, h = integer_lif_step(X[t], v, th, spikes_out=out[t])
        peak = max(peak, abs_max(h))
        if membranes is not None:
            membranes.append(h.astype(np.int64))
        np.copyto(v, 0, where=s)   # the reset, in place: V' = H * (1 - S)
    return out, peak


def abs_max(a: np.ndarray) -> int:
    """max |a| as a Python int (no temporary array; exact at the int64 minimum too)."""
    return max(int(a.max()), -int(a.min())) if a.size else 0


class NIRLIFParameters(NamedTuple):
    gain: object            # dt / tau (leaky) or dt (an integrator), broadcast against the input
    r: object
    v_leak: object = 0.0
    v_threshold: Optional[object] = None    # None: a neuron that does not fire (LI, I)
    v_reset: object = 0.0
    leaky: bool = True


def nir_lif_step(i: np.ndarray, v: Optional[np.ndarray], p: NIRLIFParameters):
    """One forward-Euler step of NIR's LIF / IF / LI / I (`v` None: at rest): returns (output, V', H) —
    the output is the spikes (bool) of a firing neuron, the membrane of a non-firing one."""
    v = np.zeros_like(i) if v is None else v
    h = v + p.gain * (p.v_leak - v + p.r * i) if p.leaky else v + p.gain * (p.r * i)
    if p.v_threshold is None:
        return h, h, h
    s = h > p.v_threshold
    return s, np.where(s, p.v_reset, h), h
