"""The profile's figures (`moa_jax.profile.outputs`): spans.png and loss_vs_density.png are
written, read back as images, and titled with the model, the plan and the budget; every
candidate has its own legend entry, the chosen one marked."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from moa_jax.profile.outputs import (
    plot_loss_vs_density,
    plot_spans,
    plots,
    spans_title,
)
from moa_jax.search.optimize import SearchProblem, Solution
from moa_jax.search.rules import scaled_grid

LENGTHS = (1024, 2048)
VAL_N = 4096
LAYERS, HEADS = 30, 9  # SmolLM2-135M's shape: the cells must still hold readable labels


@pytest.fixture(scope="module")
def search():
    """A rule grid, a problem with random losses and three candidates, c0 chosen."""
    grid = scaled_grid(LENGTHS)
    rng = np.random.default_rng(0)
    r = len(grid)
    losses = {n: rng.random((LAYERS, HEADS, r)) for n in LENGTHS}
    problem = SearchProblem(losses, {n: grid.kv_density(n) for n in LENGTHS}, budget_on="kv-cache")
    meta = {
        "model": "smollm2-135m",
        "budget": {"kv_density": 0.5, "on": "kv-cache", "density_lengths": [1024, 2048, 4096]},
    }
    cands = {}
    for i in range(3):
        choice = rng.integers(0, r, (LAYERS, HEADS))
        plan = grid.plan(choice, metadata=meta)
        cands[f"c{i}"] = Solution(
            choice,
            {
                n: float(losses[n][np.arange(LAYERS)[:, None], np.arange(HEADS), choice].sum())
                for n in LENGTHS
            },
            {n: plan.kv_density(n) for n in LENGTHS},
        )
    plan = grid.plan(cands["c0"].choice, metadata=meta)
    measured = {
        "c0": np.array([1.36]),
        "c1": np.array([1.38]),
        "dense": np.array([1.32]),
        "uniform": np.array([1.39]),
    }
    dens = {"c0": plan.kv_density(VAL_N), "c1": 0.45, "dense": 1.0, "uniform": 0.5}
    return grid, problem, cands, plan, measured, dens


def _image(path):
    assert path.stat().st_size > 0
    with Image.open(path) as im:
        im.load()
        return im.size


def test_spans_png_has_model_plan_and_budget_in_its_title(search, tmp_path):
    _, _, _, plan, _, _ = search
    fig = plot_spans(tmp_path / "spans.png", plan, VAL_N, "c0", 0.5)
    w, h = _image(tmp_path / "spans.png")
    assert w > 300 and h > 300
    title = fig.axes[0].get_title()
    assert title == spans_title(plan, VAL_N, "c0", 0.5)
    for words in ("smollm2-135m", "plan c0", f"N={VAL_N}", "<= 0.5", "KV-cache size", "1024"):
        assert words in title, (words, title)
    assert fig.axes[0].get_xlabel() == "query head" and fig.axes[0].get_ylabel() == "layer"
    # every cell labelled (30 x 9 fits), at a readable size
    texts = fig.axes[0].texts
    assert len(texts) == LAYERS * HEADS
    assert min(t.get_fontsize() for t in texts) >= 4


def test_spans_labels_only_where_they_fit(search, tmp_path):
    grid, _, _, _, _, _ = search
    big = grid.plan(np.zeros((160, 128), np.int64), metadata={"model": "big"})
    fig = plot_spans(tmp_path / "spans.png", big, VAL_N, "c0", 0.5)
    _image(tmp_path / "spans.png")
    assert len(fig.axes[0].texts) == 0  # 20480 cells: no label would be legible


def test_loss_vs_density_has_one_figure_legend_with_every_candidate(search, tmp_path):
    grid, problem, cands, plan, measured, dens = search
    fig = plot_loss_vs_density(
        tmp_path / "loss.png", plan, problem, grid, cands, {"c1"}, "c0", measured, 0.5, VAL_N, dens
    )
    w, h = _image(tmp_path / "loss.png")
    assert w > h > 300
    title = fig.get_suptitle()
    assert "smollm2-135m" in title and "chosen plan c0" in title and "<= 0.5" in title
    assert all(ax.get_legend() is None for ax in fig.axes)
    (legend,) = fig.legends
    labels = [t.get_text() for t in legend.get_texts()]
    assert "c0 (chosen plan)" in labels
    assert "c1 (Pareto, validated)" in labels and "c2 (dominated)" in labels
    assert {"dense", "uniform window + sinks", "one rule for all heads"} <= set(labels)
    handles = dict(zip(labels, legend.legend_handles))
    styles = {
        (handles[c].get_marker(), handles[c].get_color())
        for c in ("c1", "c2")
        for c in [next(x for x in labels if x.startswith(c + " "))]
    }
    assert len(styles) == 2  # the candidates differ in marker and colour
    assert handles["c0 (chosen plan)"].get_marker() == "*"


def test_plots_writes_both_figures(search, tmp_path):
    grid, problem, cands, plan, measured, dens = search
    names = plots(
        tmp_path, plan, problem, grid, cands, {"c1"}, "c0", measured, 0.5, VAL_N, VAL_N, dens
    )
    assert names == ["spans.png", "loss_vs_density.png"]
    for name in names:
        _image(tmp_path / name)
