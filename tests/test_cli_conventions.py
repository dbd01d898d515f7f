"""One command line: the same conventions in every command (issue 16), and the Python API as its twin."""
import io
import json
import os
import re

import click
import numpy as np
import pytest

from sdt_deploy.cli.app import cli, main

from conftest import case_input, oracle_path

CASE = "lif_0011"
COMMANDS = dict(cli.commands)
LONG_WORK = ("run", "quantize", "export", "verify", "report", "demo", "inspect")
QUANTIZING = ("run", "quantize", "export", "verify", "report", "inspect")


def _params(command: str) -> dict:
    return {p.name: p for p in COMMANDS[command].params}


def _opts(command: str) -> set:
    return {o for p in COMMANDS[command].params for o in getattr(p, "opts", [])}


def test_every_option_has_help_text():
    missing = [f"{name} {p.opts[0]}" for name, c in COMMANDS.items() for p in c.params
               if isinstance(p, click.Option) and not p.help]
    assert not missing, missing


def test_the_checkpoint_is_positional_everywhere():
    for name, c in COMMANDS.items():
        args = [p for p in c.params if isinstance(p, click.Argument)]
        assert [a.name for a in args] == ["ckpt"], name


@pytest.mark.parametrize("command", LONG_WORK)
def test_long_work_has_quiet_and_no_progress(command):
    assert {"--quiet", "--no-progress"} <= _opts(command), command


@pytest.mark.parametrize("command", QUANTIZING)
def test_quantization_settings_wherever_quantization_happens(command):
    assert {"--weight-bits", "--input-bits", "--scale-search", "--input-range"} <= _opts(command), command


def test_one_batch_size_default_and_i_for_input():
    defaults = {name: _params(name)["batch_size"].default for name in COMMANDS if "batch_size" in _params(name)}
    assert set(defaults) >= {"run", "verify", "report", "inspect"} and set(defaults.values()) == {16}, defaults
    for name in ("run", "verify", "report", "inspect"):
        assert "-i" in _opts(name) and "--input" in _opts(name), name


def test_demo_takes_the_checkpoint_and_o_output():
    assert {"-o", "--output"} <= _opts("demo") and "--out" not in _opts("demo") and "--checkpoint" not in _opts("demo")


def test_json_is_a_flag_printing_json_on_stdout_in_every_command(tmp_path, capsys):
    """`--json` means one thing: JSON on stdout instead of the tables; files go through -o or named options."""
    ck, x = oracle_path(CASE), tmp_path / "x.npy"
    np.save(x, case_input(CASE)[:2])
    runs = {
        "inspect": ["inspect", ck, "--json"],
        "run": ["run", ck, "-i", str(x), "--json"],
        "quantize": ["quantize", ck, "-o", str(tmp_path / "q.pth"), "--json"],
        "export": ["export", ck, "--target", "onnx", "-o", str(tmp_path / "m.onnx"), "--json"],
        "verify": ["verify", ck, "-i", str(x), "--executors", "torch,engine", "--json"],
        "report": ["report", ck, "-i", str(x), "--json", "--no-progress"],
    }
    for name, argv in runs.items():
        assert isinstance(_params(name)["as_json"], click.Option) and _params(name)["as_json"].is_flag, name
        capsys.readouterr()
        assert main(argv) == 0, (name, capsys.readouterr().err)
        doc = json.loads(capsys.readouterr().out)       # nothing but JSON on stdout
        assert isinstance(doc, dict) and doc, name
    assert {"files", "note"} <= set(json.loads(_run_json(["export", ck, "--target", "nir", "--force", "-o",
                                                          str(tmp_path / "m.nir"), "--json"], capsys)))


def _run_json(argv, capsys) -> str:
    capsys.readouterr()
    assert main(argv) == 0
    return capsys.readouterr().out


def test_report_prints_its_table_and_keeps_the_notes_behind_explain(capsys):
    ck = oracle_path(CASE)
    assert main(["report", ck, "--random", "2", "--no-progress"]) == 0
    plain = capsys.readouterr().out
    assert "operations and energy per sample" in plain and "--explain" in plain
    assert "Yao et al. 2023" not in plain                 # a note of the paper convention
    assert main(["report", ck, "--random", "2", "--no-progress", "--explain"]) == 0
    assert "Yao et al. 2023" in capsys.readouterr().out


def test_inspect_bits_says_how_many_bits_and_shows_observed_only_from_a_run(capsys):
    ck = oracle_path("gesture_t16")
    assert main(["inspect", ck, "--bits"]) == 0
    out = capsys.readouterr().out
    assert "float32 is exact to 24" in out and "of 25" not in out and "observed" not in out
    assert main(["inspect", ck, "--bits", "--random", "2", "--no-progress", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    rows = doc["bits"]["layers"]
    assert doc["observed_on"]["source"] == "random" and all("observed" in r for r in rows if r["op"] == "lif")
    assert all(r["observed"] <= r["bound"] for r in rows if "observed" in r)   # a run never passes the worst case
    assert main(["inspect", ck, "--random", "2"]) == 2                         # inputs without --bits: refused


def test_target_and_suffix_must_agree(tmp_path, capsys):
    out = tmp_path / "x.onnx"
    assert main(["export", oracle_path(CASE), "--target", "nir", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--target nir writes a .nir file" in err[0] and "--target onnx" in err[0], err
    assert os.listdir(tmp_path) == []


def test_event_frames_of_another_T_are_refused_unless_T_is_given(tmp_path, capsys):
    ck = oracle_path("dvs_tet_t10")                                            # T = 10
    x = np.concatenate([case_input("dvs_tet_t10")[:1]] * 2, axis=1)[:, :12]  # 12 frames
    np.save(tmp_path / "x.npy", x)
    assert main(["run", ck, "-i", str(tmp_path / "x.npy")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "12 event frames per sample, the model's T is 10" in err[0] and "-T 12" in err[0], err
    assert main(["run", ck, "-i", str(tmp_path / "x.npy"), "-T", "12"]) == 0


def _visible(raw: str) -> list:
    """The lines a terminal shows after `raw` (carriage return, erase line, cursor up, colour codes)."""
    lines, col = [""], 0
    for token in re.findall(r"\x1b\[[0-9;?]*[A-Za-z]|\r|\n|[^\x1b\r\n]+", raw):
        if token == "\n":
            lines.append("")
            col = 0
        elif token == "\r":
            col = 0
        elif token.startswith("\x1b["):
            if token.endswith("K"):
                lines[-1] = lines[-1][:col] if token in ("\x1b[K", "\x1b[0K") else ""
            elif token.endswith("A") and len(lines) > 1:
                lines.pop()
                col = 0
        else:
            line = lines[-1]
            lines[-1] = line[:col] + token + line[col + len(token):]
            col += len(token)
    return [ln for ln in lines if ln.strip()]


class _Terminal(io.StringIO):
    def isatty(self):
        return True

    def fileno(self):
        raise io.UnsupportedOperation


def test_a_progress_bar_is_gone_before_the_error_line(monkeypatch):
    """An error in the middle of a run with a progress bar on a terminal: the error is a line of its own."""
    import sys

    import sdt_deploy.verification.executors as E
    from sdt_deploy.errors import DeployError

    def failing(ctx, x, sink):
        raise DeployError("engine: a failure in the middle of the run")

    monkeypatch.setitem(E.RUNNERS, "engine", failing)
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    monkeypatch.setenv("COLUMNS", "100")
    code = main(["verify", oracle_path(CASE), "--random", "4", "--batch-size", "1", "--executors", "torch,engine"])
    assert code == 2
    shown = _visible(term.getvalue())
    assert shown and shown[-1] == "sdt-deploy: error: engine: a failure in the middle of the run", shown


# ---------------------------------------------------------------- the Python API is the CLI's twin

def test_the_api_twins_return_results_and_export_partitions_like_the_cli(tmp_path):
    import sdt_deploy

    ck = oracle_path(CASE)
    res = sdt_deploy.export(ck, "nir", str(tmp_path / "m.nir"))
    assert sorted(os.listdir(tmp_path)) == ["m.manifest.json", "m.nir", "m.stem.onnx"]
    assert res.files and "patch_embed.maxpool3" in res.message
    x = case_input(CASE)[:2]
    v = sdt_deploy.verify(ck, x, executors=["torch", "engine", "nir"], artifacts=[str(tmp_path / "m.nir")])
    assert v.ok and v.to_json()["artifacts"]["nir"]["origin"] == "your file"
    r = sdt_deploy.report(ck, x)
    assert r["totals"]["samples"] == 2 and r["totals"]["engine"]["matches"]
    i = sdt_deploy.inspect(ck, bits=True)
    assert i["params"] > 0 and i["bits"]["summary"]["time_steps"] == 4
    q = sdt_deploy.quantize(ck)
    assert sdt_deploy.verify(q, x, executors=["torch", "engine"]).ok   # a quantized model is a source too
