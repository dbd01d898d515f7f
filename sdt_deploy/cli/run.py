"""`sdt-deploy run`: the model on an input array, predictions printed, spikes optionally dumped."""
from __future__ import annotations

import click

from sdt_deploy.cli.options import force_option, json_option, model_options, open_model, quant_options, run_options, say


@click.command()
@model_options
@click.option("-i", "--input", "input_path", required=True, type=click.Path(dir_okay=False),
              help="[B,C,H,W] images or [B,T,C,H,W] event frames (.npy / .npz)")
@click.option("--dump", type=click.Path(dir_okay=False),
              help="write the logits and every spike tensor (.npz), keyed by module path (V2: also each block's "
                   "attn.kv and attn.qkv, int32, before the 0.125 scale)")
@click.option("--quantize", "quantized", is_flag=True, help="run the dyadic-quantized model")
@quant_options
@force_option
@json_option
@run_options
def run(ckpt, input_path, dump, quantized, weight_bits, input_bits, scale_search, input_range, reparam, force, as_json,
        batch_size, quiet, no_progress, **kw):
    """Run the model on an input array; print predictions; optionally dump every layer's spikes."""
    import numpy as np

    from models import V2Config
    from sdt_deploy.api import quantize
    from sdt_deploy.cli.options import echo_json
    from sdt_deploy.console import progress
    from sdt_deploy.files.arrays import check_input, load_array
    from sdt_deploy.files.atomic import check_output_path, save_npz
    from sdt_deploy.ir.lower_v2 import original_tap_shape
    from sdt_deploy.run.torch_runner import predictions, run_model

    if dump:
        check_output_path(dump, force)
    source = open_model(ckpt, kw)
    x = check_input(load_array(input_path), source.config, name=f"input {input_path!r}")
    model = quantize(source, weight_bits=weight_bits, input_bits=input_bits, scale_search=scale_search,
                     input_range=input_range, reparam=reparam).model if quantized else source.model
    with progress(len(x), "run", enabled=not (quiet or no_progress)) as advance:
        logits, spikes = run_model(model, x, batch_size=batch_size, record=dump is not None, progress=advance,
                                   integers=True)
    if isinstance(source.config, V2Config):   # the original's layouts: [C, N] where it flattens the tokens
        spikes = {k: v.reshape(v.shape[:2] + original_tap_shape(k, v.shape[2:])) for k, v in spikes.items()}
    pred = predictions(logits)
    if dump:
        save_npz(dump, {"logits": logits.astype(np.float32), **spikes})
    if as_json:
        echo_json({"predictions": pred.tolist(), "logits": logits.tolist(), "dump": dump})
    else:
        click.echo("predictions: " + " ".join(str(int(p)) for p in pred))
    if dump:
        ints = sum(v.dtype == np.int32 for v in spikes.values())
        say(quiet, f"wrote {dump}: logits {list(logits.shape)} and {len(spikes) - ints} spike tensors"
                   + (f", {ints} integer products (kv, qkv)" if ints else ""), err=False)
