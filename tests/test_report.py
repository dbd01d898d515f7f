"""The operation and energy report (sdt_deploy.accounting, sdt_deploy.energy, sdt_deploy.report_cmd).

Every expected value here is computed independently of the report code: from spikes the quantized
torch model dumps, by brute-force loops, or by hand-written FLOPs formulas.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sdt_deploy.accounting.energy import load_energy_table, table_from_mapping
from sdt_deploy.accounting.measure import operation_report
from sdt_deploy.errors import DeployError

from conftest import DEMO_CKPT, FIXTURE_CKPT, FIXTURE_INPUT, needs_shared, oracle_path, oracle_ref, quantized

FP32 = load_energy_table("45nm-fp32")


def _case(name: str):
    """(quantized model, input) of the shared fixture or an oracle variant."""
    if name == "fixture":   # 5 of its 8 digits keep the torch run short; the batches stay uneven
        return quantized(str(FIXTURE_CKPT)), np.load(FIXTURE_INPUT)[:5]
    if name == "demo":
        return quantized(str(DEMO_CKPT)), _demo_input()
    return quantized(oracle_path(name)), oracle_ref(name)["input"]


def _demo_input() -> np.ndarray:
    from sdt_deploy.data.digits import digits_split

    cfg = quantized(str(DEMO_CKPT)).config
    return digits_split("test", img_size=cfg.img_size, channels=cfg.in_channels).x[:6]


def _batches(x: np.ndarray, sizes):
    """Uneven batches, so every count also shows independence of the batching."""
    out, start = [], 0
    for s in sizes:
        if start < len(x):
            out.append(x[start:start + s])
        start += s
    if start < len(x):
        out.append(x[start:])
    return out


_REPORTS: dict = {}


def _report(name: str) -> dict:
    if name not in _REPORTS:
        q, x = _case(name)
        _REPORTS[name] = operation_report(q.graph, _batches(x, (1, 2)), FP32)
    return _REPORTS[name]


def _rows(rep: dict) -> dict:
    return {r["name"]: r for r in rep["layers"]}


FIXTURE_CASE = pytest.param("fixture", marks=needs_shared)
DEMO_CASE = pytest.param("demo", marks=pytest.mark.skipif(not DEMO_CKPT.exists(),
                                                          reason="the demo checkpoint has not been built yet"))


# ---- 1. 1x1 convs and the head: acs == nnz(input spikes) x c_out, from the torch model's spikes ----

def _one_by_one_inputs(cfg) -> dict:
    """Each 1x1 conv / the head -> the spike tensor it reads, written out from the SDT's structure."""
    pairs = {"head": "head_lif"}
    for j in range(cfg.depth):
        a, m = f"block.{j}.attn", f"block.{j}.mlp"
        for key in ("q", "k", "v"):
            pairs[f"{a}.{key}_conv"] = f"{a}.shortcut_lif"
        pairs[f"{a}.proj_conv"] = f"{a}.q_mask_pool" if cfg.dvs_mode else f"{a}.q_mask"
        pairs[f"{m}.fc1_conv"] = f"{m}.fc1_lif"
        pairs[f"{m}.fc2_conv"] = f"{m}.fc2_lif"
    return pairs


@pytest.mark.parametrize("case", [FIXTURE_CASE, "dvs_tet_t10", "mlp1_0101"])
def test_one_by_one_convs_and_head_acs_equal_input_events_times_c_out(case):
    from sdt_deploy.run.torch_runner import run_model

    q, x = _case(case)
    _, spikes = run_model(q.model, x)                  # the quantized torch model, not the engine
    modules = dict(q.model.named_modules())
    rows = _rows(_report(case))
    pairs = _one_by_one_inputs(q.config)
    for layer, src in pairs.items():
        c_out = modules[layer].weight.shape[0]
        if layer != "head":
            assert modules[layer].kernel_size == (1, 1)
        expected = int(np.count_nonzero(spikes[src])) * c_out
        assert rows[layer]["acs"] == expected, layer
        assert rows[layer]["input_from"] == src
    assert len(pairs) == 6 * q.config.depth + 1


# ---- 2. padded 3x3 convs: brute force over output positions and taps ----

def brute_force_acs(S: np.ndarray, k: int, pad: int, c_out: int) -> int:
    """Additions of a stride-1 conv on spikes S [T, B, C, H, W]: for every output position and tap that
    lands on a real input pixel, one addition per input spike there, for each output channel."""
    T, B, C, H, W = S.shape
    Ho, Wo = H + 2 * pad - k + 1, W + 2 * pad - k + 1
    total = 0
    for yo in range(Ho):
        for xo in range(Wo):
            for ky in range(k):
                for kx in range(k):
                    y, x = yo - pad + ky, xo - pad + kx
                    if 0 <= y < H and 0 <= x < W:
                        total += int(S[:, :, :, y, x].sum())
    return total * c_out


def test_padded_conv_counts_match_brute_force_on_a_small_model():
    from sdt_deploy.run.torch_runner import run_model

    q, x = _case("lif_0011")                          # pooling 0011: 3x3 convs at 16x16, 8x8 and 4x4
    _, spikes = run_model(q.model, x)
    pooled2 = F.max_pool2d(torch.from_numpy(spikes["patch_embed.proj_lif2"]).float().flatten(0, 1), 3, 2, 1)
    pooled2 = pooled2.reshape(spikes["patch_embed.proj_lif2"].shape[:2] + pooled2.shape[1:]).numpy()
    inputs = {"patch_embed.proj_conv1": spikes["patch_embed.proj_lif"],
              "patch_embed.proj_conv2": spikes["patch_embed.proj_lif1"],
              "patch_embed.proj_conv3": pooled2,
              "patch_embed.rpe_conv": spikes["patch_embed.proj_lif3"]}
    modules = dict(q.model.named_modules())
    rows = _rows(_report("lif_0011"))
    for layer, S in inputs.items():
        m = modules[layer]
        assert m.kernel_size == (3, 3) and m.padding == (1, 1)
        expected = brute_force_acs(S, 3, 1, m.weight.shape[0])
        assert rows[layer]["acs"] == expected, layer
        # padding excluded: fewer than events x 9 taps whenever an event sits on the border
        assert expected < int(S.sum()) * 9 * m.weight.shape[0]


def test_event_fanout_by_hand():
    from sdt_deploy.accounting.counting import taps_per_input_position

    # 3 positions, k 3, pad 1: an edge input is read by 2 (output, tap) pairs, the middle one by 3
    assert taps_per_input_position(3, 3, 1, 1).tolist() == [2, 3, 2]
    assert taps_per_input_position(5, 1, 1, 0).tolist() == [1, 1, 1, 1, 1]
    # stride 2, pad 1, k 3 on 4 inputs (outputs at y = -1..1, 1..3): 1, 2, 1, 1
    assert taps_per_input_position(4, 3, 2, 1).tolist() == [1, 2, 1, 1]
    S = np.zeros((1, 1, 1, 3, 3), np.uint8)
    S[..., 0, 0] = 1                                     # a corner spike reaches 4 outputs
    assert brute_force_acs(S, 3, 1, 5) == 4 * 5
    S[..., 1, 1] = 1                                     # the centre reaches all 9
    assert brute_force_acs(S, 3, 1, 5) == 13 * 5


# ---- 3. the paper's convention on SDT-8-512 (ImageNet), by hand ----

def test_paper_energy_of_sdt_8_512_by_hand():
    from models import SDTConfig, build_model
    from sdt_deploy.accounting.counting import paper_convention, paper_energy_pj
    from sdt_deploy.files.configs import PUBLISHED, model_keys
    from sdt_deploy.ir.lower import lower

    cfg = SDTConfig(**model_keys(PUBLISHED["imagenet/8_512_300E_t4"]))
    assert (cfg.dim, cfg.depth, cfg.img_size, cfg.time_steps, cfg.pooling_stat) == (512, 8, 224, 4, "1111")
    g = lower(build_model(cfg))
    T = 4
    rates = {"patch_embed.maxpool": 0.21, "patch_embed.maxpool1": 0.17, "patch_embed.maxpool2": 0.13,
             "patch_embed.proj_lif3": 0.11, "head_lif": 0.3}
    for j in range(8):
        rates[f"block.{j}.attn.shortcut_lif"] = 0.2 + 0.01 * j
        rates[f"block.{j}.attn.q_mask"] = 0.03 + 0.002 * j
        rates[f"block.{j}.mlp.fc1_lif"] = 0.15 - 0.005 * j
        rates[f"block.{j}.mlp.fc2_lif"] = 0.06 + 0.001 * j

    # FLOPs by hand: conv k^2 * h_out * w_out * c_in * c_out; linear i * o. 224 -> pools -> 112, 56, 28, 14.
    encoder = 3 * 3 * 224 * 224 * 3 * 64
    sops = (rates["patch_embed.maxpool"] * 3 * 3 * 112 * 112 * 64 * 128
            + rates["patch_embed.maxpool1"] * 3 * 3 * 56 * 56 * 128 * 256
            + rates["patch_embed.maxpool2"] * 3 * 3 * 28 * 28 * 256 * 512
            + rates["patch_embed.proj_lif3"] * 3 * 3 * 14 * 14 * 512 * 512
            + rates["head_lif"] * 512 * 1000)
    for j in range(8):
        sops += rates[f"block.{j}.attn.shortcut_lif"] * 3 * (14 * 14 * 512 * 512)    # q, k, v
        sops += rates[f"block.{j}.attn.q_mask"] * 14 * 14 * 512 * 512                 # proj
        sops += rates[f"block.{j}.mlp.fc1_lif"] * 14 * 14 * 512 * 2048
        sops += rates[f"block.{j}.mlp.fc2_lif"] * 14 * 14 * 2048 * 512
    expected_pj = 4.6 * encoder + 0.9 * T * sops       # a static image: the encoder's MACs once (FL_conv^1)

    paper = paper_convention(g, rates, T)
    assert len(paper) == 5 + 6 * 8 + 1
    assert paper["patch_embed.proj_conv"]["counted_as"] == "MAC"
    assert sum(p["counted_as"] == "AC" for p in paper.values()) == 5 + 6 * 8
    assert paper_energy_pj(paper, FP32) == pytest.approx(expected_pj, rel=1e-12)
    assert expected_pj * 1e-9 == pytest.approx(paper_energy_pj(paper, FP32) * 1e-9)   # mJ, same number

    # event frames change every step: then the encoder's MACs count T times
    events = paper_convention(g, rates, T, static_input=False)
    assert paper_energy_pj(events, FP32) == pytest.approx(expected_pj + 4.6 * (T - 1) * encoder, rel=1e-12)

    # the SDSA's ANDs and token sums are not in the paper's formula: a rate for them changes nothing
    more = dict(rates, **{f"block.{j}.attn.kv_and": 0.5 for j in range(8)})
    assert paper_energy_pj(paper_convention(g, more, T), FP32) == paper_energy_pj(paper, FP32)


def test_vanilla_attention_ops_of_sdt_8_512_block_by_hand():
    from sdt_deploy.accounting.counting import vanilla_attention_ops

    N, D, h = 14 * 14, 512, 8
    ops = vanilla_attention_ops(N, D, h)
    assert ops["mac"] == 2 * N * N * D           # Q K^T and (Q K^T) V
    assert ops["exp"] == h * N * N and ops["add"] == h * N * N and ops["mult"] == 2 * h * N * N


# ---- 4. the measured total equals the integer engine's counter ----

@pytest.mark.parametrize("case", [FIXTURE_CASE, DEMO_CASE, "dvs_tet_t10", "gesture_t16", "mlp1_0101",
                                  "odd_1001_t1", "plif_1111"])
def test_measured_total_equals_the_engine_counter(case):
    from sdt_deploy.run.integer_engine import run_engine

    q, x = _case(case)
    rep = _report(case)                                # computed over uneven batches 1, 2, rest
    whole = run_engine(q.graph, x)                     # one call over every sample
    assert rep["totals"]["measured"]["acs"] == whole.total_acs
    assert rep["totals"]["measured"]["macs"] == whole.total_macs
    assert rep["totals"]["engine"]["matches"] is True
    assert sum(r["acs"] for r in rep["layers"]) == whole.total_acs
    rows = _rows(rep)
    for name, counters in whole.ops.items():
        if "neuron_updates" in counters:
            assert rows[name]["ops"]["neuron_update"] == counters["neuron_updates"]
        if "and" in counters:
            assert rows[name]["ops"]["and"] == counters["and"]


def test_a_wrong_engine_counter_is_caught(monkeypatch):
    """The report counts every layer from the spikes and holds the engine's own counters against that
    count: an engine that miscounts one layer's additions by one is refused, naming the layer."""
    import sdt_deploy.accounting.measure as M

    real = M.run_engine

    def miscounting(*a, **k):
        r = real(*a, **k)
        r.ops["block.0.attn.q_conv"]["acs"] += 1
        return r

    monkeypatch.setattr(M, "run_engine", miscounting)
    q, x = _case("lif_0011")
    with pytest.raises(DeployError, match=r"block\.0\.attn\.q_conv\.ac: report \d+, engine \d+"):
        operation_report(q.graph, [x], FP32)


@needs_shared
def test_measured_energy_by_hand_on_the_fixture():
    """The measured energy from the engine's own counters of one separate run over the same inputs,
    priced by hand with the paper's 45 nm fp32 figures."""
    from sdt_deploy.run.integer_engine import run_engine

    rep = _report("fixture")
    m = rep["totals"]["measured"]
    q, x = _case("fixture")
    counted: dict = {}
    for counters in run_engine(q.graph, x).ops.values():
        for k, v in counters.items():
            counted[k] = counted.get(k, 0) + v
    S = len(x)
    by_hand = (4.6 * counted["macs"] + 0.9 * counted["acs"] + 0.9 * counted["bias_adds"]
               + 0.9 * counted["adds"] + 0.9 * counted.get("comparisons", 0)
               + 0.00375 * (counted["and"] + counted.get("or_inputs", 0)) + 1.8 * counted["neuron_updates"]) / S
    assert rep["totals"]["samples"] == S
    assert m["energy_pj"] == pytest.approx(by_hand, rel=1e-12)
    # the paper's column: E_MAC x encoder FLOPs (a static image: once) + E_AC x sum(rate x T x FLOPs)
    rows = _rows(rep)
    enc = rows["patch_embed.proj_conv"]
    assert enc["flops"] == 3 * 3 * 32 * 32 * 3 * 32
    paper = 4.6 * enc["flops"] + sum(0.9 * 4 * r["input_rate"] * r["flops"]
                                         for r in rep["layers"] if r["kind"] == "synaptic AC")
    assert rep["totals"]["paper"]["energy_pj"] == pytest.approx(paper, rel=1e-12)


# ---- 5. firing rates: weighted by samples, any T ----

def _tiny_graph():
    from sdt_deploy.ir.graph import LIF, Conv, Graph, Input

    w = np.ones((3, 2, 1, 1))
    return Graph([Input("input", (), (2, 4, 4)), Conv("c0", ("input",), (2, 4, 4), weight=np.ones((2, 2, 1, 1))),
                  LIF("a", ("c0",), (2, 4, 4)), Conv("c1", ("a",), (3, 4, 4), weight=w)],
                 {"time_steps": 10})


def test_firing_rates_weight_samples_not_batches_by_hand():
    from sdt_deploy.accounting.counting import firing_rates, measured_ops_from_tally, tally_spikes

    g, T = _tiny_graph(), 10
    one = np.zeros((T, 1, 2, 4, 4), np.uint8)
    one[0::2] = 1                                      # 1 sample, every neuron fires at even steps
    three = np.zeros((T, 3, 2, 4, 4), np.uint8)        # 3 silent samples
    tally = tally_spikes(g, {"a": one}) + tally_spikes(g, {"a": three})
    per_step = firing_rates(g, tally)["a"]
    assert tally.samples == 4 and tally.time_steps == 10
    assert per_step.tolist() == [0.25, 0.0] * 5           # 32 spikes / (4 samples x 32 neurons)
    assert per_step.mean() == 0.125                        # a batch average would say 0.25
    assert measured_ops_from_tally(g, tally)["c1"]["ac"] == 5 * 32 * 3


def test_firing_rates_over_uneven_batches_with_t10_match_the_dumped_spikes():
    from sdt_deploy.run.torch_runner import run_model

    q, x = _case("dvs_tet_t10")                        # T = 10 event frames, 3 samples
    assert x.shape[1] == 10
    rep = operation_report(q.graph, [x[:1], x[1:]], FP32)   # batches of 1 and 2 samples
    _, spikes = run_model(q.model, x)
    rows = _rows(rep)
    batch_weighted_differs = False
    for name in ("block.0.attn.shortcut_lif", "block.0.mlp.fc1_lif", "block.0.mlp.fc2_lif", "head_lif"):
        s = spikes[name].astype(np.float64)            # [T, B, ...]
        per_step = s.reshape(10, -1).mean(axis=1)      # every (sample, neuron) once
        row = next(r for r in rep["layers"] if r["input_from"] == name)
        assert row["input_rate_per_step"] == pytest.approx(per_step.tolist(), abs=1e-15)
        assert row["input_rate"] == pytest.approx(float(s.mean()), abs=1e-15)
        assert rows[name]["output_rate"] == pytest.approx(float(s.mean()), abs=1e-15)
        batch_avg = (s[:, :1].mean() + s[:, 1:].mean()) / 2
        batch_weighted_differs |= abs(batch_avg - s.mean()) > 1e-9
    assert batch_weighted_differs                      # the check can tell the two weightings apart
    assert len(rep["layers"][0]["input_shape"]) == 3


# ---- energy tables ----

def test_builtin_tables_and_their_derivation():
    fp32, int8 = load_energy_table("45nm-fp32"), load_energy_table("45nm-int8")
    assert fp32.price("mac") == pytest.approx(4.6) and fp32.price("ac") == pytest.approx(0.9)
    assert int8.price("mac") == pytest.approx(0.2 + 0.1)   # 8-bit multiply + 32-bit add
    assert int8.price("ac") == pytest.approx(0.1)          # 32-bit add into an int32 accumulator
    assert all(int8.to_dict()["derivation"][op] for op in int8.pj)


def test_energy_table_files(tmp_path):
    j = tmp_path / "chip.json"
    j.write_text(json.dumps({"name": "chip", "base": "45nm-int8", "pj": {"ac": 0.05}}))
    t = load_energy_table(str(j))
    assert t.name == "chip" and t.price("ac") == 0.05 and t.price("mac") == pytest.approx(0.3)
    y = tmp_path / "flat.yaml"
    y.write_text("mac: 2.0\nac: 0.5\n")
    t = load_energy_table(str(y))
    assert t.price("mac") == 2.0 and t.price("add") == pytest.approx(0.9)   # the rest from 45nm-fp32
    with pytest.raises(DeployError, match="unknown operations"):
        table_from_mapping({"pj": {"flop": 1.0}}, "bad")
    with pytest.raises(DeployError, match="non-negative"):
        table_from_mapping({"ac": -1}, "bad")
    with pytest.raises(DeployError, match="built-in"):
        load_energy_table("7nm-magic")
    broken = tmp_path / "broken.json"
    broken.write_text("{ac: ")
    with pytest.raises(DeployError, match="not a readable"):
        load_energy_table(str(broken))


# ---- the command ----

@pytest.fixture()
def small_input(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, oracle_ref("lif_0011")["input"])
    return str(path)


def _invoke(args):
    from click.testing import CliRunner

    from sdt_deploy.cli.report import report

    return CliRunner().invoke(report, args)


def test_report_command_writes_json_csv_plot(tmp_path, small_input):
    out = {k: str(tmp_path / f"r.{k}") for k in ("json", "csv", "png")}
    res = _invoke([oracle_path("lif_0011"), "--input", small_input, "--save-json", out["json"],
                   "--save-csv", out["csv"], "--save-plot", out["png"], "--energy", "45nm-int8", "--batch-size", "2",
                   "--no-progress"])
    assert res.exit_code == 0, res.output
    rep = json.loads(open(out["json"]).read())
    assert {"layers", "totals", "convention", "blocks", "energy_table"} <= set(rep)
    row = rep["layers"][0]
    assert {"name", "kind", "flops", "acs", "macs", "input_rate", "energy_pj", "input_shape",
            "input_rate_per_step", "paper_energy_pj", "ann_energy_pj"} <= set(row)
    assert rep["energy_table"]["name"] == "45nm-int8"
    assert rep["totals"]["engine"]["matches"] is True
    lines = open(out["csv"]).read().splitlines()
    assert len(lines) == 1 + len(rep["layers"])
    assert open(out["png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert "convention" in res.output and "SDSA vs vanilla" in res.output


def test_report_command_refuses_existing_outputs_before_any_work(tmp_path, small_input, monkeypatch):
    import sdt_deploy.cli.report as rc

    existing = tmp_path / "r.json"
    existing.write_text("{}")

    def no_work(*a, **k):
        raise AssertionError("the model was loaded before the outputs were checked")

    monkeypatch.setattr(rc, "open_model", no_work)
    res = _invoke([oracle_path("lif_0011"), "--input", small_input, "--save-json", str(existing)])
    assert isinstance(res.exception, DeployError) and "exists" in str(res.exception)
    assert existing.read_text() == "{}"


def test_report_command_inputs(tmp_path):
    d = str(tmp_path / "default.json")
    res = _invoke([oracle_path("lif_0011"), "--quiet", "--no-progress", "--save-json", d])
    assert res.exit_code == 0, res.output                  # no input given: the first 32 held-out digits
    assert json.loads(open(d).read())["input"] == {"source": "digits", "split": "test", "first": 32,
                                                   "static_input": True, "samples": 32, "time_steps": 4}
    res = _invoke([oracle_path("lif_0011"), "--digits", "2", "--random", "2", "--quiet", "--no-progress"])
    assert isinstance(res.exception, DeployError) and "give only one of" in str(res.exception)
    res = _invoke([oracle_path("lif_0011"), "--data", str(tmp_path), "--quiet", "--no-progress"])
    assert isinstance(res.exception, DeployError) and "--data" in str(res.exception)
    j = str(tmp_path / "d.json")
    res = _invoke([oracle_path("lif_0011"), "--digits", "5", "--save-json", j, "--quiet", "--no-progress"])
    assert res.exit_code == 0, res.output
    rep = json.loads(open(j).read())
    assert rep["input"]["source"] == "digits" and rep["totals"]["samples"] == 5
    res = _invoke([oracle_path("lif_0011"), "--random", "3", "--save-json", j, "--quiet", "--no-progress"])
    assert isinstance(res.exception, DeployError)        # exists, no --force
    res = _invoke([oracle_path("lif_0011"), "--random", "3", "--save-json", j, "--force", "--quiet", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert json.loads(open(j).read())["totals"]["samples"] == 3


def test_report_command_reads_a_dataset_folder(tmp_path):
    pytest.importorskip("sdt_deploy.data.datasets")
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(tmp_path / "data" / c / f"{i}.png")
    j = str(tmp_path / "d.json")
    res = _invoke([oracle_path("lif_0011"), "--data", str(tmp_path / "data"), "--batch-size", "4", "--save-json", j,
                   "--quiet", "--no-progress"])
    assert res.exit_code == 0, res.output
    rep = json.loads(open(j).read())
    assert rep["input"]["source"] == "data" and rep["totals"]["samples"] == 6
