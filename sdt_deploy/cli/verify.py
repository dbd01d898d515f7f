"""`sdt-deploy verify`: every executor against the quantized torch model, sharded under torchrun."""
from __future__ import annotations

import json

import click

from sdt_deploy.cli.options import model_options
from sdt_deploy.errors import DeployError, MismatchError


@click.command()
@click.argument("ckpt", required=False)
@model_options
@click.option("--input", "input_path", type=click.Path(dir_okay=False), help="inputs (.npy)")
@click.option("--data", "data_dir", type=click.Path(), help="an ImageFolder / original CIFAR or ImageNet layout")
@click.option("--digits", type=int, help="the first N held-out scikit-learn digits (the default, N = 32)")
@click.option("--random", "random_n", type=int, help="N random inputs")
@click.option("--executors", default="torch,cupy,engine,onnx-int,onnx-float,nir", show_default=True,
              help="comma-separated executors to compare with the reference")
@click.option("--artifact", "artifacts", multiple=True, type=click.Path(dir_okay=False),
              help="check this exported file as it is (.onnx, .nir; repeatable); its settings are read from it")
@click.option("--reference", type=click.Choice(["quantized", "float"]), default="quantized", show_default=True,
              help="quantized: spike-exact check; float: agreement with the original float model")
@click.option("--json", "as_json", is_flag=True)
@click.option("--weight-bits", type=int, help="weight bits, 2..8 (default: the artifacts', else 8)")
@click.option("--input-bits", type=int, help="input grid bits, 2..8 (default: the artifacts', else 8)")
@click.option("--scale-search", type=click.Choice(["mse", "max"]),
              help="power-of-two scale per channel (default: the artifacts', else mse)")
@click.option("--input-range", type=float, help="largest |input| the input grid must hold (default: the "
                                                 "artifacts', else from mean/std)")
@click.option("--batch-size", type=int, default=16, show_default=True)
def verify(ckpt, input_path, data_dir, digits, random_n, executors, artifacts, reference, as_json, weight_bits,
           input_bits, scale_search, input_range, batch_size, **kw):
    """Spike-exact equivalence of every executor against the quantized torch model; `--artifact` files
    are checked as they were written, with the settings they record."""
    from sdt_deploy.api import float_source, quantize
    from sdt_deploy.cli.options import flags_of
    from sdt_deploy.data import DEMO_CHECKPOINT
    from sdt_deploy.data.datasets import shard
    from sdt_deploy.data.inputs import choose_inputs
    from sdt_deploy.verify.distributed import distributed, gather, leave_distributed
    from sdt_deploy.verify.executors import ALL_EXECUTORS
    from sdt_deploy.verify.provenance import artifacts_by_kind, open_for_artifacts, quantization_for, read_artifact
    from sdt_deploy.verify.render import describe_divergence, print_result
    from sdt_deploy.verify.verifier import Tally, run_verify

    names = [e.strip() for e in executors.split(",") if e.strip()]
    for e in names:
        if e not in ALL_EXECUTORS:
            raise DeployError(f"unknown executor {e!r} (choose from {', '.join(ALL_EXECUTORS)})")
    files = [read_artifact(p) for p in artifacts]
    by_kind = artifacts_by_kind(files)
    settings = quantization_for(files, {"weight_bits": weight_bits, "input_bits": input_bits,
                                        "scale_search": scale_search, "input_range": input_range})
    flags = flags_of(kw)
    source = open_for_artifacts(ckpt or DEMO_CHECKPOINT, flags, kw.pop("config", None), kw.pop("ema", False), files)
    inputs = choose_inputs(source.config, source.resolved.data, input_path, data_dir, digits, random_n,
                           default_digits=32)
    q = quantize(source, **settings)
    if reference == "float":
        from sdt_deploy.verify.float_reference import compare_float, print_float_report

        rep = compare_float(float_source(source), q, inputs.dataset, batch_size=batch_size)
        if as_json:
            click.echo(json.dumps(rep, indent=2))
        else:
            print_float_report(rep)
        return
    rank, world = distributed()
    try:
        res = run_verify(q, inputs.dataset, names, artifacts={k: a.path for k, a in by_kind.items()},
                         batch_size=batch_size, indices=shard(len(inputs), rank, world),
                         progress=(rank == 0 and not as_json))
        tallies = gather(res.tally, world)
    finally:
        leave_distributed(world)
    if rank != 0:
        return
    total = Tally()
    for t in tallies:
        total = total.merge(t)
    res.tally = total
    if as_json:
        click.echo(json.dumps(res.to_json(), indent=2, default=float))
    else:
        print_result(res)
    if not res.ok:
        note = ""
        if total.first["executor"] in ("cupy", "onnx-float") and not res.bits["float32_exact"]:
            note = ("; the bit analysis predicted this: float32 cannot hold every value exactly here "
                    f"({res.bits['max_float32_bits'] - 1} bits needed, 24 held), the integer engine is the exact "
                    "side")
        raise MismatchError("spike mismatch: " + describe_divergence(total.first) + note)
    if not as_json:
        click.echo(f"OK: {total.samples} samples, every layer at every step equal in "
                   f"{', '.join(e for e in res.executors)}")
