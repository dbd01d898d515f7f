"""ONNX export of a quantized deploy graph: one time step per call, every LIF membrane an explicit
input/output pair, in an integer or a float variant. Built from the deploy graph only.

The step model (default)
------------------------
inputs   `<input>`            float32 [batch, C, H, W]: the image, or one event frame (the Input node's
                              name: `input` for a whole model, the cut's name for a partition's device)
         `v_in.<lif>`         the membrane of every LIF before the step, [batch, *lif shape]
outputs  `logits`             float variant: float32 [batch, K], this step's logits
         `logits_int`         int variant: int32/int64 [batch, K], this step's logits as integers on the
                              head's per-class grid: logit = logits_int * 2**-grid[k]
         `v_out.<lif>`        the membrane after the step, same shape and type as `v_in.<lif>`
         `<spike layer>`      with `debug_outputs`: uint8 0/1 [batch, ...] of every spike node (each LIF,
                              `kv_and`, `q_mask`, the OR-pools) except the talking-heads broadcast
A graph that does not end in a Readout (a partition's host: the stem up to the current max-pool)
outputs `output` (float32 values) or `output_int` (integers on the output node's per-channel grid)
instead. The state starts at zero; the caller carries `v_out` into the next call's `v_in`, and does the
read-out over T (mean, or per step with TET). `sdt_deploy.run.onnx_runner.run_onnx` does exactly that.

`unroll=True` puts all T steps in the graph instead: input `<input>` float32 [batch, T, C, H, W] (the
model's event-frame layout; repeat an image T times), state starting at zero inside, no state inputs
or outputs, and every output stacked time-major: `logits` / `logits_int` [T, batch, K], spikes
[T, batch, ...] (the layout of the toolchain's spike records). The read-out over T stays with the caller
in both forms, so the two give the same numbers. (Unrolled rather than `Scan`: the weights are shared
initializers, so unrolling costs only nodes, and every runtime and viewer handles it.)

The variants
------------
`int`: nothing but integer arithmetic after the input quantization. The input is the only float part:
`Mul(2**grid) -> Round (half to even) -> Clip(signed bits) -> Cast(int8)` (a partition's cut input,
already on its grid: `Mul -> Round -> Cast`). Synaptic layers are `ConvInteger` / `MatMulInteger` of
the 8-bit weights with the 0/1 uint8 spikes (the encoder: with the int8 image) into int32 accumulators,
plus the integer bias on the output grid. The weights are stored as uint8 `w_int + 128` with the weight
zero point 128 (the operator computes `x * (w_u8 - 128)`: the same integers; onnxruntime's kernel for
uint8 weights is 4-5x as fast as its int8 one on x86, `offset_weights`). Currents meeting in a membrane
or a sum are shifted left to the common grid by an integer `Mul` by 2**shift per channel.
The LIF is the floor-shift of the numeric contract
(docs/numeric-contract.md, `sdt_deploy.run.lif.integer_lif_step`):
    A = V + X;  H = (A - BitwiseAnd(A, 1)) / 2;  S = H >= theta_int;  V' = Where(S, 0, H)
`A & 1` is the lowest bit of A's two's complement, 1 for every odd A, negative ones included, so
A - (A & 1) is even and the truncating integer `Div` is exact on it: H = floor(A / 2) for negative A
too (a bare `Div(A, 2)` would round toward zero and break the contract). The current max-pool of the
stem is Pad(int min) + strided Slices + Max (onnxruntime's MaxPool has no int32 kernel). Each current
and state is int32 where its worst-case bound (`sdt_deploy.quant.bits.channel_bounds`) fits, int64 where not
(never a wrap-around); an accumulator that cannot fit ConvInteger's int32, or a bound beyond int64, is
refused with a `DeployError` naming the layer.

`float`: float32 with the exact dequantized weights, the same input quantizer followed by
`Mul(2**-grid)`, and spikingjelly's LIF arithmetic in its order: H = V + (X - V) * 0.5 (tau = 2:
exact), S = H >= v_threshold, V' = Where(S, 0, H). Spikes are float32 0/1.

Both variants require decay 1/2 (tau = 2; the quantizer sets every PLIF to it).

SDT V2 (Meta-SpikeFormer)
-------------------------
V2 convolutions also read currents: SepConv's pointwise 1x1 after its depthwise 7x7, RepConv's
depthwise 3x3 and second 1x1. Their integers exceed ConvInteger's 8-bit operands (and float32's 24 bits:
the bit analysis measures 30 to 45 bits), so they are lowered without Conv: a depthwise k x k
convolution as the sum over its k*k taps of a strided Slice times the tap's per-channel weight, a 1x1
convolution as a MatMul of the [C, H*W] current, in int32/int64 (int) or float64 (float), each channel
first shifted onto its group's grid (`quant.contract.input_shift`). The float variant of a V2 graph
computes every current in float64 (`sdt_deploy.arithmetic` = float64): convolutions of spikes stay
float32 Conv (exact: the bound fits 24 bits, checked) and are widened; LIF states and the per-step
output are float64. The attention's products: `kv = k^T v` is a MatMulInteger of the two uint8 spike
tensors per head (int32 counts), `q kv` a MatMul of int32 (float: float64) with the 2**-3 scale as the
grid (float: a multiply by 0.125, exact). kd: `head + head_kd` on the grid one step finer (the halving).

The int read-out
----------------
Per step t the int model outputs `logits_int[t]`, integers (int32, int64 where the bound asks) on the
head's per-class grid g = metadata `sdt_deploy.output_grid` (= the `head` node's grid): the step's logit
for class k is exactly logits_int[t, k] * 2**-g[k]. The model's logits are the read-out of those: the
mean over T, sum_t logits_int[t, k] * 2**-g[k] / T (TET: each step's value), computed on the host in
float64 — the same numbers as the integer engine's `logits_int` / `logits_grid` / `logits`. The int
state `v_in.<lif>` holds integers on the LIF's grid (`sdt_deploy.grids[<lif>]`), thresholds in
`sdt_deploy.lif_theta_int`.

Format: opset 21, IR version 10 — the pair onnx 1.16 writes, set explicitly because newer onnx writes
newer IR versions (1.19: 12; 1.23: 14, which onnxruntime 1.31 refuses — measured: it loads IR 9 to 13);
opset 21 needs onnxruntime >= 1.18, the project's floor. `metadata_props` carry the SDT config, T, the
variant, the read-out, every node's grid, the state list and the tool version (keys `sdt_deploy.*`).
Exports are deterministic: the same graph gives byte-identical files.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from sdt_deploy import __version__
from sdt_deploy.errors import DeployError
from sdt_deploy.files.artifacts import ONNX_META_PREFIX, STATE_IN, STATE_OUT
from sdt_deploy.files.atomic import atomic_write
from sdt_deploy.ir.graph import (
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
    Node,
    OrPool,
    QKVProduct,
    Readout,
    TokenSum,
)
from sdt_deploy.quant.bits import channel_bounds, fits_int64
from sdt_deploy.quant.contract import input_shift, settings_of

OPSET = 21
IR_VERSION = 10
VARIANTS = ("int", "float")
BATCH = "batch"
META = ONNX_META_PREFIX

INT8, UINT8, INT32, INT64, FLOAT = (TensorProto.INT8, TensorProto.UINT8, TensorProto.INT32, TensorProto.INT64,
                                    TensorProto.FLOAT)
DOUBLE = TensorProto.DOUBLE
FLOAT32_EXACT = 2 ** 24     # float32 holds every integer below this


def np_dtype(elem_type: int) -> np.dtype:
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))


# ---------------------------------------------------------------- small value types

@dataclass(frozen=True)
class Value:
    """A tensor of the ONNX graph carrying one deploy-graph node's output (per sample, one step)."""

    name: str
    dtype: int                           # TensorProto element type
    grid: Optional[np.ndarray] = field(default=None, compare=False)   # per-channel exponent; None: spikes

    @property
    def is_spike(self) -> bool:
        return self.grid is None


@dataclass
class Emitter:
    """Collects ONNX nodes and initializers. Tensor names are `<prefix><layer>/<what>`; constants are
    shared by name (the unrolled graph reuses every weight)."""

    nodes: list = field(default_factory=list)
    initializers: dict = field(default_factory=dict)
    prefix: str = ""

    def const(self, name: str, array: np.ndarray) -> str:
        array = np.require(array, requirements="C")   # (ascontiguousarray would make a scalar 1-D)
        held = self.initializers.get(name)
        if held is None:
            self.initializers[name] = numpy_helper.from_array(array, name)
        elif held.data_type != helper.np_dtype_to_tensor_dtype(array.dtype) or \
                not np.array_equal(numpy_helper.to_array(held), array):
            raise AssertionError(f"internal: constant {name} defined twice with different values")
        return name

    def scalar(self, value, elem_type: int) -> str:
        dt = np_dtype(elem_type)
        return self.const(f"const.{dt.name}.{value}", np.array(value, dtype=dt))

    def ints(self, values, name: Optional[str] = None) -> str:
        values = [int(v) for v in values]
        return self.const(name or "const.int64s." + "_".join(map(str, values)), np.array(values, np.int64))

    def op(self, op_type: str, inputs: list, out: str, raw_name: bool = False, **attrs) -> str:
        name = out if raw_name else self.prefix + out
        self.nodes.append(helper.make_node(op_type, list(inputs), [name], name=name, **attrs))
        return name


def per_channel(values: np.ndarray, rank: int, dtype) -> np.ndarray:
    """A per-channel constant shaped to broadcast against [batch, C, ...] of the given rank."""
    return np.asarray(values).astype(dtype).reshape((-1,) + (1,) * (rank - 2))


# ---------------------------------------------------------------- integer widths

def int_type_for(bound: float, layer: str, what: str) -> int:
    """int32 where the worst-case magnitude fits, int64 where it does not, refusal beyond."""
    if bound < 2 ** 31:
        return INT32
    if fits_int64(bound):
        return INT64
    raise DeployError(f"{layer}: the worst-case {what} 2**{np.log2(bound):.1f} does not fit int64; refusing "
                      "rather than risking a wrap-around")


def cast_to(em: Emitter, v: Value, elem_type: int, out: str) -> Value:
    if v.dtype == elem_type:
        return v
    return Value(em.op("Cast", [v.name], out, to=elem_type), elem_type, v.grid)


def shift_left(em: Emitter, v: Value, shift: np.ndarray, rank: int, out: str) -> str:
    """v * 2**shift per channel (shift >= 0): moves an integer to a finer grid, exactly."""
    shift = np.asarray(shift, dtype=np.int64)
    if np.any(shift < 0):
        raise DeployError(f"internal: {out} would shift a current to a coarser grid")
    if not np.any(shift):
        return v.name
    if np.any(shift >= 8 * np_dtype(v.dtype).itemsize - 1):
        raise DeployError(f"internal: {out} shifts by {int(shift.max())} bits in {np_dtype(v.dtype).name}")
    factor = em.const(f"{out}.factor", per_channel(np.left_shift(1, shift), rank, np_dtype(v.dtype)))
    return em.op("Mul", [v.name, factor], out)


# ---------------------------------------------------------------- lowering context

@dataclass
class StepContext:
    graph: Graph
    variant: str
    bounds: dict                                   # node -> per-channel worst-case |integer| (int variant)
    state_in: Callable[[str, Value], str]          # LIF name, its input -> the tensor holding V before the step
    state_out: Callable[[str], str]                # LIF name -> the name to give V after the step
    states: dict = field(default_factory=dict)     # LIF name -> (tensor name, elem type) of V after the step
    float_type: int = FLOAT                        # of the float variant's currents: float64 for V2

    @property
    def is_int(self) -> bool:
        return self.variant == "int"

    def rank(self, n: Node) -> int:
        return 1 + len(n.shape)

    def bound(self, name: str) -> float:
        return float(np.max(self.bounds[name]))


def spike_dtype(ctx: StepContext) -> int:
    return UINT8 if ctx.is_int else FLOAT


# ---------------------------------------------------------------- input

def lower_input(em: Emitter, n: Input, x: str, ctx: StepContext) -> Value:
    """The frame (float32) onto the node's integer grid: the only float arithmetic of the int variant.

    The per-channel constants are shaped [C, 1, 1] to broadcast against the trailing [C, H, W], so the
    same nodes serve the step input [batch, C, H, W] and the unrolled [batch, T, C, H, W]."""
    grid = np.asarray(n.grid, dtype=np.int64)
    chan = lambda a: np.asarray(a, np.float32).reshape((-1,) + (1,) * (len(n.shape) - 1))  # noqa: E731
    scale = em.const(f"{n.name}.scale", chan(np.exp2(grid.astype(np.float64))))
    if n.bits is None:   # a partition's cut: already on the grid (exact float32 values)
        if not ctx.is_int:
            return cast_to(em, Value(x, FLOAT, grid), ctx.float_type, f"{n.name}/wide")
        scaled = em.op("Mul", [x, scale], f"{n.name}/scaled")
        rounded = em.op("Round", [scaled], f"{n.name}/rounded")
        elem = int_type_for(ctx.bound(n.name), n.name, "input integer")
        return Value(em.op("Cast", [rounded], f"{n.name}/int", to=elem), elem, grid)
    if int(n.bits) > 8:
        raise DeployError(f"{n.name}: {n.bits}-bit input; the ONNX export quantizes inputs to at most 8 bits")
    lo, hi = -(2 ** (int(n.bits) - 1)), 2 ** (int(n.bits) - 1) - 1
    scaled = em.op("Mul", [x, scale], f"{n.name}/scaled")
    rounded = em.op("Round", [scaled], f"{n.name}/rounded")           # half to even, as torch and numpy
    clipped = em.op("Clip", [rounded, em.scalar(float(lo), FLOAT), em.scalar(float(hi), FLOAT)],
                    f"{n.name}/clipped")
    if ctx.is_int:
        return Value(em.op("Cast", [clipped], f"{n.name}/int8", to=INT8), INT8, grid)
    unscale = em.const(f"{n.name}.unscale", chan(np.exp2(-grid.astype(np.float64))))
    return Value(em.op("Mul", [clipped, unscale], f"{n.name}/out"), FLOAT, grid)


# ---------------------------------------------------------------- synaptic layers

def accumulator_bound(n: Node, bound_with_bias: np.ndarray) -> float:
    return float(np.max(bound_with_bias - np.abs(n.b_int.astype(np.float64))))


def lower_conv(em: Emitter, n: Conv, x: Value, ctx: StepContext) -> Value:
    conv_attrs = dict(strides=[n.stride] * 2, pads=[n.padding] * 4, group=n.groups,
                      kernel_shape=list(n.weight_shape[2:]))
    if x.dtype not in (UINT8, INT8, FLOAT):       # a wide current (V2): no Conv kernel takes it exactly
        return lower_conv_of_current(em, n, x, ctx)
    if not ctx.is_int:
        w = em.const(f"{n.name}.weight", n.float_weight().astype(np.float32))
        b = em.const(f"{n.name}.bias", n.bias.astype(np.float32))
        y = Value(em.op("Conv", [x.name, w, b], f"{n.name}/out", **conv_attrs), FLOAT, n.grid)
        return widen_float(em, n, y, ctx)
    check_integer_operand(n, x)
    w, zero_point = offset_weights(em, n, n.w_int, "w_int")
    acc = integer_accumulate(em, n, "ConvInteger", [x.name, w, "", zero_point], ctx, conv_attrs)
    return add_bias(em, n, acc, ctx)


def lower_linear(em: Emitter, n: Linear, x: Value, ctx: StepContext) -> Value:
    if not ctx.is_int:
        w = em.const(f"{n.name}.weight", n.float_weight().astype(np.float32))
        b = em.const(f"{n.name}.bias", n.bias.astype(np.float32))
        y = Value(em.op("Gemm", [x.name, w, b], f"{n.name}/out", transB=1), FLOAT, n.grid)
        return widen_float(em, n, y, ctx)
    check_integer_operand(n, x)
    w_t, zero_point = offset_weights(em, n, np.ascontiguousarray(n.w_int.T), "w_int_t")
    acc = integer_accumulate(em, n, "MatMulInteger", [x.name, w_t, "", zero_point], ctx, {})
    return add_bias(em, n, acc, ctx)


WEIGHT_ZERO_POINT = 128


def offset_weights(em: Emitter, n: Node, w_int: np.ndarray, what: str) -> tuple[str, str]:
    """The signed 8-bit weights as ConvInteger/MatMulInteger take them fastest: uint8 w_int + 128 with the
    weight zero point 128, which the operator subtracts ((x - 0) * (w_u8 - 128) = x * w_int, exact in its
    int32 accumulator). Measured on onnxruntime 1.31 (x86-64, AVX-512): a 3x3 ConvInteger with int8
    weights took 4.5x the time of the same weights as uint8 with the zero point (its int8-weight path
    is not the fast one); the integers are the same. Weights beyond 8 bits are refused."""
    w = np.asarray(w_int, dtype=np.int64)
    if w.size and (int(w.min()) < -128 or int(w.max()) > 127):
        raise DeployError(f"{n.name}: weights beyond 8 bits; the int ONNX export takes 8-bit weights")
    shifted = em.const(f"{n.name}.{what}", (w + WEIGHT_ZERO_POINT).astype(np.uint8))
    return shifted, em.const("const.weight_zero_point", np.array(WEIGHT_ZERO_POINT, np.uint8))


def widen_float(em: Emitter, n: Node, y: Value, ctx: StepContext) -> Value:
    """A float32 Conv/Gemm output as the variant's current type (float64 for V2): exact, where its bound
    (the accumulation of spikes times the weights) fits float32's 24 bits, else refused."""
    if ctx.float_type == FLOAT:
        return y
    if ctx.bound(n.name) >= FLOAT32_EXACT:
        raise DeployError(f"{n.name}: the worst-case sum 2**{np.log2(ctx.bound(n.name)):.1f} does not fit the "
                          "float32 Conv of the float variant exactly; export the int variant")
    return cast_to(em, y, ctx.float_type, f"{n.name}/wide")


def current_type(n: Node, ctx: StepContext, what: str) -> int:
    """The element type a current is computed in: the int variant's int32/int64 by its bound, the float
    variant's float type."""
    return int_type_for(ctx.bound(n.name), n.name, what) if ctx.is_int else ctx.float_type


def lower_conv_of_current(em: Emitter, n: Conv, x: Value, ctx: StepContext) -> Value:
    """A convolution reading a wide current (V2), without Conv: each channel shifted onto its group's grid,
    then a depthwise k x k as the sum over taps of a strided slice times the tap's per-channel weight, or
    a 1x1 as a MatMul over the channels; the bias added. int32/int64 by the bound (int), float64 (float)."""
    C_in, H, W = ctx.graph[n.inputs[0]].shape
    O, Cg, k, _ = n.weight_shape
    elem = current_type(n, ctx, "output")
    rank = ctx.rank(n)
    xw = cast_to(em, x, elem, f"{n.name}/x_wide")
    if ctx.is_int:
        xw = Value(shift_left(em, xw, input_shift(n, x.grid), rank, f"{n.name}/x_shifted"), elem, x.grid)
        weights = n.w_int.astype(np_dtype(elem))
        bias = n.b_int
    else:
        weights = n.float_weight(np.float64)
        bias = n.bias
    if n.groups == C_in == O and Cg == 1:
        acc = depthwise_taps(em, n, xw.name, weights, elem, (H, W))
    elif n.groups == 1 and k == 1 and n.stride == 1 and n.padding == 0:
        flat = em.op("Reshape", [xw.name, em.ints([0, C_in, H * W])], f"{n.name}/flat")
        w = em.const(f"{n.name}.weight_matrix", np.ascontiguousarray(weights.reshape(O, C_in)))
        prod = em.op("MatMul", [w, flat], f"{n.name}/matmul")
        acc = em.op("Reshape", [prod, em.ints([0, O] + list(n.shape[1:]))], f"{n.name}/acc")
    else:
        raise DeployError(f"{n.name}: the ONNX export lowers convolutions of a current only as depthwise or 1x1 "
                          f"(this one: {k}x{k}, groups {n.groups})")
    b = em.const(f"{n.name}.bias_wide", per_channel(bias, rank, np_dtype(elem)))
    return Value(em.op("Add", [acc, b], f"{n.name}/out"), elem, n.grid)


def depthwise_taps(em: Emitter, n: Conv, x: str, weights: np.ndarray, elem: int, hw: tuple) -> str:
    """sum over the k x k taps of w[c, ky, kx] * x[c, yo*s + ky - p, xo*s + kx - p] (zero padding)."""
    k, s, p = n.weight_shape[2], n.stride, n.padding
    Ho, Wo = n.shape[1:]
    src = x
    if p:
        src = em.op("Pad", [x, em.ints([0, 0, p, p, 0, 0, p, p]), em.scalar(0, elem)], f"{n.name}/padded")
    total = None
    for ky in range(k):
        for kx in range(k):
            starts, ends = em.ints([ky, kx]), em.ints([ky + s * (Ho - 1) + 1, kx + s * (Wo - 1) + 1])
            tap = em.op("Slice", [src, starts, ends, em.ints([2, 3]), em.ints([s, s])], f"{n.name}/tap{ky}_{kx}")
            w = em.const(f"{n.name}.w_tap{ky}_{kx}", per_channel(weights[:, 0, ky, kx], 4, weights.dtype))
            term = em.op("Mul", [tap, w], f"{n.name}/term{ky}_{kx}")
            total = term if total is None else em.op("Add", [total, term], f"{n.name}/sum{ky}_{kx}")
    return total


def check_integer_operand(n: Node, x: Value) -> None:
    if x.dtype not in (UINT8, INT8):
        raise DeployError(f"{n.name}: reads a {np_dtype(x.dtype).name} current; ConvInteger/MatMulInteger take "
                          "8-bit operands only (spikes or the 8-bit input)")


def integer_accumulate(em: Emitter, n: Node, op_type: str, inputs: list, ctx: StepContext, attrs: dict) -> Value:
    acc_bound = accumulator_bound(n, ctx.bounds[n.name])
    if acc_bound >= 2 ** 31:
        raise DeployError(f"{n.name}: the worst-case accumulator 2**{np.log2(acc_bound):.1f} does not fit the "
                          f"int32 of {op_type}; refusing rather than risking a wrap-around")
    return Value(em.op(op_type, inputs, f"{n.name}/acc", **attrs), INT32, n.grid)


def add_bias(em: Emitter, n: Node, acc: Value, ctx: StepContext) -> Value:
    elem = int_type_for(ctx.bound(n.name), n.name, "output")
    acc = cast_to(em, acc, elem, f"{n.name}/acc_wide")
    bias = em.const(f"{n.name}.b_int", per_channel(n.b_int, ctx.rank(n), np_dtype(elem)))
    return Value(em.op("Add", [acc.name, bias], f"{n.name}/out"), elem, n.grid)


# ---------------------------------------------------------------- neurons

def lower_lif(em: Emitter, n: LIF, x: Value, ctx: StepContext) -> Value:
    if float(n.tau) != 2.0 or n.plif_w not in (None, 0.0):
        raise DeployError(f"{n.name}: the ONNX export needs decay 1/2 (tau = 2); got tau = {n.tau}")
    rank = ctx.rank(n)
    if ctx.is_int:
        h, elem = lif_int_membrane(em, n, x, ctx, rank)
        theta = em.const(f"{n.name}.theta_int", per_channel(n.theta_int, rank, np_dtype(elem)))
    else:
        h, elem = lif_float_membrane(em, n, x, ctx)
        theta = em.scalar(float(n.v_threshold), elem)
    fired = em.op("GreaterOrEqual", [h, theta], f"{n.name}/fired")
    out_type = spike_dtype(ctx)
    spike = em.op("Cast", [fired], f"{n.name}/out", to=out_type)
    if ctx.is_int:
        v_next = em.op("Where", [fired, em.scalar(0, elem), h], ctx.state_out(n.name), raw_name=True)
    else:
        # hard reset as H * (1 - S): exact for S in {0, 1} (H * 1 = H; H * 0 = +0, H >= theta > 0 when
        # it fired), two cheap element-wise ops where onnxruntime's Where with a broadcast scalar took
        # 3x their time
        kept = em.op("Sub", [em.scalar(1.0, FLOAT), spike], f"{n.name}/kept")
        kept = cast_to(em, Value(kept, FLOAT), elem, f"{n.name}/kept_wide").name
        v_next = em.op("Mul", [h, kept], ctx.state_out(n.name), raw_name=True)
    ctx.states[n.name] = (v_next, elem)
    return Value(spike, out_type, None)


def lif_int_membrane(em: Emitter, n: LIF, x: Value, ctx: StepContext, rank: int) -> tuple[str, int]:
    """H = floor((V + X) / 2) on the LIF's grid, X first shifted onto it."""
    bound = ctx.bound(n.name)
    elem = int_type_for(2 * bound, n.name, "membrane sum V + X")   # |V|, |X| <= bound
    src_grid = np.zeros(n.shape[0], np.int64) if x.is_spike else np.asarray(x.grid, np.int64)
    xi = cast_to(em, x, elem, f"{n.name}/x_wide")
    xs = Value(shift_left(em, xi, n.grid - src_grid, rank, f"{n.name}/x_shifted"), elem, n.grid)
    v = ctx.state_in(n.name, Value(xs.name, elem, n.grid))
    total = em.op("Add", [v, xs.name], f"{n.name}/sum")
    # the lowest bit, 0 or 1 for negatives too (two's complement); onnxruntime's integer Mod took 15 %
    # of the int variant's step (CIFAR 2-256), BitwiseAnd a hundredth of that
    odd = em.op("BitwiseAnd", [total, em.scalar(1, elem)], f"{n.name}/odd")
    even = em.op("Sub", [total, odd], f"{n.name}/even")
    return em.op("Div", [even, em.scalar(2, elem)], f"{n.name}/h"), elem   # exact: `even` is even


def lif_float_membrane(em: Emitter, n: LIF, x: Value, ctx: StepContext) -> tuple[str, int]:
    """spikingjelly's decay_input step with tau = 2: H = V + (X - V) * 0.5 (float32; float64 for V2)."""
    ft = ctx.float_type
    xf = cast_to(em, x, ft, f"{n.name}/x_float")
    v = ctx.state_in(n.name, xf)
    delta = em.op("Sub", [xf.name, v], f"{n.name}/delta")
    half = em.op("Mul", [delta, em.scalar(0.5, ft)], f"{n.name}/half")
    return em.op("Add", [v, half], f"{n.name}/h"), ft


# ---------------------------------------------------------------- spike logic and pooling

def lower_and(em: Emitter, n: And, a: Value, b: Value, ctx: StepContext) -> Value:
    op_type = "BitwiseAnd" if ctx.is_int else "Mul"   # 0/1 operands: AND == product
    return Value(em.op(op_type, [a.name, b.name], f"{n.name}/out"), a.dtype, None)


def lower_orpool(em: Emitter, n: OrPool, x: Value, ctx: StepContext) -> Value:
    pool = dict(kernel_shape=[n.kernel] * 2, strides=[n.stride] * 2, pads=[n.padding] * 4)
    if n.layout == "spatial":
        return Value(em.op("MaxPool", [x.name], f"{n.name}/out", **pool), x.dtype, None)
    if n.layout != "heads":
        raise DeployError(f"{n.name}: unknown OR-pool layout {n.layout!r}")
    # [B, C, H, W] -> [B, heads, N, C/heads] (token n = y*W + x) -> pool over (N, C/heads) -> back
    C, H, W = n.shape
    N, heads = H * W, int(n.heads)
    d = C // heads
    t = em.op("Reshape", [x.name, em.ints([0, C, N])], f"{n.name}/flat")
    t = em.op("Transpose", [t], f"{n.name}/tokens", perm=[0, 2, 1])
    t = em.op("Reshape", [t, em.ints([0, N, heads, d])], f"{n.name}/split")
    t = em.op("Transpose", [t], f"{n.name}/heads", perm=[0, 2, 1, 3])
    t = em.op("Reshape", [t, em.ints([-1, 1, N, d])], f"{n.name}/planes")
    t = em.op("MaxPool", [t], f"{n.name}/pooled", **pool)
    t = em.op("Reshape", [t, em.ints([-1, heads, N, d])], f"{n.name}/unplanes")
    t = em.op("Transpose", [t], f"{n.name}/unheads", perm=[0, 1, 3, 2])
    return Value(em.op("Reshape", [t, em.ints([-1, C, H, W])], f"{n.name}/out"), x.dtype, None)


def lower_maxpool(em: Emitter, n: MaxPool, x: Value, ctx: StepContext) -> Value:
    if x.dtype in (FLOAT, INT8, UINT8):   # onnxruntime's MaxPool kernels: float and 8-bit integers
        pool = dict(kernel_shape=[n.kernel] * 2, strides=[n.stride] * 2, pads=[n.padding] * 4)
        return Value(em.op("MaxPool", [x.name], f"{n.name}/out", **pool), x.dtype, n.grid)
    return Value(integer_maxpool(em, n, x), x.dtype, n.grid)


def integer_maxpool(em: Emitter, n: MaxPool, x: Value) -> str:
    """Max over k x k windows of an integer current: Pad with the type's minimum, then the max of the
    k*k strided slices (onnxruntime's MaxPool has 8-bit integer kernels only)."""
    k, s, p = n.kernel, n.stride, n.padding
    _, Ho, Wo = n.shape
    lowest = em.scalar(int(np.iinfo(np_dtype(x.dtype)).min), x.dtype)
    padded = em.op("Pad", [x.name, em.ints([0, 0, p, p, 0, 0, p, p]), lowest], f"{n.name}/padded")
    taps = []
    for ky in range(k):
        for kx in range(k):
            starts, ends = em.ints([ky, kx]), em.ints([ky + s * (Ho - 1) + 1, kx + s * (Wo - 1) + 1])
            taps.append(em.op("Slice", [padded, starts, ends, em.ints([2, 3]), em.ints([s, s])],
                              f"{n.name}/tap{ky}{kx}"))
    return em.op("Max", taps, f"{n.name}/out")


# ---------------------------------------------------------------- sums, broadcasts, residuals

def lower_tokensum(em: Emitter, n: TokenSum, x: Value, ctx: StepContext) -> Value:
    if ctx.is_int:
        x = cast_to(em, x, int_type_for(ctx.bound(n.name), n.name, "token sum"), f"{n.name}/x_wide")
    axes = em.ints(range(2, 1 + len(ctx.graph[n.inputs[0]].shape)))
    return Value(em.op("ReduceSum", [x.name, axes], f"{n.name}/out", keepdims=0), x.dtype, n.grid)


def lower_broadcast(em: Emitter, n: Broadcast, x: Value, ctx: StepContext) -> Value:
    extra = len(n.shape) - 1
    t = em.op("Unsqueeze", [x.name, em.ints(range(2, 2 + extra))], f"{n.name}/unsqueezed")
    shape = em.ints([1] + list(n.shape))
    return Value(em.op("Expand", [t, shape], f"{n.name}/out"), x.dtype, x.grid)


def lower_add(em: Emitter, n: Add, ins: list, ctx: StepContext) -> Value:
    if not ctx.is_int:
        total = ins[0].name
        for i, v in enumerate(ins[1:], 1):
            total = em.op("Add", [total, v.name], f"{n.name}/sum{i}")
        return Value(total, ctx.float_type, n.grid)
    elem = int_type_for(ctx.bound(n.name), n.name, "sum")
    terms = []
    for i, v in enumerate(ins):
        src_grid = np.zeros(n.shape[0], np.int64) if v.is_spike else np.asarray(v.grid, np.int64)
        wide = cast_to(em, v, elem, f"{n.name}/in{i}_wide")
        terms.append(shift_left(em, wide, np.asarray(n.grid) - src_grid, ctx.rank(n), f"{n.name}/in{i}_shifted"))
    total = terms[0]
    for i, t in enumerate(terms[1:], 1):
        total = em.op("Add", [total, t], f"{n.name}/sum{i}")
    return Value(total, elem, n.grid)


# ---------------------------------------------------------------- V2's attention products and kd

def to_heads_layout(em: Emitter, name: str, x: str, shape: tuple, heads: int, out: str) -> str:
    """[B, C, H, W] -> [B, heads, d, N] (channel c = h*d + i, token n = y*W + x)."""
    C = shape[0]
    return em.op("Reshape", [x, em.ints([0, heads, C // heads, int(np.prod(shape[1:]))])], f"{name}/{out}")


def lower_kv_product(em: Emitter, n: KVProduct, k: Value, v: Value, ctx: StepContext) -> Value:
    """kv[h] = K_h V_h^T over the tokens: K_h [d, N] (uint8 spikes) times V_h^T [N, d]."""
    shape = ctx.graph[n.inputs[0]].shape
    kh = to_heads_layout(em, n.name, k.name, shape, n.heads, "k_heads")
    vh = to_heads_layout(em, n.name, v.name, shape, n.heads, "v_heads")
    vt = em.op("Transpose", [vh], f"{n.name}/v_tokens", perm=[0, 1, 3, 2])
    if ctx.is_int:
        return Value(em.op("MatMulInteger", [kh, vt], f"{n.name}/out"), INT32, n.grid)
    kf = em.op("Cast", [kh], f"{n.name}/k_wide", to=ctx.float_type)
    vf = em.op("Cast", [vt], f"{n.name}/v_wide", to=ctx.float_type)
    return Value(em.op("MatMul", [kf, vf], f"{n.name}/out"), ctx.float_type, n.grid)


def lower_qkv_product(em: Emitter, n: QKVProduct, q: Value, kv: Value, ctx: StepContext) -> Value:
    """y[h*d + j, n] = sum_i q[h*d + i, n] kv[h, i, j]: Q_h^T [N, d] times kv_h [d, d], back to [C, H, W];
    the scale 2**-scale_exp is the grid (int) or a multiply (float, exact)."""
    qh = to_heads_layout(em, n.name, q.name, n.shape, n.heads, "q_heads")
    qt = em.op("Transpose", [qh], f"{n.name}/q_tokens", perm=[0, 1, 3, 2])
    elem = current_type(n, ctx, "q kv")
    qw = em.op("Cast", [qt], f"{n.name}/q_wide", to=elem)
    kvw = cast_to(em, kv, elem, f"{n.name}/kv_wide")
    prod = em.op("MatMul", [qw, kvw.name], f"{n.name}/matmul")                 # [B, h, N, d]
    if not ctx.is_int:
        prod = em.op("Mul", [prod, em.scalar(2.0 ** -int(n.scale_exp), elem)], f"{n.name}/scaled")
    back = em.op("Transpose", [prod], f"{n.name}/channels", perm=[0, 1, 3, 2])  # [B, h, d, N]
    return Value(em.op("Reshape", [back, em.ints([0] + list(n.shape))], f"{n.name}/out"), elem, n.grid)


def lower_kd_readout(em: Emitter, n: KdReadout, ins: list, ctx: StepContext) -> Value:
    """Per step head + head_kd: int, both shifted onto the node's grid less the halving step; float,
    (head + head_kd) * 0.5."""
    if not ctx.is_int:
        total = em.op("Add", [ins[0].name, ins[1].name], f"{n.name}/sum")
        return Value(em.op("Mul", [total, em.scalar(0.5, ins[0].dtype)], f"{n.name}/out"), ins[0].dtype, n.grid)
    elem = int_type_for(ctx.bound(n.name), n.name, "sum of the heads")
    terms = []
    for i, v in enumerate(ins):
        wide = cast_to(em, v, elem, f"{n.name}/in{i}_wide")
        terms.append(shift_left(em, wide, np.asarray(n.grid) - 1 - np.asarray(v.grid), 2, f"{n.name}/in{i}_shifted"))
    return Value(em.op("Add", terms, f"{n.name}/out"), elem, n.grid)


# ---------------------------------------------------------------- one time step

@dataclass
class StepResult:
    output: Value
    spikes: dict            # spike layer -> Value (variant's spike type)


# each node type's lowering: fn(emitter, node, its input values, context) -> the node's value
LOWER = {
    Conv: lambda em, n, ins, ctx: lower_conv(em, n, ins[0], ctx),
    Linear: lambda em, n, ins, ctx: lower_linear(em, n, ins[0], ctx),
    LIF: lambda em, n, ins, ctx: lower_lif(em, n, ins[0], ctx),
    And: lambda em, n, ins, ctx: lower_and(em, n, ins[0], ins[1], ctx),
    OrPool: lambda em, n, ins, ctx: lower_orpool(em, n, ins[0], ctx),
    MaxPool: lambda em, n, ins, ctx: lower_maxpool(em, n, ins[0], ctx),
    TokenSum: lambda em, n, ins, ctx: lower_tokensum(em, n, ins[0], ctx),
    Broadcast: lambda em, n, ins, ctx: lower_broadcast(em, n, ins[0], ctx),
    Add: lower_add,
    Readout: lambda em, n, ins, ctx: ins[0],
    KVProduct: lambda em, n, ins, ctx: lower_kv_product(em, n, ins[0], ins[1], ctx),
    QKVProduct: lambda em, n, ins, ctx: lower_qkv_product(em, n, ins[0], ins[1], ctx),
    KdReadout: lower_kd_readout,
}


def lower_step(em: Emitter, g: Graph, frame: Value, ctx: StepContext) -> StepResult:
    """Every node of the graph for one time step, the Input already lowered to `frame`."""
    vals: dict[str, Value] = {}
    spikes: dict[str, Value] = {}
    for n in g.nodes:
        if isinstance(n, Input):
            y = frame
        else:
            rule = LOWER.get(type(n))
            if rule is None:
                raise DeployError(f"the ONNX export has no rule for {n.name} ({n.op}); fold BatchNorm and quantize "
                                  "first")
            y = rule(em, n, [vals[i] for i in n.inputs], ctx)
        vals[n.name] = y
        if n.out_kind == "spike" and not isinstance(n, Broadcast):
            spikes[n.name] = y
    return StepResult(vals[g.output.name], spikes)


# ---------------------------------------------------------------- the model

def check_exportable(qg: Graph, variant: str) -> None:
    if variant not in VARIANTS:
        raise DeployError(f"ONNX variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    if not qg.meta.get("quantized"):
        raise DeployError("the ONNX export reads a quantized deploy graph (run quantize first)")
    inputs = qg.of_type(Input)
    if len(inputs) != 1 or qg.nodes[0] is not inputs[0]:
        raise DeployError("the ONNX export needs exactly one Input node, first in the graph")


def output_name(qg: Graph, variant: str) -> str:
    base = "logits" if isinstance(qg.output, Readout) else "output"
    return base + "_int" if (variant == "int" and qg.output.out_kind == "current") else base


def readout_mode(qg: Graph) -> str:
    return qg.output.mode if isinstance(qg.output, Readout) else "none"


def lif_nodes(qg: Graph) -> list:
    return qg.of_type(LIF)


def batch_shape(shape) -> list:
    return [BATCH] + [int(d) for d in shape]


def finish_output(em: Emitter, v: Value, name: str, spike: bool) -> str:
    """The graph output tensor: spikes as uint8 0/1, currents as they are."""
    if spike and v.dtype != UINT8:
        return em.op("Cast", [v.name], name, raw_name=True, to=UINT8)
    return em.op("Identity", [v.name], name, raw_name=True)


def to_onnx(qgraph: Graph, variant: str = "int", debug_outputs: bool = False, unroll: bool = False,
            check: bool = True) -> onnx.ModelProto:
    """The ONNX model of a quantized deploy graph (or sub-graph), see the module docstring. `check` runs
    onnx's full checker (type and shape inference included) on the result."""
    check_exportable(qgraph, variant)
    build = build_unrolled if unroll else build_step
    model = onnx.ModelProto(ir_version=IR_VERSION,   # onnx >= 1.23 would write 14, refused by onnxruntime 1.31
                            producer_name="sdt-deploy", producer_version=__version__,
                            doc_string=f"Spike-Driven Transformer, {variant} variant, "
                                       f"{'all T steps unrolled' if unroll else 'one time step per call'}")
    model.opset_import.append(helper.make_opsetid("", OPSET))
    build(model.graph, qgraph, variant, debug_outputs)
    for key, value in metadata(qgraph, variant, unroll, debug_outputs).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = META + key, value
    if check:
        onnx.checker.check_model(model, full_check=True)
    return model


def is_v2(qg: Graph) -> bool:
    return qg.meta.get("family") == "v2"


def make_context(qg: Graph, variant: str, state_in, state_out) -> StepContext:
    wide = is_v2(qg)          # V2: float64 currents in the float variant (bounds decide what is exact)
    bounds = channel_bounds(qg) if variant == "int" or wide else {}
    return StepContext(qg, variant, bounds, state_in, state_out, float_type=DOUBLE if wide else FLOAT)


def fill_graph(graph: onnx.GraphProto, em: Emitter, name: str, inputs: list, outputs: list) -> None:
    """The emitted nodes, inputs, outputs and constants into `graph` (the model's own, so that it is
    never copied whole), the constants moved one at a time: the weights exist twice for one tensor's
    time, not the model's (SDT-8-768: 63 MiB)."""
    made = helper.make_graph(em.nodes, name, inputs, outputs)
    graph.CopyFrom(made)
    for key in list(em.initializers):
        graph.initializer.append(em.initializers.pop(key))


def build_step(graph: onnx.GraphProto, qg: Graph, variant: str, debug: bool) -> None:
    em = Emitter()
    inp = qg.input
    lifs = lif_nodes(qg)
    state_types: dict[str, int] = {}

    def state_in(name: str, x: Value) -> str:
        state_types[name] = x.dtype
        return STATE_IN + name

    ctx = make_context(qg, variant, state_in, lambda name: STATE_OUT + name)
    frame = lower_input(em, inp, inp.name, ctx)
    step = lower_step(em, qg, frame, ctx)
    out_name = output_name(qg, variant)
    finish_output(em, step.output, out_name, qg.output.out_kind == "spike")
    outputs = [value_info(out_name, out_type(step.output, qg), batch_shape(qg.output.shape))]
    inputs = [value_info(inp.name, FLOAT, batch_shape(inp.shape))]
    for n in lifs:
        shape = batch_shape(n.shape)
        inputs.append(value_info(STATE_IN + n.name, state_types[n.name], shape))
        outputs.append(value_info(STATE_OUT + n.name, state_types[n.name], shape))
    if debug:
        for name, v in step.spikes.items():
            finish_output(em, v, name, spike=True)
            outputs.append(value_info(name, UINT8, batch_shape(qg[name].shape)))
    fill_graph(graph, em, f"sdt_{variant}_step", inputs, outputs)


def build_unrolled(graph: onnx.GraphProto, qg: Graph, variant: str, debug: bool) -> None:
    em = Emitter()
    inp = qg.input
    T = int(qg.meta["time_steps"])
    carried: dict[str, str] = {}

    def state_in(name: str, x: Value) -> str:
        if name in carried:
            return carried[name]
        # the first step starts at rest: zeros shaped like the LIF's input
        zero = numpy_helper.from_array(np.zeros(1, dtype=np_dtype(x.dtype)), "value")
        shape = em.op("Shape", [x.name], f"{name}/state_shape")
        return em.op("ConstantOfShape", [shape], f"{name}/state_zero", value=zero)

    ctx = make_context(qg, variant, state_in, lambda name: f"{em.prefix}{name}/v")
    seq = lower_input(em, inp, inp.name, ctx)   # [batch, T, C, H, W]
    outs, taps = [], {}
    for t in range(T):
        em.prefix = f"t{t}/"
        frame = Value(em.op("Gather", [seq.name, em.scalar(t, INT64)], f"{inp.name}/frame", axis=1),
                      seq.dtype, seq.grid)
        step = lower_step(em, qg, frame, ctx)
        carried = {name: v for name, (v, _) in ctx.states.items()}
        outs.append(step.output)
        for name, v in step.spikes.items():
            taps.setdefault(name, []).append(v)
    em.prefix = ""
    out_name = output_name(qg, variant)
    stack_over_time(em, outs, out_name, qg.output.out_kind == "spike")
    outputs = [value_info(out_name, out_type(outs[0], qg), [T] + batch_shape(qg.output.shape))]
    if debug:
        for name, vs in taps.items():
            stack_over_time(em, vs, name, spike=True)
            outputs.append(value_info(name, UINT8, [T] + batch_shape(qg[name].shape)))
    inputs = [value_info(inp.name, FLOAT, [BATCH, T] + [int(d) for d in inp.shape])]
    fill_graph(graph, em, f"sdt_{variant}_unrolled_t{T}", inputs, outputs)


def stack_over_time(em: Emitter, vs: list, name: str, spike: bool) -> str:
    steps = []
    for t, v in enumerate(vs):
        if spike and v.dtype != UINT8:
            v = Value(em.op("Cast", [v.name], f"t{t}/{name}/uint8", raw_name=True, to=UINT8), UINT8, None)
        steps.append(em.op("Unsqueeze", [v.name, em.ints([0])], f"t{t}/{name}/step", raw_name=True))
    return em.op("Concat", steps, name, raw_name=True, axis=0)


def out_type(v: Value, qg: Graph) -> int:
    return UINT8 if qg.output.out_kind == "spike" else v.dtype


def value_info(name: str, elem_type: int, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, shape)


# ---------------------------------------------------------------- metadata

def compact_grid(grid) -> object:
    """A per-channel exponent list, or one int where every channel shares it."""
    g = np.asarray(grid, dtype=np.int64).reshape(-1)
    return int(g[0]) if g.size and np.all(g == g[0]) else g.tolist()


def metadata(qg: Graph, variant: str, unroll: bool, debug: bool) -> dict:
    out = qg.output
    grids = {n.name: compact_grid(n.grid) for n in qg.nodes if n.grid is not None}
    lifs = lif_nodes(qg)
    meta = {
        "tool_version": __version__,
        "variant": variant,
        "unrolled": json.dumps(bool(unroll)),
        "time_steps": str(int(qg.meta["time_steps"])),
        "readout": readout_mode(qg),
        "input": qg.input.name,
        "input_grid": json.dumps(compact_grid(qg.input.grid)),
        "input_bits": json.dumps(None if qg.input.bits is None else int(qg.input.bits)),
        "output": output_name(qg, variant),
        "output_node": out.name if not isinstance(out, Readout) else out.inputs[0],
        "output_grid": json.dumps(None if out.grid is None else np.asarray(out.grid, np.int64).tolist()),
        "states": json.dumps([] if unroll else [n.name for n in lifs]),
        "lif_theta_int": json.dumps({n.name: compact_grid(n.theta_int) for n in lifs if n.theta_int is not None},
                                    sort_keys=True),
        "spikes": json.dumps([n.name for n in qg.spike_nodes() if not isinstance(n, Broadcast)] if debug else []),
        "grids": json.dumps(grids, sort_keys=True),
        "config": json.dumps(qg.meta.get("config", {}), sort_keys=True),
        "quantization": json.dumps(settings_of(qg.meta), sort_keys=True),
        "provenance": json.dumps(qg.meta.get("provenance", {}), sort_keys=True),
    }
    if "partition" in qg.meta:
        meta["partition"] = str(qg.meta["partition"])
        meta["cut"] = str(qg.meta.get("cut", ""))
    if is_v2(qg):         # (V1 exports keep their keys as they were: their bytes are pinned)
        meta["family"] = "v2"
        meta["arithmetic"] = "int" if variant == "int" else "float64"
        meta["reparam"] = json.dumps(bool(qg.meta.get("reparam")))
    return meta


def read_metadata(model: onnx.ModelProto) -> dict:
    """The `sdt_deploy.*` metadata of an exported model, keys without the prefix."""
    return {p.key[len(META):]: p.value for p in model.metadata_props if p.key.startswith(META)}


def write_onnx(qgraph: Graph, path: str, variant: str = "int", debug_outputs: bool = False,
               unroll: bool = False) -> None:
    """Export and write atomically (a temporary file renamed into place once complete)."""
    # serialized at once and the ModelProto let go; the checker reads these very bytes (given the
    # ModelProto it would serialize another copy: SDT-8-768, 63 MiB more at the export's peak)
    data = to_onnx(qgraph, variant=variant, debug_outputs=debug_outputs, unroll=unroll, check=False).SerializeToString()
    onnx.checker.check_model(data, full_check=True)
    with atomic_write(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
