"""The NIR target: `exporters.nir` (deploy graph -> .nir) and `sdt_deploy.run.nir_interpreter` (executors).

Expected values come only from independent sources: the quantized torch model (spikingjelly), the
integer engine, the float executor, torch's own pooling ops, stock `nir.read` and snntorch's importer --
never from the exporter's own output.
"""
from __future__ import annotations

import json
import os
from fractions import Fraction

import nir
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from exporters.bundle import partition
from exporters.nir import DT, OUTPUT, to_nir, write_nir
from models.sdt import heads_or_pool
from sdt_deploy.errors import DeployError
from sdt_deploy.ir.graph import LIF, Conv, Graph, Input, Linear, OrPool, Readout
from sdt_deploy.ir.lower import spike_tensor_names
from sdt_deploy.run import nir_interpreter as NI
from sdt_deploy.run.float_executor import execute
from sdt_deploy.run.integer_engine import run_engine
from sdt_deploy.run.nir_interpreter import nir_input, nir_layer_spikes, run_nir, torch_threads
from sdt_deploy.run.nir_simulators import run_snntorch
from sdt_deploy.run.torch_runner import run_model

from conftest import ALL_CASES, case_input, case_path, quantized

FIXTURE_BATCH = 2          # the fixture (256 dims, 8x8 tokens) is the slow one: a subset of its batch
_memo: dict = {}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Small tensors: one torch thread is faster, and far faster on a busy machine (restored after)."""
    with torch_threads(1):
        yield


def memo(key, make):
    if key not in _memo:
        _memo[key] = make()
    return _memo[key]


def case_batch(name: str) -> np.ndarray:
    x = case_input(name)
    return x[:FIXTURE_BATCH] if name == "fixture" else x


def torch_spikes(name: str):
    """(logits, spikes) of the quantized torch model: the reference."""
    return memo(("torch", name), lambda: run_model(quantized(case_path(name)).model, case_batch(name)))


def engine_step_logits(name: str) -> np.ndarray:
    """The integer engine's per-step logits [T, B, K] (exact dyadic values)."""
    def make():
        r = run_engine(quantized(case_path(name)).graph, case_batch(name), record=False)
        return r.logits_int * np.exp2(-np.asarray(r.logits_grid, dtype=np.float64))
    return memo(("engine", name), make)


def device_part(name: str):
    """(graph that goes to NIR, host output [B, T, ...] or None when the whole graph is exported)."""
    def make():
        g = quantized(case_path(name)).graph
        p = partition(g)
        if p is None:
            return g, None
        host, _, _ = execute(p.host, case_batch(name))          # [T, B, C, H, W], exactly on the grid
        return p.device, np.ascontiguousarray(np.swapaxes(host, 0, 1), dtype=np.float64)
    return memo(("device", name), make)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(path, graph as stock nir.read loads it, deploy graph, per-step NIR input) per case and profile."""
    folder = tmp_path_factory.mktemp("nir")
    made: dict = {}

    def get(name: str, profile: str = "standard"):
        if (name, profile) not in made:
            dev, x = device_part(name)
            path = str(folder / f"{name}.{profile}.nir")
            write_nir(dev, path, profile=profile)
            g = nir.read(path, type_check=True)
            if x is None:             # whole model: the host rounds the image/events onto the input grid
                x = nir_input(g, case_batch(name))
            made[name, profile] = path, g, dev, x
        return made[name, profile]
    return get


def first_mismatch(got: np.ndarray, want: np.ndarray) -> str:
    idx = tuple(int(i) for i in np.argwhere(got != want)[0])
    return f"{int((got != want).sum())} differing spikes, first at (t, b, ...) = {idx}"


def assert_same_spikes(got: dict, want: dict, names: set) -> None:
    assert set(got) == names, f"layers: missing {sorted(names - set(got))}, extra {sorted(set(got) - names)}"
    for k in sorted(names):
        assert got[k].shape == want[k].shape, f"{k}: shape {got[k].shape} vs {want[k].shape}"
        assert np.array_equal(got[k], want[k]), f"{k}: {first_mismatch(got[k], want[k])}"


# ---------------------------------------------------------------- spike-exact, every case

@pytest.mark.parametrize("name", ALL_CASES)
def test_standard_profile_spike_exact_against_torch_model(name, exported):
    """Partition where needed, export the device part, read it back with nir.read, run it: every LIF,
    kv_and, q_mask and dvs pool equals the quantized torch model's at every step; the per-step logits
    equal the integer engine's."""
    path, g, dev, x = exported(name)
    outs, spikes = run_nir(g, x)
    got = nir_layer_spikes(g, spikes)
    logits, ref = torch_spikes(name)
    assert_same_spikes(got, ref, set(spike_tensor_names(dev)))

    step_logits = engine_step_logits(name)
    assert np.array_equal(outs[OUTPUT], step_logits)
    readout = outs[OUTPUT] if g.metadata["readout"] == "per_step" else outs[OUTPUT].mean(0)
    assert np.allclose(readout, logits, rtol=0, atol=1e-4 * max(1.0, np.abs(logits).max()))


@pytest.mark.parametrize("name", ALL_CASES)
def test_portable_profile_runs_exactly_in_snntorch(name, exported):
    """The portable profile through snntorch 1.0's import_from_nir (nirtorch 2.6), T steps, float32:
    the same spikes as the torch model, layer by layer; and the same under the reference interpreter."""
    pytest.importorskip("snntorch", reason="snntorch is not installed (test extra): cannot check the portable "
                                           "profile against a third-party importer")
    path, g, dev, x = exported(name, "portable")
    logits, ref = torch_spikes(name)
    names = set(spike_tensor_names(dev))

    outs, spikes = run_snntorch(path, x)
    assert_same_spikes(nir_layer_spikes(g, spikes), ref, names)
    step_logits = engine_step_logits(name)
    snn_logits = outs[OUTPUT].reshape(step_logits.shape)          # portable output: [K, 1, 1]
    assert np.allclose(snn_logits, step_logits, rtol=0, atol=1e-5 * max(1.0, np.abs(step_logits).max()))

    outs64, spikes64 = run_nir(g, x)
    assert_same_spikes(nir_layer_spikes(g, spikes64), ref, names)
    assert np.array_equal(outs64[OUTPUT].reshape(step_logits.shape), step_logits)


# ---------------------------------------------------------------- the pooling encodings on random spikes

def pool_graph(shape: tuple, out_shape: tuple, **pool) -> Graph:
    """Input -> one OrPool -> per-step read-out: a deploy graph holding nothing but the pool."""
    c = shape[0]
    nodes = [Input("x", (), shape, grid=np.zeros(c, dtype=np.int64), bits=None),
             OrPool("pool", ("x",), out_shape, **pool),
             Readout("readout", ("pool",), out_shape, mode="per_step")]
    return Graph(nodes, {"quantized": True, "time_steps": 2, "config": {}})


def random_spikes(shape: tuple, seed: int, batch: int = 3, steps: int = 2) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random((batch, steps) + shape) < 0.25).astype(np.float64)


def run_pool(g: Graph, profile: str, x: np.ndarray, tmp_path) -> list:
    """The pool's output [T, B, ...] from every executor of the written file."""
    path = str(tmp_path / f"pool.{profile}.nir")
    write_nir(g, path, profile=profile)
    results = [run_nir(nir.read(path), x)[0][OUTPUT]]
    if profile == "portable":
        pytest.importorskip("snntorch")
        results.append(run_snntorch(path, x)[0][OUTPUT])
    return results


@pytest.mark.parametrize("profile", ["standard", "portable"])
@pytest.mark.parametrize("c,h,w,heads", [(8, 4, 4, 2), (6, 3, 5, 3), (4, 5, 1, 2), (4, 1, 4, 1), (6, 2, 2, 3),
                                         (8, 7, 6, 4)])
def test_heads_pool_encoding_equals_the_original_pool(c, h, w, heads, profile, tmp_path):
    """dvs_mode's pool over (token index, channel within head), with its wrapped token neighbours, has
    no reshape in NIR; its encoding equals models.sdt.heads_or_pool on random spikes."""
    shape = (c, h, w)
    x = random_spikes(shape, seed=c * 100 + h * 10 + w)
    want = heads_or_pool(torch.from_numpy(np.swapaxes(x, 0, 1)), heads).numpy()
    for got in run_pool(pool_graph(shape, shape, layout="heads", heads=heads), profile, x, tmp_path):
        assert np.array_equal(got, want)


@pytest.mark.parametrize("profile", ["standard", "portable"])
@pytest.mark.parametrize("c,h,w,stride", [(3, 5, 5, 2), (2, 4, 6, 2), (2, 4, 4, 1), (3, 3, 1, 2)])
def test_spatial_or_pool_encoding_equals_max_pool(c, h, w, stride, profile, tmp_path):
    """OR-pool of spikes (stride 1 in dvs_mode, stride 2 in the stem) = torch's 3x3 max-pool, pad 1."""
    shape = (c, h, w)
    out_shape = (c, (h - 1) // stride + 1, (w - 1) // stride + 1)
    x = random_spikes(shape, seed=h * 10 + w + stride)
    xt = torch.from_numpy(np.swapaxes(x, 0, 1))
    want = F.max_pool2d(xt.flatten(0, 1), 3, stride, 1).reshape(xt.shape[:2] + out_shape).numpy()
    g = pool_graph(shape, out_shape, kernel=3, stride=stride, padding=1)
    for got in run_pool(g, profile, x, tmp_path):
        assert np.array_equal(got, want)


# ---------------------------------------------------------------- the threshold rule

def lif_graph(grid: np.ndarray, theta: float, T: int) -> Graph:
    """Input (per-channel grid) -> LIF -> read-out, shaped [C, 1, 1] so the float executor can run it."""
    c = grid.size
    shape = (c, 1, 1)
    theta_int = (theta * np.exp2(grid)).astype(np.int64)
    nodes = [Input("x", (), shape, grid=grid, bits=None),
             LIF("lif", ("x",), shape, v_threshold=theta, tau=2.0, grid=grid, theta_int=theta_int),
             Readout("readout", ("lif",), shape, mode="per_step")]
    return Graph(nodes, {"quantized": True, "time_steps": T, "config": {}})


def test_lif_threshold_is_exact_for_the_finest_membrane_reachable_in_T_steps():
    """tau = 2 halves the membrane every step, so it gains a fractional bit per step: an input of 1.0
    every step gives H = 1 - 2**-t, just below theta = 1. The export fires exactly where spikingjelly's
    `H >= theta` does (the float executor); a threshold lowered by only half the input grid step
    (2**-(g+1)) does not -- the reason for the 2**-(g+T+1) rule."""
    T = 8
    grid = np.array([0, 1, 3, 5], dtype=np.int64)
    g = lif_graph(grid, 1.0, T)
    rng = np.random.default_rng(7)
    ones = np.ones((1, T, 4, 1, 1))
    random = rng.integers(-3, 6, size=(40, T, 4, 1, 1)) * np.exp2(-grid.astype(np.float64))[:, None, None]
    x = np.concatenate([ones, random])
    _, want, _ = execute(g, x.astype(np.float32))
    graph = to_nir(g)
    _, spikes = run_nir(graph, x)
    assert np.array_equal(spikes["lif"], want["lif"])
    assert want["lif"][:, 0].sum() == 0                     # 1 - 2**-t never reaches 1 ...

    naive = graph.nodes["lif"]
    naive.v_threshold = 1.0 - np.exp2(-(grid.astype(np.float64) + 1)).reshape(-1, 1, 1)
    _, naive_spikes = run_nir(graph, x)
    assert naive_spikes["lif"][:, 0].sum() > 0              # ... but passes 1 - 2**-(g+1)


def _boundary_case():
    """A channel whose grid + T passes 24 bits (grid 20, T = 20) and a coarse one (grid 3). Constant input
    1 + 2**-20 gives H_t = (1 + 2**-20)(1 - 2**-t): at t = 20, 1 - 2**-40, reachable and just under
    theta = 1; input 2 at step 0 gives H = 1 exactly, a tie."""
    T, grid = 20, np.array([20, 3], dtype=np.int64)
    g = lif_graph(grid, 1.0, T)
    g.meta["cut_bound"] = [2.0 ** 22, 2.0 ** 5]
    x = np.zeros((3, T, 2, 1, 1))
    x[0, :, 0] = 1 + 2.0 ** -20
    x[1, 0, 0] = 2.0
    x[2, :, 1] = 1 + 2.0 ** -3
    return g, x


def test_standard_thresholds_are_exact_where_grid_plus_T_passes_24_bits():
    """Per-channel theta - 2**-(g+T+1): the exact membranes (the integer engine) fire exactly, the near miss
    1 - 2**-40 does not, the tie does."""
    g, x = _boundary_case()
    want = run_engine(g, x).spikes["lif"]
    assert want[:, 0, 0].sum() == 0 and want[0, 1, 0] == 1           # the hand computation, confirmed
    graph = to_nir(g, profile="standard")
    assert np.asarray(graph.nodes["lif"].v_threshold).ravel().tolist() == [1 - 2.0 ** -41, 1 - 2.0 ** -24]
    _, spikes = run_nir(graph, x)
    assert np.array_equal(spikes["lif"].astype(np.uint8), want)


@pytest.mark.parametrize("profile", ["portable", "norse"])
def test_shared_threshold_is_exact_for_float32_membranes_where_grid_plus_T_passes_24_bits(profile):
    """The profiles for float32 simulators: one threshold, the float32 just below theta where no float32
    lies in [theta - 2**-(g+T+1), theta). For every float32 membrane, v > t is v >= theta (checked on every
    float32 value around theta); the float32 model of the channel (the float executor in float32, as
    spikingjelly computes) and the file run on those float32 membranes agree spike for spike, the tie
    included. The near miss 1 - 2**-40, which float32 cannot hold, is float32's 1.0: it fires in float32
    everywhere, and only the standard profile is exact for it."""
    g, x = _boundary_case()
    graph = to_nir(g, profile=profile, dt=None)
    t = float(np.asarray(graph.nodes["lif"].v_threshold).flat[0])
    assert t == 1.0 - 2.0 ** -24 and float(np.float32(t)) == t
    around = np.float32(1.0) + np.arange(-64, 65, dtype=np.float32) * np.float32(2.0 ** -24)
    values = np.concatenate([np.nextafter(around, np.float32(-2)), around, np.nextafter(around, np.float32(2))])
    assert np.array_equal(values > np.float32(t), values >= np.float32(1.0))
    _, want32, _ = execute(g, x.astype(np.float32))            # spikingjelly's float32 arithmetic
    assert want32["lif"][19, 0, 0] == 1 and want32["lif"][0, 1, 0] == 1      # the near miss rounds to 1.0
    assert run_engine(g, x).spikes["lif"][19, 0, 0] == 0                      # ... where exactly it is below


@pytest.mark.parametrize("name", ["lif_0011", "dvs_tet_t10", "gesture_t16", "odd_1001_t1"])
def test_shared_threshold_is_the_exact_rule_wherever_the_layer_is_float32_exact(name):
    """Where the bit analysis finds a layer float32-exact, the portable threshold is theta - 2**-(g+T+1)
    itself (exact for every reachable membrane), a float32 value."""
    from sdt_deploy.quant.bits import bit_report

    q = quantized(case_path(name))
    exact = {r["name"]: r["float32_exact"] for r in bit_report(q.graph)["layers"]}
    dev = partition(q.graph)
    part = dev.device if dev else q.graph
    graph = to_nir(part, profile="portable")
    T = int(q.graph.meta["time_steps"])
    checked = 0
    for n in part.of_type(LIF):
        th = float(np.asarray(graph.nodes[n.name].v_threshold).flat[0])
        if exact[n.name]:
            g = int(np.max(n.grid))
            assert Fraction(th) == Fraction(n.v_threshold) - Fraction(1, 2 ** (g + T + 1)), n.name
            assert float(np.float32(th)) == th, n.name
            checked += 1
    assert checked >= 1


# ---------------------------------------------------------------- structure of the exported file

def spiking_sources(g: nir.NIRGraph, name: str) -> list:
    """The nodes feeding `name`, looking through Flatten (a reshape carries spikes unchanged)."""
    out = []
    for src, dst in g.edges:
        if dst == name:
            out += spiking_sources(g, src) if isinstance(g.nodes[src], nir.Flatten) else [src]
    return out


@pytest.mark.parametrize("name,profile", [("fixture", "standard"), ("dvs_tet_t10", "standard"),
                                          ("dvs_tet_t10", "portable"), ("plif_dvs_0000", "standard"),
                                          ("plif_dvs_0000", "portable"), ("mlp1_0101", "portable")])
def test_synapses_are_fed_by_spikes_only(name, profile, exported):
    """Walking the file as nir.read loads it: every Conv2d / Affine is fed only by spiking nodes (LIF,
    Threshold), except the encoder (fed by the image input) and, in the portable profile, the head's
    token sum -- a channel-diagonal 0/1 kernel with no bias, i.e. no learned weight meets a current."""
    if name not in ALL_CASES:
        pytest.skip(f"{name} is not available")
    _, g, dev, _ = exported(name, profile)
    encoders, structural = [], []
    for n, node in g.nodes.items():
        if not isinstance(node, (nir.Conv2d, nir.Conv1d, nir.Affine, nir.Linear)):
            continue
        srcs = spiking_sources(g, n)
        assert srcs, n
        if all(isinstance(g.nodes[s], (nir.LIF, nir.Threshold)) for s in srcs):
            continue
        if len(srcs) == 1 and isinstance(g.nodes[srcs[0]], nir.Input):
            encoders.append(n)
            continue
        w = np.asarray(node.weight)
        diagonal = np.einsum("ii...->i...", w).sum() == w.sum()
        assert profile == "portable" and set(np.unique(w)) <= {0.0, 1.0} and diagonal \
            and not np.any(node.bias), f"{n} applies weights to a current from {srcs}"
        structural.append(n)
    whole = partition(quantized(case_path(name)).graph) is None
    assert encoders == (["patch_embed.proj_conv"] if whole else [])
    assert structural == (["head_sum"] if profile == "portable" else [])
    # and the file holds a node for every conv and linear layer of the deploy graph
    assert {n.name for n in dev.nodes if isinstance(n, (Conv, Linear))} <= set(g.nodes)


@pytest.mark.parametrize("profile", ["standard", "portable"])
def test_two_exports_are_byte_identical(profile, tmp_path):
    """Quantize the checkpoint twice and export each: the files are the same bytes, and the atomic write
    leaves nothing else behind."""
    from sdt_deploy import quantize

    name = "plif_dvs_0000"       # whole graph: encoder, stem, dvs pools, every node type
    paths = []
    for i in range(2):
        paths.append(str(tmp_path / f"{i}.nir"))
        write_nir(quantize(case_path(name)).graph, paths[-1], profile=profile)
    with open(paths[0], "rb") as a, open(paths[1], "rb") as b:
        assert a.read() == b.read()
    assert sorted(os.listdir(tmp_path)) == ["0.nir", "1.nir"]


def test_current_max_pool_is_refused_by_name(tmp_path):
    g = quantized(case_path("lif_0011")).graph
    with pytest.raises(DeployError, match=r"patch_embed\.maxpool3.*partition"):
        to_nir(g)
    with pytest.raises(DeployError):
        write_nir(g, str(tmp_path / "m.nir"))
    assert os.listdir(tmp_path) == []


def test_bad_options_are_refused():
    g = device_part("lif_0011")[0]
    with pytest.raises(DeployError, match="profile"):
        to_nir(g, profile="fast")
    with pytest.raises(DeployError, match="dt"):
        to_nir(g, profile="portable", dt=1e-3)


def test_parameters_and_metadata_survive_nir_read(exported):
    """dt, T and the SDT config in the graph's metadata; exact float weights that equal the integer
    metadata; tau = 2*dt with dt/tau exactly 1/2; thresholds theta - 2**-(grid+T+1) exactly."""
    name = "mlp1_0101"
    _, g, dev, _ = exported(name)
    T = int(dev.meta["time_steps"])
    assert g.metadata["dt"] == DT and int(g.metadata["time_steps"]) == T
    assert json.loads(g.metadata["sdt_config"]) == dev.meta["config"]
    assert g.metadata["input"] == dev.input.name == "patch_embed.maxpool3"
    for n in dev.nodes:
        if isinstance(n, (Conv, Linear)):
            node, meta = g.nodes[n.name], g.nodes[n.name].metadata
            weight = np.asarray(node.weight).reshape(n.weight_shape)
            assert np.array_equal(weight, n.float_weight())
            scale = np.exp2(-np.asarray(meta["w_exp"], dtype=np.float64)).reshape((-1,) + (1,) * (weight.ndim - 1))
            assert np.array_equal(meta["w_int"] * scale, weight) and meta["w_int"].dtype == np.int8
            assert np.array_equal(np.asarray(node.bias), n.bias)
        if isinstance(n, LIF):
            node = g.nodes[n.name]
            assert np.all(node.tau == 2 * DT) and np.all(DT / node.tau == 0.5)
            assert np.all(node.r == 1) and np.all(node.v_leak == 0) and np.all(node.v_reset == 0)
            th = np.asarray(node.v_threshold).reshape(n.shape[0], -1)
            for c, (t_int, gc) in enumerate(zip(n.theta_int.tolist(), n.grid.tolist())):
                exact = Fraction(int(t_int), 2 ** int(gc)) - Fraction(1, 2 ** (int(gc) + T + 1))
                assert np.all(th[c] == float(exact)) and Fraction(float(exact)) == exact, (n.name, c)


@pytest.mark.parametrize("profile", ["standard", "portable"])
@pytest.mark.parametrize("name", ["mlp1_0101", "plif_dvs_0000"])
def test_written_file_holds_the_quantized_integers(name, profile, exported):
    """write_nir makes each node's weights only while that node is written; read back by stock nir.read,
    every synaptic node holds exactly w_int * 2**-w_exp and b_int * 2**-grid of the deploy graph (computed
    here with exact fractions), in float64, and its integer metadata is the graph's own integers."""
    _, read, dev, _ = exported(name, profile)
    compared = 0
    for n in dev.nodes:
        if not isinstance(n, (Conv, Linear)):
            continue
        node = read.nodes[n.name]
        weight, bias = np.asarray(node.weight), np.asarray(node.bias)
        assert weight.dtype == np.float64 and bias.dtype == np.float64, n.name
        w_int = n.w_int.reshape(weight.shape)
        for o in range(w_int.shape[0]):
            scale = Fraction(1, 2 ** int(n.w_exp[o])) if n.w_exp[o] >= 0 else Fraction(2 ** -int(n.w_exp[o]))
            assert all(Fraction(float(v)) == int(i) * scale for v, i in zip(weight[o].ravel(), w_int[o].ravel()))
            g = int(n.grid[o])
            assert Fraction(float(bias[o])) == int(n.b_int[o]) * (Fraction(1, 2 ** g) if g >= 0 else 2 ** -g)
        assert np.array_equal(np.asarray(node.metadata["w_int"]), n.w_int), n.name
        assert np.array_equal(np.asarray(node.metadata["b_int"]), n.b_int), n.name
        compared += weight.size
    assert compared > 1_000


def test_graph_computes_the_same_without_any_metadata(exported):
    """The metadata is for hardware back ends and for naming; the computation does not depend on it."""
    _, g, _, x = exported("dvs_tet_t10")
    outs, spikes = run_nir(g, x)
    bare = nir.read(exported("dvs_tet_t10")[0])
    bare.metadata = {}
    for node in bare.nodes.values():
        node.metadata = {}
    outs2, spikes2 = run_nir(bare, x)           # dt from the default 1e-4
    assert np.array_equal(outs[OUTPUT], outs2[OUTPUT])
    assert spikes.keys() == spikes2.keys() and all(np.array_equal(spikes[k], spikes2[k]) for k in spikes)


# ---------------------------------------------------------------- the interpreter's own semantics

def test_interpreter_follows_the_nir_equations():
    """Forward Euler, strict `>`, reset, fan-in summed -- numbers worked out by hand."""
    one = np.ones(1)
    g = nir.NIRGraph(nodes={
        "in": nir.Input(input_type=np.array([1])),
        "lif": nir.LIF(tau=4e-4 * one, r=2 * one, v_leak=0.5 * one, v_threshold=1.0 * one, v_reset=-0.25 * one),
        "th": nir.Threshold(threshold=1.0 * one),
        "out": nir.Output(output_type=np.array([1]))},
        edges=[("in", "lif"), ("in", "th"), ("lif", "th"), ("th", "out")])
    x = np.array([1.0, 1.0, 0.0, 1.0]).reshape(1, 4, 1)
    outs, spikes, mems = run_nir(g, x, dt=1e-4, membranes=True)
    # v += (1/4) * (0.5 - v + 2 I):  0.625; 0.625 + 0.46875 = 1.09375 > 1 -> fire, reset to -0.25;
    # -0.25 + 0.1875 = -0.0625; -0.0625 + 0.640625 = 0.578125
    assert mems["lif"].ravel().tolist() == [0.625, 1.09375, -0.0625, 0.578125]
    assert spikes["lif"].ravel().tolist() == [0, 1, 0, 0]
    assert spikes["th"].ravel().tolist() == [0, 1, 0, 0]     # I + z > 1: 1, 2, 0, 1 (strict)
    bad = nir.NIRGraph(nodes={"in": nir.Input(input_type=np.array([2])), "th": nir.Threshold(threshold=np.ones(3)),
                              "out": nir.Output(output_type=np.array([3]))},
                       edges=[("in", "th"), ("th", "out")], type_check=False)
    with pytest.raises(DeployError, match="does not broadcast"):
        run_nir(bad, np.zeros((1, 1, 2)))


def test_streaming_writer_writes_the_bytes_of_plain_nir_write(tmp_path):
    """The memory-saving writer (`exporters.nir_streaming`) leans on how nir writes a graph: its file must be
    byte for byte the one `nir.write` makes of the graph `to_nir` returns (both written through an open
    file, as the exporter writes: h5py's file-object driver)."""
    from exporters.nir_streaming import streaming_supported

    g = quantized(case_path("plif_dvs_0000")).graph
    streamed, plain = tmp_path / "streamed.nir", tmp_path / "plain.nir"
    write_nir(g, str(streamed))
    with open(plain, "w+b", buffering=0) as f:
        nir.write(f, to_nir(g), compression="gzip", compression_opts=1)
    assert streaming_supported() and streamed.read_bytes() == plain.read_bytes()


def test_streaming_writer_is_verified_for_the_installed_nir():
    """Fails when the installed nir is not the version the streaming writer was checked against: re-run the
    byte test above on the new version, then move `VERIFIED_NIR` (until then exports take the plain path)."""
    from importlib.metadata import version

    from exporters.nir_streaming import VERIFIED_NIR

    assert version("nir") == VERIFIED_NIR


def test_plain_write_path_gives_the_same_file(tmp_path, monkeypatch):
    """Off the verified nir version the exporter writes through plain `nir.write`: the same bytes."""
    import exporters.nir_streaming as S

    g = quantized(case_path("plif_dvs_0000")).graph
    write_nir(g, str(tmp_path / "a.nir"))
    monkeypatch.setattr(S, "streaming_supported", lambda: False)
    write_nir(g, str(tmp_path / "b.nir"))
    assert (tmp_path / "a.nir").read_bytes() == (tmp_path / "b.nir").read_bytes()


def _window_sums_by_hand(x: np.ndarray, k: tuple, s: tuple, p: tuple) -> np.ndarray:
    """NIR's SumPool2d, zero padding, written out window by window."""
    N, C, H, W = x.shape
    Ho, Wo = (H + 2 * p[0] - k[0]) // s[0] + 1, (W + 2 * p[1] - k[1]) // s[1] + 1
    out = np.zeros((N, C, Ho, Wo))
    for i in range(Ho):
        for j in range(Wo):
            for a in range(i * s[0] - p[0], i * s[0] - p[0] + k[0]):
                for b in range(j * s[1] - p[1], j * s[1] - p[1] + k[1]):
                    if 0 <= a < H and 0 <= b < W:
                        out[:, :, i, j] += x[:, :, a, b]
    return out


@pytest.mark.parametrize("hw,k,s,p", [
    ((8, 8), (15, 15), (1, 1), (7, 7)),      # SDSA's token sum: every window holds the whole map
    ((8, 8), (8, 8), (8, 8), (0, 0)),        # the head's sum: one window, the whole map
    ((5, 3), (9, 5), (1, 2), (4, 2)),        # whole map on both axes, unequal strides
    ((8, 8), (15, 15), (1, 1), (6, 7)),      # more padding on one axis: fewer outputs, each still the whole map
    ((8, 8), (15, 15), (1, 1), (8, 7)),      # the first window misses the last row: not the whole map
    ((6, 7), (3, 3), (2, 2), (1, 1)),        # the stem's OR-pool: small windows
    ((4, 4), (4, 4), (1, 1), (0, 0)),        # one output, the whole map, stride 1
    ((4, 4), (5, 4), (1, 1), (0, 0)),        # no output row (window past the padded map)
    ((4, 4), (9, 9), (0, 0), (4, 4)),        # stride 0: refused as the float64 way refuses it
])
def test_sum_pool_of_spikes_counts_every_window(hw, k, s, p):
    """The interpreter's SumPool2d on a single spiking source (bool spikes, counted once per map where every
    window holds the whole map) gives the window sums worked out window by window, as float64."""
    rng = np.random.default_rng(sum(hw) + sum(k))
    spikes = rng.random((2, 3) + hw) < 0.4
    node = nir.SumPool2d(kernel_size=np.array(k), stride=np.array(s), padding=np.array(p))
    if min(s) < 1 or (hw[0] + 2 * p[0] - k[0]) // s[0] + 1 < 1:
        with pytest.raises(RuntimeError):
            NI.compile_node(node, DT).fn(None, spikes)
        return
    _, out, _ = NI.compile_node(node, DT).fn(None, spikes)
    want = _window_sums_by_hand(spikes.astype(np.float64), k, s, p)
    assert out.dtype == np.float64 and out.shape == want.shape
    assert np.array_equal(out, want)
    _, from_floats, _ = NI.compile_node(node, DT).fn(None, spikes.astype(np.float64))   # the float64 way
    assert np.array_equal(from_floats, want)
