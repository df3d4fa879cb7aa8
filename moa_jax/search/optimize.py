"""Choosing one elastic rule per head: a mixed-integer linear program (scipy's HiGHS `milp`).

Problem (METHODS.md, MoA): heads (l, h) of L layers x H query heads, rules r = 1..R, profile lengths
N_1..N_K with estimated losses c[N][l, h, r], rule densities dens[N][r] (kept KV / N):

    x[l, h, r] in {0, 1}   head (l, h) uses rule r          sum_r x[l, h, r] = 1
    y[l, r]    in {0, 1}   rule r is used in layer l        x[l, h, r] <= y[l, r]
                                                            sum_r y[l, r] <= max_rules (2)
    for every density length N:   lo * d * L*H <= sum x[l, h, r] dens[N][r] <= d * L*H
    objective k:  minimise  f_k(x) = sum c[N_k][l, h, r] x[l, h, r]

Density may differ per layer; the budget `d` is the model-wide mean over heads, with the band
[lo*d, d] (lo = 0.9) at each density length (the profile lengths and, e.g., the validation length).
Two rules per layer mean a layer's heads form at most two groups (cheap kernels, METHODS.md).

Budget on the KV cache (`budget_on="kv-cache"`, for GQA models): a decode cache keeps, per layer and
KV head, the largest span among the G query heads that share it, so the per-head mean understates
the memory (the MoA reference plan for Llama-3-8B: KV density 0.49, cache 0.66 of dense). With
continuous c[N, l, g] >= sum_r x[l, h, r] dens[N][r] for every head h of KV head g, the band
constrains the cache density mean_{l,g} c[N, l, g] instead, and the optimum sets each c to its
group's largest density. (The band's lower edge binds nothing there, since c may exceed the
maximum; losses fall with density, so the budget is used anyway.)

Multi-objective (one objective per profile length), by epsilon-constraints as the reference does:
solve each objective alone (with a 1e-6 tie-break on the others so the result is not weakly
dominated), take each objective's range [its own optimum, its worst value among those solutions],
then for each primary objective grid the others' upper bounds at `intervals` points each
(K + K * intervals^(K-1) programs: 51 for 3 lengths and 4 intervals) and keep the non-dominated,
distinct solutions. Objectives are normalised internally (by the loss of the sparsest choice) for
numerical robustness; reported values are raw.

Public API:
  SearchProblem(losses={N: [L, H, R]}, densities={N: [R]}, budget, band=0.9, max_rules_per_layer=2,
                kv_group=1, budget_on="heads")
    SearchProblem.from_profiles(grid, profiles, budget, density_lengths, estimator, ...)
  Solution(choice [L, H], objectives {N: float}, densities {N: float}, ...)
  solve(problem, primary, eps=None, ...) -> Solution | None
  epsilon_sweep(problem, intervals=4, ...) -> list[Solution]   (all distinct feasible solutions)
  pareto_front(solutions) -> list[Solution]
  InfeasibleBudgetError
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp
from scipy.optimize import Bounds, LinearConstraint, milp
from tqdm.auto import tqdm

from moa_jax.errors import UserError
from moa_jax.plan import kv_group_max_mean


class InfeasibleBudgetError(UserError, ValueError):
    """No assignment of rules meets the density band (and the per-layer rule limit)."""


@dataclasses.dataclass
class SearchProblem:
    """Estimated losses per profile length and rule densities per density length."""

    losses: Mapping[int, np.ndarray]
    densities: Mapping[int, np.ndarray]
    budget: float = 0.5
    band: float = 0.9
    max_rules_per_layer: int = 2
    kv_group: int = 1  # query heads per KV head (GQA)
    budget_on: str = "heads"  # "heads": mean over query heads; "kv-cache": see above

    def __post_init__(self):
        self.losses = {int(n): np.asarray(c, np.float64) for n, c in self.losses.items()}
        self.densities = {int(n): np.asarray(d, np.float64) for n, d in self.densities.items()}
        if not self.losses:
            raise ValueError("need at least one objective (profile length)")
        shapes = {c.shape for c in self.losses.values()}
        if len(shapes) != 1 or len(next(iter(shapes))) != 3:
            raise ValueError(f"losses must all be [L, H, R], got shapes {sorted(shapes)}")
        r = self.shape[2]
        for n, d in self.densities.items():
            if d.shape != (r,):
                raise ValueError(f"densities at N={n} have shape {d.shape}, expected ({r},)")
        if not 0 < self.budget <= 1:
            raise ValueError(f"density budget must be in (0, 1], got {self.budget}")
        if not 0 <= self.band <= 1:
            raise ValueError(f"band must be in [0, 1], got {self.band}")
        if self.max_rules_per_layer < 1:
            raise ValueError("max_rules_per_layer must be >= 1")
        if self.budget_on not in ("heads", "kv-cache"):
            raise ValueError(f"budget_on must be 'heads' or 'kv-cache', got {self.budget_on!r}")
        if self.kv_group < 1 or self.shape[1] % self.kv_group:
            raise ValueError(
                f"{self.shape[1]} query heads per layer do not split into KV "
                f"groups of {self.kv_group}"
            )

    @property
    def shape(self) -> tuple[int, int, int]:
        return next(iter(self.losses.values())).shape

    @property
    def lengths(self) -> list[int]:
        return sorted(self.losses)

    @classmethod
    def from_profiles(
        cls,
        grid: Any,
        profiles: Mapping[int, Any],
        budget: float = 0.5,
        *,
        density_lengths: Sequence[int] = (),
        band: float = 0.9,
        max_rules_per_layer: int = 2,
        estimator: str = "token",
        kv_group: int = 1,
        budget_on: str = "heads",
    ) -> SearchProblem:
        """From a `RuleGrid` and `InfluenceProfile`s; densities at the profile lengths and at
        `density_lengths`."""
        losses = {n: p.rule_losses(grid, estimator) for n, p in profiles.items()}
        dlen = sorted(set(losses) | {int(n) for n in density_lengths})
        return cls(
            losses,
            {n: grid.kv_density(n) for n in dlen},
            budget,
            band,
            max_rules_per_layer,
            kv_group,
            budget_on,
        )

    def evaluate(self, choice: np.ndarray) -> tuple[dict[int, float], dict[int, float]]:
        """(estimated loss per profile length, budgeted density per density length) of a
        choice: the mean over heads, or with budget_on="kv-cache" the cache density."""
        c = np.asarray(choice)
        li, hi = np.indices(c.shape)
        obj = {n: float(v[li, hi, c].sum()) for n, v in self.losses.items()}
        if self.budget_on == "kv-cache":
            return obj, self.cache_densities(c)
        den = {n: float(d[c].mean()) for n, d in self.densities.items()}
        return obj, den

    def cache_densities(self, choice: np.ndarray) -> dict[int, float]:
        """Per density length: the mean over layers and KV heads of the largest density among
        each KV head's query heads (the span cache's size relative to a dense cache)."""
        c = np.asarray(choice)
        kv_heads = c.shape[1] // self.kv_group
        return {n: kv_group_max_mean(d[c], kv_heads) for n, d in self.densities.items()}

    def density_ranges(self) -> dict[int, tuple[float, float]]:
        return {n: (float(d.min()), float(d.max())) for n, d in self.densities.items()}


@dataclasses.dataclass
class Solution:
    choice: np.ndarray  # int [L, H] rule index per head
    objectives: dict[int, float]  # estimated loss per profile length (raw)
    densities: dict[int, float]  # mean kv density per density length
    primary: int | None = None  # objective minimised (None: weighted)
    eps: dict[int, float] = dataclasses.field(default_factory=dict)  # normalised bounds used
    status: str = ""
    seconds: float = 0.0

    def key(self) -> bytes:
        return np.asarray(self.choice, np.int16).tobytes()

    def dominates(self, other: Solution, tol: float = 1e-12) -> bool:
        ks = self.objectives.keys()
        le = all(self.objectives[k] <= other.objectives[k] + tol for k in ks)
        lt = any(self.objectives[k] < other.objectives[k] - tol for k in ks)
        return le and lt

    def to_json(self) -> dict[str, Any]:
        return {
            "objectives": {str(k): v for k, v in self.objectives.items()},
            "densities": {str(k): v for k, v in self.densities.items()},
            "primary": self.primary,
            "eps": {str(k): v for k, v in self.eps.items()},
            "status": self.status,
            "seconds": round(self.seconds, 3),
        }


class _Model:
    """The constraint matrix shared by every program of one problem."""

    def __init__(self, problem: SearchProblem):
        self.p = problem
        L, H, R = problem.shape
        self.L, self.H, self.R = L, H, R
        nx, ny = L * H * R, L * R
        dlens = sorted(problem.densities)
        cache = problem.budget_on == "kv-cache"
        G = H // problem.kv_group
        nc = len(dlens) * L * G if cache else 0  # c[N, l, g], continuous
        self.nx, self.nv = nx, nx + ny + nc
        self.integrality = np.r_[np.ones(nx + ny), np.zeros(nc)]
        self.upper = np.r_[np.ones(nx + ny), np.full(nc, np.inf)]
        # objectives normalised by the loss of the sparsest choice (each head's worst rule)
        self.scale = {}
        for n, c in problem.losses.items():
            s = float(c.max(axis=2).sum())
            self.scale[n] = s if s > 0 else 1.0
        rows, cols, vals, lb, ub = [], [], [], [], []
        r0 = 0
        heads = np.arange(L * H)
        # one rule per head
        rows.append(np.repeat(heads, R))
        cols.append(np.arange(nx))
        vals.append(np.ones(nx))
        lb.append(np.ones(L * H))
        ub.append(np.ones(L * H))
        r0 += L * H
        if problem.max_rules_per_layer < R:
            # x[l, h, r] - y[l, r] <= 0
            xi = np.arange(nx)
            layer = xi // (H * R)
            rule = xi % R
            yi = nx + layer * R + rule
            rows += [r0 + xi, r0 + xi]
            cols += [xi, yi]
            vals += [np.ones(nx), -np.ones(nx)]
            lb.append(np.full(nx, -np.inf))
            ub.append(np.zeros(nx))
            r0 += nx
            # sum_r y[l, r] <= max_rules
            yi = np.arange(ny)
            rows.append(r0 + yi // R)
            cols.append(nx + yi)
            vals.append(np.ones(ny))
            lb.append(np.full(L, -np.inf))
            ub.append(np.full(L, float(problem.max_rules_per_layer)))
            r0 += L
        band = (np.array([problem.band * problem.budget - 1e-9]), np.array([problem.budget + 1e-9]))
        for i, n in enumerate(dlens):
            d = problem.densities[n]
            if not cache:
                # density band (per-head mean)
                rows.append(np.full(nx, r0))
                cols.append(np.arange(nx))
                vals.append(np.tile(d, L * H) / (L * H))
                lb.append(band[0])
                ub.append(band[1])
                r0 += 1
                continue
            # sum_r dens[N][r] x[l, h, r] - c[N, l, h // kv_group] <= 0, one row per head
            ci = nx + ny + i * L * G + heads // problem.kv_group  # heads = l * H + h
            rows += [r0 + np.repeat(heads, R), r0 + heads]
            cols += [np.arange(nx), ci]
            vals += [np.tile(d, L * H), -np.ones(L * H)]
            lb.append(np.full(L * H, -np.inf))
            ub.append(np.zeros(L * H))
            r0 += L * H
            # cache-density band: mean over KV heads of c
            rows.append(np.full(L * G, r0))
            cols.append(nx + ny + i * L * G + np.arange(L * G))
            vals.append(np.full(L * G, 1.0 / (L * G)))
            lb.append(band[0])
            ub.append(band[1])
            r0 += 1
        self.base = sp.csr_matrix(
            (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
            shape=(r0, self.nv),
        )
        self.lb, self.ub = np.concatenate(lb), np.concatenate(ub)
        self.cost = {
            n: np.concatenate([c.reshape(-1) / self.scale[n], np.zeros(ny + nc)])
            for n, c in problem.losses.items()
        }

    def solve(
        self, weights: Mapping[int, float], eps: Mapping[int, float], time_limit: float, gap: float
    ):
        c = sum(w * self.cost[n] for n, w in weights.items())
        mats, lbs, ubs = [self.base], [self.lb], [self.ub]
        for n, e in eps.items():
            mats.append(sp.csr_matrix(self.cost[n][None, :]))
            lbs.append(np.array([-np.inf]))
            ubs.append(np.array([e]))
        a = sp.vstack(mats, format="csr")
        res = milp(
            c,
            integrality=self.integrality,
            bounds=Bounds(0, self.upper),
            constraints=LinearConstraint(a, np.concatenate(lbs), np.concatenate(ubs)),
            options={"time_limit": float(time_limit), "mip_rel_gap": float(gap), "disp": False},
        )
        if res.x is None:
            return None, res
        x = res.x[: self.nx].reshape(self.L, self.H, self.R)
        return np.argmax(x, axis=2), res


def _infeasible_message(problem: SearchProblem) -> str:
    parts = [
        f"N={n}: rules span {lo:.3f}..{hi:.3f}"
        for n, (lo, hi) in sorted(problem.density_ranges().items())
    ]
    what = "KV-cache density" if problem.budget_on == "kv-cache" else "density"
    return (
        f"no plan meets the {what} band [{problem.band * problem.budget:.3f}, "
        f"{problem.budget:.3f}] at every length with at most {problem.max_rules_per_layer} "
        f"rule(s) per layer ({'; '.join(parts)}); choose another --density budget, a wider "
        f"band, other lengths or a richer rule grid"
    )


def check_budget(problem: SearchProblem) -> None:
    """Raises InfeasibleBudgetError when some density length cannot reach the band at all."""
    for lo, hi in problem.density_ranges().values():
        if lo > problem.budget + 1e-12 or hi < problem.band * problem.budget - 1e-12:
            raise InfeasibleBudgetError(_infeasible_message(problem))


def solve(
    problem: SearchProblem,
    primary: int | None = None,
    eps: Mapping[int, float] | None = None,
    *,
    weights: Mapping[int, float] | None = None,
    tie_break: float = 1e-6,
    time_limit: float = 60.0,
    gap: float = 1e-3,
    _model: _Model | None = None,
) -> Solution | None:
    """Minimises one objective (`primary` length) or a weighted sum, under optional normalised
    upper bounds `eps` {N: bound} on other objectives. Returns None when infeasible.

    Raises InfeasibleBudgetError when the density band alone is infeasible (no eps given).
    """
    check_budget(problem)
    m = _model or _Model(problem)
    if weights is None:
        if primary is None:
            weights = {n: 1.0 for n in problem.lengths}
        else:
            weights = {n: (1.0 if n == primary else tie_break) for n in problem.lengths}
    t0 = time.perf_counter()
    choice, res = m.solve(weights, dict(eps or {}), time_limit, gap)
    if choice is None:
        if not eps:
            raise InfeasibleBudgetError(_infeasible_message(problem) + f" [HiGHS: {res.message}]")
        return None
    obj, den = problem.evaluate(choice)
    return Solution(
        choice, obj, den, primary, dict(eps or {}), str(res.message), time.perf_counter() - t0
    )


def pareto_front(solutions: Sequence[Solution], digits: int = 9) -> list[Solution]:
    """Non-dominated solutions with distinct objective vectors (compared to `digits`
    significant digits; the first found of equal ones is kept), sorted by the first objective."""
    uniq: dict[tuple, Solution] = {}
    for s in solutions:
        key = tuple(float(f"{v:.{digits}g}") for _, v in sorted(s.objectives.items()))
        uniq.setdefault(key, s)
    sols = list(uniq.values())
    front = [s for s in sols if not any(o.dominates(s) for o in sols if o is not s)]
    first = min(front[0].objectives) if front else 0
    return sorted(front, key=lambda s: (s.objectives[first], s.key()))


def epsilon_sweep(
    problem: SearchProblem,
    intervals: int = 4,
    *,
    time_limit: float = 60.0,
    gap: float = 1e-3,
    progress: bool = True,
) -> list[Solution]:
    """All distinct feasible solutions of the epsilon-constraint sweep (see module docstring);
    filter them with `pareto_front`."""
    check_budget(problem)
    m = _Model(problem)
    lengths = problem.lengths
    k = len(lengths)
    total = k + (k * intervals ** (k - 1) if k > 1 and intervals > 0 else 0)
    bar = tqdm(total=total, desc="MILP epsilon sweep", unit="milp", disable=not progress)
    singles = []
    for n in lengths:
        singles.append(solve(problem, n, time_limit=time_limit, gap=gap, _model=m))
        bar.update(1)
    sols = list(singles)
    if k > 1 and intervals > 0:
        norm = {
            n: {s_n: s.objectives[n] / m.scale[n] for s_n, s in zip(lengths, singles)}
            for n in lengths
        }
        lo = {n: norm[n][n] for n in lengths}
        hi = {n: max(norm[n].values()) for n in lengths}
        for primary in lengths:
            others = [n for n in lengths if n != primary]
            grids = []
            for n in others:
                if hi[n] - lo[n] <= 1e-12:
                    grids.append([hi[n] + 1e-9])
                else:
                    grids.append(
                        [lo[n] + (hi[n] - lo[n]) * t / intervals for t in range(1, intervals + 1)]
                    )
            for combo in itertools.product(*grids):
                eps = {n: e * (1 + 1e-9) + 1e-12 for n, e in zip(others, combo)}
                s = solve(problem, primary, eps, time_limit=time_limit, gap=gap, _model=m)
                if s is not None:
                    sols.append(s)
                bar.update(1)
            bar.update(max(0, intervals ** (k - 1) - len(list(itertools.product(*grids)))))
    bar.close()
    return sols
