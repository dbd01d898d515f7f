"""`sdt-deploy export`: a quantized (or BN-folded float) deploy graph to NIR or ONNX files.

NIR and the stem's real-valued max-pool: `patch_embed.maxpool3` pools currents, which no NIR primitive
computes exactly. Nothing is approximated. By default (`partition="auto"`) such a graph is cut right
after that pool (`sdt_deploy.partition`): the stem up to it is written as an ONNX graph for the host
(`<name>.stem.onnx`, with its own LIF state and its spikes as debug outputs), the rest — the residual
stream on, where every synaptic layer reads spikes — as the NIR graph (`<name>.nir`), and
`<name>.manifest.json` says how they connect (which output feeds which NIR input, on which grid, T, the
read-out, checksums). `partition="never"` refuses such a graph instead. Graphs without a current
max-pool (pooling_stat `xxx0`) go to NIR whole.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Optional

from sdt_deploy import __version__
from sdt_deploy.errors import DeployError
from sdt_deploy.ir.graph import Graph
from sdt_deploy.files.atomic import check_output_path, write_text
from sdt_deploy.ir.partition import split_at_current_maxpool

TARGETS = ("nir", "onnx")
MANIFEST_FORMAT = "sdt-deploy-partition"


@dataclass
class ExportResult:
    files: list = field(default_factory=list)
    message: Optional[str] = None      # what the user must know (e.g. the partition), one paragraph


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):   # a block at a time, not the whole file
            digest.update(block)
    return digest.hexdigest()


def partition_paths(path: str) -> tuple[str, str]:
    stem = path[:-4] if path.endswith(".nir") else path
    return stem + ".stem.onnx", stem + ".manifest.json"


def planned_outputs(graph: Graph, target: str, path: str, partition: str) -> list[str]:
    if target == "nir" and partition != "never" and split_at_current_maxpool(graph) is not None:
        return [path, *partition_paths(path)]
    return [path]


def export_graph(graph: Graph, target: str, path: str, onnx_variant: str = "int", nir_profile: str = "standard",
                 partition: str = "auto", debug_outputs: bool = False, unroll: bool = False,
                 force: bool = False) -> ExportResult:
    if target not in TARGETS:
        raise DeployError(f"unknown target {target!r} (choose from {', '.join(TARGETS)})")
    if partition not in ("auto", "never"):
        raise DeployError(f"partition must be 'auto' or 'never', got {partition!r}")
    for p in planned_outputs(graph, target, path, partition):
        check_output_path(p, force)
    if target == "onnx":
        from exporters.onnx import write_onnx

        write_onnx(graph, path, variant=onnx_variant, debug_outputs=debug_outputs, unroll=unroll)
        return ExportResult([path])
    from exporters.nir import write_nir

    split = split_at_current_maxpool(graph)
    if split is None:
        write_nir(graph, path, profile=nir_profile)
        return ExportResult([path])
    if partition == "never":
        raise DeployError(f"{split.cut} max-pools real-valued currents, which NIR cannot compute exactly; "
                          "export with partitioning (the default) or use --target onnx")
    if graph.meta.get("float_export"):
        raise DeployError(f"--no-quantize: {split.cut} max-pools real-valued currents, so the graph needs a "
                          "host stem, and the stem's ONNX export is made from the quantized graph; export "
                          "without --no-quantize (or a pooling_stat ending in 0 has no such pool)")
    from exporters.onnx import write_onnx

    stem_path, manifest_path = partition_paths(path)
    write_onnx(split.host, stem_path, variant=onnx_variant, debug_outputs=True)
    write_nir(split.device, path, profile=nir_profile)
    manifest = partition_manifest(graph, split, os.path.basename(stem_path), os.path.basename(path), onnx_variant,
                                  nir_profile, {os.path.basename(p): _sha256(p) for p in (stem_path, path)})
    write_text(manifest_path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
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


def export_artifact(q, kind: str, workdir: str) -> str:
    """Export what a verify executor runs (`onnx-int`, `onnx-float` with debug outputs, `nir`) into workdir."""
    graph = q.graph if not isinstance(q, Graph) else q
    if kind.startswith("onnx-"):
        path = os.path.join(workdir, f"model.{kind}.onnx")
        export_graph(graph, "onnx", path, onnx_variant=kind.split("-", 1)[1], debug_outputs=True, force=True)
        return path
    if kind == "nir":
        path = os.path.join(workdir, "model.nir")
        export_graph(graph, "nir", path, onnx_variant="float", force=True)
        return path
    raise DeployError(f"no artifact kind {kind!r}")


def read_manifest(nir_path: str) -> Optional[dict]:
    """The partition manifest beside a .nir file, if it was exported partitioned."""
    manifest = partition_paths(nir_path)[1]
    if not os.path.exists(manifest):
        return None
    try:
        with open(manifest, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError) as exc:
        raise DeployError(f"{manifest!r}: unreadable partition manifest ({type(exc).__name__})") from None
    if doc.get("format") != MANIFEST_FORMAT:
        raise DeployError(f"{manifest!r}: not an sdt-deploy partition manifest")
    folder = os.path.dirname(os.path.abspath(nir_path))
    doc["changed_since_export"] = []
    for name, digest in doc.get("sha256", {}).items():
        p = os.path.join(folder, name)
        if not os.path.exists(p):
            raise DeployError(f"{manifest!r} names {name}, which is missing")
        if _sha256(p) != digest:
            # not fatal: verify still runs the files and names the layer that computes differently
            doc["changed_since_export"].append(name)
    return doc
