"""A reference interpreter for NIR graphs, and the glue that maps its spikes back to the SDT layer names.

It steps the graph as NIR's spec states it (nir 1.0.8, `nir/ir/*.py`), in float64 with numpy state:
every time step, every node once, in dependency order; the input of a node is the sum of the outputs of
all its incoming edges at this step, and every edge must carry exactly the node's input shape (no
broadcasting). Continuous-time neurons use forward Euler with step `dt` (the graph's `dt` metadata, or
1e-4):

    LIF        v = v + dt/tau * (v_leak - v + r*I);  z = v > v_threshold;  v = v_reset where z;  out z
    IF         v = v + dt * r*I;                      z = v > v_threshold;  v = v_reset where z;  out z
    LI         v = v + dt/tau * (v_leak - v + r*I);  out v
    I          v = v + dt * r*I;                      out v
    Threshold  out = I > threshold
    Affine     out = W I + b          Linear  out = W I          Scale  out = s * I
    Conv1d/2d  torch's conv (cross-correlation) in float64, zero padding
    SumPool2d  sum over the window (zero padding)     AvgPool2d  that sum / window size (padding counted)
    Flatten    reshape of dims start_dim..end_dim (dims counted without the batch)
    Input / Output  identity

Nodes with state (Delay, CubaLI, CubaLIF) and nested graphs are refused rather than guessed at, and so is
a cycle (it would need a one-step delay the spec leaves open).

Also here: `nir_input` (the host's rounding of the model input onto the export's input grid) and
`nir_layer_spikes` (NIR node spikes back under the SDT layer names, for comparison with the torch model).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable, Optional, Union

import nir
import numpy as np
import torch
import torch.nn.functional as F

from sdt_deploy.errors import DeployError
from sdt_deploy.run import integer_engine
from sdt_deploy.run.engine_kernels import nir_lif, nir_lif_groups
from sdt_deploy.run.lif import NIRLIFParameters, nir_lif_step

F64 = np.float64
DEFAULT_DT = 1e-4
SPIKING = (nir.LIF, nir.IF, nir.Threshold)
STATEFUL = (nir.LIF, nir.IF, nir.LI, nir.I)


# ---------------------------------------------------------------- graph structure

def load_graph(graph_or_path: Union[nir.NIRGraph, str, os.PathLike]) -> nir.NIRGraph:
    if isinstance(graph_or_path, nir.NIRGraph):
        return graph_or_path
    return nir.read(str(graph_or_path))


def predecessors(graph: nir.NIRGraph) -> dict:
    preds = {name: [] for name in graph.nodes}
    for src, dst in graph.edges:
        preds[str(dst)].append(str(src))
    return preds


def topological_order(graph: nir.NIRGraph) -> list[str]:
    """Kahn's order; ties keep the graph's node order, so the result is deterministic."""
    preds = predecessors(graph)
    waiting = {name: len(set(p)) for name, p in preds.items()}
    succs = {name: [] for name in graph.nodes}
    for src, dst in {(str(s), str(d)) for s, d in graph.edges}:
        succs[src].append(dst)
    rank = {name: i for i, name in enumerate(graph.nodes)}
    ready = sorted((n for n, k in waiting.items() if k == 0), key=rank.get)
    order = []
    while ready:
        name = ready.pop(0)
        order.append(name)
        for nxt in sorted(succs[name], key=rank.get):
            waiting[nxt] -= 1
            if waiting[nxt] == 0:
                ready.append(nxt)
        ready.sort(key=rank.get)
    if len(order) != len(graph.nodes):
        stuck = sorted(set(graph.nodes) - set(order))
        raise DeployError(f"NIR graph has a cycle through {', '.join(stuck[:5])}; recurrent graphs are not supported")
    return order


# ---------------------------------------------------------------- per-node step functions

@dataclass
class Step:
    """One node compiled: `fn(state, I) -> (state, out, membrane or None)` (state None before step 1).
    `takes_spikes`: fn also takes I as the bool spikes of a single spiking source (no float64 copy)."""

    fn: Callable
    takes_spikes: bool = False


def _arr(a) -> np.ndarray:
    return np.asarray(a, dtype=F64)


def _pair(v) -> tuple:
    v = np.atleast_1d(np.asarray(v)).astype(np.int64).tolist()
    return tuple(v) if len(v) == 2 else (v[0], v[0])


def _torch_conv(x: np.ndarray, weight, bias, stride, padding, dilation, groups, dims: int) -> np.ndarray:
    conv = F.conv2d if dims == 2 else F.conv1d
    pad = padding if isinstance(padding, str) else (_pair(padding) if dims == 2 else int(np.ravel(padding)[0]))
    st = _pair(stride) if dims == 2 else int(np.ravel(stride)[0])
    dil = _pair(dilation) if dims == 2 else int(np.ravel(dilation)[0])
    y = conv(torch.from_numpy(np.ascontiguousarray(x, dtype=F64)), weight, bias, st, pad, dil, int(groups))
    return y.numpy()


def _sum_pool(x: np.ndarray, kernel, stride, padding) -> np.ndarray:
    """Window sums, zero padding, in float64 (exact on counts and on values on a power-of-two grid):
    torch's average pool with divisor 1 where its padding rule allows (at most half the window; measured
    4-70x faster), else a depthwise conv with a ones kernel."""
    kh, kw = _pair(kernel)
    if not isinstance(padding, str):
        ph, pw = _pair(padding)
        if 2 * ph <= kh and 2 * pw <= kw:
            return F.avg_pool2d(torch.from_numpy(np.ascontiguousarray(x, dtype=F64)), (kh, kw), _pair(stride),
                                (ph, pw), count_include_pad=True, divisor_override=1).numpy()
    c = x.shape[1]
    ones = torch.ones((c, 1, kh, kw), dtype=torch.float64)
    return _torch_conv(x, ones, None, stride, padding, 1, c, 2)


def _window_holds_axis(n: int, k: int, s: int, p: int) -> bool:
    """Whether, along an axis of n inputs, every output's window (size k, stride s, zero padding p on both
    sides) holds all n: there is an output, and the first one's window, [-p, k - p), reaches the last input.
    The last one's then starts at or before the first input: (n_out - 1) * s - p <= n + p - k <= 0."""
    return s >= 1 and p >= 0 and (n + 2 * p - k) // s + 1 >= 1 and k - p >= n   # else: torch's errors, as before


def _spike_sum_pool(S: np.ndarray, kernel, stride, padding) -> np.ndarray:
    """`_sum_pool` of spikes S (bool [N, C, H, W]): where every window holds the whole map (SDSA's token sum
    `kv_sum`: a 15x15 window padded by 7 over 8x8 tokens) each output is the map's spike count, counted once
    per channel instead of once per window (exact: integers); else `_sum_pool` of S as float64."""
    kh, kw = _pair(kernel)
    if not isinstance(padding, str) and S.ndim == 4:
        (sh, sw), (ph, pw) = _pair(stride), _pair(padding)
        N, C, H, W = S.shape
        if _window_holds_axis(H, kh, sh, ph) and _window_holds_axis(W, kw, sw, pw):
            counts = np.count_nonzero(S.reshape(N, C, H * W), axis=2)
            out = np.empty((N, C, (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1), F64)
            out[...] = counts[:, :, None, None]
            return out
    return _sum_pool(S.astype(F64), kernel, stride, padding)


def _sum_pool_step(node, dt: float) -> Step:
    """SumPool2d: a single spiking source comes as its bool spikes (`_spike_sum_pool`), anything else as
    float64 (`_sum_pool`)."""
    def fn(s, I):
        if I.dtype == np.bool_:
            return s, _spike_sum_pool(I, node.kernel_size, node.stride, node.padding), None
        return s, _sum_pool(I, node.kernel_size, node.stride, node.padding), None
    return Step(fn, takes_spikes=True)


def _compact(a):
    """A per-neuron parameter as the smallest array that broadcasts to the same values: a float64 scalar
    where every neuron has the same one, else the leading axes it varies over (a per-channel threshold
    [C, 1, 1]). The arithmetic is the same, element by element; only the passes over memory shrink."""
    a = np.asarray(a, dtype=F64)
    if a.ndim == 0:
        return a
    flat = a.reshape(-1)
    signs = np.signbit(flat)
    if flat.size and np.all(flat == flat[0]) and (signs.all() or not signs.any()):
        return F64(flat[0])
    for keep in range(1, a.ndim):
        lead = a.reshape(a.shape[:keep] + (-1,))
        if np.all(lead == lead[..., :1]):
            return np.ascontiguousarray(lead[..., :1]).reshape(a.shape[:keep] + (1,) * (a.ndim - keep))
    return a


NEURON_PARAMETERS = ("tau", "r", "v_leak", "v_threshold", "v_reset")


def compact_neurons(graph: nir.NIRGraph) -> nir.NIRGraph:
    """The graph with every neuron's per-neuron parameters (tau, r, v_leak, v_threshold, v_reset: full-size
    arrays in a file, 480 MB of float64 for SDT-8-768) replaced in place by `_compact`'s smallest arrays
    that broadcast to the same values: what `_neuron` steps with anyway. The node's input and output
    types are unchanged."""
    for node in graph.nodes.values():
        if isinstance(node, STATEFUL):
            for key in NEURON_PARAMETERS:
                value = getattr(node, key, None)
                if isinstance(value, np.ndarray) and value.ndim:
                    setattr(node, key, np.asarray(_compact(value)))
    return graph


def _neuron(node, dt: float) -> Step:
    """Forward-Euler neurons (`run.lif.nir_lif_step`): the gain is dt/tau for the leaky ones (LIF, LI), dt
    for the integrators. The step runs as the C kernel `engine_kernels.nir_lif` where it is built (one
    pass instead of numpy's eight, the same float64 operations: tests/test_nir_lif_kernel.py)."""
    leaky = isinstance(node, (nir.LIF, nir.LI))
    fires = isinstance(node, (nir.LIF, nir.IF))
    p = NIRLIFParameters(gain=_compact((dt / _arr(node.tau)) if leaky else dt), r=_compact(_arr(node.r)),
                         v_leak=_compact(_arr(node.v_leak)) if leaky else 0.0,
                         v_threshold=_compact(_arr(node.v_threshold)) if fires else None,
                         v_reset=_compact(_arr(node.v_reset)) if fires else 0.0, leaky=leaky)

    compiled: dict = {}            # layer shape -> engine_kernels.NIRLIFGroups (None: numpy's step)

    def fn(v, I):
        shape = I.shape[1:]
        if shape not in compiled:
            compiled[shape] = nir_lif_groups(p, shape)
        g = compiled[shape]
        out, v_next, h = nir_lif_step(I, v, p) if g is None or I.dtype != F64 else nir_lif(I, v, g)
        return v_next, out, h

    return Step(fn)


def _stateless(f: Callable) -> Callable:
    """A node without state from `f(node) -> (I -> out)`."""
    def compile_(node, dt: float) -> Step:
        g = f(node)
        return Step(lambda s, I: (s, g(I), None))
    return compile_


def _threshold(node):
    th = _arr(node.threshold)
    return lambda I: I > th


def _affine(node):
    w, b = _arr(node.weight), _arr(node.bias)
    return lambda I: I @ w.T + b


def _linear(node):
    w = _arr(node.weight)
    return lambda I: I @ w.T


def _scale(node):
    sc = _arr(node.scale)
    return lambda I: I * sc


def _conv_step(node, dt: float) -> Step:
    """torch's float64 convolution; a Conv2d whose input is spikes (0/1) and whose weights and bias are
    integers times a power of two per output channel takes the integer engine's event kernel instead
    (`spike_conv`): the same float64 values, exactly."""
    dims = 2 if isinstance(node, nir.Conv2d) else 1
    w, b = torch.from_numpy(_arr(node.weight)), torch.from_numpy(_arr(node.bias))

    def generic(I):
        return _torch_conv(I, w, b, node.stride, node.padding, node.dilation, node.groups, dims)

    fast = spike_conv_plan(node) if dims == 2 else None
    if fast is None:
        return Step(lambda s, I: (s, generic(np.asarray(I, dtype=F64)), None))
    return Step(lambda s, I: (s, fast(I) if I.dtype == np.bool_ else generic(I), None), takes_spikes=True)


def dyadic_rows(values: np.ndarray) -> np.ndarray:
    """Per row of float64 `values` [O, n], the smallest exponent e (e >= -1074) with every value times 2**e
    an integer (0 for a row of zeros): from each value's significand (53 bits) and its trailing zeros."""
    m, ex = np.frexp(values)                                  # values = m * 2**ex, 0.5 <= |m| < 1
    sig = np.abs(np.ldexp(m, 53)).astype(np.int64)            # exact: a 53-bit integer
    nz = sig != 0
    low = np.where(nz, sig & -sig, 1)                         # the lowest set bit
    tz = np.log2(low.astype(np.float64)).astype(np.int64)     # exact on powers of two
    need = np.where(nz, 53 - ex - tz, np.iinfo(np.int64).min)
    e = need.max(axis=1) if need.size else np.zeros(values.shape[0], np.int64)
    return np.where(e == np.iinfo(np.int64).min, 0, e)


_SPIKE_CONV: dict = {}


def spike_conv_plan(node) -> Optional[Callable]:
    """`I (bool [B, C, H, W]) -> float64 [B, O, H', W']` for a NIR Conv2d, computed by the integer engine's
    event kernel (`engine_kernels.conv_events`) where that is exact: stride 1, no dilation, one group, a
    square kernel with equal padding on every side, and per output channel o an exponent e[o] with
    weight[o] * 2**e[o] and bias[o] * 2**e[o] integers that the kernel's int16 weights and int32 sums hold.
    Then every value is the kernel's integer times 2**-e[o] -- which is what the float64 convolution
    gives too: its sums of such values never round (they stay far below 2**53 units of 2**-e[o]).
    None where any of that fails (the caller keeps the float64 convolution). Remembered per weight
    array while it lives and is unchanged."""
    from sdt_deploy.run import engine_kernels as K

    if not K.compiled_kernels():
        return None
    weight = np.asarray(node.weight)
    key = id(node.weight)
    held = _SPIKE_CONV.get(key)
    if held is not None and held[0]() is node.weight and K.same_array(held[1], weight) \
            and K.same_array(held[2], np.asarray(node.bias)) and held[3] == _conv_geometry(node):
        return held[4]
    plan = _make_spike_conv(node, weight, K)
    try:
        import weakref

        for k in [k for k, v in _SPIKE_CONV.items() if v[0]() is None]:
            del _SPIKE_CONV[k]
        _SPIKE_CONV[key] = (weakref.ref(node.weight), weight.copy(), np.array(node.bias, copy=True),
                            _conv_geometry(node), plan)
    except TypeError:   # pragma: no cover - not weak-referenceable
        pass
    return plan


def _conv_geometry(node) -> tuple:
    pad = node.padding if isinstance(node.padding, str) else _pair(node.padding)
    return _pair(node.stride), pad, _pair(node.dilation), int(node.groups)


def _make_spike_conv(node, weight: np.ndarray, K) -> Optional[Callable]:
    stride, pad, dilation, groups = _conv_geometry(node)
    if weight.ndim != 4 or weight.shape[2] != weight.shape[3] or stride != (1, 1) or dilation != (1, 1) \
            or groups != 1 or isinstance(pad, str) or pad[0] != pad[1]:
        return None
    w = weight.astype(F64)
    O = w.shape[0]
    bias = np.broadcast_to(np.asarray(node.bias, dtype=F64), (O,))
    if not (np.all(np.isfinite(w)) and np.all(np.isfinite(bias))):
        return None
    e = dyadic_rows(np.concatenate([w.reshape(O, -1), bias.reshape(O, 1)], axis=1))
    if np.any(np.abs(e) > 1000):
        return None
    scale = np.ldexp(1.0, e).reshape(O, 1, 1, 1)
    w_int = w * scale                                          # exact: a power of two
    if np.abs(w_int).max(initial=0) > K.I16_MAX:
        return None
    w_int = w_int.astype(np.int16)
    b_int = (bias * scale.reshape(O)).astype(np.int64)
    packed = K.pack_event_weights(w_int)
    if packed is None or not K.bias_fits(packed, b_int):
        return None
    unit = np.ldexp(1.0, -e).reshape(1, O, 1, 1)
    p = int(pad[0])

    def run(I: np.ndarray) -> np.ndarray:
        N, _, H, W = I.shape
        # the interpreter's threads are torch's intra-op setting (run_nir sets it), split as the engine splits
        parts = integer_engine.kernel_parts(torch.get_num_threads(), I.size * O,
                                            integer_engine.KERNEL_PARALLEL_MIN_WORK)
        Y, _pairs, _peak = K.conv_events(I, packed, p, parts, b_int)
        Ho, Wo = H + 2 * p - packed.k + 1, W + 2 * p - packed.k + 1
        out = np.empty((N, O, Ho, Wo), F64)             # written [N, O, H', W'] in memory too: the LIF reads it so
        np.multiply(Y.reshape(N, Ho, Wo, O).transpose(0, 3, 1, 2), unit, out=out)   # exact: a power of two
        return out
    return run


def _flatten(node):
    out_shape = tuple(int(v) for v in node.output_type["output"])
    return lambda I: I.reshape((I.shape[0],) + out_shape)


def _avg_pool(node):
    area = float(np.prod(_pair(node.kernel_size)))
    return lambda I: _sum_pool(I, node.kernel_size, node.stride, node.padding) / area


# each NIR node type's step, compiled once: fn(node, dt) -> Step
COMPILE = {
    nir.Input: _stateless(lambda node: lambda I: I),
    nir.Output: _stateless(lambda node: lambda I: I),
    nir.LIF: _neuron, nir.IF: _neuron, nir.LI: _neuron, nir.I: _neuron,
    nir.Threshold: _stateless(_threshold),
    nir.Affine: _stateless(_affine),
    nir.Linear: _stateless(_linear),
    nir.Scale: _stateless(_scale),
    nir.Conv2d: _conv_step, nir.Conv1d: _conv_step,
    nir.SumPool2d: _sum_pool_step,
    nir.AvgPool2d: _stateless(_avg_pool),
    nir.Flatten: _stateless(_flatten),
}


def compile_node(node: nir.NIRNode, dt: float) -> Step:
    """The step function of one node (its parameters converted once)."""
    rule = COMPILE.get(type(node))
    if rule is None:
        raise DeployError(f"the NIR interpreter does not support {type(node).__name__} nodes")
    return rule(node, dt)


# ---------------------------------------------------------------- running

def _expected_shape(node: nir.NIRNode) -> Optional[tuple]:
    t = (node.input_type or {}).get("input")
    return None if t is None else tuple(int(v) for v in np.asarray(t).ravel())


def _fan_in(name: str, node, srcs: list, out: dict, spikes: bool = False) -> np.ndarray:
    """Sum of the incoming edges, each exactly the node's input shape (with `spikes`, a single bool edge is
    passed on as it is)."""
    want = _expected_shape(node)
    if spikes and len(srcs) == 1 and out[srcs[0]].dtype == np.bool_:
        v = out[srcs[0]]
        if want is not None and tuple(v.shape[1:]) != want:
            raise DeployError(f"NIR edge {srcs[0]} -> {name}: shape {list(v.shape[1:])} where {list(want)} is "
                              "expected (NIR does not broadcast)")
        return v
    total = None
    for src in srcs:
        v = out[src]
        if want is not None and tuple(v.shape[1:]) != want:
            raise DeployError(f"NIR edge {src} -> {name}: shape {list(v.shape[1:])} where {list(want)} is expected "
                              "(NIR does not broadcast)")
        v = v.astype(F64, copy=False)
        total = v if total is None else total + v
    if total is None:
        raise DeployError(f"NIR node {name} has no input")
    return total


@contextlib.contextmanager
def torch_threads(n: Optional[int]):
    """Run with n intra-op torch threads, restoring the previous number after. The per-step tensors
    here are small: on a busy machine a spinning thread pool costs far more than it gives (measured:
    11 s with 2 threads against 0.14 s with 1 for a small dvs graph under load)."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_nir(graph_or_path, x: Union[np.ndarray, dict], dt: Optional[float] = None, membranes: bool = False,
            threads: Optional[int] = 1, on_step=None):
    """Run a NIR graph for T steps on per-step inputs x [B, T, ...] (a dict name -> array for several
    Input nodes). `threads`: torch threads for the convolutions (None: leave torch's setting).

    Returns (outputs, spikes) or, with `membranes`, (outputs, spikes, membranes): `outputs` maps each
    Output node to float64 [T, B, ...]; `spikes` maps every LIF / IF / Threshold node to uint8
    [T, B, ...]; `membranes` maps every neuron with state to its v after the update and before the
    reset, float64 [T, B, ...]. With `on_step(t, spikes)` each step's spikes ({node: uint8 [B, ...]}) are
    handed to it instead of kept (`spikes` comes back empty). A node's output is let go within the step
    once its last consumer has read it."""
    with torch_threads(threads):
        return _run_nir(load_graph(graph_or_path), x, dt, membranes, on_step)


def _run_nir(graph: nir.NIRGraph, x, dt: Optional[float], membranes: bool, on_step=None):
    if dt is None:
        dt = float(graph.metadata.get("dt", DEFAULT_DT)) if isinstance(graph.metadata, dict) else DEFAULT_DT
    inputs = {n: node for n, node in graph.nodes.items() if isinstance(node, nir.Input)}
    if not isinstance(x, dict):
        if len(inputs) != 1:
            raise DeployError(f"the NIR graph has {len(inputs)} inputs; pass a dict of arrays")
        x = {next(iter(inputs)): x}
    if set(x) != set(inputs):
        raise DeployError(f"inputs given for {sorted(x)}, the graph has {sorted(inputs)}")
    x = {k: np.asarray(v, dtype=F64) for k, v in x.items()}
    B, T = next(iter(x.values())).shape[:2]
    for k, v in x.items():
        want = _expected_shape(inputs[k])
        if v.shape[:2] != (B, T) or (want is not None and tuple(v.shape[2:]) != want):
            raise DeployError(f"input {k}: shape {list(v.shape)}, expected [B, T, {', '.join(map(str, want or ()))}]")

    order = topological_order(graph)
    preds = predecessors(graph)
    steps = {name: compile_node(graph.nodes[name], dt) for name in order}
    state: dict = {name: None for name in order}
    out_rec = {n: [] for n, node in graph.nodes.items() if isinstance(node, nir.Output)}
    spk_rec = {n: [] for n, node in graph.nodes.items() if isinstance(node, SPIKING)}
    mem_rec = {n: [] for n, node in graph.nodes.items() if isinstance(node, STATEFUL)} if membranes else {}
    readers = {name: 0 for name in order}
    for name in order:
        for src in preds[name]:
            readers[src] += 1
    for t in range(T):
        out: dict = {}
        left = dict(readers)
        step_spikes = {}
        for name in order:
            node = graph.nodes[name]
            if name in inputs:
                I = x[name][:, t]
            else:
                I = _fan_in(name, node, preds[name], out, steps[name].takes_spikes)
                for src in preds[name]:          # let a value go once its last reader has it
                    left[src] -= 1
                    if left[src] == 0:
                        out.pop(src, None)
            state[name], y, v = steps[name].fn(state[name], I)
            if left[name]:
                out[name] = y
            if name in spk_rec:
                if on_step is not None:
                    step_spikes[name] = y.astype(np.uint8)
                else:
                    spk_rec[name].append(y.astype(np.uint8))
            if name in out_rec:
                out_rec[name].append(y.astype(F64, copy=True))
            if name in mem_rec:
                mem_rec[name].append(v)
        if on_step is not None:
            on_step(t, step_spikes)
    stack = lambda rec: {k: np.stack(v) for k, v in rec.items() if v}  # noqa: E731
    if membranes:
        return stack(out_rec), stack(spk_rec), stack(mem_rec)
    return stack(out_rec), stack(spk_rec)


# ---------------------------------------------------------------- SDT conventions (exporters.nir)

def _input_node(graph: nir.NIRGraph) -> tuple[str, nir.Input]:
    inputs = [(n, node) for n, node in graph.nodes.items() if isinstance(node, nir.Input)]
    if len(inputs) != 1:
        raise DeployError(f"expected one Input node, found {len(inputs)}")
    return inputs[0]


def nir_input(graph_or_path, x: np.ndarray, time_steps: Optional[int] = None) -> np.ndarray:
    """The per-step NIR input [B, T, ...] (float64) of an sdt-deploy export for a model input x: an
    image [B, C, H, W] (repeated over T) or event frames [B, T, C, H, W].

    An image input (the Input node's metadata has `bits`) is put on its grid as the integer engine does:
    round half to even of x * 2**grid, saturated to signed `bits`, times 2**-grid. A partition's cut input
    (no `bits`) must already be on the node's per-channel grid, and is checked."""
    from sdt_deploy.run.integer_engine import quantize_input  # the one definition of the input rounding

    graph = load_graph(graph_or_path)
    name, node = _input_node(graph)
    meta = node.metadata or {}
    if x.ndim == 4:
        T = int(time_steps or graph.metadata["time_steps"])
        x = np.broadcast_to(x[:, None], (x.shape[0], T) + x.shape[1:])
    if "grid" not in meta:
        return np.asarray(x, dtype=F64)
    grid = np.asarray(meta["grid"], dtype=np.int64)
    if "bits" in meta:
        if len(set(grid.tolist())) != 1:
            raise DeployError(f"input {name}: a per-channel input grid is not supported")
        ints = quantize_input(np.asarray(x), int(grid[0]), int(meta["bits"]))
        return ints.astype(F64) * np.exp2(-float(grid[0]))
    scale = np.exp2(grid.astype(F64)).reshape((-1,) + (1,) * (x.ndim - 3))
    scaled = np.asarray(x, dtype=F64) * scale
    if not np.array_equal(np.round(scaled), scaled):
        raise DeployError(f"input of {name}: values are not on the node's grid")
    return np.asarray(x, dtype=F64)


def nir_layer_spikes(graph_or_path, spikes: dict, check_broadcast: bool = True) -> dict:
    """The spikes of a NIR run under the SDT layer names and shapes (`run_model`'s contract).

    `spikes` maps NIR node names to [T, B, ...] arrays (from `run_nir`, or any other executor). Every node
    whose metadata names an `sdt_layer` is mapped to it, reshaped to `sdt_shape`: the head LIF's
    [C, 1, 1] becomes [C]; the talking-heads LIF, which runs at every token ([C, H, W]), becomes [C] -
    after checking (with `check_broadcast`) that all tokens agree, since they must. A graph without
    that metadata maps its spiking nodes by their own names."""
    graph = load_graph(graph_or_path)
    out = {}
    for name, node in graph.nodes.items():
        meta = node.metadata if isinstance(node.metadata, dict) else {}
        if "sdt_layer" not in meta:
            if not meta and isinstance(node, SPIKING) and name in spikes:
                out[name] = spikes[name]
            continue
        if name not in spikes:
            continue
        layer = str(meta["sdt_layer"])
        a = np.asarray(spikes[name])
        want = tuple(int(v) for v in np.asarray(meta["sdt_shape"]).ravel())
        have = a.shape[2:]
        if have == want:
            out[layer] = a
        elif int(np.prod(have)) == int(np.prod(want)):
            out[layer] = a.reshape(a.shape[:2] + want)
        elif have[:len(want)] == want:            # computed at every token: all copies must agree
            flat = a.reshape(a.shape[:2] + want + (-1,))
            if check_broadcast and not np.all(flat == flat[..., :1]):
                raise DeployError(f"{name}: the per-token copies of {layer} disagree")
            out[layer] = np.ascontiguousarray(flat[..., 0])
        else:
            raise DeployError(f"{name}: spikes of shape {list(have)} do not map to {layer} {list(want)}")
    return out
