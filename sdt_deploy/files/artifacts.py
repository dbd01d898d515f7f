"""The file formats the exporters write and the runtimes read: the names that both sides must agree on,
written once.

- ONNX: every SDT-specific fact is a `metadata_props` entry under the `sdt_deploy.` prefix; each LIF's
  membrane is the pair of graph tensors `v_in.<layer>` (before the step) and `v_out.<layer>` (after).
- A partitioned NIR export is three files beside each other: `<name>.nir` (the device part),
  `<name>.stem.onnx` (the host part) and `<name>.manifest.json`, which says how they connect and holds
  their sha256 checksums. A V2 export is cut the other way (`order`: "nir-then-host"): `<name>.nir` is the
  prefix NIR computes exactly, `<name>.host.onnx` the rest, from the first attention product on.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

from sdt_deploy.errors import DeployError

ONNX_META_PREFIX = "sdt_deploy."
STATE_IN = "v_in."
STATE_OUT = "v_out."
MANIFEST_FORMAT = "sdt-deploy-partition"


def sha256_of(path: str) -> str:
    """The file's sha256, read a block at a time (not the whole file at once)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def partition_paths(nir_path: str) -> tuple[str, str]:
    """(host stem, manifest) paths of a partitioned NIR export named `nir_path`."""
    stem = nir_path[:-4] if nir_path.endswith(".nir") else nir_path
    return stem + ".stem.onnx", stem + ".manifest.json"


def host_path(nir_path: str) -> str:
    """The host part of a V2 NIR export named `nir_path`: the graph after the NIR prefix, as ONNX."""
    stem = nir_path[:-4] if nir_path.endswith(".nir") else nir_path
    return stem + ".host.onnx"


def read_manifest(nir_path: str) -> Optional[dict]:
    """The partition manifest beside a .nir file (None where the export was not partitioned), each file it
    names checked: missing is an error; changed since the export is listed in `changed_since_export`
    (not fatal: a verifier still runs the files and names the layer that computes differently)."""
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
        if sha256_of(p) != digest:
            doc["changed_since_export"].append(name)
    return doc
