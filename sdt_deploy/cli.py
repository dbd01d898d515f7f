"""The `sdt-deploy` command line (click). Each command is a thin shell over a library function.

Errors in the user's input end as one line on stderr (`sdt-deploy: error: ...`) and a non-zero exit
code; set SDT_DEPLOY_DEBUG=1 to see the traceback of an unexpected failure.
"""
from __future__ import annotations

import functools
import json
import os
import sys
from typing import Optional

import click

from . import __version__
from .errors import DeployError

DEMO_CHECKPOINT = os.path.join(os.path.dirname(__file__), "assets", "demo_sdt_digits.pth")


def _model_options(f):
    """Options that resolve the model: checkpoint layout, config file, and per-field overrides."""
    options = [
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
    ]
    for opt in reversed(options):
        f = opt(f)
    return f


FLAG_FIELDS = ("img_size", "in_channels", "num_classes", "dim", "depth", "num_heads", "mlp_ratio",
               "time_steps", "pooling_stat", "spike_mode", "dvs_mode", "tet")


def _flags(kw: dict) -> dict:
    flags = {k: kw.pop(k) for k in FLAG_FIELDS if k in kw}
    if flags.get("mlp_ratio") is not None and float(flags["mlp_ratio"]).is_integer():
        flags["mlp_ratio"] = int(flags["mlp_ratio"])
    return {k: v for k, v in flags.items() if v is not None}


def _load(ckpt: Optional[str], kw: dict, allow_config_only: bool = False):
    from .checkpoint import load_model, model_from_config

    flags = _flags(kw)
    config, ema = kw.pop("config", None), kw.pop("ema", False)
    if ckpt is None and config and allow_config_only:
        return model_from_config(flags, config)
    return load_model(ckpt or DEMO_CHECKPOINT, flags=flags, config=config, ema=ema)


def _echo_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=False, default=_json_default))


def _json_default(o):
    import numpy as np

    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sdt-deploy")
def cli():
    """Deploy Spike-Driven Transformer checkpoints: inspect, run, quantize, export (NIR, ONNX),
    verify spike-exactness, and report operations and energy.

    CKPT defaults to the shipped demo checkpoint (an SDT trained on scikit-learn's digits)."""


@cli.command()
@click.argument("ckpt", required=False)
@_model_options
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option("--graph", is_flag=True, help="show the deploy graph (nodes, edge kinds, shapes)")
@click.option("--bits", is_flag=True, help="bit-width analysis of the quantized integer path")
@click.option("--weight-bits", type=int, default=8, show_default=True)
@click.option("--input-bits", type=int, default=8, show_default=True)
def inspect(ckpt, as_json, graph, bits, weight_bits, input_bits, **kw):
    """The resolved configuration (with the source of every value), parameter count and layers."""
    from .inspect_cmd import inspect_model

    loaded = _load(ckpt, kw, allow_config_only=True)
    report = inspect_model(loaded, graph=graph, bits=bits, weight_bits=weight_bits, input_bits=input_bits)
    if as_json:
        _echo_json(report)
    else:
        from .inspect_cmd import print_inspect

        print_inspect(report)


@cli.command()
@click.argument("ckpt", required=False)
@_model_options
@click.option("--input", "input_path", required=True, type=click.Path(dir_okay=False),
              help="[B,C,H,W] images or [B,T,C,H,W] event frames (.npy)")
@click.option("--dump", type=click.Path(dir_okay=False), help="write logits and every spike tensor (.npz)")
@click.option("--quantize", "quantized", is_flag=True, help="run the dyadic-quantized model")
@click.option("--weight-bits", type=int, default=8, show_default=True)
@click.option("--input-bits", type=int, default=8, show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--force", is_flag=True, help="overwrite an existing --dump file")
def run(ckpt, input_path, dump, quantized, weight_bits, input_bits, batch_size, force, **kw):
    """Run the model on an input array; print predictions; optionally dump every layer's spikes."""
    from .run_cmd import run_command

    if dump:
        from .io import check_output_path

        check_output_path(dump, force)
    loaded = _load(ckpt, kw)
    run_command(loaded, input_path, dump=dump, quantized=quantized, weight_bits=weight_bits,
                input_bits=input_bits, batch_size=batch_size)


def main(argv=None) -> int:
    """Entry point: one line on stderr and a non-zero exit for every expected failure."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cli.main(args=argv, prog_name="sdt-deploy", standalone_mode=False)
        return 0
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("sdt-deploy: error: aborted", err=True)
        return 130
    except click.UsageError as exc:
        click.echo(f"sdt-deploy: error: {exc.format_message()}", err=True)
        return 2
    except click.ClickException as exc:
        click.echo(f"sdt-deploy: error: {exc.format_message()}", err=True)
        return exc.exit_code
    except DeployError as exc:
        click.echo(f"sdt-deploy: error: {exc}", err=True)
        return exc.exit_code
    except KeyboardInterrupt:
        click.echo("sdt-deploy: error: interrupted; no partial output was left", err=True)
        return 130
    except BrokenPipeError:
        return 1
    except Exception as exc:  # noqa: BLE001 - the last line of defence against a traceback
        if os.environ.get("SDT_DEPLOY_DEBUG"):
            raise
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        click.echo(f"sdt-deploy: internal error: {type(exc).__name__}: {msg} "
                   "(set SDT_DEPLOY_DEBUG=1 for the traceback)", err=True)
        return 3


def entry() -> None:
    sys.exit(main())
