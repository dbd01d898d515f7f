"""Verify at dataset scale (issue 19, parts 1 and 2): the faster, memory-bounded verifier reports exactly
what the previous one did (tests/verify_reference.py, the verifier of commit 19dcc53, and its NIR
interpreter, tests/nir_interpreter_reference.py) -- every count, first divergence and prediction -- on
the fixture, the variants and random configurations; a single flipped spike or membrane value in any
executor still fails it; the mixed-precision torch reference gives the float64 model's spikes; the batch
comes from the memory budget. No timing here (bench/bench_verify.py, bench/bench_verify_memory.py)."""
import json
import os

import nir
import numpy as np
import onnx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

from exporters.bundle import export_graph
from sdt_deploy import quantize
from sdt_deploy.cli.app import main
from sdt_deploy.data.datasets import ArrayDataset
from sdt_deploy.data.synth import random_inputs, random_model
from sdt_deploy.errors import DeployError
from sdt_deploy.ir.graph import LIF
from sdt_deploy.run import memory as M
from sdt_deploy.run import nir_interpreter as NI
from sdt_deploy.run.nir_artifact import host_feed, open_nir_artifact
from sdt_deploy.run.torch_runner import run_model
from sdt_deploy.verification import executors as E
from sdt_deploy.verification.compare import first_divergence, mismatch_table
from sdt_deploy.verification.reference_model import mixed_model, precision_plan
from sdt_deploy.verification.stream import ReferenceSpikes, SpikeCheck
from sdt_deploy.verification.verifier import run_verify

import nir_interpreter_reference as NIR_REF
import verify_reference as REF
from conftest import ALL_CASES, case_input, case_path, needs_shared, quantized, small_configs, split_everything

EVERY = ["torch", "engine", "onnx-int", "onnx-float", "nir"]


def comparable(res) -> str:
    """What a verify run reports, less the times and the words on the reference's dtype (new keys)."""
    j = res.to_json()
    j.pop("seconds")
    j["bits"] = {k: v for k, v in j["bits"].items() if not k.startswith("reference_")}
    return json.dumps(j, default=float)


def assert_same_report(q, x, executors=EVERY, batch_size=2, jobs=1, **kw):
    new = run_verify(q, ArrayDataset(x), executors, batch_size=batch_size, jobs=jobs, **kw)
    old = REF.run_verify(q, ArrayDataset(x), executors, batch_size=batch_size, **kw)
    assert comparable(new) == comparable(old)
    return new


@pytest.mark.parametrize("name", ALL_CASES)
def test_the_verifier_reports_what_the_previous_one_did(name):
    res = assert_same_report(quantized(case_path(name)), case_input(name)[:3])
    assert res.ok


@pytest.mark.parametrize("name", ["lif_0011", "dvs_tet_t10"])
def test_worker_processes_report_what_one_process_does(name):
    """Two processes (the command's and a worker) take the batches in turn: the same report."""
    res = assert_same_report(quantized(case_path(name)), case_input(name)[:5], batch_size=1, jobs=2)
    assert res.jobs == 2


def test_workers_keeping_their_heap_report_what_one_process_does():
    """As the command line runs it (`tune_heap`: freed memory kept in the heap of the command's process and
    its worker, the run being small against the budget): the report of one process with glibc's defaults."""
    q, x = quantized(case_path("lif_0011")), case_input("lif_0011")[:5]
    kept = run_verify(q, ArrayDataset(x), EVERY, batch_size=1, jobs=2, tune_heap=True)
    plain = run_verify(q, ArrayDataset(x), EVERY, batch_size=1, jobs=1)
    assert kept.jobs == 2 and kept.ok
    assert comparable(kept) == comparable(plain)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(small_configs(), st.integers(0, 2 ** 16), st.integers(1, 3))
def test_property_the_verifier_reports_what_the_previous_one_did(cfg, seed, batch):
    q = quantize(random_model(cfg, seed=seed, calibration=8))
    x = random_inputs(cfg, 3, seed=seed + 1, events=cfg.dvs_mode)
    assert assert_same_report(q, x, batch_size=batch).ok


# ---------------------------------------------------------------- the same diagnosis of a broken file

CASE = "lif_0011"
CONV, LIF_NAME = "block.0.attn.k_conv", "block.0.attn.k_lif"


@pytest.fixture(scope="module")
def broken_files(tmp_path_factory):
    """The default exports of CASE with one weight of CONV a grid step off, spread over many neurons."""
    q = quantized(case_path(CASE))
    d = tmp_path_factory.mktemp("broken")
    files = {}
    for kind, target, variant in (("onnx-int", "onnx", "int"), ("onnx-float", "onnx", "float"),
                                  ("nir", "nir", "int")):
        path = str(d / (f"m.{kind}.nir" if target == "nir" else f"m.{kind}.onnx"))
        export_graph(q.graph, target, path, onnx_variant=variant)
        files[kind] = path
    for variant in ("int", "float"):
        model = onnx.load(files[f"onnx-{variant}"])
        name = f"{CONV}.w_int" if variant == "int" else f"{CONV}.weight"
        init = next(i for i in model.graph.initializer if i.name == name)
        w = numpy_helper.to_array(init).copy()
        w[:, :4] -= 1 if variant == "int" else 2.0 ** -int(q.graph[CONV].w_exp[0])
        init.CopyFrom(numpy_helper.from_array(w, name))
        onnx.save(model, files[f"onnx-{variant}"])
    g = nir.read(files["nir"])
    node = g.nodes[CONV]
    node.weight = np.array(node.weight, copy=True)
    node.weight[:, :4] -= 2.0 ** -int(q.graph[CONV].w_exp[0])
    nir.write(files["nir"], g)
    return q, files


@pytest.mark.parametrize("kind", ["onnx-int", "onnx-float", "nir"])
def test_a_broken_file_is_diagnosed_as_before(broken_files, kind):
    q, files = broken_files
    res = assert_same_report(q, case_input(CASE), ["torch", kind], artifacts={kind: files[kind]})
    assert not res.ok and res.tally.first["executor"] == kind and res.tally.first["layer"] == LIF_NAME


def test_a_broken_engine_is_diagnosed_as_before(monkeypatch):
    real = E.run_engine

    def broken(g, x, **kw):
        g = g.copy()
        g[LIF_NAME].theta_int = g[LIF_NAME].theta_int + 1
        return real(g, x, **kw)

    monkeypatch.setattr(E, "run_engine", broken)
    monkeypatch.setattr(REF, "run_engine", broken)
    res = assert_same_report(quantized(case_path(CASE)), case_input(CASE), ["torch", "engine"])
    assert not res.ok and res.tally.first["candidate_H_int"] is not None


# ---------------------------------------------------------------- a single flipped value is caught

def _flip_spike(runner, layer, t, b, index):
    """`runner` with one spike of `layer` (step t, sample b of the first batch, neuron index) flipped on its
    way to the sink, once."""
    batches = []

    def run(ctx, x, sink):
        batches.append(len(batches))
        first = batches[-1] == 0

        class Flip(E.Sink):
            def spikes(self, name, a, t0=0):
                if first and name == layer and t0 <= t < t0 + a.shape[0]:
                    a = np.array(a, copy=True)
                    a[(t - t0, b) + index] ^= 1
                sink.spikes(name, a, t0)

            def membranes(self, name, v):
                sink.membranes(name, v)

            def step(self, tt, membranes, spikes):
                sink.step(tt, membranes, spikes)

            def per_step(self, y):
                sink.per_step(y)

            def wants(self, arithmetic):
                return sink.wants(arithmetic)
        return runner(ctx, x, Flip())
    return run


@pytest.mark.parametrize("executor", ["torch", "engine", "nir"])
def test_one_flipped_spike_fails_verify(monkeypatch, executor):
    q = quantized(case_path(CASE))
    x = case_input(CASE)[:3]
    t, b, index = 2, 1, (5, 1, 2)
    monkeypatch.setitem(E.RUNNERS, executor, _flip_spike(E.RUNNERS[executor], LIF_NAME, t, b, index))
    res = run_verify(q, ArrayDataset(x), ["torch", "engine", "nir"], batch_size=2, jobs=1)
    assert not res.ok
    first = res.tally.first
    assert (first["layer"], first["step"], first["sample"], tuple(first["neuron"])) == (LIF_NAME, t, b, index)
    flipped = [executor] if executor != "torch" else ["engine", "nir"]    # the reference: every other differs
    for ex in ["torch", "engine", "nir"]:
        want = 1 if ex in flipped else 0
        assert res.tally.mismatches[ex][LIF_NAME] == want, ex
        assert sum(res.tally.mismatches[ex].values()) == want, ex


@pytest.mark.parametrize("variant", ["int", "float"])
def test_one_flipped_membrane_value_of_an_onnx_file_fails_verify(monkeypatch, variant):
    """The file as `export` writes it (no debug outputs): one LIF state value changed at one step."""
    q = quantized(case_path(CASE))
    x = case_input(CASE)[:3]
    real = E.RUNNERS[f"onnx-{variant}"]
    batches = []

    def run(ctx, x, sink):
        batches.append(len(batches))
        first = batches[-1] == 0

        class Flip(E.Sink):
            def step(self, t, membranes, spikes):
                if first and t == 1:
                    membranes = dict(membranes)
                    v = np.array(membranes[LIF_NAME], copy=True)
                    v[(0, 3, 0, 1)] += 1
                    membranes[LIF_NAME] = v
                sink.step(t, membranes, spikes)

            def per_step(self, y):
                sink.per_step(y)
        return real(ctx, x, Flip())

    monkeypatch.setitem(E.RUNNERS, f"onnx-{variant}", run)
    res = run_verify(q, ArrayDataset(x), ["torch", f"onnx-{variant}"], batch_size=2, jobs=1)
    assert not res.ok
    first = res.tally.first
    assert (first["layer"], first["step"], first["sample"], tuple(first["neuron"])) == (LIF_NAME, 1, 0, (3, 0, 1))
    assert res.tally.membrane_mismatches[f"onnx-{variant}"][LIF_NAME] == 1
    assert sum(res.tally.membrane_mismatches[f"onnx-{variant}"].values()) == 1


# ---------------------------------------------------------------- the parts

@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(small_configs(), st.integers(0, 2 ** 16), st.data())
def test_property_the_mixed_precision_reference_gives_the_float64_spikes(cfg, seed, data):
    """The layers the bit analysis marks, and any others forced to float64 as if it had marked them: the
    mixed model's spikes and logits are the float64 model's."""
    from sdt_deploy.quant.bits import bit_report

    q = quantize(random_model(cfg, seed=seed, calibration=8))
    x = random_inputs(cfg, 2, seed=seed + 1, events=cfg.dvs_mode)
    rows = bit_report(q.graph)["layers"]
    forced = set(data.draw(st.lists(st.sampled_from([r["name"] for r in rows]), max_size=4)))
    rows = [{**r, "float32_exact": r["float32_exact"] and r["name"] not in forced} for r in rows]
    plan = precision_plan(q.graph, {"layers": rows})
    ctx = E.Context(q, "", float64_reference=True)
    f64 = E.torch_model(ctx, torch.float64)
    want_logits, want = run_model(f64, x.astype(np.float64))
    model = f64 if plan.whole else mixed_model(q.model, q.graph, plan)
    got_logits, got = run_model(model, x.astype(np.float64) if plan.whole else x)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    np.testing.assert_array_equal(got_logits, want_logits)
    assert next(q.model.parameters()).dtype == torch.float32        # the float32 model is left as it was


def test_the_mixed_reference_of_a_wide_model_runs_float64_only_where_needed():
    q = quantized(case_path("dvs_tet_t10"))
    plan = precision_plan(q.graph)
    assert plan.needed and not plan.whole
    assert set(plan.neurons) <= set(plan.needed)
    n_nodes = len([n for n in q.graph.nodes if n.out_kind == "current" or isinstance(n, LIF)])
    assert len(plan.synaptic | plan.neurons) < n_nodes


class _Keep(E.Sink):
    """A sink that keeps every membrane and the per-step output (the float32 state reference)."""

    def __init__(self):
        self.kept, self.out = {}, None

    def membranes(self, layer, v):
        self.kept[layer] = np.array(v, copy=True)

    def per_step(self, y):
        self.out = np.asarray(y)

    def wants(self, arithmetic):
        return arithmetic == "float32"


@pytest.mark.parametrize("name", [pytest.param("fixture", marks=needs_shared), "plif_dvs_0000"])
def test_the_float32_state_reference_resumed_after_the_shared_stages_is_the_whole_run(name):
    """The mixed reference shares its leading float32 stages with the float32 model; the float32 state
    reference resumed after them equals the float32 model run from the start, every membrane and the
    per-step output, bit for bit; a wrong resume point is caught by the same comparison."""
    q, x = quantized(case_path(name)), case_input(name)[:2]
    ctx = E.Context(q, "", float64_reference=True, states={"float32"})
    assert E.shared_float32_stages(ctx) == ("patch_embed", "block.0")
    whole = _Keep()
    E.torch_in(ctx, x, whole, "float32")               # no prefix yet: the whole float32 run
    E._torch(ctx, x, E.Sink())                         # the reference, leaving its float32 prefix
    assert E.shares_float32_prefix(ctx)
    resumed = _Keep()
    E.torch_in(ctx, x, resumed, "float32")
    assert not E.shares_float32_prefix(ctx)            # used once, then let go
    assert resumed.kept.keys() == whole.kept.keys() and len(whole.kept) > 2
    for k in whole.kept:
        np.testing.assert_array_equal(resumed.kept[k], whole.kept[k], err_msg=k)
        assert resumed.kept[k].dtype == whole.kept[k].dtype == np.float32
    np.testing.assert_array_equal(resumed.out, whole.out)
    E._torch(ctx, x, E.Sink())
    ctx.cache[E.FLOAT32_PREFIX].value = ctx.cache[E.FLOAT32_PREFIX].value * 2   # a wrong stage output
    wrong = _Keep()
    E.torch_in(ctx, x, wrong, "float32")
    assert any(not np.array_equal(wrong.kept[k], whole.kept[k]) for k in whole.kept)


def _nir_runs(q, x, tmp_path):
    path = str(tmp_path / "m.nir")
    export_graph(q.graph, "nir", path)
    art = open_nir_artifact(path)
    _, feed = host_feed(art, x)
    return art.graph, NIR_REF.load_graph(path), feed


def _assert_same_nir(graph, ref_graph, feed, threads=1):
    new = NI.run_nir(graph, feed, membranes=True, threads=threads)
    old = NIR_REF.run_nir(ref_graph, feed, membranes=True)
    for a, b in zip(new, old):
        assert a.keys() == b.keys()
        for k in b:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("name", ALL_CASES)
def test_the_nir_interpreter_gives_what_it_gave(name, tmp_path):
    """The engine's event kernel for the spike convolutions, compacted neuron constants, step outputs let
    go: the same outputs, spikes and membranes as the interpreter of commit 19dcc53."""
    _assert_same_nir(*_nir_runs(quantized(case_path(name)), case_input(name)[:2], tmp_path))


@pytest.mark.parametrize("name", ["lif_0011", "dvs_tet_t10"])
@pytest.mark.parametrize("threads", [2, 3])
def test_the_nir_interpreter_split_over_threads_gives_what_it_gave(name, threads, tmp_path, monkeypatch):
    """The spike convolutions split over the C kernels' team (every layer, however small): the same."""
    split_everything(monkeypatch)
    _assert_same_nir(*_nir_runs(quantized(case_path(name)), case_input(name)[:2], tmp_path), threads=threads)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(small_configs(), st.integers(0, 2 ** 16), st.sampled_from([8, 4, 2]))
def test_property_the_nir_interpreter_gives_what_it_gave(cfg, seed, bits):
    import pathlib
    import tempfile

    q = quantize(random_model(cfg, seed=seed, calibration=8), weight_bits=bits)
    x = random_inputs(cfg, 2, seed=seed + 1, events=cfg.dvs_mode)
    with tempfile.TemporaryDirectory() as d:
        _assert_same_nir(*_nir_runs(q, x, pathlib.Path(d)))


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 6), st.integers(1, 12), st.integers(-20, 20), st.integers(0, 2 ** 16))
def test_property_dyadic_rows_is_the_smallest_exponent(rows, cols, shift, seed):
    rng = np.random.default_rng(seed)
    ints = rng.integers(-2 ** 14, 2 ** 14, size=(rows, cols))
    e_true = shift + rng.integers(0, 8, size=rows)
    values = np.ldexp(ints.astype(np.float64), -e_true[:, None])
    e = NI.dyadic_rows(values)
    scaled = np.ldexp(values, e[:, None])
    assert np.array_equal(scaled, np.round(scaled))                      # integers at e
    nz = np.any(values != 0, axis=1)
    coarser = np.ldexp(values, (e - 1)[:, None])
    assert not np.any(np.all(coarser == np.round(coarser), axis=1) & nz)  # and not at e - 1


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 5), st.integers(1, 4), st.integers(1, 40), st.booleans(), st.integers(0, 2 ** 16),
       st.integers(1, 3), st.sampled_from([0.0, 0.01, 0.05]), st.sampled_from(["uint8", "bool", "uint8 with 2s"]))
def test_property_streamed_spike_comparison_equals_the_whole_array_one(T, B, n, binary, seed, chunk, flip, kind):
    """Packed reference, candidates given whole or step by step (as uint8, as bool, or holding a value
    that is no spike): the counts and the first divergence of `compare.mismatch_table` and
    `compare.first_divergence` on the whole arrays."""
    rng = np.random.default_rng(seed)
    hi = 2 if binary else 4
    layers = {f"l{i}": rng.integers(0, hi, size=(T, B, n + i)).astype(np.uint8) for i in range(3)}
    cand = {k: v.copy() for k, v in layers.items()}
    for v in cand.values():
        flips = rng.random(v.shape) < flip
        v[flips] = (v[flips] + 1) % hi
        if kind == "uint8 with 2s":
            v[rng.random(v.shape) < 0.02] = 2
    if kind == "bool" and binary:
        cand = {k: v.astype(bool) for k, v in cand.items()}
    order = list(layers)
    ref = ReferenceSpikes()
    for k, v in layers.items():
        ref.add(k, v)
        np.testing.assert_array_equal(ref.steps(k, 0, T), v)
    check = SpikeCheck(ref, {k: i for i, k in enumerate(order)})
    for k in reversed(order):                                   # any arrival order
        for t0 in range(0, T, chunk):
            check.add(k, cand[k][t0:t0 + chunk], t0)
    table = mismatch_table(layers, cand)
    assert {k: [r["candidate_spikes"], r["mismatches"]] for k, r in table.items()} == check.rows
    d = first_divergence(layers, cand, order)
    if d is None:
        assert check.first is None
    else:
        f = check.first
        assert (f.layer, f.step, f.sample, f.index, f.reference, f.candidate) == \
            (d.layer, d.step, d.sample, d.index, d.reference, d.candidate)


# ---------------------------------------------------------------- the memory budget

@pytest.mark.parametrize("text,bytes_", [("8G", 8 * 2 ** 30), ("500M", 500 * 2 ** 20), ("1.5GiB", int(1.5 * 2 ** 30)),
                                         ("2048K", 2 ** 21), ("0.5", 2 ** 29), (10 ** 6, 10 ** 6)])
def test_memory_sizes_and_fractions(text, bytes_):
    assert M.parse_memory(text, available=2 ** 30).bytes == bytes_


@pytest.mark.parametrize("bad", ["5x", "-1G", "0", "1.5", "G", "", "0.0"])
def test_a_bad_memory_size_is_one_clear_error(bad):
    with pytest.raises(DeployError, match="--max-memory"):
        M.parse_memory(bad, available=2 ** 30)


def test_the_batch_is_the_largest_that_fits():
    b = M.Budget(10_000, "test")
    plan = M.plan_batch("verify", 16, b, 1_000, 1_000)
    assert plan.batch_size == 9 and plan.note.startswith("verify: batch 16 -> 9")
    assert M.plan_batch("verify", 4, b, 1_000, 1_000).note is None
    tiny = M.plan_batch("verify", 16, M.Budget(500, "test"), 1_000, 1_000)
    assert tiny.batch_size == 1 and "running one sample at a time" in tiny.note
    two = M.plan_batch("verify", 4, b, 1_000, 1_000, jobs=2)
    assert two.jobs == 2 and two.batch_size == 4 and two.note is None
    cut = M.plan_batch("verify", 8, b, 1_000, 1_000, jobs=2)
    assert cut.jobs == 1 and cut.batch_size == 8 and "processes 2 -> 1" in cut.note


def test_verify_picks_its_batch_from_the_budget_and_says_so():
    from sdt_deploy.verification.verifier import memory_per_process

    q = quantized(case_path(CASE))
    models, sample = memory_per_process(q, EVERY, "torch", {"int", "float32"})
    said = []
    res = run_verify(q, ArrayDataset(case_input(CASE)), EVERY, batch_size=4, jobs=1,
                     max_memory=models + 2 * sample + sample // 2, notes=said.append)
    assert res.plan.batch_size == 2 and res.ok and res.tally.samples == len(case_input(CASE))
    assert len(said) == 1 and said[0].startswith("verify: batch 4 -> 2 to stay within --max-memory")


def test_auto_jobs_takes_a_second_process_only_where_it_was_measured_to_pay():
    from sdt_deploy.verification.verifier import AUTO_JOBS_MIN_SAMPLES, auto_jobs

    assert auto_jobs(AUTO_JOBS_MIN_SAMPLES, cpus=2) == 2 and auto_jobs(10_000, cpus=2) == 2
    assert auto_jobs(AUTO_JOBS_MIN_SAMPLES - 1, cpus=2) == 1
    assert auto_jobs(10_000, cpus=1) == 1 and auto_jobs(10_000, cpus=16) == 1


def test_an_automatic_second_process_that_does_not_fit_is_dropped_without_a_word(monkeypatch):
    """Without --jobs, a second process the budget cannot hold is not mentioned (the user asked for none);
    the batch cut still is."""
    from sdt_deploy.verification import verifier as V

    monkeypatch.setattr(V, "auto_jobs", lambda samples, cpus=None: 2)
    q = quantized(case_path(CASE))
    models, sample = V.memory_per_process(q, EVERY, "torch", {"int", "float32"})
    said = []
    res = run_verify(q, ArrayDataset(case_input(CASE)), EVERY, batch_size=4,
                     max_memory=models + 2 * sample + sample // 2, notes=said.append)
    assert res.jobs == 1 and res.plan.batch_size == 2 and res.ok
    assert len(said) == 1 and "processes" not in said[0] and said[0].startswith("verify: batch 4 -> 2")


def test_the_cli_says_when_the_batch_shrinks(capsys, tmp_path):
    args = ["verify", case_path(CASE), "--random", "3", "--executors", "torch,engine", "--max-memory", "605M", "--json"]
    assert main(args) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["ok"] is True
    notes = [line for line in out.err.splitlines() if line.strip()]
    assert len(notes) == 1 and notes[0].startswith("verify: batch 16 -> ") and "605M given" in notes[0]
    assert main(args + ["--quiet"]) == 0
    assert capsys.readouterr().err.strip() == ""
    np.save(tmp_path / "x.npy", case_input(CASE)[:3])
    for cmd in (["report", case_path(CASE), "-i", str(tmp_path / "x.npy")],
                ["run", case_path(CASE), "-i", str(tmp_path / "x.npy"), "--dump", str(tmp_path / "d.npz")]):
        assert main(cmd + ["--max-memory", "603M", "--batch-size", "16"]) == 0, cmd
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and err[0].startswith(f"{cmd[0]}: batch 16 -> "), err


@pytest.mark.parametrize("command", ["verify", "report", "run"])
def test_a_bad_max_memory_is_one_line_before_any_work(capsys, command, tmp_path):
    np.save(tmp_path / "x.npy", case_input(CASE)[:1])
    args = [command, case_path(CASE), "--max-memory", "lots"] + (["-i", str(tmp_path / "x.npy")] if command != "verify"
                                                                  else [])
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--max-memory 'lots'" in err[0], err


def test_run_dump_written_a_batch_at_a_time_holds_the_whole_run(tmp_path):
    from sdt_deploy.files.atomic import NpzStream

    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 2, size=(4, 10, 3), dtype=np.uint8), rng.standard_normal((10, 5)).astype(np.float32)
    with NpzStream(str(tmp_path / "s.npz")) as out:
        for s in range(0, 10, 3):
            out.slice("logits", b.shape, np.float32, (slice(s, s + 3),), b[s:s + 3])
            out.slice("spikes", a.shape, np.uint8, (slice(None), slice(s, s + 3)), a[:, s:s + 3])
    with np.load(tmp_path / "s.npz") as z:
        assert list(z.keys()) == ["logits", "spikes"]
        np.testing.assert_array_equal(z["logits"], b)
        np.testing.assert_array_equal(z["spikes"], a)
    with pytest.raises(RuntimeError):
        with NpzStream(str(tmp_path / "t.npz")) as out:
            out.put("x", a)
            raise RuntimeError("stop")
    assert sorted(os.listdir(tmp_path)) == ["s.npz"]          # nothing left of the interrupted one


def test_a_worker_error_is_the_same_one_line(tmp_path):
    """A file that cannot be verified fails the same way whichever process meets it: here a file with
    debug outputs whose list of spike outputs leaves one layer out."""
    q = quantized(case_path(CASE))
    path = str(tmp_path / "u.onnx")
    export_graph(q.graph, "onnx", path, debug_outputs=True)
    model = onnx.load(path)
    for p in model.metadata_props:
        if p.key == "sdt_deploy.spikes":
            names = json.loads(p.value)
            names.remove(LIF_NAME)
            p.value = json.dumps(names)
    onnx.save(model, path)
    errors = []
    for jobs in (1, 2):
        with pytest.raises(DeployError) as caught:
            run_verify(q, ArrayDataset(case_input(CASE)[:4]), ["torch", "onnx-int"], artifacts={"onnx-int": path},
                       batch_size=1, jobs=jobs)
        errors.append(str(caught.value))
    assert errors[0] == errors[1] and f"no spikes for {LIF_NAME}" in errors[0]


def test_a_v2_graph_gets_the_v2_torch_estimate():
    """A V2 torch model keeps every current of all T steps alive in its forward pass, in float64 for the
    reference (measured on metaspikformer_8_768: 1.74 GiB a sample, 3x what the V1 factors say): its
    graph is recognised and estimated as currents x T x 8 bytes (+ one byte a membrane-step), its models
    as a float32 and a float64 copy of every weight."""
    from v2_helpers import random_v2_model

    from models import V2Config
    from sdt_deploy.api import deploy_graph, loaded

    cfg = V2Config(img_size=32, in_channels=1, num_classes=3, embed_dim=(2, 4, 4, 4), num_heads=2, time_steps=2)
    a = M.activations(deploy_graph(loaded(random_v2_model(cfg))))
    assert a.family == "v2" and a.T == 2
    assert M.executor_bytes("torch", a) == 2 * (8 * a.currents + a.lif)
    assert M.model_bytes("torch", a) == 12 * a.params
    v1 = M.Activations(a.T, a.spikes, a.lif, a.currents, a.largest, a.params)       # the same sizes as V1
    assert M.executor_bytes("torch", v1) == 2 * (24 * a.largest + a.lif) < M.executor_bytes("torch", a)
