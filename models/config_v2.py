"""The hyper-parameters of a Spike-Driven Transformer V2 (Meta-SpikeFormer), as one small value type.

The original code (BICLab/Spike-Driven-Transformer-V2, `classification/models.py`) builds
`Spiking_vit_MetaFormer(embed_dim=[e0, e1, e2, e3], num_heads, mlp_ratios, in_channels, num_classes,
depths, sr_ratios, kd, ...)`. What really shapes that model, measured on the original code:

- `embed_dim` (4 widths): stage 1 runs at e0 // 2 then e0, stage 2 at e1, stage 3 at e2, stage 4 at e3.
- `num_heads` (one int for every attention block); it must divide e2 and e3. It shapes no parameter.
- `mlp_ratios`: one int for the conv blocks and the MLPs. The conv block reshapes its hidden layer to
  4 * dim channels whatever the ratio, so only 4 runs (other ints build, then fail in forward; a float
  is refused by Conv2d).
- `in_channels`, `num_classes` (0 or less: no head, the features are the output), `kd` (a second head
  `head_kd`; in eval the output is the mean of both heads, in training the pair).
- Fixed, whatever the arguments: 6 blocks at e2 (`block3`) and 2 at e3 (`block4`).
- `depths` only sizes the stochastic-depth schedule `linspace(0, drop_path_rate, depths)` (an int, at
  least 6, or construction fails); `sr_ratios`, `qkv_bias`, `qk_scale`, `norm_layer`, `img_size_h/w`,
  `patch_size`, the drop rates are stored or passed on and never used (`MS_Block.forward` never calls its
  `drop_path`). None of them is a field here.
- `T` is not a constructor argument: `main_finetune.py` sets `model.T = args.time_steps` afterwards.
- The image size shapes nothing (any H, W >= 1 runs); `img_size` is the input size the checkpoint was
  trained at (`args.input_size`), kept for building inputs.

`main_finetune.py` builds the model as `models.__dict__[args.model](kd=args.kd)`: a factory takes no
`num_classes` (passing one is a TypeError), and `--nb_classes` never reaches the model, so a factory model
has 1000 classes and 3 input channels. `v2_config_for_checkpoint` therefore lets the state dict's shapes
decide and uses the args for T and the input size only.
"""
from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from .config import ConfigError

#: The factories of the original `models.py` (commit 35f245f): embed_dim, every other argument is
#: num_heads 8, mlp_ratios 4, in_channels 3, num_classes 1000.
V2_FACTORIES: dict[str, tuple[int, int, int, int]] = {
    "metaspikformer_8_384": (96, 192, 384, 480),
    "metaspikformer_8_512": (128, 256, 512, 640),
    "metaspikformer_8_768": (192, 384, 768, 960),
}

#: Blocks per transformer stage, fixed in the original (`range(6)`, `range(2)`).
STAGE3_BLOCKS = 6
STAGE4_BLOCKS = 2

#: The heads of every factory; taken where a checkpoint does not say (heads shape no parameter).
DEFAULT_HEADS = 8

# `main_finetune.get_args_parser()` defaults for the fields the model depends on.
ARGS_DEFAULTS = {"model_mode": "ms", "time_steps": 1, "input_size": 224, "kd": False}


@dataclass(frozen=True)
class V2Config:
    """One Meta-SpikeFormer. The defaults are `metaspikformer_8_512` as `main_finetune.py` builds it."""

    img_size: int = 224
    in_channels: int = 3
    num_classes: int = 1000
    embed_dim: tuple = V2_FACTORIES["metaspikformer_8_512"]
    num_heads: int = 8
    mlp_ratio: int = 4
    time_steps: int = 1
    kd: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.embed_dim, list):
            object.__setattr__(self, "embed_dim", tuple(self.embed_dim))
        problems = list(v2_validation_problems(self))
        if problems:
            raise ConfigError(problems[0])

    @property
    def stage_dims(self) -> tuple[int, int, int, int, int]:
        """Widths of downsample1_1/ConvBlock1_1, ConvBlock1_2, stage 2, block3, block4."""
        e0, e1, e2, e3 = self.embed_dim
        return (e0 // 2, e0, e1, e2, e3)

    @property
    def feature_dim(self) -> int:
        return self.embed_dim[3]

    # What V2 does not have, said in V1's terms for code that serves both families: no CIFAR10-DVS pools,
    # no per-step (TET) output; its input is always an image repeated over T.
    @property
    def dvs_mode(self) -> bool:
        return False

    @property
    def tet(self) -> bool:
        return False

    def feature_sizes(self, h: int | None = None, w: int | None = None) -> list[tuple[int, int]]:
        """(H, W) after downsample1_1, 1_2, 2, 3 and 4 for an h x w input (default img_size)."""
        h = self.img_size if h is None else h
        w = self.img_size if w is None else w
        sizes = []
        for k, s, p in ((7, 2, 3), (3, 2, 1), (3, 2, 1), (3, 2, 1), (3, 1, 1)):
            h, w = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
            sizes.append((h, w))
        return sizes

    def to_dict(self) -> dict:
        """Plain JSON-like values (embed_dim a list, as it reads back from any file that stores it)."""
        d = asdict(self)
        d["embed_dim"] = list(d["embed_dim"])
        return d

    def replace(self, **changes) -> V2Config:
        return replace(self, **changes)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def v2_validation_problems(cfg: V2Config):
    """Yield one sentence per reason the original V2 code could not build or run `cfg`."""
    for name in ("img_size", "in_channels", "num_heads", "time_steps"):
        value = getattr(cfg, name)
        if not _positive_int(value):
            yield f"{name} must be a positive integer, got {value!r}"
            return
    if isinstance(cfg.num_classes, bool) or not isinstance(cfg.num_classes, int) or cfg.num_classes < 0:
        yield f"num_classes must be an integer >= 0 (0: no head, as the original builds it), got {cfg.num_classes!r}"
        return
    e = cfg.embed_dim
    if not (isinstance(e, tuple) and len(e) == 4 and all(_positive_int(v) for v in e)):
        yield f"embed_dim must be four positive integers (the widths of the 4 stages), got {e!r}"
        return
    if e[0] < 2:
        yield f"embed_dim[0] must be at least 2 (the first stage has embed_dim[0] // 2 channels), got {e[0]}"
    if isinstance(cfg.mlp_ratio, bool) or cfg.mlp_ratio != 4:
        yield (f"mlp_ratio must be 4: the original conv block reshapes its hidden layer to 4*dim channels, "
               f"so no other ratio runs, got {cfg.mlp_ratio!r}")
    for stage, dim in ((3, e[2]), (4, e[3])):
        if dim % cfg.num_heads:
            yield f"embed_dim[{stage - 1}] = {dim} (stage {stage}) must be divisible by num_heads {cfg.num_heads}"
    if not isinstance(cfg.kd, bool):
        yield f"kd must be True or False, got {cfg.kd!r}"


# ---------------------------------------------------------------------------------------------------
# Named configurations: the three published factories, as `main_finetune.py` builds them.

def _named() -> dict[str, V2Config]:
    out = {}
    for factory, dims in V2_FACTORIES.items():
        out[f"v2/{factory}"] = V2Config(embed_dim=dims)
        out[f"v2/{factory}_kd"] = V2Config(embed_dim=dims, kd=True)
    return out


#: `v2/metaspikformer_8_384`, `v2/metaspikformer_8_512`, `v2/metaspikformer_8_768` and their `_kd`
#: variants (the distilled fine-tunes, `--kd`). T is the parser default 1: a checkpoint's
#: `args.time_steps` (4 for the published T=4 fine-tunes) overrides it.
V2_NAMED_CONFIGS: dict[str, V2Config] = _named()


def named_v2_config(name: str) -> V2Config:
    try:
        return V2_NAMED_CONFIGS[name]
    except KeyError:
        raise ConfigError(f"unknown V2 config {name!r}; known: {', '.join(V2_NAMED_CONFIGS)}") from None


# ---------------------------------------------------------------------------------------------------
# From a checkpoint: its args, its state dict.

def _as_dict(args: Any) -> dict:
    if args is None:
        return {}
    if isinstance(args, argparse.Namespace):
        return vars(args)
    if isinstance(args, Mapping):
        return dict(args)
    raise ConfigError(f"checkpoint args must be an argparse.Namespace or a dict, got a {type(args).__name__}")


def _args_value(args: Mapping[str, Any], key: str) -> Any:
    value = args.get(key)
    return ARGS_DEFAULTS[key] if value is None else value


def _check_model_mode(args: Mapping[str, Any]) -> None:
    mode = _args_value(args, "model_mode")
    if mode != "ms":
        raise ConfigError(f"args.model_mode is {mode!r}: only 'ms' (models.py) is a V2 Meta-SpikeFormer; "
                          f"'sew' models come from a models_sew module the original repository does not contain")


def v2_config_from_args(args: Any) -> V2Config:
    """The config `main_finetune.py` builds from a checkpoint's `args` (a Namespace or its dict).

    `args.model` must name a factory: the model then has the factory's widths, 8 heads, 3 input channels
    and 1000 classes (the script passes only `kd` to the factory; `--nb_classes` never reaches the model).
    `model.T = args.time_steps`; `img_size = args.input_size`. A label with no factory (the shared
    fixture's "v2_tiny_16_32_64_80") raises: use `v2_config_for_checkpoint`, where the shapes decide.
    """
    a = _as_dict(args)
    _check_model_mode(a)
    name = a.get("model")
    if name not in V2_FACTORIES:
        raise ConfigError(f"args.model {name!r} is not a factory of the original models.py "
                          f"({', '.join(V2_FACTORIES)}); the state dict's shapes must decide")
    return V2Config(img_size=_args_value(a, "input_size"), in_channels=3, num_classes=1000,
                    embed_dim=V2_FACTORIES[name], num_heads=8, mlp_ratio=4,
                    time_steps=_args_value(a, "time_steps"), kd=bool(_args_value(a, "kd")))


def strip_module_prefix(sd: Mapping[str, Any]) -> dict:
    """A DistributedDataParallel (`module.`-prefixed) state dict without the prefix."""
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module."):]: v for k, v in sd.items()}
    return dict(sd)


# Keys every V2 state dict has and no V1 one does (and the reverse).
_V2_MARKERS = ("downsample1_1.encode_conv.weight", "ConvBlock1_1.0.Conv.pwconv1.weight",
               "block3.0.attn.q_conv.0.body.0.weight")
_V1_MARKERS = ("patch_embed.proj_conv.weight", "block.0.attn.q_conv.weight")


def is_v2_state_dict(sd: Mapping[str, Any]) -> bool:
    """True for a Meta-SpikeFormer (V2) state dict, False for a V1 SDT one or anything else."""
    keys = set(strip_module_prefix(sd))
    return all(k in keys for k in _V2_MARKERS) and not any(k in keys for k in _V1_MARKERS)


def _shape(sd: Mapping[str, Any], key: str) -> tuple:
    try:
        return tuple(sd[key].shape)
    except KeyError:
        raise ConfigError(f"the V2 state dict has no {key!r}") from None


def infer_v2_from_state_dict(sd: Mapping[str, Any]) -> dict:
    """What the shapes of a V2 state dict reveal: embed_dim, in_channels, num_classes, mlp_ratio, kd.

    num_heads shapes no parameter and cannot be read; T and the image size do not show either.
    With num_classes 0 (no head) `kd` cannot show and is False (both heads would be the identity).
    """
    sd = strip_module_prefix(sd)
    if not is_v2_state_dict(sd):
        raise ConfigError("not a V2 Meta-SpikeFormer state dict (no downsample1_1 / ConvBlock1_1 / block3 keys)")
    first = _shape(sd, "downsample1_1.encode_conv.weight")      # [e0 // 2, in_channels, 7, 7]
    e0 = _shape(sd, "downsample1_2.encode_conv.weight")[0]
    e1 = _shape(sd, "downsample2.encode_conv.weight")[0]
    e2 = _shape(sd, "downsample3.encode_conv.weight")[0]
    e3 = _shape(sd, "downsample4.encode_conv.weight")[0]
    out: dict[str, Any] = {"embed_dim": (e0, e1, e2, e3), "in_channels": first[1]}
    hidden = _shape(sd, "block3.0.mlp.fc1_conv.weight")[0]
    out["mlp_ratio"] = hidden // e2 if hidden % e2 == 0 else hidden / e2
    if "head.weight" in sd:
        out["num_classes"] = _shape(sd, "head.weight")[0]
    else:
        out["num_classes"] = 0
    out["kd"] = "head_kd.weight" in sd
    blocks3 = {int(k.split(".")[1]) for k in sd if k.startswith("block3.")}
    blocks4 = {int(k.split(".")[1]) for k in sd if k.startswith("block4.")}
    if len(blocks3) != STAGE3_BLOCKS or len(blocks4) != STAGE4_BLOCKS:
        raise ConfigError(f"the state dict has {len(blocks3)} block3 and {len(blocks4)} block4 blocks; "
                          f"the original V2 always has {STAGE3_BLOCKS} and {STAGE4_BLOCKS}")
    return out


def v2_config_for_checkpoint(args: Any, state_dict: Mapping[str, Any],
                             num_heads: int | None = None) -> V2Config:
    """The config of a checkpoint written by the original `save_model`: shapes from the state dict,
    T (`args.time_steps`) and the input size (`args.input_size`) from the args (parser defaults 1 and
    224 where absent). Where `args.model` names a factory, the state dict must have its shapes (the
    original could not have loaded it otherwise). num_heads cannot be read from the shapes: the
    factories use 8, and 8 is taken unless `num_heads` is given (an error where 8 does not divide the
    widths of stages 3 and 4).
    """
    a = _as_dict(args)
    _check_model_mode(a)
    shapes = infer_v2_from_state_dict(state_dict)
    if a.get("model") in V2_FACTORIES:
        factory = v2_config_from_args(a)
        expected = {k: getattr(factory, k) for k in ("embed_dim", "in_channels", "num_classes", "mlp_ratio", "kd")}
        wrong = [k for k in expected if shapes[k] != expected[k]]
        if wrong:
            k = wrong[0]
            raise ConfigError(f"args.model {a['model']!r} builds {k} = {expected[k]!r}, but the state dict has "
                              f"{k} = {shapes[k]!r}; the original could not load this checkpoint")
    heads = DEFAULT_HEADS if num_heads is None else num_heads
    e2, e3 = shapes["embed_dim"][2:]
    if num_heads is None and (e2 % heads or e3 % heads):
        raise ConfigError(f"num_heads does not show in a state dict and the factories' {heads} does not divide "
                          f"embed_dim {e2} and {e3}: give num_heads")
    return V2Config(img_size=_args_value(a, "input_size"), in_channels=shapes["in_channels"],
                    num_classes=shapes["num_classes"], embed_dim=shapes["embed_dim"], num_heads=heads,
                    mlp_ratio=shapes["mlp_ratio"], time_steps=_args_value(a, "time_steps"), kd=shapes["kd"])


def v2_parameter_count(cfg: V2Config) -> int:
    """The number of parameters of the original `Spiking_vit_MetaFormer` for `cfg`, by hand.

    Per stage (d channels, r = 4): a downsampling conv k*k*cin*cout + bias + BN; a conv block
    (SepConv 2d^2 + 49*2d + 2d^2 + BNs, two 3x3 convs 9*r*d^2 each + BNs) = (4 + 18r) d^2 + (106 + 2r) d;
    a transformer block (4 RepConvs of 2d^2 + 13d, 4 outer BNs, the MLP 2*r*d^2 + 3*r*d + 3d)
    = (8 + 2r) d^2 + (63 + 3r) d; the head(s) e3*classes + classes.
    """
    e0, e1, e2, e3 = cfg.embed_dim
    r = cfg.mlp_ratio

    def down(cin: int, cout: int, k: int) -> int:
        return cout * cin * k * k + cout + 2 * cout

    def conv_block(d: int) -> int:
        return (4 + 18 * r) * d * d + (106 + 2 * r) * d

    def block(d: int) -> int:
        h = int(d * r)
        return 8 * d * d + 60 * d + 2 * d * h + 3 * h + 3 * d

    n = down(cfg.in_channels, e0 // 2, 7) + down(e0 // 2, e0, 3) + down(e0, e1, 3) + down(e1, e2, 3) + down(e2, e3, 3)
    n += conv_block(e0 // 2) + conv_block(e0) + 2 * conv_block(e1)
    n += STAGE3_BLOCKS * block(e2) + STAGE4_BLOCKS * block(e3)
    if cfg.num_classes > 0:
        n += (e3 * cfg.num_classes + cfg.num_classes) * (2 if cfg.kd else 1)
    return n
