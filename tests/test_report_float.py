"""`report --float`: the float model's own spikes counted, the engine check marked not applicable, and
every report saying which model it counted (issue 16, point 5).

The expected values come from the float torch model's spikes, dumped here with `run_model` and counted
by hand (nonzeros, brute-force convolution taps), never from the report's own functions.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_report import _one_by_one_inputs, brute_force_acs

from sdt_deploy.accounting.energy import load_energy_table
from sdt_deploy.errors import DeployError

from conftest import loaded, oracle_path, oracle_ref, quantized

FP32 = load_energy_table("45nm-fp32")
FLOAT = "float (the checkpoint as trained)"
QUANT = "quantized (the deployed integer model)"


def _float_report(case: str, batches=(1,)):
    from sdt_deploy.accounting.measure import float_operation_report
    from sdt_deploy.api import deploy_graph

    lm = loaded(oracle_path(case))
    x = oracle_ref(case)["input"]
    parts, start = [], 0
    for s in batches:                                   # uneven batches: tallies must add up
        parts.append(x[start:start + s])
        start += s
    parts.append(x[start:])
    return float_operation_report(deploy_graph(lm), lm.model, [p for p in parts if len(p)], FP32), lm, x


def _float_spikes(lm, x) -> dict:
    from sdt_deploy.run.torch_runner import run_model

    _, spikes = run_model(lm.model, x)                  # the float checkpoint's own torch model
    return spikes


@pytest.mark.parametrize("case", ["plif_1111", "dvs_tet_t10"])
def test_float_report_counts_the_float_models_own_spikes(case):
    rep, lm, x = _float_report(case)
    spikes = _float_spikes(lm, x)
    rows = {r["name"]: r for r in rep["layers"]}
    assert rep["model"]["counted"] == FLOAT and rep["model"]["quantized"] is False
    assert rep["totals"]["samples"] == len(x)
    # every recorded spike tensor's rate: spikes / (samples x neurons), per step and mean
    for name, s in spikes.items():
        row = rows.get(name)
        if row is not None and row["output_rate"] is not None:
            assert row["output_rate"] == pytest.approx(float(s.astype(np.float64).mean()), abs=1e-15), name
            per_step = s.reshape(s.shape[0], -1).astype(np.float64).mean(axis=1)
            assert row["output_rate_per_step"] == pytest.approx(per_step.tolist(), abs=1e-15), name
    # 1x1 convs and the head: input events x c_out
    modules = dict(lm.model.named_modules())
    for layer, src in _one_by_one_inputs(lm.config).items():
        assert rows[layer]["acs"] == int(np.count_nonzero(spikes[src])) * modules[layer].weight.shape[0], layer
    # the LIFs: one update per neuron per step per sample
    T = spikes["head_lif"].shape[0]
    assert rows["head_lif"]["ops"]["neuron_update"] == T * len(x) * lm.config.dim


def test_float_report_recounts_the_stem_or_pools_from_the_float_spikes():
    """The torch model does not name its stem's OR-pools: the report computes them from the recorded
    LIF spikes. Brute force here: pool the float spikes with torch, then count the taps."""
    rep, lm, x = _float_report("plif_1111")            # pooling 1111: three OR-pools on spikes in the stem
    spikes = _float_spikes(lm, x)
    rows = {r["name"]: r for r in rep["layers"]}
    modules = dict(lm.model.named_modules())
    for conv, lif in (("patch_embed.proj_conv1", "patch_embed.proj_lif"),
                      ("patch_embed.proj_conv2", "patch_embed.proj_lif1"),
                      ("patch_embed.proj_conv3", "patch_embed.proj_lif2")):
        S = spikes[lif]
        pooled = F.max_pool2d(torch.from_numpy(S).float().flatten(0, 1), 3, 2, 1)
        pooled = pooled.reshape(S.shape[:2] + pooled.shape[1:]).numpy()
        assert rows[conv]["acs"] == brute_force_acs(pooled, 3, 1, modules[conv].weight.shape[0]), conv
        # an OR-pool's operations: one per input spike
        pool = rows[conv]["input_from"]
        assert rows[pool]["ops"]["or"] == int(S.sum()), pool


def test_plif_float_report_differs_from_the_quantized_one_and_says_why():
    """A PLIF model's float decays are its trained taus; the quantized model's are all 1/2. The float
    report must count the float spikes (which differ here) and say so in its notes."""
    from sdt_deploy.run.torch_runner import run_model

    rep, lm, x = _float_report("plif_1111")
    q = quantized(oracle_path("plif_1111"))
    _, q_spikes = run_model(q.model, x)
    f_spikes = _float_spikes(lm, x)
    differing = [k for k in f_spikes if not np.array_equal(f_spikes[k], q_spikes[k])]
    assert differing                                    # the two models' spikes do differ here
    rows = {r["name"]: r for r in rep["layers"]}
    for k in differing:
        if rows.get(k, {}).get("output_rate") is not None:
            assert rows[k]["output_rate"] == pytest.approx(float(f_spikes[k].mean()), abs=1e-15)
    notes = " ".join(rep["convention"]["model"])
    assert "PLIF" in notes and "trained decays" in notes and "differ" in notes


def test_float_report_marks_the_engine_check_not_applicable():
    rep, _, _ = _float_report("dvs_tet_t10", batches=(1, 1))
    e = rep["totals"]["engine"]
    assert e["applicable"] is False and e["matches"] is None and "not applicable" in e["why"]
    assert "total_acs" not in e                         # nothing pretends to be an engine count
    assert any("no engine ran" in line for line in rep["convention"]["measured"])


def test_float_report_refuses_a_quantized_graph_and_engine_counters():
    from sdt_deploy.accounting.counting import build_report, tally_spikes
    from sdt_deploy.accounting.measure import float_operation_report
    from sdt_deploy.api import deploy_graph

    q = quantized(oracle_path("lif_0011"))
    x = oracle_ref("lif_0011")["input"]
    with pytest.raises(DeployError, match="float deploy graph"):
        float_operation_report(q.graph, loaded(oracle_path("lif_0011")).model, [x], FP32)
    g = deploy_graph(loaded(oracle_path("lif_0011")))
    from sdt_deploy.accounting.measure import complete_spikes

    spikes = complete_spikes(g, _float_spikes(loaded(oracle_path("lif_0011")), x))
    with pytest.raises(DeployError, match="no engine counters"):
        build_report(g, tally_spikes(g, spikes), FP32, engine_totals={"acs": 0, "macs": 0})


# ---- the command ----

def _invoke(args):
    from click.testing import CliRunner

    from sdt_deploy.cli.report import report

    return CliRunner().invoke(report, args)


@pytest.fixture()
def plif_input(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, oracle_ref("plif_1111")["input"])
    return str(path)


def test_report_command_float_and_quantized_say_which_model_was_counted(tmp_path, plif_input):
    jf, jq = str(tmp_path / "f.json"), str(tmp_path / "q.json")
    res_f = _invoke([oracle_path("plif_1111"), "--input", plif_input, "--float", "--save-json", jf, "--no-progress"])
    assert res_f.exit_code == 0, res_f.output
    res_q = _invoke([oracle_path("plif_1111"), "--input", plif_input, "--save-json", jq, "--no-progress"])
    assert res_q.exit_code == 0, res_q.output
    f, q = json.loads(open(jf).read()), json.loads(open(jq).read())
    assert f["model"]["counted"] == FLOAT and q["model"]["counted"] == QUANT
    assert f"model counted: {FLOAT}" in res_f.output and f"model counted: {QUANT}" in res_q.output
    assert "engine check not applicable" in " ".join(res_f.output.split())
    assert q["totals"]["engine"]["matches"] is True and q["totals"]["engine"]["applicable"] is True
    # the float report's rates are the float model's own
    lm = loaded(oracle_path("plif_1111"))
    spikes = _float_spikes(lm, oracle_ref("plif_1111")["input"])
    row = next(r for r in f["layers"] if r["name"] == "block.0.attn.q_conv")
    assert row["input_rate"] == pytest.approx(float(spikes["block.0.attn.shortcut_lif"].mean()), abs=1e-15)


def test_report_float_on_a_quantized_file_is_one_clear_error(tmp_path, plif_input, capsys):
    from sdt_deploy.cli.app import main

    qfile = str(tmp_path / "q.pth")
    assert main(["quantize", oracle_path("plif_1111"), "-o", qfile]) == 0
    capsys.readouterr()
    code = main(["report", qfile, "--input", plif_input, "--float", "--quiet", "--no-progress"])
    err = capsys.readouterr().err
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "--float" in lines[0] and "quantized file" in lines[0] and "no float model" in lines[0]
    assert "Traceback" not in err
    # the same file without --float is reported, as the quantized model
    assert main(["report", qfile, "--input", plif_input, "--quiet", "--no-progress"]) == 0


def test_the_api_report_is_the_commands_twin(tmp_path, plif_input):
    """`sdt_deploy.report(..., float_model=True)` returns what `report --float --save-json` writes."""
    import sdt_deploy

    jf = str(tmp_path / "f.json")
    assert _invoke([oracle_path("plif_1111"), "--input", plif_input, "--float", "--save-json", jf,
                    "--no-progress"]).exit_code == 0
    rep = sdt_deploy.report(oracle_path("plif_1111"), input=plif_input, float_model=True)
    assert rep["model"]["counted"] == FLOAT
    assert json.loads(json.dumps(rep, default=str)) == json.loads(open(jf).read())
