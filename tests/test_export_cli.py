"""`sdt-deploy export` and `quantize` as users run them: files written, read back by third-party readers,
partitioned where NIR cannot be exact, deterministic, atomic, and every bad option one clear line."""
import json
import os
import signal
import subprocess
import sys
import time

import nir
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from sdt_deploy.cli.app import main

from conftest import case_input, oracle_path

CASE = "lif_0011"


def _listing(d):
    return sorted(os.listdir(d))


def test_export_nir_partitions_with_a_clear_note(tmp_path, capsys):
    out = tmp_path / "m.nir"
    assert main(["export", oracle_path(CASE), "--target", "nir", "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert "patch_embed.maxpool3 max-pools real-valued currents" in captured.err
    assert _listing(tmp_path) == ["m.manifest.json", "m.nir", "m.stem.onnx"]
    g = nir.read(str(out))                                     # stock reader, type checking on
    assert "patch_embed.maxpool3" in g.nodes and type(g.nodes["patch_embed.maxpool3"]).__name__ == "Input"
    manifest = json.loads((tmp_path / "m.manifest.json").read_text())
    assert manifest["device"]["input"] == "patch_embed.maxpool3" and manifest["host"]["file"] == "m.stem.onnx"
    ort.InferenceSession(str(tmp_path / "m.stem.onnx"), providers=["CPUExecutionProvider"])


def test_export_nir_without_a_current_maxpool_is_one_file(tmp_path, capsys):
    out = tmp_path / "m.nir"
    assert main(["export", oracle_path("plif_dvs_0000"), "--target", "nir", "-o", str(out)]) == 0
    assert _listing(tmp_path) == ["m.nir"] and capsys.readouterr().err == ""
    g = nir.read(str(out))
    assert "input" in g.nodes and "output" in g.nodes


def test_no_partition_refuses_with_one_line(tmp_path, capsys):
    out = tmp_path / "m.nir"
    assert main(["export", oracle_path(CASE), "--target", "nir", "-o", str(out), "--no-partition"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "NIR cannot compute exactly" in err[0]
    assert _listing(tmp_path) == []


@pytest.mark.parametrize("variant", ["int", "float"])
def test_export_onnx_runs_in_onnxruntime(tmp_path, variant):
    out = tmp_path / "m.onnx"
    assert main(["export", oracle_path(CASE), "--target", "onnx", "--onnx-variant", variant, "-o", str(out)]) == 0
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["sdt_deploy.variant"] == variant and json.loads(meta["sdt_deploy.config"])["dim"] == 32
    from sdt_deploy.run.onnx_runner import run_onnx

    res = run_onnx(str(out), case_input(CASE))
    assert res.logits.shape == (3, 5)


def test_two_cli_exports_are_byte_identical(tmp_path):
    for run in ("a", "b"):
        d = tmp_path / run
        d.mkdir()
        assert main(["export", oracle_path(CASE), "--target", "nir", "-o", str(d / "m.nir")]) == 0
        assert main(["export", oracle_path(CASE), "--target", "onnx", "-o", str(d / "m.onnx")]) == 0
    for f in _listing(tmp_path / "a"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


@pytest.mark.parametrize("argv,words", [
    (["--target", "tflite"], "tflite"),
    (["--target", "nir", "--nir-profile", "exotic"], "exotic"),
    (["--target", "onnx", "--weight-bits", "9"], "--weight-bits must be an integer from 2 to 8"),
    (["--target", "onnx", "--weight-bits", "1"], "--weight-bits must be an integer from 2 to 8"),
    (["--target", "onnx", "--input-bits", "0"], "--input-bits"),
    (["--target", "onnx", "--no-quantize"], "--no-quantize (float weights) applies to --target nir"),
    (["--target", "nir", "--no-quantize"], "--no-quantize"),
])
def test_bad_export_options_fail_with_one_line_and_no_file(tmp_path, capsys, argv, words):
    out = tmp_path / f"m.{argv[1]}"
    code = main(["export", oracle_path(CASE), "-o", str(out), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and words in err[0], err
    assert _listing(tmp_path) == []


def test_unwritable_and_existing_outputs(tmp_path, capsys):
    missing = tmp_path / "no" / "m.onnx"
    assert main(["export", oracle_path(CASE), "--target", "onnx", "-o", str(missing)]) == 2
    assert "does not exist" in capsys.readouterr().err
    existing = tmp_path / "m.nir"
    existing.write_bytes(b"old")
    assert main(["export", oracle_path(CASE), "--target", "nir", "-o", str(existing)]) == 2
    assert "exists (use --force" in capsys.readouterr().err
    assert existing.read_bytes() == b"old" and _listing(tmp_path) == ["m.nir"]   # nothing else written either
    assert main(["export", oracle_path(CASE), "--target", "nir", "-o", str(existing), "--force"]) == 0
    assert nir.read(str(existing))


def test_interrupted_write_leaves_no_partial_file(tmp_path, monkeypatch):
    """Ctrl-C in the middle of writing: the temporary file is removed, the real name never appears."""
    real_open = open
    calls = {"n": 0}

    def interrupting_open(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        if "w" in mode and ".sdt-deploy-" in str(path):
            calls["n"] += 1
            f.write(b"partial")
            f.close()
            raise KeyboardInterrupt
        return f

    monkeypatch.setattr("builtins.open", interrupting_open)
    out = tmp_path / "m.onnx"
    code = main(["export", oracle_path(CASE), "--target", "onnx", "-o", str(out)])
    monkeypatch.undo()
    assert calls["n"] == 1 and code == 130      # the write was reached and interrupted there
    assert _listing(tmp_path) == []


def test_sigint_during_a_real_export_never_leaves_a_partial_file(tmp_path):
    """A real process, a real SIGINT at a few moments: afterwards the output is complete or absent."""
    out = tmp_path / "m.nir"
    for delay in (1.5, 4.0, 6.5):
        for f in os.listdir(tmp_path):
            os.remove(tmp_path / f)
        p = subprocess.Popen([sys.executable, "-m", "sdt_deploy", "export", oracle_path("plif_1111"), "--target",
                              "nir", "-o", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
        names = _listing(tmp_path)
        assert not [n for n in names if n.startswith(".sdt-deploy-")], names
        if p.returncode == 0:
            assert nir.read(str(out))
        else:
            assert "Traceback" not in err
            for n in names:                      # whatever was completed before the signal is whole
                if n.endswith(".nir"):
                    assert nir.read(str(tmp_path / n))


def test_quantize_writes_a_loadable_model(tmp_path, capsys):
    out = tmp_path / "q.pth"
    assert main(["quantize", oracle_path(CASE), "-o", str(out), "--weight-bits", "4"]) == 0
    assert "int4 weights" in capsys.readouterr().out
    from sdt_deploy import load_model
    from sdt_deploy.run.integer_engine import run_engine
    from sdt_deploy.run.torch_runner import run_model

    lm = load_model(str(out))
    assert lm.checkpoint.layout == "quantized" and lm.graph.meta["weight_bits"] == 4
    x = case_input(CASE)
    _, spikes = run_model(lm.model, x)
    r = run_engine(lm.graph, x)
    assert all(np.array_equal(spikes[k], r.spikes[k]) for k in spikes)
    # the quantized file is a checkpoint like any other: run on it equals run --quantize --weight-bits 4
    xp = _save(tmp_path, x)
    assert main(["run", str(out), "--input", xp, "--dump", str(tmp_path / "a.npz")]) == 0
    assert main(["run", oracle_path(CASE), "--input", xp, "--quantize", "--weight-bits", "4",
                 "--dump", str(tmp_path / "b.npz")]) == 0
    with np.load(tmp_path / "a.npz") as a, np.load(tmp_path / "b.npz") as b:
        assert sorted(a.files) == sorted(b.files) and len(a.files) > 5
        assert all(np.array_equal(a[k], b[k]) for k in a.files)


def _save(d, x):
    p = d / "x.npy"
    np.save(p, x)
    return str(p)


@pytest.mark.parametrize("cmd", [
    ["inspect", "{ckpt}"], ["inspect", "{ckpt}", "--graph", "--bits"], ["run", "{ckpt}", "--input", "{x}"],
    ["verify", "{ckpt}", "--random", "1", "--executors", "torch,engine,onnx-int,nir"],
    ["report", "{ckpt}", "--random", "1"],
])
def test_read_only_commands_write_nothing(tmp_path, monkeypatch, capsys, cmd):
    ck = tmp_path / "ck"
    ck.mkdir()
    ckpt = ck / "m.pth"
    ckpt.write_bytes(open(oracle_path(CASE), "rb").read())
    x = _save(ck, case_input(CASE))
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    before = (_listing(ck), _listing(work))
    argv = [a.format(ckpt=ckpt, x=x) for a in cmd]
    assert main(argv) == 0, capsys.readouterr().err
    assert (_listing(ck), _listing(work)) == before
