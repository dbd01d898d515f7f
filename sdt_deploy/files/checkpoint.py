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
Files of other formats given as a checkpoint (ONNX, NIR/HDF5, .npy/.npz, safetensors, TorchScript, other
zip archives) are recognised by their first bytes before torch sees them and named. No message passes on
torch's advice to load with `weights_only=False` (which would run whatever the pickle asks for).
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import pickletools
import re
import struct
import warnings
import zipfile
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import torch

from models import SDTConfig, build_model, build_v2_model, is_v2_state_dict
from sdt_deploy.errors import DeployError, without_unsafe_advice
from sdt_deploy.files.artifacts import sha256_of
from sdt_deploy.files.atomic import save_torch
from sdt_deploy.files.configs import Resolved, is_v2_name, resolve, resolve_v2

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


HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
# the first field of an ONNX ModelProto as onnx writes it: ir_version (field 1, varint), then one of
# producer_name, producer_version, domain, model_version, doc_string, graph, opset_import, metadata_props
_ONNX_NEXT_TAGS = {0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42, 0x72}
_NOT_CKPT = "not a PyTorch checkpoint"
_EXPORT_HINT = "an export: check it against its checkpoint with `sdt-deploy verify CKPT --artifact {name}`"


def _varint(data: bytes, pos: int) -> tuple[Optional[int], int]:
    value = shift = 0
    while pos < len(data) and shift < 64:
        b = data[pos]
        value |= (b & 0x7F) << shift
        pos += 1
        if not b & 0x80:
            return value, pos
        shift += 7
    return None, pos


def _onnx(path: str, head: bytes) -> Optional[str]:
    if not head or head[0] != 0x08:
        return None
    ir_version, pos = _varint(head, 1)
    if ir_version is None or not 1 <= ir_version <= 100 or pos >= len(head) or head[pos] not in _ONNX_NEXT_TAGS:
        return None
    try:   # the first bytes fit; the whole file must parse as a model too
        import onnx

        model = onnx.load(path, load_external_data=False)
    except Exception:  # noqa: BLE001 - not ONNX after all: torch will say what it is not
        return None
    if not (len(model.graph.node) or len(model.opset_import)):
        return None
    producer = " ".join(p for p in (model.producer_name, model.producer_version) if p)
    return f"an ONNX model (ir_version {model.ir_version}{', from ' + producer if producer else ''})"


def _hdf5(path: str) -> str:
    """A NIR graph (nir.write's layout: /node/type = "NIRGraph"), or some other HDF5 file."""
    try:
        import h5py

        with h5py.File(path, "r") as h:
            node = h.get("node")
            kind = node.get("type") if isinstance(node, h5py.Group) else None
            if isinstance(kind, h5py.Dataset) and kind[()] in (b"NIRGraph", "NIRGraph"):
                return "a NIR graph (HDF5)"
    except Exception:  # noqa: BLE001 - h5py fails in many ways on a damaged file: then it is "an HDF5 file"
        pass
    return "an HDF5 file"


def _zip(path: str) -> Optional[str]:
    """None for a torch archive (and an unreadable zip, which torch reports as truncated or corrupt)."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return None
    if any(n.endswith("/constants.pkl") for n in names):
        return ("a TorchScript archive (torch.jit.save), not a checkpoint of weights: save the model's "
                "state_dict() with torch.save to use it")
    if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        return None
    if names and all(n.endswith(".npy") for n in names):
        arrays = [n[:-4] for n in names]
        shown = ", ".join(arrays[:4]) + (", ..." if len(arrays) > 4 else "")
        return f"a NumPy .npz archive ({len(arrays)} array{'s' if len(arrays) != 1 else ''}: {shown}), {_NOT_CKPT}"
    if not names:
        return f"an empty zip archive, {_NOT_CKPT}"
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    return f"a zip archive without a PyTorch checkpoint's data.pkl (it holds {shown}), {_NOT_CKPT}"


def _safetensors(f, head: bytes, size: int) -> Optional[str]:
    """8 bytes of little-endian header length, then that many bytes of JSON (a dict of tensors)."""
    if len(head) < 9 or head[8:9] != b"{":
        return None
    (n,) = struct.unpack("<Q", head[:8])
    if not 2 <= n <= min(size - 8, 100 << 20):
        return None
    f.seek(8)
    try:
        header = json.loads(f.read(n).decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(header, dict):
        return None
    tensors = len([k for k in header if k != "__metadata__"])
    return (f"a safetensors file ({tensors} tensor{'s' if tensors != 1 else ''}), {_NOT_CKPT} (to use it: "
            "torch.save(safetensors.torch.load_file(FILE), 'model.pth'))")


def foreign_format(path: str) -> Optional[str]:
    """What a file that is not a PyTorch checkpoint is, from its first bytes ("an ONNX model ..."), or None
    for a file torch.load should read (a torch archive, a legacy pickle, or something unknown)."""
    name = os.path.basename(path)
    try:
        with open(path, "rb") as f:
            head = f.read(2056)
            size = os.fstat(f.fileno()).st_size
            if any(head[o:o + 8] == HDF5_MAGIC for o in (0, 512, 1024, 2048)):
                what = _hdf5(path)
                nir_graph = what.startswith("a NIR")
                hint = _EXPORT_HINT.format(name=name) if nir_graph else "sdt-deploy reads the files torch.save writes"
                return f"{what}, {_NOT_CKPT} ({hint})"
            if head.startswith(ZIP_MAGICS):
                return _zip(path)
            if head.startswith(NPY_MAGIC):
                return f"a NumPy .npy array, {_NOT_CKPT} (arrays are inputs: --input)"
            what = _onnx(path, head)
            if what:
                return f"{what}, {_NOT_CKPT} ({_EXPORT_HINT.format(name=name)})"
            return _safetensors(f, head, size)
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else type(exc).__name__
        raise DeployError(f"checkpoint {path!r}: cannot read it ({reason})") from None


def _is_allowed_global(name: str) -> bool:
    """Whether torch's weights-only unpickler accepts the global `name` (its defaults, the safe_globals in
    force) or we do."""
    if name in {f"{g.__module__}.{g.__qualname__}" for g in ALLOWED_GLOBALS}:
        return True
    try:
        from torch._weights_only_unpickler import _get_allowed_globals

        if name in _get_allowed_globals():
            return True
    except Exception:  # noqa: BLE001 - a private function: without it, torch's own globals count as allowed
        if name.startswith("torch.") or name == "collections.OrderedDict":
            return True
    try:
        safe = [g[0] if isinstance(g, tuple) else g for g in torch.serialization.get_safe_globals()]
    except Exception:  # noqa: BLE001
        safe = []
    return name in {f"{getattr(g, '__module__', '')}.{getattr(g, '__qualname__', '')}" for g in safe}


_STRING_OPS = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8"}


def _pickled_globals(stream, limit: int = 1_000_000) -> list:
    """The globals a pickle asks for, read from its opcodes (pickletools: nothing is executed)."""
    found, memo, stack = [], {}, []
    for i, (op, arg, _pos) in enumerate(pickletools.genops(stream)):
        name = op.name
        if i >= limit or name == "STOP":
            break
        if name in ("GLOBAL", "INST"):
            found.append(str(arg).replace(" ", "."))
            stack.append(None)
        elif name == "STACK_GLOBAL":
            module, attr = (stack[-2:] if len(stack) >= 2 else [None, None])
            if isinstance(module, str) and isinstance(attr, str):
                found.append(f"{module}.{attr}")
            stack.append(None)
        elif name in _STRING_OPS:
            stack.append(arg if isinstance(arg, str) else None)
        elif name == "MEMOIZE":
            memo[len(memo)] = stack[-1] if stack else None
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = stack[-1] if stack else None
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            stack.append(memo.get(arg))
        elif op.stack_after:
            stack.append(None)
        del stack[:-64]
    return found


def _foreign_global(path: str) -> Optional[str]:
    """The first global the file's pickle asks for that the weights-only load does not allow, for a refusal
    torch did not explain by name (a pickle protocol its unpickler does not read, say)."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                member = next((n for n in z.namelist() if n == "data.pkl" or n.endswith("/data.pkl")), None)
                if member is None:
                    return None
                with z.open(member) as f:
                    names = _pickled_globals(f)
        else:
            with open(path, "rb") as f:
                names = _pickled_globals(f)
    except Exception:  # noqa: BLE001 - a damaged pickle: nothing to name
        return None
    return next((name for name in names if not _is_allowed_global(name)), None)


def _torch_reason(exc: BaseException) -> str:
    """What torch.load's exception says went wrong, on one line, without torch's wrapping: never its
    advice to load with weights_only=False."""
    text = str(exc)
    m = re.search(r"WeightsUnpickler error:(.*)", text, re.S)
    if m and m.group(1).strip():
        text = m.group(1)
    else:
        for wrapper in ("Weights only load failed.", getattr(torch.serialization, "UNSAFE_MESSAGE", "\0")):
            text = text.replace(wrapper, "")
    text = re.split(r"Check the documentation of torch\.load|Please file an issue", text)[0]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = without_unsafe_advice(lines[0] if lines else "")
    line = re.sub(r"\s*Please use `?torch\.serialization.*$", "", line).rstrip(" .")
    return (line or type(exc).__name__)[:200]


def read_file(path: str) -> Any:
    """`torch.load(weights_only=True)` with the allow-list; every failure becomes one DeployError line."""
    if not os.path.exists(path):
        raise DeployError(f"checkpoint {path!r}: no such file")
    if os.path.isdir(path):
        raise DeployError(f"checkpoint {path!r}: is a directory, not a file")
    size = os.path.getsize(path)
    if size == 0:
        raise DeployError(f"checkpoint {path!r}: empty file (0 bytes)")
    what = foreign_format(path)
    if what:
        raise DeployError(f"checkpoint {path!r}: {what}")
    try:
        with torch.serialization.safe_globals(list(ALLOWED_GLOBALS)), warnings.catch_warnings():
            # torch warns (a second stderr line) about pickle protocols and TorchScript before refusing
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        name = _refused_global(str(exc)) or _foreign_global(path)
        if name:
            raise DeployError(f"checkpoint {path!r}: refused, it asks for the pickled global {name} "
                              f"(only argparse.Namespace is allowed; nothing was executed)") from None
        raise DeployError(f"checkpoint {path!r}: not a PyTorch checkpoint (unpickling failed: "
                          f"{_torch_reason(exc)})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, KeyError,
            AttributeError, TypeError, IndexError, UnicodeDecodeError) as exc:
        text = _torch_reason(exc)
        if "zip archive" in text or "central directory" in text or isinstance(exc, EOFError):
            raise DeployError(f"checkpoint {path!r}: truncated or corrupt file ({size} bytes: {text})") from None
        raise DeployError(f"checkpoint {path!r}: not a readable PyTorch checkpoint ({text})") from None


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
    """The SDT a (float) checkpoint describes, loaded strictly (eval mode, CPU): V1, or a V2
    Meta-SpikeFormer where the state dict is one (`models.is_v2_state_dict`)."""
    path = ck.path
    if is_v2_state_dict(ck.state_dict):
        return _v2_float_model(ck, flags, config)
    if (flags or {}).get("kd") is not None:
        raise DeployError("--kd is a V2 setting (the distilled Meta-SpikeFormer); V1 has no second head")
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


def _v2_float_model(ck: Checkpoint, flags: Optional[Mapping[str, Any]], config: Optional[str]) -> LoadedModel:
    """A V2 checkpoint (the original `save_model` layout: `model`, `args` an argparse.Namespace from
    `main_finetune.get_args_parser()`): shapes from the state dict, T and the input size from the args."""
    if config:
        raise DeployError(f"--config {config!r}: a V2 checkpoint's configuration comes from its state dict and "
                          "args; give flags (-T, --img-size, --num-heads) to change what they do not fix")
    resolved = resolve_v2(flags=flags, ckpt_args=ck.args, state_dict=ck.state_dict)
    check_values(ck.state_dict, ck.path)
    with torch.device("meta"):
        model = build_v2_model(resolved.config)
    expected = model.state_dict()
    for key, t in expected.items():
        if key not in ck.state_dict:
            raise DeployError(f"checkpoint {ck.path!r}: missing key {key} (expected shape {tuple(t.shape)})")
        if tuple(ck.state_dict[key].shape) != tuple(t.shape):
            raise DeployError(f"checkpoint {ck.path!r}: {key} has shape {tuple(ck.state_dict[key].shape)}, the "
                              f"resolved configuration expects {tuple(t.shape)}")
    extra = [k for k in ck.state_dict if k not in expected]
    if extra:
        raise DeployError(f"checkpoint {ck.path!r}: unexpected key {extra[0]} for a V2 Meta-SpikeFormer")
    model.load_state_dict(_float32(ck.state_dict), strict=True, assign=True)
    model.T = resolved.config.time_steps
    # every tap in the deploy graph's [C, H, W] layout, as the quantized model's (`run --dump` writes the
    # original's layout back)
    return LoadedModel(model.eval().record_taps_as_grids(), resolved, ck)


def _float32(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """Floating tensors as float32, the model's dtype (what load_state_dict's copy would have cast to);
    no copy where they already are."""
    return {k: v.float() if torch.is_floating_point(v) else v for k, v in state_dict.items()}


def model_from_config(flags: Optional[Mapping[str, Any]] = None, config: Optional[str] = None) -> LoadedModel:
    """A randomly initialised SDT for a configuration alone (for `inspect --config`); `v2/...` names a V2
    Meta-SpikeFormer (`--kd` for its distilled form)."""
    if is_v2_name(config):
        resolved = resolve_v2(flags=flags, named=config)
        return LoadedModel(build_v2_model(resolved.config).record_taps_as_grids(), resolved,
                           Checkpoint(path="", state_dict={}, layout="none"))
    if (flags or {}).get("kd") is not None:
        raise DeployError("--kd is a V2 setting (the distilled Meta-SpikeFormer); V1 has no second head")
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


def save_v2_original_format(path: str, model: torch.nn.Module, args: argparse.Namespace, epoch: int = 0,
                            optimizer: Optional[dict] = None) -> None:
    """Write a V2 checkpoint the way the original `util/misc.py save_model` does: `model`, `optimizer`,
    `epoch`, `scaler` (empty without CUDA), `args`."""
    save_torch(path, {"model": model.state_dict(), "optimizer": optimizer or {}, "epoch": epoch, "scaler": {},
                      "args": args})
