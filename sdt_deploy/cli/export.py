"""`sdt-deploy export`: the quantized (or BN-folded float) deploy graph to NIR or ONNX files."""
from __future__ import annotations

import click

from sdt_deploy.cli.options import model_options, open_model, quant_options, scale_search_option
from sdt_deploy.errors import DeployError


@click.command()
@click.argument("ckpt", required=False)
@model_options
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
@quant_options
@scale_search_option
@click.option("--force", is_flag=True, help="overwrite existing outputs")
def export(ckpt, target, output, no_quantize, no_partition, nir_profile, onnx_variant, unroll, debug_outputs,
           weight_bits, input_bits, scale_search, force, **kw):
    """Export to NIR (.nir, HDF5) or ONNX with explicit LIF state and binary spikes between layers."""
    from exporters.bundle import export_graph, planned_outputs
    from sdt_deploy.api import deploy_graph, quantize
    from sdt_deploy.files.atomic import check_output_path
    from sdt_deploy.quant.contract import QuantOptions
    from sdt_deploy.quant.float_export import float_nir_graph

    target = target.lower()
    QuantOptions(weight_bits=weight_bits, input_bits=input_bits, scale_search=scale_search)  # validate first
    source = open_model(ckpt, kw)
    if no_quantize:
        if target != "nir":
            raise DeployError("--no-quantize applies to --target nir (ONNX has --onnx-variant float)")
        graph = float_nir_graph(deploy_graph(source))
    else:
        # the float checkpoint is not needed past the quantization: each layer's weights go once quantized
        graph = quantize(source, weight_bits=weight_bits, input_bits=input_bits, scale_search=scale_search,
                         consume=True).graph
    del source
    mode = "never" if no_partition else "auto"
    for p in planned_outputs(graph, target, output, mode):
        check_output_path(p, force)
    res = export_graph(graph, target, output, onnx_variant=onnx_variant, nir_profile=nir_profile,
                       partition_mode=mode, debug_outputs=debug_outputs, unroll=unroll, force=force)
    if res.message:
        click.echo(f"sdt-deploy: note: {res.message}", err=True)
    for p in res.files:
        click.echo(f"wrote {p}")
