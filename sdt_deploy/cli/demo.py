"""`sdt-deploy demo`: the whole toolchain on the shipped demo checkpoint, end to end.

load -> accuracy of the float model on the held-out digits -> quantize (int8) -> export NIR (partitioned
at the stem's real-valued max-pool; V2: before the first attention product) and ONNX (int and float) ->
verify every executor against the quantized torch model on those very files -> operation / energy report
(table, JSON, CSV, PNG).
The checkpoint is loaded once and quantized once; every step after that takes the quantized model.
"""
from __future__ import annotations

import os
import time

import click

from sdt_deploy.data import DEMO_CHECKPOINT
from sdt_deploy.errors import DeployError


@click.command()
@click.argument("ckpt", required=False)
@click.option("-o", "--output", "out_dir", default="sdt-deploy-demo", show_default=True,
              type=click.Path(file_okay=False), help="folder for the quantized model, the exports and the report")
@click.option("--force", is_flag=True, help="overwrite files in a non-empty output folder")
@click.option("--quiet", "-q", is_flag=True, help="only the results: no notes or progress")
@click.option("--no-progress", is_flag=True, help="no progress bars")
def demo(ckpt, out_dir, force, quiet, no_progress):
    """The whole toolchain on a checkpoint (default: the shipped demo, an SDT trained on scikit-learn's
    digits; sdt_deploy/assets/demo_v2_digits.pth is the shipped SDT-V2 one): accuracy, quantize, export NIR
    and ONNX, verify every executor on the exported files, report operations and energy."""
    checkpoint = ckpt or DEMO_CHECKPOINT
    if not os.path.exists(checkpoint):
        raise DeployError(f"demo checkpoint {checkpoint!r} is missing")
    run_demo(checkpoint, out_dir, force=force, progress=not (quiet or no_progress), quiet=quiet)


def _accuracy(model, x, y) -> float:
    from sdt_deploy.run.torch_runner import predictions, run_model

    logits, _ = run_model(model, x, batch_size=120, record=False)
    return 100.0 * float((predictions(logits) == y).mean())


def run_demo(checkpoint: str, out_dir: str, force: bool = False, verify_samples: int = 32, progress: bool = True,
             quiet: bool = False) -> dict:
    from exporters.bundle import export_graph, planned_outputs
    from models import V2Config
    from sdt_deploy.accounting.energy import load_energy_table
    from sdt_deploy.accounting.measure import run_report
    from sdt_deploy.accounting.render import print_report, write_outputs
    from sdt_deploy.api import float_source, load_model, quantize
    from sdt_deploy.data.datasets import ArrayDataset
    from sdt_deploy.data.digits import digits_split
    from sdt_deploy.data.inputs import Inputs
    from sdt_deploy.files.atomic import check_output_path
    from sdt_deploy.verification.executors import ALL_EXECUTORS
    from sdt_deploy.verification.render import describe_divergence, print_result
    from sdt_deploy.verification.verifier import run_verify

    out_dir = os.path.abspath(out_dir)
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not force:
        raise DeployError(f"output folder {out_dir!r} is not empty (use --force to overwrite its files)")
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.time()
    loaded = float_source(load_model(checkpoint))
    cfg = loaded.config
    if isinstance(cfg, V2Config):    # V2: its own evaluation transform (ImageNet mean/std)
        test = digits_split("test", img_size=cfg.img_size, channels=cfg.in_channels, mean=loaded.data.mean,
                            std=loaded.data.std)
        what = f"SDT-V2 embed_dim {list(cfg.embed_dim)}, {cfg.num_heads} heads{', kd' if cfg.kd else ''}"
    else:
        test = digits_split("test", img_size=cfg.img_size, channels=cfg.in_channels)
        what = f"SDT dim {cfg.dim}, depth {cfg.depth}"
    click.echo(f"[1/5] {os.path.basename(checkpoint)}: {what}, T {cfg.time_steps}, "
               f"{cfg.img_size}x{cfg.img_size}; {len(test.y)} held-out digits")
    acc_float = _accuracy(loaded.model, test.x, test.y)
    q = quantize(loaded, progress=progress)
    acc_int8 = _accuracy(q.model, test.x, test.y)
    q_path = os.path.join(out_dir, "demo_int8.pth")
    check_output_path(q_path, True)
    q.save(q_path)
    click.echo(f"[2/5] top-1: float {acc_float:.2f}%, int8 (dyadic, spikingjelly) {acc_int8:.2f}% -> {q_path}")
    files = {}
    for target, name, variant in (("nir", "demo.nir", "float"), ("onnx", "demo_int.onnx", "int"),
                                  ("onnx", "demo_float.onnx", "float")):
        path = os.path.join(out_dir, name)
        for p in planned_outputs(q.graph, target, path, "auto"):
            check_output_path(p, True)
        res = export_graph(q.graph, target, path, onnx_variant=variant, debug_outputs=(target == "onnx"), force=True)
        files[name] = res.files
        if res.message and not quiet:
            click.echo(f"      note: {res.message}")
    click.echo("[3/5] exported: " + ", ".join(os.path.basename(f) for fs in files.values() for f in fs))
    inputs = Inputs(ArrayDataset(test.x[:verify_samples], test.y[:verify_samples]),
                    {"source": "digits", "split": "test", "first": verify_samples})
    artifacts = {"nir": os.path.join(out_dir, "demo.nir"), "onnx-int": os.path.join(out_dir, "demo_int.onnx"),
                 "onnx-float": os.path.join(out_dir, "demo_float.onnx")}
    res = run_verify(q, inputs.dataset, list(ALL_EXECUTORS), artifacts=artifacts, progress=progress,
                     tune_heap=True)
    click.echo(f"[4/5] verify on {verify_samples} digits, every spike of every layer, against the quantized "
               "torch model:")
    print_result(res)
    if not res.ok:
        raise DeployError("demo verification failed: " + describe_divergence(res.tally.first))
    click.echo(f"      OK: every spike of every layer equal in {', '.join(res.executors)}"
               + (f" ({', '.join(f'{k} skipped: {v}' for k, v in res.skipped.items())})" if res.skipped else ""))
    click.echo("[5/5] operations and energy:")
    rep = run_report(q, inputs, load_energy_table("45nm-fp32"), progress=progress)
    write_outputs(rep, os.path.join(out_dir, "report.json"), os.path.join(out_dir, "report.csv"),
                  os.path.join(out_dir, "report.png"))
    print_report(rep)
    click.echo(f"done in {time.time() - t0:.0f}s; everything is in {out_dir}")
    return {"float": acc_float, "int8": acc_int8, "verify_ok": res.ok}
