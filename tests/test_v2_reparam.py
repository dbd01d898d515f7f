"""SDT V2: the dataflow check (issue #11's question) and structural re-parameterization.

Expected values by hand (which ops read real values in the original V2 code, the parameter arithmetic of
fusing 1x1 -> depthwise -> 1x1 and depthwise -> 1x1) and from torch's own convolutions (the fused kernel
computes what the chain computes); exactness across executors as in test_v2_deploy.
"""
from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from v2_helpers import random_images, random_v2_model

from models import V2Config
from sdt_deploy import api
from sdt_deploy.cli.app import cli
from sdt_deploy.errors import DeployError
from sdt_deploy.ir.dataflow import dataflow
from sdt_deploy.ir.graph import Conv
from sdt_deploy.ir.reparam import fuse_repconv, fuse_sepconv, reparameterize
from sdt_deploy.run.float_executor import execute

from conftest import SHARED

V2_CKPT = SHARED / "fixtures" / "v2" / "v2_tiny_t2_32px.pth"
V2_REF = SHARED / "fixtures" / "v2" / "v2_tiny_t2_32px_ref.npz"
EXECUTORS = ["torch", "engine", "onnx-int", "onnx-float", "nir"]
needs_v2_fixture = pytest.mark.skipif(not V2_CKPT.exists(), reason="the shared V2 fixture is absent")


@functools.cache
def fixture():
    return api.load_model(V2_CKPT)


def fixture_input():
    with np.load(V2_REF) as z:
        return z["input"]


@needs_v2_fixture
def test_dataflow_of_the_plain_v2_graph_answers_issue_11():
    """In the original V2, these read real values (MAC): the image (the encoder), SepConv's pointwise 1x1
    after the depthwise 7x7 (4 conv blocks), RepConv's depthwise 3x3 and second 1x1 after BN-and-pad
    (4 RepConvs in each of 8 blocks); q kv adds integers that spikes select; everything else is on spikes."""
    d = dataflow(api.deploy_graph(fixture()))
    s = d["summary"]
    blocks = [f"block3.{j}" for j in range(6)] + [f"block4.{j}" for j in range(2)]
    expected_macs = {f"{c}.Conv.pwconv2" for c in ("ConvBlock1_1.0", "ConvBlock1_2.0", "ConvBlock2_1.0",
                                                    "ConvBlock2_2.0")}
    expected_macs |= {f"{b}.attn.{k}_conv.0.body.2.{i}" for b in blocks for k in ("q", "k", "v", "proj")
                      for i in (0, 1)}
    assert set(s["macs_beyond_encoder"]) == expected_macs and len(expected_macs) == 4 + 64
    assert s["encoder"] == ["downsample1_1.encode_conv"]
    assert s["integer_acs"] == [f"{b}.attn.qkv" for b in blocks] and not s["spike_driven"]
    ops = {o["name"]: o for o in d["ops"]}
    assert ops["block3.0.attn.kv"]["kind"] == "AC"                      # binary x binary
    assert ops["ConvBlock1_1.0.Conv.dwconv"]["kind"] == "AC"            # the depthwise 7x7 reads spikes
    edges = {(e["src"], e["dst"]): e for e in d["edges"]}
    # 2 x 2 tokens; 8 heads: d = 64 / 8 in block3, 80 / 8 in block4
    assert edges[("block3.0.attn.kv", "block3.0.attn.qkv")]["value"] == "integer [0, 4]"
    assert edges[("block3.0.attn.qkv", "block3.0.attn.attn_lif")]["value"] == "integer [0, 32] x 2^-3"
    assert edges[("block4.1.attn.qkv", "block4.1.attn.attn_lif")]["value"] == "integer [0, 40] x 2^-3"
    assert edges[("ConvBlock1_1.0.Conv.dwconv", "ConvBlock1_1.0.Conv.pwconv2")]["class"] == "real"
    assert s["edges"]["integer"] == 16 and s["edges"]["binary"] + s["edges"]["integer"] + s["edges"]["real"] == len(
        d["edges"])


@needs_v2_fixture
def test_reparameterization_turns_every_mac_but_the_encoder_into_an_ac():
    plain = api.deploy_graph(fixture())
    fused = reparameterize(plain)
    s = dataflow(fused)["summary"]
    assert s["spike_driven"] and s["macs_beyond_encoder"] == [] and s["ops"]["MAC"] == 1 and s["reparam"]
    assert isinstance(fused["block3.0.attn.q_conv"], Conv) and fused["block3.0.attn.q_conv"].weight_shape == (
        64, 64, 3, 3)
    assert fused["ConvBlock1_1.0.Conv.dwconv_pwconv2"].weight_shape == (8, 16, 7, 7)
    # parameters by hand: a RepConv of C channels, 2C^2 + 11C (1x1 + bias, depthwise 9C, 1x1 + bias) ->
    # 9C^2 + C; a SepConv of C (hidden 2C), 98C + 2C^2 + C -> 98C^2 + C
    rep = lambda c: 7 * c * c - 10 * c          # noqa: E731
    sep = lambda c: 96 * c * c - 98 * c         # noqa: E731
    added = sum(sep(c) for c in (8, 16, 32, 32)) + 6 * 4 * rep(64) + 2 * 4 * rep(80)
    assert fused.param_count() - plain.param_count() == added == 1_243_472


def test_fused_kernels_compute_what_the_chains_compute():
    """fuse_repconv and fuse_sepconv against the chain run by torch in float64 (zero-padded spikes)."""
    rng = np.random.default_rng(0)
    C, O = 5, 4
    s = torch.from_numpy((rng.random((2, C, 6, 7)) < 0.4).astype(np.float64))
    first = Conv("a", ("s",), (C, 8, 9), weight=rng.normal(size=(C, C, 1, 1)), bias=rng.normal(size=C), padding=1)
    dw = Conv("b", ("a",), (C, 6, 7), weight=rng.normal(size=(C, 1, 3, 3)), groups=C)
    last = Conv("c", ("b",), (O, 6, 7), weight=rng.normal(size=(O, C, 1, 1)), bias=rng.normal(size=O))
    F = torch.nn.functional
    t = lambda a: torch.from_numpy(np.asarray(a))   # noqa: E731
    chain = F.conv2d(F.conv2d(F.conv2d(s, t(first.weight), t(first.bias), padding=1), t(dw.weight), groups=C),
                     t(last.weight), t(last.bias))
    fused = fuse_repconv(first, dw, last, "q_conv")
    assert fused.padding == 1 and fused.weight_shape == (O, C, 3, 3)
    assert torch.allclose(F.conv2d(s, t(fused.weight), t(fused.bias), padding=1), chain, rtol=0, atol=1e-12)
    dw7 = Conv("d", ("s",), (C, 6, 7), weight=rng.normal(size=(C, 1, 7, 7)), padding=3, groups=C)
    chain = F.conv2d(F.conv2d(s, t(dw7.weight), padding=3, groups=C), t(last.weight), t(last.bias))
    fused = fuse_sepconv(dw7, last, "dwconv_pwconv2")
    assert torch.allclose(F.conv2d(s, t(fused.weight), t(fused.bias), padding=3), chain, rtol=0, atol=1e-12)


@needs_v2_fixture
def test_reparameterized_float_graph_computes_the_same_spikes():
    """In float64 the fused graph is the same function: every spike equal, the currents into q_lif to 1e-12."""
    plain = api.deploy_graph(fixture())
    fused = reparameterize(plain)
    x = fixture_input()
    _, a, _ = execute(plain, x, dtype=torch.float64, currents=("block3.0.attn.q_conv.0.body.2.1",))
    _, b, _ = execute(fused, x, dtype=torch.float64, currents=("block3.0.attn.q_conv",))
    u, v = a.pop("block3.0.attn.q_conv.0.body.2.1"), b.pop("block3.0.attn.q_conv")
    assert np.max(np.abs(u - v)) <= 1e-12 * max(1.0, float(np.max(np.abs(u))))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@needs_v2_fixture
def test_reparameterized_fixture_is_spike_exact_on_every_executor():
    res = api.verify(fixture(), fixture_input(), executors=EXECUTORS, reparam=True)
    assert res.ok, res.to_json()["first_divergence"]
    assert all(res.to_json()["executors"][e]["ran"] for e in EXECUTORS)


def test_reparameterized_random_kd_model_is_spike_exact_on_every_executor():
    cfg = V2Config(img_size=45, in_channels=3, num_classes=3, embed_dim=(4, 6, 4, 6), num_heads=2, time_steps=3,
                   kd=True)
    src = api.loaded(random_v2_model(cfg, seed=5))
    q = api.quantize(src, reparam=True)
    assert q.graph.meta["reparam"] and type(q.model.block3[0].attn.q_conv) is torch.nn.Conv2d
    res = api.verify(q, random_images(cfg, 3), executors=EXECUTORS)
    assert res.ok, res.to_json()["first_divergence"]
    layers = res.to_json()["layers"]
    assert sum(row["torch"]["spikes"] for k, row in layers.items() if k.endswith("attn_lif")) > 0


@needs_v2_fixture
def test_a_shipped_reparameterized_file_verifies_as_shipped(tmp_path):
    """The reparam setting travels in the artifact: verify --artifact without --reparam rebuilds the
    reference re-parameterized; a plain quantized file is refused against it."""
    path = tmp_path / "m.onnx"
    r = CliRunner().invoke(cli, ["export", str(V2_CKPT), "--target", "onnx", "-o", str(path), "--reparam", "-q"])
    assert r.exit_code == 0, r.output
    import onnx

    from exporters.onnx import read_metadata

    meta = read_metadata(onnx.load(str(path)))
    assert json.loads(meta["quantization"])["reparam"] is True and meta["reparam"] == "true"
    x = tmp_path / "x.npy"
    np.save(x, fixture_input()[:2])
    r = CliRunner().invoke(cli, ["verify", str(V2_CKPT), "--artifact", str(path), "-i", str(x), "--executors",
                                 "torch,engine,onnx-int", "--json", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["ok"]
    plain = tmp_path / "q.pth"
    api.quantize(fixture()).save(str(plain))
    with pytest.raises(DeployError, match="reparam"):
        api.verify(str(plain), fixture_input()[:2], artifacts=[str(path)], executors=["torch", "onnx-int"])


@needs_v2_fixture
def test_plain_and_reparameterized_are_compared_not_assumed_equal():
    rep = api.verify(fixture(), fixture_input(), reference="reparam")
    lifs = [k for k in rep["layers"]]
    assert len(lifs) == 77 and all(0.0 <= v <= 1.0 for v in rep["layers"].values())
    assert set(rep["prediction_agreement"]) == {"plain_vs_reparam", "plain_vs_float", "reparam_vs_float"}
    assert rep["cost"]["params_added"] == 1_243_472
    assert "MAC" not in rep["cost"]["ops_reparam"] and rep["cost"]["ops_plain"]["MAC"]["ops"] == 68


@needs_v2_fixture
def test_inspect_check_prints_the_table(tmp_path):
    r = CliRunner().invoke(cli, ["inspect", str(V2_CKPT), "--check", "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    assert rep["check"]["summary"]["ops"] == {"AC": 77, "integer-AC": 8, "MAC": 69}
    r = CliRunner().invoke(cli, ["inspect", str(V2_CKPT), "--check", "--reparam"])
    assert r.exit_code == 0, r.output
    assert "spike-driven: no op but the encoder multiplies" in r.output and "2.40x" in r.output


def test_v1_graphs_cannot_be_reparameterized_and_stay_spike_driven():
    from models import SDTConfig, build_model

    g = api.deploy_graph(build_model(SDTConfig(img_size=16, dim=8, depth=1, num_heads=2, num_classes=3,
                                                pooling_stat="0011", time_steps=1)))
    s = dataflow(g)["summary"]
    assert s["spike_driven"] and s["encoder"] == ["patch_embed.proj_conv"] and s["ops"]["integer-AC"] == 0
    assert any(e["value"] == "integer [0, 16]" for e in dataflow(g)["edges"])    # kv_sum over 4 x 4 tokens
    with pytest.raises(DeployError, match="nothing to re-parameterize"):
        reparameterize(g)
