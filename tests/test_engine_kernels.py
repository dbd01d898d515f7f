"""The engine's faster kernels (`sdt_deploy.run.engine_kernels`, the C extension `sdt_deploy.run._engine_kernels`)
against the engine as it was before them (`engine_reference.py`, the previous sdt_deploy/run/integer_engine.py):
identical spikes, integers, operation counts and observed bounds, on the oracle variants, the variant
checkpoints, the shared fixture and random configurations; thread counts 1, 2 and 3; the numpy path
(no C kernels) too. No timing here: speed is measured in bench/.
"""
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdt_deploy.api import quantize
from sdt_deploy.data.synth import random_inputs, random_model
from sdt_deploy.run import engine_kernels
from sdt_deploy.run import integer_engine as engine
from sdt_deploy.run.integer_engine import run_engine

import engine_reference as REF
from conftest import ALL_CASES, ROOT, case_input, case_path, loaded, quantized, small_configs, split_everything

VARIANTS = sorted((ROOT / "tests" / "data" / "variants").glob("*.pth"))


def assert_same_run(new, old, what=""):
    assert new.spikes.keys() == old.spikes.keys(), what
    for k in old.spikes:
        np.testing.assert_array_equal(new.spikes[k], old.spikes[k], err_msg=f"{what} {k}")
    np.testing.assert_array_equal(new.logits_int, old.logits_int, err_msg=what)
    np.testing.assert_array_equal(new.logits, old.logits, err_msg=what)
    np.testing.assert_array_equal(new.logits_grid, old.logits_grid, err_msg=what)
    assert new.ops == old.ops, what
    assert new.observed == old.observed, what
    assert new.membranes.keys() == old.membranes.keys(), what
    for k in old.membranes:
        np.testing.assert_array_equal(new.membranes[k], old.membranes[k], err_msg=f"{what} {k}")


def assert_after_reset_is_the_reset_trace(new, old):
    """membranes="after_reset": V' = 0 where the neuron fired, else H (the previous engine's H trace), in
    an integer type that holds it."""
    assert new.membranes.keys() == old.membranes.keys()
    for k, h in old.membranes.items():
        v = new.membranes[k]
        assert v.dtype in (np.int32, np.int64), k
        np.testing.assert_array_equal(v, np.where(old.spikes[k] != 0, 0, h), err_msg=k)


def test_the_c_kernels_are_built():
    """setup.py builds them at install time; without them the engine is correct but slow: fail loudly."""
    assert engine_kernels.compiled_kernels(), "sdt_deploy.run._engine_kernels was not built (a C compiler at install?)"
    assert engine_kernels.kernel_isa() != "none"


def test_no_private_scipy_internals():
    """The engine used scipy's private `_sparsetools.csr_matvecs`; its own kernels replace it. Nothing in
    the package may import a private scipy module again without a guard of its own."""
    for path in (ROOT / "sdt_deploy").rglob("*.py"):
        text = path.read_text()
        assert "_sparsetools" not in text and "scipy.sparse._" not in text, path


@pytest.mark.parametrize("name", ALL_CASES + [p.stem for p in VARIANTS])
def test_engine_equals_the_previous_engine(name, monkeypatch):
    path = next((str(p) for p in VARIANTS if p.stem == name), None)
    if path is None:
        q, x = quantized(case_path(name)), case_input(name)
    else:
        q, x = quantize(loaded(path)), np.load(Path(path).with_name(name + "_input.npy"))
    old = REF.run_engine(q.graph, x, threads=1)
    assert sum(int(v.sum()) for v in old.spikes.values()) > 0
    assert_same_run(run_engine(q.graph, x, threads=1), old, f"{name} threads 1")
    split_everything(monkeypatch)
    x3 = np.concatenate([x] * 3)[:max(3, len(x) + 1)]       # uneven parts over 2 and 3 threads
    old3 = REF.run_engine(q.graph, x3, threads=1)
    for threads in (2, 3):
        assert_same_run(run_engine(q.graph, x3, threads=threads), old3, f"{name} threads {threads}")
    old1 = REF.run_engine(q.graph, x[:1], threads=1)        # a batch of one: output rows and neurons split
    for threads in (2, 8):
        assert_same_run(run_engine(q.graph, x[:1], threads=threads), old1, f"{name} batch 1, threads {threads}")


@pytest.mark.parametrize("name", ["lif_0011", "gesture_t16"])
def test_membrane_traces_and_the_numpy_path_equal_the_previous_engine(name, monkeypatch):
    """membranes=True (the C kernel writing each LIF's H trace as it steps, samples split over threads)
    and an engine without its C kernels (a machine where the extension did not build): the same as before
    in everything, the traces int64 as before."""
    q, x = quantized(case_path(name)), case_input(name)
    old = REF.run_engine(q.graph, x, membranes=True, threads=1)
    new = run_engine(q.graph, x, membranes=True, threads=2)
    assert_same_run(new, old, "membranes")
    assert {h.dtype for h in new.membranes.values()} == {np.dtype(np.int64)}
    assert_after_reset_is_the_reset_trace(run_engine(q.graph, x, membranes="after_reset", threads=2), old)
    monkeypatch.setattr(engine_kernels, "_c", None)
    assert_same_run(run_engine(q.graph, x, membranes=True, threads=2), old, "numpy path, membranes")
    assert_after_reset_is_the_reset_trace(run_engine(q.graph, x, membranes="after_reset", threads=2), old)
    split_everything(monkeypatch)
    assert_same_run(run_engine(q.graph, x, threads=3), REF.run_engine(q.graph, x, threads=1), "numpy path")


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(small_configs(), st.integers(0, 2 ** 16), st.sampled_from([8, 4, 2]), st.integers(1, 3), st.integers(1, 4))
def test_property_engine_equals_the_previous_engine(cfg, seed, bits, threads, batch):
    model = random_model(cfg, seed=seed, calibration=8)
    x = random_inputs(cfg, batch, seed=seed + 1, events=cfg.dvs_mode)
    q = quantize(model, weight_bits=bits)
    old = REF.run_engine(q.graph, x, threads=1, membranes=bool(seed % 2))
    with pytest.MonkeyPatch.context() as mp:
        split_everything(mp)
        assert_same_run(run_engine(q.graph, x, threads=threads, membranes=bool(seed % 2)), old,
                        f"{cfg} threads {threads}")


# --- the kernels one by one, on random integers (widths, layouts and sizes the models do not reach) ---


def _layout(a: np.ndarray, channel_last: bool) -> np.ndarray:
    """a [N, C, ...] as is, or the same values over channel-last memory (as the engine's layers write)."""
    if not channel_last:
        return a
    order = (0,) + tuple(range(2, a.ndim)) + (1,)
    back = np.argsort(order)
    return np.ascontiguousarray(a.transpose(order)).transpose(back)


@st.composite
def conv_cases(draw):
    k = draw(st.sampled_from([1, 3, 5]))
    pad = draw(st.integers(0, k // 2 + 1)) if k > 1 else draw(st.integers(0, 1))
    N, C = draw(st.integers(1, 4)), draw(st.integers(1, 40))
    O = draw(st.sampled_from([1, 10, 32, 33, 64, 100, 128, 256, 300, 520]))
    H, W = draw(st.integers(max(1, k - 2 * pad), 9)), draw(st.integers(max(1, k - 2 * pad), 9))
    rate = draw(st.sampled_from([0.0, 0.02, 0.2, 0.6, 1.0]))
    # weight ranges: int8; int16 large enough that int16 accumulators must be emptied many times; past
    # int16 (the numpy path)
    wmax = draw(st.sampled_from([1, 127, 3000, 32767, 40000]))
    seed = draw(st.integers(0, 2 ** 31))
    rng = np.random.default_rng(seed)
    S = (rng.random((N, C, H, W)) < rate).astype(draw(st.sampled_from([np.uint8, np.bool_])))
    w = rng.integers(-wmax, wmax + 1, size=(O, C, k, k)).astype(np.int8 if wmax <= 127 else np.int32)
    return S, w, pad, draw(st.booleans()), draw(st.sampled_from([1, 2, 3, 8]))


@settings(max_examples=150, deadline=None)
@given(conv_cases())
def test_property_synaptic_conv(case):
    S, w, pad, channel_last, threads = case
    S = _layout(S, channel_last)
    O = w.shape[0]
    bias = np.random.default_rng(O).integers(-300, 300, size=O) if threads == 2 else None    # in the kernel
    with pytest.MonkeyPatch.context() as mp:
        split_everything(mp)
        out, adds, peak = engine.synaptic_conv_peak(S, w, pad, threads=threads, bias=bias)
    ref, ref_adds = REF.synaptic_conv(S.astype(np.uint8), w, pad)
    if bias is not None:
        ref = ref + bias[None, :, None, None]
    assert adds == ref_adds
    np.testing.assert_array_equal(out, ref)
    assert out.dtype == np.int64
    # the kernel's max |out| (taken as it writes; None where it did not write the whole output)
    assert peak is None or peak == int(np.abs(ref).max(initial=0))
    if engine_kernels.event_weights(w) is not None and (bias is None or engine_kernels.bias_fits(
            engine_kernels.event_weights(w), bias)):
        assert peak is not None
    exact = torch.nn.functional.conv2d(torch.from_numpy(S.astype(np.float64)), torch.from_numpy(w.astype(np.float64)),
                                       None if bias is None else torch.from_numpy(bias.astype(np.float64)), padding=pad)
    np.testing.assert_array_equal(out, exact.numpy().astype(np.int64))


def test_synaptic_conv_int16_accumulators_are_emptied_before_overflowing():
    """Every input spiking, every weight at +32767 (or -32767): each output is 32767 x (events per
    output), far past int16; the kernel's int16 registers must be emptied in time, every time."""
    for sign in (1, -1):
        S = np.ones((2, 70, 5, 5), np.uint8)
        w = np.full((40, 70, 3, 3), sign * 32767, np.int32)
        out, adds = engine.synaptic_conv(S, w, 1)
        ref, ref_adds = REF.synaptic_conv(S, w, 1)
        assert adds == ref_adds and np.array_equal(out, ref) and out[0, 0, 2, 2] == sign * 32767 * 70 * 9
        assert engine_kernels.event_weights(w) is not None      # the C kernel did it


def test_weights_the_c_kernel_cannot_take_go_the_numpy_way():
    big = np.full((3, 2, 1, 1), 40000, np.int64)                        # a weight past int16
    huge = np.full((2, 70000, 1, 1), 32767, np.int64)                   # a worst-case sum past int32
    assert engine_kernels.event_weights(big) is None and engine_kernels.event_weights(huge) is None
    S = np.ones((1, 70000, 1, 1), np.uint8)
    out, adds = engine.synaptic_conv(S, huge, 0)
    assert out[0, 0, 0, 0] == 32767 * 70000 and adds == 70000 * 2


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 5), st.integers(1, 600), st.sampled_from([1, 10, 64, 300]), st.floats(0, 1),
       st.integers(0, 2 ** 31), st.integers(1, 3))
def test_property_synaptic_linear(N, C, O, rate, seed, threads):
    rng = np.random.default_rng(seed)
    S = (rng.random((N, C)) < rate).astype(np.uint8)
    w = rng.integers(-127, 128, size=(O, C)).astype(np.int8)
    with pytest.MonkeyPatch.context() as mp:
        split_everything(mp)
        out, adds = engine.synaptic_linear(S, w, threads)
    ref, ref_adds = REF.synaptic_linear(S, w)
    assert adds == ref_adds and out.dtype == np.int64
    np.testing.assert_array_equal(out, ref)


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 8), st.integers(1, 40), st.sampled_from([1, 2, 3]),
       st.integers(0, 2), st.integers(1, 4), st.sampled_from([8, 16, 24]), st.integers(0, 2 ** 31), st.integers(1, 3))
def test_property_dense_conv(N, C, O, size, k, pad, stride, xbits, seed, threads):
    """The encoder: int32 in the C kernel while the bound allows (8 and 16-bit inputs), int64 beyond
    (24-bit inputs with large weights); the same values and MAC counts as before either way."""
    if size + 2 * pad < k:
        return
    rng = np.random.default_rng(seed)
    x = rng.integers(-2 ** (xbits - 1), 2 ** (xbits - 1), size=(N, C, size, size)).astype(np.int64)
    w = rng.integers(-127, 128, size=(O, C, k, k)).astype(np.int8)
    with pytest.MonkeyPatch.context() as mp:
        split_everything(mp)
        out, macs = engine.dense_conv(x, w, stride, pad, threads)
    ref, ref_macs = REF.dense_conv(x, w, stride, pad)
    assert macs == ref_macs and out.dtype == np.int64
    np.testing.assert_array_equal(out, ref)
    if engine_kernels.dense_conv_fits_int32(x, w):
        out32, _ = engine.dense_conv(x, w, stride, pad, threads, out_dtype=np.int32)
        assert out32.dtype == np.int32 and np.array_equal(out32, ref)


@st.composite
def lif_cases(draw):
    T, B = draw(st.integers(1, 16)), draw(st.integers(1, 4))
    C = draw(st.integers(1, 12))
    spatial = draw(st.sampled_from([(), (1,), (3, 4), (5, 5)]))
    dtype = draw(st.sampled_from([np.int32, np.int64]))
    lim = draw(st.sampled_from([4, 300, 2 ** 20, 2 ** 29]))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 31)))
    X = rng.integers(-lim, lim, size=(T, B, C) + spatial).astype(dtype)
    theta = rng.integers(1, max(2, lim // 2), size=C)
    if len(spatial) and draw(st.booleans()):     # channel-last memory, as the synaptic layers write it
        X = np.ascontiguousarray(np.moveaxis(X, 2, -1))
        X = np.moveaxis(X, -1, 2)
    if draw(st.booleans()):                      # a non-contiguous view
        X = X[:, :, ::-1] if C > 1 else X[::1]
    return X, theta, draw(st.sampled_from([1, 2, 3, 8]))


@settings(max_examples=150, deadline=None)
@given(lif_cases())
def test_property_lif(case):
    X, theta, threads = case
    ref, ref_peak = REF.lif_int(X, theta)
    got, peak = engine.lif_int(X, theta)
    assert peak == ref_peak and got.dtype == np.uint8
    np.testing.assert_array_equal(got, ref)
    with pytest.MonkeyPatch.context() as mp:
        split_everything(mp)
        got, peak = engine.lif_int_parallel(X, theta, threads)
    assert peak == ref_peak
    np.testing.assert_array_equal(got, ref)
    # [T, C] with the channel on axis 1 (as a test of the float LIF calls it)
    flat = np.ascontiguousarray(X.reshape(X.shape[0], -1))
    th = np.resize(theta, flat.shape[1])
    np.testing.assert_array_equal(engine.lif_int(flat, th, channel_axis=1)[0], REF.lif_int(flat, th, channel_axis=1)[0])


@settings(max_examples=150, deadline=None)
@given(lif_cases(), st.sampled_from([None, "H", "V"]), st.data())
def test_property_the_fused_lif_is_the_shift_then_the_previous_lif(case, trace, data):
    """`lif_steps` with a per-channel shift (the engine's LIF: the shift onto the neuron's grid, the steps,
    max |x| and the spike count in one pass) against the previous engine's separate passes."""
    X, theta, threads = case
    room = max(0, 29 - int(np.abs(X).max(initial=0)).bit_length())
    shift = np.array(data.draw(st.lists(st.integers(0, room), min_size=X.shape[2], max_size=X.shape[2])))
    shifted = X << shift.astype(X.dtype).reshape((-1,) + (1,) * (X.ndim - 3))
    steps: list = []
    ref, ref_peak = REF.lif_int(shifted, theta, membranes=steps)
    got = engine_kernels.lif_steps(X, theta, 2, threads, shift=shift, trace=trace)
    np.testing.assert_array_equal(got.spikes, ref)
    assert got.peak_h == ref_peak
    assert got.peak_x == int(np.abs(shifted.astype(np.int64)).max(initial=0))
    assert got.count == int(np.count_nonzero(ref))
    if trace is None:
        assert got.trace is None
    else:
        H = np.stack(steps)
        want = H if trace == "H" else np.where(ref != 0, 0, H).astype(X.dtype)
        assert got.trace.dtype == want.dtype
        np.testing.assert_array_equal(got.trace, want)


@st.composite
def residual_cases(draw):
    """Two [T, B, C, H, W] currents of one type and the per-channel shifts onto the sum's grid: laid out
    alike (channel-last or not, as the engine's layers hand them over), or not (the kernel declines)."""
    T, B, C = draw(st.integers(1, 4)), draw(st.integers(1, 3)), draw(st.integers(1, 40))
    H, W = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    dtype = draw(st.sampled_from([np.int32, np.int64]))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 31)))
    lim = draw(st.sampled_from([3, 2 ** 12, 2 ** 20]))
    shifts = [rng.integers(0, draw(st.sampled_from([1, 4, 9])), size=C) for _ in range(2)]
    if draw(st.booleans()):
        shifts[1][:] = 0                                      # the common case: one term on the grid already
    layouts = draw(st.sampled_from([("last", "last"), ("first", "first"), ("last", "first")]))

    def current(layout):
        a = rng.integers(-lim, lim, size=(T, B, C, H, W)).astype(dtype)
        return _layout(a.reshape(T * B, C, H, W), layout == "last").reshape(T, B, C, H, W) if layout == "last" else a
    return current(layouts[0]), current(layouts[1]), shifts[0], shifts[1], layouts[0] == layouts[1], \
        draw(st.sampled_from([1, 2, 3, 8]))


@settings(max_examples=150, deadline=None)
@given(residual_cases())
def test_property_the_residual_addition(case):
    """`add_scaled` against numpy's shifts and sum in int64 (the engine's previous `_add`), its maximum
    against numpy's. Arrays laid out alike always take the kernel; others only where their memory orders
    coincide after all (length-1 axes), else they go the numpy way (None)."""
    a, b, sa, sb, alike, parts = case
    got = engine_kernels.add_scaled(a, b, sa, sb, 2, parts)
    if got is None:
        assert not alike
        return
    y, peak = got
    want = (a.astype(np.int64) << sa.reshape(-1, 1, 1)) + (b.astype(np.int64) << sb.reshape(-1, 1, 1))
    assert y.dtype == a.dtype and y.shape == a.shape
    np.testing.assert_array_equal(y, want.astype(a.dtype))
    assert peak == int(np.abs(want).max(initial=0))


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 3), st.integers(1, 12), st.integers(1, 12), st.sampled_from([1, 2, 3, 4]), st.integers(1, 3),
       st.integers(0, 2), st.sampled_from(["spikes", "int32", "int64"]), st.booleans(), st.integers(0, 2 ** 31))
def test_property_pool_max(N, H, W, k, stride, pad, kind, channel_last, seed):
    if H + 2 * pad < k or W + 2 * pad < k:
        return
    rng = np.random.default_rng(seed)
    if kind == "spikes":
        a, fill = (rng.random((N, 3, H, W)) < 0.3).astype(np.uint8), 0
    else:
        dtype = np.int32 if kind == "int32" else np.int64
        a, fill = rng.integers(-1000, 1000, size=(N, 3, H, W)).astype(dtype), np.iinfo(dtype).min
    a = _layout(a, channel_last)
    got = engine._pool_max(a, k, stride, pad, fill)
    ref = REF._pool_max(a, k, stride, pad, fill)
    assert got.dtype == ref.dtype
    np.testing.assert_array_equal(got, ref)
    # a fill above the values (not a case the engine has) is taken wherever a window reaches padding
    np.testing.assert_array_equal(engine._pool_max(a, k, stride, pad, 5), REF._pool_max(a, k, stride, pad, 5))


@settings(max_examples=40, deadline=None)
@given(st.sampled_from([np.int32, np.int64]), st.integers(1, 5000), st.integers(1, 4), st.booleans(),
       st.integers(0, 2 ** 16))
def test_property_abs_max_in_parts(dtype, n, parts, extreme, seed):
    """max |a| split over threads is numpy's, at the type's minimum too (|min| is not representable)."""
    info = np.iinfo(dtype)
    a = np.random.default_rng(seed).integers(info.min // 2, info.max // 2, n, dtype=dtype)
    if extreme:
        a[seed % n] = info.min
    expected = max(int(a.max()), -int(a.min()))
    assert engine_kernels.abs_max(a, parts) == expected
    assert engine_kernels.abs_max(a.reshape(1, -1).T, parts) == expected     # a transposed view


def test_heads_or_pool_is_unchanged():
    rng = np.random.default_rng(3)
    a = (rng.random((2, 3, 16, 4, 4)) < 0.3).astype(np.uint8)
    np.testing.assert_array_equal(engine.heads_or_pool_np(a, 4), REF.heads_or_pool_np(a, 4))


def test_remembered_bounds_and_packed_weights_follow_changes_in_place():
    """The bit analysis is remembered per graph and the packed weights per array; both are compared with
    copies on every use, so an integer changed in place (same objects) is seen at once."""
    from sdt_deploy.errors import DeployError

    q = quantize(loaded(case_path("lif_0011")))
    x = case_input("lif_0011")
    run_engine(q.graph, x)
    node = q.graph["block.0.mlp.fc2_conv"]
    saved = node.b_int.copy()
    node.b_int[0] = np.iinfo(np.int64).max              # in place: the same array object; past 2**63 with any sum
    with pytest.raises(DeployError, match="block.0.mlp.fc2_conv"):
        run_engine(q.graph, x)
    node.b_int[:] = saved
    assert_same_run(run_engine(q.graph, x), REF.run_engine(q.graph, x))
    w = node.w_int
    w[:, :] = -w                                        # every weight of the layer negated in place
    assert_same_run(run_engine(q.graph, x), REF.run_engine(q.graph, x), "weights changed in place")

    rng = np.random.default_rng(1)
    S = (rng.random((2, 8, 4, 4)) < 0.5).astype(np.uint8)
    w = rng.integers(-127, 128, size=(16, 8, 3, 3)).astype(np.int8)
    engine.synaptic_conv(S, w, 1)
    w[3, 2, 1, 1] += 1 if w[3, 2, 1, 1] < 127 else -1
    np.testing.assert_array_equal(engine.synaptic_conv(S, w, 1)[0], REF.synaptic_conv(S, w, 1)[0])


_EVENTS_IN_A_FRESH_PROCESS = """
import sys
import numpy as np
from sdt_deploy.run import integer_engine as engine
rng = np.random.default_rng(5)
outs = []
for C in (1, 15, 16, 17, 40, 64):
    for rate in (0.0, 0.05, 0.5, 1.0):
        S = (rng.random((3, C, 6, 5)) < rate).astype(np.uint8)
        w = rng.integers(-127, 128, size=(33, C, 3, 3)).astype(np.int8)
        out, adds = engine.synaptic_conv(S, w, 1)
        outs += [out, np.array([adds])]
np.savez(sys.argv[1], *outs)
"""


def test_event_lists_with_and_without_avx512_are_the_same(tmp_path):
    """The event lists are built with AVX-512 where the CPU has it, by a plain loop elsewhere (or with
    SDT_ENGINE_PLAIN_EVENTS set): both, in fresh processes, give the same convolutions and counts."""
    import os
    import subprocess
    import sys

    got = {}
    for how in ("default", "plain"):
        env = dict(os.environ)
        env.pop("SDT_ENGINE_PLAIN_EVENTS", None)
        if how == "plain":
            env["SDT_ENGINE_PLAIN_EVENTS"] = "1"
        path = tmp_path / f"{how}.npz"
        proc = subprocess.run([sys.executable, "-c", _EVENTS_IN_A_FRESH_PROCESS, str(path)], env=env,
                              capture_output=True, text=True, timeout=300, cwd=str(ROOT))
        assert proc.returncode == 0, proc.stderr[-2000:]
        with np.load(path) as z:
            got[how] = [z[k] for k in sorted(z.files, key=lambda k: int(k.split("_")[1]))]
    assert len(got["default"]) == len(got["plain"]) > 0
    assert all(np.array_equal(a, b) for a, b in zip(got["default"], got["plain"]))
