"""`sdt-deploy run`: the model on an input array, predictions printed, spikes optionally dumped."""
from __future__ import annotations

import click

from sdt_deploy.cli.options import (
    check_memory,
    force_option,
    json_option,
    memory_option,
    model_options,
    open_model,
    quant_options,
    run_options,
    say,
)


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
@memory_option
@json_option
@run_options
def run(ckpt, input_path, dump, quantized, weight_bits, input_bits, scale_search, input_range, reparam, force,
        max_memory, as_json, batch_size, quiet, no_progress, **kw):
    """Run the model on an input array; print predictions; optionally dump every layer's spikes (written a
    batch at a time: the dump may be larger than --max-memory; a V2 model's kv and qkv join them, int32)."""
    import contextlib

    import numpy as np

    from models import V2Config
    from sdt_deploy.api import quantize
    from sdt_deploy.cli.options import echo_json
    from sdt_deploy.console import progress
    from sdt_deploy.files.arrays import check_input, load_array
    from sdt_deploy.files.atomic import NpzStream, check_output_path
    from sdt_deploy.ir.lower import lower
    from sdt_deploy.ir.lower_v2 import original_tap_shape
    from sdt_deploy.quant.qmodel import QuantizedModel
    from sdt_deploy.run import memory as M
    from sdt_deploy.run.torch_runner import predictions, run_model

    check_memory(max_memory)
    if dump:
        check_output_path(dump, force)
    source = open_model(ckpt, kw)
    x = check_input(load_array(input_path), source.config, name=f"input {input_path!r}")
    q = quantize(source, weight_bits=weight_bits, input_bits=input_bits, scale_search=scale_search,
                 input_range=input_range, reparam=reparam) if quantized else None
    model = q.model if quantized else source.model
    # the layer sizes: the quantized graph, or the float model lowered as views of its tensors (no copies)
    a = M.activations(q.graph if quantized else source.graph if isinstance(source, QuantizedModel)
                      else lower(source.model, copy=False))
    per_sample = M.executor_bytes("torch", a) + (a.spikes * a.T if dump else 0)
    plan = M.plan_batch("run", batch_size, M.parse_memory(max_memory), M.RUNTIME_BYTES + M.model_bytes("torch", a),
                        per_sample)
    if plan.note:
        say(quiet, plan.note)
    v2 = isinstance(source.config, V2Config)
    n, logits, count, ints = x.shape[0], [], 0, 0
    with contextlib.nullcontext() if not dump else NpzStream(dump) as out, \
            progress(n, "run", enabled=not (quiet or no_progress)) as advance:
        for start in range(0, n, plan.batch_size):
            xb = x[start:start + plan.batch_size]
            lb, spikes = run_model(model, xb, batch_size=len(xb), record=dump is not None, integers=True)
            logits.append(lb)
            if dump:
                if v2:   # the original's layouts: [C, N] where it flattens the tokens
                    spikes = {k: v.reshape(v.shape[:2] + original_tap_shape(k, v.shape[2:])) for k, v in spikes.items()}
                axis = 1 if lb.ndim == 3 else 0
                full = lb.shape[:axis] + (n,) + lb.shape[axis + 1:]
                out.slice("logits", full, np.float32, (slice(None),) * axis + (slice(start, start + len(xb)),),
                          lb.astype(np.float32))
                for k, v in spikes.items():   # spikes uint8; V2's kv and qkv int32
                    out.slice(k, (v.shape[0], n) + v.shape[2:], v.dtype, (slice(None), slice(start, start + len(xb))),
                              v)
                count, ints = len(spikes), sum(v.dtype == np.int32 for v in spikes.values())
            advance(len(xb))
    logits = np.concatenate(logits, axis=1 if logits[0].ndim == 3 else 0)
    pred = predictions(logits)
    if as_json:
        echo_json({"predictions": pred.tolist(), "logits": logits.tolist(), "dump": dump})
    else:
        click.echo("predictions: " + " ".join(str(int(p)) for p in pred))
    if dump:
        say(quiet, f"wrote {dump}: logits {list(logits.shape)} and {count - ints} spike tensors"
                   + (f", {ints} integer products (kv, qkv)" if ints else ""), err=False)
