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


V2_DEMO = DEMO_CKPT.parent / "demo_v2_digits.pth"


@pytest.mark.skipif(not V2_DEMO.exists(), reason="V2 demo checkpoint not built yet")
def test_v2_demo_loads_as_an_original_v2_checkpoint_and_runs_the_toolchain(tmp_path):
    """The shipped V2 demo: the original save_model layout, shapes from the state dict, its accuracy on the
    held-out digits with V2's evaluation transform, and the demo pipeline (quantize, export NIR + ONNX,
    verify every executor on the written files, report) on a few digits."""
    import argparse

    import torch

    from models import V2Config
    from sdt_deploy import load_model
    from sdt_deploy.cli.demo import run_demo
    from sdt_deploy.data.train_demo_v2 import DEMO_V2_CONFIG

    src = load_model(V2_DEMO)
    assert isinstance(src.config, V2Config) and src.config == DEMO_V2_CONFIG
    assert src.checkpoint.layout == "bare" and src.checkpoint.args["data_path"] == "sklearn_digits"
    with torch.serialization.safe_globals([argparse.Namespace]):
        keys = set(torch.load(V2_DEMO, map_location="cpu", weights_only=True))
    assert keys == {"model", "optimizer", "epoch", "scaler", "args"}
    assert V2_DEMO.stat().st_size < 2_500_000
    test = digits_split("test", img_size=32, channels=3, mean=src.data.mean, std=src.data.std)
    assert _accuracy(src.model, test) >= 85.0
    res = run_demo(str(V2_DEMO), str(tmp_path / "demo"), verify_samples=4, progress=False, quiet=True)
    assert res["verify_ok"] and res["float"] >= 85.0
