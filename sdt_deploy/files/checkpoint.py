"""Loading SDT checkpoints safely, in every layout users have them.

Layouts recognised:
- the original `train.py` output through timm's CheckpointSaver: a dict with `state_dict`
  (and optionally `state_dict_ema`, `optimizer`, `args` as an `argparse.Namespace`, `epoch`, `arch`,
  `version`, `metric`, `amp_scaler`);
- a bare state dict; a `module.`-prefixed (DistributedDataParallel) state dict, bare or inside the above;
- a quantized model written by `sdt-deploy quantize` (`format: sdt-deploy-quantized`): recognised here,
  read by `sdt_deploy.quant.qmodel.load_quantized`.

Checkpoints are untrusted pickles: `torch.load(weights_only=True)` with `argparse.Namespace` as the only
allowed global, so nothing in the file can run. A file asking for any other global is refused, naming it.
"""
from __future__ import annotations

import argparse
import os
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import torch

from models import SDTConfig, build_model
from sdt_deploy.errors import DeployError
from sdt_deploy.files.artifacts import sha256_of
from sdt_deploy.files.atomic import save_torch
from sdt_deploy.files.configs import Resolved, resolve

ALLOWED_GLOBALS = (argparse.Namespace,)
QUANTIZED_FORMAT = "sdt-deploy-quantized"


@dataclass
class Checkpoint:
    """What a checkpoint file holds, normalised."""

    path: str
    state_dict: dict
    layout: str                       # "timm", "bare", "quantized"
    args: Optional[dict] = None       # the original train.py args, as a plain dict
    ddp_prefix: bool = False
    ema: bool = False
    extra: dict = field(default_factory=dict)   # the quantized format's metadata
    sha256: str = ""                  # of the file's bytes: the provenance every export records


def _refused_global(message: str) -> Optional[str]:
    """The global a weights-only unpickler refused, from torch's message ("... GLOBAL posix.system ...")."""
    m = re.search(r"GLOBAL\s+([\w.]+)", message)
    return m.group(1) if m else None


def read_file(path: str) -> Any:
    """`torch.load(weights_only=True)` with the allow-list; every failure becomes one DeployError line."""
    if not os.path.exists(path):
        raise DeployError(f"checkpoint {path!r}: no such file")
    if os.path.isdir(path):
        raise DeployError(f"checkpoint {path!r}: is a directory, not a file")
    size = os.path.getsize(path)
    if size == 0:
        raise DeployError(f"checkpoint {path!r}: empty file (0 bytes)")
    try:
        with torch.serialization.safe_globals(list(ALLOWED_GLOBALS)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        name = _refused_global(str(exc))
        if name:
            raise DeployError(f"checkpoint {path!r}: refused, it asks for the pickled global {name} "
                              f"(only argparse.Namespace is allowed; nothing was executed)") from None
        raise DeployError(f"checkpoint {path!r}: not a PyTorch checkpoint (unpickling failed: "
                          f"{_first_line(exc)})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, KeyError,
            AttributeError, TypeError, IndexError, UnicodeDecodeError) as exc:
        text = _first_line(exc)
        if "zip archive" in text or "central directory" in text or isinstance(exc, EOFError):
            raise DeployError(f"checkpoint {path!r}: truncated or corrupt file ({size} bytes: {text})") from None
        raise DeployError(f"checkpoint {path!r}: not a readable PyTorch checkpoint ({text})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _strip_ddp(sd: Mapping[str, torch.Tensor]) -> tuple[dict, bool]:
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module."):]: v for k, v in sd.items()}, True
    return dict(sd), False


def _args_dict(args: Any) -> Optional[dict]:
    if args is None:
        return None
    if isinstance(args, argparse.Namespace):
        return vars(args)
    if isinstance(args, Mapping):
        return dict(args)
    return None


def normalise(obj: Any, path: str, ema: bool = False) -> Checkpoint:
    """Find the state dict (and the saved args) inside whatever `torch.load` returned."""
    if isinstance(obj, Mapping) and obj.get("format") == QUANTIZED_FORMAT:
        sd = obj.get("state_dict")
        if not _is_state_dict(sd):
            raise DeployError(f"checkpoint {path!r}: quantized file without a state dict")
        return Checkpoint(path, dict(sd), "quantized", args=None, extra=dict(obj))
    if _is_state_dict(obj):
        if ema:
            raise DeployError(f"checkpoint {path!r}: --ema given, but the file is a bare state dict without EMA "
                              "weights")
        sd, ddp = _strip_ddp(obj)
        return Checkpoint(path, sd, "bare", ddp_prefix=ddp)
    if isinstance(obj, Mapping) and "state_dict" in obj:
        key = "state_dict_ema" if ema else "state_dict"
        if key not in obj:
            raise DeployError(f"checkpoint {path!r}: --ema given, but the file has no 'state_dict_ema'")
        if not _is_state_dict(obj[key]):
            raise DeployError(f"checkpoint {path!r}: '{key}' is not a state dict of tensors")
        sd, ddp = _strip_ddp(obj[key])
        return Checkpoint(path, sd, "timm", args=_args_dict(obj.get("args")), ddp_prefix=ddp, ema=ema)
    if isinstance(obj, Mapping) and "model" in obj and _is_state_dict(obj["model"]):
        sd, ddp = _strip_ddp(obj["model"])
        return Checkpoint(path, sd, "bare", args=_args_dict(obj.get("args")), ddp_prefix=ddp)
    kind = type(obj).__name__
    raise DeployError(f"checkpoint {path!r}: no state dict found (a {kind} without 'state_dict')")


def load_checkpoint(path: str, ema: bool = False) -> Checkpoint:
    ck = normalise(read_file(path), path, ema=ema)
    ck.sha256 = sha256_of(path)
    return ck


def check_values(sd: Mapping[str, torch.Tensor], path: str) -> None:
    """NaN/Inf anywhere, or a negative BatchNorm variance, is refused with the key's name."""
    for key, t in sd.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = "NaN" if bool(torch.isnan(t).any()) else "Inf"
            raise DeployError(f"checkpoint {path!r}: {key} contains {bad} values")
        if key.endswith("running_var") and bool((t < 0).any()):
            raise DeployError(f"checkpoint {path!r}: {key} has a negative running variance ({float(t.min()):.4g})")


def check_compatible(model: torch.nn.Module, sd: Mapping[str, torch.Tensor], path: str) -> None:
    """Name the first key that differs between the model the configuration builds and the file."""
    expected = model.state_dict()
    if "patch_embed.proj_conv.weight" not in sd or "head.weight" not in sd:
        first = next(iter(sd), "?")
        raise DeployError(f"checkpoint {path!r}: not a Spike-Driven Transformer state dict "
                          f"(no patch_embed.proj_conv.weight / head.weight; first key is {first!r})")
    for key, t in expected.items():
        if key not in sd:
            raise DeployError(f"checkpoint {path!r}: missing key {key} (expected shape {tuple(t.shape)}) "
                              "for the resolved configuration")
        if tuple(sd[key].shape) != tuple(t.shape):
            raise DeployError(f"checkpoint {path!r}: {key} has shape {tuple(sd[key].shape)}, "
                              f"the resolved configuration expects {tuple(t.shape)}")
    for key in sd:
        if key not in expected:
            raise DeployError(f"checkpoint {path!r}: unexpected key {key} (shape {tuple(sd[key].shape)}) "
                              "for the resolved configuration")


@dataclass
class LoadedModel:
    """A float SDT as its checkpoint describes it: the torch model, the resolved configuration (with the
    source of every value) and the file it came from."""

    model: torch.nn.Module
    resolved: Resolved
    checkpoint: Checkpoint

    @property
    def config(self) -> SDTConfig:
        return self.resolved.config

    @property
    def data(self):
        return self.resolved.data


def float_model(ck: Checkpoint, flags: Optional[Mapping[str, Any]] = None, config: Optional[str] = None) -> LoadedModel:
    """The SDT a (float) checkpoint describes, loaded strictly (eval mode, CPU)."""
    path = ck.path
    resolved = resolve(flags=flags, yaml_path=config, ckpt_args=ck.args, state_dict=ck.state_dict)
    check_values(ck.state_dict, path)
    # built on the meta device and given the checkpoint's own tensors (assign): no random initialisation
    # of weights about to be replaced, and one copy of them in memory, not two (SDT-8-768: 0.3 s, 254 MB)
    with torch.device("meta"):
        model = build_model(resolved.config)
    check_compatible(model, ck.state_dict, path)
    model.load_state_dict(_float32(ck.state_dict), strict=True, assign=True)
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise DeployError(f"{path}: internal: {left[0]} was not loaded")
    return LoadedModel(model.eval(), resolved, ck)


def _float32(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """Floating tensors as float32, the model's dtype (what load_state_dict's copy would have cast to);
    no copy where they already are."""
    return {k: v.float() if torch.is_floating_point(v) else v for k, v in state_dict.items()}


def model_from_config(flags: Optional[Mapping[str, Any]] = None, config: Optional[str] = None) -> LoadedModel:
    """A randomly initialised SDT for a configuration alone (for `inspect --config`)."""
    resolved = resolve(flags=flags, yaml_path=config)
    model = build_model(resolved.config)
    return LoadedModel(model, resolved, Checkpoint(path="", state_dict={}, layout="none"))


def save_original_format(path: str, model: torch.nn.Module, args: argparse.Namespace, epoch: int = 0,
                         metric: float = 0.0, optimizer: Optional[dict] = None) -> None:
    """Write a checkpoint the way the original train.py (timm CheckpointSaver) does."""
    payload = {"epoch": epoch, "arch": "sdt", "state_dict": model.state_dict(), "version": 2,
               "args": args, "metric": metric}
    if optimizer is not None:
        payload["optimizer"] = optimizer
    save_torch(path, payload)
