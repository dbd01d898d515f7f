"""`sdt-deploy run`: the model on an input array, predictions printed, spikes optionally dumped."""
from __future__ import annotations

import click

from sdt_deploy.cli.options import model_options, open_model


@click.command()
@click.argument("ckpt", required=False)
@model_options
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
    import numpy as np

    from sdt_deploy.api import quantize
    from sdt_deploy.files.arrays import check_input, load_array
    from sdt_deploy.files.atomic import check_output_path, save_npz
    from sdt_deploy.run.torch_runner import predictions, run_model

    if dump:
        check_output_path(dump, force)
    source = open_model(ckpt, kw)
    x = check_input(load_array(input_path), source.config, name=f"input {input_path!r}")
    model = quantize(source, weight_bits=weight_bits, input_bits=input_bits).model if quantized else source.model
    logits, spikes = run_model(model, x, batch_size=batch_size, record=dump is not None)
    click.echo("predictions: " + " ".join(str(int(p)) for p in predictions(logits)))
    if dump:
        save_npz(dump, {"logits": logits.astype(np.float32), **spikes})
        click.echo(f"wrote {dump}: logits {list(logits.shape)} and {len(spikes)} spike tensors")
