"""Rule grid and the MILP search: constraints, known optima, infeasible budgets, Pareto sweep."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from moa_jax.plan import Plan
from moa_jax.search.optimize import (
    InfeasibleBudgetError,
    SearchProblem,
    epsilon_sweep,
    pareto_front,
    solve,
)
from moa_jax.search.rules import RuleGrid, reference_grid, scaled_grid


# ----------------------------------------------------------------------------- rules
def test_reference_grid_is_the_papers_48_rules():
    g = reference_grid()
    assert len(g) == 48
    rules = set(g.rules)
    assert (0.0, 1.0) in rules and (0.0, 0.0) not in rules
    for a, b in rules:
        assert a + b * 8192 <= 8192 and a + b * 16384 <= 16384 and a + b * 2048 > 0
        assert a in {-2048.0, -1024.0} | {1024.0 * k for k in range(9)}
        assert b * 8 == int(b * 8)
    assert scaled_grid([2048, 4096, 8192]).rules == g.rules


def test_scaled_grid_follows_lengths_and_matches_plan():
    g = scaled_grid([512, 1024, 2048])
    assert g.dense_index() is not None
    assert {a for a in g.alphas} <= {256.0 * k for k in range(-2, 9)}
    for n in (512, 1024, 2048, 4096):
        plan = g.plan(np.arange(len(g))[None, :])
        np.testing.assert_array_equal(g.windows(n), plan.resolve(n)[0])
        np.testing.assert_allclose(g.kv_density(n), plan.kv_density(n, per_head=True)[0])
        assert g.kv_density(n)[g.dense_index()] == 1.0
    # every rule stays within the sequence at the longest profile length and the extension
    for a, b in g.rules:
        assert a + b * 2048 <= 2048 and a + b * 4096 <= 4096
    rt = RuleGrid.from_dict(g.to_dict())
    assert rt == g


def test_grid_plan_rejects_bad_choice():
    g = scaled_grid([1024])
    with pytest.raises(ValueError):
        g.plan(np.full((2, 2), len(g)))


# ----------------------------------------------------------------------------- MILP
def _brute_force(problem: SearchProblem, primary: int) -> float:
    L, H, R = problem.shape
    best = np.inf
    for flat in itertools.product(range(R), repeat=L * H):
        c = np.asarray(flat).reshape(L, H)
        if any(len(set(row)) > problem.max_rules_per_layer for row in c):
            continue
        obj, den = problem.evaluate(c)
        # The KV-cache band has no binding lower edge (see optimize's docstring).
        lo = -np.inf if problem.budget_on == "kv-cache" else problem.band * problem.budget
        if all(lo - 1e-9 <= d <= problem.budget + 1e-9 for d in den.values()):
            best = min(best, obj[primary])
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_milp_finds_the_brute_force_optimum(seed):
    rng = np.random.default_rng(seed)
    L, H, R = 2, 3, 4
    dens = {100: np.array([0.25, 0.4, 0.6, 1.0]), 200: np.array([0.2, 0.5, 0.55, 1.0])}
    # loss falls with density (as sparser rules drop more), per-head random scales
    losses = {
        n: rng.uniform(0.1, 2.0, (L, H, 1)) * (1 - d)[None, None, :] ** 2
        + rng.uniform(0, 0.05, (L, H, R)) * (d < 1)
        for n, d in dens.items()
    }
    problem = SearchProblem(losses, dens, budget=0.6, band=0.8, max_rules_per_layer=2)
    for primary in dens:
        sol = solve(problem, primary, gap=0.0)
        want = _brute_force(problem, primary)
        assert sol.objectives[primary] == pytest.approx(want, rel=1e-6, abs=1e-9)


def test_milp_respects_density_band_and_rule_limit():
    rng = np.random.default_rng(5)
    L, H = 4, 6
    g = scaled_grid([256, 512, 1024])
    lengths = (256, 512, 1024)
    losses = {}
    scale = rng.lognormal(0, 1, (L, H))
    decay = rng.uniform(32, 600, (L, H))
    for n in lengths:
        w = g.windows(n)
        losses[n] = scale[..., None] * np.exp(-w / decay[..., None]) * (w < n)
    dens = {n: g.kv_density(n) for n in lengths + (2048,)}
    problem = SearchProblem(losses, dens, budget=0.5, band=0.9)
    for primary in lengths:
        sol = solve(problem, primary)
        assert all(len(set(row)) <= 2 for row in sol.choice)
        plan = g.plan(sol.choice)
        for n in dens:
            d = plan.kv_density(n)
            assert 0.45 - 1e-9 <= d <= 0.5 + 1e-9, (n, d)
            assert sol.densities[n] == pytest.approx(d)
    one = SearchProblem(losses, dens, budget=0.5, band=0.9, max_rules_per_layer=1)
    sol1 = solve(one, 1024)
    assert all(len(set(row)) == 1 for row in sol1.choice)
    assert sol1.objectives[1024] >= solve(problem, 1024).objectives[1024] - 1e-12


def test_milp_beats_uniform_plan_of_same_density():
    """Heads differ (local vs long-range): per-head rules beat one rule for all heads."""
    g = scaled_grid([512])
    w = g.windows(512)
    L, H = 3, 4
    rng = np.random.default_rng(0)
    decay = np.where(rng.random((L, H)) < 0.5, 40.0, 2000.0)
    losses = {512: np.exp(-w / decay[..., None]) * (w < 512)}
    dens = {512: g.kv_density(512)}
    problem = SearchProblem(losses, dens, budget=0.5, band=0.9)
    sol = solve(problem, 512)
    uniform = [r for r in range(len(g)) if 0.45 <= dens[512][r] <= 0.5]
    assert uniform
    best_uniform = min(losses[512][..., r].sum() for r in uniform)
    assert sol.objectives[512] < 0.8 * best_uniform


def test_infeasible_budget_is_a_clear_error():
    dens = {128: np.array([0.5, 1.0])}
    losses = {128: np.ones((1, 2, 2))}
    with pytest.raises(InfeasibleBudgetError, match="density band"):
        solve(SearchProblem(losses, dens, budget=0.2), 128)
    # feasible per head, infeasible with one rule per layer: 0.5 and 1.0 cannot average 0.7
    problem = SearchProblem(losses, dens, budget=0.75, band=0.95, max_rules_per_layer=1)
    with pytest.raises(InfeasibleBudgetError, match="rule"):
        solve(problem, 128)
    # ... but two rules per layer can (0.75 exactly)
    sol = solve(SearchProblem(losses, dens, budget=0.75, band=0.95), 128)
    assert sol.densities[128] == pytest.approx(0.75)


def test_bad_problem_shapes_are_rejected():
    with pytest.raises(ValueError):
        SearchProblem({1: np.ones((2, 2, 3))}, {1: np.ones(4)})
    with pytest.raises(ValueError):
        SearchProblem({1: np.ones((2, 2, 3))}, {1: np.ones(3)}, budget=0)


def test_epsilon_sweep_gives_a_pareto_front():
    g = scaled_grid([256, 1024])
    L, H = 3, 4
    rng = np.random.default_rng(1)
    losses = {}
    decay = rng.uniform(20, 900, (L, H))
    scale = rng.lognormal(0, 1, (L, H, 2))
    for k, n in enumerate((256, 1024)):
        w = g.windows(n)
        losses[n] = scale[..., k : k + 1] * np.exp(-w / decay[..., None]) * (w < n)
    problem = SearchProblem(losses, {n: g.kv_density(n) for n in (256, 1024, 2048)}, budget=0.5)
    sols = epsilon_sweep(problem, intervals=3, progress=False)
    assert len(sols) >= 2
    front = pareto_front(sols)
    assert front
    for s in front:
        assert not any(o.dominates(s) for o in sols)
    # each single-objective optimum value is reached by the front
    for n in (256, 1024):
        best = min(s.objectives[n] for s in sols)
        assert min(s.objectives[n] for s in front) == pytest.approx(best)
    # plans of the front load and validate
    plan = g.plan(front[0].choice)
    assert isinstance(plan, Plan) and plan.shape == (L, H)


# ----------------------------------------------------------------------------- KV-cache budget
@pytest.mark.parametrize("seed", [0, 1])
def test_kv_cache_budget_finds_the_brute_force_optimum(seed):
    rng = np.random.default_rng(seed)
    L, H = 2, 4
    dens = {100: np.array([0.2, 0.5, 1.0]), 200: np.array([0.15, 0.45, 1.0])}
    losses = {
        n: rng.uniform(0.1, 2.0, (L, H, 1)) * (1 - d)[None, None, :] ** 2 for n, d in dens.items()
    }
    problem = SearchProblem(
        losses, dens, budget=0.55, band=0.5, max_rules_per_layer=2, kv_group=2, budget_on="kv-cache"
    )
    sol = solve(problem, 100, gap=0.0)
    assert sol.objectives[100] == pytest.approx(_brute_force(problem, 100), rel=1e-6)
    cache = problem.cache_densities(sol.choice)
    assert sol.densities == cache and all(v <= 0.55 + 1e-9 for v in cache.values())


def test_kv_cache_budget_keeps_sensitive_heads_together():
    # One sensitive head in each KV group of two: the per-head budget makes it dense next to a
    # sparse partner (mean 0.6, cache 1.0); the cache budget cannot, and stays at the budget.
    dens = {100: np.array([0.2, 0.6, 1.0])}
    sens = np.array([10.0, 0.1, 10.0, 0.1])[None, :, None]
    losses = {100: sens * (1 - dens[100])[None, None, :]}
    heads = SearchProblem(losses, dens, budget=0.6, band=0.5, max_rules_per_layer=3, kv_group=2)
    sol_h = solve(heads, 100, gap=0.0)
    assert sol_h.densities[100] <= 0.6 + 1e-9
    assert heads.cache_densities(sol_h.choice)[100] == pytest.approx(1.0)
    cache = SearchProblem(
        losses, dens, budget=0.6, band=0.5, max_rules_per_layer=3, kv_group=2, budget_on="kv-cache"
    )
    sol_c = solve(cache, 100, gap=0.0)
    assert sol_c.densities[100] <= 0.6 + 1e-9
    assert sol_c.objectives[100] > sol_h.objectives[100]  # the stricter budget costs loss
    with pytest.raises(ValueError, match="KV"):
        SearchProblem(losses, dens, kv_group=3)
    with pytest.raises(ValueError, match="budget_on"):
        SearchProblem(losses, dens, budget_on="cache")


def test_plan_kv_cache_density_takes_each_groups_largest_span():
    plan = Plan.from_windows([[10, 50, 20, 20]], 0)
    assert plan.kv_density(100) == pytest.approx(0.25)
    assert plan.kv_cache_density(100, 2) == pytest.approx((50 + 20) / 2 / 100)
    assert plan.kv_cache_density(100, 4) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="KV heads"):
        plan.kv_cache_density(100, 3)
