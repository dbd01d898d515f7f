"""Shared test data.

- `../shared/fixtures` (beside the checkout): the checkpoint and spikes written by the original SDT
  code; tests using it skip, saying so, where that folder is absent.
- `tests/data/oracle`: small variant checkpoints in the original format (lif, plif, dvs_mode, TET,
  T = 1..16, several pooling_stat, mlp_ratio 1, odd sizes) and the spikes and logits the ORIGINAL SDT code
  (BICLab commit 3faa822, spikingjelly 0.0.0.0.12, torch 2.13 CPU) computed for their inputs, keyed by
  the original hook names. See tests/data/oracle/README.md.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SDT_DEPLOY_SHARED", ROOT.parent / "shared"))
FIXTURES = SHARED / "fixtures"
FIXTURE_CKPT = FIXTURES / "sdt_cifar_2_256.pth"
FIXTURE_INPUT = FIXTURES / "sdt_cifar_2_256_input.npy"
FIXTURE_REF = FIXTURES / "sdt_cifar_2_256_ref.npz"
ORACLE = ROOT / "tests" / "data" / "oracle"
ORACLE_CASES = sorted(p.stem for p in ORACLE.glob("*.pth"))
DEMO_CKPT = ROOT / "sdt_deploy" / "assets" / "demo_sdt_digits.pth"

needs_shared = pytest.mark.skipif(not FIXTURE_CKPT.exists(),
                                  reason=f"the shared fixtures folder {FIXTURES} is absent")


def oracle_path(name: str) -> str:
    return str(ORACLE / f"{name}.pth")


@functools.lru_cache(maxsize=None)
def oracle_ref(name: str) -> dict:
    with np.load(ORACLE / f"{name}_ref.npz") as z:
        return {k: z[k] for k in z.files}


@functools.lru_cache(maxsize=None)
def fixture_ref() -> dict:
    with np.load(FIXTURE_REF) as z:
        return {k: z[k] for k in z.files}


@functools.lru_cache(maxsize=None)
def loaded(path: str):
    from sdt_deploy import load_model

    return load_model(path)


@functools.lru_cache(maxsize=None)
def quantized(path: str, weight_bits: int = 8):
    from sdt_deploy import quantize

    return quantize(loaded(path), weight_bits=weight_bits)


def case_input(name: str) -> np.ndarray:
    if name == "fixture":
        return np.load(FIXTURE_INPUT)
    return oracle_ref(name)["input"]


def case_path(name: str) -> str:
    return str(FIXTURE_CKPT) if name == "fixture" else oracle_path(name)


# Every checkpoint the equivalence tests run on: the shared fixture (when present) and the variants.
ALL_CASES = (["fixture"] if FIXTURE_CKPT.exists() else []) + ORACLE_CASES


def split_everything(monkeypatch) -> None:
    """Every layer of the integer engine split over its threads, however small (the size limits at 0:
    the C kernels' team and the numpy path's thread pool alike)."""
    from sdt_deploy.run import integer_engine as engine

    for limit in ("KERNEL_PARALLEL_MIN_WORK", "KERNEL_PARALLEL_MIN_NEURONS", "DENSE_PARALLEL_MIN_MACS",
                  "PARALLEL_MIN_WORK", "PARALLEL_MIN_NEURONS"):
        monkeypatch.setattr(engine, limit, 0)


def pytest_configure(config):
    # One intra-op thread per test process: the tensors are small, the CI machine has 2 cores and
    # runs two xdist workers; a spinning thread pool costs far more than it gives under load
    # (measured: 11 s with 2 threads against 0.14 s with 1 for a small dvs graph on a busy machine).
    import torch

    torch.set_num_threads(1)


POOLINGS = ["0000", "0011", "0101", "0111", "1001", "1100", "1111"]


@st.composite
def small_configs(draw):
    """Random small SDT configurations over every axis the original supports."""
    from models import SDTConfig

    pooling = draw(st.sampled_from(POOLINGS))
    pools = pooling.count("1")
    heads = draw(st.sampled_from([1, 2, 4]))
    dim = draw(st.sampled_from([8, 16]))
    dvs = draw(st.booleans())
    return SDTConfig(
        img_size=2 ** pools * draw(st.sampled_from([2, 3, 4])),
        in_channels=2 if dvs else draw(st.sampled_from([1, 3])),
        num_classes=draw(st.integers(2, 5)), dim=dim, depth=draw(st.integers(1, 2)), num_heads=heads,
        mlp_ratio=draw(st.sampled_from([1, 2, 4])), time_steps=draw(st.integers(1, 16)), pooling_stat=pooling,
        spike_mode=draw(st.sampled_from(["lif", "plif"])), dvs_mode=dvs, tet=draw(st.booleans()))
