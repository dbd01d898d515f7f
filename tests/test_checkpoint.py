"""Checkpoint layouts users have, and every kind of bad file: one line, non-zero exit, nothing run,
nothing written."""
import argparse
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from sdt_deploy.api import load_model
from sdt_deploy.cli.app import main
from sdt_deploy.errors import DeployError
from sdt_deploy.files.checkpoint import load_checkpoint

from conftest import DEMO_CKPT, oracle_path, oracle_ref

CASE = "lif_0011"


def original() -> dict:
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(oracle_path(CASE), weights_only=True)


def save(path, obj) -> str:
    torch.save(obj, path)
    return str(path)


def spikes_of(path, **kw):
    from sdt_deploy.run.torch_runner import run_model

    lm = load_model(path, **kw)
    return run_model(lm.model, oracle_ref(CASE)["input"])[1]


def test_original_layout_keys_and_args():
    ck = load_checkpoint(oracle_path(CASE))
    assert ck.layout == "timm" and not ck.ddp_prefix
    assert ck.args["dim"] == 32 and ck.args["pooling_stat"] == "0011"


def test_bare_ddp_and_ema_layouts_load_the_same_model(tmp_path):
    ck = original()
    sd = ck["state_dict"]
    bare = save(tmp_path / "bare.pth", sd)
    ddp = save(tmp_path / "ddp.pth", {**ck, "state_dict": {f"module.{k}": v for k, v in sd.items()}})
    ema_sd = {k: (v * 0.5 if k == "head.weight" else v) for k, v in sd.items()}
    ema = save(tmp_path / "ema.pth", {**ck, "state_dict_ema": {f"module.{k}": v for k, v in ema_sd.items()}})
    flags = {"img_size": 16, "pooling_stat": "0011", "time_steps": 4}   # a bare dict carries no args
    ref = spikes_of(oracle_path(CASE))
    for path, kw in ((bare, {"flags": flags}), (ddp, {}), (ema, {})):
        got = spikes_of(path, **kw)
        assert all(np.array_equal(got[k], ref[k]) for k in ref)
    assert load_checkpoint(ddp).ddp_prefix
    assert load_model(ema, ema=True).model.head.weight.data.equal(sd["head.weight"] * 0.5)
    with pytest.raises(DeployError, match="no 'state_dict_ema'"):
        load_model(oracle_path(CASE), ema=True)


def _marker(tmp_path):
    return tmp_path / "PWNED"


class _System:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Eval:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w')",))


class _Popen:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (subprocess.Popen, (["touch", str(self.marker)],))


@pytest.mark.parametrize("payload,name", [(_System, "system"), (_Eval, "eval"), (_Popen, "Popen")])
def test_pickled_globals_are_refused_and_never_run(tmp_path, capsys, payload, name):
    marker = _marker(tmp_path)
    evil = save(tmp_path / "evil.pth", {**original(), "extra": payload(marker)})
    out = tmp_path / "out.npz"
    x = tmp_path / "x.npy"
    np.save(x, oracle_ref(CASE)["input"])
    code = main(["run", evil, "--input", str(x), "--dump", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1
    assert "refused" in err[0] and name in err[0]
    assert not marker.exists() and not out.exists()


def _bad_files(tmp_path):
    good = open(oracle_path(CASE), "rb").read()
    files = {
        "truncated": good[: len(good) // 2],
        "zero bytes": b"",
        "png": b"\x89PNG\r\n\x1a\n" + b"\x00" * 64,
        "text": b"this is not a checkpoint\n",
    }
    paths = {}
    for name, data in files.items():
        p = tmp_path / f"{name.replace(' ', '_')}.pth"
        p.write_bytes(data)
        paths[name] = str(p)
    ck = original()
    sd = dict(ck["state_dict"])
    resnet = {"conv1.weight": torch.zeros(64, 3, 7, 7), "bn1.weight": torch.ones(64), "bn1.bias": torch.zeros(64),
              "layer1.0.conv1.weight": torch.zeros(64, 64, 3, 3), "fc.weight": torch.zeros(1000, 512),
              "fc.bias": torch.zeros(1000)}
    paths["resnet"] = save(tmp_path / "resnet.pth", resnet)
    missing = dict(sd)
    missing.pop("block.0.attn.k_conv.weight")
    paths["missing key"] = save(tmp_path / "missing.pth", {**ck, "state_dict": missing})
    extra = {**sd, "block.0.attn.bogus": torch.zeros(3)}
    paths["extra key"] = save(tmp_path / "extra.pth", {**ck, "state_dict": extra})
    misshaped = {**sd, "block.0.mlp.fc1_conv.weight": torch.zeros(64, 32, 1, 1)}
    paths["mis-shaped"] = save(tmp_path / "misshaped.pth", {**ck, "state_dict": misshaped})
    nan = {**sd, "block.0.attn.q_conv.weight": sd["block.0.attn.q_conv.weight"].clone().fill_(float("nan"))}
    paths["NaN weight"] = save(tmp_path / "nan.pth", {**ck, "state_dict": nan})
    mean = sd["patch_embed.proj_bn.running_mean"]
    inf = {**sd, "patch_embed.proj_bn.running_mean": torch.full_like(mean, float("inf"))}
    paths["Inf BN stat"] = save(tmp_path / "inf.pth", {**ck, "state_dict": inf})
    neg = {**sd, "patch_embed.rpe_bn.running_var": -sd["patch_embed.rpe_bn.running_var"]}
    paths["negative variance"] = save(tmp_path / "neg.pth", {**ck, "state_dict": neg})
    paths["no state dict"] = save(tmp_path / "nosd.pth", {"epoch": 3, "weights": [1, 2]})
    return paths


EXPECTED_WORDS = {"truncated": "truncated", "zero bytes": "empty", "png": "not", "text": "not",
                  "resnet": "not a Spike-Driven Transformer", "missing key": "missing key block.0.attn.k_conv.weight",
                  "extra key": "unexpected key block.0.attn.bogus", "mis-shaped": "(64, 32, 1, 1)",
                  "NaN weight": "NaN", "Inf BN stat": "Inf", "negative variance": "negative running variance",
                  "no state dict": "no state dict"}


def test_bad_checkpoints_fail_with_one_line_and_write_nothing(tmp_path, capsys):
    x = tmp_path / "x.npy"
    np.save(x, oracle_ref(CASE)["input"])
    for name, path in _bad_files(tmp_path).items():
        out = tmp_path / f"out_{abs(hash(name))}.npz"
        code = main(["run", path, "--input", str(x), "--dump", str(out)])
        err = capsys.readouterr().err.strip().splitlines()
        assert code != 0, name
        assert len(err) == 1, (name, err)
        assert EXPECTED_WORDS[name] in err[0], (name, err[0])
        assert "Traceback" not in err[0]
        assert not out.exists(), name
    leftovers = [p for p in os.listdir(tmp_path) if p.startswith(".sdt-deploy-")]
    assert leftovers == []


def test_console_script_prints_no_traceback(tmp_path):
    """The installed entry point, as a user runs it: exit code and exactly one stderr line."""
    bad = tmp_path / "t.pth"
    bad.write_bytes(b"garbage")
    r = subprocess.run([sys.executable, "-m", "sdt_deploy", "inspect", str(bad)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("sdt-deploy: error: checkpoint")


@pytest.mark.parametrize("argv,words", [
    (["inspect", "--pooling-stat", "01x1"], "pooling_stat"),
    (["inspect", "-T", "0"], "time_steps"),
    (["inspect", "-T", "-2"], "time_steps"),
    (["inspect", "--spike-mode", "alif"], "alif"),
    (["frobnicate"], "No such command"),
])
def test_bad_arguments_fail_with_one_line(capsys, argv, words):
    code = main(argv + ([oracle_path(CASE)] if argv[0] == "inspect" else []))
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and words in err[0], err


@pytest.mark.parametrize("make,words", [
    (lambda x: x[:, :2], "does not end in"),
    (lambda x: x[0], "neither"),
    (lambda x: np.where(x > 1, np.nan, x).astype(np.float32), "NaN"),
    (lambda x: x.astype(np.complex64), "not numeric"),
])
def test_bad_input_arrays_fail_with_one_line(tmp_path, capsys, make, words):
    x = tmp_path / "x.npy"
    np.save(x, make(oracle_ref(CASE)["input"]))
    out = tmp_path / "o.npz"
    code = main(["run", oracle_path(CASE), "--input", str(x), "--dump", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and words in err[0], err
    assert not out.exists()


def test_output_paths_are_checked_before_work(tmp_path, capsys):
    x = tmp_path / "x.npy"
    np.save(x, oracle_ref(CASE)["input"])
    exists = tmp_path / "exists.npz"
    exists.write_bytes(b"keep me")
    cases = [(str(tmp_path / "missing" / "o.npz"), "does not exist"), (str(exists), "exists (use --force")]
    if os.geteuid() != 0:   # root writes anywhere; the read-only case only means something for a user
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        cases.append((str(ro / "o.npz"), "not writable"))
    for out, words in cases:
        code = main(["run", oracle_path(CASE), "--input", str(x), "--dump", out])
        err = capsys.readouterr().err.strip().splitlines()
        assert code != 0 and len(err) == 1 and words in err[0], err
    assert exists.read_bytes() == b"keep me"
    assert main(["run", oracle_path(CASE), "--input", str(x), "--dump", str(exists), "--force"]) == 0
    assert np.load(exists)["logits"].shape == (3, 5)


@pytest.mark.skipif(not DEMO_CKPT.exists(), reason="demo checkpoint not built yet")
def test_demo_checkpoint_is_in_the_original_format():
    ck = load_checkpoint(str(DEMO_CKPT))
    assert ck.layout == "timm" and ck.args["dataset"] == "sklearn/digits"
    with torch.serialization.safe_globals([argparse.Namespace]):
        raw = torch.load(str(DEMO_CKPT), weights_only=True)
    assert {"epoch", "arch", "state_dict", "optimizer", "version", "args", "metric"} <= set(raw)
    assert isinstance(raw["args"], argparse.Namespace)
