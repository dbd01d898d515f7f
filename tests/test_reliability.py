"""Hostile and broken inputs beyond the checkpoint file: fuzzed models and inputs through export and
verify (always exact or one clear error, never a crash), refusal instead of overflow."""
import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdt_deploy import quantize
from sdt_deploy.data.datasets import ArrayDataset
from sdt_deploy.data.synth import random_inputs, random_model
from sdt_deploy.errors import DeployError
from sdt_deploy.verification.verifier import run_verify

from conftest import case_path, loaded, small_configs

EXECUTORS = ["torch", "engine", "onnx-int", "onnx-float", "nir"]


# the refusals a correct toolchain may give for a valid model: an integer that no available width holds
ALLOWED_REFUSAL = re.compile(r"^\S+: (the )?worst-case .* (exceeds the engine's int64|does not fit)")


def _inputs(cfg, kind: str, seed: int) -> np.ndarray:
    x = random_inputs(cfg, 2, seed=seed, events=cfg.dvs_mode)
    if kind == "zeros":
        return np.zeros_like(x)
    if kind == "huge":                 # far outside the input grid: saturates, must still be exact
        return (x * 1e4).astype(np.float32)
    if kind == "tiny":                 # below half a grid step: rounds to zero
        return (x * 1e-6).astype(np.float32)
    return x


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(small_configs(), st.integers(0, 2 ** 16), st.sampled_from(["normal", "zeros", "huge", "tiny"]),
       st.sampled_from([8, 5, 2]))
def test_fuzz_export_then_verify_is_exact_or_a_clear_error(cfg, seed, kind, bits):
    model = random_model(cfg, seed=seed, calibration=4)
    x = _inputs(cfg, kind, seed + 1)
    try:
        res = run_verify(quantize(model, weight_bits=bits), ArrayDataset(x), EXECUTORS)
    except DeployError as exc:
        # allowed: a refusal to risk an overflow, in one line naming the layer; nothing else
        assert "\n" not in str(exc) and ALLOWED_REFUSAL.search(str(exc)), str(exc)
        return
    assert res.ok, res.tally.first


def test_overflowing_weights_are_refused_naming_the_layer():
    """A BatchNorm scale of 1e30 makes integers no int64 holds: refused at quantization, by name. fc2's
    weights stay int8 integers on a grid of about 2**100 (the scale moves into the exponent); the overflow
    happens where that branch meets the residual stream's fine grid: the add."""
    lm = loaded(case_path("lif_0011"))
    import copy

    model = copy.deepcopy(lm.model)
    with torch.no_grad():
        model.block[0].mlp.fc2_bn.weight.mul_(1e30)
    with pytest.raises(DeployError, match=r"^block\.0\.mlp\.add: worst-case integer magnitude 2\*\*\d+\.\d "
                                          r"exceeds the engine's int64"):
        quantize(model)
