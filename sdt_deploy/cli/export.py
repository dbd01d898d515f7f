"""`sdt-deploy export`: the quantized (or BN-folded float) deploy graph to NIR or ONNX files."""
from __future__ import annotations

import click

from sdt_deploy.cli.options import force_option, json_option, model_options, quant_options, run_options, say


@click.command()
@model_options
@click.option("--target", required=True, type=click.Choice(["nir", "onnx"], case_sensitive=False),
              help="nir: a .nir graph (HDF5) for neuromorphic tool chains; onnx: a .onnx step model")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="the file to write: .nir for --target nir, .onnx for --target onnx")
@click.option("--no-quantize", is_flag=True, help="NIR only: export the BN-folded float weights instead")
@click.option("--no-partition", is_flag=True,
              help="NIR: refuse a graph with the stem's real-valued max-pool instead of partitioning it")
@click.option("--nir-profile", type=click.Choice(["standard", "portable", "norse"]), default="standard",
              show_default=True, help="standard: exact in any arithmetic; portable: for snntorch's importer "
                                      "(dt 1e-4); norse: for norse.torch.from_nir (dt 1e-3)")
@click.option("--onnx-variant", type=click.Choice(["int", "float"]), default="int", show_default=True,
              help="ONNX (and a NIR partition's host stem): integer ops or float32 with the exact weights")
@click.option("--unroll", is_flag=True, help="ONNX: all T steps inside the graph")
@click.option("--debug-outputs", is_flag=True, help="ONNX: every layer's spikes as extra outputs")
@quant_options
@force_option
@json_option
@run_options
def export(ckpt, target, output, no_quantize, no_partition, nir_profile, onnx_variant, unroll, debug_outputs,
           weight_bits, input_bits, scale_search, input_range, reparam, force, as_json, batch_size, quiet, no_progress,
           **kw):
    """Export to NIR (.nir, HDF5) or ONNX with explicit LIF state and binary spikes between layers."""
    from exporters.bundle import check_output_name
    from sdt_deploy import api
    from sdt_deploy.cli.options import echo_json, open_model
    from sdt_deploy.files.atomic import check_output_path
    from sdt_deploy.quant.contract import QuantOptions

    check_output_name(target, output)
    QuantOptions(weight_bits=weight_bits, input_bits=input_bits, scale_search=scale_search,
                 input_range=input_range)          # every option checked before the model loads
    check_output_path(output, force)
    res = api.export(open_model(ckpt, kw), target, output, nir_profile=nir_profile, onnx_variant=onnx_variant,
                     partition=not no_partition, debug_outputs=debug_outputs, unroll=unroll,
                     float_weights=no_quantize, weight_bits=weight_bits, input_bits=input_bits,
                     scale_search=scale_search, input_range=input_range, force=force, consume=True, reparam=reparam)
    if as_json:
        echo_json({"files": res.files, "note": res.message})
        return
    if res.message:
        say(quiet, f"sdt-deploy: note: {res.message}")
    for p in res.files:
        say(quiet, f"wrote {p}", err=False)
