"""The deploy graph: lowering every variant, the executor as the graph's meaning, fold_bn, check."""
import numpy as np
import pytest
import torch

from models import SDTConfig, build_model, parameter_count
from sdt_deploy.cli.app import main
from sdt_deploy.data.synth import random_inputs, random_model
from sdt_deploy.files.configs import PUBLISHED, resolve
from sdt_deploy.ir.graph import CURRENT, LIF, SPIKE, BatchNorm, Conv, Graph, Input, Linear, Readout, SpatialMean
from sdt_deploy.ir.lower import lower
from sdt_deploy.ir.passes import check, fold_bn, fold_bn_params
from sdt_deploy.run.float_executor import execute
from sdt_deploy.run.torch_runner import run_model

from conftest import ALL_CASES, case_input, case_path, loaded


def _events(cfg):
    return cfg.dvs_mode or cfg.in_channels == 2


@pytest.mark.parametrize("name", ALL_CASES)
def test_executor_on_the_unfolded_graph_equals_the_torch_model(name):
    """The graph, not the module tree, computes: the same spikes bit for bit, the same logits."""
    lm = loaded(case_path(name))
    g = lower(lm.model)
    for x in (case_input(name)[:4], random_inputs(lm.config, 3, seed=11, events=_events(lm.config))):
        logits, spikes = run_model(lm.model, x)
        g_logits, g_spikes, _ = execute(g, x)
        assert set(spikes) <= set(g_spikes)
        for k in spikes:
            np.testing.assert_array_equal(g_spikes[k], spikes[k], err_msg=k)
        np.testing.assert_array_equal(g_logits, logits)


# Measured on 2026-11-29 (torch 2.13 CPU): folding in float64 and running in float32 changed 0 of
# 19,423,232 fixture spikes (its input, and 8 random images), and 0 spikes on every variant; logits
# identical. Folding is not exact by nature (docs/numeric-contract.md): the pins below leave room for rare flips
# while catching a wrong fold, which changes thousands of spikes.
FOLD_MIN_AGREEMENT = 0.9999
FOLD_MAX_LOGIT_DIFF = 1e-3


@pytest.mark.parametrize("name", ALL_CASES)
def test_fold_bn_agreement_is_measured_and_pinned(name):
    from sdt_deploy.verification.compare import agreement

    lm = loaded(case_path(name))
    folded = fold_bn(lower(lm.model))
    assert not folded.of_type(BatchNorm)
    for x in (case_input(name)[:4], random_inputs(lm.config, 4, seed=5, events=_events(lm.config))):
        logits, spikes = run_model(lm.model, x)
        f_logits, f_spikes, _ = execute(folded, x)
        per_layer = agreement(spikes, f_spikes)
        assert min(per_layer.values()) >= FOLD_MIN_AGREEMENT, per_layer
        assert np.abs(f_logits - logits).max() <= FOLD_MAX_LOGIT_DIFF


def test_fold_bn_matches_a_hand_computation():
    w = np.array([[[[2.0]]], [[[-1.0]]]])
    bn = BatchNorm("bn", ("c",), (2, 1, 1), weight=np.array([3.0, 0.5]), bias=np.array([1.0, -1.0]),
                   mean=np.array([0.5, 2.0]), var=np.array([4.0 - 1e-5, 0.25 - 1e-5]), eps=1e-5)
    g = Graph([Input("x", (), (1, 1, 1)), Conv("c", ("x",), (2, 1, 1), weight=w, bias=np.array([1.0, 0.0])),
               bn], {"time_steps": 1})
    c = fold_bn(g)["c"]
    # scale = gamma / sqrt(var + eps) = [3/2, 0.5/0.5]
    np.testing.assert_allclose(c.weight.reshape(-1), [2.0 * 1.5, -1.0 * 1.0])
    np.testing.assert_allclose(c.bias, [1.0 + (1.0 - 0.5) * 1.5, -1.0 + (0.0 - 2.0) * 1.0])


def test_fold_into_float32_is_the_float64_fold_rounded_once():
    """The quantizer has BatchNorm folded straight into float32 (what brevitas reads): the values must be
    the float64 fold's, each rounded once -- not a float32 product, which differs."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((64, 8, 3, 3)).astype(np.float32)
    gamma, beta = rng.uniform(0.2, 3.0, 64), rng.standard_normal(64)
    mean, var = rng.standard_normal(64), rng.uniform(0.01, 4.0, 64)
    bn = BatchNorm("bn", ("c",), (64, 4, 4), weight=gamma, bias=beta, mean=mean, var=var, eps=1e-5)
    w64, b64 = fold_bn_params(w, None, bn)
    w32, b32 = fold_bn_params(w, None, bn, weight_dtype=np.float32)
    scale = gamma / np.sqrt(var + 1e-5)                                       # float64, by hand
    by_hand = (w.astype(np.float64) * scale[:, None, None, None]).astype(np.float32)
    assert w64.dtype == np.float64 and w32.dtype == np.float32
    assert np.array_equal(w32, by_hand) and np.array_equal(w64.astype(np.float32), w32)
    assert np.array_equal(b32, b64) and b32.dtype == np.float64
    single_product = w * scale.astype(np.float32)[:, None, None, None]
    assert not np.array_equal(single_product, w32)      # so the check above can tell the two apart


def test_check_names_a_current_feeding_a_conv():
    shape = (2, 4, 4)
    w = np.ones((2, 2, 1, 1))
    g = Graph([Input("x", (), shape),
               Conv("enc", ("x",), shape, weight=w),
               LIF("lif", ("enc",), shape),
               Conv("good", ("lif",), shape, weight=w),
               Conv("bad", ("good",), shape, weight=w)], {"time_steps": 1})
    res = check(g)
    assert not res["ok"] and res["violations"] == ["bad (conv) reads the current good (conv); only the encoder "
                                                   "may read a real value"]
    ok = check(Graph(g.nodes[:4], {"time_steps": 1}))
    assert ok["ok"] and ok["violations"] == [] and ok["encoder_exceptions"] == ["enc"]


@pytest.mark.parametrize("name", ALL_CASES)
def test_real_graphs_pass_check_with_only_the_encoder_excepted(name):
    g = lower(loaded(case_path(name)).model)
    unfolded = check(g)
    assert not unfolded["ok"] and unfolded["batchnorm"] and all("not folded" in v for v in unfolded["violations"])
    g = fold_bn(g)
    assert check(g)["ok"] and check(g)["encoder_exceptions"] == ["patch_embed.proj_conv"]
    kinds = {e.kind for e in g.edges() if isinstance(g[e.dst], (Conv, Linear)) and e.dst != "patch_embed.proj_conv"}
    assert kinds == {SPIKE}


def _uncalled_params(model) -> int:
    uncalled = ("talking_heads.weight", "rpe_lif.w", "attn_lif.w")
    return sum(p.numel() for n, p in model.named_parameters() if n.endswith(uncalled))


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_every_published_config_lowers_with_consistent_parameter_counts(name):
    for mode in ("lif", "plif"):
        cfg = resolve(flags={"spike_mode": mode}, yaml_path=name).config
        model = build_model(cfg)
        g = lower(model)
        bn_params = sum(m.weight.numel() + m.bias.numel() for m in model.modules()
                        if isinstance(m, torch.nn.BatchNorm2d))
        # graph = torch params - never-called modules (PLIF w counted on their LIF node)
        assert g.param_count() == parameter_count(model) - _uncalled_params(model)
        folded = fold_bn(g)
        added_biases = sum(n.weight.shape[0] for n in g.of_type(Conv) if n.bias is None)
        assert folded.param_count() == g.param_count() - bn_params + added_biases
        assert check(folded)["encoder_exceptions"] == ["patch_embed.proj_conv"]


def test_graph_round_trips_through_json():
    lm = loaded(case_path("plif_dvs_0000"))
    g = fold_bn(lower(lm.model))
    back = Graph.from_json(g.to_json())
    assert [n.name for n in back] == [n.name for n in g]
    x = case_input("plif_dvs_0000")
    a, sa, _ = execute(g, x)
    b, sb, _ = execute(back, x)
    np.testing.assert_array_equal(a, b)
    assert all(np.array_equal(sa[k], sb[k]) for k in sa)


def test_edges_are_typed_and_shaped():
    g = lower(loaded(case_path("lif_0011")).model)
    edges = {(e.src, e.dst): e for e in g.edges()}
    assert edges[("patch_embed.proj_lif", "patch_embed.proj_conv1")].kind == SPIKE
    assert edges[("block.0.attn.add", "block.0.mlp.fc1_lif")].kind == CURRENT
    assert edges[("block.0.attn.kv_sum", "block.0.attn.talking_heads_lif")].shape == (32,)
    assert isinstance(g["head_mean"], SpatialMean) and isinstance(g.output, Readout)


def test_inspect_graph_cli(capsys):
    import json

    assert main(["inspect", case_path("dvs_tet_t10"), "--graph", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    ops = {n["name"]: n["op"] for n in rep["graph"]["nodes"]}
    assert ops["block.0.attn.kv_pool"] == "orpool" and ops["readout"] == "readout"
    assert rep["graph"]["edges"]["spike"] > 0 and rep["graph"]["edges"]["current"] > 0


def test_random_configs_lower_and_execute_exactly():
    cfg = SDTConfig(img_size=24, in_channels=1, dim=24, depth=2, num_heads=3, mlp_ratio=1.5, time_steps=3,
                    pooling_stat="1100", num_classes=4)
    model = random_model(cfg, seed=4)
    x = random_inputs(cfg, 2, seed=1)
    logits, spikes = run_model(model, x)
    g_logits, g_spikes, _ = execute(lower(model), x)
    assert all(np.array_equal(spikes[k], g_spikes[k]) for k in spikes)
    np.testing.assert_array_equal(logits, g_logits)
