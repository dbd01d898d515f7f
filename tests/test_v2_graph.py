"""SDT V2 in the toolchain: loading, the deploy graph, BatchNorm and pad-ring folding.

Expected values come from the ORIGINAL V2 code only (the shared fixture `../shared/fixtures/v2/` and
`tests/data/oracle_v2/`, see their READMEs) or from hand computations. Spikes, kv and qkv are compared
with `np.array_equal`; logits to 1e-5 (float32 sums whose order depends on the CPU's kernels; see
tests/test_v2_model.py).
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from models import V2Config, build_v2_model
from sdt_deploy import api
from sdt_deploy.errors import DeployError
from sdt_deploy.ir.graph import BatchNorm, BNPad, Conv, Graph, Input, KdReadout, KVProduct, QKVProduct
from sdt_deploy.ir.lower_v2 import lower_v2, original_tap_shape, qkv_to_original
from sdt_deploy.ir.passes import fold_bn
from sdt_deploy.run.float_executor import execute

from conftest import ROOT, SHARED

V2_FIXTURE = SHARED / "fixtures" / "v2"
V2_CKPT = V2_FIXTURE / "v2_tiny_t2_32px.pth"
V2_REF = V2_FIXTURE / "v2_tiny_t2_32px_ref.npz"
ORACLE_V2 = ROOT / "tests" / "data" / "oracle_v2"
# num_heads shapes no parameter: from tests/data/oracle_v2/README.md
ORACLE_V2_HEADS = {"kd_t4_64px": 4, "odd_t1_37px": 3, "c2_h1_t2_48px": 1, "kd_t3_rect": 2, "noclass_kd_c1_t2": 2}
NOT_TAPS = ("input", "label", "logits", "head.out", "head_kd.out")

needs_v2_fixture = pytest.mark.skipif(not V2_CKPT.exists(), reason=f"the shared V2 fixture {V2_FIXTURE} is absent")


@functools.cache
def ref_of(path: str) -> dict:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def case(name: str):
    """(checkpoint path, reference arrays, flags) of the fixture or an oracle file."""
    if name == "fixture":
        return str(V2_CKPT), ref_of(str(V2_REF)), {}
    return (str(ORACLE_V2 / f"{name}.pth"), ref_of(str(ORACLE_V2 / f"{name}_ref.npz")),
            {"num_heads": ORACLE_V2_HEADS[name]})


CASES = (["fixture"] if V2_CKPT.exists() else []) + sorted(ORACLE_V2_HEADS)


@functools.cache
def loaded_case(name: str):
    path, ref, flags = case(name)
    return api.load_model(path, flags=flags)


def graph_taps(name: str, g: Graph, dtype=torch.float32):
    """What the float executor computes for the case's input, as the original's taps."""
    _, ref, flags = case(name)
    products = tuple(k for k in ref if k.endswith((".kv", ".qkv")))
    logits, out, _ = execute(g, ref["input"], dtype=dtype, currents=products)
    heads = loaded_case(name).config.num_heads
    taps = {}
    for k, v in out.items():
        if k.endswith(".qkv"):   # back to the original's [heads, N, d] integers before the 0.125 scale
            v = qkv_to_original(v * 8, heads)
        taps[k] = v
    return logits, taps


@pytest.mark.parametrize("name", CASES)
def test_unfolded_graph_reproduces_every_tap_of_the_original(name):
    """The lowered graph, BatchNorms and BNAndPad rings unfolded, in the float executor: every LIF's
    spikes, kv and qkv equal to the original's, logits to 1e-5 (rectangular and head-less cases too)."""
    path, ref, _ = case(name)
    src = loaded_case(name)
    g = lower_v2(src.model, input_hw=ref["input"].shape[-2:])
    logits, taps = graph_taps(name, g)
    expected = [k for k in ref if k not in NOT_TAPS]
    assert len(expected) == 77 + 16                      # 77 LIFs, kv and qkv of 8 blocks
    for k in expected:
        got = taps[k].reshape(ref[k].shape)
        assert got.shape[2:] == original_tap_shape(k, g[k].shape) or k.endswith(".qkv"), k
        assert np.array_equal(got.astype(ref[k].dtype), ref[k]), k
        if k.endswith((".kv", ".qkv")):
            assert np.array_equal(got, np.round(got)), k    # integers
    np.testing.assert_allclose(logits, ref["logits"], rtol=0, atol=1e-5)


@needs_v2_fixture
def test_fixture_loads_through_the_toolchain_with_its_sources():
    src = api.load_model(V2_CKPT)
    cfg = src.config
    assert cfg == V2Config(img_size=32, in_channels=3, num_classes=10, embed_dim=(16, 32, 64, 80), num_heads=8,
                           time_steps=2, kd=False)
    assert src.resolved.sources["embed_dim"] == "state dict shapes"
    assert src.resolved.sources["time_steps"] == "checkpoint args"
    assert src.checkpoint.layout == "bare" and src.checkpoint.args["model"] == "v2_tiny_16_32_64_80"
    # the evaluation transform of main_finetune.py (util/datasets.py): ImageNet mean/std, crop 224/256
    assert src.data.mean == (0.485, 0.456, 0.406) and src.data.crop_pct == 224 / 256
    rep = api.inspect_model(src)
    assert rep["params"] == 901_674                                      # the fixture README
    assert all(row["called"] for row in rep["layers"])                   # V2 calls its attn_lif


@needs_v2_fixture
def test_flags_that_V2_cannot_take_are_refused():
    with pytest.raises(DeployError, match="V1 setting"):
        api.load_model(V2_CKPT, flags={"depth": 4})
    with pytest.raises(DeployError, match="state dict has num_classes = 10"):
        api.load_model(V2_CKPT, flags={"num_classes": 7})
    with pytest.raises(DeployError, match="mlp-ratio"):
        api.load_model(V2_CKPT, flags={"mlp_ratio": 2})
    assert api.load_model(V2_CKPT, flags={"time_steps": 3}).model.T == 3


def test_named_configs_build_the_published_sizes():
    from sdt_deploy.files.checkpoint import model_from_config

    src = model_from_config({"kd": True}, "v2/metaspikformer_8_384")
    # measured on the original models.py: metaspikformer_8_384(kd=True)
    assert sum(p.numel() for p in src.model.parameters()) == 31_814_864
    assert src.resolved.sources["kd"] == "command line"
    with pytest.raises(DeployError, match="V2 setting"):
        model_from_config({"kd": True}, "cifar10/2_256_300E_t4")


@pytest.mark.parametrize("name", CASES)
def test_fold_removes_every_batchnorm_and_ring_and_is_the_same_function(name):
    """fold_bn: no BatchNorm or BNPad left; each ring became the 1x1 convolution's zero padding. In float64,
    the folded graph computes the same currents into every LIF (to 1e-9 relative: the fold re-rounds)
    and the same spikes as the unfolded one."""
    _, ref, _ = case(name)
    src = loaded_case(name)
    g = lower_v2(src.model, input_hw=ref["input"].shape[-2:])
    f = fold_bn(g)
    assert not f.of_type(BatchNorm) and not f.of_type(BNPad) and f.meta["folded"]
    rings = [n for n in g.of_type(BNPad)]
    assert len(rings) == 8 * 4                                          # 4 RepConvs in each of 8 blocks
    for ring in rings:
        conv = f[ring.inputs[0]]
        assert conv.padding == ring.pad == 1 and conv.weight_shape[2:] == (1, 1) and conv.shape == ring.shape
    x = ref["input"]
    into_q = "block3.0.attn.q_conv.1", "block3.0.attn.q_conv.0.body.2.1"   # what feeds q_lif: unfolded, folded
    _, a, _ = execute(g, x, dtype=torch.float64, currents=(into_q[0],))
    _, b, _ = execute(f, x, dtype=torch.float64, currents=(into_q[1],))
    u, v = a.pop(into_q[0]), b.pop(into_q[1])
    assert np.max(np.abs(u - v)) <= 1e-9 * max(1.0, np.max(np.abs(u)))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@needs_v2_fixture
def test_ring_is_computed_in_the_original_order():
    """The float executor fills the ring as the original does (bias - mean * w / sqrt(var + eps) in
    float32), which is not what BatchNorm gives a zero input in about a third of the channels."""
    src = loaded_case("fixture")
    g = lower_v2(src.model)
    ring = g["block3.0.attn.q_conv.0.body.1"]
    bn = src.model.block3[0].attn.q_conv[0].body[1].bn
    x = np.zeros((1, 3, 32, 32), np.float32)
    _, out, _ = execute(g, x, currents=(ring.name,))
    value = torch.from_numpy(out[ring.name][0, 0, :, 0, 0])
    original = bn.bias.detach() - bn.running_mean * bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    assert torch.equal(value, original)
    as_bn = torch.nn.functional.batch_norm(torch.zeros(1, bn.num_features, 1, 1), bn.running_mean, bn.running_var,
                                           bn.weight.detach(), bn.bias.detach(), False, 0.0, bn.eps).flatten()
    assert not torch.equal(value, as_bn)      # the order matters (measured: many channels differ by an ulp)


def test_the_ring_folds_only_after_an_unpadded_1x1():
    w = np.ones((2, 2, 3, 3))
    bn = dict(weight=np.ones(2), bias=np.zeros(2), mean=np.zeros(2), var=np.ones(2))
    g = Graph([Input("input", (), (2, 4, 4)), Conv("c", ("input",), (2, 4, 4), weight=w, padding=1),
               BNPad("r", ("c",), (2, 6, 6), **bn)], {})
    with pytest.raises(DeployError, match="unpadded 1x1"):
        fold_bn(g)


def test_a_chain_of_batchnorms_folds_in_order():
    """conv -> BN -> BN (V2's RepConv end) folds to the composition, by hand."""
    rng = np.random.default_rng(0)
    w, b = rng.normal(size=(3, 2, 1, 1)), rng.normal(size=3)
    p = [dict(weight=rng.uniform(0.5, 2, 3), bias=rng.normal(size=3), mean=rng.normal(size=3),
              var=rng.uniform(0.5, 2, 3), eps=1e-5) for _ in range(2)]
    g = Graph([Input("input", (), (2, 1, 1)), Conv("c", ("input",), (3, 1, 1), weight=w, bias=b),
               BatchNorm("bn1", ("c",), (3, 1, 1), **p[0]), BatchNorm("bn2", ("bn1",), (3, 1, 1), **p[1])], {})
    f = fold_bn(g)
    x = rng.normal(size=2)
    y = w[:, :, 0, 0] @ x + b
    for q in p:
        y = (y - q["mean"]) / np.sqrt(q["var"] + q["eps"]) * q["weight"] + q["bias"]
    c = f["c"]
    np.testing.assert_allclose(c.weight[:, :, 0, 0] @ x + c.bias, y, rtol=1e-12)


def test_graph_has_the_new_ops_and_the_original_names():
    cfg = V2Config(img_size=32, num_classes=3, embed_dim=(4, 8, 8, 16), num_heads=2, time_steps=1, kd=True)
    g = lower_v2(build_v2_model(cfg))
    assert isinstance(g["block3.0.attn.kv"], KVProduct) and g["block3.0.attn.kv"].shape == (2, 4, 4)
    qkv = g["block3.0.attn.qkv"]
    assert isinstance(qkv, QKVProduct) and qkv.scale_exp == 3 and qkv.shape == (8, 2, 2)
    dw = g["ConvBlock1_1.0.Conv.dwconv"]                   # stage 1 at embed_dim[0] // 2 = 2, SepConv's 2 * 2
    assert dw.groups == 4 and dw.weight_shape == (4, 1, 7, 7) and dw.shape == (4, 16, 16)
    assert isinstance(g.output, KdReadout) and g.output.inputs == ("head", "head_kd")
    assert g.meta["family"] == "v2" and g.meta["token_shape"] == [16, 2, 2]  # downsample4 has stride 1
    assert g.param_count() == sum(p.numel() for p in build_v2_model(cfg).parameters())
    assert g["block3.0.mlp.fc2_lif"].shape == (32, 2, 2)                          # 4 x 8 hidden, 2 x 2 tokens
    assert original_tap_shape("block3.0.mlp.fc2_lif", (32, 2, 2)) == (32, 4)
