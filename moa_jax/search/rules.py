"""Candidate elastic rules for the MoA plan search.

A rule is `span(N) = alpha + beta * N` (tokens, clipped to [0, N]); the span includes the sinks
(METHODS.md). The reference grid (thu-nics/MoA, profile lengths 2k/4k/8k, extension to 16k) is

    alpha in {-2048, -1024, 0, 1024, ..., 8192}, beta in {0, 1/8, ..., 1},
    keep iff alpha + beta*8192 <= 8192, alpha + beta*16384 <= 16384, alpha + beta*2048 > 0,
    and (alpha, beta) != (0, 0)                                       -> 48 rules.

`scaled_grid` generalises it to any profile lengths: the alpha step is half the shortest profile
length (1024 for 2k), alphas run from -2 to 8 steps, and the three filters use the shortest and
longest profile lengths and an extension length (default twice the longest). For lengths
(2048, 4096, 8192) it is exactly the reference grid. The dense rule (0, 1) is always included.

Windows and densities are computed through `moa_jax.plan.Plan`, so the search sees exactly the
windows the kernels will run (64-token granularity, a 128-token minimum span, sinks inside the
span).

Public API:
  RuleGrid(alphas, betas, sink=64, granularity=64, min_span=128)
    .windows(n) -> int [R], .kv_density(n) -> float [R], .attention_density(n) -> float [R],
    .plan(choice [L, H], metadata) -> Plan, .to_dict() / RuleGrid.from_dict(d), len(grid)
  reference_grid(sink=64) -> RuleGrid
  scaled_grid(profile_lengths, extend_length=None, sink=64, ...) -> RuleGrid
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from moa_jax.plan import Plan

REFERENCE_LENGTHS = (2048, 4096, 8192)
REFERENCE_EXTEND = 16384
ALPHA_STEPS = tuple(range(-2, 9))  # alpha = step * unit, unit = min profile length / 2
BETA_EIGHTHS = tuple(range(0, 9))  # beta = k / 8


@dataclasses.dataclass(frozen=True)
class RuleGrid:
    """R candidate rules (alpha_r, beta_r) sharing one sink count and span resolution."""

    alphas: tuple[float, ...]
    betas: tuple[float, ...]
    sink: int = 64
    granularity: int = 64
    min_span: int = 128

    def __post_init__(self):
        a = tuple(float(x) for x in self.alphas)
        b = tuple(float(x) for x in self.betas)
        if len(a) != len(b) or not a:
            raise ValueError(
                f"need the same non-zero number of alphas and betas, got {len(a)} and {len(b)}"
            )
        if len(set(zip(a, b))) != len(a):
            raise ValueError("duplicate rules in the grid")
        object.__setattr__(self, "alphas", a)
        object.__setattr__(self, "betas", b)

    def __len__(self) -> int:
        return len(self.alphas)

    @property
    def rules(self) -> list[tuple[float, float]]:
        return list(zip(self.alphas, self.betas))

    def index(self, alpha: float, beta: float) -> int:
        return self.rules.index((float(alpha), float(beta)))

    def _row_plan(self) -> Plan:
        return Plan(
            alphas=[list(self.alphas)],
            betas=[list(self.betas)],
            sinks=self.sink,
            granularity=self.granularity,
            min_span=self.min_span,
        )

    def windows(self, n: int) -> np.ndarray:
        """int [R]: each rule's kernel window (tokens, sinks excluded; n = dense) at length n."""
        return self._row_plan().resolve(n)[0]

    def kv_density(self, n: int) -> np.ndarray:
        """float [R]: kept KV / n of each rule at length n (the budgeted density)."""
        return self._row_plan().kv_density(n, per_head=True)[0]

    def attention_density(self, n: int) -> np.ndarray:
        """float [R]: fraction of the causal entries each rule keeps at length n."""
        return self._row_plan().attention_density(n, per_head=True)[0]

    def dense_index(self) -> int | None:
        """Index of a rule that is dense at every length (alpha 0, beta 1), if present."""
        try:
            return self.index(0.0, 1.0)
        except ValueError:
            return None

    def plan(self, choice: Any, metadata: Mapping[str, Any] | None = None) -> Plan:
        """The plan choosing rule `choice[l, h]` for head (l, h)."""
        c = np.asarray(choice, np.int64)
        if c.ndim != 2:
            raise ValueError(f"choice must be [layers, heads], got shape {c.shape}")
        if c.min() < 0 or c.max() >= len(self):
            raise ValueError(f"rule indices must be in [0, {len(self)})")
        a = np.asarray(self.alphas)[c]
        b = np.asarray(self.betas)[c]
        return Plan(
            alphas=a.tolist(),
            betas=b.tolist(),
            sinks=self.sink,
            granularity=self.granularity,
            min_span=self.min_span,
            metadata=dict(metadata or {}),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "alphas": list(self.alphas),
            "betas": list(self.betas),
            "sink": self.sink,
            "granularity": self.granularity,
            "min_span": self.min_span,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RuleGrid:
        return cls(
            alphas=d["alphas"],
            betas=d["betas"],
            sink=int(d.get("sink", 64)),
            granularity=int(d.get("granularity", 64)),
            min_span=int(d.get("min_span", 128)),
        )

    def describe(self, lengths: Sequence[int]) -> str:
        lines = [
            f"{len(self)} rules (sink {self.sink}, granularity {self.granularity}, "
            f"min span {self.min_span}); kv density range per length:"
        ]
        for n in lengths:
            d = self.kv_density(n)
            lines.append(f"  N={n}: {d.min():.3f} .. {d.max():.3f}")
        return "\n".join(lines)


def _grid(unit: float, n_min: int, n_max: int, n_ext: int) -> tuple[list[float], list[float]]:
    alphas, betas = [], []
    for b8 in BETA_EIGHTHS:
        beta = b8 / 8.0
        for step in ALPHA_STEPS:
            alpha = float(step * unit)
            if alpha == 0.0 and beta == 0.0:
                continue
            if alpha + beta * n_max > n_max or alpha + beta * n_ext > n_ext:
                continue
            if alpha + beta * n_min <= 0:
                continue
            alphas.append(alpha)
            betas.append(beta)
    if (0.0, 1.0) not in set(zip(alphas, betas)):
        alphas.append(0.0)
        betas.append(1.0)
    return alphas, betas


def scaled_grid(
    profile_lengths: Sequence[int],
    extend_length: int | None = None,
    *,
    sink: int = 64,
    granularity: int = 64,
    min_span: int = 128,
    unit: float | None = None,
) -> RuleGrid:
    """The reference grid scaled to the given profile lengths (see module docstring).

    Args:
      profile_lengths: the lengths the search profiles (the shortest sets the alpha unit).
      extend_length: longest length a plan must stay valid at (default 2 * max length).
      unit: alpha step in tokens (default min(profile_lengths) / 2, rounded to the granularity).
    """
    lengths = sorted(int(n) for n in profile_lengths)
    if not lengths or lengths[0] < 1:
        raise ValueError(f"profile lengths must be positive, got {profile_lengths}")
    n_min, n_max = lengths[0], lengths[-1]
    n_ext = int(extend_length) if extend_length else 2 * n_max
    if unit is None:
        unit = max(granularity, granularity * round(n_min / 2 / granularity))
    alphas, betas = _grid(float(unit), n_min, n_max, max(n_ext, n_max))
    return RuleGrid(alphas, betas, sink=sink, granularity=granularity, min_span=min_span)


def reference_grid(sink: int = 64) -> RuleGrid:
    """The MoA reference's 48-rule grid (profile 2k/4k/8k, extension 16k)."""
    return scaled_grid(REFERENCE_LENGTHS, REFERENCE_EXTEND, sink=sink, unit=1024)
