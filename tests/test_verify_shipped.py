"""Verify what ships: the files `export` writes by default verify as they are, with the settings they
record; their provenance; refusals of contradicting flags and foreign artifacts; no blind spots (the NIR
device part's exact feed, missing files, one overflow limit)."""
import copy
import hashlib
import json
import os
import shutil

import nir
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from exporters.bundle import export_graph
from sdt_deploy.cli.app import main
from sdt_deploy.data.datasets import ArrayDataset
from sdt_deploy.errors import DeployError
from sdt_deploy.verification.verifier import run_verify

from conftest import DEMO_CKPT, FIXTURE_CKPT, ROOT, case_input, case_path, oracle_path, quantized

DVS16 = ROOT / "tests" / "data" / "variants" / "dvs_tet_t16.pth"


def _sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _inputs(case: str) -> np.ndarray:
    if case == "demo":
        from sdt_deploy.data.digits import digits_split

        return digits_split("test").x[:3]
    if case == "dvs_tet_t16":
        return np.load(ROOT / "tests" / "data" / "variants" / "dvs_tet_t16_input.npy")[:2]
    return case_input(case)[:2]


CKPTS = {"demo": DEMO_CKPT, "fixture": FIXTURE_CKPT, "dvs_tet_t16": DVS16}


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """Per case: the four files `export` writes with its defaults (+ stems and manifests)."""
    made = {}

    def get(case):
        if case not in made:
            ckpt = CKPTS[case]
            if not os.path.exists(ckpt):
                pytest.skip(f"{ckpt} is absent")
            d = tmp_path_factory.mktemp(case)
            np.save(d / "x.npy", _inputs(case))
            for name, args in (("int.onnx", ["--target", "onnx"]), ("float.onnx", ["--target", "onnx",
                                "--onnx-variant", "float"]), ("std.nir", ["--target", "nir"]),
                               ("port.nir", ["--target", "nir", "--nir-profile", "portable"])):
                assert main(["export", str(ckpt), *args, "-o", str(d / name)]) == 0, name
            made[case] = ckpt, d
        return made[case]
    return get


@pytest.mark.parametrize("case", ["demo", "fixture", "dvs_tet_t16"])
def test_default_exports_verify_as_shipped(case, shipped, capsys):
    ckpt, d = shipped(case)
    capsys.readouterr()
    for files, executors in (((d / "int.onnx", d / "float.onnx", d / "std.nir"), "torch,onnx-int,onnx-float,nir"),
                             ((d / "port.nir",), "torch,nir")):
        argv = ["verify", str(ckpt), "--input", str(d / "x.npy"), "--executors", executors, "--json"]
        for f in files:
            argv += ["--artifact", str(f)]
        code = main(argv)
        captured = capsys.readouterr()
        assert code == 0, captured.err
        rep = json.loads(captured.out)
        assert rep["ok"] and rep["first_divergence"] is None
        for f in files:                                   # the user's files ran, named with their sha256
            ex = {"int.onnx": "onnx-int", "float.onnx": "onnx-float"}.get(f.name, "nir")
            assert rep["artifacts"][ex] == {"path": str(f), "sha256": _sha256(f), "origin": "your file"}
        layers = rep["layers"]
        for ex in ("onnx-int", "onnx-float"):             # every LIF's state compared at every step
            if ex in rep["artifacts"]:
                compared = [k for k, row in layers.items() if "membranes" in row.get(ex, {})]
                assert compared and all(layers[k][ex]["membrane_mismatches"] == 0 for k in compared)


@pytest.mark.parametrize("variant", ["int", "float"])
def test_one_weight_off_in_a_default_t16_export_is_caught_by_layer(shipped, tmp_path, capsys, variant):
    """A file without debug outputs: one weight of block.0.attn.k_conv one grid step off changes the
    membrane of block.0.attn.k_lif; verify names that layer."""
    ckpt, d = shipped("dvs_tet_t16")
    q = quantized(str(DVS16))
    conv = q.graph["block.0.attn.k_conv"]
    from sdt_deploy.run.integer_engine import run_engine

    s_in = run_engine(q.graph, _inputs("dvs_tet_t16")).spikes[conv.inputs[0]]
    c_in = int(np.argmax(s_in.sum(axis=(0, 1, 3, 4))))             # the input channel that spiked most
    model = onnx.load(str(d / f"{variant}.onnx"))
    name = f"{conv.name}.w_int" if variant == "int" else f"{conv.name}.weight"
    init = next(i for i in model.graph.initializer if i.name == name)
    w = numpy_helper.to_array(init).copy()
    w[0, c_in, 0, 0] += 1 if variant == "int" else 2.0 ** -int(conv.w_exp[0])
    init.CopyFrom(numpy_helper.from_array(w, name))
    bad = tmp_path / f"bad.{variant}.onnx"
    onnx.save(model, str(bad))
    capsys.readouterr()
    code = main(["verify", str(ckpt), "--input", str(d / "x.npy"), "--executors", f"torch,onnx-{variant}",
                 "--artifact", str(bad)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert "layer block.0.attn.k_lif," in err[0] and "membrane after the step" in err[0], err[0]


def test_one_threshold_off_in_a_default_export_is_caught_by_layer(shipped, tmp_path, capsys):
    ckpt, d = shipped("dvs_tet_t16")
    layer = "block.0.mlp.fc1_lif"
    model = onnx.load(str(d / "int.onnx"))
    init = next(i for i in model.graph.initializer if i.name == f"{layer}.theta_int")
    th = numpy_helper.to_array(init).copy()
    th.reshape(-1)[:] -= 1                                    # every channel fires one grid step early
    init.CopyFrom(numpy_helper.from_array(th, init.name))
    bad = tmp_path / "bad_theta.onnx"
    onnx.save(model, str(bad))
    capsys.readouterr()
    code = main(["verify", str(ckpt), "--input", str(d / "x.npy"), "--executors", "torch,onnx-int", "--artifact",
                 str(bad)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and f"layer {layer}," in err[0], err


# ---------------------------------------------------------------- provenance and settings

CASE = "lif_0011"


def test_every_artifact_records_its_provenance(tmp_path):
    ck = oracle_path(CASE)
    sha = _sha256(ck)
    assert main(["export", ck, "--target", "onnx", "--weight-bits", "5", "-o", str(tmp_path / "m.onnx")]) == 0
    assert main(["export", ck, "--target", "nir", "--scale-search", "max", "-o", str(tmp_path / "m.nir")]) == 0
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    prov = json.loads(meta["sdt_deploy.provenance"])
    assert prov["checkpoint_sha256"] == sha and prov["checkpoint"] == "lif_0011.pth" and prov["tool_version"]
    quant = json.loads(meta["sdt_deploy.quantization"])
    assert quant["weight_bits"] == 5 and quant["scale_search"] == "mse" and quant["input_bits"] == 8
    assert "input_range" in quant and meta["sdt_deploy.time_steps"] == "4"
    g = nir.read(str(tmp_path / "m.nir"))
    assert json.loads(g.metadata["sdt_provenance"])["checkpoint_sha256"] == sha
    assert json.loads(g.metadata["sdt_quantization"])["scale_search"] == "max"
    manifest = json.loads((tmp_path / "m.manifest.json").read_text())
    assert manifest["provenance"]["checkpoint_sha256"] == sha and manifest["quantization"]["scale_search"] == "max"


@pytest.mark.parametrize("setting", [["--scale-search", "max"], ["--weight-bits", "4"], ["--input-bits", "6"],
                                     ["-T", "6"]])
def test_exports_with_other_settings_verify_without_flags(setting, tmp_path, capsys):
    ck = oracle_path(CASE)
    out = tmp_path / "m.onnx"
    assert main(["export", ck, "--target", "onnx", *setting, "-o", str(out)]) == 0
    capsys.readouterr()
    code = main(["verify", ck, "--random", "2", "--executors", "torch,onnx-int", "--artifact", str(out), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert json.loads(captured.out)["ok"]


def test_a_contradicting_flag_is_refused_naming_both_values(tmp_path, capsys):
    ck = oracle_path(CASE)
    out = tmp_path / "m.onnx"
    assert main(["export", ck, "--target", "onnx", "--weight-bits", "4", "-o", str(out)]) == 0
    capsys.readouterr()
    code = main(["verify", ck, "--random", "1", "--weight-bits", "8", "--artifact", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "--weight-bits 8 contradicts m.onnx" in err[0] and "weight_bits 4" in err[0]
    code = main(["verify", ck, "--random", "1", "-T", "3", "--artifact", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--time-steps 3" in err[0] and "time_steps 4" in err[0], err


def test_an_artifact_of_another_checkpoint_is_refused_naming_both_hashes(tmp_path, capsys):
    out = tmp_path / "m.onnx"
    assert main(["export", oracle_path(CASE), "--target", "onnx", "-o", str(out)]) == 0
    capsys.readouterr()
    other = oracle_path("plif_1111")
    code = main(["verify", other, "--random", "1", "--artifact", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert _sha256(oracle_path(CASE)) in err[0] and _sha256(other) in err[0]
    # their configurations differ first (in field order) in depth: 1 block there, 2 here
    assert "first configuration field that differs: depth (1 there, 2 here)" in err[0], err[0]


# ---------------------------------------------------------------- no blind spots

def test_a_device_part_without_its_stem_and_manifest_is_one_line(tmp_path, capsys):
    assert main(["export", oracle_path(CASE), "--target", "nir", "-o", str(tmp_path / "m.nir")]) == 0
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(tmp_path / "m.nir", alone / "m.nir")
    capsys.readouterr()
    code = main(["verify", oracle_path(CASE), "--random", "1", "--executors", "torch,nir", "--artifact",
                 str(alone / "m.nir")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "m.stem.onnx" in err[0] and "m.manifest.json" in err[0] and "device part" in err[0]


def _wide_cut_graph():
    """lif_0011 with a constant 2**30 grid steps added to channel 0 of the stem's last conv (so the cut's
    values need 31 bits) and taken away again in the rpe conv's bias (so the residual stream stays as it
    was, and its low bits matter)."""
    q = copy.deepcopy(quantized(case_path(CASE)))
    g = q.graph
    conv3, rpe = g["patch_embed.proj_conv3"], g["patch_embed.rpe_conv"]
    K = 2 ** 30
    conv3.b_int = conv3.b_int.copy()
    conv3.b_int[0] += K
    shift = int(rpe.grid[0]) - int(conv3.grid[0])
    rpe.b_int = rpe.b_int.copy()
    rpe.b_int[0] -= K * 2 ** shift if shift >= 0 else K // 2 ** -shift
    for n in (conv3, rpe):
        n.bias = n.b_int * np.exp2(-n.grid.astype(np.float64))
    q.model = None
    return q


def test_the_nir_device_part_is_fed_exactly_past_24_bits(tmp_path, monkeypatch):
    from sdt_deploy.quant.bits import bit_report
    from sdt_deploy.run import nir_artifact

    q = _wide_cut_graph()
    cut = next(r for r in bit_report(q.graph)["layers"] if r["name"] == "patch_embed.maxpool3")
    assert cut["int_bits"] > 25                              # more than float32's 24 bits
    export_graph(q.graph, "nir", str(tmp_path / "m.nir"))
    x = case_input(CASE)
    res = run_verify(q, ArrayDataset(x), ["torch", "engine", "nir"], artifacts={"nir": str(tmp_path / "m.nir")})
    assert res.ok, res.tally.first
    # the same file fed through float32, as the host output used to be, loses the low bits of the cut
    exact = nir_artifact.cut_values

    def through_float32(stem):
        return exact(stem).astype(np.float32).astype(np.float64)

    monkeypatch.setattr(nir_artifact, "cut_values", through_float32)
    res32 = run_verify(q, ArrayDataset(x), ["torch", "nir"], artifacts={"nir": str(tmp_path / "m.nir")})
    assert not res32.ok and res32.tally.first["executor"] == "nir"


def test_one_overflow_limit_for_the_engine_the_bit_report_and_the_onnx_exporter():
    """Bounds pushed towards int64's limit by one bias: the engine, the bit report and the ONNX int export
    accept and refuse together; the limit is 2**63 on the largest magnitude the arithmetic forms (a LIF's
    V + X, twice its state's bound)."""
    from exporters.onnx import to_onnx
    from sdt_deploy.quant.bits import bit_report, check_engine_bounds

    base = quantized(case_path(CASE)).graph
    verdicts = {}
    for exp in (40, 60, 61.5, 62.2, 62.8):
        g = copy.deepcopy(base)
        fc2 = g["block.0.mlp.fc2_conv"]
        fc2.b_int = fc2.b_int.copy()
        fc2.b_int[0] = int(2.0 ** exp)
        engine_ok = bits_ok = onnx_ok = True
        try:
            check_engine_bounds(g)
        except DeployError:
            engine_ok = False
        bits_ok = bit_report(g)["summary"]["engine_int64_ok"]
        try:
            to_onnx(g, "int", check=False)
        except DeployError:
            onnx_ok = False
        assert engine_ok == bits_ok == onnx_ok, (exp, engine_ok, bits_ok, onnx_ok)
        verdicts[exp] = engine_ok
    assert verdicts[40] and not verdicts[62.8]
    assert sorted(set(verdicts.values())) == [False, True]
