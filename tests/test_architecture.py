"""The house rules, enforced: the layers (import-linter contracts in pyproject.toml), the lint (ruff), and
every back end's dispatch table covering every deploy-graph op, so that a new op cannot be half added."""
import os
import shutil
import subprocess
import sys

import pytest

from exporters.nir import _EMIT as NIR_EMIT
from exporters.onnx import LOWER as ONNX_LOWER
from sdt_deploy.accounting.counting import ACCOUNTING
from sdt_deploy.ir.graph import (
    NODE_TYPES,
    And,
    BatchNorm,
    BNPad,
    Broadcast,
    Input,
    KVProduct,
    MaxPool,
    OrPool,
    QKVProduct,
    SpatialMean,
)
from sdt_deploy.quant.bits import BOUNDS
from sdt_deploy.quant.contract import RULES as QUANTIZATION_RULES
from sdt_deploy.run.float_executor import FLOAT_EVAL
from sdt_deploy.run.integer_engine import INTEGER_EVAL

from conftest import ROOT

FOLDED_OR_REWRITTEN = {BatchNorm, BNPad, SpatialMean}   # gone before quantization (fold_bn, the head rewrite)
# products of two dynamic tensors (V2's kv = k^T v, q kv): no NIR node computes one; partitioned to the host
NO_NIR_NODE = {KVProduct, QKVProduct}

# (table, the op types it need not handle, and why)
TABLES = {
    "quantization rules": (QUANTIZATION_RULES, {BatchNorm}),   # folded before; SpatialMean, BNPad refused by rule
    "worst-case bounds": (BOUNDS, FOLDED_OR_REWRITTEN | {And, OrPool, Broadcast}),   # spikes have no bound
    "float executor": (FLOAT_EVAL, set()),                              # runs unfolded float graphs too
    "integer engine": (INTEGER_EVAL, FOLDED_OR_REWRITTEN),
    "ONNX lowering": (ONNX_LOWER, FOLDED_OR_REWRITTEN | {Input}),       # the input is lowered before the step
    "NIR emitters": (NIR_EMIT, FOLDED_OR_REWRITTEN | {MaxPool} | NO_NIR_NODE),   # no exact encoding: partitioned
    "report accounting": (ACCOUNTING, set()),
}


@pytest.mark.parametrize("table", sorted(TABLES))
def test_every_back_end_handles_every_op(table):
    rules, exempt = TABLES[table]
    ops = set(NODE_TYPES.values())
    missing = sorted(cls.__name__ for cls in ops - set(rules) - exempt)
    stale = sorted(cls.__name__ for cls in set(rules) & exempt)
    unknown = sorted(getattr(cls, "__name__", str(cls)) for cls in set(rules) - ops)
    assert not missing, f"{table}: no rule for {missing}"
    assert not stale and not unknown, (stale, unknown)


def _tool(name: str) -> str:
    path = (shutil.which(name, path=str(ROOT / ".venv" / "bin")) or shutil.which(name)
            or shutil.which(name, path=os.path.dirname(sys.executable)))      # this interpreter's environment
    if path is None:
        pytest.fail(f"{name} is not installed (it is in the test extra)")
    return path


def test_import_layers_hold():
    """ir <- quant <- exporters / run <- verify / report <- api <- cli, models below everything: the
    import-linter contracts of pyproject.toml."""
    run = subprocess.run([_tool("lint-imports")], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "0 broken" in run.stdout


def test_ruff_passes():
    run = subprocess.run([_tool("ruff"), "check", "--no-cache", "sdt_deploy", "models", "exporters", "tests", "bench"],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]


def test_a_layer_violation_is_caught(tmp_path):
    """The contracts can fail: a copy of the package where the IR imports the command line breaks them."""
    if sys.platform.startswith("win"):
        pytest.skip("POSIX paths")
    for pkg in ("sdt_deploy", "models", "exporters"):
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("assets", "__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    with open(tmp_path / "sdt_deploy" / "ir" / "graph.py", "a") as f:
        f.write("\nimport sdt_deploy.cli.app  # noqa: E402,F401\n")
    run = subprocess.run([_tool("lint-imports")], cwd=tmp_path, capture_output=True, text=True,
                         env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert run.returncode != 0 and "sdt_deploy.ir.graph -> sdt_deploy.cli.app" in run.stdout, run.stdout[-2000:]


def test_every_public_name_of_the_package_resolves():
    """`sdt_deploy.<name>` for every name in `__all__` (they are imported lazily: a moved module would
    otherwise fail only when a user first touches the name)."""
    import sdt_deploy

    for name in sdt_deploy.__all__:
        assert getattr(sdt_deploy, name) is not None, name
