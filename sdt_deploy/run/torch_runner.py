"""Running the torch SDT on an input and collecting its spikes under the layer-name contract."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from spikingjelly.clock_driven import functional

from models import SDTConfig

Spikes = dict  # contract name -> uint8 array [T, B, ...]


# taps of a V2 model that are not spikes: the attention's integer products (int32) and the heads' outputs
INTEGER_TAPS = (".kv", ".qkv")
HEAD_OUTPUTS = ("head.out", "head_kd.out")


class _SpikeTaps(dict):
    """The model's spike records, made uint8 as they are recorded (0/1 values: lossless) -- so the float
    activations are not all kept alive until the end of the forward pass (measured: the float64 verify
    reference of CIFAR 2-256 at batch 16 peaked at 2.0 GB RSS, 1.6 GB of it recorded activations).
    A V2 model's integer products (`<block>.attn.kv`, `.qkv`, int32) and head outputs are not spikes:
    they go to `extra`, as recorded."""

    def __init__(self):
        super().__init__()
        self.extra: dict = {}

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        if name.endswith(INTEGER_TAPS) or name in HEAD_OUTPUTS:
            self.extra[name] = value.detach()
            return
        super().__setitem__(name, value.to(torch.uint8))


def run_model(model: torch.nn.Module, x: np.ndarray, batch_size: int = 64, device: Optional[str] = None,
              record: bool = True, progress=None, integers: bool = False) -> tuple[np.ndarray, Spikes]:
    """Logits and (if `record`) every spike tensor, state reset before each batch, eval mode.

    Spikes come back as uint8 [T, B, ...] keyed by layer name; logits as float32 ([B, K], or
    [T, B, K] with TET). `integers`: a V2 model's `kv` and `qkv` taps join them, int32."""
    model.eval()
    dev = torch.device(device) if device else next(model.parameters()).device
    logits, spikes = [], {}
    for start in range(0, x.shape[0], batch_size):
        xb = torch.from_numpy(np.ascontiguousarray(x[start:start + batch_size])).to(dev)
        taps: Optional[dict] = _SpikeTaps() if record else None
        functional.reset_net(model)
        with torch.no_grad():
            y = model(xb, taps)
        functional.reset_net(model)
        logits.append(y.float().cpu().numpy())
        if record:
            for k, v in taps.items():
                spikes.setdefault(k, []).append(v.to(torch.uint8).cpu().numpy())
            for k, v in taps.extra.items() if integers else ():
                if k.endswith(INTEGER_TAPS):
                    spikes.setdefault(k, []).append(v.cpu().numpy())
        if progress is not None:
            progress(xb.shape[0])
    batch_axis = 1 if (logits[0].ndim == 3) else 0
    out_logits = np.concatenate(logits, axis=batch_axis)
    return out_logits, {k: np.concatenate(v, axis=1) for k, v in spikes.items()}


def run_model_state(model: torch.nn.Module, x: np.ndarray, device: Optional[str] = None) -> tuple:
    """One batch through the model with everything a layer-by-layer comparison needs: (logits, spikes,
    membranes, per-step output). `membranes`: each LIF's membrane after the step's reset, [T, B, ...] in
    the model's dtype (spikingjelly keeps it as the neuron's `v_seq`), keyed by module path, which is the
    layer name; `per_step`: the head's output at every step [T, B, K], before the mean over T (V2 with
    kd: the mean of the two heads' outputs, (head + head_kd) / 2, at every step)."""
    from models import is_neuron

    model.eval()
    dev = torch.device(device) if device else next(model.parameters()).device
    xb = torch.from_numpy(np.ascontiguousarray(x)).to(dev)
    taps = _SpikeTaps()
    heads: list = []
    hook = model.head.register_forward_hook(lambda _m, _i, out: heads.append(out.detach()))
    functional.reset_net(model)
    try:
        with torch.no_grad():
            y = model(xb, taps)
        # in the layout of the neuron's recorded spikes (a V2 deployable model records [C, H, W] where its
        # neurons ran on [C, N]: the same neurons in the same order)
        membranes = {name: m.v_seq.detach().reshape(taps[name].shape).cpu().numpy()
                     for name, m in model.named_modules() if is_neuron(m) and name in taps}
    finally:
        hook.remove()
        functional.reset_net(model)
    spikes = {k: v.cpu().numpy() for k, v in taps.items()}
    per_step = heads[0]
    if "head_kd.out" in taps.extra:
        per_step = (taps.extra["head.out"] + taps.extra["head_kd.out"]) * 0.5
    return y.float().cpu().numpy(), spikes, membranes, per_step.cpu().numpy()


def predictions(logits: np.ndarray) -> np.ndarray:
    """Class per sample; TET's per-step logits are averaged over T first (as the original evaluates)."""
    if logits.ndim == 3:
        logits = logits.mean(0)
    return logits.argmax(-1)


def to_original_hooks(spikes: Spikes, cfg: SDTConfig) -> dict:
    """Our spike tensors under the original `forward(x, hook)` names and layouts.

    The original records k and v after the dvs_mode pool, `kv_before` = k AND v before its pool,
    `kv` = the talking-heads spikes as [T,B,heads,1,C/heads], `x_after_qkv` = the masked output
    after its pool, in the [T,B,heads,N,C/heads] layout."""
    h = cfg.num_heads

    def heads(a: np.ndarray) -> np.ndarray:
        T, B, C, H, W = a.shape
        return a.reshape(T, B, C, H * W).transpose(0, 1, 3, 2).reshape(T, B, H * W, h, C // h).transpose(0, 1, 3, 2, 4)

    out = {}
    for s in ("", "1", "2", "3"):
        out[f"MS_SPS_lif{s}"] = spikes[f"patch_embed.proj_lif{s}"]
    for j in range(cfg.depth):
        a = f"block.{j}.attn"
        out[f"MS_SSA_Conv{j}_first_lif"] = spikes[f"{a}.shortcut_lif"]
        out[f"MS_SSA_Conv{j}_q_lif"] = spikes[f"{a}.q_lif"]
        out[f"MS_SSA_Conv{j}_k_lif"] = spikes[f"{a}.k_pool" if cfg.dvs_mode else f"{a}.k_lif"]
        out[f"MS_SSA_Conv{j}_v_lif"] = spikes[f"{a}.v_pool" if cfg.dvs_mode else f"{a}.v_lif"]
        out[f"MS_SSA_Conv{j}_kv_before"] = heads(spikes[f"{a}.kv_and"])
        g = spikes[f"{a}.talking_heads_lif"]
        out[f"MS_SSA_Conv{j}_kv"] = g.reshape(g.shape[0], g.shape[1], h, 1, g.shape[2] // h)
        out[f"MS_SSA_Conv{j}_x_after_qkv"] = heads(spikes[f"{a}.q_mask_pool" if cfg.dvs_mode else f"{a}.q_mask"])
        out[f"MS_MLP_Conv{j}_fc1_lif"] = spikes[f"block.{j}.mlp.fc1_lif"]
        out[f"MS_MLP_Conv{j}_fc2_lif"] = spikes[f"block.{j}.mlp.fc2_lif"]
    out["head_lif"] = spikes["head_lif"]
    return out


class _StreamTaps(dict):
    """Spike records handed on as they are made (uint8 numpy [T, B, ...]) instead of kept: a verifier
    compares a layer and drops it while the model runs on. A neuron's membrane waits in `membranes` for
    its spike record and goes on just before it, in the record's layout (a V2 deployable model records
    [C, H, W] where its neurons ran on [C, N]: the same neurons in the same order). A V2 model's integer
    products and head outputs go to `extra`, as in `_SpikeTaps`."""

    def __init__(self, on_spikes, on_membranes=None):
        super().__init__()
        self.on_spikes, self.on_membranes = on_spikes, on_membranes
        self.extra: dict = {}
        self.membranes: dict = {}

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        if name.endswith(INTEGER_TAPS) or name in HEAD_OUTPUTS:
            self.extra[name] = value.detach()
            return
        spikes = value.to(torch.uint8).cpu().numpy()
        v = self.membranes.pop(name, None)
        if v is not None:
            self.on_membranes(name, v.reshape(spikes.shape))
        self.on_spikes(name, spikes)

    def flush(self) -> None:
        """The membranes of neurons with no spike record of their name, as they are."""
        for name, v in self.membranes.items():
            self.on_membranes(name, v)
        self.membranes.clear()


def run_model_stream(model: torch.nn.Module, x: np.ndarray, on_spikes, on_membranes=None,
                     per_step: bool = False, device: Optional[str] = None) -> tuple:
    """One batch through the model, every spike tensor handed to `on_spikes(layer, uint8 [T, B, ...])` and,
    with `on_membranes`, every LIF's membrane after the step's reset to `on_membranes(layer, [T, B, ...])`
    in the neuron's dtype (spikingjelly's `v_seq`), as each layer finishes; nothing is kept. Each neuron's
    `v_seq` is released as soon as it is read (spikingjelly holds every layer's until the reset: the
    largest part of a forward pass's memory). Returns (logits as `run_model` gives them, the head's
    output at every step [T, B, K] if `per_step`, else None)."""
    from models import is_neuron

    model.eval()
    dev = torch.device(device) if device else next(model.parameters()).device
    xb = torch.from_numpy(np.ascontiguousarray(x)).to(dev)
    heads: list = []
    hooks = []
    taps = _StreamTaps(on_spikes, on_membranes)

    def neuron_done(name):
        def hook(module, _inputs, _output):
            if on_membranes is not None:
                taps.membranes[name] = module.v_seq.detach().cpu().numpy()
            module.v_seq = None
        return hook

    for name, m in model.named_modules():
        if is_neuron(m):
            hooks.append(m.register_forward_hook(neuron_done(name)))
    if per_step:
        hooks.append(model.head.register_forward_hook(lambda _m, _i, out: heads.append(out.detach())))
    functional.reset_net(model)
    try:
        with torch.no_grad():
            y = model(xb, taps)
        taps.flush()
    finally:
        for h in hooks:
            h.remove()
        functional.reset_net(model)
    if not per_step:
        return y.float().cpu().numpy(), None
    out = heads[0]
    if "head_kd.out" in taps.extra:   # V2 with kd: the mean of the two heads at every step
        out = (taps.extra["head.out"] + taps.extra["head_kd.out"]) * 0.5
    return y.float().cpu().numpy(), out.cpu().numpy()
