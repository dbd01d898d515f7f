"""What an exported file says about where it came from, and the reference `verify` builds from that.

Every artifact records the sha256 of the checkpoint it was exported from, the resolved SDT
configuration, every quantization setting and the tool version (ONNX: `sdt_deploy.*` metadata; NIR:
the graph's metadata; a partition's manifest too). `verify --artifact` therefore needs none of the
export's flags: it quantizes the checkpoint with the artifact's settings. A flag that contradicts the
artifact, an artifact of another checkpoint, or two artifacts that disagree are refused in one line.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Optional

from sdt_deploy.errors import DeployError
from sdt_deploy.files.artifacts import ONNX_META_PREFIX, sha256_of

# the quantization settings a user gives as flags, with the tool's defaults
QUANT_FLAGS = {"weight_bits": 8, "input_bits": 8, "scale_search": "mse", "input_range": None, "reparam": None}


@dataclass(frozen=True)
class Artifact:
    """An exported file as `verify` runs it."""

    path: str
    kind: str                          # the executor: "onnx-int", "onnx-float", "nir"
    sha256: str
    config: dict                       # the SDT configuration it was exported for
    quantization: dict                 # weight_bits, input_bits, scale_search, input_range, ...
    checkpoint: dict = field(default_factory=dict)   # {"checkpoint": file name, "checkpoint_sha256": ...}
    details: dict = field(default_factory=dict)      # ONNX: unrolled, debug outputs; NIR: profile

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


def _json(text, default=None):
    try:
        return json.loads(text) if isinstance(text, (str, bytes)) else default
    except ValueError:
        return default


def read_onnx_artifact(path: str) -> Artifact:
    import onnx

    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - an unreadable artifact is one message
        raise DeployError(f"--artifact {path!r}: not a readable ONNX file ({type(exc).__name__})") from None
    meta = {e.key[len(ONNX_META_PREFIX):]: e.value for e in model.metadata_props
            if e.key.startswith(ONNX_META_PREFIX)}
    variant = meta.get("variant")
    if variant not in ("int", "float"):
        raise DeployError(f"--artifact {path!r}: not an sdt-deploy ONNX export (no variant in its metadata)")
    if meta.get("partition") == "host":
        raise DeployError(f"--artifact {path!r}: a partition's host stem; pass the .nir file (its manifest names "
                          "the stem)")
    details = {"unrolled": _json(meta.get("unrolled"), False), "debug_outputs": bool(_json(meta.get("spikes"), []))}
    if details["unrolled"] and not details["debug_outputs"]:
        raise DeployError(f"--artifact {path!r}: an unrolled export without debug outputs exposes no layer to "
                          "compare (no LIF state, no spikes); export the step model (the default) or add "
                          "--debug-outputs")
    quantization = _json(meta.get("quantization"), {}) or {}
    return Artifact(path, f"onnx-{variant}", sha256_of(path), _json(meta.get("config"), {}) or {},
                    {**quantization, "time_steps": int(meta.get("time_steps", 0) or 0)},
                    _json(meta.get("provenance"), {}) or {}, details)


def read_nir_artifact(path: str) -> Artifact:
    from sdt_deploy.run.nir_artifact import open_nir_artifact

    graph = open_nir_artifact(path).graph
    meta = graph.metadata if isinstance(graph.metadata, dict) else {}
    quantization = _json(meta.get("sdt_quantization"), None)
    if quantization is None:      # an export from before the quantization key: its graph meta has them
        graph_meta = _json(meta.get("sdt_graph_meta"), {}) or {}
        quantization = {k: graph_meta.get(k) for k in QUANT_FLAGS if k != "reparam"}
    return Artifact(path, "nir", sha256_of(path), _json(meta.get("sdt_config"), {}) or {},
                    {**quantization, "time_steps": int(meta.get("time_steps", 0) or 0)},
                    _json(meta.get("sdt_provenance"), {}) or {}, {"profile": str(meta.get("profile", ""))})


def read_artifact(path: str) -> Artifact:
    if not os.path.exists(path):
        raise DeployError(f"--artifact {path!r}: no such file")
    if path.endswith(".onnx"):
        return read_onnx_artifact(path)
    if path.endswith(".nir"):
        return read_nir_artifact(path)
    raise DeployError(f"--artifact {path!r}: expected a .onnx or .nir file")


def artifacts_by_kind(artifacts: list) -> dict:
    """{executor: Artifact}; two files for one executor are refused."""
    out: dict = {}
    for a in artifacts:
        if a.kind in out:
            raise DeployError(f"--artifact {out[a.kind].path!r} and {a.path!r} are both run by {a.kind}; give one")
        out[a.kind] = a
    return out


def _first_difference(a: dict, b: dict) -> Optional[str]:
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            return key
    return None


def quantization_for(artifacts: list, flags: dict) -> dict:
    """The quantization settings the reference is built with: the artifacts' (which must agree), a flag
    only where it says the same, the tool's defaults where there are no artifacts.

    `flags`: {setting: value given on the command line, or None}."""
    settings: dict = {}
    source: dict = {}
    for a in artifacts:
        for key in QUANT_FLAGS:
            if key not in a.quantization:
                continue
            value = a.quantization[key]
            if key in settings and settings[key] != value:
                raise DeployError(f"{source[key]} and {a.name} were exported with different {key} "
                                  f"({settings[key]!r} and {value!r}); verify them separately")
            settings[key], source[key] = value, a.name
    for key, value in flags.items():
        if value is None:
            continue
        if key in settings and settings[key] != value:
            option = "--" + key.replace("_", "-")
            raise DeployError(f"{option} {value!r} contradicts {source[key]}, which was exported with {key} "
                              f"{settings[key]!r}; drop the flag (verify takes the artifact's settings)")
        settings[key] = value
    return {key: settings.get(key, default) for key, default in QUANT_FLAGS.items()}


def check_origin(artifacts: list, checkpoint_sha256: Optional[str], checkpoint_name: str,
                 config: dict) -> dict:
    """Refuse an artifact exported from another checkpoint (naming both hashes and the first configuration
    field that differs); return the configuration fields the artifacts were exported with that differ
    from `config` (the checkpoint's own resolution): the export's flags (e.g. -T), to apply again."""
    overrides: dict = {}
    for a in artifacts:
        theirs = a.checkpoint.get("checkpoint_sha256")
        if theirs and checkpoint_sha256 and theirs != checkpoint_sha256:
            field_ = _first_difference(a.config, config)
            what = (f"; first configuration field that differs: {field_} ({a.config.get(field_)!r} there, "
                    f"{config.get(field_)!r} here)") if field_ else "; their configurations agree"
            raise DeployError(f"{a.name} was exported from another checkpoint: {a.checkpoint.get('checkpoint')} "
                              f"(sha256 {theirs}), not {checkpoint_name} (sha256 {checkpoint_sha256}){what}")
        for key, value in a.config.items():
            if key in config and config[key] != value:
                if key in overrides and overrides[key] != value:
                    raise DeployError(f"the artifacts were exported with different {key} ({overrides[key]!r} and "
                                      f"{value!r}); verify them separately")
                overrides[key] = value
    return overrides


def open_for_artifacts(path: str, flags: dict, config: Optional[str], ema: bool, artifacts: list):
    """The model `verify` builds its reference from: the checkpoint at `path`, resolved as the artifacts
    were exported (their configuration overrides, e.g. `-T`, applied again), refused where an artifact
    comes from another checkpoint or a flag contradicts it. A quantized file fixes its configuration and
    settings: it is refused where they differ from the artifacts'."""
    from models import is_v2_state_dict
    from sdt_deploy.files.checkpoint import float_model, load_checkpoint
    from sdt_deploy.files.configs import resolve, resolve_v2
    from sdt_deploy.quant.contract import settings_of
    from sdt_deploy.quant.qmodel import load_quantized

    ck = load_checkpoint(path, ema=ema)
    name = os.path.basename(path)
    if ck.layout == "quantized":
        q = load_quantized(ck, flags=flags)
        origin = (q.graph.meta.get("provenance") or {}).get("checkpoint_sha256") or ck.sha256
        overrides = check_origin(artifacts, origin, name, q.config.to_dict())
        if overrides:
            key = next(iter(overrides))
            raise DeployError(f"{name} is a quantized file with {key} {q.config.to_dict()[key]!r}; the artifacts "
                              f"were exported with {overrides[key]!r}")
        mine = settings_of(q.graph.meta)
        for a in artifacts:
            for key in QUANT_FLAGS:
                theirs = a.quantization.get(key, False if key == "reparam" else None)
                if (key in a.quantization or key == "reparam") and theirs != mine.get(key, False if key == "reparam"
                                                                                       else None):
                    raise DeployError(f"{name} was quantized with {key} {mine.get(key, False)!r}, {a.name} exported "
                                      f"with {theirs!r}")
        return q
    if is_v2_state_dict(ck.state_dict):      # V2: shapes from the state dict, T and size from the args
        resolved = resolve_v2(flags=flags, ckpt_args=ck.args, state_dict=ck.state_dict)
    else:
        resolved = resolve(flags=flags, yaml_path=config, ckpt_args=ck.args, state_dict=ck.state_dict)
    overrides = check_origin(artifacts, ck.sha256, name, resolved.config.to_dict())
    for key, value in overrides.items():
        if key in flags and flags[key] != value:
            raise DeployError(f"--{key.replace('_', '-')} {flags[key]!r} contradicts the artifacts, exported with "
                              f"{key} {value!r}")
    return float_model(ck, flags={**flags, **overrides}, config=config)
