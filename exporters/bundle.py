"""`sdt-deploy export`: a quantized (or BN-folded float) deploy graph to NIR or ONNX files.

NIR and the stem's real-valued max-pool: `patch_embed.maxpool3` pools currents, which no NIR primitive
computes exactly. Nothing is approximated. By default (`partition_mode="auto"`) such a graph is cut right
after that pool (`sdt_deploy.ir.partition`): the stem up to it is written as an ONNX graph for the host
(`<name>.stem.onnx`, with its own LIF state and its spikes as debug outputs), the rest — the residual
stream on, where every synaptic layer reads spikes — as the NIR graph (`<name>.nir`), and
`<name>.manifest.json` says how they connect (which output feeds which NIR input, on which grid, T, the
read-out, checksums). `partition_mode="never"` refuses such a graph instead. Graphs without a current
max-pool (pooling_stat `xxx0`) go to NIR whole.
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from typing import Optional

from sdt_deploy import __version__
from sdt_deploy.errors import DeployError
from sdt_deploy.files.artifacts import MANIFEST_FORMAT, host_path, partition_paths, sha256_of
from sdt_deploy.files.atomic import check_output_path, write_text
from sdt_deploy.ir.graph import Graph, KVProduct, QKVProduct
from sdt_deploy.ir.partition import NirPrefix, Partition, split_at_current_maxpool, split_before
from sdt_deploy.quant.bits import channel_bounds
from sdt_deploy.quant.contract import settings_of

TARGETS = ("nir", "onnx")


@dataclass
class ExportResult:
    files: list = field(default_factory=list)
    message: Optional[str] = None      # what the user must know (e.g. the partition), one paragraph


def check_output_name(target: str, path: str) -> str:
    """The target (lower case), refusing an unknown one and an output whose suffix says another format:
    never a NIR file named .onnx."""
    target = str(target).lower()
    if target not in TARGETS:
        raise DeployError(f"unknown target {target!r} (choose from {', '.join(TARGETS)})")
    stem, suffix = os.path.splitext(path)
    if suffix.lower() != f".{target}":
        other = {".onnx": "onnx", ".nir": "nir"}.get(suffix.lower())
        hint = f", or --target {other}" if other else ""
        raise DeployError(f"--target {target} writes a .{target} file, but the output {path!r} is named "
                          f"{suffix or 'without a suffix'}: name it {stem}.{target}{hint}")
    return target


def partition(graph: Graph) -> Optional[Partition]:
    """`split_at_current_maxpool`, with the cut's worst-case bound (the device part's input range, which
    its integer widths are planned from) carried into the device part's meta."""
    split = split_at_current_maxpool(graph)
    if split is not None and graph.meta.get("quantized"):
        split.device.meta["cut_bound"] = channel_bounds(graph)[split.cut].tolist()
    return split


# what NIR has no node for: a product of two dynamic tensors (V2's attention)
NO_NIR_NODE = (KVProduct, QKVProduct)


def is_v2(graph: Graph) -> bool:
    return graph.meta.get("family") == "v2"


def nir_prefix(graph: Graph) -> Optional[NirPrefix]:
    """A V2 graph cut before its first attention product (`ir.partition.split_before`), the cut's
    worst-case bound carried into the host part's meta."""
    split = split_before(graph, NO_NIR_NODE)
    if split is not None and graph.meta.get("quantized"):
        split.host.meta["cut_bound"] = channel_bounds(graph)[split.cut].tolist()
    return split


def planned_outputs(graph: Graph, target: str, path: str, partition_mode: str) -> list[str]:
    if target == "nir" and partition_mode != "never" and is_v2(graph):
        return [path, host_path(path), partition_paths(path)[1]]
    if target == "nir" and partition_mode != "never" and split_at_current_maxpool(graph) is not None:
        return [path, *partition_paths(path)]
    return [path]


def export_graph(graph: Graph, target: str, path: str, onnx_variant: str = "int", nir_profile: str = "standard",
                 partition_mode: str = "auto", debug_outputs: bool = False, unroll: bool = False,
                 force: bool = False) -> ExportResult:
    if target not in TARGETS:
        raise DeployError(f"unknown target {target!r} (choose from {', '.join(TARGETS)})")
    if partition_mode not in ("auto", "never"):
        raise DeployError(f"partition must be 'auto' or 'never', got {partition_mode!r}")
    for p in planned_outputs(graph, target, path, partition_mode):
        check_output_path(p, force)
    if target == "onnx":
        from exporters.onnx import write_onnx

        write_onnx(graph, path, variant=onnx_variant, debug_outputs=debug_outputs, unroll=unroll)
        return ExportResult([path])
    from exporters.nir import write_nir

    if is_v2(graph):
        return export_v2_nir(graph, path, onnx_variant, nir_profile, partition_mode)
    split = partition(graph)
    if split is None:
        write_nir(graph, path, profile=nir_profile)
        return ExportResult([path])
    if partition_mode == "never":
        raise DeployError(f"{split.cut} max-pools real-valued currents, which NIR cannot compute exactly; "
                          "export with partitioning (the default) or use --target onnx")
    if not graph.meta.get("quantized"):
        raise DeployError(f"--no-quantize: {split.cut} max-pools real-valued currents, so the graph needs a "
                          "host stem, and the stem's ONNX export is made from the quantized graph; export "
                          "without --no-quantize (or a pooling_stat ending in 0 has no such pool)")
    from exporters.onnx import write_onnx

    stem_path, manifest_path = partition_paths(path)
    written = []
    try:                     # the three files are one artifact: a failure leaves none of them behind
        write_onnx(split.host, stem_path, variant=onnx_variant, debug_outputs=True)
        written.append(stem_path)
        write_nir(split.device, path, profile=nir_profile)
        written.append(path)
        manifest = partition_manifest(graph, split, os.path.basename(stem_path), os.path.basename(path),
                                      onnx_variant, nir_profile,
                                      {os.path.basename(p): sha256_of(p) for p in (stem_path, path)})
        write_text(manifest_path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    except BaseException:
        for p in written:
            with contextlib.suppress(OSError):
                os.remove(p)
        raise
    message = (f"{split.cut} max-pools real-valued currents: no exact NIR encoding exists, so the stem up to "
               f"it runs on the host ({os.path.basename(stem_path)}, ONNX) and the NIR graph "
               f"({os.path.basename(path)}) starts at the residual stream, fed by the stem's output "
               f"'{split.cut}'; {os.path.basename(manifest_path)} records the connection. "
               "(--no-partition refuses such a graph instead.)")
    return ExportResult([path, stem_path, manifest_path], message)


def partition_manifest(graph: Graph, split, stem_file: str, nir_file: str, onnx_variant: str, nir_profile: str,
                       checksums: dict) -> dict:
    cut = split.device.input
    return {
        "format": MANIFEST_FORMAT,
        "format_version": 1,
        "tool_version": __version__,
        "time_steps": int(graph.meta["time_steps"]),
        "config": graph.meta.get("config"),
        "quantization": settings_of(graph.meta),
        "provenance": graph.meta.get("provenance", {}),
        "host": {"file": stem_file, "format": "onnx", "variant": onnx_variant,
                 "input": graph.input.name, "output": "output_int" if onnx_variant == "int" else "output",
                 "runs": "one call per time step, LIF state carried in v_in./v_out. tensors"},
        "device": {"file": nir_file, "format": "nir", "profile": nir_profile, "input": cut.name,
                   "input_shape": list(cut.shape),
                   "input_grid": [int(g) for g in cut.grid] if cut.grid is not None else None},
        "connection": f"each step, the host's '{split.cut}' output (float32 values, or integers * 2**-grid "
                      f"in the int variant) is the NIR graph's input '{cut.name}'",
        "readout": ("mean over T of the NIR output, on the host" if graph.output.mode == "mean"
                    else "per-step NIR output (TET)"),
        "sha256": checksums,
    }


def export_v2_nir(graph: Graph, path: str, onnx_variant: str, nir_profile: str, partition_mode: str) -> ExportResult:
    """A V2 graph to NIR: its attention multiplies two dynamic tensors (kv = k^T v, q kv), which no NIR node
    computes, so nothing past the first block's attention can be NIR. The prefix -- the conv stages and
    the downsamplings up to the residual stream entering block3, every op of it exact in NIR (the
    depthwise convolutions as their dense equivalents) -- is the NIR graph; the rest, from block3 on, is
    an ONNX graph for the host (`<name>.host.onnx`), fed each step by the NIR graph's output (the stream
    at the cut); the manifest records which part runs where."""
    from exporters.nir import write_nir
    from exporters.onnx import write_onnx

    split = nir_prefix(graph)
    if partition_mode == "never" or split is None:
        raise DeployError("a V2 graph's attention multiplies two dynamic tensors (kv = k^T v, q kv), which no NIR "
                          "node computes: it exports to NIR only partitioned (the default), or use --target onnx")
    if not graph.meta.get("quantized"):
        raise DeployError("--no-quantize: a V2 NIR export is partitioned, and its host part is made from the "
                          "quantized graph; export without --no-quantize")
    if onnx_variant == "float" and max(split.host.meta["cut_bound"]) >= 2 ** 24:
        raise DeployError(f"{split.cut}: its values need more than float32's 24 bits, the float host part's input; "
                          "use the int variant")
    host = host_path(path)
    manifest_path = partition_paths(path)[1]
    write_nir(split.nir, path, profile=nir_profile)
    write_onnx(split.host, host, variant=onnx_variant, debug_outputs=True)
    nir_nodes = [n.name for n in split.nir.nodes]
    manifest = {
        "format": MANIFEST_FORMAT,
        "format_version": 1,
        "tool_version": __version__,
        "order": "nir-then-host",
        "time_steps": int(graph.meta["time_steps"]),
        "config": graph.meta.get("config"),
        "quantization": settings_of(graph.meta),
        "provenance": graph.meta.get("provenance", {}),
        "device": {"file": os.path.basename(path), "format": "nir", "profile": nir_profile,
                   "input": graph.input.name, "output": "output", "runs": "first, one step per input frame",
                   "layers": [nir_nodes[1], nir_nodes[-1]], "nodes": len(nir_nodes)},
        "host": {"file": os.path.basename(host), "format": "onnx", "variant": onnx_variant, "input": split.cut,
                 "input_shape": list(graph[split.cut].shape),
                 "input_grid": [int(g) for g in graph[split.cut].grid],
                 "output": "logits_int" if onnx_variant == "int" else "logits",
                 "runs": "second: one call per time step, LIF state carried in v_in./v_out. tensors",
                 "first_layer": split.host.nodes[1].name, "why": f"{split.first_host_node} multiplies two dynamic "
                 "tensors; no NIR node computes a product of two dynamic tensors"},
        "connection": f"each step, the NIR graph's output (the current '{split.cut}', exact float64 values on its "
                      f"grid) is the host part's input '{split.cut}'",
        "readout": "mean over T of the host's per-step logits (kd: of the mean of the two heads), on the host",
        "sha256": {os.path.basename(p): sha256_of(p) for p in (path, host)},
    }
    write_text(manifest_path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    message = (f"V2's attention multiplies two dynamic tensors ({split.first_host_node}), which no NIR node computes: "
               f"the NIR graph ({os.path.basename(path)}) holds everything up to '{split.cut}' (the conv stages; "
               f"depthwise convolutions as their dense equivalents), the host runs the rest from block3 on "
               f"({os.path.basename(host)}, ONNX); {os.path.basename(manifest_path)} records the connection.")
    return ExportResult([path, host, manifest_path], message)
