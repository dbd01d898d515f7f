"""The `sdt-deploy` command line (click). Each command is a thin shell over a library function.

Errors in the user's input end as one line on stderr (`sdt-deploy: error: ...`) and a non-zero exit
code; set SDT_DEPLOY_DEBUG=1 to see the traceback of an unexpected failure.
"""
from __future__ import annotations

import gc
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
    from .graph import json_default

    click.echo(json.dumps(obj, indent=2, sort_keys=False, default=json_default))


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


def _quant_options(f):
    options = [
        click.option("--weight-bits", type=int, default=8, show_default=True, help="weight bits, 2..8"),
        click.option("--input-bits", type=int, default=8, show_default=True, help="input grid bits, 2..8"),
    ]
    for opt in reversed(options):
        f = opt(f)
    return f


@cli.command()
@click.argument("ckpt", required=False)
@_model_options
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="the quantized file (.pth)")
@_quant_options
@click.option("--scale-search", type=click.Choice(["mse", "max"]), default="mse", show_default=True,
              help="power-of-two scale per channel: least squared error (mse) or the max-based one")
@click.option("--input-range", type=float, help="largest |input| the input grid must hold (default: from mean/std)")
@click.option("--force", is_flag=True, help="overwrite an existing output")
def quantize(ckpt, output, weight_bits, input_bits, scale_search, input_range, force, **kw):
    """Fold BatchNorm and quantize to power-of-two per-channel grids; write the quantized model."""
    from .api import quantize as quantize_model
    from .bits import bit_report
    from .io import check_output_path

    check_output_path(output, force)
    loaded = _load(ckpt, kw)
    q = quantize_model(loaded, weight_bits=weight_bits, input_bits=input_bits, scale_search=scale_search,
                       input_range=input_range)
    q.save(output)
    s = bit_report(q.graph)["summary"]
    click.echo(f"wrote {output}: int{weight_bits} weights, input grid 2**-{q.graph.meta['input_grid']} "
               f"({input_bits} bits); integer side needs {s['max_int_bits']} bits, float32 side "
               f"{s['max_float32_bits']} of 25")
    if q.graph.meta.get("plif_tau"):
        click.echo(f"PLIF: {len(q.graph.meta['plif_tau'])} learned decays set to 1/2 (tau 2); "
                   "`verify --reference float` measures the change")


@cli.command()
@click.argument("ckpt", required=False)
@_model_options
@click.option("--input", "input_path", type=click.Path(dir_okay=False), help="inputs (.npy)")
@click.option("--data", "data_dir", type=click.Path(), help="an ImageFolder / original CIFAR or ImageNet layout")
@click.option("--digits", type=int, help="the first N held-out scikit-learn digits (the default, N = 32)")
@click.option("--random", "random_n", type=int, help="N random inputs")
@click.option("--executors", default="torch,cupy,engine,onnx-int,onnx-float,nir", show_default=True,
              help="comma-separated executors to compare with the reference")
@click.option("--artifact", "artifacts", multiple=True, type=click.Path(dir_okay=False),
              help="check this exported file instead of exporting anew (.onnx, .nir; repeatable)")
@click.option("--reference", type=click.Choice(["quantized", "float"]), default="quantized", show_default=True,
              help="quantized: spike-exact check; float: agreement with the original float model")
@click.option("--json", "as_json", is_flag=True)
@_quant_options
@click.option("--batch-size", type=int, default=16, show_default=True)
def verify(ckpt, input_path, data_dir, digits, random_n, executors, artifacts, reference, as_json, weight_bits,
           input_bits, batch_size, **kw):
    """Spike-exact equivalence of every executor against the quantized torch model."""
    from .verify_cmd import verify_command

    loaded = _load(ckpt, kw)
    verify_command(loaded, input_path, data_dir, digits, random_n, executors, artifacts, reference, as_json,
                   weight_bits, input_bits, batch_size)


@cli.command()
@click.argument("ckpt", required=False)
@_model_options
@click.option("--target", required=True, type=click.Choice(["nir", "onnx"], case_sensitive=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="the file to write (.nir or .onnx)")
@click.option("--no-quantize", is_flag=True, help="NIR only: export the BN-folded float weights instead")
@click.option("--no-partition", is_flag=True,
              help="NIR: refuse a graph with the stem's real-valued max-pool instead of partitioning it")
@click.option("--nir-profile", type=click.Choice(["standard", "portable", "norse"]), default="standard",
              show_default=True, help="portable: for snntorch's importer (dt 1e-4); norse: for norse.torch.from_nir "
                                      "(dt 1e-3)")
@click.option("--onnx-variant", type=click.Choice(["int", "float"]), default="int", show_default=True,
              help="ONNX (and a NIR partition's host stem): integer ops or float32 with the exact weights")
@click.option("--unroll", is_flag=True, help="ONNX: all T steps inside the graph")
@click.option("--debug-outputs", is_flag=True, help="ONNX: every layer's spikes as extra outputs")
@_quant_options
@click.option("--scale-search", type=click.Choice(["mse", "max"]), default="mse", show_default=True)
@click.option("--force", is_flag=True, help="overwrite existing outputs")
def export(ckpt, target, output, no_quantize, no_partition, nir_profile, onnx_variant, unroll, debug_outputs,
           weight_bits, input_bits, scale_search, force, **kw):
    """Export to NIR (.nir, HDF5) or ONNX with explicit LIF state and binary spikes between layers."""
    from .export import export_graph, planned_outputs
    from .quantization import QuantOptions

    target = target.lower()
    QuantOptions(weight_bits=weight_bits, input_bits=input_bits, scale_search=scale_search)  # validate first
    loaded = _load(ckpt, kw)
    if no_quantize:
        if target != "nir":
            raise DeployError("--no-quantize applies to --target nir (ONNX has --onnx-variant float)")
        from .api import deploy_graph
        from .nir_float import float_nir_graph

        graph = float_nir_graph(deploy_graph(loaded))
    else:
        from .api import quantize as quantize_model

        # the float checkpoint is not needed past the quantization: each layer's weights go once quantized
        graph = quantize_model(loaded, weight_bits=weight_bits, input_bits=input_bits, scale_search=scale_search,
                               consume=True).graph
    del loaded
    from .io import check_output_path

    for p in planned_outputs(graph, target, output, "never" if no_partition else "auto"):
        check_output_path(p, force)
    res = export_graph(graph, target, output, onnx_variant=onnx_variant, nir_profile=nir_profile,
                       partition="never" if no_partition else "auto", debug_outputs=debug_outputs, unroll=unroll,
                       force=force)
    if res.message:
        click.echo(f"sdt-deploy: note: {res.message}", err=True)
    for p in res.files:
        click.echo(f"wrote {p}")


@cli.command()
@click.option("--out", "out_dir", default="sdt-deploy-demo", show_default=True, type=click.Path(file_okay=False),
              help="folder for the quantized model, the exports and the report")
@click.option("--checkpoint", default=None, type=click.Path(dir_okay=False),
              help="another checkpoint instead of the shipped demo")
@click.option("--force", is_flag=True, help="overwrite files in a non-empty --out folder")
def demo(out_dir, checkpoint, force):
    """The whole toolchain on the shipped demo checkpoint: accuracy, quantize, export NIR and ONNX,
    verify every executor on the exported files, report operations and energy."""
    from .demo import run_demo

    if not os.path.exists(checkpoint or DEMO_CHECKPOINT):
        raise DeployError(f"demo checkpoint {checkpoint or DEMO_CHECKPOINT!r} is missing")
    run_demo(checkpoint or DEMO_CHECKPOINT, out_dir, force=force)


def _register_report() -> None:
    """`report` lives in report_cmd (numpy and friends at import): registered on first use, inside
    main's error handling, so that starting the command line stays light and interruptible."""
    if "report" not in cli.commands:
        from .report_cmd import report

        cli.add_command(report)


def main(argv=None) -> int:
    """Entry point: one line on stderr and a non-zero exit for every expected failure."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        _register_report()
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
    code = main()
    # Everything is written and closed by now. The interpreter's final garbage collections would walk
    # every object that torch and brevitas (its torch._dynamo) created, ~0.5 s of a user's wait on
    # each command; frozen, they are left to the OS.
    gc.freeze()
    sys.exit(code)
