"""The report's plot, checked through matplotlib's objects, not pixels (issue 16, point 6): layers grouped
by block with a label per block, a colourbar and a legend entry for the per-step markers at any T,
legible tick labels, and a bounded width however many layers."""
from __future__ import annotations

import numpy as np
import pytest

from sdt_deploy.accounting.energy import load_energy_table

from conftest import oracle_path, oracle_ref, quantized

FP32 = load_energy_table("45nm-fp32")


def _engine_report(case: str) -> dict:
    from sdt_deploy.accounting.measure import operation_report

    return operation_report(quantized(oracle_path(case)).graph, [oracle_ref(case)["input"]], FP32)


def _synthetic_report(depth: int, T: int, seed: int = 0) -> dict:
    """A report of a deep model over random spikes (no run needed: the plot reads the report only)."""
    from models import SDTConfig, build_model
    from sdt_deploy.accounting.counting import build_report, tally_spikes
    from sdt_deploy.ir.lower import lower

    cfg = SDTConfig(img_size=16, in_channels=3, num_classes=4, dim=8, depth=depth, num_heads=2, mlp_ratio=2,
                    time_steps=T, pooling_stat="1111")
    g = lower(build_model(cfg))
    rng = np.random.default_rng(seed)
    spikes = {n.name: (rng.random((T, 2) + tuple(n.shape)) < 0.2).astype(np.uint8) for n in g.spike_nodes()}
    return build_report(g, tally_spikes(g, spikes), FP32)


def _figure(rep: dict):
    from sdt_deploy.accounting.render import report_figure

    fig = report_figure(rep)
    fig.canvas.draw()                                   # lays the text out, as saving would
    return fig


def _axes(fig, label: str):
    found = [a for a in fig.axes if a.get_label() == label]
    assert len(found) == 1, [a.get_label() for a in fig.axes]
    return found[0]


def _block_labels(fig) -> list:
    """The bold block names beside the rows (whatever axis carries them)."""
    texts = []
    for ax in fig.axes + [c for a in fig.axes for c in a.child_axes]:
        for t in ax.get_yticklabels() + ax.texts:
            if t.get_text() and t.get_fontweight() in ("bold", 700):
                texts.append(t.get_text())
    return texts


def _step_colours(fig) -> np.ndarray:
    ax = _axes(fig, "firing rates")
    (dots,) = [c for c in ax.collections if c.get_array() is not None]
    return np.asarray(dots.get_array())


@pytest.mark.parametrize("case,T", [("gesture_t16", 16), ("lif_0011", 4), ("odd_1001_t1", 1)])
def test_per_step_markers_have_a_colourbar_and_a_legend_entry_at_any_T(case, T):
    rep = _engine_report(case)
    assert rep["totals"]["time_steps"] == T
    fig = _figure(rep)
    # every step has its colour, and the colourbar names every one of them (0 .. T-1)
    assert sorted(set(_step_colours(fig).tolist())) == list(range(T))
    cbar = _axes(fig, "time step colourbar")
    ticks = [t.get_text() for t in cbar.get_xticklabels() if t.get_text()]
    assert ticks[0] == "0" and ticks[-1] == str(T - 1)
    assert "time step" in cbar.get_xlabel()
    legend = _axes(fig, "firing rates").get_legend()
    entries = [t.get_text() for t in legend.get_texts()]
    assert any("per step" in e and f"{T} steps" in e for e in entries), entries
    assert any("mean over steps" in e for e in entries) and any("LIF output" in e for e in entries)


def test_layers_are_grouped_by_block_with_labels_and_separators():
    rep = _engine_report("mlp1_0101")                  # depth 2
    fig = _figure(rep)
    assert _block_labels(fig) == ["stem", "block.0", "block.1", "head"]
    ax = _axes(fig, "firing rates")
    names = [r["name"] for r in rep["layers"]]
    # one row per layer, in the network's order, named within its block
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert len(labels) == len(names)
    assert labels[names.index("block.1.attn.q_conv")] == "attn.q_conv"
    assert labels[names.index("patch_embed.proj_conv")] == "proj_conv"
    # a separator line at each of the three block boundaries
    first_of = {g: min(i for i, n in enumerate(names) if n.startswith(p))
                for g, p in (("block.0", "block.0."), ("block.1", "block.1."), ("head", "head"))}
    lines = {round(float(ln.get_ydata()[0]), 3) for ln in ax.get_lines() if len(set(ln.get_ydata())) == 1}
    assert {first_of[g] - 0.5 for g in first_of} <= lines


def test_a_deep_model_keeps_legible_labels_in_a_bounded_width():
    rep = _synthetic_report(depth=8, T=16)
    n = len(rep["layers"])
    assert n >= 150                                      # SDT-8-x: 161 rows
    fig = _figure(rep)
    width, height = fig.get_size_inches()
    assert width <= 16.0
    ax = _axes(fig, "firing rates")
    sizes = [t.get_fontsize() for t in ax.get_yticklabels()]
    assert len(sizes) == n and min(sizes) >= 7.0
    # the rows are at least as tall as the labels: no two labels overlap
    row_pt = ax.get_position().height * height * 72 / n
    assert row_pt >= min(sizes) + 1.0
    ys = sorted(t.get_window_extent().y0 for t in ax.get_yticklabels())
    heights = [t.get_window_extent().height for t in ax.get_yticklabels()]
    assert min(np.diff(ys)) >= 0.95 * max(heights)
    assert _block_labels(fig) == ["stem"] + [f"block.{j}" for j in range(8)] + ["head"]


def test_plot_title_says_which_model_was_counted(tmp_path):
    from sdt_deploy.accounting.render import plot_report

    rep = _synthetic_report(depth=1, T=2)               # a float graph: the float model's report
    fig = _figure(rep)
    assert fig._suptitle.get_text().startswith("float model (the checkpoint as trained)")
    rep = _engine_report("lif_0011")
    fig = _figure(rep)
    assert fig._suptitle.get_text().startswith("quantized model (the deployed integer model)")
    out = tmp_path / "p.png"
    plot_report(rep, str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
