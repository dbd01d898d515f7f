"""`sdt-deploy verify`: every executor agrees; a single wrong weight or threshold in a shipped file is
caught and traced to its layer; torchrun shards give the totals of one process."""
import json
import os
import shutil
import subprocess
import sys

import nir
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from exporters.bundle import export_graph
from sdt_deploy.cli.app import main
from sdt_deploy.data.datasets import ArrayDataset
from sdt_deploy.ir.graph import LIF
from sdt_deploy.run.integer_engine import run_engine
from sdt_deploy.verification.executors import ALL_EXECUTORS
from sdt_deploy.verification.verifier import run_verify

from conftest import DEMO_CKPT, FIXTURE_CKPT, case_input, case_path, loaded, needs_shared, quantized

EVERY = [e for e in ALL_EXECUTORS if e != "cupy"]


def verify_all(path, x):
    from sdt_deploy.verification.executors import cuda_skip_reason

    res = run_verify(quantized(path), ArrayDataset(x), list(ALL_EXECUTORS))
    why = cuda_skip_reason()
    if why is None:                            # a GPU with CuPy: the CuPy model ran too
        assert "cupy" in res.executors and not res.skipped
    else:                                      # none: skipped with its reason, never silently
        assert res.skipped == {"cupy": why} and set(res.executors) == set(EVERY)
    return res


@pytest.mark.parametrize("name", ["lif_0011", "plif_1111", "dvs_tet_t10", "mlp1_0101", "plif_dvs_0000"])
def test_every_executor_agrees_on_the_variants(name):
    res = verify_all(case_path(name), case_input(name)[:2])
    assert res.ok, res.tally.first
    j = res.to_json()
    assert j["first_divergence"] is None
    # the ONNX files are run as `export` writes them (no debug outputs): every LIF's membrane after every
    # step and the per-step output are compared there; every spike tensor in the other executors
    lifs = {n.name for n in quantized(case_path(name)).graph.of_type(LIF)}
    for layer, row in j["layers"].items():
        want = set(EVERY) if layer in lifs else {"torch", "engine", "nir"}
        assert set(row) == want, layer
        for ex in ("onnx-int", "onnx-float"):
            if layer in lifs:
                assert row[ex]["membranes"] > 0 and row[ex]["membrane_mismatches"] == 0 and row[ex]["spikes"] is None
    assert j["per_step_output"] == {"onnx-int": {"mismatches": 0}, "onnx-float": {"mismatches": 0}}
    assert sum(r["torch"]["spikes"] for r in j["layers"].values()) > 0
    assert {ex: f["origin"] for ex, f in j["artifacts"].items()} == {
        "onnx-int": "exported for this run", "onnx-float": "exported for this run", "nir": "exported for this run"}


@needs_shared
def test_every_executor_agrees_on_the_fixture():
    assert verify_all(str(FIXTURE_CKPT), case_input("fixture")[:2]).ok


@pytest.mark.skipif(not DEMO_CKPT.exists(), reason="demo checkpoint not built yet")
def test_every_executor_agrees_on_the_demo():
    from sdt_deploy.data.digits import digits_split

    assert verify_all(str(DEMO_CKPT), digits_split("test").x[:3]).ok


# ---------------------------------------------------------------- mutations

CASE = "lif_0011"
CONV, LIF_NAME = "block.0.attn.k_conv", "block.0.attn.k_lif"


def _sensitive_weight(q, x):
    """(c_out, c_in) of CONV whose decrease by one grid step must flip a spike of LIF_NAME: a neuron that
    fired with V + X < 2*theta + (one step of X on the LIF's grid), fed by a spiking input c_in."""
    g = q.graph
    conv, lif = g[CONV], g[LIF_NAME]
    r = run_engine(g, x, membranes=True)
    s_in = r.spikes[conv.inputs[0]].astype(np.int64)                    # [T, B, C_in, H, W]
    X = np.einsum("oc,tbchw->tbohw", conv.w_int[:, :, 0, 0].astype(np.int64), s_in)
    X = X + conv.b_int.reshape(1, 1, -1, 1, 1)
    shift = (lif.grid - conv.grid).reshape(1, 1, -1, 1, 1)
    X = X << shift                                                        # onto the LIF's grid
    H, S = r.membranes[LIF_NAME], r.spikes[LIF_NAME]
    V = np.concatenate([np.zeros_like(H[:1]), (H * (1 - S))[:-1]])      # state before each step
    assert np.array_equal((V + X) >> 1, H)                               # the model of the step holds
    theta = lif.theta_int.reshape(1, 1, -1, 1, 1)
    for t, b, c, y, xx in np.argwhere((S == 1) & (V + X - 2 ** shift < 2 * theta)):
        for c_in in np.nonzero(s_in[t, b, :, y, xx])[0]:
            if conv.w_int[c, c_in, 0, 0] > -127:
                return int(c), int(c_in)
    raise AssertionError("no spike this input can flip")  # pragma: no cover


def _tie(q, x, lif_name):
    """(channel, grid) of a LIF neuron that fired on an exact tie H == theta."""
    lif = q.graph[lif_name]
    r = run_engine(q.graph, x, membranes=True)
    th = lif.theta_int.reshape((1, 1, -1) + (1,) * (len(lif.shape) - 1))
    at = np.argwhere(r.membranes[lif_name] == th)
    assert len(at), f"no exact tie in {lif_name}"
    c = int(at[0][2])
    return c, int(lif.grid[c])


@pytest.fixture(scope="module", params=[False, True], ids=["as-exported", "debug-outputs"])
def exported(tmp_path_factory, request):
    """The files `export` writes by default (ONNX without debug outputs: membranes and per-step outputs are
    compared), and with --debug-outputs (spikes compared as well)."""
    q = quantized(case_path(CASE))
    d = tmp_path_factory.mktemp("artifacts")
    for kind, target, variant in (("onnx-int", "onnx", "int"), ("onnx-float", "onnx", "float"),
                                  ("nir", "nir", "int")):
        suffix = ".nir" if target == "nir" else ".onnx"
        export_graph(q.graph, target, str(d / f"m.{kind}{suffix}"), onnx_variant=variant,
                     debug_outputs=request.param)
    return q, d


def _copy_partitioned_nir(d, out):
    """A copy of the exported NIR file with its stem and manifest, for mutation."""
    for f in os.listdir(d):
        if f.startswith("m.nir"):
            shutil.copy(d / f, out / f)
    return out / "m.nir.nir"


def _run_verify_cli(artifact, executor, capsys):
    code = main(["verify", case_path(CASE), "--input", str(_input_file(capsys)), "--executors", f"torch,{executor}",
                 "--artifact", str(artifact), "--json"])
    captured = capsys.readouterr()
    return code, captured


_INPUT_DIR = {}


def _input_file(_):
    if "path" not in _INPUT_DIR:
        import tempfile

        p = os.path.join(tempfile.mkdtemp(), "x.npy")
        np.save(p, case_input(CASE))
        _INPUT_DIR["path"] = p
    return _INPUT_DIR["path"]


def _assert_caught(code, captured, layer):
    assert code == 1, captured.err
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "spike mismatch" in err[0] and f"layer {layer}," in err[0], err
    rep = json.loads(captured.out)
    assert rep["ok"] is False and rep["first_divergence"]["layer"] == layer
    bad = {k for k, row in rep["layers"].items()
           if any(v.get("mismatches") or v.get("membrane_mismatches") for v in row.values())}
    assert layer in bad
    # upstream layers are untouched: the report localises the change
    assert "block.0.attn.q_lif" not in bad and "patch_embed.proj_lif3" not in bad


def test_untouched_artifacts_pass(exported, capsys):
    q, d = exported
    for kind, f in (("onnx-int", "m.onnx-int.onnx"), ("onnx-float", "m.onnx-float.onnx"), ("nir", "m.nir.nir")):
        code, captured = _run_verify_cli(d / f, kind, capsys)
        assert code == 0, captured.err
        assert json.loads(captured.out)["ok"] is True


@pytest.mark.parametrize("variant", ["int", "float"])
def test_one_onnx_weight_one_grid_step_off_is_caught(exported, tmp_path, capsys, variant):
    q, d = exported
    c, c_in = _sensitive_weight(q, case_input(CASE))
    model = onnx.load(str(d / f"m.onnx-{variant}.onnx"))
    name = f"{CONV}.w_int" if variant == "int" else f"{CONV}.weight"
    init = next(i for i in model.graph.initializer if i.name == name)
    w = numpy_helper.to_array(init).copy()
    step = 1 if variant == "int" else 2.0 ** -int(q.graph[CONV].w_exp[c])
    w[c, c_in, 0, 0] -= step
    init.CopyFrom(numpy_helper.from_array(w, name))
    bad = tmp_path / f"bad_{variant}.onnx"
    onnx.save(model, str(bad))
    code, captured = _run_verify_cli(bad, f"onnx-{variant}", capsys)
    _assert_caught(code, captured, LIF_NAME)
    # the logits alone would not have told: the predictions still agree
    assert json.loads(captured.out)["prediction_agreement"][f"onnx-{variant}"] == 1.0


def test_one_nir_weight_one_grid_step_off_is_caught(exported, tmp_path, capsys):
    q, d = exported
    c, c_in = _sensitive_weight(q, case_input(CASE))
    path = _copy_partitioned_nir(d, tmp_path)
    g = nir.read(str(path))
    node = g.nodes[CONV]
    node.weight = np.array(node.weight, copy=True)
    node.weight[c, c_in, 0, 0] -= 2.0 ** -int(q.graph[CONV].w_exp[c])
    nir.write(str(path), g)
    code, captured = _run_verify_cli(path, "nir", capsys)
    _assert_caught(code, captured, LIF_NAME)


def test_one_onnx_threshold_off_is_caught(exported, tmp_path, capsys):
    q, d = exported
    c, _ = _tie(q, case_input(CASE), LIF_NAME)
    model = onnx.load(str(d / "m.onnx-int.onnx"))
    name = f"{LIF_NAME}.theta_int"
    init = next(i for i in model.graph.initializer if i.name == name)
    th = numpy_helper.to_array(init).copy()
    th.reshape(-1)[c] += 1
    init.CopyFrom(numpy_helper.from_array(th, name))
    bad = tmp_path / "bad_theta.onnx"
    onnx.save(model, str(bad))
    code, captured = _run_verify_cli(bad, "onnx-int", capsys)
    _assert_caught(code, captured, LIF_NAME)


def test_one_nir_threshold_off_is_caught(exported, tmp_path, capsys):
    q, d = exported
    c, grid = _tie(q, case_input(CASE), LIF_NAME)
    path = _copy_partitioned_nir(d, tmp_path)
    g = nir.read(str(path))
    node = g.nodes[LIF_NAME]
    node.v_threshold = np.array(node.v_threshold, copy=True)
    node.v_threshold[c] += 2.0 ** -grid            # one grid step: the tie no longer fires
    nir.write(str(path), g)
    code, captured = _run_verify_cli(path, "nir", capsys)
    _assert_caught(code, captured, LIF_NAME)


def test_engine_divergence_reports_both_membranes(monkeypatch):
    """A wrong engine (threshold off by one on the integer grid) is diagnosed with both membranes."""
    import sdt_deploy.verification.executors as V

    real = V.run_engine

    def broken(g, x, **kw):
        g = g.copy()
        node = g[LIF_NAME]
        node.theta_int = node.theta_int + 1
        return real(g, x, **kw)

    monkeypatch.setattr(V, "run_engine", broken)
    res = run_verify(quantized(case_path(CASE)), ArrayDataset(case_input(CASE)), ["torch", "engine"])
    first = res.tally.first
    assert not res.ok and first["layer"] == LIF_NAME and first["executor"] == "engine"
    assert first["reference_H"] >= first["theta"]       # the reference fired on (at least) the threshold
    assert first["candidate_H_int"] < first["theta_int"] + 1 and first["grid"].startswith("2**-")


# ---------------------------------------------------------------- dataset scale

def test_torchrun_two_processes_give_the_totals_of_one(tmp_path):
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    args = ["verify", case_path(CASE), "--random", "5", "--executors", "torch,engine", "--json", "--batch-size", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "sdt_deploy", *args], capture_output=True, text=True, env=env,
                         timeout=300)
    two = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "sdt_deploy", *args],
                         capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = json.loads(one.stdout), json.loads(two.stdout)
    assert a["samples"] == b["samples"] == 5
    assert a["layers"] == b["layers"] and a["prediction_agreement"] == b["prediction_agreement"]


def test_data_folder_in_imagefolder_layout(tmp_path, capsys):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    code = main(["verify", case_path(CASE), "--data", str(tmp_path), "--executors", "torch,engine", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["ok"] and out["samples"] == 4 and out["accuracy"] is not None


def test_reference_float_reports_agreement_not_exactness(capsys):
    """The agreement of each layer is recomputed here from the two models' own spikes: the float model
    (spikingjelly, as trained) and the quantized one."""
    from sdt_deploy.data.synth import random_inputs
    from sdt_deploy.run.torch_runner import run_model

    path = case_path("plif_1111")
    assert main(["verify", path, "--reference", "float", "--random", "3", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    x = random_inputs(loaded(path).config, 3, seed=0)
    _, ref = run_model(loaded(path).model, x)
    _, q = run_model(quantized(path).model, x)
    for layer, row in rep["layers"].items():
        assert row["quantized"] == pytest.approx(float(np.mean(ref[layer] == q[layer])), abs=1e-12), layer
    assert min(r["quantized"] for r in rep["layers"].values()) < 1.0     # PLIF at tau 2: not exact by nature
    assert sorted(rep["plif_tau_changed"]) == sorted(n for n in ref if "_lif" in n)   # every PLIF the model runs


def test_unknown_executor_is_one_line(capsys):
    assert main(["verify", case_path(CASE), "--executors", "torch,tpu", "--random", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown executor 'tpu'" in err[0]
