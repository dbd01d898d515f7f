"""Published configurations, conf YAML reading with train.py's meaning, and value sources."""
import json

import pytest

from models import ConfigError, SDTConfig, build_model, parameter_count
from sdt_deploy.cli.app import main
from sdt_deploy.errors import DeployError
from sdt_deploy.files.configs import PUBLISHED, model_keys, read_yaml, resolve

from conftest import SHARED

# Parameter counts computed by the ORIGINAL code (BICLab/Spike-Driven-Transformer 3faa822,
# `sum(p.numel() for p in model.parameters())` on SpikeDrivenTransformer built as train.py builds it)
# for every file of its conf/ folder; the ImageNet ones agree with the paper's table (16.81M, 23.37M,
# 29.68M, 36.01M, 66.34M; 8-768 exactly 66,339,144).
ORIGINAL_PARAMS = {
    ("cifar10-dvs/2_256_200E_t10_TET", "lif"): 2566794, ("cifar10-dvs/2_256_200E_t10_TET", "plif"): 2566816,
    ("cifar10/2_256_300E_t4", "lif"): 2567082, ("cifar10/2_256_300E_t4", "plif"): 2567104,
    ("cifar10/2_512_300E_t4", "lif"): 10233546, ("cifar10/2_512_300E_t4", "plif"): 10233568,
    ("cifar10/2_512_300E_t4_TET", "lif"): 10233546, ("cifar10/2_512_300E_t4_TET", "plif"): 10233568,
    ("cifar100/2_256_300E_t4", "lif"): 2590212, ("cifar100/2_256_300E_t4", "plif"): 2590234,
    ("cifar100/2_512_300E_t4", "lif"): 10279716, ("cifar100/2_512_300E_t4", "plif"): 10279738,
    ("gesture/2_256_200E_t10", "lif"): 2567051, ("gesture/2_256_200E_t10", "plif"): 2567073,
    ("gesture/2_256_200E_t16", "lif"): 2567051, ("gesture/2_256_200E_t16", "plif"): 2567073,
    ("imagenet/10_384_300E_t4", "lif"): 36006056, ("imagenet/10_384_300E_t4", "plif"): 36006142,
    ("imagenet/6_512_300E_t4", "lif"): 23373736, ("imagenet/6_512_300E_t4", "plif"): 23373790,
    ("imagenet/8_384_300E_t4", "lif"): 16816536, ("imagenet/8_384_300E_t4", "plif"): 16816606,
    ("imagenet/8_512_300E_t4", "lif"): 29689896, ("imagenet/8_512_300E_t4", "plif"): 29689966,
    ("imagenet/8_768_300E_t4", "lif"): 66339144, ("imagenet/8_768_300E_t4", "plif"): 66339214,
}
PAPER_MILLIONS = {"imagenet/8_384_300E_t4": 16.81, "imagenet/6_512_300E_t4": 23.37,
                  "imagenet/8_512_300E_t4": 29.68, "imagenet/10_384_300E_t4": 36.01,
                  "imagenet/8_768_300E_t4": 66.34}


def test_every_conf_file_is_published():
    assert {name for name, _ in ORIGINAL_PARAMS} == set(PUBLISHED)


@pytest.mark.parametrize("name,mode", sorted(ORIGINAL_PARAMS))
def test_parameter_count_equals_the_original(name, mode):
    cfg = resolve(flags={"spike_mode": mode}, yaml_path=name).config
    with __import__("torch").device("meta"):
        model = build_model(cfg)
    assert parameter_count(model) == ORIGINAL_PARAMS[(name, mode)]
    if name in PAPER_MILLIONS and mode == "lif":
        assert abs(parameter_count(model) / 1e6 - PAPER_MILLIONS[name]) < 0.011


@pytest.mark.skipif(not (SHARED / "sdt-conf").exists(), reason="../shared/sdt-conf is absent")
@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_table_equals_reading_the_original_yaml(name):
    """Our table of the published models == our YAML reader applied to the original conf files."""
    from_file = resolve(yaml_path=str(SHARED / "sdt-conf" / f"{name}.yml"))
    from_table = resolve(yaml_path=name)
    assert from_file.config == from_table.config
    assert from_file.data == from_table.data


def test_yaml_quirks_follow_train_py(tmp_path):
    assert resolve(yaml_path="imagenet/10_384_300E_t4").config.dim == 512        # the file name lies
    assert resolve(yaml_path="imagenet/10_384_300E_t4").config.depth == 10
    conf = tmp_path / "c.yml"
    conf.write_text("dataset: cifar10-dvs\nlayer: 3\ndim: 64\nmlp-ratio: 2\nimg_size: 64\nTET: true\n"
                    "time_steps: 10\npooling_stat: '0011'\nin_channels: 2\n")
    r = resolve(yaml_path=str(conf))
    assert r.config.depth == 3 and r.config.dim == 64
    assert r.config.mlp_ratio == 4            # `mlp-ratio` never reaches train.py's parser
    assert r.config.dvs_mode is True          # derived from the dataset, as train.py does
    assert r.config.tet is True and r.config.time_steps == 10
    assert r.sources["depth"].startswith("config") and r.sources["mlp_ratio"] == "train.py default"
    assert model_keys({"dataset": "gesture"})["dvs_mode"] is False


def test_flags_win_over_config_and_checkpoint_args():
    r = resolve(flags={"time_steps": 16}, yaml_path="cifar10/2_256_300E_t4",
                ckpt_args={"time_steps": 8, "dim": 256, "layer": 2})
    assert r.config.time_steps == 16 and r.sources["time_steps"] == "command line"
    r = resolve(yaml_path=None, ckpt_args={"time_steps": 8, "dim": 256, "layer": 2, "img_size": 32,
                                           "pooling_stat": "0011", "dataset": "torch/cifar10"})
    assert r.config.time_steps == 8 and r.sources["time_steps"] == "checkpoint args"


def test_state_dict_shapes_fill_what_nothing_else_says():
    cfg = SDTConfig(img_size=16, dim=24, depth=3, num_heads=3, mlp_ratio=2, pooling_stat="0011",
                    num_classes=7, in_channels=2, spike_mode="plif")
    sd = build_model(cfg).state_dict()
    r = resolve(state_dict=sd, flags={"img_size": 16, "pooling_stat": "0011"})
    for field in ("dim", "depth", "num_heads", "mlp_ratio", "num_classes", "in_channels", "spike_mode"):
        assert getattr(r.config, field) == getattr(cfg, field), field
        assert r.sources[field] == "state dict shapes"


@pytest.mark.parametrize("bad", [
    dict(pooling_stat="01"), dict(pooling_stat="0a11"), dict(time_steps=0), dict(time_steps=-3),
    dict(dim=20, num_heads=8), dict(spike_mode="alif"), dict(img_size=30, pooling_stat="1111"),
])
def test_invalid_configs_are_refused(bad):
    with pytest.raises(ConfigError):
        SDTConfig(**{**dict(img_size=32, dim=32, num_heads=4, pooling_stat="0011"), **bad})
    with pytest.raises(DeployError):
        resolve(flags={**dict(img_size=32, dim=32, num_heads=4, pooling_stat="0011"), **bad})


def test_inspect_config_json_reports_sources_and_params(capsys):
    assert main(["inspect", "--config", "imagenet/8_768_300E_t4", "--json", "-T", "6"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["params"] == 66339144
    assert rep["config"]["time_steps"] == {"value": 6, "source": "command line"}
    assert rep["config"]["dim"]["source"].startswith("config")
    names = {row["name"]: row for row in rep["layers"]}
    assert names["block.0.attn.talking_heads"]["called"] is False
    assert names["patch_embed.rpe_lif"]["called"] is False
    assert names["head"]["shape"] == [1000, 768]


def test_unknown_config_name_is_one_line(capsys):
    assert main(["inspect", "--config", "nonexistent/model"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such file and not a published name" in err[0]


def test_read_yaml_accepts_published_names_and_paths():
    assert read_yaml("cifar10/2_256_300E_t4")["dim"] == 256
    assert read_yaml("cifar10/2_256_300E_t4.yml")["dim"] == 256
