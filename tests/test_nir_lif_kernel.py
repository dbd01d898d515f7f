"""The NIR interpreter's compiled neuron step (`engine_kernels.nir_lif`, C) against its definition
(`run.lif.nir_lif_step`, numpy) bit for bit -- signed zeros, infinities and NaNs included -- on every
kind of neuron and parameter layout, and against Python's own float arithmetic (each operation rounded
once, as IEEE double) on values where a fused multiply-add would round differently. No timing here.
"""
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdt_deploy.run import engine_kernels
from sdt_deploy.run.lif import NIRLIFParameters, nir_lif_step

pytestmark = pytest.mark.skipif(not engine_kernels.compiled_kernels(), reason="C kernels not built")


def bits(a):
    """The values as their bit patterns (so -0.0 differs from 0.0), every NaN as one pattern (which NaN an
    operation on two NaNs gives is the CPU's choice, not the arithmetic's)."""
    a = np.asarray(a)
    if a.dtype != np.float64:
        return a
    return np.where(np.isnan(a), np.nan, a).view(np.uint64)


def assert_same_step(i, v, p):
    g = engine_kernels.nir_lif_groups(p, i.shape[1:])
    assert g is not None
    got = engine_kernels.nir_lif(i, v, g)
    want = nir_lif_step(i, v, p)
    for name, a, b in zip(("output", "V'", "H"), got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        np.testing.assert_array_equal(bits(a), bits(b), err_msg=name)


SPECIAL = [0.0, -0.0, 1.0, -1.0, 0.5, 1e-300, -1e-300, 5e-324, 1e300, np.inf, -np.inf, np.nan, 1 / 3, 0.1]


def values(draw, shape, special=True):
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    a = rng.normal(0, draw(st.sampled_from([1e-3, 1.0, 50.0])), size=shape)
    if special and a.size:
        mask = rng.random(shape) < 0.15
        a[mask] = rng.choice(SPECIAL, size=int(mask.sum()))
    return a


@st.composite
def steps(draw):
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=3)))
    B = draw(st.integers(1, 3))
    kind = draw(st.sampled_from(["LIF", "IF", "LI", "I"]))
    leaky, fires = kind in ("LIF", "LI"), kind in ("LIF", "IF")

    def param(special=True):
        layout = draw(st.sampled_from(["scalar", "leading", "full", "trailing-broadcast"]))
        if layout == "scalar":
            return np.float64(values(draw, (1,), special)[0])
        if layout == "leading":      # per channel: [C, 1, 1] (what the interpreter's _compact keeps)
            keep = draw(st.integers(1, len(shape)))
            return values(draw, shape[:keep] + (1,) * (len(shape) - keep), special)
        if layout == "full":
            return values(draw, shape, special)
        return values(draw, shape[-1:], special)      # numpy's broadcasting from the right

    p = NIRLIFParameters(gain=param(), r=param(), v_leak=param() if leaky else 0.0,
                         v_threshold=param() if fires else None, v_reset=param() if fires else 0.0, leaky=leaky)
    i = values(draw, (B,) + shape)
    v = None if draw(st.booleans()) else values(draw, (B,) + shape)
    return i, v, p


@settings(max_examples=300, deadline=None)
@given(steps())
def test_compiled_step_is_numpys_step_bit_for_bit(case):
    assert_same_step(*case)


def test_hand_computed_step():
    """gain 0.5, r 2, v_leak 1, threshold 3, reset -1: from V = 1 and I = 3, H = 1 + 0.5 * ((1 - 1) + 2 * 3)
    = 4 > 3 fires and V' = -1; from V = 0 and I = 1, H = 0.5 * (1 + 2) = 1.5 does not, V' = 1.5; at rest
    (V None) and I = 2: H = 0.5 * (1 + 4) = 2.5."""
    p = NIRLIFParameters(gain=0.5, r=2.0, v_leak=1.0, v_threshold=3.0, v_reset=-1.0, leaky=True)
    g = engine_kernels.nir_lif_groups(p, (2,))
    s, v, h = engine_kernels.nir_lif(np.array([[3.0, 1.0]]), np.array([[1.0, 0.0]]), g)
    assert s.tolist() == [[True, False]] and v.tolist() == [[-1.0, 1.5]] and h.tolist() == [[4.0, 1.5]]
    s, v, h = engine_kernels.nir_lif(np.array([[2.0, 2.0]]), None, g)
    assert s.tolist() == [[False, False]] and h.tolist() == [[2.5, 2.5]]
    integrator = NIRLIFParameters(gain=0.25, r=4.0, v_threshold=None, leaky=False)      # I: H = V + 0.25 * 4 * I
    out, v, h = engine_kernels.nir_lif(np.array([[3.0]]), np.array([[1.0]]),
                                       engine_kernels.nir_lif_groups(integrator, (1,)))
    assert out.tolist() == v.tolist() == h.tolist() == [[4.0]]


def test_rounds_every_operation_on_its_own():
    """No fused multiply-add: on values where rounding r*I + (v_leak - V) or gain*x + V once differs from
    rounding each operation, the kernel gives Python's own result (IEEE double, one rounding per operation)."""
    rng = np.random.default_rng(7)
    cases = []
    while len(cases) < 50:
        k, r, vl, v, i = (float(x) for x in rng.uniform(-3, 3, 5))
        inner = (vl - v) + r * i
        fused_inner = float(Fraction(r) * Fraction(i) + Fraction(vl - v))
        fused_outer = float(Fraction(k) * Fraction(inner) + Fraction(v))
        if fused_inner != inner or fused_outer != v + k * inner:
            cases.append((k, r, vl, v, i))
    for k, r, vl, v, i in cases:
        p = NIRLIFParameters(gain=k, r=r, v_leak=vl, v_threshold=np.inf, v_reset=0.0, leaky=True)
        _, _, h = engine_kernels.nir_lif(np.array([[i]]), np.array([[v]]), engine_kernels.nir_lif_groups(p, (1,)))
        assert h[0, 0] == v + k * ((vl - v) + r * i)
