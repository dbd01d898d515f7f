"""The ONNX target (exporters.onnx, sdt_deploy.run.onnx_runner).

Expected values come from independent sources only: the quantized torch model (`run_model` on
`quantize(path).model`, spikingjelly's LIF), the integer engine (`run_engine`) and the float executor
(`execute`) — never from the exporter itself.
"""
from __future__ import annotations

import dataclasses
import functools
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto

import sdt_deploy
from exporters.bundle import partition
from exporters.onnx import IR_VERSION, OPSET, read_metadata, to_onnx, write_onnx
from sdt_deploy.errors import DeployError
from sdt_deploy.ir.graph import LIF, Graph, Input
from sdt_deploy.run.float_executor import execute
from sdt_deploy.run.integer_engine import run_engine
from sdt_deploy.run.onnx_runner import open_onnx, run_onnx
from sdt_deploy.run.torch_runner import run_model

from conftest import ALL_CASES, case_input, case_path, quantized

VARIANTS = ("int", "float")
FLOATS = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}


# ---------------------------------------------------------------- shared references (cached per case)

def batch_of(case: str) -> np.ndarray:
    """The case's input; the fixture (dim 256, 32x32) is cut to 2 samples to keep the file fast."""
    x = case_input(case)
    return x[:2] if case == "fixture" else x


@functools.lru_cache(maxsize=None)
def torch_reference(case: str):
    return run_model(quantized(case_path(case)).model, batch_of(case))


@functools.lru_cache(maxsize=None)
def engine_reference(case: str):
    return run_engine(quantized(case_path(case)).graph, batch_of(case))


@functools.lru_cache(maxsize=None)
def exported(case: str, variant: str, unroll: bool = False, debug: bool = True) -> bytes:
    return to_onnx(quantized(case_path(case)).graph, variant, debug_outputs=debug, unroll=unroll).SerializeToString()


def assert_spikes_equal(got: dict, want: dict, batch: slice = slice(None)) -> None:
    missing = sorted(set(want) - set(got))
    assert not missing, f"spike layers absent from the ONNX outputs: {missing}"
    for name, ref in want.items():
        ref = ref[:, batch]
        assert got[name].shape == ref.shape, f"{name}: shape {got[name].shape} != {ref.shape}"
        if not np.array_equal(got[name], ref):
            t, b, *idx = np.argwhere(got[name] != ref)[0]
            raise AssertionError(f"{name}: first spike mismatch at t={t}, b={b}, index={tuple(idx)}")


def assert_readout_matches(run, case: str, variant: str, batch: slice = slice(None)) -> None:
    if variant == "int":   # the integer read-out equals the engine's, bit for bit
        eng = engine_reference(case)
        assert run.logits_int.dtype == np.int64
        np.testing.assert_array_equal(run.logits_int, eng.logits_int[:, batch])
        np.testing.assert_array_equal(run.logits_grid, eng.logits_grid)
        np.testing.assert_array_equal(run.logits, eng.logits[..., batch, :])
    else:                  # the float logits equal the torch model's up to float32 rounding
        logits, _ = torch_reference(case)
        ref = logits[..., batch, :]
        assert run.logits.shape == ref.shape
        np.testing.assert_allclose(run.logits, ref, rtol=1e-6, atol=1e-6 * max(1.0, float(np.abs(ref).max())))


# ---------------------------------------------------------------- spike-exactness on every case

@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", ALL_CASES)
def test_step_model_is_spike_exact_at_batch_1_and_n(case, variant, tmp_path):
    path = str(tmp_path / f"{case}_{variant}.onnx")
    write_onnx(quantized(case_path(case)).graph, path, variant=variant, debug_outputs=True)
    x = batch_of(case)
    assert x.shape[0] > 1
    _, want = torch_reference(case)
    for batch in (slice(0, 1), slice(None)):            # one file, dynamic batch
        run = run_onnx(path, x[batch])
        assert_spikes_equal(run.spikes, want, batch)
        assert_readout_matches(run, case, variant, batch)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", ALL_CASES)
def test_unrolled_model_is_spike_exact(case, variant):
    run = run_onnx(exported(case, variant, unroll=True), batch_of(case))
    _, want = torch_reference(case)
    assert_spikes_equal(run.spikes, want)
    assert_readout_matches(run, case, variant)


def test_spikes_agree_with_the_engine_including_stem_pools():
    """The debug outputs hold every spike node (stem OR-pools too); the engine records them all."""
    case = "plif_1111"   # pooling_stat 1111: all three spike pools of the stem exist
    run = run_onnx(exported(case, "int"), batch_of(case))
    eng = {k: v for k, v in engine_reference(case).spikes.items() if not k.endswith("_broadcast")}
    assert {"patch_embed.maxpool", "patch_embed.maxpool1", "patch_embed.maxpool2"} <= set(eng)
    assert_spikes_equal(run.spikes, eng)


# ---------------------------------------------------------------- integer-only arithmetic

def tensor_types(model: onnx.ModelProto) -> dict:
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    g = inferred.graph
    types = {t.name: t.data_type for t in g.initializer}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        types[vi.name] = vi.type.tensor_type.elem_type
    return types


def float_touching_nodes(model: onnx.ModelProto) -> list:
    """Every node reading or writing a floating-point tensor, in graph order."""
    types = tensor_types(model)
    out = []
    for node in model.graph.node:
        names = [n for n in list(node.input) + list(node.output) if n]
        assert all(n in types for n in names), f"{node.name}: a tensor without an inferred type"
        if any(types[n] in FLOATS for n in names):
            out.append(node)
    return out


def assert_only_input_quantization_is_float(model: onnx.ModelProto) -> None:
    float_nodes = float_touching_nodes(model)
    chain = [n.op_type for n in float_nodes]
    assert chain == ["Mul", "Round", "Clip", "Cast"], f"float arithmetic beyond the input quantization: {chain}"
    mul, _, _, cast = float_nodes
    inputs = {i.name for i in model.graph.input}
    assert mul.input[0] in inputs                                  # it starts at the frame ...
    scale = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == mul.input[1]))
    assert np.all(np.log2(scale) == np.round(np.log2(scale)))      # ... multiplies by a power of two ...
    assert dict((a.name, a.i) for a in cast.attribute)["to"] == TensorProto.INT8   # ... and ends as int8


@pytest.mark.parametrize("unroll", [False, True], ids=["step", "unrolled"])
@pytest.mark.parametrize("case", ALL_CASES)
def test_int_variant_has_no_float_arithmetic_after_input_quantization(case, unroll):
    model = onnx.load_model_from_string(exported(case, "int", unroll=unroll))
    assert_only_input_quantization_is_float(model)
    types = tensor_types(model)
    ops = {n.op_type for n in model.graph.node}
    assert "Conv" not in ops and "Gemm" not in ops and "MatMul" not in ops
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:   # synapses: 8-bit weights on 8-bit operands (int8 image, uint8 spikes)
        if node.op_type in ("ConvInteger", "MatMulInteger"):
            if node.input[1] in inits:      # weights: uint8 with the zero point 128 (signed 8-bit values)
                assert types[node.input[1]] == TensorProto.UINT8
                assert node.input[2] == "" and inits[node.input[3]].dtype == np.uint8
                assert int(inits[node.input[3]]) == 128
            assert types[node.input[0]] in (TensorProto.INT8, TensorProto.UINT8)
            assert types[node.output[0]] == TensorProto.INT32


def test_offset_weights_are_the_signed_weights_and_refuse_more_than_8_bits():
    """uint8 w + 128 with zero point 128 is, by ConvInteger's definition ((x - x_zp) * (w - w_zp)), the
    signed convolution: onnx's own reference evaluator computes it on the extreme weights and inputs."""
    from onnx import helper
    from onnx.reference import ReferenceEvaluator

    from exporters.onnx import Emitter, offset_weights

    rng = np.random.default_rng(0)
    w = rng.integers(-128, 128, (4, 3, 3, 3))
    w[0, 0, 0, :2] = [-128, 127]
    node = dataclasses.make_dataclass("N", ["name"])("conv")
    em = Emitter()
    name, zp = offset_weights(em, node, w, "w_int")
    conv = helper.make_node("ConvInteger", ["x", name, "", zp], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    g = helper.make_graph([conv], "g", [helper.make_tensor_value_info("x", TensorProto.INT8, [2, 3, 5, 5])],
                          [helper.make_tensor_value_info("y", TensorProto.INT32, None)], list(em.initializers.values()))
    x = rng.integers(-128, 128, (2, 3, 5, 5)).astype(np.int8)
    x[0, 0] = -128
    y = ReferenceEvaluator(helper.make_model(g)).run(None, {"x": x})[0]
    xp = np.pad(x.astype(np.int64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    expected = np.zeros((2, 4, 5, 5), np.int64)     # the convolution by hand: sum over channels and taps
    for ky in range(3):
        for kx in range(3):
            expected += np.einsum("bchw,oc->bohw", xp[:, :, ky:ky + 5, kx:kx + 5], w[:, :, ky, kx])
    np.testing.assert_array_equal(y, expected)
    with pytest.raises(DeployError, match="beyond 8 bits"):
        offset_weights(Emitter(), node, np.array([[128]]), "w_int")


def test_the_float_check_can_fail():
    """The float variant fails the integer-only check (so the check above is not vacuous)."""
    model = onnx.load_model_from_string(exported("lif_0011", "float"))
    with pytest.raises(AssertionError):
        assert_only_input_quantization_is_float(model)


# ---------------------------------------------------------------- the floor-shift LIF, proved on negatives

def lif_probe_graph(theta: int, channels: int) -> Graph:
    """Input (already integer, grid 0) -> one LIF with an integer threshold: the LIF alone."""
    grid = np.zeros(channels, np.int64)
    nodes = [Input("x", (), (channels,), grid=grid, bits=None),
             LIF("lif", ("x",), (channels,), grid=grid, theta_int=np.full(channels, theta, np.int64))]
    return Graph(nodes, {"quantized": True, "time_steps": 1, "cut_bound": [2.0 ** 20] * channels})


def test_int_lif_floor_shift_with_negative_values():
    values = np.arange(-9, 10, dtype=np.int64)                    # odd negatives: floor != truncation
    V, X = np.meshgrid(values, values)
    V, X = V.reshape(1, -1), X.reshape(1, -1)
    theta = 3
    model = to_onnx(lif_probe_graph(theta, V.shape[1]), "int", debug_outputs=True)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    v_in = next(i for i in sess.get_inputs() if i.name == "v_in.lif")
    assert v_in.type == "tensor(int32)"
    v_out, spikes = sess.run(["v_out.lif", "lif"], {"x": X.astype(np.float32), "v_in.lif": V.astype(np.int32)})
    H = (V + X) >> 1                                              # numpy: arithmetic shift, floor
    assert np.any((V + X < 0) & ((V + X) % 2 == 1))               # the probe holds odd negative sums
    assert not np.array_equal(H, np.trunc((V + X) / 2))           # where truncation would differ
    np.testing.assert_array_equal(spikes, (H >= theta).astype(np.uint8))
    np.testing.assert_array_equal(v_out, np.where(H >= theta, 0, H))


# ---------------------------------------------------------------- widths: int64 where int32 cannot hold

def with_bias(qg: Graph, layer: str, b0: int) -> Graph:
    g = qg.copy()
    n = g[layer]
    b_int = n.b_int.copy()
    b_int[0] = b0
    nodes = [dataclasses.replace(m, b_int=b_int) if m.name == layer else m for m in g.nodes]
    return g.replace_nodes(nodes)


def test_int64_widening_matches_the_engine():
    case = "lif_0011"
    big = with_bias(quantized(case_path(case)).graph, "block.0.attn.proj_conv", 2 ** 33)
    model = to_onnx(big, "int", debug_outputs=True)
    state_types = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
    assert state_types["v_in.block.0.mlp.fc1_lif"] == TensorProto.INT64      # widened after the big add
    assert state_types["v_in.block.0.attn.q_lif"] == TensorProto.INT32        # untouched before it
    run = run_onnx(model, batch_of(case))
    eng = run_engine(big, batch_of(case))
    assert_spikes_equal(run.spikes, {k: v for k, v in eng.spikes.items() if not k.endswith("_broadcast")})
    np.testing.assert_array_equal(run.logits_int, eng.logits_int)


def test_beyond_int64_is_refused_naming_the_layer():
    huge = with_bias(quantized(case_path("lif_0011")).graph, "block.0.attn.proj_conv", 2 ** 63 - 1)
    with pytest.raises(DeployError, match=r"block\.0\.attn\.proj_conv"):
        to_onnx(huge, "int")


# ---------------------------------------------------------------- format, metadata, determinism

@pytest.mark.parametrize("unroll", [False, True], ids=["step", "unrolled"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_checker_versions_and_metadata(variant, unroll):
    case = "dvs_tet_t10"
    q = quantized(case_path(case))
    model = to_onnx(q.graph, variant, unroll=unroll, check=False)
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == IR_VERSION == 10
    assert [(o.domain, o.version) for o in model.opset_import] == [("", OPSET)]
    meta = read_metadata(model)
    assert meta["tool_version"] == sdt_deploy.__version__
    assert int(meta["time_steps"]) == q.graph.meta["time_steps"] == 10
    assert json.loads(meta["config"]) == json.loads(json.dumps(q.graph.meta["config"]))
    assert meta["variant"] == variant and meta["readout"] == "per_step"   # TET
    grids = json.loads(meta["grids"])
    for n in q.graph.of_type(LIF):
        assert np.array_equal(np.broadcast_to(grids[n.name], n.grid.shape), n.grid)
    lifs = [n.name for n in q.graph.of_type(LIF)]
    ins = {i.name: i for i in model.graph.input}
    outs = {o.name: o for o in model.graph.output}
    if unroll:
        assert set(ins) == {"input"}
        assert ins["input"].type.tensor_type.shape.dim[1].dim_value == 10      # [batch, T, C, H, W]
    else:
        assert set(ins) == {"input"} | {f"v_in.{n}" for n in lifs}
        assert {f"v_out.{n}" for n in lifs} <= set(outs)
        for n in lifs:
            assert ins[f"v_in.{n}"].type == outs[f"v_out.{n}"].type
    for vi in list(ins.values()) + list(outs.values()):                         # dynamic batch
        dims = vi.type.tensor_type.shape.dim
        assert (dims[1] if unroll and vi.name != "input" else dims[0]).dim_param == "batch"


@functools.lru_cache(maxsize=None)
def two_quantizations(case: str) -> tuple:
    """Two independent quantizations of one checkpoint (not the shared cache's single one)."""
    return tuple(sdt_deploy.quantize(case_path(case)).graph for _ in range(2))


@pytest.mark.parametrize("unroll", [False, True], ids=["step", "unrolled"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_two_exports_are_byte_identical(variant, unroll, tmp_path):
    files = []
    for i, graph in enumerate(two_quantizations("lif_0011")):
        files.append(str(tmp_path / f"{i}.onnx"))
        write_onnx(graph, files[-1], variant=variant, unroll=unroll, debug_outputs=True)
    with open(files[0], "rb") as a, open(files[1], "rb") as b:
        assert a.read() == b.read()


# ---------------------------------------------------------------- partitions

@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", ALL_CASES)
def test_host_partition_exports_and_runs(case, variant):
    p = partition(quantized(case_path(case)).graph)
    if p is None:
        pytest.skip(f"{case} has no max-pool over currents (pooling_stat ends in 0): nothing to partition")
    x = batch_of(case)
    want, _, _ = execute(p.host, x)                           # [T, B, C, H, W] x_feat
    run = run_onnx(to_onnx(p.host, variant), x)
    assert run.logits.dtype == np.float32
    np.testing.assert_array_equal(run.logits, want)
    if variant == "int":
        assert_only_input_quantization_is_float(to_onnx(p.host, "int"))


def test_device_partition_runs_from_the_cut():
    """The other side of the cut (an Input with bits None, on-grid floats) exports too."""
    case = "lif_0011"
    p = partition(quantized(case_path(case)).graph)
    feat, _, _ = execute(p.host, batch_of(case))
    x = np.ascontiguousarray(feat.swapaxes(0, 1))             # [B, T, C, H, W]
    eng = run_engine(p.device, x)
    run = run_onnx(to_onnx(p.device, "int", debug_outputs=True), x)
    assert_spikes_equal(run.spikes, {k: v for k, v in eng.spikes.items() if not k.endswith("_broadcast")})
    np.testing.assert_array_equal(run.logits_int, eng.logits_int)


# ---------------------------------------------------------------- run_onnx's interface

def test_run_onnx_input_layouts_and_errors():
    case = "lif_0011"
    x = batch_of(case)
    T = quantized(case_path(case)).graph.meta["time_steps"]
    model = exported(case, "int")
    a = run_onnx(model, x)
    b = run_onnx(model, np.repeat(x[:, None], T, axis=1), batch_size=2)   # [B, T, C, H, W], in batches
    np.testing.assert_array_equal(a.logits_int, b.logits_int)
    assert_spikes_equal(b.spikes, a.spikes)
    opened = open_onnx(model)                                                # one session, many calls
    np.testing.assert_array_equal(run_onnx(opened, x[1:]).logits_int, a.logits_int[:, 1:])
    plain = run_onnx(exported(case, "int", debug=False), x)
    assert plain.spikes == {} and plain.membranes == {}                    # states kept on request only
    np.testing.assert_array_equal(plain.logits_int, a.logits_int)
    kept = run_onnx(exported(case, "int", debug=False), x, batch_size=2, membranes=True)
    engine = run_engine(quantized(case_path(case)).graph, x, membranes="after_reset")
    assert kept.membranes.keys() == engine.membranes.keys() and kept.membranes
    for k, v in engine.membranes.items():                                  # v_out after every step
        np.testing.assert_array_equal(kept.membranes[k], v, err_msg=k)
    with pytest.raises(DeployError, match="shape"):
        run_onnx(model, x[:, :, :8])
    with pytest.raises(DeployError, match="time steps"):
        run_onnx(exported(case, "int", unroll=True), np.repeat(x[:, None], T + 1, axis=1))
    with pytest.raises(DeployError, match="sdt_deploy"):
        bare = onnx.load_model_from_string(model)
        del bare.metadata_props[:]
        run_onnx(bare, x)


def test_refuses_unquantized_graphs_and_unknown_variants():
    from sdt_deploy import deploy_graph

    with pytest.raises(DeployError, match="quantized"):
        to_onnx(deploy_graph(case_path("lif_0011")), "float")
    with pytest.raises(DeployError, match="variant"):
        to_onnx(quantized(case_path("lif_0011")).graph, "int4")
