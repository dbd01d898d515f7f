"""`sdt-deploy report`: operations, firing rates and energy per layer, in the paper's convention and as
measured by the integer engine, with the ANN baseline; a table on the terminal, JSON, CSV and a plot.
`--float` counts the float model as trained (its own spikes) instead of the quantized one."""
from __future__ import annotations

import click

from sdt_deploy.cli.options import model_options, open_model
from sdt_deploy.report.energy import DEFAULT_TABLE


@click.command("report")
@click.argument("ckpt", required=False)
@model_options
@click.option("--input", "input_path", type=click.Path(dir_okay=False),
              help="[B,C,H,W] images or [B,T,C,H,W] event frames (.npy)")
@click.option("--digits", type=click.IntRange(min=1), metavar="N",
              help="the first N digits of the demo's test split, at the model's size and channels")
@click.option("--random", "random_n", type=click.IntRange(min=1), metavar="N", help="N random inputs (synth)")
@click.option("--data", "data_dir", type=click.Path(file_okay=False), metavar="DIR",
              help="a dataset folder (ImageFolder, original CIFAR/ImageNet layouts), evaluation transform")
@click.option("--seed", type=int, default=0, show_default=True, help="seed of --random")
@click.option("--energy", default=DEFAULT_TABLE, show_default=True, metavar="45nm-fp32|45nm-int8|FILE",
              help="energy table: built-in, or a JSON/YAML file {name, base, pj: {op: pJ}}")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="write the report as JSON")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), help="write the per-layer rows as CSV")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="write firing rates and energy (PNG)")
@click.option("--force", is_flag=True, help="overwrite existing output files")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="samples per engine call (the engine holds a batch's currents as int64 and its spikes)")
@click.option("--float", "float_model", is_flag=True,
              help="count the float model as trained (its own spikes, float32 torch) instead of the quantized "
                   "model the engine runs; the engine check is then not applicable")
@click.option("--weight-bits", type=int, default=8, show_default=True, help="(quantized report only)")
@click.option("--input-bits", type=int, default=8, show_default=True, help="(quantized report only)")
@click.option("--quiet", is_flag=True, help="no table on the terminal")
@click.option("--no-progress", is_flag=True, help="no progress bar")
def report(ckpt, input_path, digits, random_n, data_dir, seed, energy, json_path, csv_path, plot_path, force,
           batch_size, float_model, weight_bits, input_bits, quiet, no_progress, **kw):
    """Operations, firing rates and energy per layer: the paper's convention, what the integer engine
    measured, and the ANN baseline (give one of --input, --digits, --random, --data). By default the
    quantized model is counted; --float counts the float checkpoint as trained."""
    from sdt_deploy.api import deploy_graph, quantize
    from sdt_deploy.data.inputs import choose_inputs
    from sdt_deploy.errors import DeployError
    from sdt_deploy.files.arrays import load_array
    from sdt_deploy.files.atomic import check_output_paths
    from sdt_deploy.quant.qmodel import QuantizedModel
    from sdt_deploy.report.energy import load_energy_table
    from sdt_deploy.report.measure import run_float_report, run_report
    from sdt_deploy.report.render import print_report, write_outputs

    chosen = [k for k, v in {"--input": input_path, "--digits": digits, "--random": random_n,
                             "--data": data_dir}.items() if v is not None]
    if len(chosen) != 1:
        raise click.UsageError("give exactly one input: --input X.npy, --digits N, --random N or --data DIR"
                               + (f" (got {', '.join(chosen)})" if chosen else ""))
    check_output_paths({"--json": json_path, "--csv": csv_path, "--plot": plot_path}, force)
    table = load_energy_table(energy)
    if input_path:
        load_array(input_path)           # a missing or broken file fails before the model loads
    source = open_model(ckpt, kw)
    if float_model and isinstance(source, QuantizedModel):
        raise DeployError(f"--float: {source.checkpoint.path or ckpt} is a quantized file: it holds no float model "
                          "(give the original checkpoint, or drop --float to count the quantized model)")
    inputs = choose_inputs(source.config, source.resolved.data, input_path, data_dir, digits, random_n, seed)
    if float_model:
        rep = run_float_report(source.model, deploy_graph(source), inputs, table, batch_size=batch_size,
                               progress=not no_progress)
    else:
        q = quantize(source, weight_bits=weight_bits, input_bits=input_bits)
        rep = run_report(q, inputs, table, batch_size=batch_size, progress=not no_progress)
    write_outputs(rep, json_path, csv_path, plot_path)
    if not quiet:
        print_report(rep)
    for opt, p in (("json", json_path), ("csv", csv_path), ("plot", plot_path)):
        if p:
            click.echo(f"wrote {p} ({opt})", err=True)
