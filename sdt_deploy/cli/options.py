"""The options the commands share, and the one way a command opens its model.

A leaf module: it imports click and nothing heavy at import time, so that starting the command line
(and `--help`) stays light; the library is imported inside the functions that need it.
"""
from __future__ import annotations

import json
from typing import Optional

import click

from sdt_deploy.data import DEMO_CHECKPOINT

# the configuration fields a flag can set (the SDTConfig field names)
FLAG_FIELDS = ("img_size", "in_channels", "num_classes", "dim", "depth", "num_heads", "mlp_ratio",
               "time_steps", "pooling_stat", "spike_mode", "dvs_mode", "tet")


def _apply(options, f):
    for opt in reversed(options):
        f = opt(f)
    return f


def model_options(f):
    """Options that resolve the model: checkpoint layout, config file, and per-field overrides."""
    return _apply([
        click.option("--config", "config", metavar="YAML|NAME",
                     help="an original conf YAML file, or a published name such as cifar10/2_256_300E_t4"),
        click.option("--ema", is_flag=True, help="use the checkpoint's EMA weights (state_dict_ema)"),
        click.option("--img-size", type=int, help="input height = width"),
        click.option("--in-channels", type=int),
        click.option("--num-classes", type=int),
        click.option("--dim", type=int, help="embedding width"),
        click.option("--depth", "--layer", "depth", type=int, help="number of blocks (the conf's `layer`)"),
        click.option("--num-heads", type=int),
        click.option("--mlp-ratio", type=float),
        click.option("-T", "--time-steps", "time_steps", type=int, help="simulation time steps T"),
        click.option("--pooling-stat", type=str, help="which of the stem's four max-pools exist, e.g. 1111"),
        click.option("--spike-mode", type=click.Choice(["lif", "plif"])),
        click.option("--dvs-mode/--no-dvs-mode", default=None, help="the 3x3 OR-pools of CIFAR10-DVS"),
        click.option("--tet/--no-tet", default=None, help="per-step logits (TET)"),
    ], f)


def quant_options(f):
    """The bit widths of the quantization."""
    return _apply([
        click.option("--weight-bits", type=int, default=8, show_default=True, help="weight bits, 2..8"),
        click.option("--input-bits", type=int, default=8, show_default=True, help="input grid bits, 2..8"),
    ], f)


def scale_search_option(f):
    return click.option("--scale-search", type=click.Choice(["mse", "max"]), default="mse", show_default=True,
                        help="power-of-two scale per channel: least squared error (mse) or the max-based one")(f)


def flags_of(kw: dict) -> dict:
    """The configuration overrides among a command's keyword arguments (removed from `kw`)."""
    flags = {k: kw.pop(k) for k in FLAG_FIELDS if k in kw}
    if flags.get("mlp_ratio") is not None and float(flags["mlp_ratio"]).is_integer():
        flags["mlp_ratio"] = int(flags["mlp_ratio"])
    return {k: v for k, v in flags.items() if v is not None}


def open_model(ckpt: Optional[str], kw: dict, allow_config_only: bool = False):
    """The command's model: the checkpoint (default: the shipped demo) with the model options in `kw`
    (removed from it), or with `allow_config_only` a randomly initialised model of `--config` alone."""
    from sdt_deploy.api import load_model
    from sdt_deploy.files.checkpoint import model_from_config

    flags = flags_of(kw)
    config, ema = kw.pop("config", None), kw.pop("ema", False)
    if ckpt is None and config and allow_config_only:
        return model_from_config(flags, config)
    return load_model(ckpt or DEMO_CHECKPOINT, flags=flags, config=config, ema=ema)


def echo_json(obj) -> None:
    from sdt_deploy.ir.graph import json_default

    click.echo(json.dumps(obj, indent=2, sort_keys=False, default=json_default))
