"""NIR export of a quantized deploy graph (docs/nir.md): `to_nir` builds a `nir.NIRGraph`, `write_nir`
writes it as a `.nir` (HDF5) file that stock `nir.read` (type checking on) loads back.

What the graph computes
-----------------------
NIR is continuous-time; a consumer steps it with forward Euler at a time step `dt` the format does not
store (we put it in the graph's metadata, default 1e-4). Every node runs once per step, in dependency
order; several edges into one node are summed; shapes match exactly on every edge (no broadcasting).

- LIF (spikingjelly's tau = 2 LIF, hard reset to 0): `LIF(tau = 2*dt, r = 1, v_leak = 0, v_reset = 0)`

      v[t] = v[t-1] + dt/tau * (v_leak - v[t-1] + r * I[t]) = (v[t-1] + I[t]) / 2     (dt/tau = 0.5 exactly)
      z[t] = v[t] > v_threshold ;  v[t] = v_reset where z[t]

  which is spikingjelly's `H = V + (X - V)/2`, except that NIR fires on `>` and spikingjelly on `>=`.
  Ties are the rule on a dyadic grid, so the threshold is lowered. The input X of a LIF whose state
  grid is g (`LIF.grid`, per channel) is an integer times 2**-g, and each step halves the state, so
  after t steps the exact membrane is a multiple of 2**-(g + t): it gains one fractional bit per step.
  Lowering theta by half of the *input* grid step (2**-(g+1)) is therefore not enough after step 1;
  the export lowers it by half of the finest step reachable in T steps:

      v_threshold = theta - 2**-(g + T + 1) = (theta_int * 2**(T+1) - 1) * 2**-(g + T + 1)

  per channel. Then `v > v_threshold  <=>  v >= theta` for every membrane reachable in up to T steps
  (T = the graph's `time_steps` metadata; run it longer and a tie can be missed). tau is float64
  `2*dt` so that `dt/tau` is exactly 0.5 (float32 2e-4 against float64 1e-4 is not).
- `a AND b` (k AND v, q AND g): both edges into `Threshold(1.5)`: z = (a + b) > 1.5.
- OR-pool of spikes over (H, W) (k_pool/v_pool, the stem's stride-2 pools): `SumPool2d(3, s, 1)` then
  `Threshold(0.5)`: z = (number of spikes in the window) > 0.5.
- dvs_mode's OR-pool in the [heads, N, C/heads] layout (3x3 over token index n = y*W + x and channel
  within head; token neighbours wrap across rows): NIR has no reshape, and nir 1.0.8's type checker
  rejects grouped convolutions (it takes the input channels from `weight.shape[1]`) and non-square
  kernels (it uses `weight.shape[2]` for both sides), so the depthwise kernel is not an option. The
  pool is separable (a max over a product window): first the token neighbours per channel, then the
  channel neighbours per token:

      row    = SumPool2d((1, 3), 1, (0, 1))(s)                      in-row neighbours x-1, x, x+1
      prev_k = M_out_k * SumPool2d((3, 2W-1), 1, (1, W-1))(M_in_k * s)    k = 0, 1, 2  (`Scale` masks)
      next_k = (same with the masks mirrored)
      tokens = Threshold(0.5)(row + sum_k prev_k + sum_k next_k)
      out    = Threshold(0.5)(Conv2d_1x1(A)(tokens))      A: 0/1 block-tridiagonal within each head

  The wrapped neighbours: n-1 of (y, 0) is (y-1, W-1), n+1 of (y, W-1) is (y+1, 0). M_in_k keeps row
  y = k (mod 3) of column W-1 (resp. 0); the box of 3 rows around y then holds exactly one row = k
  (mod 3), and M_out_k keeps column 0 (resp. W-1) of the rows with y-1 = k (resp. y+1 = k) (mod 3):
  an exact shift by one row built from symmetric pools, O(C*H*W) parameters.
- token sum + broadcast (SDSA's kv_sum and the talking-heads spikes at every token): `SumPool2d` with
  kernel (2H-1, 2W-1), stride 1, padding (H-1, W-1) gives every token the per-channel total; the
  talking-heads LIF then runs over [C, H, W] and its spikes are equal at every token.
- the residual stream (currents meeting in one membrane): no node; every contribution is an edge into
  each consumer (fan-in is summed).
- the head: `head_sum` = `SumPool2d((H, W), (H, W), 0)` -> [C, 1, 1], `head_lif` with theta = H*W
  (the mean folded into the threshold), `Flatten(0)` -> [C], `Affine` `head`, NIR `Output` `output`
  (per-step logits; the mean over T -- or TET's per-step read-out -- stays with the host).

Weights are the exact dequantized float64 values (w_int * 2**-w_exp), so the graph computes correctly
without any metadata. Node metadata adds the integer form for hardware back ends: `w_int` (int8),
`w_exp`, `b_int`, `grid` (output grid: value = integer * 2**-grid) on synaptic nodes; `grid`,
`theta_int`, `threshold_exp` on LIFs; `grid`/`bits` on the input; `role` everywhere, and
`sdt_layer`/`sdt_shape` on every node that carries one of the torch model's spike tensors (see
`sdt_deploy.run.nir_interpreter.nir_layer_spikes`). Graph metadata: `dt`, `time_steps`, `profile`, `readout`,
`readout_rule` (how the logits are formed from the per-step Output, and for which T, in a sentence),
`loader` (the call that runs the profile), `input`, `partition`/`cut`, the SDT config and the deploy
graph's meta (JSON strings).

The input
---------
A whole graph's `Input` is the image (or event frame) *already on the input grid*: the host computes
`round_half_even(x * 2**grid)`, saturated to `bits` signed bits, times 2**-grid (the input node's
metadata holds `grid` and `bits`; `sdt_deploy.run.nir_interpreter.nir_input` does it). A partition's device part
starts at the cut (`patch_embed.maxpool3`, the stem's max-pool over currents, which has no exact NIR
encoding): its input is the host part's output, exactly on the node's per-channel `grid`.

Profiles
--------
`standard` (default): the encodings above. `portable`: for third-party importers, measured against
snntorch 1.0 `import_from_nir` (+ nirtorch 2.6): snntorch maps only Affine, Linear, Conv2d, Flatten,
AvgPool2d, IF, LIF, CubaLIF (anything else, Threshold and Scale included, is refused); nirtorch's
default SumPool2d (an `LPPool2d`) drops the padding; snntorch hard-codes dt = 1e-4; asserts a single
v_threshold per LIF node; and maps NIR `Flatten(start_dim)` to torch's, whose dim 0 is the batch. So:

- Threshold(theta) -> a memoryless LIF: tau = dt, r = 1, v_threshold = theta. With dt/tau = 1 the
  Euler step is v = v + (I - v) = I (snntorch: beta = 1 - dt/tau = 0, weight scale 1), exactly memoryless.
- every pool / token sum -> `Conv2d` with a channel-diagonal 0/1 kernel (groups = 1: grouped convs fail
  nir's type check and snntorch builds them with the wrong channel count); dvs_mode's heads pool -> one
  fused conv of kernel (K, K), K = max(3, 2W-1), with ones at the offsets (0,-1), (0,0), (0,1),
  (-1, W-1), (+1, -(W-1)) times the block-tridiagonal channel matrix. These kernels are dense:
  C*C*K*K parameters (float32; 0/1 is exact), large for wide models;
- one v_threshold per LIF (snntorch asserts it): theta - 2**-(max_c g_c + T + 1), the finest channel's
  margin, exact for every channel and a float32 value wherever the bit analysis finds the layer
  float32-exact; where it is not, the float32 just below theta, exact for every float32 membrane, as
  its float32 consumers compute them (`float32_threshold` says why no single value can serve both);
- the head: `head_sum` as a Conv2d (channel-diagonal ones over the (H, W) tokens; the only conv that
  reads currents besides the encoder, and it holds no learned weight), `head_lif` on [C, 1, 1], `head`
  as a 1x1 Conv2d -> `Output` [K, 1, 1] (no Flatten).
- dt must be 1e-4.
snntorch runs float32: it is exact where the numbers fit 24 bits (see `sdt_deploy.quant.bits`), as the torch
model itself.

`norse`: for `norse.torch.from_nir` (norse 1.1, measured in tests/test_interop.py). The portable
encodings (norse maps no Threshold -- a KeyError -- ignores SumPool2d padding, maps `Flatten(0)` to
torch's), and two more things:

- dt = 1e-3, norse's default, so that the plain `from_nir(graph)` call is right (its float32 gains
  dt * (1/tau) are exactly 0.5 and 1 for tau = 2*dt and dt: measured, and equally for 1e-4);
- depth-first safety (`_make_depth_first_safe`): from_nir runs the graph with nirtorch's `GraphExecutor`
  (the deprecated `nirtorch.load`), which executes the nodes in the pre-order of a depth-first walk from
  the input and returns the last node's value. A join reached before one of its inputs reads that input
  from the previous step. Zero synapses (1x1 Conv2d, all-zero weights and bias, role `sequencing`) chain
  the parallel branches q -> k -> v, so that the walk passes every input of k AND v and of q AND g before
  the join; edges are listed in topological order of their targets; the walk then ends at the Output.
  Each zero synapse adds exactly 0 to a conv's input (C*C parameters, two per attention block).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import nir
import numpy as np

from exporters.nir_streaming import write_streaming
from sdt_deploy import __version__
from sdt_deploy.errors import DeployError
from sdt_deploy.files.atomic import atomic_file
from sdt_deploy.ir.graph import (
    LIF,
    SPIKE,
    Add,
    And,
    BatchNorm,
    Broadcast,
    Conv,
    Graph,
    Input,
    KdReadout,
    KVProduct,
    Linear,
    MaxPool,
    Node,
    OrPool,
    QKVProduct,
    Readout,
    SpatialMean,
    TokenSum,
    json_default,
)
from sdt_deploy.quant.contract import settings_of

DT = 1e-4
OUTPUT = "output"
F64 = np.float64
# The largest dense structural kernel the portable profile will build (elements; float32 = 4 bytes).
PORTABLE_MAX_KERNEL = 2 ** 26


@dataclass(frozen=True)
class Profile:
    """How each construct is encoded (see the module docstring)."""

    name: str
    threshold_as_lif: bool          # Threshold -> memoryless LIF (snntorch has no Threshold)
    pools_as_conv: bool             # SumPool2d / Scale -> channel-diagonal 0/1 Conv2d
    flat_head: bool                 # Flatten(0) + Affine (standard) or 1x1 Conv2d on [C,1,1]
    per_channel_threshold: bool     # one v_threshold per channel, or one per LIF node
    required_dt: Optional[float] = None   # the dt the target importer uses (snntorch: 1e-4, norse: 1e-3)
    depth_first_safe: bool = False  # zero synapses + edge order so that a depth-first executor is exact
    target: str = ""                # who the profile is for, and how to load it (graph metadata)


# norse.torch.from_nir's default dt (norse 1.1); dt/tau = 0.5 and 1 are exact in its float32 arithmetic
NORSE_DT = 1e-3

PROFILES = {
    "standard": Profile("standard", threshold_as_lif=False, pools_as_conv=False, flat_head=True,
                        per_channel_threshold=True),
    "portable": Profile("portable", threshold_as_lif=True, pools_as_conv=True, flat_head=False,
                        per_channel_threshold=False, required_dt=DT),
    "norse": Profile("norse", threshold_as_lif=True, pools_as_conv=True, flat_head=False,
                     per_channel_threshold=False, required_dt=NORSE_DT, depth_first_safe=True,
                     target="norse 1.1: norse.torch.from_nir(nir.read(path)) (its default dt = 1e-3 is this "
                            "graph's dt), called once per step: out, state = model(x_t, state)"),
}


def default_dt(profile: str) -> float:
    """The dt a profile is exported with when none is given: the one its importer uses, else 1e-4."""
    prof = _profile(profile)
    return prof.required_dt if prof.required_dt is not None else DT


# ---------------------------------------------------------------- public API

def to_nir(qgraph: Graph, profile: str = "standard", dt: Optional[float] = None,
           time_steps: Optional[int] = None) -> nir.NIRGraph:
    """The NIR graph of a quantized deploy graph (a whole model without a max-pool over currents, or a
    partition's device part). `time_steps` (default: the graph's T) is the number of steps the LIF
    thresholds are exact for."""
    graph, _ = _build(qgraph, profile, dt, time_steps, lazy_arrays=False)
    return graph


def _build(qgraph: Graph, profile: str, dt: float, time_steps: Optional[int],
           lazy_arrays: bool) -> tuple[nir.NIRGraph, dict]:
    """(the NIR graph, {node name: function making its weight}). With `lazy_arrays` (for `write_nir`
    alone) the graph's synaptic weights are placeholders that those functions replace as each node is
    written, and its constant arrays read-only views (`_Builder.weight`, `_Builder.spread`); without,
    the dictionary is empty and every array real."""
    prof = _profile(profile)
    dt = float(default_dt(profile) if dt is None else dt)
    if not (math.isfinite(dt) and dt > 0):
        raise DeployError(f"dt must be a positive number, got {dt!r}")
    if prof.required_dt is not None and dt != prof.required_dt:
        why = "snntorch hard-codes it" if prof.name == "portable" else "its importer's default"
        raise DeployError(f"the {prof.name} profile needs dt = {prof.required_dt} ({why}), got {dt!r}")
    _check_exportable(qgraph)
    T = int(time_steps if time_steps is not None else qgraph.meta["time_steps"])
    if T < 1:
        raise DeployError(f"time_steps must be at least 1, got {T}")
    b = _Builder(qgraph, prof, dt, T, lazy_arrays)
    for n in qgraph.nodes:
        _EMIT[type(n)](b, n)
    if not isinstance(qgraph.output, Readout):     # a partition's prefix ends in the cut's current
        _emit_prefix_output(b, qgraph.output)
    if prof.depth_first_safe:
        _make_depth_first_safe(b)
    graph = nir.NIRGraph(nodes=b.nodes, edges=b.edges, metadata=_graph_metadata(b), type_check=True)
    if set(graph.nodes) != set(b.nodes):   # nir adds Input/Output nodes for dangling ends
        extra = sorted(set(graph.nodes) - set(b.nodes))
        raise DeployError(f"internal: the NIR graph has dangling ends ({', '.join(extra)})")
    return graph, b.weight_makers


# nir.write's gzip at level 1 instead of its default 4: any HDF5 reader decompresses either; measured on
# SDT-8-768's weights, twice as fast to write for a file ~15 % larger
GZIP_LEVEL = 1


def write_nir(qgraph: Graph, path: str, profile: str = "standard", dt: Optional[float] = None,
              time_steps: Optional[int] = None) -> None:
    """Export to a `.nir` file, written atomically (a temporary file beside `path`, renamed when
    complete): the graph `to_nir` makes, byte-identical for the same graph. Each synaptic weight exists
    in float64 only while its node is written (SDT-8-768: 505 MiB of float64 weights, never all at
    once); `to_nir` gives the graph with every weight in it."""
    graph, makers = _build(qgraph, profile, dt, time_steps, lazy_arrays=True)
    # through a file object that holds back an I/O error until HDF5 is done: h5py meeting a full disk
    # part-way crashes the process in its clean-up instead of raising (files.atomic.ErrorHoldingFile)
    with atomic_file(path) as f:
        write_streaming(f, graph, makers, compression="gzip", compression_opts=GZIP_LEVEL)


def lif_threshold(theta_int: np.ndarray, grid: np.ndarray, time_steps: int) -> np.ndarray:
    """theta - 2**-(grid + T + 1) per channel, exactly: (theta_int * 2**(T+1) - 1) * 2**-(grid+T+1)."""
    out = []
    for t, g in zip(np.asarray(theta_int).tolist(), np.asarray(grid).tolist()):
        mantissa = int(t) * 2 ** (time_steps + 1) - 1
        if abs(mantissa) >= 2 ** 53:
            raise DeployError(f"threshold {t} * 2**-{g} lowered for {time_steps} steps needs more than float64's "
                              "53 bits")
        out.append(math.ldexp(mantissa, -(int(g) + time_steps + 1)))
    return np.array(out, dtype=F64)


def float32_threshold(theta: float, lowered: float) -> float:
    """The one v_threshold of a LIF in the portable and norse profiles, whose consumers (snntorch, norse)
    compute in float32 and cast the threshold to float32: `lowered` (theta - 2**-(g+T+1), g the finest
    channel's grid) rounded up to a float32 value, or -- where no float32 lies in [lowered, theta) -- the
    float32 just below theta.

    What it guarantees. (1) Wherever the bit analysis finds the layer float32-exact, `lowered` is itself a
    float32 value and is returned unchanged: it has bits(theta_int) + T + 1 significant bits, and
    float32-exactness asks the layer's bound (at least theta_int) to need at most 24 bits with T more.
    There every exact membrane v reachable in T steps is a multiple of 2**-(g+T), so v > t <=> v >= theta
    (v >= theta gives v > t; v < theta gives v <= theta - 2**-(g+T) < t), for float32 and exact consumers
    alike. (2) Where the layer is not float32-exact (grid + T past 24 bits: the T = 16 DVS configs), the
    float32 just below theta p gives v32 > p <=> v32 >= theta for every float32 value v32: a float32
    consumer fires exactly as spikingjelly's float32 `>=` does on the membranes it computes, exact ties
    included. An exact membrane in (p, theta) -- one float32 cannot hold -- would fire there; no float32
    consumer can tell it from theta itself, and no single threshold serves float32 and exact consumers in
    such a layer (lowered would round to theta in float32 and every tie would be missed). Exact consumers
    take the standard profile: per-channel thresholds, exact in any arithmetic."""
    if float(np.float32(theta)) != theta:
        raise DeployError(f"threshold {theta!r} is not a float32 value")
    up = np.float32(lowered)
    if float(up) < lowered:
        up = np.nextafter(up, np.float32(np.inf))
    if float(up) >= theta:
        up = np.nextafter(np.float32(theta), np.float32(-np.inf))
    return float(up)


# ---------------------------------------------------------------- checks

def _profile(name: str) -> Profile:
    if name not in PROFILES:
        raise DeployError(f"NIR profile must be one of {', '.join(PROFILES)}, got {name!r}")
    return PROFILES[name]


def _check_exportable(g: Graph) -> None:
    for n in g.nodes:
        if isinstance(n, MaxPool):
            raise DeployError(f"{n.name} is a max-pool over currents, which has no exact NIR encoding; partition "
                              "the graph first (exporters.bundle.partition) and export its device part")
        if isinstance(n, (BatchNorm, SpatialMean)):
            raise DeployError(f"{n.name} ({n.op}) should have been removed by fold_bn/quantize")
        if isinstance(n, (KVProduct, QKVProduct)):
            raise DeployError(f"{n.name}: a product of two dynamic tensors ({n.op}), which no NIR node computes; "
                              "partition the graph first (exporters.bundle: the prefix to NIR, the rest on the host)")
        if type(n) not in _EMIT:
            raise DeployError(f"{n.name}: no NIR encoding for a {n.op} node")
        if isinstance(n, LIF) and (n.theta_int is None or n.grid is None):
            raise DeployError(f"{n.name}: NIR export needs every threshold on a grid (the exact thresholds come "
                              "from it): quantize the graph, or prepare a float graph with "
                              "sdt_deploy.quant.float_export.float_nir_graph")


# ---------------------------------------------------------------- the builder

class _Builder:
    """Collects NIR nodes and edges while walking the deploy graph in its (topological) order.

    `sources[name]` are the NIR nodes whose outputs, summed, are the deploy node's value (an Add is
    the concatenation of its inputs' sources: fan-in does the sum); `shapes[name]` is that value's
    NIR shape (a [C] value lives as [C, H, W] when broadcast to every token, or as [C, 1, 1])."""

    def __init__(self, g: Graph, profile: Profile, dt: float, T: int, lazy_arrays: bool = False):
        self.g, self.profile, self.dt, self.T = g, profile, dt, T
        self.lazy_arrays = lazy_arrays
        self.weight_makers: dict = {}
        self.nodes: dict = {}
        self.edges: list = []
        self.sources: dict = {}
        self.shapes: dict = {}
        self.readout = "mean"

    def add(self, name: str, node: nir.NIRNode, inputs: Sequence[str], **metadata) -> str:
        if name in self.nodes:
            raise DeployError(f"internal: NIR node name {name!r} used twice")
        node.metadata = _clean_metadata(metadata)
        self.nodes[name] = node
        for src in inputs:
            if (src, name) in self.edges:
                raise DeployError(f"{name}: the same value would enter twice ({src}); NIR edges cannot repeat")
            self.edges.append((src, name))
        return name

    def value(self, name: str, sources: Sequence[str], shape: Sequence[int]) -> None:
        self.sources[name] = tuple(sources)
        self.shapes[name] = tuple(int(s) for s in shape)

    def feed(self, n: Node, i: int = 0) -> tuple:
        return self.sources[n.inputs[i]]

    def shape_in(self, n: Node, i: int = 0) -> tuple:
        return self.shapes[n.inputs[i]]

    def weight(self, name: str, make, shape: tuple) -> np.ndarray:
        """The float64 weight of node `name`: `make()`, or with `lazy_arrays` a placeholder of its shape
        that holds no memory (a zero-strided view: nir's type check reads shapes alone), `make` kept to
        give the real array when the node is written."""
        if not self.lazy_arrays:
            return make()
        self.weight_makers[name] = make
        return np.broadcast_to(np.zeros((), F64), tuple(int(s) for s in shape))

    def spread(self, values, shape: tuple) -> np.ndarray:
        """A float64 array of `shape` holding a value (or a per-channel vector, channels first) at every
        position: a contiguous array, or with `lazy_arrays` a read-only view holding one copy of the
        values (the LIF parameters of SDT-8-768 are 300 MiB in full); written, it is the same array
        (nir's `to_dict` deep-copies a node's arrays, and a copy of a view is a full array)."""
        v = np.asarray(values, dtype=F64)
        if v.ndim:
            v = v.reshape((-1,) + (1,) * (len(shape) - 1))
        view = np.broadcast_to(v, tuple(int(s) for s in shape))
        return view if self.lazy_arrays else np.ascontiguousarray(view)

    def lif(self, shape: tuple, tau: float, v_threshold) -> nir.LIF:
        """nir.LIF(tau, r = 1, v_leak = 0, v_threshold, v_reset = 0) over the node's NIR shape."""
        return nir.LIF(tau=self.spread(tau, shape), r=self.spread(1.0, shape), v_leak=self.spread(0.0, shape),
                       v_threshold=self.spread(v_threshold, shape), v_reset=self.spread(0.0, shape))

    def threshold(self, name: str, theta: float, shape: tuple, inputs: Sequence[str], **metadata) -> str:
        """z = sum(inputs) > theta: a Threshold, or (portable) a memoryless LIF (tau = dt)."""
        if self.profile.threshold_as_lif:
            node = self.lif(shape, self.dt, theta)
        else:
            node = nir.Threshold(threshold=self.spread(theta, shape))
        return self.add(name, node, inputs, **metadata)


def _clean_metadata(meta: dict) -> dict:
    """Only what nir.write can store and nir.read gives back: no None, strings as str, numbers as numpy."""
    out = {}
    for k, v in meta.items():
        if v is None:
            continue
        if isinstance(v, (list, tuple)):
            v = np.asarray(v)
        if isinstance(v, np.ndarray) and v.dtype.kind not in "biuf":
            raise DeployError(f"internal: metadata {k!r} has dtype {v.dtype}")
        out[k] = v
    return out


def _spike_meta(n: Node) -> dict:
    return {"sdt_layer": n.name, "sdt_shape": np.asarray(n.shape, dtype=np.int64)}


# ---------------------------------------------------------------- structural kernels

def _diagonal_ones(c: int, kh: int, kw: int, name: str) -> np.ndarray:
    """[C, C, kh, kw]: channel c reads only channel c, all taps 1 (a sum pool as a dense conv)."""
    if c * c * kh * kw > PORTABLE_MAX_KERNEL:
        raise DeployError(f"{name}: the portable profile's dense {c}x{c}x{kh}x{kw} pooling kernel is too large; "
                          "use the standard profile")
    w = np.zeros((c, c, kh, kw), dtype=np.float32)
    w[np.arange(c), np.arange(c)] = 1.0
    return w


def head_channel_matrix(c: int, heads: int) -> np.ndarray:
    """0/1 [C, C]: output channel o reads the channels o-1, o, o+1 of its own head (c = head*C/heads + j)."""
    idx = np.arange(c)
    same_head = (idx[:, None] // (c // heads)) == (idx[None, :] // (c // heads))
    return (same_head & (np.abs(idx[:, None] - idx[None, :]) <= 1)).astype(np.float32)


def token_neighbour_kernel(w: int) -> np.ndarray:
    """Square (K, K), K = max(3, 2W-1), centre (K-1)/2: ones at the offsets of n-1, n, n+1 for the token
    index n = y*W + x with padding (K-1)/2: (0,-1), (0,0), (0,1) in the row, (-1, W-1) for n-1 of x = 0
    and (+1, -(W-1)) for n+1 of x = W-1. Wrong-row taps only ever meet padding."""
    k = max(3, 2 * w - 1)
    c = (k - 1) // 2
    kern = np.zeros((k, k), dtype=np.float32)
    for dy, dx in ((0, -1), (0, 0), (0, 1), (-1, w - 1), (1, -(w - 1))):
        kern[c + dy, c + dx] = 1.0
    return kern


def _wrap_masks(c: int, h: int, w: int, direction: str, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(M_in, M_out) of one mod-3 chain of the heads pool's wrapped neighbour (see module docstring)."""
    y = np.arange(h)[:, None]
    x = np.arange(w)[None, :]
    if direction == "prev":     # (y, 0) takes (y-1, W-1)
        m_in = (y % 3 == k) & (x == w - 1)
        m_out = ((y - 1) % 3 == k) & (x == 0)
    else:                       # (y, W-1) takes (y+1, 0)
        m_in = (y % 3 == k) & (x == 0)
        m_out = ((y + 1) % 3 == k) & (x == w - 1)
    spread = lambda m: np.ascontiguousarray(np.broadcast_to(m.astype(F64), (c, h, w)))  # noqa: E731
    return spread(m_in), spread(m_out)


def _sumpool(kernel, stride, padding) -> nir.SumPool2d:
    arr = lambda v: np.asarray(v, dtype=np.int64)  # noqa: E731
    return nir.SumPool2d(kernel_size=arr(kernel), stride=arr(stride), padding=arr(padding))


def _conv(weight: np.ndarray, in_hw: tuple, stride: int = 1, padding=0, bias: Optional[np.ndarray] = None):
    bias = np.zeros(weight.shape[0], dtype=weight.dtype) if bias is None else bias
    return nir.Conv2d(input_shape=tuple(int(s) for s in in_hw), weight=weight, stride=int(stride),
                      padding=(int(padding), int(padding)) if np.isscalar(padding) else tuple(padding),
                      dilation=1, groups=1, bias=bias)


# ---------------------------------------------------------------- emitters (one per deploy op)

def _emit_input(b: _Builder, n: Input) -> None:
    meta = {"role": "input", "grid": None if n.grid is None else np.asarray(n.grid, dtype=np.int64)}
    if n.bits is not None:
        meta.update(bits=int(n.bits), rounding="x_nir = clip(round_half_even(x * 2**grid), -2**(bits-1), "
                                              "2**(bits-1) - 1) * 2**-grid, done by the host")
    else:
        meta.update(rounding="none: the host part's output, exactly on the per-channel grid")
    b.add(n.name, nir.Input(input_type=np.asarray(n.shape, dtype=np.int64)), (), **meta)
    b.value(n.name, (n.name,), n.shape)


def dense_from_grouped(weight: np.ndarray, groups: int) -> np.ndarray:
    """The [O, C, k, k] weight of an ungrouped convolution that computes the grouped one exactly: each
    group's block where it is, zeros elsewhere (nir 1.0.8 type-checks only ungrouped convolutions)."""
    O, Cg, kh, kw = weight.shape
    Og = O // groups
    dense = np.zeros((O, Cg * groups, kh, kw), dtype=weight.dtype)
    for gi in range(groups):
        dense[gi * Og:(gi + 1) * Og, gi * Cg:(gi + 1) * Cg] = weight[gi * Og:(gi + 1) * Og]
    return dense


def _emit_conv(b: _Builder, n: Conv) -> None:
    c_in, h, w = b.shape_in(n)
    kh, kw = n.weight_shape[2:]
    if kh != kw:
        raise DeployError(f"{n.name}: nir 1.0.8 type-checks only square convolutions (kernel {kh}x{kw})")
    source = b.g[n.inputs[0]]
    role = "synapse" if source.out_kind == SPIKE else ("encoder" if isinstance(source, Input) else "synapse.current")
    shape = (n.weight_shape[0], c_in, kh, kw)
    meta = {}
    if n.groups == 1:
        make = lambda: n.float_weight(F64)          # noqa: E731
    else:     # V2's depthwise convolutions: the exact dense equivalent (groups x the weights, zeros elsewhere)
        make = lambda: dense_from_grouped(n.float_weight(F64), n.groups)   # noqa: E731
        meta = {"groups": int(n.groups), "encoding": "grouped convolution as its dense equivalent (zero blocks)"}
    node = _conv(b.weight(n.name, make, shape), (h, w), n.stride, n.padding,
                 None if n.bias is None else np.asarray(n.bias, dtype=F64))
    b.add(n.name, node, b.feed(n), role=role, w_int=n.w_int, w_exp=n.w_exp, b_int=n.b_int, grid=n.grid, **meta)
    b.value(n.name, (n.name,), n.shape)


def _emit_linear(b: _Builder, n: Linear) -> None:
    src_shape = b.shape_in(n)
    meta = dict(role="synapse", w_int=n.w_int, w_exp=n.w_exp, b_int=n.b_int, grid=n.grid)
    out_features, in_features = n.weight_shape
    bias = np.zeros(out_features) if n.bias is None else np.asarray(n.bias, dtype=F64)
    sources = b.feed(n)
    if b.profile.flat_head:
        if len(src_shape) == 3:       # [C, 1, 1] -> [C]
            sources = (b.add(f"{n.name}.flatten", nir.Flatten(input_type=np.asarray(src_shape, dtype=np.int64),
                                                              start_dim=0, end_dim=-1), sources, role="flatten"),)
        weight = b.weight(n.name, lambda: n.float_weight(F64), (out_features, in_features))
        b.add(n.name, nir.Affine(weight=weight, bias=bias), sources, **meta)
        b.value(n.name, (n.name,), n.shape)
    else:                             # 1x1 Conv2d on [C, 1, 1]: no Flatten for importers that mis-map it
        if src_shape[1:] != (1, 1):
            raise DeployError(f"{n.name}: the portable head expects a [C, 1, 1] input, got {list(src_shape)}")
        weight = b.weight(n.name, lambda: n.float_weight(F64)[:, :, None, None], (out_features, in_features, 1, 1))
        b.add(n.name, _conv(weight, (1, 1), bias=bias), sources, **meta)
        b.value(n.name, (n.name,), tuple(n.shape) + (1, 1))


def _emit_lif(b: _Builder, n: LIF) -> None:
    if n.v_reset != 0.0:
        raise DeployError(f"{n.name}: NIR export needs v_reset = 0 (got {n.v_reset})")
    shape = b.shape_in(n)
    grid = np.asarray(n.grid, dtype=np.int64)
    theta_int = np.asarray(n.theta_int, dtype=np.int64)
    theta = theta_int * np.exp2(-grid.astype(F64))
    if not np.all(theta == float(n.v_threshold)):
        raise DeployError(f"{n.name}: theta_int * 2**-grid differs from v_threshold {n.v_threshold}")
    if b.profile.per_channel_threshold:
        v_th = lif_threshold(theta_int, grid, b.T)
        exp = grid + b.T + 1
    else:                             # one value for all channels: the finest channel's margin
        top = int(np.argmax(grid))
        lowered = lif_threshold(theta_int[top:top + 1], grid[top:top + 1], b.T)[0]
        v_th = np.full(grid.shape, float32_threshold(float(n.v_threshold), lowered))
        exp = np.int64(grid[top] + b.T + 1)
    # tau * dt: a quantized graph's tau is 2, and 2*dt makes dt/tau exactly 0.5; a float export keeps a
    # PLIF's trained tau
    tau = float(n.tau) * b.dt
    node = b.lif(shape, tau, v_th)
    b.add(n.name, node, b.feed(n), role="neuron", grid=grid, theta_int=theta_int, threshold_exp=exp,
          **_spike_meta(n))
    b.value(n.name, (n.name,), shape)


def _emit_and(b: _Builder, n: And) -> None:
    shapes = {b.shapes[i] for i in n.inputs}
    if len(shapes) != 1:
        raise DeployError(f"{n.name}: AND of differently shaped spikes {sorted(shapes)}")
    (shape,) = shapes
    b.threshold(n.name, 1.5, shape, b.feed(n, 0) + b.feed(n, 1), role="and", **_spike_meta(n))
    b.value(n.name, (n.name,), shape)


def _emit_orpool(b: _Builder, n: OrPool) -> None:
    if n.layout == "heads":
        (_heads_pool_portable if b.profile.pools_as_conv else _heads_pool_standard)(b, n)
    else:
        c, h, w = b.shape_in(n)
        if b.profile.pools_as_conv:
            pool = _conv(_diagonal_ones(c, n.kernel, n.kernel, n.name), (h, w), n.stride, n.padding)
        else:
            pool = _sumpool((n.kernel, n.kernel), (n.stride, n.stride), (n.padding, n.padding))
        s = b.add(f"{n.name}.sum", pool, b.feed(n), role="or_pool.sum")
        b.threshold(n.name, 0.5, tuple(n.shape), (s,), role="or_pool", **_spike_meta(n))
    b.value(n.name, (n.name,), n.shape)


def _heads_pool_standard(b: _Builder, n: OrPool) -> None:
    c, h, w = n.shape
    p = n.name
    token_terms = [b.add(f"{p}.row", _sumpool((1, 3), (1, 1), (0, 1)), b.feed(n), role="heads_pool.row")]
    for direction in ("prev", "next"):
        for k in range(3):
            m_in, m_out = _wrap_masks(c, h, w, direction, k)
            base = f"{p}.wrap_{direction}{k}"
            b.add(f"{base}.in", nir.Scale(scale=m_in), b.feed(n), role="heads_pool.wrap")
            b.add(f"{base}.sum", _sumpool((3, 2 * w - 1), (1, 1), (1, w - 1)), (f"{base}.in",),
                  role="heads_pool.wrap")
            token_terms.append(b.add(f"{base}.out", nir.Scale(scale=m_out), (f"{base}.sum",),
                                     role="heads_pool.wrap"))
    tokens = b.threshold(f"{p}.tokens", 0.5, (c, h, w), token_terms, role="heads_pool.tokens")
    a = head_channel_matrix(c, n.heads).astype(F64)[:, :, None, None]
    ch = b.add(f"{p}.channels", _conv(a, (h, w)), (tokens,), role="heads_pool.channels")
    b.threshold(p, 0.5, (c, h, w), (ch,), role="heads_pool", **_spike_meta(n))


def _heads_pool_portable(b: _Builder, n: OrPool) -> None:
    c, h, w = n.shape
    kern = token_neighbour_kernel(w)
    k = kern.shape[0]
    if c * c * k * k > PORTABLE_MAX_KERNEL:
        raise DeployError(f"{n.name}: the portable profile's dense {c}x{c}x{k}x{k} heads-pool kernel is too large; "
                          "use the standard profile")
    weight = head_channel_matrix(c, n.heads)[:, :, None, None] * kern[None, None]
    s = b.add(f"{n.name}.sum", _conv(weight, (h, w), padding=(k - 1) // 2), b.feed(n), role="heads_pool.sum")
    b.threshold(n.name, 0.5, (c, h, w), (s,), role="heads_pool", **_spike_meta(n))


def _broadcast_token_sum(g: Graph, n: TokenSum) -> bool:
    """True when the sum only feeds LIFs whose spikes are only broadcast back to the tokens (SDSA's
    kv_sum -> talking_heads_lif -> broadcast): then the sum is computed at every token already."""
    lifs = g.consumers(n.name)
    return bool(lifs) and all(isinstance(m, LIF) and g.consumers(m.name)
                              and all(isinstance(k, Broadcast) for k in g.consumers(m.name)) for m in lifs)


def _emit_tokensum(b: _Builder, n: TokenSum) -> None:
    c, h, w = b.shape_in(n)
    if _broadcast_token_sum(b.g, n):
        if b.profile.pools_as_conv:
            k = max(2 * h - 1, 2 * w - 1)
            pool = _conv(_diagonal_ones(c, k, k, n.name), (h, w), padding=(k - 1) // 2)
        else:
            pool = _sumpool((2 * h - 1, 2 * w - 1), (1, 1), (h - 1, w - 1))
        shape = (c, h, w)
    else:
        if b.profile.pools_as_conv:
            if h != w:
                raise DeployError(f"{n.name}: the portable token sum needs a square token grid, got {h}x{w}")
            pool = _conv(_diagonal_ones(c, h, w, n.name), (h, w))
        else:
            pool = _sumpool((h, w), (h, w), (0, 0))
        shape = (c, 1, 1)
    b.add(n.name, pool, b.feed(n), role="token_sum", grid=n.grid)
    b.value(n.name, (n.name,), shape)


def _emit_broadcast(b: _Builder, n: Broadcast) -> None:
    src = n.inputs[0]
    if b.shapes[src] != tuple(n.shape):
        raise DeployError(f"{n.name}: broadcast of {src}, which is not computed at every token "
                          f"({list(b.shapes[src])} vs {list(n.shape)})")
    b.value(n.name, b.sources[src], n.shape)


def _emit_add(b: _Builder, n: Add) -> None:
    shapes = {b.shapes[i] for i in n.inputs}
    if len(shapes) != 1:
        raise DeployError(f"{n.name}: sum of differently shaped currents {sorted(shapes)}")
    sources = tuple(s for i in n.inputs for s in b.sources[i])
    if len(set(sources)) != len(sources):
        raise DeployError(f"{n.name}: a current would enter the sum twice; NIR edges cannot repeat")
    b.value(n.name, sources, shapes.pop())


def _emit_readout(b: _Builder, n: Readout) -> None:
    shape = b.shape_in(n)
    b.add(OUTPUT, nir.Output(output_type=np.asarray(shape, dtype=np.int64)), b.feed(n), role="output",
          readout=n.mode)
    b.readout = n.mode
    b.value(n.name, (OUTPUT,), shape)


def _emit_kd_readout(b: _Builder, n: KdReadout) -> None:
    """V2 with kd: both heads' edges into `Scale(0.5)` (exact), whose value is the per-step output; the mean
    over T stays with the host, as for `Readout`."""
    shapes = {b.shapes[i] for i in n.inputs}
    if len(shapes) != 1:
        raise DeployError(f"{n.name}: heads of different shapes {sorted(shapes)}")
    shape = shapes.pop()
    half = b.add(f"{n.name}.mean_of_heads", nir.Scale(scale=np.full(shape, 0.5, dtype=F64)),
                 b.feed(n, 0) + b.feed(n, 1), role="kd_mean")
    b.add(OUTPUT, nir.Output(output_type=np.asarray(shape, dtype=np.int64)), (half,), role="output", readout=n.mode)
    b.readout = n.mode
    b.value(n.name, (OUTPUT,), shape)


def _emit_prefix_output(b: _Builder, n: Node) -> None:
    """The output of a partition's prefix (V2: the residual stream at the cut, a current), per step."""
    shape = b.shapes[n.name]
    b.add(OUTPUT, nir.Output(output_type=np.asarray(shape, dtype=np.int64)), b.sources[n.name], role="output",
          readout="none", grid=n.grid)
    b.readout = "none"


_EMIT = {Input: _emit_input, Conv: _emit_conv, Linear: _emit_linear, LIF: _emit_lif, And: _emit_and,
         OrPool: _emit_orpool, TokenSum: _emit_tokensum, Broadcast: _emit_broadcast, Add: _emit_add,
         Readout: _emit_readout, KdReadout: _emit_kd_readout}


# ---------------------------------------------------------------- depth-first safety (norse profile)

def _topological_ranks(nodes: dict, edges: list) -> dict:
    """Kahn's order, ties broken by creation order: {name: rank}."""
    creation = {name: i for i, name in enumerate(nodes)}
    preds = {name: set() for name in nodes}
    succs = {name: set() for name in nodes}
    for src, dst in edges:
        preds[dst].add(src)
        succs[src].add(dst)
    waiting = {name: len(p) for name, p in preds.items()}
    ready = sorted((n for n, k in waiting.items() if k == 0), key=creation.get)
    order = []
    while ready:
        name = ready.pop(0)
        order.append(name)
        for nxt in succs[name]:
            waiting[nxt] -= 1
            if waiting[nxt] == 0:
                ready.append(nxt)
        ready.sort(key=creation.get)
    if len(order) != len(nodes):
        raise DeployError("internal: the NIR graph has a cycle")
    return {name: i for i, name in enumerate(order)}


def _ancestors(nodes: dict, edges: list, ranks: dict) -> dict:
    preds = {name: set() for name in nodes}
    for src, dst in edges:
        preds[dst].add(src)
    anc: dict = {}
    for name in sorted(nodes, key=ranks.get):
        anc[name] = set().union(*(anc[p] | {p} for p in preds[name])) if preds[name] else set()
    return anc


def _make_depth_first_safe(b: _Builder) -> None:
    """Make the graph exact under a depth-first executor (nirtorch 2.6's `nirtorch.load`, which
    `norse.torch.from_nir` uses): it runs the nodes in the pre-order of a depth-first walk from the input,
    children in edge order, and a node reached before one of its inputs reads that input from the previous
    step (or drops it at step 0). Such a pre-order lists every node after all its inputs exactly when
    (1) the inputs of every node lie on one chain of ancestry and (2) each node's outgoing edges are
    listed in topological order of their targets (then, before the edge into a join is followed, the
    walk has already passed through the join's later inputs; DESIGN.md-style proof in docs/nir-interop.md).

    SDT's attention has two joins whose inputs are parallel branches: k AND v (k_lif, v_lif -- or their
    dvs pools) and q AND talking heads (q_lif, talking_heads_lif). For each such pair (a, b) a *zero
    synapse* -- a 1x1 Conv2d with all-zero weights and bias, role `sequencing` -- goes from a into the
    first node r of b's branch (a node whose own inputs all precede a): r's input becomes x + 0, exactly
    x, and a becomes an ancestor of b. Then every edge list is put in topological order of its targets.
    Any topological order ends with the Output (the only sink), which nirtorch.load returns as the
    module's output."""
    while True:
        ranks = _topological_ranks(b.nodes, b.edges)
        anc = _ancestors(b.nodes, b.edges, ranks)
        preds = {name: [] for name in b.nodes}
        for src, dst in b.edges:
            preds[dst].append(src)
        pair = None
        for name in sorted(b.nodes, key=ranks.get):
            chain = sorted(set(preds[name]), key=ranks.get)
            for a, later in zip(chain, chain[1:]):
                if a not in anc[later]:
                    pair = (a, later)
                    break
            if pair:
                break
        if pair is None:
            break
        a, later = pair
        before_a = anc[a] | {a}
        candidates = [r for r in anc[later] | {later}
                      if r not in before_a and preds[r] and all(p in before_a for p in preds[r])]
        if not candidates:
            raise DeployError(f"internal: no node on {later}'s branch can be sequenced after {a}")
        r = min(candidates, key=ranks.get)
        _add_zero_synapse(b, a, r)
    ranks = _topological_ranks(b.nodes, b.edges)
    b.edges.sort(key=lambda e: (ranks[e[0]], ranks[e[1]]))


def _nir_shape(t: dict) -> tuple:
    (v,) = t.values()
    return tuple(int(s) for s in np.asarray(v).ravel())


def _add_zero_synapse(b: _Builder, a: str, r: str) -> None:
    src = _nir_shape(b.nodes[a].output_type)
    dst = _nir_shape(b.nodes[r].input_type)
    if len(src) != 3 or len(dst) != 3 or src[1:] != dst[1:]:
        raise DeployError(f"internal: cannot sequence {a} {list(src)} before {r} {list(dst)} with a 1x1 Conv2d")
    name = f"{r}.after.{a.rsplit('.', 1)[-1]}"
    zero = _conv(np.zeros((dst[0], src[0], 1, 1), dtype=F64), src[1:])
    b.add(name, zero, (a,), role="sequencing",
          note=f"all-zero weights and bias: adds exactly 0 to {r}'s input; it makes {a} an ancestor of {r}, "
               "so that a depth-first executor (nirtorch.load, norse.torch.from_nir) runs every join after "
               "all its inputs")
    b.edges.append((name, r))


# ---------------------------------------------------------------- graph metadata

_LOADERS = {
    "standard": "nir.read(path) (nir >= 1.0.8); measured with sdt-deploy's own NIR interpreter. Third-party "
                "simulators: export with --nir-profile portable (snntorch) or norse",
    "portable": "snntorch 1.0: snntorch.import_nir.import_from_nir(nir.read(path)) (snntorch's fixed dt = 1e-4 "
                "is this graph's dt), called once per step",
    "norse": PROFILES["norse"].target,
}


def readout_rule(mode: str, T: int, flat_head: bool) -> str:
    if mode == "none":
        return (f"run the graph for exactly time_steps = {T} steps, one input frame per step; output[t] is the "
                "current at the cut, which the host part of the partition reads at step t")
    """How the logits are formed from the per-step `Output` (graph metadata `readout_rule`)."""
    shape = "[K]" if flat_head else "[K, 1, 1], flattened to [K]"
    steps = (f"run the graph for exactly time_steps = {T} steps (its thresholds are exact for up to {T}), "
             f"one input frame per step; output[t] is the Output node's value at step t, {shape}")
    if mode == "per_step":
        return (f"{steps}. readout = per_step (TET): the logits are the {T} per-step values output[0..{T - 1}] "
                f"themselves, [T, K] per sample; the class is the argmax of their mean over the {T} steps")
    return (f"{steps}. readout = mean: logits = (output[0] + ... + output[{T - 1}]) / {T}, the mean over the "
            f"{T} steps, computed by the host after the last step")

def _graph_metadata(b: _Builder) -> dict:
    meta = b.g.meta
    return {
        "producer": f"sdt-deploy {__version__}",
        "profile": b.profile.name,
        "dt": b.dt,
        "time_steps": b.T,
        "readout": b.readout,
        "input": b.g.input.name,
        "output": OUTPUT,
        "partition": str(meta.get("partition", "whole")),
        "cut": str(meta.get("cut", "")),
        "readout_rule": readout_rule(b.readout, b.T, b.profile.flat_head),
        "loader": _LOADERS[b.profile.name],
        "threshold_rule": "v_threshold = theta - 2**-(grid + time_steps + 1): NIR's v > v_threshold equals "
                          "spikingjelly's v >= theta for every membrane reachable in time_steps steps",
        "sdt_config": json.dumps(meta.get("config", {}), sort_keys=True, default=json_default),
        "sdt_quantization": json.dumps(settings_of(meta), sort_keys=True, default=json_default),
        "sdt_provenance": json.dumps(meta.get("provenance", {}), sort_keys=True, default=json_default),
        "sdt_graph_meta": json.dumps({k: v for k, v in meta.items() if k != "config"}, sort_keys=True,
                                     default=json_default),
    }
