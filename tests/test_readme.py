"""The README cannot rot: every shell and Python block in it runs here, in order, in one temporary folder
holding `ckpt.pth` (the shipped demo checkpoint), `x.npy` (the first four held-out digits), `ckpt_v2.pth`
(the shipped V2 demo) and `x_v2.npy` (the same digits in V2's evaluation transform), the folder the
README's examples assume. A block that cannot run on the CI machine (the install, torchrun
with four processes, a dataset at /data) carries `<!-- readme-test: skip: reason -->` on the line
above it, and the reason must be given. The numbers the README quotes about the demo are computed here
by the tool and compared."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DEMO = ROOT / "sdt_deploy" / "assets" / "demo_sdt_digits.pth"
DEMO_V2_CHECKPOINT = ROOT / "sdt_deploy" / "assets" / "demo_v2_digits.pth"
V2_MEAN, V2_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)    # timm's ImageNet mean/std: V2's transform
SKIP = re.compile(r"<!-- readme-test: skip:(?P<reason>.*?)-->\s*$")
FENCE = re.compile(r"^```(?P<lang>\w*)\s*$")


def readme_blocks(text: str) -> list:
    """[(line, lang, body, skip reason or None)] for every fenced block, the line being its opening fence's."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m and m.group("lang"):
            start, body = i, []
            i += 1
            while not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            prev = lines[start - 1] if start else ""
            skip = SKIP.match(prev)
            blocks.append((start + 1, m.group("lang"), "\n".join(body) + "\n",
                           skip.group("reason").strip() if skip else None))
        i += 1
    return blocks


BLOCKS = readme_blocks(README.read_text())


def test_every_block_runs_or_says_why_not():
    assert {lang for _, lang, _, _ in BLOCKS} <= {"bash", "python"}, "a block in another language: run it here"
    for line, _, _, reason in BLOCKS:
        assert reason is None or len(reason) > 10, f"README line {line}: a skip needs its reason"
    runnable = [b for b in BLOCKS if b[3] is None]
    assert sum(b[1] == "bash" for b in runnable) >= 1 and sum(b[1] == "python" for b in runnable) >= 2


def test_the_block_reader_sees_a_skip_marker_and_the_block_after_it():
    text = "x\n<!-- readme-test: skip: needs four GPUs here -->\n```bash\necho a\n```\n```python\nprint(1)\n```\n"
    assert readme_blocks(text) == [(3, "bash", "echo a\n", "needs four GPUs here"), (6, "python", "print(1)\n", None)]


def test_the_readmes_test_command_is_what_ci_runs():
    test_block = next(body for _, lang, body, _ in BLOCKS if "pytest" in body)
    command = test_block.split("&& ", 2)[-1].strip()      # pip install ... && python -m pytest ...
    assert command.startswith("pip install") and "pytest" in command
    assert command in (ROOT / ".ci" / "run").read_text()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from sdt_deploy.data.digits import digits_split

    d = tmp_path_factory.mktemp("readme")
    shutil.copy(DEMO, d / "ckpt.pth")
    np.save(d / "x.npy", digits_split("test", img_size=32, channels=3).x[:4])
    shutil.copy(DEMO_V2_CHECKPOINT, d / "ckpt_v2.pth")
    np.save(d / "x_v2.npy", digits_split("test", img_size=32, channels=3, mean=V2_MEAN, std=V2_STD).x[:4])
    return d


def test_every_block_of_the_readme_runs(workdir):
    """In order (later blocks use the files earlier ones wrote), with this interpreter's environment: its
    `sdt-deploy` first on PATH."""
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
               PYTHONPATH=str(ROOT))
    for line, lang, body, reason in BLOCKS:
        if reason is not None:
            continue
        cmd = ["bash", "-euo", "pipefail", "-c", body] if lang == "bash" else [sys.executable, "-c", body]
        res = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, (f"README block at line {line} ({lang}) failed with status {res.returncode}:"
                                     f"\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")


def test_the_demo_numbers_in_the_readme_are_the_tools():
    """The two parameter counts the README gives for the demo, computed by `inspect` (the torch model,
    as the original code counts) and by the deploy graph (what `report` calls params)."""
    import sdt_deploy

    text = " ".join(README.read_text().split())
    info = sdt_deploy.inspect(str(DEMO))
    graph_params = sdt_deploy.deploy_graph(str(DEMO)).param_count()
    assert f"**{info['params']:,} parameters** as the original code counts them" in text
    assert f"**{graph_params:,} numbers in the deploy graph**" in text
    assert info["params"] != graph_params
