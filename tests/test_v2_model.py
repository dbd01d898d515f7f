"""Meta-SpikeFormer (SDT V2, models.sdt_v2) against what the ORIGINAL V2 code computed.

Expected values come only from the original code or from hand computations:
- `../shared/fixtures/v2/` (checkpoint, input and every tap written by the original V2 code; see its
  README), skipped with a reason where absent;
- `tests/data/oracle_v2/` (small checkpoints in the original `save_model` layout and the taps the
  original model computed for them; see its README);
- parameter counts measured on the original `models.py` (commit 35f245f, 2026-12-05).

Spikes, kv and qkv are compared with `np.array_equal`. Logits and the head outputs are compared to
1e-5: they are float32 sums whose order depends on the CPU's GEMM kernel. Measured: the ORIGINAL code,
run on the machine that made tests/data/oracle_v2, gives logits differing from the shared fixture's by
up to 4.8e-7 (head output 7.2e-7) while every spike, kv and qkv is equal; there the project's model
equals the original's logits bit for bit (fixture, every oracle file, random configurations).
"""
from __future__ import annotations

import argparse
import functools
from pathlib import Path

import numpy as np
import pytest
import torch
from spikingjelly.clock_driven import functional

from models import (
    ConfigError,
    SDTConfig,
    V2Config,
    build_model,
    build_v2_model,
    infer_v2_from_state_dict,
    is_v2_state_dict,
    named_v2_config,
    v2_config_for_checkpoint,
    v2_config_from_args,
    v2_lif_names,
    v2_parameter_count,
    v2_spike_names,
)
from models.config_v2 import V2_NAMED_CONFIGS
from models.sdt_v2 import BNAndPad, MetaSpikeFormer, bn_pad_value

from conftest import ORACLE, ROOT, SHARED

V2_FIXTURE = SHARED / "fixtures" / "v2"
V2_CKPT = V2_FIXTURE / "v2_tiny_t2_32px.pth"
V2_INPUT = V2_FIXTURE / "v2_tiny_t2_32px_input.npy"
V2_REF = V2_FIXTURE / "v2_tiny_t2_32px_ref.npz"
ORACLE_V2 = ROOT / "tests" / "data" / "oracle_v2"
ORACLE_V2_CASES = sorted(p.stem for p in ORACLE_V2.glob("*.pth"))
FLOAT_KEYS = ("logits", "head.out", "head_kd.out")
NOT_TAPS = ("input", "label", "logits")

needs_v2_fixture = pytest.mark.skipif(not V2_CKPT.exists(), reason=f"the shared V2 fixture {V2_FIXTURE} is absent")

# The configurations the harness built (tests/data/oracle_v2/README.md). num_heads shapes no parameter.
ORACLE_V2_CONFIGS = {
    "kd_t4_64px": V2Config(img_size=64, in_channels=3, num_classes=10, embed_dim=(4, 8, 12, 12), num_heads=4,
                           time_steps=4, kd=True),
    "odd_t1_37px": V2Config(img_size=37, in_channels=3, num_classes=7, embed_dim=(5, 6, 9, 15), num_heads=3,
                            time_steps=1, kd=False),
    "c2_h1_t2_48px": V2Config(img_size=48, in_channels=2, num_classes=5, embed_dim=(4, 8, 8, 12), num_heads=1,
                              time_steps=2, kd=False),
    "kd_t3_rect": V2Config(img_size=40, in_channels=3, num_classes=4, embed_dim=(6, 8, 10, 14), num_heads=2,
                           time_steps=3, kd=True),
    # kd was True in the original; with no head it cannot show in the state dict and changes nothing.
    "noclass_kd_c1_t2": V2Config(img_size=64, in_channels=1, num_classes=0, embed_dim=(4, 8, 8, 8), num_heads=2,
                                 time_steps=2, kd=False),
}

# Parameter counts of the original factories, measured with the original models.py
# (BICLab/Spike-Driven-Transformer-V2 @ 35f245f4f79acf1a2b3ef22698c58ab05c1ede33, 2026-12-05):
# sum(p.numel() for p in models.metaspikformer_8_*(kd=...).parameters()).
ORIGINAL_PARAMETER_COUNTS = {
    "v2/metaspikformer_8_384": 31_333_864,
    "v2/metaspikformer_8_384_kd": 31_814_864,
    "v2/metaspikformer_8_512": 55_350_248,
    "v2/metaspikformer_8_512_kd": 55_991_248,
    "v2/metaspikformer_8_768": 123_741_160,
    "v2/metaspikformer_8_768_kd": 124_702_160,
}


def safe_load(path: Path) -> dict:
    """The checkpoint as an untrusted pickle: weights only, argparse.Namespace the one allowed global."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


@functools.cache
def npz(path: Path) -> dict:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def run(model: MetaSpikeFormer, x: np.ndarray) -> tuple[np.ndarray, dict]:
    taps: dict = {}
    with torch.no_grad():
        y = model(torch.from_numpy(x), taps)
    functional.reset_net(model)
    out = {}
    for k, t in taps.items():
        if k.endswith((".kv", ".qkv")):
            assert t.dtype == torch.int32, k
            out[k] = t.numpy()
        elif k in FLOAT_KEYS:
            out[k] = t.numpy()
        else:
            assert set(np.unique(t.numpy())) <= {0.0, 1.0}, k
            out[k] = t.numpy().astype(np.uint8)
    return y.numpy(), out


def assert_matches_original(logits: np.ndarray, taps: dict, ref: dict) -> None:
    expected = [k for k in ref if k not in NOT_TAPS]
    assert sorted(expected) == sorted(taps), sorted(set(expected) ^ set(taps))
    for k in expected:
        if k in FLOAT_KEYS:
            np.testing.assert_allclose(taps[k], ref[k], rtol=0, atol=1e-5, err_msg=k)
        else:
            assert taps[k].dtype == ref[k].dtype and taps[k].shape == ref[k].shape, k
            assert np.array_equal(taps[k], ref[k]), f"{k}: {int((taps[k] != ref[k]).sum())} elements differ"
    np.testing.assert_allclose(logits, ref["logits"], rtol=0, atol=1e-5)


def loaded(path: Path, num_heads=None) -> tuple[MetaSpikeFormer, dict]:
    ck = safe_load(path)
    cfg = v2_config_for_checkpoint(ck["args"], ck["model"], num_heads=num_heads)
    model = build_v2_model(cfg)
    model.load_state_dict(ck["model"], strict=True)
    return model, ck


# ------------------------------------------------------------------------------------------- fixture

@needs_v2_fixture
def test_fixture_config_is_inferred_from_args_and_shapes():
    ck = safe_load(V2_CKPT)
    assert set(ck) == {"model", "optimizer", "epoch", "scaler", "args"}
    assert isinstance(ck["args"], argparse.Namespace) and ck["args"].model == "v2_tiny_16_32_64_80"
    # The README: embed_dim [16,32,64,80], 8 heads, mlp 4, 3 channels, 10 classes, kd False, T 2, 32 px.
    assert v2_config_for_checkpoint(ck["args"], ck["model"]) == V2Config(
        img_size=32, in_channels=3, num_classes=10, embed_dim=(16, 32, 64, 80), num_heads=8, mlp_ratio=4,
        time_steps=2, kd=False)
    with pytest.raises(ConfigError, match="not a factory"):
        v2_config_from_args(ck["args"])


@needs_v2_fixture
def test_fixture_reproduces_every_tap_of_the_original():
    model, _ = loaded(V2_CKPT)
    ref = npz(V2_REF)
    assert np.array_equal(np.load(V2_INPUT), ref["input"])
    logits, taps = run(model, ref["input"])
    assert_matches_original(logits, taps, ref)
    lifs = [k for k in ref if k not in NOT_TAPS and k not in FLOAT_KEYS and not k.endswith(("kv", "qkv"))]
    assert len(lifs) == 77                                   # the README: 77 MultiStepLIFNodes
    assert model.cfg.feature_sizes() == [(16, 16), (8, 8), (4, 4), (2, 2), (2, 2)]   # the README's sizes
    assert list(logits.argmax(-1)) == [4, 9, 6, 8, 8, 8, 2, 9]   # the README's predictions


@needs_v2_fixture
def test_fixture_module_tree_is_the_original():
    model, ck = loaded(V2_CKPT)
    sd = model.state_dict()
    assert list(sd) == list(ck["model"])                     # same keys in the same order
    assert all(sd[k].shape == ck["model"][k].shape for k in sd)
    assert v2_parameter_count(model.cfg) == sum(p.numel() for p in model.parameters()) == 901_674  # README
    lifs = {n: m for n, m in model.named_modules() if type(m).__name__ == "LIF"}
    assert list(lifs) == v2_lif_names(model.cfg)
    assert {n for n, m in lifs.items() if m.v_threshold != 1.0} == {n for n in lifs if n.endswith("attn_lif")}
    assert all(m.v_threshold == 0.5 for n, m in lifs.items() if n.endswith("attn_lif"))


@needs_v2_fixture
def test_fixture_one_image_at_a_time_gives_the_same_taps():
    model, _ = loaded(V2_CKPT)
    x = npz(V2_REF)["input"][:3]
    _, whole = run(model, x)
    for i in range(len(x)):
        _, single = run(model, x[i:i + 1])
        for k, v in single.items():
            if k not in FLOAT_KEYS:
                assert np.array_equal(v, whole[k][:, i:i + 1]), k


# ------------------------------------------------------------------------------------ oracle variants

@pytest.mark.parametrize("name", ORACLE_V2_CASES)
def test_variant_reproduces_every_tap_of_the_original(name):
    expected_cfg = ORACLE_V2_CONFIGS[name]
    model, ck = loaded(ORACLE_V2 / f"{name}.pth", num_heads=expected_cfg.num_heads)
    assert set(ck) == {"model", "optimizer", "epoch", "scaler", "args"}
    assert model.cfg == expected_cfg
    ref = npz(ORACLE_V2 / f"{name}_ref.npz")
    logits, taps = run(model, ref["input"])
    if "head_kd.out" in ref and "head_kd.out" not in taps:
        # kd with no head: both heads are the identity, the original's mean (x + x) / 2 is x itself
        assert expected_cfg.num_classes == 0
        taps["head_kd.out"] = taps["head.out"]
    assert_matches_original(logits, taps, ref)
    # the feature-map sizes the original produced, stage by stage
    h, w = ref["input"].shape[2:]
    produced = [ref[k].shape[-2:] for k in ("ConvBlock1_1.0.lif1", "ConvBlock1_2.0.lif1", "ConvBlock2_1.0.lif1",
                                             "block3.0.attn.q_lif", "block4.0.attn.q_lif")]
    assert expected_cfg.feature_sizes(h, w) == [tuple(p) for p in produced]


def test_variants_cover_what_the_original_allows():
    """The variant set must keep covering kd, T = 1..4, 1-3 input channels, odd sizes, firing attention."""
    assert ORACLE_V2_CASES == sorted(ORACLE_V2_CONFIGS)
    cfgs = list(ORACLE_V2_CONFIGS.values())
    assert {c.time_steps for c in cfgs} == {1, 2, 3, 4}
    assert {c.in_channels for c in cfgs} == {1, 2, 3}
    assert {c.kd for c in cfgs} == {True, False}
    assert len({c.num_heads for c in cfgs}) >= 4
    assert any(any(e % 2 for e in c.embed_dim) for c in cfgs)
    for name in ORACLE_V2_CASES:
        ref = npz(ORACLE_V2 / f"{name}_ref.npz")
        spikes = {k: v for k, v in ref.items() if v.dtype == np.uint8}
        assert all(v.any() for v in spikes.values()), name          # every LIF fires somewhere
        assert all(v.any() for k, v in spikes.items() if k.endswith("attn_lif")), name
        assert len(spikes) == len(v2_lif_names(ORACLE_V2_CONFIGS[name]))
    sizes = {npz(ORACLE_V2 / f"{n}_ref.npz")["input"].shape[2:] for n in ORACLE_V2_CASES}
    assert any(h % 2 for h, w in sizes) and any(h != w for h, w in sizes)
    assert all((ORACLE_V2 / f"{n}.pth").stat().st_size < 600_000 for n in ORACLE_V2_CASES)


# --------------------------------------------------------------------------------- parameter counts

@pytest.mark.parametrize("name", sorted(ORIGINAL_PARAMETER_COUNTS))
def test_parameter_count_of_the_published_factories(name):
    cfg = named_v2_config(name)
    assert v2_parameter_count(cfg) == ORIGINAL_PARAMETER_COUNTS[name]
    with torch.device("meta"):
        model = MetaSpikeFormer(cfg)
    assert sum(p.numel() for p in model.parameters()) == ORIGINAL_PARAMETER_COUNTS[name]
    assert ("head_kd.weight" in model.state_dict()) == name.endswith("_kd")


def test_named_configs_are_the_factories():
    assert sorted(V2_NAMED_CONFIGS) == sorted(ORIGINAL_PARAMETER_COUNTS)
    assert named_v2_config("v2/metaspikformer_8_768_kd").embed_dim == (192, 384, 768, 960)
    for cfg in V2_NAMED_CONFIGS.values():
        assert (cfg.num_heads, cfg.mlp_ratio, cfg.in_channels, cfg.num_classes) == (8, 4, 3, 1000)
    with pytest.raises(ConfigError, match="unknown V2 config"):
        named_v2_config("v2/metaspikformer_8_256")


# ------------------------------------------------------------------------------ config from checkpoint

def _args(**kw) -> argparse.Namespace:
    base = {"model": "metaspikformer_8_512", "model_mode": "ms", "time_steps": 1, "input_size": 224, "kd": False,
                "nb_classes": 1000}
    base.update(kw)
    return argparse.Namespace(**base)


def test_config_from_args_follows_main_finetune():
    # main_finetune: models.__dict__[args.model](kd=args.kd); model.T = args.time_steps; nb_classes unused
    cfg = v2_config_from_args(_args(model="metaspikformer_8_384", time_steps=4, kd=True, nb_classes=10,
                                    input_size=288))
    assert cfg == V2Config(img_size=288, in_channels=3, num_classes=1000, embed_dim=(96, 192, 384, 480),
                           num_heads=8, mlp_ratio=4, time_steps=4, kd=True)
    assert v2_config_from_args(vars(_args())) == named_v2_config("v2/metaspikformer_8_512")
    assert v2_config_from_args({"model": "metaspikformer_8_768"}).time_steps == 1      # parser default
    with pytest.raises(ConfigError, match="'v2_tiny' is not a factory of the original models.py"):
        v2_config_from_args(_args(model="v2_tiny"))
    with pytest.raises(ConfigError, match="model_mode is 'sew'"):
        v2_config_from_args(_args(model_mode="sew"))


def _random_v2_state_dict(cfg: V2Config) -> dict:
    return MetaSpikeFormer(cfg).state_dict()


def test_config_for_checkpoint_takes_shapes_and_refuses_a_factory_mismatch():
    small = V2Config(img_size=16, in_channels=2, num_classes=3, embed_dim=(6, 10, 12, 18), num_heads=3, kd=True)
    sd = _random_v2_state_dict(small)
    cfg = v2_config_for_checkpoint(_args(model="label", time_steps=3, input_size=16), sd, num_heads=3)
    assert cfg == small.replace(time_steps=3)
    with pytest.raises(ConfigError, match="num_heads does not show in a state dict .* give num_heads"):
        v2_config_for_checkpoint(None, sd)
    sd16 = _random_v2_state_dict(small.replace(embed_dim=(6, 10, 16, 24), num_heads=8))
    assert v2_config_for_checkpoint(None, sd16) == small.replace(img_size=224, embed_dim=(6, 10, 16, 24),
                                                                 num_heads=8, time_steps=1)
    with pytest.raises(ConfigError, match="'metaspikformer_8_384' builds embed_dim"):
        v2_config_for_checkpoint(_args(model="metaspikformer_8_384"), sd)
    factory = named_v2_config("v2/metaspikformer_8_384_kd")
    with torch.device("meta"):
        fsd = MetaSpikeFormer(factory).state_dict()
    assert v2_config_for_checkpoint(_args(model="metaspikformer_8_384", kd=True, time_steps=4), fsd) == \
        factory.replace(time_steps=4)
    with pytest.raises(ConfigError, match="builds kd = False, but the state dict has kd = True"):
        v2_config_for_checkpoint(_args(model="metaspikformer_8_384", kd=False), fsd)


def test_infer_from_state_dict_shapes():
    cfg = V2Config(img_size=8, in_channels=1, num_classes=0, embed_dim=(3, 4, 6, 9), num_heads=3, kd=True)
    sd = _random_v2_state_dict(cfg)
    # No head: kd cannot show (both heads would be nn.Identity).
    assert infer_v2_from_state_dict(sd) == {"embed_dim": (3, 4, 6, 9), "in_channels": 1, "num_classes": 0,
                                            "mlp_ratio": 4, "kd": False}
    ddp = {f"module.{k}": v for k, v in _random_v2_state_dict(cfg.replace(num_classes=5)).items()}
    assert is_v2_state_dict(ddp)
    assert infer_v2_from_state_dict(ddp)["num_classes"] == 5 and infer_v2_from_state_dict(ddp)["kd"] is True
    broken = {k: v for k, v in sd.items() if not k.startswith("block4.1.")}
    with pytest.raises(ConfigError, match="1 block4 blocks; the original V2 always has 6 and 2"):
        infer_v2_from_state_dict(broken)


@needs_v2_fixture
def test_infer_from_the_fixture_state_dict():
    sd = safe_load(V2_CKPT)["model"]
    assert infer_v2_from_state_dict(sd) == {"embed_dim": (16, 32, 64, 80), "in_channels": 3, "num_classes": 10,
                                            "mlp_ratio": 4, "kd": False}


def test_v1_and_v2_state_dicts_are_told_apart():
    v1 = build_model(SDTConfig(img_size=16, dim=16, depth=1, num_heads=2, time_steps=1)).state_dict()
    v2 = _random_v2_state_dict(V2Config(img_size=16, embed_dim=(4, 8, 8, 8), num_heads=2, num_classes=4))
    assert is_v2_state_dict(v2) and not is_v2_state_dict(v1)
    assert not is_v2_state_dict({}) and not is_v2_state_dict({"head.weight": torch.zeros(2, 2)})
    with pytest.raises(ConfigError, match="not a V2 Meta-SpikeFormer state dict"):
        infer_v2_from_state_dict(v1)
    oracle_v1 = sorted(ORACLE.glob("*.pth"))
    assert oracle_v1, "the V1 oracle checkpoints are missing"
    for path in oracle_v1:   # real V1 checkpoints from the original V1 code
        ck = safe_load(path)
        assert not is_v2_state_dict(ck["state_dict"]), path.name
    for path in sorted(ORACLE_V2.glob("*.pth")):
        assert is_v2_state_dict(safe_load(path)["model"]), path.name


# ------------------------------------------------------------------------------------- bad configs

@pytest.mark.parametrize("changes, message", [
    ({"embed_dim": (16, 32, 64)}, "embed_dim must be four positive integers"),
    ({"embed_dim": (16, 32, 0, 80)}, "embed_dim must be four positive integers"),
    ({"embed_dim": (1, 32, 64, 80)}, "embed_dim[0] must be at least 2"),
    ({"embed_dim": (16, 32, 64, 84)}, "embed_dim[3] = 84 (stage 4) must be divisible by num_heads 8"),
    ({"embed_dim": (16, 32, 60, 80)}, "embed_dim[2] = 60 (stage 3) must be divisible by num_heads 8"),
    ({"mlp_ratio": 2}, "mlp_ratio must be 4: the original conv block reshapes"),
    ({"num_heads": 0}, "num_heads must be a positive integer, got 0"),
    ({"time_steps": 0}, "time_steps must be a positive integer, got 0"),
    ({"in_channels": True}, "in_channels must be a positive integer, got True"),
    ({"num_classes": -1}, "num_classes must be an integer >= 0"),
    ({"kd": "yes"}, "kd must be True or False, got 'yes'"),
])
def test_bad_configs_are_refused_with_one_sentence(changes, message):
    with pytest.raises(ConfigError) as info:
        V2Config(**changes)
    text = str(info.value)
    assert message in text and "\n" not in text


def test_list_embed_dim_becomes_a_tuple():
    assert V2Config(embed_dim=[16, 32, 64, 80]).embed_dim == (16, 32, 64, 80)


# ------------------------------------------------------------------------------- model behaviour

def _small_model(**kw) -> MetaSpikeFormer:
    torch.manual_seed(0)
    base = {"img_size": 16, "in_channels": 3, "num_classes": 4, "embed_dim": (4, 8, 8, 8), "num_heads": 2,
            "time_steps": 2}
    base.update(kw)
    return build_v2_model(V2Config(**base))


def test_five_dimensional_input_is_refused_like_the_original():
    # The original's x.unsqueeze(0).repeat(T, 1, 1, 1, 1) raises on [B, T, C, H, W]: V2 has no frame input.
    with pytest.raises(ValueError, match=r"cannot take \[B,T,C,H,W\] frames"):
        _small_model()(torch.zeros(1, 2, 3, 16, 16))


def test_three_dimensional_input_is_a_batch_of_one_like_the_original():
    model = _small_model()
    x = torch.randn(3, 16, 16)
    with torch.no_grad():
        a = model(x)
        functional.reset_net(model)
        b = model(x[None])
    assert a.shape == (1, 4) and torch.equal(a, b)


def test_kd_output_is_the_mean_of_both_heads_in_eval_and_the_pair_in_training():
    model = _small_model(kd=True)
    x = torch.randn(2, 3, 16, 16)
    taps: dict = {}
    with torch.no_grad():
        y = model(x, taps)
    functional.reset_net(model)
    assert torch.equal(y, (taps["head.out"].mean(0) + taps["head_kd.out"].mean(0)) / 2)
    model.train()
    with torch.no_grad():
        pair = model(x)
    assert isinstance(pair, tuple) and len(pair) == 2 and pair[0].shape == (2, 4)


def test_taps_follow_the_documented_names_and_layouts():
    model = _small_model(kd=True, time_steps=3)
    taps: dict = {}
    with torch.no_grad():
        model(torch.randn(2, 3, 16, 16), taps)
    assert list(taps) == v2_spike_names(model.cfg)
    # 16 px -> 8, 4, 2, 1, 1: one token in block3/4; heads 2 of 4 channels
    assert taps["block3.0.attn.kv"].shape == (3, 2, 2, 4, 4) and taps["block3.0.attn.kv"].dtype == torch.int32
    assert taps["block4.1.attn.qkv"].shape == (3, 2, 2, 1, 4)
    assert taps["block3.0.attn.attn_lif"].shape == (3, 2, 8, 1)
    assert taps["block3.0.mlp.fc2_lif"].shape == (3, 2, 32, 1)
    assert taps["ConvBlock1_1.0.lif2"].shape == (3, 2, 8, 8, 8)
    assert taps["lif"].shape == (3, 2, 8) and taps["head.out"].shape == (3, 2, 4)


def test_T_is_an_attribute_as_in_the_original():
    model = _small_model(time_steps=2)
    model.T = 3
    taps: dict = {}
    with torch.no_grad():
        model(torch.randn(1, 3, 16, 16), taps)
    assert taps["lif"].shape[0] == 3


def test_pad_ring_is_computed_in_the_original_order():
    """The ring is beta - (mean * gamma) / sqrt(var + eps), each op rounded to float32 (numpy by hand;
    the root is torch.sqrt's, the op the original calls: on an AVX-512 CPU it is not the correctly rounded
    root in a few values of a thousand). Regrouped as BatchNorm does, beta - mean * (gamma / root), the
    value differs in many channels."""
    rng = np.random.default_rng(0)
    c = 1000
    layer = BNAndPad(c)
    gamma, beta = rng.uniform(0.2, 3, c).astype(np.float32), rng.uniform(-2, 2, c).astype(np.float32)
    mean, var = rng.normal(0, 2, c).astype(np.float32), rng.uniform(0.01, 5, c).astype(np.float32)
    with torch.no_grad():
        layer.bn.weight.copy_(torch.from_numpy(gamma))
        layer.bn.bias.copy_(torch.from_numpy(beta))
        layer.bn.running_mean.copy_(torch.from_numpy(mean))
        layer.bn.running_var.copy_(torch.from_numpy(var))
    layer.eval()
    root = torch.sqrt(torch.from_numpy(var + np.float32(1e-5))).numpy()
    expected = beta - (mean * gamma) / root
    regrouped = beta - mean * (gamma / root)
    assert (expected != regrouped).sum() > 50
    assert np.array_equal(bn_pad_value(layer.bn).numpy(), expected)
    x = torch.randn(2, c, 3, 4)
    with torch.no_grad():
        out = layer(x)
        inner = layer.bn(x)
    assert out.shape == (2, c, 5, 6)
    assert torch.equal(out[:, :, 1:4, 1:5], inner)
    ring = torch.ones(5, 6, dtype=torch.bool)
    ring[1:4, 1:5] = False
    assert np.array_equal(out[:, :, ring].numpy(), np.broadcast_to(expected[None, :, None], (2, c, 18)))
