"""Exported `.nir` files in third-party simulators, used as their users would (issue 18, docs/nir-interop.md).

Everything goes through the command line: `sdt-deploy export CKPT --target nir --nir-profile P` writes the
files (partitioned: stem ONNX + NIR + manifest), and the expected values come from
`sdt-deploy run CKPT --quantize --dump`, the quantized torch model's logits and spikes under the layer
names the NIR nodes carry in their `sdt_layer` metadata. Each simulator's spikes are recorded on its own
neuron modules: every NIR layer is compared with `==`, and so are the logits formed by the read-out the
file's metadata states (mean over T, or TET's per-step logits).

Cases: the shipped demo, a PLIF variant (plif_1111, T = 3) and dvs_mode + TET at T = 16.
Simulators (optional, the `test` extra): snntorch 1.0 (+ nirtorch 2.6) and norse 1.1.
"""
from __future__ import annotations

import inspect

import nir
import numpy as np
import pytest

from sdt_deploy.cli import main
from sdt_deploy.run.nir_interpreter import torch_threads
from sdt_deploy.run.nir_simulators import nir_feed, readout, run_artifact_with

from conftest import DEMO_CKPT, FIXTURE_CKPT, FIXTURE_INPUT, ORACLE, ORACLE_CASES, ROOT, oracle_ref

CASES = {
    "demo": DEMO_CKPT,
    "plif_1111": ORACLE / "plif_1111.pth",
    "dvs_tet_t16": ROOT / "tests" / "data" / "variants" / "dvs_tet_t16.pth",
}
# every other checkpoint the equivalence tests use, for the norse profile in plain from_nir
MORE_CASES = {**{n: ORACLE / f"{n}.pth" for n in ORACLE_CASES if n not in CASES},
              **({"fixture": FIXTURE_CKPT} if FIXTURE_CKPT.exists() else {})}
# the dt each simulator needs, which the profile's export writes into the graph's metadata
PROFILE_DT = {"portable": 1e-4, "norse": 1e-3}


def case_input(name: str) -> np.ndarray:
    if name == "demo":
        from sdt_deploy.data.digits import digits_split

        return digits_split("test").x[:4]
    if name == "dvs_tet_t16":
        return np.load(ROOT / "tests" / "data" / "variants" / "dvs_tet_t16_input.npy")
    if name == "fixture":
        return np.load(FIXTURE_INPUT)[:2]
    return oracle_ref(name)["input"]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """name -> (input array, reference {logits, layer spikes}); name, profile -> (.nir path, feed)."""
    folder = tmp_path_factory.mktemp("interop")
    refs: dict = {}
    files: dict = {}

    def reference(name):
        if name not in refs:
            x = case_input(name)
            np.save(folder / f"{name}.x.npy", x)
            dump = folder / f"{name}.ref.npz"
            ckpt = str({**CASES, **MORE_CASES}[name])
            assert main(["run", ckpt, "--input", str(folder / f"{name}.x.npy"), "--quantize",
                         "--dump", str(dump)]) == 0
            with np.load(dump) as z:
                refs[name] = x, {k: z[k] for k in z.files}
        return refs[name]

    def exported(name, profile):
        if (name, profile) not in files:
            x, _ = reference(name)
            path = str(folder / f"{name}.{profile}.nir")
            ckpt = str({**CASES, **MORE_CASES}[name])
            assert main(["export", ckpt, "--target", "nir", "--nir-profile", profile, "-o", path]) == 0
            files[name, profile] = path, nir_feed(path, x)
        return files[name, profile]

    return reference, exported


def nir_layers(path: str) -> set:
    g = nir.read(path)
    return {str(n.metadata["sdt_layer"]) for n in g.nodes.values() if "sdt_layer" in (n.metadata or {})}


def compare(executor: str, name: str, profile: str, case) -> tuple[list, bool]:
    """(the NIR layers whose spikes differ from the torch model's, whether the logits are identical)."""
    reference, exported = case
    x, ref = reference(name)
    path, feed = exported(name, profile)
    spikes, logits = run_artifact_with(executor, path, x, feed)
    layers = nir_layers(path)
    assert layers and layers <= set(ref), f"layers the torch model does not record: {sorted(layers - set(ref))}"
    missing = layers - set(spikes)
    assert not missing, f"{executor} exposed no spikes for {sorted(missing)}"
    bad = sorted(k for k in layers if spikes[k].shape != ref[k].shape or not np.array_equal(spikes[k], ref[k]))
    same_logits = logits.shape == ref["logits"].shape and np.array_equal(logits, ref["logits"])
    return bad, same_logits


def first_difference(executor, name, profile, case) -> str:
    reference, exported = case
    x, ref = reference(name)
    path, feed = exported(name, profile)
    spikes, _ = run_artifact_with(executor, path, x, feed)
    for k in sorted(nir_layers(path)):
        if not np.array_equal(spikes[k], ref[k]):
            idx = tuple(int(i) for i in np.argwhere(spikes[k] != ref[k])[0])
            return f"{k}: {int((spikes[k] != ref[k]).sum())} spikes differ, first at {idx}"
    return "logits differ"


# ---------------------------------------------------------------- the profiles in their simulators

@pytest.mark.parametrize("name", sorted(CASES))
def test_norse_profile_is_exact_in_plain_norse_from_nir(name, case):
    """`norse.torch.from_nir(nir.read(path))` with norse's default dt, as a norse user calls it: every
    NIR layer and the logits identical to the quantized torch model."""
    norse = pytest.importorskip("norse.torch", reason="norse is not installed (test extra)")
    assert inspect.signature(norse.from_nir).parameters["dt"].default == PROFILE_DT["norse"]
    path, _ = case[1](name, "norse")
    assert float(nir.read(path).metadata["dt"]) == PROFILE_DT["norse"]
    bad, same_logits = compare("norse.from_nir", name, "norse", case)
    assert not bad, first_difference("norse.from_nir", name, "norse", case)
    assert same_logits


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MORE_CASES))
def test_norse_profile_is_exact_in_norse_for_every_variant(name, case):
    """The same on the other variants (lif, dvs_mode + TET at T = 10, gesture-like, mlp_ratio 1, odd sizes
    at T = 1, a whole graph without a host stem) and the checkpoint written by the original SDT code."""
    pytest.importorskip("norse.torch", reason="norse is not installed (test extra)")
    bad, same_logits = compare("norse.from_nir", name, "norse", case)
    assert not bad, first_difference("norse.from_nir", name, "norse", case)
    assert same_logits


@pytest.mark.parametrize("profile", ["portable", "norse"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_norse_neurons_wired_by_nir_to_torch_are_exact(name, profile, case):
    """norse's own node mapping wired by `nirtorch.nir_to_torch` (which orders nodes by their inputs),
    with the graph's dt: exact for the portable file too."""
    pytest.importorskip("norse.torch", reason="norse is not installed (test extra)")
    path, _ = case[1](name, profile)
    assert float(nir.read(path).metadata["dt"]) == PROFILE_DT[profile]
    bad, same_logits = compare("norse.nir_to_torch(dt)", name, profile, case)
    assert not bad, first_difference("norse.nir_to_torch(dt)", name, profile, case)
    assert same_logits


@pytest.mark.parametrize("name", sorted(CASES))
def test_portable_profile_is_exact_in_snntorch(name, case):
    """snntorch 1.0's `import_from_nir` (its dt is fixed at 1e-4, the portable profile's)."""
    pytest.importorskip("snntorch", reason="snntorch is not installed (test extra)")
    path, _ = case[1](name, "portable")
    assert float(nir.read(path).metadata["dt"]) == PROFILE_DT["portable"]
    bad, same_logits = compare("snntorch", name, "portable", case)
    assert not bad, first_difference("snntorch", name, "portable", case)
    assert same_logits


# ---------------------------------------------------------------- what the matrix says does not work

def test_what_norse_cannot_run(case):
    """The failures docs/nir-interop.md reports (norse 1.1 + nirtorch 2.6), kept true: the standard
    profile does not load (no Threshold mapping), and the portable file loads but computes wrong spikes
    (depth-first execution order) even with the right dt. If an upstream fix makes these pass, the
    matrix must be remeasured."""
    pytest.importorskip("norse.torch", reason="norse is not installed (test extra)")
    with pytest.raises(KeyError):
        compare("norse.from_nir(dt)", "demo", "standard", case)
    bad, same_logits = compare("norse.from_nir(dt)", "demo", "portable", case)
    assert "block.0.attn.kv_and" in bad and not same_logits


def test_norse_profile_needs_its_dt_in_snntorch(case):
    """snntorch's fixed dt = 1e-4 is not the norse profile's 1e-3: that file is for norse."""
    pytest.importorskip("snntorch", reason="snntorch is not installed (test extra)")
    bad, _ = compare("snntorch", "demo", "norse", case)
    assert bad


# ---------------------------------------------------------------- the file's own statements

def depth_first_preorder(graph: nir.NIRGraph) -> list:
    """The order nirtorch 2.6's GraphExecutor (nirtorch.load, norse.torch.from_nir) runs nodes in:
    `nirtorch.graph_utils.trace_execution` from the input, children in edge order."""
    from nirtorch.graph_utils import trace_execution

    children: dict = {n: [] for n in graph.nodes}
    for src, dst in graph.edges:
        if dst not in children[src]:
            children[src].append(dst)
    (start,) = [n for n, node in graph.nodes.items() if isinstance(node, nir.Input)]
    return trace_execution(start, lambda n: children[n])


@pytest.mark.parametrize("name", sorted(CASES))
def test_norse_profile_is_depth_first_safe(name, case):
    """In the norse file, nirtorch's own depth-first walk lists every node after all its inputs and ends
    at the Output; the portable file's walk does not. The zero synapses are exactly zero."""
    pytest.importorskip("nirtorch")
    for profile, safe in (("norse", True), ("portable", False)):
        g = nir.read(case[1](name, profile)[0])
        order = depth_first_preorder(g)
        assert sorted(order) == sorted(g.nodes)
        pos = {n: i for i, n in enumerate(order)}
        late = [(s, d) for s, d in g.edges if pos[s] > pos[d]]
        assert (not late) == safe, late[:3]
        if safe:
            assert isinstance(g.nodes[order[-1]], nir.Output)
            zeros = [n for n in g.nodes.values() if n.metadata.get("role") == "sequencing"]
            assert len(zeros) == 2 * len({k.split(".attn")[0] for k in g.nodes if ".attn." in k})
            assert all(not np.any(z.weight) and not np.any(z.bias) for z in zeros)


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_file_states_its_readout_and_T(name, case):
    """`readout`, `time_steps` and the `readout_rule` sentence in every profile's file; `readout` applied to
    the per-step Output gives the torch model's logits (mean over T, or TET's per-step logits)."""
    reference, exported = case
    x, ref = reference(name)
    from sdt_deploy import load_model

    cfg = load_model(str(CASES[name])).config
    for profile in ("standard", "portable", "norse"):
        g = nir.read(exported(name, profile)[0])
        meta = g.metadata
        assert int(meta["time_steps"]) == cfg.time_steps
        assert meta["readout"] == ("per_step" if cfg.tet else "mean")
        rule = str(meta["readout_rule"])
        assert f"time_steps = {cfg.time_steps} " in rule
        assert ("per_step (TET)" in rule) == cfg.tet and ("readout = mean" in rule) == (not cfg.tet)
        assert str(meta["loader"])
    assert ref["logits"].shape == ((cfg.time_steps, x.shape[0], cfg.num_classes) if cfg.tet
                                   else (x.shape[0], cfg.num_classes))
    g = nir.read(exported(name, "standard")[0])
    with pytest.raises(Exception, match="exported for T"):
        readout(g, np.zeros((cfg.time_steps + 1, 1, cfg.num_classes)))
