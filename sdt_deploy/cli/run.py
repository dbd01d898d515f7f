"""`sdt-deploy run`: the model on an input array, predictions printed, spikes optionally dumped."""
from __future__ import annotations

import click
import numpy as np

from sdt_deploy.files.checkpoint import LoadedModel
from sdt_deploy.files.atomic import save_npz
from sdt_deploy.files.arrays import check_input, load_array
from sdt_deploy.run.torch_runner import predictions, run_model


def run_command(loaded: LoadedModel, input_path: str, dump: str | None = None, quantized: bool = False,
                weight_bits: int = 8, input_bits: int = 8, batch_size: int = 64) -> dict:
    cfg = loaded.config
    x = check_input(load_array(input_path), cfg, name=f"input {input_path!r}")
    model = loaded.model
    if quantized:
        from sdt_deploy.api import quantize

        model = quantize(loaded, weight_bits=weight_bits, input_bits=input_bits).model
    logits, spikes = run_model(model, x, batch_size=batch_size, record=dump is not None)
    pred = predictions(logits)
    click.echo("predictions: " + " ".join(str(int(p)) for p in pred))
    if dump:
        arrays = {"logits": logits.astype(np.float32)}
        arrays.update(spikes)
        save_npz(dump, arrays)
        click.echo(f"wrote {dump}: logits {list(logits.shape)} and {len(spikes)} spike tensors")
    return {"logits": logits, "predictions": pred, "spikes": spikes}
