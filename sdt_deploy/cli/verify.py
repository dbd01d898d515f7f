"""`sdt-deploy verify`: command-line shell over `verify.run_verify`, with torchrun sharding."""
from __future__ import annotations

import json
import os

import click

from sdt_deploy.errors import DeployError, MismatchError


def _distributed() -> tuple[int, int]:
    """(rank, world) under torchrun (gloo on CPU, nccl on GPU); (0, 1) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _leave_distributed(world: int) -> None:
    """Destroy the process group once the last collective is done: left to the interpreter's exit,
    gloo's threads could outlive it ("terminate called without an active exception", SIGABRT)."""
    if world <= 1:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _gather(obj, world: int):
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def choose_dataset(loaded, input_path, data_dir, digits, random_n):
    from sdt_deploy.data.datasets import ArrayDataset, digits_dataset, open_dataset
    from sdt_deploy.files.arrays import check_input, load_array
    from sdt_deploy.data.synth import random_inputs

    chosen = [v is not None for v in (input_path, data_dir, digits, random_n)]
    if sum(chosen) > 1:
        raise DeployError("give only one of --input, --data, --digits, --random")
    cfg, data = loaded.config, loaded.resolved.data
    events = data.events or cfg.dvs_mode
    if input_path is not None:
        return ArrayDataset(check_input(load_array(input_path), cfg, name=f"input {input_path!r}"))
    if data_dir is not None:
        return open_dataset(data_dir, cfg, data)
    if random_n is not None:
        if random_n < 1:
            raise DeployError("--random must be at least 1")
        return ArrayDataset(random_inputs(cfg, random_n, seed=0, events=events))
    return digits_dataset(cfg, digits if digits is not None else 32, events=events)


def artifacts_by_kind(paths) -> dict:
    """--artifact files by the executor that runs them (ONNX variant read from its metadata)."""
    out = {}
    for p in paths:
        if not os.path.exists(p):
            raise DeployError(f"--artifact {p!r}: no such file")
        if p.endswith(".onnx"):
            import onnx

            try:
                m = onnx.load(p, load_external_data=False)
            except Exception as exc:  # noqa: BLE001 - an unreadable artifact is one message
                raise DeployError(f"--artifact {p!r}: not a readable ONNX file ({type(exc).__name__})") from None
            meta = {e.key: e.value for e in m.metadata_props}
            variant = meta.get("sdt_deploy.variant")
            if variant not in ("int", "float"):
                raise DeployError(f"--artifact {p!r}: not an sdt-deploy ONNX export (no variant in its metadata)")
            if meta.get("sdt_deploy.partition") == "host":
                raise DeployError(f"--artifact {p!r}: a partition's host stem; pass the .nir file (its manifest "
                                  "names the stem)")
            out[f"onnx-{variant}"] = p
        elif p.endswith(".nir"):
            out["nir"] = p
        else:
            raise DeployError(f"--artifact {p!r}: expected a .onnx or .nir file")
    return out


def print_result(res, console=None) -> None:
    from rich.table import Table

    from sdt_deploy.console import console as _console

    console = console or _console()
    j = res.to_json()
    execs = [e for e in j["layers"][next(iter(j["layers"]))]] if j["layers"] else []
    t = Table(title=f"spikes per layer ({j['samples']} samples; reference: {j['reference']})")
    t.add_column("layer", no_wrap=True)
    for ex in execs:
        t.add_column(ex, justify="right")
    for layer, row in j["layers"].items():
        cells = []
        for ex in execs:
            r = row.get(ex)
            if r is None:
                cells.append("-")
            elif r["mismatches"]:
                cells.append(f"[red]{r['spikes']} ({r['mismatches']} differ)[/]")
            else:
                cells.append(str(r["spikes"]))
        t.add_row(layer, *cells)
    console.print(t)
    for ex, why in j["executors"].items():
        if why != "ran":
            console.print(f"{ex}: {why}")
    if j["accuracy"]:
        console.print("accuracy: " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in j["accuracy"].items()))
    b = j["bits"]
    console.print(f"bits: integer side {b['max_int_bits']}, float32 side {b['max_float32_bits']} of 25; "
                  f"exact side: {b['exact_side']}")


def describe_divergence(first: dict) -> str:
    where = (f"{first['executor']} differs from the reference first at layer {first['layer']}, time step "
             f"{first['step']}, sample {first['sample']}, neuron {tuple(first['neuron'])}: reference spike "
             f"{first['reference_spike']}, {first['executor']} spike {first['candidate_spike']}")
    if "reference_H" in first:
        where += f"; membrane H reference {first['reference_H']!r}"
        if "candidate_H" in first:
            where += f", {first['executor']} {first['candidate_H']!r}"
        where += f"; threshold {first['theta']} (= {first['theta_int']} on grid {first['grid']})"
    elif "note" in first:
        where += f"; {first['note']}"
    return where


def verify_command(loaded, input_path, data_dir, digits, random_n, executors: str, artifacts, reference: str,
                   as_json: bool, weight_bits: int, input_bits: int, batch_size: int) -> int:
    from sdt_deploy.data.datasets import shard
    from sdt_deploy.verify.verifier import ALL_EXECUTORS, Tally, run_verify

    names = [e.strip() for e in executors.split(",") if e.strip()]
    for e in names:
        if e not in ALL_EXECUTORS:
            raise DeployError(f"unknown executor {e!r} (choose from {', '.join(ALL_EXECUTORS)})")
    dataset = choose_dataset(loaded, input_path, data_dir, digits, random_n)
    if reference == "float":
        from sdt_deploy.verify.float_reference import compare_float

        rep = compare_float(loaded, dataset, weight_bits=weight_bits, input_bits=input_bits, batch_size=batch_size)
        if as_json:
            click.echo(json.dumps(rep, indent=2))
        else:
            from sdt_deploy.verify.float_reference import print_float_report

            print_float_report(rep)
        return 0
    rank, world = _distributed()
    try:
        indices = shard(len(dataset), rank, world)
        res = run_verify(loaded, dataset, names, artifacts=artifacts_by_kind(artifacts), weight_bits=weight_bits,
                         input_bits=input_bits, batch_size=batch_size, indices=indices,
                         progress=(rank == 0 and not as_json))
        tallies = _gather(res.tally, world)
    finally:
        _leave_distributed(world)
    if rank != 0:
        return 0
    total = Tally()
    for t in tallies:
        total = total.merge(t)
    res.tally = total
    if as_json:
        click.echo(json.dumps(res.to_json(), indent=2, default=float))
    else:
        print_result(res)
    if not res.ok:
        note = ""
        if total.first["executor"] == "cupy" and not res.bits["float32_exact"]:
            note = ("; the bit analysis predicted this: float32 cannot hold every value exactly here "
                    f"({res.bits['max_float32_bits']} bits needed), the integer engine is the exact side")
        raise MismatchError("spike mismatch: " + describe_divergence(total.first) + note)
    if not as_json:
        click.echo(f"OK: {total.samples} samples, every spike of every layer equal in "
                   f"{', '.join(e for e in res.executors)}")
    return 0
