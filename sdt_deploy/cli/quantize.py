"""`sdt-deploy quantize`: fold BatchNorm, quantize, write the quantized model file."""
from __future__ import annotations

import click

from sdt_deploy.cli.options import model_options, open_model, quant_options, scale_search_option


@click.command()
@click.argument("ckpt", required=False)
@model_options
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="the quantized file (.pth)")
@quant_options
@scale_search_option
@click.option("--input-range", type=float, help="largest |input| the input grid must hold (default: from mean/std)")
@click.option("--force", is_flag=True, help="overwrite an existing output")
def quantize(ckpt, output, weight_bits, input_bits, scale_search, input_range, force, **kw):
    """Fold BatchNorm and quantize to power-of-two per-channel grids; write the quantized model."""
    from sdt_deploy.api import quantize as quantize_model
    from sdt_deploy.files.atomic import check_output_path
    from sdt_deploy.quant.bits import bit_report

    check_output_path(output, force)
    q = quantize_model(open_model(ckpt, kw), weight_bits=weight_bits, input_bits=input_bits,
                       scale_search=scale_search, input_range=input_range)
    q.save(output)
    s = bit_report(q.graph)["summary"]
    click.echo(f"wrote {output}: int{weight_bits} weights, input grid 2**-{q.graph.meta['input_grid']} "
               f"({input_bits} bits); integer side needs {s['max_int_bits']} bits, float32 side "
               f"{s['max_float32_bits']} of 25")
    if q.graph.meta.get("plif_tau"):
        click.echo(f"PLIF: {len(q.graph.meta['plif_tau'])} learned decays set to 1/2 (tau 2); "
                   "`verify --reference float` measures the change")
