"""`sdt-deploy quantize`: fold BatchNorm, quantize, write the quantized model file."""
from __future__ import annotations

import click

from sdt_deploy.cli.options import force_option, json_option, model_options, open_model, quant_options, run_options, say


@click.command()
@model_options
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="the quantized file (.pth)")
@quant_options
@force_option
@json_option
@run_options
def quantize(ckpt, output, weight_bits, input_bits, scale_search, input_range, reparam, force, as_json, batch_size,
             quiet, no_progress, **kw):
    """Fold BatchNorm and quantize to power-of-two per-channel grids; write the quantized model."""
    from sdt_deploy.api import quantize as quantize_model
    from sdt_deploy.cli.options import echo_json
    from sdt_deploy.files.atomic import check_output_path
    from sdt_deploy.quant.bits import bit_report
    from sdt_deploy.quant.contract import QuantOptions, settings_of

    QuantOptions(weight_bits=weight_bits, input_bits=input_bits, scale_search=scale_search, input_range=input_range)
    check_output_path(output, force)
    q = quantize_model(open_model(ckpt, kw), weight_bits=weight_bits, input_bits=input_bits,
                       scale_search=scale_search, input_range=input_range, progress=not (quiet or no_progress),
                       reparam=reparam)
    q.save(output)
    s = bit_report(q.graph)["summary"]
    if as_json:
        echo_json({"file": output, "quantization": settings_of(q.graph.meta), "bits": s})
        return
    kind = " (re-parameterized)" if reparam else ""
    say(quiet, f"wrote {output}: int{weight_bits} weights{kind}, input grid 2**-{q.graph.meta['input_grid']} "
               f"({input_bits} bits); the integer side needs {s['max_int_bits']} bits, float32 "
               f"{s['max_float32_bits'] - 1} (exact to 24)", err=False)
    if q.graph.meta.get("plif_tau"):
        say(quiet, f"sdt-deploy: note: PLIF: {len(q.graph.meta['plif_tau'])} learned decays set to 1/2 (tau 2); "
                   "`verify --reference float` measures the change")
