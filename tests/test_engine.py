"""Dyadic quantization and the integer engine: spike-exact to the quantized PyTorch model.

The reference side is always the quantized torch model — spikingjelly's own LIF nodes in float32 (float64
where the bit analysis says float32 may round) — never the engine compared with itself.
"""
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdt_deploy import quantize
from sdt_deploy.data.synth import random_inputs, random_model
from sdt_deploy.errors import DeployError
from sdt_deploy.ir.graph import LIF
from sdt_deploy.quant.bits import bit_report
from sdt_deploy.quant.contract import QuantOptions, quantize_weight
from sdt_deploy.run.float_executor import execute
from sdt_deploy.run.integer_engine import run_engine, synaptic_conv
from sdt_deploy.run.lif import integer_lif
from sdt_deploy.run.torch_runner import run_model

from conftest import ALL_CASES, ROOT, case_input, case_path, loaded, quantized, small_configs, split_everything


def reference(q, x):
    """The quantized torch model; in float64 where float32 is not guaranteed exact (bit analysis)."""
    model = q.model
    if not bit_report(q.graph)["summary"]["float32_exact"]:
        import copy

        model = copy.deepcopy(q.model).double()    # a copy: the cached model stays float32
        x = x.astype(np.float64)
    return run_model(model, x)


def assert_engine_exact(q, x):
    logits, spikes = reference(q, x)
    r = run_engine(q.graph, x)
    for k in spikes:
        np.testing.assert_array_equal(r.spikes[k], spikes[k], err_msg=k)
    np.testing.assert_allclose(r.logits, logits, rtol=1e-6, atol=1e-6)
    return r, spikes


@pytest.mark.parametrize("name", ALL_CASES)
def test_engine_equals_the_quantized_torch_model(name):
    q = quantized(case_path(name))
    r, spikes = assert_engine_exact(q, case_input(name))
    assert sum(v.sum() for v in spikes.values()) > 0


@pytest.mark.parametrize("bits", [4, 2])
def test_low_bit_widths_stay_exact(bits):
    q = quantize(loaded(case_path("mlp1_0101")), weight_bits=bits)
    assert max(int(np.abs(n.w_int).max()) for n in q.graph.nodes if n.op in ("conv", "linear")) <= 2 ** (bits - 1) - 1
    assert_engine_exact(q, case_input("mlp1_0101"))


def test_exact_ties_at_the_threshold_occur_and_match():
    """talking_heads_lif sees integer token counts against 0.5: H == theta is common on the grid."""
    ties = 0
    for name in ALL_CASES:
        q = quantized(case_path(name))
        x = case_input(name)
        r = run_engine(q.graph, x, membranes=True)
        _, spikes = reference(q, x)
        for n in q.graph.of_type(LIF):
            th = n.theta_int.reshape((1, 1, -1) + (1,) * (len(n.shape) - 1))
            at = r.membranes[n.name] == th
            ties += int(at.sum())
            # every tie fired, on both sides (>=, not >)
            assert r.spikes[n.name][at].all() and spikes[n.name][at].all()
    assert ties > 100


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-40, 40), min_size=1, max_size=16), st.sampled_from([0.5, 1.0, 3.0]),
       st.integers(0, 4))
def test_integer_lif_equals_spikingjelly_on_the_grid(xs, theta, grid):
    """floor-shift LIF on integers == spikingjelly's float LIF on the same dyadic values (exact ties too)."""
    from spikingjelly.clock_driven.neuron import MultiStepLIFNode

    grid = max(grid, 1 if theta == 0.5 else 0)
    node = MultiStepLIFNode(tau=2.0, v_threshold=theta, detach_reset=True)
    X = torch.tensor(xs, dtype=torch.float64) / 2 ** grid
    expected = node(X[:, None]).numpy()[:, 0].astype(np.uint8)
    got, _ = integer_lif(np.array(xs, dtype=np.int64)[:, None], np.array([int(theta * 2 ** grid)]), channel_axis=1)
    np.testing.assert_array_equal(got[:, 0], expected)


def test_integer_lif_hand_computation():
    # theta 1 on grid 2**-1 (theta_int 2); X = 1.5, -1.5, 2.5 -> ints 3, -3, 5
    # H1 = floor(3/2) = 1 (<2, 0.75 exact); H2 = floor((1-3)/2) = -1 (-0.375 exact -> floor -0.5);
    # H3 = floor((-1+5)/2) = 2 >= 2 fires (exact 1.0625)
    s, _ = integer_lif(np.array([[3], [-3], [5]]), np.array([2]), channel_axis=1)
    assert s[:, 0].tolist() == [0, 0, 1]


def test_synaptic_conv_adds_only_spiking_columns():
    rng = np.random.default_rng(0)
    S = (rng.random((2, 3, 5, 5)) < 0.2).astype(np.uint8)
    w = rng.integers(-127, 128, size=(4, 3, 3, 3)).astype(np.int8)
    out, adds = synaptic_conv(S, w, padding=1)
    ref = torch.nn.functional.conv2d(torch.from_numpy(S).double(), torch.from_numpy(w.astype(np.float64)), padding=1)
    np.testing.assert_array_equal(out, ref.numpy().astype(np.int64))
    brute = 0
    for _, _, y, x in zip(*np.nonzero(S)):
        for ky in range(3):
            for kx in range(3):
                yo, xo = y - ky + 1, x - kx + 1
                brute += (0 <= yo < 5) and (0 <= xo < 5)
    assert adds == brute * 4


def test_plif_decay_is_snapped_to_one_half_and_reported():
    q = quantized(case_path("plif_1111"))
    taus = q.graph.meta["plif_tau"]
    assert taus and all(1.89 <= t <= 2.01 for t in taus.values())
    assert all(n.tau == 2.0 and n.plif_w == 0.0 for n in q.graph.of_type(LIF))
    assert all(float(m.w.detach()) == 0.0 for m in q.model.modules()
               if hasattr(m, "w") and isinstance(m.w, torch.nn.Parameter))


def test_dequantized_weights_are_exactly_representable():
    q = quantized(case_path("lif_0011"))
    for n in q.graph.nodes:
        if n.op in ("conv", "linear"):
            assert n.weight is None            # the integers alone are stored
            w = n.float_weight()
            shape = (-1,) + (1,) * (w.ndim - 1)
            assert np.array_equal(w, n.w_int * np.exp2(-n.w_exp.astype(float)).reshape(shape))
            assert w.dtype == np.float32 and np.array_equal(w.astype(np.float64), n.w_int * np.exp2(
                -n.w_exp.astype(float)).reshape(shape))
            assert np.array_equal(n.bias, n.b_int * np.exp2(-n.grid.astype(float)))


def test_brevitas_power_of_two_scales_round_to_nearest():
    w = np.array([[0.5, -0.26, 0.1], [1e-3, 2e-3, -4e-3]])
    w_int, e = quantize_weight(w, 8, "max")
    # brevitas' max-based power-of-two scale: 2**ceil(log2(max|w| / 2**(bits-1))), narrow range +-127
    assert e.tolist() == [8, 14]
    np.testing.assert_array_equal(w_int[0], [127, -67, 26])      # 0.5*256 = 128 saturates to 127
    np.testing.assert_array_equal(w_int[1], np.round(w[1] * 2 ** 14))


def test_engine_refuses_rather_than_wrapping():
    """A bias of 2**62 grid steps: fc2's output still fits int64 (below 2**63), but the residual add, where
    it meets the stream on the stream's finer grid, does not; that node is named."""
    q = quantized(case_path("lif_0011"))
    g = q.graph.copy()
    node = g["block.0.mlp.fc2_conv"]
    node.b_int = node.b_int + np.int64(2 ** 62)
    with pytest.raises(DeployError, match=r"^block\.0\.mlp\.add: worst-case integer magnitude"):
        run_engine(g, case_input("lif_0011"))


def test_bit_report_says_which_side_is_exact():
    rep = bit_report(quantized(case_path("gesture_t16")).graph)
    assert rep["summary"]["time_steps"] == 16
    assert not rep["summary"]["float32_exact"]          # T = 16: the LIF state outgrows 24 bits
    assert "integer engine" in rep["summary"]["exact_side"]
    assert rep["summary"]["engine_int64_ok"]


def test_quant_options_are_validated():
    for bad in (dict(weight_bits=1), dict(weight_bits=9), dict(input_bits=0), dict(scale_search="x"),
                dict(input_range=-1.0)):
        with pytest.raises(DeployError):
            QuantOptions(**bad)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(small_configs(), st.integers(0, 2 ** 16), st.sampled_from([8, 4]), st.sampled_from(["max", "max", "mse"]))
def test_property_engine_equals_quantized_torch(cfg, seed, bits, search):
    # (brevitas' MSE scale search costs ~0.3 s a layer: drawn a third of the time to keep CI short)
    model = random_model(cfg, seed=seed, calibration=8)
    x = random_inputs(cfg, 2, seed=seed + 1, events=cfg.dvs_mode)
    q = quantize(model, weight_bits=bits, scale_search=search)
    r, spikes = assert_engine_exact(q, x)
    rates = [float(v.mean()) for k, v in spikes.items() if k.endswith("_lif")]
    assert np.median(rates) > 0.01     # the check is not vacuous: layers do fire
    # and the float executor on the quantized graph is the same computation again
    _, ex_spikes, _ = execute(q.graph, x, dtype=torch.float64)
    assert all(np.array_equal(ex_spikes[k], spikes[k]) for k in spikes)


def _plain_brevitas(w: np.ndarray, bits: int):
    """brevitas' MSE fixed-point quantizer run as a user would, on the float32 weight, unpatched: the
    oracle for our memoized, pruned, chunked and threaded use of it."""
    import warnings

    import torch
    from brevitas.nn import QuantLinear
    from brevitas.quant.fixed_point import Int8WeightPerChannelFixedPointMSE

    flat = torch.from_numpy(np.ascontiguousarray(w.reshape(w.shape[0], -1), dtype=np.float32))
    layer = QuantLinear(flat.shape[1], flat.shape[0], bias=False, weight_quant=Int8WeightPerChannelFixedPointMSE,
                        weight_bit_width=bits)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer.weight.copy_(flat)
        layer.eval()
        qw = layer.quant_weight()
    scale = qw.scale.detach().reshape(-1).double().numpy()
    return np.round(qw.value.detach().double().numpy() / scale[:, None]).reshape(w.shape), -np.log2(scale)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_mse_scale_search_equals_plain_brevitas(bits, monkeypatch):
    from sdt_deploy.quant import brevitas_backend

    rng = np.random.default_rng(bits)
    w = rng.standard_normal((300, 3, 3, 3)) * 0.05
    w[::7] *= rng.standard_t(2, size=(len(w[::7]), 3, 3, 3))     # heavy tails: clipping pays off there
    w[5, 0, 0, 0] = 3.0                                             # one outlier channel
    w[11] = 0.0                                                     # an all-zero channel
    w[17] = 1e-3 * np.sign(rng.standard_normal((3, 3, 3)))          # all weights one magnitude
    monkeypatch.setattr(brevitas_backend, "CHUNK_ELEMENTS", 1000)       # several blocks per weight
    w_int, e = quantize_weight(w, bits, "mse")
    ref_int, ref_e = _plain_brevitas(w, bits)
    nonzero = np.any(ref_int.reshape(len(w), -1) != 0, axis=1)
    np.testing.assert_array_equal(w_int, ref_int)
    np.testing.assert_array_equal(e[nonzero], ref_e[nonzero])
    # and the search did choose: some channels clip (a scale below max|w| / (2**(bits-1) - 1))
    assert np.any(np.abs(w).reshape(len(w), -1).max(axis=1) > (2 ** (bits - 1) - 1) * np.exp2(-e.astype(float)))


def test_distinct_scale_slots_cover_every_masked_scale():
    from sdt_deploy.quant.brevitas_backend import _distinct_scale_slots

    scales = np.array([[1., 4., 2.], [2., 4., 2.], [2., 2., 1.], [4., 1., 1.]])
    mask = np.array([[1, 1, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]], dtype=bool)
    slots = _distinct_scale_slots(scales, mask)
    # column 0: scales 1, 2 (rows 0, 1; row 3's 4 is masked out); column 1: 4, 2, 1; column 2: none
    assert [int(s[0]) for s in slots] == [1, 0, 0]
    assert [int(s[1]) for s in slots] == [0, 2, 3]
    assert [int(s[2]) for s in slots] == [-1, -1, -1]


def _integers(graph) -> dict:
    return {n.name: (n.w_int, n.w_exp, n.b_int) for n in graph.nodes if getattr(n, "w_int", None) is not None}


def _same_integers(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(all(np.array_equal(x, y) for x, y in zip(a[k], b[k])) for k in a)


def test_quantization_threads_do_not_change_the_integers(monkeypatch):
    """The layers are quantized on a thread pool: one thread and three give the same integers."""
    from sdt_deploy.quant import brevitas_backend

    lm = loaded(case_path("plif_1111"))
    by_threads = {}
    for workers in (1, 3):
        monkeypatch.setattr(brevitas_backend, "quantization_workers", lambda w=workers: w)
        by_threads[workers] = _integers(quantize(lm).graph)
    assert len(by_threads[1]) > 5 and _same_integers(by_threads[1], by_threads[3])


def test_consuming_quantization_gives_the_same_graph_and_releases_the_model():
    from sdt_deploy import load_model

    path = case_path("lif_0011")
    reference = quantize(loaded(path))
    source = load_model(path)
    consumed = quantize(source, consume=True)
    assert source.model is None and not source.checkpoint.state_dict      # nothing of the float model left
    assert _same_integers(_integers(consumed.graph), _integers(reference.graph))
    x = case_input("lif_0011")
    _, a = run_model(consumed.model, x)                                   # built from the graph alone
    _, b = run_model(reference.model, x)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_streamed_float32_fold_gives_the_integers_of_the_float64_fold():
    """`quantize` folds each layer just before quantizing it, straight into float32; the integers must
    be those of the whole model folded in float64 first (`fold_bn`) and then quantized."""
    from sdt_deploy.ir.lower import lower
    from sdt_deploy.ir.passes import fold_bn
    from sdt_deploy.quant.contract import fold_and_quantize, quantize_graph

    for name in ("mlp1_0101", "plif_dvs_0000"):
        lm = loaded(case_path(name))
        opts = QuantOptions(data=lm.resolved.data)
        whole = quantize_graph(fold_bn(lower(lm.model)), opts)
        streamed = fold_and_quantize(lower(lm.model), opts)
        assert len(_integers(whole)) > 5 and _same_integers(_integers(streamed), _integers(whole)), name


_QUANTIZE_IN_A_FRESH_PROCESS = """
import sys
import numpy as np
import torch
plain = sys.argv[2] == "plain"
if plain:
    import brevitas.nn                          # as a user would: torch._dynamo comes with it
from sdt_deploy.quant.contract import quantize_weight
w = np.random.default_rng(7).standard_normal((96, 3, 3, 3)) * 0.05
w[3] *= 20.0
w_int, e = quantize_weight(w, 4, "mse")
assert ("torch._dynamo" in sys.modules) == plain, sorted(m for m in sys.modules if "_dynamo" in m)[:3]
import brevitas
assert plain or brevitas.is_dynamo_compiling is torch.compiler.is_compiling
assert plain or "_dynamo" not in vars(torch)    # no stand-in left behind: torch's lazy import is back
import torch._dynamo                            # the real module is still there for whoever asks
assert hasattr(torch._dynamo, "config") and callable(torch._dynamo.is_compiling)
np.savez(sys.argv[1], w_int=w_int, e=e)
"""


def test_brevitas_imported_without_torch_dynamo_quantizes_the_same(tmp_path):
    """`sdt_deploy.brevitas_import` keeps torch's compiler stack out of brevitas' import (0.85 s of an
    export); in fresh processes, the integers equal those of brevitas imported the plain way, and
    torch._dynamo still imports afterwards."""
    import subprocess
    import sys

    out = {}
    for how in ("shim", "plain"):
        path = tmp_path / f"{how}.npz"
        proc = subprocess.run([sys.executable, "-c", _QUANTIZE_IN_A_FRESH_PROCESS, str(path), how],
                              capture_output=True, text=True, timeout=300, cwd=str(ROOT))
        assert proc.returncode == 0, proc.stderr[-2000:]
        out[how] = np.load(path)
    assert np.array_equal(out["shim"]["w_int"], out["plain"]["w_int"])
    assert np.array_equal(out["shim"]["e"], out["plain"]["e"])
    assert np.any(out["plain"]["w_int"] != 0)


_BREVITAS_NEEDING_MORE_OF_DYNAMO = """
import sys
import torch
from sdt_deploy.quant import brevitas_import
plain = brevitas_import._import_modules

def wants_more():                       # a brevitas that reads torch._dynamo.config at import
    torch._dynamo.config
    plain()

brevitas_import._import_modules = wants_more
brevitas_import.import_brevitas()
import brevitas.nn
assert "torch._dynamo" in sys.modules and hasattr(torch._dynamo, "config")
assert brevitas.is_dynamo_compiling is torch._dynamo.is_compiling      # imported anew, the plain way
assert hasattr(brevitas.nn, "QuantLinear")
"""


def test_brevitas_needing_more_of_torch_dynamo_is_imported_the_plain_way():
    """Should a brevitas release read more of torch._dynamo at import than `is_compiling`, the stand-in
    is dropped and brevitas imported again with the real module (in a fresh process)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _BREVITAS_NEEDING_MORE_OF_DYNAMO], capture_output=True,
                          text=True, timeout=300, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("name", ["lif_0011", "plif_dvs_0000"])
def test_engine_threads_split_every_layer_without_changing_anything(name, monkeypatch):
    """The engine splits a large layer over threads (the event additions and the LIF updates). With the
    size limits at 0 every layer is split: the result equals one thread's in every spike, integer, count
    and observed bound, and the torch model's spikes."""
    q = quantized(case_path(name))
    x = np.concatenate([case_input(name)] * 3)[:5]             # 5 samples over 3 threads: uneven parts
    one = run_engine(q.graph, x, threads=1)
    split_everything(monkeypatch)
    split = run_engine(q.graph, x, threads=3)
    assert one.spikes.keys() == split.spikes.keys()
    assert all(np.array_equal(one.spikes[k], split.spikes[k]) for k in one.spikes)
    assert np.array_equal(one.logits_int, split.logits_int)
    assert one.ops == split.ops and one.observed == split.observed
    _, spikes = reference(q, x)
    assert all(np.array_equal(split.spikes[k], spikes[k]) for k in spikes)


def test_arena_limit_restored_after_quantization_is_the_users_own():
    """The quantizer limits glibc's heaps while its threads start; afterwards the limit goes back to
    what the user set (MALLOC_ARENA_MAX, or glibc.malloc.arena_max in GLIBC_TUNABLES, which wins as
    glibc reads it last), else glibc's default; a value glibc would ignore falls back to that default."""
    from sdt_deploy.quant.brevitas_backend import arena_max_after

    default = arena_max_after({})
    assert arena_max_after({"MALLOC_ARENA_MAX": "2"}) == 2
    assert arena_max_after({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=9:glibc.malloc.arena_max=3"}) == 3
    assert arena_max_after({"MALLOC_ARENA_MAX": "2", "GLIBC_TUNABLES": "glibc.malloc.arena_max=5"}) == 5
    for ignored in ("lots", "0", "-3", ""):
        assert arena_max_after({"MALLOC_ARENA_MAX": ignored}) == default, ignored
    assert default not in (2, 3, 5) and default >= 1
