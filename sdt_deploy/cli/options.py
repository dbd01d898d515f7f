"""The options the commands share, one definition each, and the one way a command opens its model.

The conventions, the same for every command: the checkpoint is the positional CKPT (default: the
shipped demo); `--json` prints JSON on stdout instead of the tables; files are written through
`-o/--output` or a named option (`--dump`, `--save-json`, ...), never over an existing file without
`--force`; inputs are `-i/--input`, `--data`, `--digits`, `--random`; `--batch-size` is 16 everywhere;
`--quiet` leaves only the results (no notes, no progress, no "wrote" lines) and `--no-progress` only
drops the progress bars; quantization takes `--weight-bits`, `--input-bits`, `--scale-search`,
`--input-range` (and, for V2, `--reparam`) wherever it happens; `--max-memory` bounds what verify, report
and run hold (the batch is cut to fit, and a note on stderr says so).

A leaf module: it imports click and nothing heavy at import time, so that starting the command line
(and `--help`) stays light; the library is imported inside the functions that need it.
"""
from __future__ import annotations

import json
from typing import Optional

import click

from sdt_deploy.data import DEMO_CHECKPOINT

BATCH_SIZE = 16

# the configuration fields a flag can set (the SDTConfig field names)
FLAG_FIELDS = ("img_size", "in_channels", "num_classes", "dim", "depth", "num_heads", "mlp_ratio",
               "time_steps", "pooling_stat", "spike_mode", "dvs_mode", "tet", "kd")


def _apply(options, f):
    for opt in reversed(options):
        f = opt(f)
    return f


def model_options(f):
    """Options that resolve the model: checkpoint layout, config file, and per-field overrides."""
    return _apply([
        click.argument("ckpt", required=False),
        click.option("--config", "config", metavar="YAML|NAME",
                     help="an original conf YAML file, or a published name such as cifar10/2_256_300E_t4 or "
                          "v2/metaspikformer_8_512 (SDT V2)"),
        click.option("--ema", is_flag=True, help="use the checkpoint's EMA weights (state_dict_ema)"),
        click.option("--img-size", type=int, help="input height = width"),
        click.option("--in-channels", type=int, help="input channels (3 for images, 2 for DVS events)"),
        click.option("--num-classes", type=int, help="classes of the head"),
        click.option("--dim", type=int, help="embedding width"),
        click.option("--depth", "--layer", "depth", type=int, help="number of blocks (the conf's `layer`)"),
        click.option("--num-heads", type=int, help="attention heads (they partition the channels)"),
        click.option("--mlp-ratio", type=float, help="MLP hidden width / dim"),
        click.option("-T", "--time-steps", "time_steps", type=int, help="simulation time steps T"),
        click.option("--pooling-stat", type=str, help="which of the stem's four max-pools exist, e.g. 1111"),
        click.option("--spike-mode", type=click.Choice(["lif", "plif"]), help="LIF, or PLIF (learned decay)"),
        click.option("--dvs-mode/--no-dvs-mode", default=None, help="the 3x3 OR-pools of CIFAR10-DVS"),
        click.option("--tet/--no-tet", default=None, help="per-step logits (TET)"),
        click.option("--kd/--no-kd", default=None, help="V2: the distilled Meta-SpikeFormer (a second head, head_kd)"),
    ], f)


def quant_options(f=None, *, from_artifacts: bool = False):
    """How the weights and the input are put on power-of-two grids. `from_artifacts` (verify): no defaults
    here; the artifacts' settings, else the tool's defaults, are taken."""
    def decorate(f):
        d = (lambda v: None) if from_artifacts else (lambda v: v)
        show = not from_artifacts
        later = " (default: the artifacts' setting, else {})" if from_artifacts else ""
        return _apply([
            click.option("--weight-bits", type=int, default=d(8), show_default=show,
                         help="weight bits, 2..8" + later.format(8)),
            click.option("--input-bits", type=int, default=d(8), show_default=show,
                         help="bits of the input grid, 2..8" + later.format(8)),
            click.option("--scale-search", type=click.Choice(["mse", "max"]), default=d("mse"), show_default=show,
                         help="power-of-two scale per channel: least squared error (mse) or the max-based one"
                              + later.format("mse")),
            click.option("--input-range", type=float,
                         help="largest |input| the input grid must hold"
                              + (later.format("from the data's mean/std") if from_artifacts
                                 else " (default: from the data's mean/std)")),
            click.option("--reparam", is_flag=True, default=None,
                         help="V2: structurally re-parameterize before quantizing (RepConv and SepConv chains as "
                              "one convolution of spikes: more ACs, fewer MACs, more parameters)"
                              + (" (default: the artifacts' setting)" if from_artifacts else "")),
        ], f)
    return decorate(f) if f is not None else decorate


def input_options(f=None, *, default_note: str = "the first 32 held-out digits"):
    """The inputs a command runs on: one of four sources."""
    def decorate(f):
        return _apply([
            click.option("-i", "--input", "input_path", type=click.Path(dir_okay=False),
                         help="[B,C,H,W] images or [B,T,C,H,W] event frames (.npy / .npz)"),
            click.option("--data", "data_dir", type=click.Path(file_okay=False), metavar="DIR",
                         help="a dataset folder (ImageFolder, the original CIFAR/ImageNet layouts), read with the "
                              "conf's evaluation transform"),
            click.option("--digits", type=click.IntRange(min=1), metavar="N",
                         help=f"the first N held-out scikit-learn digits (default: {default_note})"),
            click.option("--random", "random_n", type=click.IntRange(min=1), metavar="N",
                         help="N random inputs (standard-normal images or Poisson event frames)"),
            click.option("--seed", type=int, default=0, show_default=True, help="seed of --random"),
        ], f)
    return decorate(f) if f is not None else decorate


def run_options(f):
    """Batch size and what the command prints besides its results."""
    return _apply([
        click.option("--batch-size", type=click.IntRange(min=1), default=BATCH_SIZE, show_default=True,
                     help="samples per step of the run"),
        click.option("--quiet", "-q", is_flag=True, help="only the results: no notes, progress or 'wrote' lines"),
        click.option("--no-progress", is_flag=True, help="no progress bars"),
    ], f)


def memory_option(f):
    """`--max-memory`: the peak memory the command may hold (verify, report, run)."""
    return click.option("--max-memory", "max_memory", metavar="SIZE|FRACTION",
                        help="the most memory the command may hold, worker processes included: a size (8G, "
                             "500M) or a fraction of the memory available now (0.5); the batch is cut to fit "
                             "and the command says so (default: a third of the available memory)")(f)


def check_memory(value: Optional[str]):
    """The --max-memory value checked before any work (a bad one is one line, exit status 2)."""
    from sdt_deploy.run.memory import parse_memory

    parse_memory(value)
    return value


def json_option(f):
    return click.option("--json", "as_json", is_flag=True, help="print JSON on stdout instead of the tables")(f)


def force_option(f):
    return click.option("--force", is_flag=True, help="overwrite existing output files")(f)


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


def say(quiet: bool, text: str, err: bool = True) -> None:
    """A note or a 'wrote' line: on stderr, unless --quiet."""
    if not quiet:
        click.echo(text, err=err)
