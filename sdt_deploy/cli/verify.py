"""`sdt-deploy verify`: every executor against the quantized torch model, sharded under torchrun."""
from __future__ import annotations

import json

import click

from sdt_deploy.cli.options import (
    check_memory,
    input_options,
    json_option,
    memory_option,
    model_options,
    quant_options,
    run_options,
    say,
)
from sdt_deploy.errors import MismatchError


@click.command()
@model_options
@input_options
@click.option("--executors", default="torch,cupy,engine,onnx-int,onnx-float,nir", show_default=True,
              help="comma-separated executors to compare with the reference")
@click.option("--artifact", "artifacts", multiple=True, type=click.Path(dir_okay=False),
              help="check this exported file as it is (.onnx, .nir; repeatable); its settings are read from it")
@click.option("--reference", type=click.Choice(["quantized", "float", "reparam"]), default="quantized",
              show_default=True,
              help="quantized: spike-exact check; float: agreement with the original float model; reparam (V2): "
                   "agreement of the quantized plain and re-parameterized graphs, and what re-parameterizing costs")
@click.option("--jobs", type=click.IntRange(min=1), metavar="N",
              help="processes that take whole batches, one intra-op thread each, as many as --max-memory holds "
                   "(default: 2 on a 2-CPU machine for 320 inputs or more, where the second one's start pays; "
                   "else 1, the runtimes using every core themselves)")
@quant_options(from_artifacts=True)
@memory_option
@json_option
@run_options
def verify(ckpt, input_path, data_dir, digits, random_n, seed, executors, artifacts, reference, jobs, weight_bits,
           input_bits, scale_search, input_range, reparam, max_memory, as_json, batch_size, quiet, no_progress, **kw):
    """Spike-exact equivalence of every executor against the quantized torch model, every layer at every
    step; `--artifact` files are checked as they were written, with the settings they record. The layers
    are compared as the executors produce them and the batch is cut to fit --max-memory."""
    check_memory(max_memory)
    from sdt_deploy import api
    from sdt_deploy.cli.options import flags_of
    from sdt_deploy.data import DEMO_CHECKPOINT
    from sdt_deploy.verification.distributed import distributed, gather, leave_distributed
    from sdt_deploy.verification.render import describe_divergence, print_result
    from sdt_deploy.verification.verifier import Tally

    flags = flags_of(kw)
    common = dict(input=input_path, data=data_dir, digits=digits, random=random_n,
                  executors=[e.strip() for e in executors.split(",") if e.strip()], artifacts=artifacts,
                  reference=reference, batch_size=batch_size, weight_bits=weight_bits, input_bits=input_bits,
                  scale_search=scale_search, input_range=input_range, flags=flags, config=kw.pop("config", None),
                  ema=kw.pop("ema", False), reparam=reparam)
    if reference in ("float", "reparam"):
        from sdt_deploy.verification.float_reference import print_float_report
        from sdt_deploy.verification.reparam_compare import print_reparam_report

        rep = api.verify(ckpt or DEMO_CHECKPOINT, **common)
        if as_json:
            click.echo(json.dumps(rep, indent=2))
        else:
            (print_float_report if reference == "float" else print_reparam_report)(rep)
        return
    rank, world = distributed()
    try:
        res = api.verify(ckpt or DEMO_CHECKPOINT, **common, progress=(rank == 0 and not (as_json or quiet or
                                                                                       no_progress)),
                         rank=rank, world=world, max_memory=max_memory, jobs=1 if world > 1 else jobs,
                         notes=lambda text: say(quiet or rank != 0, text), tune_heap=True)
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
