"""Configurations: the published SDT models by name, original conf YAML files read with `train.py`'s
meaning of each key, and the resolution of a run's configuration with the source of every value.

How the original `train.py` reads a conf file (and therefore how a YAML here is read):
- every key of the YAML becomes an argparse default; only keys spelled like the parser's `dest`
  reach the model. `dim` has no command-line option at all (it exists only through the YAML);
  hyphenated keys such as `mlp-ratio` never reach `mlp_ratio` (which then keeps its default, 4).
- `layer` is the depth, `dim` the width, `time_steps` T, `TET` the per-step output.
- `dvs_mode` is not read from the file: `train.py` sets it True exactly when `dataset` is
  `cifar10-dvs` or `cifar10-dvs-tet`.
- `imagenet/10_384_300E_t4.yml` holds dim 512 and 10 layers (the paper's 10-512): its file name lies.

Resolution order for each value: command-line flag > `--config` YAML > the checkpoint's saved `args`
> what the state dict's shapes say > `train.py`'s defaults.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import yaml

from models import ConfigError, SDTConfig
from sdt_deploy.errors import DeployError

DVS_DATASETS = ("cifar10-dvs", "cifar10-dvs-tet")
EVENT_DATASETS = DVS_DATASETS + ("gesture",)

# train.py's defaults for the keys that shape the model (`dim` and `img_size` have none that work:
# `dim` is missing from the parser, `img_size=None` falls through to the model's 128).
TRAIN_DEFAULTS = dict(img_size=128, in_channels=3, num_classes=1000, dim=512, depth=4, num_heads=8,
                      mlp_ratio=4, time_steps=4, pooling_stat="1111", spike_mode="lif",
                      dvs_mode=False, tet=False)

# original `args` / YAML key -> SDTConfig field
ARG_KEYS = {"img_size": "img_size", "in_channels": "in_channels", "num_classes": "num_classes",
            "dim": "dim", "layer": "layer", "num_heads": "num_heads", "mlp_ratio": "mlp_ratio",
            "time_steps": "time_steps", "pooling_stat": "pooling_stat", "spike_mode": "spike_mode",
            "TET": "tet", "dvs_mode": "dvs_mode"}


@dataclass(frozen=True)
class DataConfig:
    """How inputs were prepared in training: the evaluation transform and the kind of input."""

    dataset: str = ""
    mean: tuple = (0.485, 0.456, 0.406)
    std: tuple = (0.229, 0.224, 0.225)
    crop_pct: float = 0.875
    interpolation: str = "bicubic"

    @property
    def events(self) -> bool:
        return self.dataset in EVENT_DATASETS


def _published(dataset, img, classes, dim, layer, t, pool, in_ch=3, tet=False, mean=None, std=None,
               crop=1.0):
    return dict(dataset=dataset, img_size=img, num_classes=classes, dim=dim, layer=layer,
                time_steps=t, pooling_stat=pool, in_channels=in_ch, TET=tet, mlp_ratio=4, num_heads=8,
                spike_mode="lif", mean=mean, std=std, crop_pct=crop, interpolation="bicubic")


_CIFAR10 = dict(mean=[0.4914, 0.4822, 0.4465], std=[0.2470, 0.2435, 0.2616])
_CIFAR100 = dict(mean=[0.5071, 0.4867, 0.4408], std=[0.2675, 0.2565, 0.2761])
_IMAGENET = dict(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225], crop=0.95)

# The model-relevant content of every file of the original `conf/` folder, keyed by its path.
PUBLISHED: dict[str, dict] = {
    "cifar10/2_256_300E_t4": _published("torch/cifar10", 32, 10, 256, 2, 4, "0011", **_CIFAR10),
    "cifar10/2_512_300E_t4": _published("torch/cifar10", 32, 10, 512, 2, 4, "0011", **_CIFAR10),
    "cifar10/2_512_300E_t4_TET": _published("torch/cifar10", 32, 10, 512, 2, 4, "0011", tet=True, **_CIFAR10),
    "cifar100/2_256_300E_t4": _published("torch/cifar100", 32, 100, 256, 2, 4, "0011", **_CIFAR100),
    "cifar100/2_512_300E_t4": _published("torch/cifar100", 32, 100, 512, 2, 4, "0011", **_CIFAR100),
    "imagenet/8_384_300E_t4": _published("imagenet", 224, 1000, 384, 8, 4, "1111", **_IMAGENET),
    "imagenet/6_512_300E_t4": _published("imagenet", 224, 1000, 512, 6, 4, "1111", **_IMAGENET),
    "imagenet/8_512_300E_t4": _published("imagenet", 224, 1000, 512, 8, 4, "1111", **_IMAGENET),
    # sic: the file named 10_384 holds the paper's 10-512 model
    "imagenet/10_384_300E_t4": _published("imagenet", 224, 1000, 512, 10, 4, "1111", **_IMAGENET),
    "imagenet/8_768_300E_t4": _published("imagenet", 224, 1000, 768, 8, 4, "1111", **_IMAGENET),
    "gesture/2_256_200E_t10": _published("gesture", 128, 11, 256, 2, 10, "0111", in_ch=2),
    "gesture/2_256_200E_t16": _published("gesture", 128, 11, 256, 2, 16, "0111", in_ch=2),
    "cifar10-dvs/2_256_200E_t10_TET": _published("cifar10-dvs", 64, 10, 256, 2, 10, "0011", in_ch=2, tet=True),
}


@dataclass(frozen=True)
class Resolved:
    """A resolved configuration and, for every field, where its value came from."""

    config: SDTConfig
    data: DataConfig
    sources: Mapping[str, str] = field(default_factory=dict)

    def describe(self) -> dict:
        cfg = self.config.to_dict()
        return {k: {"value": cfg[k], "source": self.sources.get(k, "default")} for k in cfg}


def read_yaml(path: str) -> dict:
    """A conf YAML file (or a published name) as a plain dict of the original's keys."""
    if path in PUBLISHED:
        return dict(PUBLISHED[path])
    stem = path[:-4] if path.endswith((".yml", "yaml")) else path
    if not os.path.exists(path) and stem in PUBLISHED:
        return dict(PUBLISHED[stem])
    try:
        with open(path, "r", encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except FileNotFoundError:
        known = ", ".join(sorted(PUBLISHED))
        raise DeployError(f"config {path!r}: no such file and not a published name ({known})") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise DeployError(f"config {path!r}: not a readable YAML file ({type(exc).__name__})") from None
    if not isinstance(doc, dict):
        raise DeployError(f"config {path!r}: expected a mapping of keys to values")
    return doc


def model_keys(doc: Mapping[str, Any]) -> dict:
    """The SDTConfig fields a conf YAML or a saved `args` namespace sets, as train.py reads them."""
    out: dict[str, Any] = {}
    for key, fld in ARG_KEYS.items():
        if key in doc and doc[key] is not None:
            out["depth" if fld == "layer" else fld] = doc[key]
    if "dvs_mode" not in out and "dataset" in doc and doc["dataset"] is not None:
        out["dvs_mode"] = doc["dataset"] in DVS_DATASETS
    if "tet" in out:
        out["tet"] = bool(out["tet"])
    if "pooling_stat" in out:
        out["pooling_stat"] = str(out["pooling_stat"])
    return out


def data_keys(doc: Mapping[str, Any]) -> dict:
    out = {}
    for key in ("dataset", "crop_pct", "interpolation"):
        if doc.get(key) is not None:
            out[key] = doc[key]
    for key in ("mean", "std"):
        if doc.get(key) is not None:
            out[key] = tuple(float(v) for v in doc[key])
    return out


def infer_from_state_dict(sd: Mapping[str, Any]) -> dict:
    """What the shapes of an SDT state dict reveal (T, image size, pooling and dvs_mode do not show)."""
    out: dict[str, Any] = {}
    try:
        out["dim"] = int(sd["head.weight"].shape[1])
        out["num_classes"] = int(sd["head.weight"].shape[0])
    except KeyError:
        pass
    if "patch_embed.proj_conv.weight" in sd:
        out["in_channels"] = int(sd["patch_embed.proj_conv.weight"].shape[1])
    blocks = {int(k.split(".")[1]) for k in sd if k.startswith("block.") and k.split(".")[1].isdigit()}
    if blocks:
        out["depth"] = max(blocks) + 1
    if "block.0.attn.talking_heads.weight" in sd:
        out["num_heads"] = int(sd["block.0.attn.talking_heads.weight"].shape[0])
    if "block.0.mlp.fc1_conv.weight" in sd and "dim" in out:
        hidden = int(sd["block.0.mlp.fc1_conv.weight"].shape[0])
        ratio = hidden / out["dim"]
        out["mlp_ratio"] = int(ratio) if ratio == int(ratio) else ratio
    out["spike_mode"] = "plif" if any(k.endswith("_lif.w") for k in sd) else "lif"
    return out


def resolve(flags: Optional[Mapping[str, Any]] = None, yaml_path: Optional[str] = None,
            ckpt_args: Optional[Mapping[str, Any]] = None,
            state_dict: Optional[Mapping[str, Any]] = None) -> Resolved:
    """Merge the sources in priority order; say where each value came from."""
    layers: list[tuple[str, dict, dict]] = []  # (source, model fields, data fields), lowest priority first
    layers.append(("train.py default", dict(TRAIN_DEFAULTS), {}))
    if state_dict is not None:
        layers.append(("state dict shapes", infer_from_state_dict(state_dict), {}))
    if ckpt_args:
        layers.append(("checkpoint args", model_keys(ckpt_args), data_keys(ckpt_args)))
    if yaml_path:
        doc = read_yaml(yaml_path)
        layers.append((f"config {os.path.basename(yaml_path)}", model_keys(doc), data_keys(doc)))
    if flags:
        layers.append(("command line", {k: v for k, v in flags.items() if v is not None}, {}))

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    data: dict[str, Any] = {}
    for source, model_fields, data_fields in layers:
        for k, v in model_fields.items():
            values[k] = v
            sources[k] = source
        data.update(data_fields)
    try:
        cfg = SDTConfig(**{k: values[k] for k in SDTConfig.field_names()})
    except ConfigError as exc:
        raise DeployError(f"invalid configuration: {exc}") from None
    except TypeError as exc:
        raise DeployError(f"invalid configuration: {exc}") from None
    return Resolved(config=cfg, data=DataConfig(**data), sources=sources)


# ---------------------------------------------------------------------------------------------------
# SDT V2 (Meta-SpikeFormer)

#: the flags that can change a V2 model (the others are V1's: depth, dim, pooling_stat, ... shape
#: nothing in V2 and are refused rather than ignored)
V2_FLAGS = ("img_size", "time_steps", "num_heads", "in_channels", "num_classes", "kd", "mlp_ratio")
V1_ONLY_FLAGS = ("dim", "depth", "pooling_stat", "spike_mode", "dvs_mode", "tet")


def v2_data_config(args: Optional[Mapping[str, Any]], img_size: int) -> DataConfig:
    """`main_finetune.py`'s evaluation transform: timm's ImageNet mean/std, bicubic, crop 224/256 up to
    224 px input and 1.0 above (`util/datasets.build_transform`)."""
    dataset = "imagenet" if not args or args.get("data_path") != "sklearn_digits" else "sklearn/digits"
    return DataConfig(dataset=dataset, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                      crop_pct=224 / 256 if img_size <= 224 else 1.0, interpolation="bicubic")


def _refuse_v1_flags(flags: Mapping[str, Any]) -> None:
    wrong = [k for k in V1_ONLY_FLAGS if flags.get(k) is not None]
    if wrong:
        raise DeployError(f"--{wrong[0].replace('_', '-')} is a V1 setting; a V2 Meta-SpikeFormer has no such "
                          f"field (its shapes come from embed_dim, read from the state dict or the named config)")
    if flags.get("mlp_ratio") not in (None, 4):
        raise DeployError(f"--mlp-ratio {flags['mlp_ratio']}: V2 runs only with 4 (the conv blocks' hidden width "
                          "is fixed at 4 * dim in the original)")


def resolve_v2(flags: Optional[Mapping[str, Any]] = None, ckpt_args: Optional[Mapping[str, Any]] = None,
               state_dict: Optional[Mapping[str, Any]] = None, named: Optional[str] = None) -> Resolved:
    """The V2 configuration of a checkpoint (shapes from its state dict, T and the input size from its
    args, `models.v2_config_for_checkpoint`) or of a named configuration (`v2/metaspikformer_8_512`), with
    the flags on top, and the source of every value."""
    from dataclasses import replace

    from models import named_v2_config, v2_config_for_checkpoint

    flags = {k: v for k, v in dict(flags or {}).items() if v is not None}
    _refuse_v1_flags(flags)
    try:
        if state_dict is not None:
            cfg = v2_config_for_checkpoint(ckpt_args, state_dict, num_heads=flags.get("num_heads"))
            sources = {k: "state dict shapes" for k in ("embed_dim", "in_channels", "num_classes", "mlp_ratio", "kd")}
            args = ckpt_args or {}
            sources.update({f: ("checkpoint args" if args.get(a) is not None else "main_finetune default")
                            for f, a in (("time_steps", "time_steps"), ("img_size", "input_size"))})
            sources["num_heads"] = "default (the factories' 8; heads shape no parameter)"
            for k in ("in_channels", "num_classes", "kd"):
                if k in flags and flags[k] != getattr(cfg, k):
                    raise DeployError(f"--{k.replace('_', '-')} {flags[k]!r}: the checkpoint's state dict has "
                                      f"{k} = {getattr(cfg, k)!r}")
        else:
            cfg = named_v2_config(named)
            sources = {k: f"config {named}" for k in cfg.to_dict()}
        changes = {k: flags[k] for k in V2_FLAGS if k in flags and flags[k] != getattr(cfg, k)}
        cfg = replace(cfg, **changes)
    except (ConfigError, TypeError) as exc:
        raise DeployError(f"invalid configuration: {exc}") from None
    sources.update({k: "command line" for k in V2_FLAGS if k in flags})
    return Resolved(config=cfg, data=v2_data_config(ckpt_args, cfg.img_size), sources=sources)


def is_v2_name(name: Optional[str]) -> bool:
    return bool(name) and str(name).startswith("v2/")
