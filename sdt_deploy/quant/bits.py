"""Bit-width analysis of a quantized deploy graph.

For every current and every LIF: its grid, the worst-case magnitude of its integer (from the weights,
the input range and T — every input spiking, every weight adding up with the same sign), and what that
means for the two arithmetic sides of the contract:

- the integer side: bits needed for the integer (sign included; a LIF's V + X, formed before the
  halving, counts twice its bound); int32 suffices up to 32, the engine uses int64 and refuses at 63;
- the float32 side: the exact value of a LIF's H has one more fractional bit per time step (tau = 2
  halves), so float32 — the quantized PyTorch model on CPU or with the CuPy kernel — represents every
  value exactly only while `bits(bound) + T < 25` (24-bit significand). Where a layer passes that, float32
  may round and the integer engine is the exact side; `verify` then uses float64 for the torch reference.
"""
from __future__ import annotations

import math

import numpy as np

from sdt_deploy.errors import DeployError
from sdt_deploy.ir.graph import (
    CURRENT,
    LIF,
    Add,
    And,
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
    TokenSum,
)

FLOAT32_SIGNIFICAND = 24
# The one overflow limit of the integer side, shared by the engine, the bit report and the ONNX exporter:
# int64 holds magnitudes below 2**63.
INT64_LIMIT = 2 ** 63


def working_magnitude(n, bound: float) -> float:
    """The largest magnitude a node's integer arithmetic forms: a LIF's V + X (up to twice its state's bound)
    before the halving; every other node's result (partial sums stay within the bound of the whole)."""
    return 2 * bound if isinstance(n, LIF) else bound


def fits_int64(magnitude: float) -> bool:
    return magnitude < INT64_LIMIT


def _bits(bound: float) -> int:
    """Signed bits to hold integers of magnitude <= bound."""
    return int(math.ceil(math.log2(bound + 1))) + 1 if bound > 0 else 1


def node_bounds(qg: Graph) -> dict:
    """Worst-case |integer| per node (max over channels), for currents and LIF states."""
    return {k: float(v.max()) for k, v in channel_bounds(qg).items()}


def _input_bound(n: Input, src, b: dict, qg: Graph) -> np.ndarray:
    if n.bits is None:   # a partition's cut: the bound it had in the whole graph
        return np.asarray(qg.meta["cut_bound"], dtype=np.float64)
    return np.full(n.shape[0], float(2 ** (n.bits - 1)))


def _per_channel_input_bound(n, src, b: dict) -> np.ndarray:
    """sum over inputs of |w_int| x the input's bound on the group's grid, per output channel: a
    convolution reading a current whose channels differ in grid or bound (V2: after a depthwise
    convolution, and the depthwise convolution itself)."""
    from sdt_deploy.quant.contract import input_shift

    O = n.w_int.shape[0]
    groups = int(getattr(n, "groups", 1))
    w = np.abs(n.w_int.astype(np.float64)).reshape(O, n.w_int.shape[1], -1).sum(axis=2)   # [O, C/groups]
    shifted = b[src.name] * np.exp2(input_shift(n, src.grid).astype(np.float64))           # [C]
    per_group = shifted.reshape(groups, -1)                                               # [groups, C/groups]
    return (w.reshape(groups, O // groups, -1) * per_group[:, None, :]).sum(axis=2).reshape(O)


def _synaptic_bound(n, src, b: dict, qg: Graph) -> np.ndarray:
    if src[0].out_kind == CURRENT and not (isinstance(src[0], Input) and int(getattr(n, "groups", 1)) == 1):
        return _per_channel_input_bound(n, src[0], b) + np.abs(n.b_int.astype(np.float64))
    # sum of |w_int| per output channel (int8 widened to int16, which holds |-128|, not float64: a
    # quarter of the memory traffic on 66M weights)
    w = n.w_int.reshape(n.w_int.shape[0], -1)
    w = np.abs(w.astype(np.int16 if w.dtype == np.int8 else np.float64)).sum(axis=1, dtype=np.float64)
    if src[0].out_kind == CURRENT:   # encoder: the input's largest integer times every tap
        acc = w * float(b[src[0].name].max())
    else:                            # spikes: every input spiking
        acc = w
    return acc + np.abs(n.b_int.astype(np.float64))


def _token_sum_bound(n: TokenSum, src, b: dict, qg: Graph) -> np.ndarray:
    tokens = int(np.prod(src[0].shape[1:]))
    return (b[src[0].name] if src[0].out_kind == CURRENT else np.ones(n.shape[0])) * tokens


def _add_bound(n: Add, src, b: dict, qg: Graph) -> np.ndarray:
    total = np.zeros(n.shape[0])
    for s in src:
        total += b[s.name] * np.exp2(n.grid - s.grid)
    return total


def _lif_bound(n: LIF, src, b: dict, qg: Graph) -> np.ndarray:
    if src[0].out_kind == CURRENT:
        xb = b[src[0].name] * np.exp2(n.grid - src[0].grid)
    else:
        xb = np.exp2(n.grid.astype(np.float64))
    # |H| <= max(|V|, |X|) by induction (H is the mean of V and X; reset gives 0)
    return np.maximum(xb, n.theta_int.astype(np.float64))


def _input_kept(n, src, b: dict, qg: Graph) -> np.ndarray:
    if src[0].out_kind != CURRENT:      # a read-out of spikes (a V2 model without a head)
        return np.ones(n.shape[0])
    return b[src[0].name]


def _kv_bound(n: KVProduct, src, b: dict, qg: Graph) -> np.ndarray:
    """A count of coincidences over the N tokens: at most N."""
    return np.full(n.shape[0], float(np.prod(src[0].shape[1:])))


def _qkv_bound(n: QKVProduct, src, b: dict, qg: Graph) -> np.ndarray:
    """q selects up to d rows of kv, each entry at most its bound (N): d N."""
    d = int(src[1].shape[1])
    return np.full(n.shape[0], float(d * b[src[1].name].max()))


def _kd_readout_bound(n: KdReadout, src, b: dict, qg: Graph) -> np.ndarray:
    """head + head_kd, each shifted onto the node's grid less the halving step."""
    return sum(b[s.name] * np.exp2(n.grid - 1 - s.grid) for s in src)


# each node type's worst-case |integer| per channel: fn(node, its sources, bounds so far, graph); spike
# nodes (AND, OR-pool, broadcast) carry 0/1 and have no bound
BOUNDS = {Input: _input_bound, Conv: _synaptic_bound, Linear: _synaptic_bound, MaxPool: _input_kept,
          TokenSum: _token_sum_bound, Add: _add_bound, LIF: _lif_bound, Readout: _input_kept,
          KVProduct: _kv_bound, QKVProduct: _qkv_bound, KdReadout: _kd_readout_bound}
SPIKES_ONLY = (And, OrPool, Broadcast)


def channel_bounds(qg: Graph) -> dict:
    """Worst-case |integer| per channel for every current node and every LIF state."""
    b: dict[str, np.ndarray] = {}
    for n in qg.nodes:
        rule = BOUNDS.get(type(n))
        if rule is None:
            if isinstance(n, SPIKES_ONLY):
                continue
            raise DeployError(f"no bound rule for {n.name} ({n.op})")
        b[n.name] = rule(n, [qg[i] for i in n.inputs], b, qg)
    return b


def bit_report(qg: Graph, observed: dict | None = None) -> dict:
    """Per layer: grid range, worst-case bound and bits, float32 exactness; overall verdicts."""
    T = int(qg.meta["time_steps"])
    bounds = channel_bounds(qg)
    layers = []
    for n in qg.nodes:
        if n.name not in bounds or isinstance(n, (Input, Readout)):
            continue
        bound = float(bounds[n.name].max())
        lif = isinstance(n, LIF)
        # the integer LIF forms V + X (up to twice the bound) before halving it
        int_bits = _bits(working_magnitude(n, bound))
        # a LIF's exact H carries T more fractional bits; other currents are exact integers on their grid
        f32_bits = _bits(bound) + (T if lif else 0)
        row = {"name": n.name, "op": n.op, "grid_min": int(np.min(n.grid)), "grid_max": int(np.max(n.grid)),
               "bound": bound, "int_bits": int_bits, "float32_bits": f32_bits,
               "float32_exact": f32_bits <= FLOAT32_SIGNIFICAND + 1, "fits_int32": int_bits <= 32,
               "fits_int64": fits_int64(working_magnitude(n, bound))}
        if observed and n.name in observed:
            obs = float(observed[n.name])
            row["observed"] = obs
            row["observed_bits"] = _bits(obs)
            row["observed_float32_bits"] = _bits(obs) + (T if isinstance(n, LIF) else 0)
        layers.append(row)
    worst_f32 = max(r["float32_bits"] for r in layers)
    worst_int = max(r["int_bits"] for r in layers)
    summary = {
        "time_steps": T,
        "max_int_bits": worst_int,
        "max_float32_bits": worst_f32,
        "float32_exact": all(r["float32_exact"] for r in layers),
        "int32_accumulators": worst_int <= 32,
        "engine_int64_ok": all(r["fits_int64"] for r in layers),
        "exact_side": ("both: float32 and the integer engine are exact"
                       if all(r["float32_exact"] for r in layers) else
                       "the integer engine (int64) is exact; float32 may round in the layers marked, so the "
                       "torch reference runs in float64 there"),
    }
    return {"summary": summary, "layers": layers}


def check_engine_bounds(qg: Graph) -> dict:
    """Refuse a graph whose worst-case integers need more than int64; returns the bounds per node."""
    bounds = node_bounds(qg)
    for name, b in bounds.items():
        magnitude = working_magnitude(qg[name], b)
        if not fits_int64(magnitude):
            raise DeployError(f"{name}: worst-case integer magnitude 2**{np.log2(magnitude):.1f} exceeds the "
                              "engine's int64; refusing rather than risking a wrap-around")
    return bounds
