"""`sdt-deploy report`: operations, firing rates and energy per layer, in the paper's convention and as
measured by the integer engine, with the ANN baseline; a table on the terminal, JSON, CSV and a plot.
`--float` counts the float model as trained (its own spikes) instead of the quantized one."""
from __future__ import annotations

import click

from sdt_deploy.accounting.energy import DEFAULT_TABLE
from sdt_deploy.cli.options import (
    check_memory,
    force_option,
    input_options,
    json_option,
    memory_option,
    model_options,
    open_model,
    quant_options,
    run_options,
    say,
)


@click.command("report")
@model_options
@input_options
@click.option("--energy", default=DEFAULT_TABLE, show_default=True, metavar="45nm-fp32|45nm-int8|FILE",
              help="energy table: built-in, or a JSON/YAML file {name, base, pj: {op: pJ}}")
@click.option("--float", "float_model", is_flag=True,
              help="count the float model as trained (its own spikes, float32 torch) instead of the quantized "
                   "model the engine runs; the engine check is then not applicable")
@click.option("--explain", is_flag=True, help="print the notes on what every number counts (always in the JSON)")
@click.option("--save-json", "json_path", type=click.Path(dir_okay=False), help="write the report as JSON")
@click.option("--save-csv", "csv_path", type=click.Path(dir_okay=False), help="write the per-layer rows as CSV")
@click.option("--save-plot", "plot_path", type=click.Path(dir_okay=False),
              help="write the firing rates and energies per layer (PNG)")
@quant_options
@force_option
@memory_option
@json_option
@run_options
def report(ckpt, input_path, data_dir, digits, random_n, seed, energy, float_model, explain, json_path, csv_path,
           plot_path, weight_bits, input_bits, scale_search, input_range, reparam, force, max_memory, as_json,
           batch_size, quiet, no_progress, **kw):
    """Operations, firing rates and energy per layer: the paper's convention, what the integer engine
    measured, and the ANN baseline. By default the quantized model is counted on the first 32 held-out
    digits; --float counts the float checkpoint as trained."""
    from sdt_deploy.accounting.energy import load_energy_table
    from sdt_deploy.accounting.render import print_report, write_outputs
    from sdt_deploy.api import report as api_report
    from sdt_deploy.cli.options import echo_json
    from sdt_deploy.errors import DeployError
    from sdt_deploy.files.arrays import load_array
    from sdt_deploy.files.atomic import check_output_paths
    from sdt_deploy.quant.contract import QuantOptions
    from sdt_deploy.quant.qmodel import QuantizedModel

    check_memory(max_memory)
    check_output_paths({"--save-json": json_path, "--save-csv": csv_path, "--save-plot": plot_path}, force)
    load_energy_table(energy)                # a bad table fails before the model loads
    QuantOptions(weight_bits=weight_bits, input_bits=input_bits, scale_search=scale_search, input_range=input_range)
    if input_path:
        load_array(input_path)           # a missing or broken file fails before the model loads
    source = open_model(ckpt, kw)
    if float_model and isinstance(source, QuantizedModel):
        raise DeployError(f"--float: {source.checkpoint.path or ckpt} is a quantized file: it holds no float model "
                          "(give the original checkpoint, or drop --float to count the quantized model)")
    rep = api_report(source, input=input_path, data=data_dir, digits=digits, random=random_n, seed=seed,
                     energy=energy, batch_size=batch_size, weight_bits=weight_bits, input_bits=input_bits,
                     scale_search=scale_search, input_range=input_range, float_model=float_model,
                     progress=not (quiet or no_progress), max_memory=max_memory,
                     notes=lambda text: say(quiet, text), reparam=reparam)
    write_outputs(rep, json_path, csv_path, plot_path)
    if as_json:
        echo_json(rep)
    else:
        print_report(rep, explain=explain)
    for opt, p in (("--save-json", json_path), ("--save-csv", csv_path), ("--save-plot", plot_path)):
        if p:
            say(quiet, f"wrote {p} ({opt})")
