"""The shipped demo checkpoint: its accuracy survives int8 quantization, and `sdt-deploy demo` runs the
whole toolchain on it."""
import json

import pytest

from sdt_deploy.cli.app import main
from sdt_deploy.data.digits import digits_split
from sdt_deploy.run.torch_runner import predictions, run_model

from conftest import DEMO_CKPT, loaded, quantized

pytestmark = pytest.mark.skipif(not DEMO_CKPT.exists(), reason="demo checkpoint not built yet")


def _accuracy(model, split):
    logits, _ = run_model(model, split.x, batch_size=120, record=False)
    return 100.0 * float((predictions(logits) == split.y).mean())


def test_int8_loses_at_most_half_a_point_on_the_demo():
    test = digits_split("test")
    assert len(test.y) == 360
    float_acc = _accuracy(loaded(str(DEMO_CKPT)).model, test)
    int8_acc = _accuracy(quantized(str(DEMO_CKPT)).model, test)
    assert float_acc >= 95.0
    assert float_acc - int8_acc <= 0.5, (float_acc, int8_acc)


def test_demo_command_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "OK: every spike of every layer equal in torch, engine, onnx-int, onnx-float, nir" in text
    files = {p.name for p in out.iterdir()}
    assert {"demo.nir", "demo.stem.onnx", "demo.manifest.json", "demo_int.onnx", "demo_float.onnx",
            "demo_int8.pth", "report.json", "report.csv", "report.png"} <= files
    rep = json.loads((out / "report.json").read_text())
    assert rep["totals"]["engine"]["matches"] is True
    assert main(["demo", "-o", str(out)]) == 2                     # not over a non-empty folder...
    assert "not empty" in capsys.readouterr().err
    assert main(["demo", "-o", str(out), "--force"]) == 0           # ...unless asked
