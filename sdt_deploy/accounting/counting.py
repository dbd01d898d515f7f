"""The operation and energy report: what every layer of an SDT computes, counted two ways.

- *paper*: the SDT paper's convention (Yao et al., NeurIPS 2023, appendix): `E = E_MAC * FL_conv1 +
  E_AC * sum(SOP)`, `SOP = input firing rate * T * FLOPs`, FLOPs of a conv `k^2 * h_out * w_out * c_in *
  c_out` (padding included), of a linear `i * o`; the encoder conv counted as MAC with its FLOPs once
  for a static image (repeated unchanged over T) and FLOPs * T for event frames.
  Conv and linear layers only, as the paper's formula.
- *measured*: what the integer engine (`engine.run_engine`) really performed on the given inputs:
  synaptic additions (nonzero input events x the kernel taps each reaches, padding excluded, x c_out),
  the encoder's MACs over valid taps, bias adds, the SDSA's ANDs and token-sum increments, OR-pool
  inputs, max-pool comparisons, residual adds and neuron updates. The per-layer counts are recomputed
  here from the spikes and the graph and must agree with the engine's own counters exactly.
  For the float model (`report --float`) the same rules count its own spikes on its BN-folded deploy
  graph; no engine runs, and the report says which model was counted (`model.counted`).
- *ann*: the dense ANN of the same architecture (every conv/linear as MAC, vanilla softmax attention in
  place of the SDSA), the baseline the paper compares against.

Everything here is a small pure function over plain data: the graph, spike counts (`SpikeTally`), op
counts (`{layer: {op: count}}`) and an `EnergyTable`. `operation_report` is the one driver that runs the
engine over batches (`report.measure`); the command line only prepares inputs and renders.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Optional

import numpy as np

from sdt_deploy.accounting.energy import EnergyTable
from sdt_deploy.errors import DeployError
from sdt_deploy.ir.graph import (
    LIF,
    SPIKE,
    SYNAPTIC,
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
    Node,
    OrPool,
    QKVProduct,
    Readout,
    SpatialMean,
    TokenSum,
)

# ---- what each layer is ----

KIND_ENCODER = "encoder MAC"
KIND_SYNAPTIC = "synaptic AC"
KIND_AND = "SDSA AND"
KIND_TOKEN_SUM = "SDSA token sum"
KIND_HEAD_SUM = "head token sum"
KIND_OR_POOL = "OR-pool"
KIND_MAX_POOL = "max-pool on currents"
KIND_RESIDUAL = "residual add"
KIND_NEURON = "neuron update"
# SDT V2 (Meta-SpikeFormer)
KIND_CURRENT_MAC = "MAC on a current"          # a conv reading a real value other than the image
KIND_ATTN_AC = "attention AC"                  # kv = k^T v: binary x binary, one increment per coincidence
KIND_ATTN_INT_AC = "attention integer AC"      # q kv: integers selected by spikes, one add per entry

# Nodes that do no arithmetic (listed in the convention notes, not as rows).
FREE_NODES = (Input, Broadcast, Readout, BatchNorm, BNPad)

# Measured operation -> the energy-table entry that prices it.
MEASURED_PRICE = {
    "mac": "mac",                 # encoder: real value x weight
    "ac": "ac",                   # synaptic: one weight added per (input event, tap, output channel)
    "int_ac": "ac",               # V2 q kv: an integer of kv added where a query spike selects it
    "bias_add": "add",            # the folded bias, added once per output value
    "and": "bitop",               # spike AND spike
    "or": "bitop",                # an input event of an OR-pool
    "compare": "compare",         # max-pool of currents
    "count": "ac",                # token sum of spikes: one counter increment per spike
    "add": "add",                 # currents added: residual stream, token sum of currents
    "neuron_update": "neuron_update",
}
ANN_PRICE = {"mac": "mac", "add": "add", "mult": "mult", "compare": "compare", "exp": "exp"}


def first_spike_input(g: Graph, n: Node) -> Optional[str]:
    return next((i for i in n.inputs if g[i].out_kind == SPIKE), None)


def reads_spikes(g: Graph, n: Node) -> bool:
    return bool(n.inputs) and g[n.inputs[0]].out_kind == SPIKE


def numel(shape) -> int:
    return int(np.prod(shape, dtype=np.int64)) if len(shape) else 1


def _conv_flops(g: Graph, n: Conv) -> int:
    c_out, c_in_group, kh, kw = n.weight_shape
    h_out, w_out = n.shape[1:]
    return int(kh * kw * h_out * w_out * c_in_group * c_out)


def _linear_flops(g: Graph, n: Linear) -> int:
    o, i = n.weight_shape
    return int(i * o)


# ---- event fan-out of a convolution ----

def taps_per_input_position(size: int, k: int, stride: int, padding: int) -> np.ndarray:
    """For each input position along one axis, how many (output position, kernel tap) pairs read it.

    An input at y is read by tap ky of output yo when yo * stride + ky - padding == y and 0 <= yo < out;
    padding positions are never inputs, so they are never counted."""
    out = (size + 2 * padding - k) // stride + 1
    y = np.arange(size)[:, None]
    ky = np.arange(k)[None, :]
    num = y + padding - ky
    yo = num // stride
    ok = (num % stride == 0) & (yo >= 0) & (yo < out)
    return ok.sum(axis=1).astype(np.int64)


def conv_fanout_map(g: Graph, n: Conv) -> np.ndarray:
    """[H, W]: the number of (output position, tap) pairs an input event at (y, x) reaches."""
    _, H, W = g[n.inputs[0]].shape
    _, _, kh, kw = n.weight_shape
    return np.outer(taps_per_input_position(H, kh, n.stride, n.padding),
                    taps_per_input_position(W, kw, n.stride, n.padding))


# ---- spike statistics: what the report needs to keep of the spikes ----

@dataclass
class SpikeTally:
    """Per spike node, nonzeros per time step summed over samples; per synaptic conv, the sum over its
    input events of the taps each reaches (its additions per output channel). Adding tallies of batches
    weights every sample once, whatever the batch sizes."""

    samples: int
    time_steps: int
    nnz: dict = field(default_factory=dict)             # spike node -> int64 [T]
    fanout_events: dict = field(default_factory=dict)   # synaptic conv -> int64 [T]
    coincidences: dict = field(default_factory=dict)    # V2 kv node -> int64 [T]: k and v spikes at one token

    def __add__(self, other: "SpikeTally") -> "SpikeTally":
        if other.time_steps != self.time_steps:
            raise DeployError(f"report: batches with different time steps ({self.time_steps} and "
                              f"{other.time_steps}) cannot share one report")
        if set(other.nnz) != set(self.nnz) or set(other.fanout_events) != set(self.fanout_events) or \
                set(other.coincidences) != set(self.coincidences):
            raise DeployError("report: tallies of different graphs cannot be added")
        return SpikeTally(self.samples + other.samples, self.time_steps,
                          {k: self.nnz[k] + other.nnz[k] for k in self.nnz},
                          {k: self.fanout_events[k] + other.fanout_events[k] for k in self.fanout_events},
                          {k: self.coincidences[k] + other.coincidences[k] for k in self.coincidences})


def tally_spikes(g: Graph, spikes: Mapping[str, np.ndarray]) -> SpikeTally:
    """Reduce one batch's spikes ({node: uint8 [T, B, ...]}, every spike node of g) to a SpikeTally."""
    names = [n.name for n in g.spike_nodes()]
    missing = [k for k in names if k not in spikes]
    if missing:
        raise DeployError(f"report: spikes of {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} "
                          "are missing")
    T, B = spikes[names[0]].shape[:2]
    nnz = {}
    for k in names:
        a = spikes[k]
        if a.shape[:2] != (T, B):
            raise DeployError(f"report: spikes of {k} have shape {a.shape}, expected [T={T}, B={B}, ...]")
        nnz[k] = np.count_nonzero(a.reshape(T, -1), axis=1).astype(np.int64)
    fanout = {}
    for n in g.of_type(Conv):
        if reads_spikes(g, n):
            per_position = spikes[n.inputs[0]].sum(axis=(1, 2), dtype=np.int64)      # [T, H, W]
            fanout[n.name] = (per_position * conv_fanout_map(g, n)).sum(axis=(1, 2))
    coincidences = {n.name: kv_coincidences(spikes[n.inputs[0]], spikes[n.inputs[1]], n.heads)
                    for n in g.of_type(KVProduct)}
    return SpikeTally(int(B), int(T), nnz, fanout, coincidences)


def kv_coincidences(k: np.ndarray, v: np.ndarray, heads: int) -> np.ndarray:
    """Per step, the (k spike, v spike) pairs of one head at one token, summed over samples, heads and
    tokens: the increments of kv = k^T v. [T, B, C, H, W] spikes -> int64 [T]."""
    T, B, C = k.shape[:3]
    per_head = lambda a: a.reshape(T, B, heads, C // heads, -1).sum(axis=3, dtype=np.int64)   # noqa: E731
    return (per_head(k) * per_head(v)).sum(axis=(1, 2, 3))


def firing_rates(g: Graph, tally: SpikeTally) -> dict:
    """{spike node: per-step rates [T]}: spikes / (samples x neurons), every sample weighted once."""
    return {k: v / float(tally.samples * numel(g[k].shape)) for k, v in tally.nnz.items()}


# ---- measured operations ----

def _has_bias(n: Node) -> bool:
    return getattr(n, "b_int", None) is not None or getattr(n, "bias", None) is not None


ENGINE_KEYS = {"acs": "ac", "macs": "mac", "bias_adds": "bias_add", "neuron_updates": "neuron_update",
               "and": "and", "or_inputs": "or", "comparisons": "compare", "int_acs": "int_ac"}


def ops_from_engine(g: Graph, engine_ops: Mapping[str, Mapping[str, int]]) -> dict:
    """The engine's counters ({layer: {"acs", "macs", ...}}) in the report's op names. `spikes` (a LIF's
    output count) is not an operation; a token sum's `adds` are spike counts or current adds by its input."""
    out = {}
    for name, counters in engine_ops.items():
        n = g[name]
        o = {}
        for key, value in counters.items():
            if key == "spikes":
                continue
            if key == "adds":
                o["count" if layer_kind(g, n) == KIND_TOKEN_SUM else "add"] = int(value)
            else:
                o[ENGINE_KEYS.get(key, key)] = int(value)
        if isinstance(n, SYNAPTIC):   # the engine always writes both; keep only what happened
            o = {k: v for k, v in o.items() if v or k == ("ac" if reads_spikes(g, n) else "mac")}
        out[name] = o
    return out


def add_ops(a: Mapping, b: Mapping) -> dict:
    """Sum two {layer: {op: count}} mappings."""
    out = {k: dict(v) for k, v in a.items()}
    for name, o in b.items():
        dst = out.setdefault(name, {})
        for op, v in o.items():
            dst[op] = dst.get(op, 0) + int(v)
    return out


def ops_mismatches(expected: Mapping, engine: Mapping) -> list[str]:
    """Where the report's count from the spikes and the engine's counter disagree (zeros ignored)."""
    problems = []
    for name in sorted(set(expected) | set(engine)):
        e, m = expected.get(name, {}), engine.get(name, {})
        for op in sorted(set(e) | set(m)):
            if e.get(op, 0) != m.get(op, 0):
                problems.append(f"{name}.{op}: report {e.get(op, 0)}, engine {m.get(op, 0)}")
    return problems


# ---- the paper's convention ----

def is_v2(g: Graph) -> bool:
    return g.meta.get("family") == "v2"


def paper_layer(g: Graph, n: Node, rates: Mapping[str, float], time_steps: int,
                static_input: bool = True) -> Optional[dict]:
    """The paper's count for one layer, per sample: the encoder conv `FLOPs` MACs for a static image
    (E_MAC x FL_conv^1: the image is the same at every step, so its convolution is computed once),
    `FLOPs * T` for event frames (a new frame each step); every other conv/linear
    `rate(input spikes) * T * FLOPs` SOPs (ACs); None for everything else.

    V2 (Yao et al., ICLR 2024, its energy formula E_MAC FL_conv^1 + E_AC T (sum_n FL_conv^n fr^n + sum_m
    FL_SDSA^m fr^m)): the attention's products too, `kv` at the rate of k and `q kv` at the rate of q,
    FL_SDSA = N C d each; and a convolution reading a real value (SepConv's pointwise after the depthwise,
    RepConv's depthwise and second 1x1), for which the formula has no firing rate, at rate 1 (a real
    input is nonzero almost everywhere), priced as AC as the formula does -- the measured column counts
    the MACs they are."""
    if isinstance(n, (KVProduct, QKVProduct)) and is_v2(g):
        src = n.inputs[0]
        r = float(rates[src])
        flops = dense_flops(g, n)
        return {"counted_as": "AC", "rate": r, "flops": flops, "ops": r * time_steps * flops}
    if not isinstance(n, SYNAPTIC):
        return None
    flops = dense_flops(g, n)
    if not reads_spikes(g, n):
        if is_v2(g) and not isinstance(g[n.inputs[0]], Input):
            return {"counted_as": "AC", "rate": 1.0, "flops": flops, "ops": float(time_steps * flops),
                    "real_input": True}
        macs = flops if static_input else flops * time_steps
        return {"counted_as": "MAC", "rate": None, "flops": flops, "ops": float(macs)}
    src = n.inputs[0]
    if src not in rates:
        raise DeployError(f"report: no firing rate for {src}, the input of {n.name}")
    r = float(rates[src])
    return {"counted_as": "AC", "rate": r, "flops": flops, "ops": r * time_steps * flops}


def paper_convention(g: Graph, rates: Mapping[str, float], time_steps: int, static_input: bool = True) -> dict:
    """{layer: paper_layer(...)} for every conv and linear layer (V2: and the attention's products). `rates`
    maps spike tensors (node names,
    as the paper's Table S1 lists firing rates per spike tensor) to their mean firing rate."""
    out = {}
    for n in g.nodes:
        p = paper_layer(g, n, rates, time_steps, static_input)
        if p is not None:
            out[n.name] = p
    return out


def paper_energy_pj(paper: Mapping[str, dict], table: EnergyTable) -> float:
    """E_MAC * (MAC ops) + E_AC * (SOPs), per sample."""
    return float(sum(p["ops"] * table.price("mac" if p["counted_as"] == "MAC" else "ac") for p in paper.values()))


# ---- the ANN baseline ----

def _attn_scope(name: str) -> Optional[str]:
    """`block.3.attn` for any node of that SDSA, else None."""
    parts = name.split(".")
    if len(parts) >= 4 and parts[0] == "block" and parts[2] == "attn":
        return ".".join(parts[:3])
    return None


SDSA_ONLY_LIFS = ("q_lif", "k_lif", "v_lif", "talking_heads_lif")


def is_sdsa_core(n: Node) -> bool:
    """The SDSA's replacement of softmax(QK^T)V: masks, pools, token sums, the talking-heads neurons."""
    if _attn_scope(n.name) is None:
        return False
    return isinstance(n, (And, OrPool, TokenSum, Broadcast)) or n.name.endswith(".talking_heads_lif")




# ---- each op's accounting: its kind, its measured operations, its ANN twin ----

def _steps(t: SpikeTally) -> int:
    return t.time_steps * t.samples


def _bias_adds(n: Node, t: SpikeTally) -> int:
    return _steps(t) * numel(n.shape) if _has_bias(n) else 0


def _conv_measured(g: Graph, n: Conv, t: SpikeTally) -> dict:
    """Synaptic: one addition per (input event, tap reaching a real output) per output channel of its
    group; encoder: every valid (non-padding) tap x c_in x c_out at every step."""
    c_out = n.weight_shape[0]
    if reads_spikes(g, n):
        ops = {"ac": int(t.fanout_events[n.name].sum()) * (c_out // n.groups)}
    else:
        ops = {"mac": int(conv_fanout_map(g, n).sum()) * n.weight_shape[1] * c_out * _steps(t)}
    return {**ops, "bias_add": _bias_adds(n, t)}


def _linear_measured(g: Graph, n: Linear, t: SpikeTally) -> dict:
    return {"ac": int(t.nnz[n.inputs[0]].sum()) * n.weight_shape[0], "bias_add": _bias_adds(n, t)}


def _conv_kind(g: Graph, n: Node) -> str:
    if reads_spikes(g, n):
        return KIND_SYNAPTIC
    return KIND_ENCODER if isinstance(g[n.inputs[0]], Input) else KIND_CURRENT_MAC


def _kv_flops(g: Graph, n: KVProduct) -> int:
    """k^T v per head: d x d entries, each a sum over the N tokens: heads d^2 N = C d N."""
    heads, d, _ = n.shape
    return int(heads * d * d * numel(g[n.inputs[0]].shape[1:]))


def _qkv_flops(g: Graph, n: QKVProduct) -> int:
    """q kv per head: N x d entries, each a sum over d: heads N d^2 = C d N."""
    C = n.shape[0]
    return int(C * (C // n.heads) * numel(n.shape[1:]))


def _qkv_measured(g: Graph, n: QKVProduct, t: SpikeTally) -> dict:
    """Each query spike adds its row of kv: d integers."""
    return {"int_ac": int(t.nnz[n.inputs[0]].sum()) * (n.shape[0] // n.heads)}


def _synaptic_ann(g: Graph, n: Node) -> dict:
    return {"mac": dense_flops(g, n), "add": numel(n.shape) if _has_bias(n) else 0}


def _lif_ann(g: Graph, n: LIF) -> dict:
    """A ReLU in place of each activation LIF; the SDSA's q/k/v/talking-heads LIFs have no ANN twin."""
    in_attn = _attn_scope(n.name) is not None and n.name.rsplit(".", 1)[1] in SDSA_ONLY_LIFS
    return {} if in_attn else {"compare": numel(n.shape)}


def _pool_ann(g: Graph, n: Node) -> dict:
    return {} if is_sdsa_core(n) else {"compare": numel(n.shape) * (n.kernel * n.kernel - 1)}


def _token_sum_ann(g: Graph, n: Node) -> dict:
    return {} if is_sdsa_core(n) else {"add": numel(g[n.inputs[0]].shape)}


def _nothing(*args) -> dict:
    return {}


@dataclass(frozen=True)
class Accounting:
    """How the report counts one op type: its kind (a row's label; None: no arithmetic, no row), what the
    engine performs for it over the tallied run, and what the ANN of the same architecture performs in
    its place (per sample). The SDSA core ops have no ANN twin: vanilla attention replaces them as a
    whole (`vanilla_attention_ops`)."""

    kind: Callable[[Graph, Node], Optional[str]]
    measured: Callable[[Graph, Node, SpikeTally], dict] = _nothing
    ann: Callable[[Graph, Node], dict] = _nothing
    flops: Callable[[Graph, Node], int] = lambda g, n: 0


def _kind(label: str) -> Callable:
    return lambda g, n: label


ACCOUNTING: dict[type, Accounting] = {
    Input: Accounting(_kind(None)),
    Broadcast: Accounting(_kind(None)),            # wiring
    Readout: Accounting(_kind(None)),              # the host's mean over T
    BatchNorm: Accounting(_kind(None)),            # folded into the convolutions
    Conv: Accounting(_conv_kind, _conv_measured, _synaptic_ann, _conv_flops),
    Linear: Accounting(lambda g, n: KIND_SYNAPTIC if reads_spikes(g, n) else KIND_ENCODER, _linear_measured,
                       _synaptic_ann, _linear_flops),
    LIF: Accounting(_kind(KIND_NEURON), lambda g, n, t: {"neuron_update": _steps(t) * numel(n.shape)}, _lif_ann),
    And: Accounting(_kind(KIND_AND), lambda g, n, t: {"and": _steps(t) * numel(n.shape)}),
    OrPool: Accounting(_kind(KIND_OR_POOL), lambda g, n, t: {"or": int(t.nnz[n.inputs[0]].sum())}, _pool_ann),
    MaxPool: Accounting(_kind(KIND_MAX_POOL),
                        lambda g, n, t: {"compare": _steps(t) * numel(n.shape) * (n.kernel * n.kernel - 1)},
                        _pool_ann),
    TokenSum: Accounting(lambda g, n: KIND_TOKEN_SUM if reads_spikes(g, n) else KIND_HEAD_SUM,
                         lambda g, n, t: ({"count": int(t.nnz[n.inputs[0]].sum())} if reads_spikes(g, n)
                                          else {"add": _steps(t) * numel(g[n.inputs[0]].shape)}),
                         _token_sum_ann),
    SpatialMean: Accounting(_kind(KIND_HEAD_SUM), lambda g, n, t: {"add": _steps(t) * numel(g[n.inputs[0]].shape)},
                            _token_sum_ann),
    Add: Accounting(_kind(KIND_RESIDUAL), lambda g, n, t: {"add": _steps(t) * numel(n.shape) * (len(n.inputs) - 1)},
                    lambda g, n: {"add": numel(n.shape) * (len(n.inputs) - 1)}),
    BNPad: Accounting(_kind(None)),                # folded into the 1x1 convolution (its zero padding)
    KdReadout: Accounting(_kind(None)),            # the host's mean of the two heads over T
    # V2's attention: the ANN of the same architecture computes both products densely (MACs)
    KVProduct: Accounting(_kind(KIND_ATTN_AC), lambda g, n, t: {"ac": int(t.coincidences[n.name].sum())},
                          lambda g, n: {"mac": _kv_flops(g, n)}, _kv_flops),
    QKVProduct: Accounting(_kind(KIND_ATTN_INT_AC), _qkv_measured, lambda g, n: {"mac": _qkv_flops(g, n)},
                           _qkv_flops),
}


def accounting(n: Node) -> Accounting:
    rule = ACCOUNTING.get(type(n))
    if rule is None:
        raise DeployError(f"report: no accounting rule for {n.name} ({n.op})")
    return rule


def layer_kind(g: Graph, n: Node) -> Optional[str]:
    """The report's kind of a node, None for nodes without arithmetic."""
    return accounting(n).kind(g, n)


def measured_ops_from_tally(g: Graph, tally: SpikeTally) -> dict:
    """{layer: {op: count}} over all samples and steps, by the engine's counting rules, from the spikes
    alone (the graph and the tallied spikes): the count that the engine's own counters must equal."""
    return {n.name: accounting(n).measured(g, n, tally) for n in g.nodes if layer_kind(g, n) is not None}


def ann_layer_ops(g: Graph, n: Node) -> dict:
    """Per-sample ops of this layer in the ANN of the same architecture (one dense pass)."""
    return accounting(n).ann(g, n)


def dense_flops(g: Graph, n: Node) -> int:
    """Multiply-accumulates of one dense pass, one sample: `k_h k_w h_out w_out (c_in/groups) c_out` for
    a conv (padding taps included, as the paper's FL_Conv), `i o` for a linear; 0 for anything else."""
    return accounting(n).flops(g, n)


def vanilla_attention_ops(tokens: int, dim: int, heads: int) -> dict:
    """softmax(Q K^T / sqrt(d)) V with N tokens and D channels in h heads, one sample:
    Q K^T and A V are N^2 D MACs each; the scale one multiply per score (h N^2); the softmax one exp,
    one add (the row sum) and one multiply (by the reciprocal of the sum) per score."""
    scores = heads * tokens * tokens
    return {"mac": 2 * tokens * tokens * dim, "mult": 2 * scores, "exp": scores, "add": scores}


def energy_pj(ops: Mapping[str, float], table: EnergyTable, price_of: Mapping[str, str]) -> float:
    return float(sum(v * table.price(price_of[op]) for op, v in ops.items() if op in price_of))


# ---- the report ----

def _per_sample(ops: Mapping[str, int], samples: int) -> dict:
    return {k: v / samples for k, v in ops.items()}


def _sum_ops(items: Iterable[Mapping[str, float]]) -> dict:
    out: dict = {}
    for o in items:
        for k, v in o.items():
            out[k] = out.get(k, 0) + v
    return out


COUNTED = {"quantized": "quantized (the deployed integer model)",
           "float": "float (the checkpoint as trained)"}

ENGINE_NOT_APPLICABLE = ("not applicable: the float model runs in torch, and the integer engine executes only the "
                         "quantized model, so no engine count of this run exists to compare with")


def counted_model(g: Graph) -> str:
    """Which model a report over `g` counts: "quantized" for a quantized graph, else "float"."""
    return "quantized" if g.meta.get("quantized") else "float"


def attention_blocks(g: Graph) -> list[str]:
    scopes = []
    for n in g.nodes:
        s = _attn_scope(n.name)
        if s is not None and s not in scopes:
            scopes.append(s)
    return scopes


def build_report(g: Graph, tally: SpikeTally, table: EnergyTable, engine_totals: Optional[Mapping[str, int]] = None,
                 source: Optional[Mapping] = None) -> dict:
    """The report as plain data (see `convention_notes` for what every number means).

    The measured column is counted from the spikes (`measured_ops_from_tally`); `engine_totals` ({"acs",
    "macs"}: the integer engine's own counters over the same run) are compared with that count. A float
    graph's report (the float model's own spikes) has no engine run: `totals["engine"]` says it is not
    applicable, and `model.counted` says which model was counted."""
    measured = measured_ops_from_tally(g, tally)
    S, T = tally.samples, tally.time_steps
    per_step = firing_rates(g, tally)
    rates = {k: float(v.mean()) for k, v in per_step.items()}
    paper = paper_convention(g, rates, T, static_input=bool((source or {}).get("static_input", True)))
    heads = int(g.meta.get("config", {}).get("num_heads", 1))

    layers = []
    for n in g.nodes:
        kind = layer_kind(g, n)
        if kind is None:
            continue
        ops = {k: int(v) for k, v in measured.get(n.name, {}).items()}
        src = first_spike_input(g, n)
        spike_inputs = [i for i in n.inputs if g[i].out_kind == SPIKE]
        p = paper.get(n.name)
        ann = ann_layer_ops(g, n)
        row = {
            "name": n.name,
            "kind": kind,
            "op": n.op,
            "inputs": list(n.inputs),
            "input_shape": list(g[n.inputs[0]].shape),
            "output_shape": list(n.shape),
            "input_from": src,
            "input_rate": rates[src] if src else None,
            "input_rate_per_step": per_step[src].tolist() if src else None,
            "input_rates": {i: rates[i] for i in spike_inputs} if len(spike_inputs) > 1 else None,
            "output_rate": rates.get(n.name) if n.out_kind == SPIKE else None,
            "output_rate_per_step": per_step[n.name].tolist() if n.out_kind == SPIKE else None,
            "flops": dense_flops(g, n),
            "acs": ops.get("ac", 0),
            "macs": ops.get("mac", 0),
            "ops": ops,
            "acs_per_sample": ops.get("ac", 0) / S,
            "macs_per_sample": ops.get("mac", 0) / S,
            "ops_per_sample": _per_sample(ops, S),
            "energy_pj": energy_pj(ops, table, MEASURED_PRICE) / S,
            "paper_counted_as": p["counted_as"] if p else None,
            "paper_ops": p["ops"] if p else 0.0,
            "paper_energy_pj": paper_energy_pj({n.name: p}, table) if p else 0.0,
            "ann_ops": ann,
            "ann_energy_pj": energy_pj(ann, table, ANN_PRICE),
        }
        layers.append(row)

    blocks = []
    for scope in attention_blocks(g):
        blocks.append(_block_comparison(g, scope, layers, heads, table))
    ann_attention = _sum_ops(b["vanilla"]["ops"] for b in blocks)

    measured_total = _sum_ops(r["ops"] for r in layers)
    ann_total = _sum_ops([_sum_ops(r["ann_ops"] for r in layers), ann_attention])
    measured_e = sum(r["energy_pj"] for r in layers)
    paper_e = sum(r["paper_energy_pj"] for r in layers)
    ann_e = energy_pj(ann_total, table, ANN_PRICE)
    totals = {
        "samples": S,
        "time_steps": T,
        "measured": {
            "acs": int(measured_total.get("ac", 0)),
            "macs": int(measured_total.get("mac", 0)),
            "ops": {k: int(v) for k, v in measured_total.items()},
            "acs_per_sample": measured_total.get("ac", 0) / S,
            "macs_per_sample": measured_total.get("mac", 0) / S,
            "ops_per_sample": _per_sample(measured_total, S),
            "energy_by_op_pj": {op: v * table.price(MEASURED_PRICE[op]) / S
                                for op, v in measured_total.items() if op in MEASURED_PRICE},
            "energy_pj": measured_e,
            "energy_mj": measured_e * 1e-9,
        },
        "paper": {
            "macs": sum(p["ops"] for p in paper.values() if p["counted_as"] == "MAC"),
            "sops": sum(p["ops"] for p in paper.values() if p["counted_as"] == "AC"),
            "flops": sum(p["flops"] for p in paper.values()),
            "energy_pj": paper_e,
            "energy_mj": paper_e * 1e-9,
        },
        "ann": {
            "ops": ann_total,
            "attention_ops": ann_attention,
            "energy_pj": ann_e,
            "energy_mj": ann_e * 1e-9,
        },
        "ann_over_measured": ann_e / measured_e if measured_e else None,
        "ann_over_paper": ann_e / paper_e if paper_e else None,
    }
    counted = counted_model(g)
    if counted == "float":
        if engine_totals is not None:
            raise DeployError("report: the integer engine runs the quantized model; a float graph's report "
                              "has no engine counters")
        totals["engine"] = {"applicable": False, "matches": None, "why": ENGINE_NOT_APPLICABLE}
    elif engine_totals is not None:
        # the engine's own counters against the count from the spikes: two independent counts
        totals["engine"] = {"applicable": True,
                            "total_acs": int(engine_totals["acs"]), "total_macs": int(engine_totals["macs"]),
                            "recount_acs": totals["measured"]["acs"], "recount_macs": totals["measured"]["macs"],
                            "matches": (int(engine_totals["acs"]) == totals["measured"]["acs"]
                                        and int(engine_totals["macs"]) == totals["measured"]["macs"])}
    convention = convention_notes(table, engine_checked=engine_totals is not None, graph=g, counted=counted)
    unpriced = sorted({op for r in layers for op in r["ops"] if op not in MEASURED_PRICE})
    if unpriced:   # a counter this report does not know: shown, never silently priced
        convention["measured"].append(f"counted but not priced (no rule for them): {', '.join(unpriced)}")
    return {
        "model": _model_summary(g),
        "input": dict(source or {}, samples=S, time_steps=T),
        "energy_table": table.to_dict(),
        "layers": layers,
        "blocks": blocks,
        "totals": totals,
        "convention": convention,
    }


def _model_summary(g: Graph) -> dict:
    cfg = g.meta.get("config", {})
    return {"counted": COUNTED[counted_model(g)], "config": cfg, "params": g.param_count(),
            "quantized": bool(g.meta.get("quantized")), "token_shape": list(g.meta.get("token_shape", [])),
            "reparam": bool(g.meta.get("reparam"))}


def _block_comparison(g: Graph, scope: str, layers: list, heads: int, table: EnergyTable) -> dict:
    """SDSA (measured, per sample, all T steps) against vanilla self-attention (one dense pass)."""
    rows = [r for r in layers if _attn_scope(r["name"]) == scope]
    core = [r for r in rows if is_sdsa_core(g[r["name"]])]
    projections = [r for r in rows if isinstance(g[r["name"]], SYNAPTIC)]
    dim, h, w = g[f"{scope}.kv_and"].shape if f"{scope}.kv_and" in g else g[projections[0]["name"]].shape
    tokens = int(h * w)
    vanilla = vanilla_attention_ops(tokens, int(dim), heads)
    vanilla_e = energy_pj(vanilla, table, ANN_PRICE)
    sdsa_ops = _sum_ops(r["ops_per_sample"] for r in core)
    sdsa_e = sum(r["energy_pj"] for r in core)
    # The other end of the bracket: every SDSA operation (bit-op, count, neuron update) priced as one AC.
    sdsa_as_ac_e = sum(sdsa_ops.values()) * table.price("ac")
    proj_ann = _sum_ops(r["ann_ops"] for r in projections)
    proj_ann_e = energy_pj(proj_ann, table, ANN_PRICE)
    proj_ops = _sum_ops(r["ops_per_sample"] for r in projections)
    proj_e = sum(r["energy_pj"] for r in projections)
    return {
        "block": scope,
        "tokens": tokens,
        "dim": int(dim),
        "heads": heads,
        "vanilla": {"ops": vanilla, "energy_pj": vanilla_e,
                    "what": "Q K^T and A V: 2 N^2 D MACs; scale and softmax normalisation 2 h N^2 "
                            "multiplies; softmax h N^2 exp + h N^2 adds"},
        "sdsa": {"ops": sdsa_ops, "energy_pj": sdsa_e, "layers": [r["name"] for r in core],
                 "what": "k AND v, token sum, talking-heads LIF, q AND g (and the dvs_mode OR-pools), "
                         "measured over all T steps"},
        "sdsa_all_as_ac_energy_pj": sdsa_as_ac_e,
        "vanilla_over_sdsa": vanilla_e / sdsa_e if sdsa_e else None,
        "vanilla_over_sdsa_all_as_ac": vanilla_e / sdsa_as_ac_e if sdsa_as_ac_e else None,
        "projections": {"ann_ops": proj_ann, "ann_energy_pj": proj_ann_e,
                        "measured_ops": proj_ops, "measured_energy_pj": proj_e,
                        "layers": [r["name"] for r in projections]},
    }


def _plif_taus(graph: Optional[Graph]) -> list:
    return [] if graph is None else [n.tau for n in graph.of_type(LIF) if n.plif_w is not None]


def convention_notes(table: EnergyTable, engine_checked: bool = True, graph: Optional[Graph] = None,
                     counted: str = "quantized") -> dict:
    """Every choice of the accounting, in words, carried in the report itself."""
    if counted == "float":
        model = ["counted: the float model (the checkpoint as trained): spikes, rates and counts are those of "
                 "the torch model in float32 with spikingjelly's neurons and BatchNorm unfolded, the model the "
                 "paper's firing rates were measured on (run without --float for the deployed integer model, "
                 "whose rates can differ)",
                 "the layers, shapes, fan-outs and biases counted are those of its BatchNorm-folded deploy graph "
                 "(the same layers as the quantized graph); the head averages its tokens (head_mean) where the "
                 "quantized graph sums them, at the same count of adds",
                 "engine check: " + ENGINE_NOT_APPLICABLE]
        taus = _plif_taus(graph)
        if taus:
            model.append(f"PLIF: these are the trained decays (tau {min(taus):.4g} to {max(taus):.4g}); the "
                         "quantized model sets every decay to 1/2 (tau = 2), so its spikes, rates and counts "
                         "differ from these")
    else:
        model = ["counted: the quantized model (the deployed integer model): spikes, rates and counts are those "
                 "of the quantized graph (spike-exact with the quantized torch model); the float checkpoint's "
                 "rates can differ (report --float counts the float model)"]
    if counted != "float" and graph is not None and graph.meta.get("plif_tau"):
        model.append("PLIF: the quantizer sets every decay to 1/2 (tau = 2); the trained taus are in the "
                     "graph's meta['plif_tau'], and this report describes the tau = 2 model")
    if counted == "float":
        measured_what = ("counted from the float model's own spikes by the integer engine's counting rules "
                         "(what the engine would perform on these spikes); no engine ran, so nothing here is "
                         "checked against its counters")
    else:
        measured_what = ("what the integer engine performed on the quantized graph for these inputs"
                         + ("; recomputed here from the spikes and the graph, and equal to the engine's counters"
                            if engine_checked else "; computed from the spikes and the graph by the engine's rules"))
    return {
        "model": model,
        "units": [
            "counts without a suffix (acs, macs, ops) are totals over all samples and time steps of the run; "
            "*_per_sample, energies and the paper's and the ANN's counts are per sample (one inference of "
            "T steps), as the paper's Power (mJ) is per image",
            "flops: the dense multiply-accumulates of one pass of one sample (one time step): the ANN's "
            "count and the paper's FL",
            f"energies priced with the table {table.name!r} (pJ per operation, see energy_table)",
        ],
        "firing_rates": [
            "a layer's input firing rate is that of the spike tensor it reads (input_from): spikes / "
            "(samples x neurons), per time step and averaged over steps",
            "every sample counts once, whatever the batch sizes (tallies of spikes are summed over batches "
            "before dividing); any T",
            "output_rate: the firing rate of a spike-producing layer itself (a LIF's own rate)",
        ],
        "paper": [
            "Yao et al. 2023 (SDT), appendix: E = E_MAC * FL_conv1 + E_AC * sum(SOP), SOP = firing rate of "
            "the layer's input x T x FLOPs; FL_conv = k^2 h_out w_out c_in c_out (padding taps included), "
            "FL_linear = i o",
            "the first conv (the encoder: the only layer reading a real value) counts as MAC: FL_conv1 once "
            "for a static image, which is the same at every step, and FLOPs x T for event frames, which are "
            "not (the measured column counts what the engine does: the encoder at every step)",
            "every other conv and linear layer counts as AC (SOP), with the firing rate of its input spike "
            "tensor averaged over steps and samples",
            "the paper's formula has conv and linear layers only: the SDSA masks (AND), token sums, "
            "OR-/max-pools, residual adds, bias adds and neuron updates are not in this column; they are in "
            "the measured one",
            f"priced with the table's mac ({table.price('mac'):g} pJ) and ac ({table.price('ac'):g} pJ); "
            "the 45nm-fp32 table gives the paper's E_MAC = 4.6 pJ, E_AC = 0.9 pJ",
        ],
        "measured": [
            measured_what,
            "synaptic AC: one weight added per (nonzero input event, kernel tap reaching a real output "
            "position) per output channel; padding never triggers an addition",
            "encoder MAC: valid (non-padding) taps x c_in x c_out per output step, at every one of the T steps",
            "bias_add: the folded BatchNorm bias, one add per output value per step (priced as add)",
            "SDSA AND: one bit operation per position per step (the engine evaluates the mask densely)",
            "SDSA token sum: one counter increment per spike (priced as ac); head token sum of currents: one "
            "add per input value",
            "OR-pool: one bit operation per input spike; max-pool on currents: k^2 - 1 comparisons per output "
            "(padding positions included, as the engine)",
            "residual add: one add per value per step for each extra input",
            "neuron update: one per neuron per step (integrate + threshold; decay and reset free)",
        ],
        "ann": [
            "the ANN of the same architecture, one dense pass per sample: every conv/linear as MACs (FLOPs) "
            "plus its bias adds; a ReLU (one comparison) in place of each activation LIF; max-pools in place "
            "of OR-pools; residual and head token-sum adds",
            "vanilla self-attention in place of each SDSA: Q K^T and (Q K^T) V, 2 N^2 D MACs; scale and "
            "softmax normalisation 2 h N^2 multiplies; h N^2 exponentials and h N^2 adds",
            "blocks: the SDSA core (k AND v, token sum, talking-heads LIF, q AND g, dvs_mode OR-pools) as "
            "measured over all T steps, priced by the table (bit-ops as bitop) and, as an upper bound, with "
            "every one of its operations priced as one AC; the q/k/v/proj projections compared separately",
        ],
        "not_counted": [
            ("the read-out (mean over T) runs on the host; broadcasts are wiring; BatchNorm is counted folded "
             "into the convolutions (its shift as bias_add), as deployed, not as the float model's separate "
             "scale and shift" if counted == "float" else
             "the input's quantization and the read-out (mean over T) run on the host; broadcasts are wiring; "
             "BatchNorm is folded into the convolutions"),
            "memory access and data movement (neither convention prices them; on real hardware they often "
            "dominate)",
        ],
        **({"v2": v2_notes(graph)} if graph is not None and is_v2(graph) else {}),
    }


def v2_notes(g: Graph) -> list:
    """What the accounting does with V2's own ops (in the report of a V2 graph only)."""
    reparam = bool(g.meta.get("reparam"))
    return [
        "SDT V2 (Meta-SpikeFormer, Yao et al., ICLR 2024): the paper column follows its energy formula, "
        "E = E_MAC FL_conv^1 + E_AC T (sum_n FL_conv^n fr^n + sum_m FL_SDSA^m fr^m): the first convolution (the "
        "image) as MAC, every other convolution and linear layer and the attention's two products as SOPs",
        "the attention: kv = k^T v (binary x binary) counts one AC per coincidence of a k and a v spike at a token "
        "(measured), FL_SDSA = N C d at the rate of k (paper); q kv (binary x integer) counts one integer AC per "
        "query spike and entry of its kv row, d a spike (measured: 'int_ac', priced as an AC: an addition, of a "
        "multi-bit integer read from a dynamic memory), FL_SDSA = N C d at the rate of q (paper); the 0.125 "
        "scale is a shift (the grid), counted nowhere",
        "kind 'MAC on a current': a convolution whose input is real-valued -- SepConv's pointwise 1x1 after the "
        "depthwise 7x7, RepConv's depthwise 3x3 and second 1x1 after the BN-and-pad; the measured column counts "
        "their multiply-accumulates (every valid tap of every input value, at every step); the paper's formula "
        "has no firing rate for them and is applied with rate 1 (a real input is nonzero almost everywhere), "
        "priced as AC as the formula prices every layer after the first"
        + ("; this graph is re-parameterized (--reparam): those chains are convolutions of spikes here, ACs in "
           "both columns" if reparam else "; --reparam fuses those chains into convolutions of spikes (ACs)"),
        "depthwise convolutions of spikes: one AC per (input spike, tap) pair per output channel of its group "
        "(one channel)",
        "kd: the two heads are two linear layers on the same spikes; their mean (the read-out) runs on the host",
    ]
