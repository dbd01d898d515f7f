"""SDT V2 in the operation report: ACs, integer ACs and MACs per layer, as the engine measured them and in
V2's energy formula. Expected values recomputed here by hand from the spikes and the shapes."""
from __future__ import annotations

import functools

import numpy as np
import pytest

from sdt_deploy import api
from sdt_deploy.run.integer_engine import run_engine

from conftest import SHARED

V2_CKPT = SHARED / "fixtures" / "v2" / "v2_tiny_t2_32px.pth"
V2_REF = SHARED / "fixtures" / "v2" / "v2_tiny_t2_32px_ref.npz"
pytestmark = pytest.mark.skipif(not V2_CKPT.exists(), reason="the shared V2 fixture is absent")


@functools.cache
def quantized(reparam: bool = False):
    return api.quantize(api.load_model(V2_CKPT), reparam=reparam)


def x():
    with np.load(V2_REF) as z:
        return z["input"][:4]


@functools.cache
def report(reparam: bool = False):
    return api.report(quantized(reparam), x(), batch_size=4)


def test_v2_report_counts_match_the_engine_and_the_spikes_by_hand():
    rep = report()
    rows = {r["name"]: r for r in rep["layers"]}
    assert rep["totals"]["engine"]["matches"]
    spikes = run_engine(quantized().graph, x()).spikes
    T, B = 2, 4
    # kv: one increment per (k spike, v spike) pair of one head at one token; 8 heads of 8 channels
    k, v = spikes["block3.0.attn.k_lif"], spikes["block3.0.attn.v_lif"]
    per_head = lambda a: a.reshape(T, B, 8, 8, -1).sum(axis=3)    # noqa: E731
    assert rows["block3.0.attn.kv"]["ops"] == {"ac": int((per_head(k) * per_head(v)).sum())}
    assert rows["block3.0.attn.kv"]["kind"] == "attention AC"
    # q kv: each query spike adds its head's kv row of d = 8 integers
    assert rows["block3.0.attn.qkv"]["ops"] == {"int_ac": int(spikes["block3.0.attn.q_lif"].sum()) * 8}
    assert rows["block3.0.attn.qkv"]["kind"] == "attention integer AC"
    # SepConv's pointwise 1x1 after the depthwise: a MAC per input value and output channel at every step
    pw = rows["ConvBlock1_1.0.Conv.pwconv2"]
    assert pw["kind"] == "MAC on a current" and pw["ops"]["mac"] == 16 * 8 * 16 * 16 * T * B
    assert rows["ConvBlock1_1.0.Conv.dwconv"]["kind"] == "synaptic AC"
    assert rows["downsample1_1.encode_conv"]["kind"] == "encoder MAC"


def test_v2_paper_column_is_its_energy_formula():
    """E = E_MAC FL_conv^1 + E_AC T (sum FL_conv fr + sum FL_SDSA fr), rows recomputed by hand."""
    rep = report()
    rows = {r["name"]: r for r in rep["layers"]}
    T = 2
    first = rows["downsample1_1.encode_conv"]
    assert first["paper_counted_as"] == "MAC" and first["paper_ops"] == first["flops"] == 7 * 7 * 3 * 8 * 16 * 16
    q = rows["block3.0.attn.qkv"]
    # FL_SDSA of q kv: N C d = 4 tokens x 64 channels x 8
    assert q["flops"] == 4 * 64 * 8 and q["paper_ops"] == pytest.approx(q["input_rate"] * T * q["flops"])
    pw = rows["ConvBlock1_1.0.Conv.pwconv2"]   # a real input: rate 1 in the formula
    assert pw["paper_counted_as"] == "AC" and pw["paper_ops"] == T * pw["flops"]
    e_mac, e_ac = 4.6, 0.9
    total = sum(r["paper_ops"] * (e_mac if r["paper_counted_as"] == "MAC" else e_ac)
                for r in rep["layers"] if r["paper_counted_as"])
    assert rep["totals"]["paper"]["energy_pj"] == pytest.approx(total)
    assert any("ICLR 2024" in note for note in rep["convention"]["v2"])


def test_reparameterized_report_has_no_mac_but_the_encoder():
    rep = report(reparam=True)
    kinds = {r["kind"] for r in rep["layers"]}
    assert "MAC on a current" not in kinds and rep["totals"]["engine"]["matches"]
    macs = [r["name"] for r in rep["layers"] if r["macs"]]
    assert macs == ["downsample1_1.encode_conv"]
    plain = report()
    assert rep["totals"]["measured"]["macs"] < plain["totals"]["measured"]["macs"]
    assert rep["model"]["reparam"] is True and plain["model"]["reparam"] is False     # recorded in the JSON
