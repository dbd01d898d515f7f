"""The torch SDT against what the ORIGINAL code computed: every spike tensor with `==`, logits to 1e-5.

Expected values: `../shared/fixtures` (written by the original training code) and tests/data/oracle
(the original model's `forward(x, hook)` outputs for small variants). Nothing here compares the project
with itself.
"""
import numpy as np
import pytest
import torch

from models import spike_names
from sdt_deploy.cli.app import main
from sdt_deploy.run.torch_runner import run_model, to_original_hooks

from conftest import (
    FIXTURE_CKPT,
    FIXTURE_INPUT,
    ORACLE_CASES,
    fixture_ref,
    loaded,
    needs_shared,
    oracle_path,
    oracle_ref,
)


def assert_matches_original(cfg, logits, spikes, ref):
    hooks = to_original_hooks(spikes, cfg)
    expected_hooks = sorted(k for k in ref if k not in ("input", "label", "logits"))
    assert sorted(hooks) == expected_hooks
    for name in expected_hooks:
        assert hooks[name].shape == ref[name].shape, name
        np.testing.assert_array_equal(hooks[name], ref[name], err_msg=name)
    np.testing.assert_allclose(logits, ref["logits"], rtol=0, atol=1e-5)


@needs_shared
def test_fixture_reproduces_every_spike_of_the_original():
    lm = loaded(str(FIXTURE_CKPT))
    logits, spikes = run_model(lm.model, np.load(FIXTURE_INPUT))
    assert_matches_original(lm.config, logits, spikes, fixture_ref())
    assert list(logits.argmax(-1)) == [4, 9, 6, 8, 7, 7, 2, 1]   # the fixture README's labels


@needs_shared
def test_fixture_one_image_at_a_time_gives_the_same_spikes():
    lm = loaded(str(FIXTURE_CKPT))
    x = np.load(FIXTURE_INPUT)[:3]
    _, whole = run_model(lm.model, x)
    _, single = run_model(lm.model, x, batch_size=1)
    for k in whole:
        np.testing.assert_array_equal(whole[k], single[k], err_msg=k)


@pytest.mark.parametrize("name", ORACLE_CASES)
def test_variant_reproduces_every_spike_of_the_original(name):
    lm = loaded(oracle_path(name))
    ref = oracle_ref(name)
    logits, spikes = run_model(lm.model, ref["input"])
    assert list(spikes) == spike_names(lm.config)
    assert_matches_original(lm.config, logits, spikes, ref)


def test_variants_cover_the_published_kinds():
    """The variant set must keep covering what users bring (guards against a shrinking test set)."""
    cfgs = [loaded(oracle_path(n)).config for n in ORACLE_CASES]
    assert {c.spike_mode for c in cfgs} == {"lif", "plif"}
    assert any(c.dvs_mode for c in cfgs) and any(c.tet for c in cfgs)
    assert {1, 16} <= {c.time_steps for c in cfgs}
    assert len({c.pooling_stat for c in cfgs}) >= 5
    assert any(c.hidden_dim == c.dim for c in cfgs)


@needs_shared
def test_cli_run_dump_matches_the_original(tmp_path, capsys):
    out = tmp_path / "dump.npz"
    assert main(["run", str(FIXTURE_CKPT), "--input", str(FIXTURE_INPUT), "--dump", str(out)]) == 0
    assert "predictions: 4 9 6 8 7 7 2 1" in capsys.readouterr().out
    with np.load(out) as z:
        dump = {k: z[k] for k in z.files}
    lm = loaded(str(FIXTURE_CKPT))
    spikes = {k: v for k, v in dump.items() if k != "logits"}
    assert set(spikes) == set(spike_names(lm.config))
    assert all(v.dtype == np.uint8 for v in spikes.values())
    assert spikes["block.0.attn.kv_and"].shape == (4, 8, 256, 8, 8)
    assert spikes["block.1.attn.talking_heads_lif"].shape == (4, 8, 256)
    assert_matches_original(lm.config, dump["logits"], spikes, fixture_ref())


def test_event_input_sets_T_itself():
    """A [B,T,C,H,W] input runs for its own T, as the original's forward does."""
    lm = loaded(oracle_path("gesture_t16"))
    x = oracle_ref("gesture_t16")["input"][:, :5]
    logits, spikes = run_model(lm.model, x)
    assert spikes["head_lif"].shape[0] == 5 and logits.shape == (3, 11)


def test_runs_on_cpu_without_cupy():
    """CuPy absent (cupy import blocked): the model still imports, builds and runs on the torch backend."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['cupy'] = None\n"
        "import numpy as np\n"
        "from models import SDTConfig, build_model, cupy_available\n"
        "from sdt_deploy.run.torch_runner import run_model\n"
        "assert not cupy_available()\n"
        "m = build_model(SDTConfig(img_size=16, dim=16, depth=1, num_heads=2, pooling_stat='0011', num_classes=3))\n"
        "y, s = run_model(m, np.zeros((1, 3, 16, 16), np.float32))\n"
        "assert {mod.backend for mod in m.modules() if hasattr(mod, 'backend')} == {'torch'}\n"
        "print('ok', y.shape)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "ok (1, 3)" in r.stdout


def test_backend_follows_the_device():
    from models.neurons import backend_for

    assert backend_for(torch.zeros(1)) == "torch"
