"""Running an exported `.nir` artifact as a deployment would: the host stem (ONNX, when the export was
partitioned — its manifest says so) feeding the NIR graph, stepped by the project's NIR interpreter.
Spikes come back under the layer names, logits through the read-out the export records."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from sdt_deploy.errors import DeployError
from sdt_deploy.files.artifacts import partition_paths, read_manifest
from sdt_deploy.run.nir_interpreter import compact_neurons, load_graph, nir_input, nir_layer_spikes, run_nir


@dataclass
class NirArtifact:
    path: str
    graph: object                      # nir.NIRGraph, read back with nir.read
    manifest: Optional[dict]
    host: Optional[object] = None      # onnx_run.OnnxSession of the stem

    @property
    def changed_since_export(self) -> list:
        return list((self.manifest or {}).get("changed_since_export", []))


def open_nir_artifact(path: str, threads: Optional[int] = None, arena: bool = True) -> NirArtifact:
    """The file read with nir.read and, for a partitioned export, its host stem opened in onnxruntime
    (`threads` intra-op threads, onnxruntime's choice if None; `arena` as `onnx_runner.make_session`)."""
    if not os.path.exists(path):
        raise DeployError(f"NIR artifact {path!r}: no such file")
    try:
        graph = load_graph(path)
    except DeployError:
        raise
    except Exception as exc:  # noqa: BLE001 - nir.read / h5py fail in many ways on a foreign file
        raise DeployError(f"NIR artifact {path!r}: not readable by nir.read ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:120] if str(exc) else ''})") from None
    compact_neurons(graph)                 # the per-neuron constants as the arrays they broadcast from
    manifest = read_manifest(path)
    meta = graph.metadata if isinstance(graph.metadata, dict) else {}
    if manifest is None and str(meta.get("partition", "whole")) == "device":
        stem, manifest_path = (os.path.basename(p) for p in partition_paths(path))
        raise DeployError(f"{os.path.basename(path)} is the device part of a partitioned export (it starts at "
                          f"{meta.get('cut', 'the cut')}); its host stem {stem} and manifest {manifest_path} must "
                          "be beside it")
    host = None
    if manifest is not None:
        from sdt_deploy.run.onnx_runner import open_onnx

        host = open_onnx(os.path.join(os.path.dirname(os.path.abspath(path)), manifest["host"]["file"]),
                         threads=threads, arena=arena)
    return NirArtifact(path, graph, manifest, host)


def readout(graph, per_step: np.ndarray) -> np.ndarray:
    """The logits from the per-step Output values [T, B, ...] as the graph's metadata says (`readout`,
    `time_steps`): `mean` over the T steps, in float32 as the torch model computes it (`torch.mean`), or
    `per_step` (TET) [T, B, K]. A run of another length than the T the file was exported for is refused:
    its thresholds are exact for up to T steps."""
    meta = graph.metadata if isinstance(graph.metadata, dict) else {}
    T = int(meta["time_steps"])
    per_step = np.asarray(per_step)
    if per_step.shape[0] != T:
        raise DeployError(f"the graph was exported for T = {T} steps; got {per_step.shape[0]}")
    per_step = per_step.reshape(per_step.shape[:2] + (-1,)).astype(np.float32)      # [T, B, K]
    if str(meta["readout"]) == "per_step":
        return per_step
    if str(meta["readout"]) != "mean":
        raise DeployError(f"unknown readout {meta['readout']!r}")
    return torch.from_numpy(per_step).mean(0).numpy()


def host_feed(art: NirArtifact, x: np.ndarray, on_spikes=None) -> tuple[dict, np.ndarray]:
    """(the host stem's spikes by layer, the per-step NIR input [B, T, ...] float64) for model inputs x:
    a partitioned export runs its ONNX stem on the host (its states, which nothing here reads, are let
    go step by step); a whole one rounds the image onto the input node's grid (`nir_input`). With
    `on_spikes(layer, [1, B, ...], t)` the stem's spikes are handed on step by step (the dict is empty)."""
    if art.host is None:
        return {}, nir_input(art.graph, x)
    kept: dict = {}

    def step(t: int, _membranes: dict, spikes: dict) -> None:
        for layer, a in spikes.items():
            if on_spikes is not None:
                on_spikes(layer, a[None], t)
            else:
                kept.setdefault(layer, []).append(a)

    stem = art.host.run(x, on_step=step)
    return {k: np.stack(v) for k, v in kept.items()}, nir_input(art.graph, cut_values(stem))


def cut_values(stem) -> np.ndarray:
    """The host stem's per-step output as the NIR input [B, T, C, H, W], in float64 and exact: an int
    stem's integers times 2**-grid per channel (any width: float64 holds 53 bits), a float stem's
    float32 values as they are (exact only while the cut's values fit float32's 24 bits)."""
    if stem.logits_int is not None:
        grid = np.asarray(stem.logits_grid, dtype=np.float64).reshape(-1, 1, 1)
        values = stem.logits_int.astype(np.float64) * np.exp2(-grid)          # exact
    else:
        values = np.asarray(stem.logits, dtype=np.float64)
    return np.ascontiguousarray(values.swapaxes(0, 1))


def nir_part(art: NirArtifact, feed: np.ndarray, on_spikes=None) -> tuple[np.ndarray, dict]:
    """(the NIR graph's one Output per step [T, B, ...], its spikes by layer name) on its input `feed`; with
    `on_spikes(layer, [1, B, ...], t)` the spikes are handed on step by step instead (the dict is empty)."""
    if on_spikes is None:
        outputs, nir_spikes = run_nir(art.graph, feed)
        spikes = dict(nir_layer_spikes(art.graph, nir_spikes))
    else:
        def step(t: int, nir_spikes: dict) -> None:
            one = {k: v[None] for k, v in nir_spikes.items()}
            for layer, a in nir_layer_spikes(art.graph, one).items():
                on_spikes(layer, a, t)

        outputs, _ = run_nir(art.graph, feed, on_step=step)
        spikes = {}
    if len(outputs) != 1:
        raise DeployError(f"{art.path}: expected one NIR output, found {len(outputs)}")
    return next(iter(outputs.values())), spikes


def run_nir_then_host(art: NirArtifact, x: np.ndarray, on_spikes=None) -> tuple[dict, np.ndarray]:
    """A V2 export (manifest `order` "nir-then-host"): the NIR prefix on the image, its per-step output (the
    current at the cut, float64, exact) fed to the host's ONNX graph, which gives the logits. With
    `on_spikes` both parts' spikes are handed on step by step (the dict is empty)."""
    out, spikes = nir_part(art, nir_input(art.graph, x), on_spikes)
    cut = np.ascontiguousarray(np.asarray(out).swapaxes(0, 1))   # [B, T, ...]
    if on_spikes is None:
        host = art.host.run(cut)
        spikes.update(host.spikes)
        return spikes, host.logits

    def host_step(t: int, _membranes: dict, step_spikes: dict) -> None:
        for layer, a in step_spikes.items():
            on_spikes(layer, a[None], t)

    return {}, art.host.run(cut, on_step=host_step).logits


def run_artifact(art: NirArtifact, x: np.ndarray, on_spikes=None) -> tuple[dict, np.ndarray]:
    """(spikes by layer name, logits) of the artifact on model inputs x ([B,C,H,W] or [B,T,C,H,W]). With
    `on_spikes(layer, spikes, t0)` the spikes are handed on as they are made instead of kept -- the host
    stem's whole ([T, B, ...], t0 = 0), the NIR graph's step by step ([1, B, ...] at step t0) -- and the
    returned dict is empty."""
    if art.manifest is not None and art.manifest.get("order") == "nir-then-host":
        return run_nir_then_host(art, x, on_spikes)
    spikes, feed = host_feed(art, x, on_spikes)
    out, nir_spikes = nir_part(art, feed, on_spikes)
    spikes.update(nir_spikes)
    return spikes, readout(art.graph, out)
