"""Validation of plans (moa_jax.search.validate): the masked backend's per-layer window arrays."""

from __future__ import annotations

import dataclasses

import numpy as np

from moa_jax.models.masked_attention import MaskedAttention
from moa_jax.models.registry import init_random
from moa_jax.plan import Plan
from moa_jax.search.answer_loss import answer_losses, make_batches
from moa_jax.search.validate import _window_losses, pick_best, plan_losses

from conftest import tiny_config


@dataclasses.dataclass
class Item:
    tokens: list
    answer_start: int


def test_window_arrays_measure_what_the_static_masks_measure():
    """plan_losses('masked'): one scanned program, each layer's windows and sinks as arrays,
    gives the loss of `MaskedAttention.for_plan` (the plan's masks as static per-layer tuples),
    and a second plan of the same length compiles nothing new."""
    cfg = tiny_config()
    model = init_random(cfg, seed=6)
    rng = np.random.default_rng(4)
    items = [Item(rng.integers(1, cfg.vocab_size, n).tolist(), n - 12) for n in (120, 128, 90)]
    batches = make_batches(items, 128, 2, pad_id=0)
    sparse = Plan(
        alphas=[[8, 0, 16, 4], [0, 32, 8, 0]],
        betas=[[0.0, 0.25, 0.0, 0.5], [1.0, 0.0, 0.125, 0.0]],
        sinks=4,
    )
    before = _window_losses._cache_size()
    for plan in (sparse, Plan.dense(*sparse.shape)):
        got = plan_losses(model, batches, plan, 128, backend="masked", q_chunk=32)
        want = answer_losses(model, batches, MaskedAttention.for_plan(plan, 128, q_chunk=32))
        assert got.shape == (3,)
        np.testing.assert_allclose(got, want, rtol=1e-5)
    assert _window_losses._cache_size() == before + 2  # two batch shapes, both plans
    assert pick_best({"a": np.array([2.0]), "b": np.array([1.0])}) == "b"
