"""The influence profile of one length (`InfluenceProfile`) and the rule-loss estimates read
from it.

A profile holds sums over the profiled items of each head's masking influence |E|
(`moa_jax.search.sensitivity` computes them): per 64 x 64 block, per diagonal offset (every
row, or the answer rows only), the answer rows' largest |E| and copy attention, and the
first-order changes of candidate windows. `InfluenceProfile.window_losses` turns them into the
estimated loss of every window for every head (the estimators, by name, are in
`moa_jax.search.estimators`).

Rule loss estimate (choice made here): 'token' is the sum of mean |E| over exactly the entries
the kernels drop for that rule at length N (the window from `Plan.resolve`, sinks kept);
'answer' is the same sum over the rows that predict the answer tokens only: the document rows'
far entries reach the loss only through later layers and their many small |E| drown the few
rows where a head retrieves for the answer (on SmolLM2, 50 items per length, it ranks the
measured retrieval heads at Spearman 0.50-0.53 against 0.37-0.42 for 'token', and its plan
keeps 0.82 / 0.74 / 0.70 of the needles at 2k / 4k / 8k against 0.70 / 0.62 / 0.62:
docs/results.md). 'answer-max' scores a window by the largest single answer-row |E| it drops,
averaged over items: a retrieval head's loss is not linear in the entries it loses (missing
the one fact costs the answer). On a CPU diagnostic (6 items at 2k, window N/2) its top 40 held
17 of the 20 measured retrieval heads against 15 for 'answer' (Spearman 0.52 and 0.55); on the
GPU its plan keeps the needles (0.98 / 0.92 / 0.70) and LongEval but costs +7% perplexity at
2k. 'copy' is not a gradient: the attention the answer rows put on earlier places of the token
each predicts (a row's share split over those places), summed over the places a window drops.
A head that fetches the answer attends there whether or not the model is sure of it, where the
gradient of a sure answer fades; alone it ignores every other head's loss (needle 0.98 / 0.94 /
0.48). 'answer-copy' (the CLI's default) adds the two, 'copy' scaled to 'answer''s total over
all heads at the window N/2: needle 0.98 / 0.98 / 0.70 (dense 0.98 / 0.96 / 0.70), LongEval
within 0.06 / 0.04 of dense, perplexity +2.3% / +0.7% / +0.5% at 2k / 4k / 8k
(docs/results.md, one H200, 2026-12-03). 'block' is the reference's estimator, the sum over
whole 64 x 64 blocks a block-aligned window drops (query block m keeps the sink blocks and the
last ceil(w/64) blocks up to the diagonal); with 64-token granularity and 64 sinks it differs
from 'token' only in the partial diagonal block. 'window' (given the candidate windows when
profiling) is the signed first-order loss change of dropping the whole window in every row at
once, rows renormalised; its plans scored below the uniform window (docs/results.md).

Public API:
  BLOCK                                   the block of the block sums (64)
  suffix_sums(d) -> [..., N + 1]          what each window drops, from diagonal sums
  InfluenceProfile (sums, count, zeros, add, merge, save/load, window_losses, rule_losses)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from moa_jax.search.estimators import ESTIMATORS

BLOCK = 64


def suffix_sums(d: np.ndarray) -> np.ndarray:
    """[..., N] -> [..., N + 1]: out[..., w] = sum of d[..., x] for x >= w (out[..., N] = 0),
    the sum of what a window w drops when d is indexed by diagonal offset."""
    return np.concatenate(
        [np.cumsum(d[..., ::-1], axis=-1)[..., ::-1], np.zeros(d.shape[:-1] + (1,))], axis=-1
    )


@dataclasses.dataclass
class InfluenceProfile:
    """Sums of |E| over the items profiled at one length.

    blocks: float64 [L, H, N/block, N/block]; diag: float64 [L, H, N] (non-sink keys only);
    both None when only the answer rows were profiled (`profile_items(token=False)`);
    windows: int [R] candidate windows and rules: float64 [L, H, R] their summed first-order
    loss changes (the 'window' estimator), both empty when none were given;
    answer: float64 [L, H, N], `diag` over the answer rows only (the 'answer' estimator), or
    None when not profiled;
    answer_max: float64 [L, H, N], summed over items: the item's largest answer-row |E| at any
    offset >= d (the 'answer-max' estimator; profiled with the answer rows alone), or None;
    copy: float64 [L, H, N], summed over items: the answer rows' attention on keys holding the
    token they predict, by offset d, over the non-sink keys (the 'copy' estimators; profiled
    with the answer rows alone), or None;
    count: items summed; loss_sum: sum of the items' dense answer losses.
    """

    length: int
    sink: int
    block: int
    blocks: np.ndarray | None
    diag: np.ndarray | None
    count: int = 0
    loss_sum: float = 0.0
    windows: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
    rules: np.ndarray | None = None
    answer: np.ndarray | None = None
    answer_max: np.ndarray | None = None
    copy: np.ndarray | None = None

    def __post_init__(self):
        self.windows = np.asarray(self.windows, np.int64)
        if self.diag is None and self.answer is None:
            raise ValueError("a profile needs the token sums, the answer-row sums or both")
        if (self.blocks is None) != (self.diag is None):
            raise ValueError("the block and diagonal sums come together")
        if self.rules is None:
            self.rules = np.zeros(self.heads_shape + (len(self.windows),))

    @property
    def heads_shape(self) -> tuple[int, int]:
        """(layers, heads)."""
        return (self.diag if self.diag is not None else self.answer).shape[:2]

    @property
    def token(self) -> bool:
        """Whether every row's sums (the 'token' and 'block' estimators) are here."""
        return self.diag is not None

    @classmethod
    def zeros(
        cls,
        num_layers: int,
        num_heads: int,
        length: int,
        sink: int,
        block: int = BLOCK,
        windows: Sequence[int] = (),
        answer: bool = False,
        token: bool = True,
    ) -> InfluenceProfile:
        nb = length // block
        return cls(
            length,
            sink,
            block,
            np.zeros((num_layers, num_heads, nb, nb)) if token else None,
            np.zeros((num_layers, num_heads, length)) if token else None,
            windows=np.asarray(windows),
            answer=np.zeros((num_layers, num_heads, length)) if answer else None,
            answer_max=None if token else np.zeros((num_layers, num_heads, length)),
            copy=None if token else np.zeros((num_layers, num_heads, length)),
        )

    def add(
        self,
        count: int,
        loss_sum: float,
        blocks,
        diag,
        rules,
        answer=None,
        answer_max=None,
        copy=None,
    ) -> InfluenceProfile:
        """This profile plus the sums of `count` more items (a batch's `profile_batch`
        outputs, or another profile's)."""
        for name, more in (("answer", answer), ("answer_max", answer_max), ("copy", copy)):
            if (getattr(self, name) is None) != (more is None):
                raise ValueError(f"the sums disagree on the {name} sums")
        if self.token != (diag is not None):
            raise ValueError("the sums disagree on the token sums")

        def plus(mine, more):
            return None if mine is None else mine + np.asarray(more)

        return InfluenceProfile(
            self.length,
            self.sink,
            self.block,
            plus(self.blocks, blocks),
            plus(self.diag, diag),
            self.count + int(count),
            self.loss_sum + float(loss_sum),
            self.windows,
            self.rules + np.asarray(rules),
            plus(self.answer, answer),
            plus(self.answer_max, answer_max),
            plus(self.copy, copy),
        )

    @property
    def mean_blocks(self) -> np.ndarray:
        return self._need_token().blocks / max(self.count, 1)

    @property
    def mean_diag(self) -> np.ndarray:
        return self._need_token().diag / max(self.count, 1)

    def _need_token(self) -> InfluenceProfile:
        if self.diag is None:
            raise ValueError(
                f"the profile at N={self.length} has the answer rows' sums only; "
                f"profile with token=True or use the 'answer' estimator"
            )
        return self

    @property
    def dense_loss(self) -> float:
        return self.loss_sum / max(self.count, 1)

    def merge(self, other: InfluenceProfile) -> InfluenceProfile:
        """Sum of two partial profiles (e.g. from different hosts or resumed runs)."""
        if (self.length, self.sink, self.block, self.heads_shape) != (
            other.length,
            other.sink,
            other.block,
            other.heads_shape,
        ) or not np.array_equal(self.windows, other.windows):
            raise ValueError(
                "cannot merge profiles of different lengths, sinks, windows or shapes"
            )  # `add` checks that both hold the same sums
        return self.add(
            other.count,
            other.loss_sum,
            other.blocks,
            other.diag,
            other.rules,
            other.answer,
            other.answer_max,
            other.copy,
        )

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        extra = {
            name: x
            for name, x in (
                ("answer", self.answer),
                ("answer_max", self.answer_max),
                ("copy", self.copy),
                ("blocks", self.blocks),
                ("diag", self.diag),
            )
            if x is not None
        }
        np.savez_compressed(
            tmp,
            length=self.length,
            sink=self.sink,
            block=self.block,
            count=self.count,
            loss_sum=self.loss_sum,
            windows=self.windows,
            rules=self.rules,
            **extra,
        )
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> InfluenceProfile:
        with np.load(path) as z:
            extra = {
                k: z[k] for k in ("windows", "rules", "answer", "answer_max", "copy") if k in z
            }
            sums = [z[k] if k in z else None for k in ("blocks", "diag")]
            return cls(
                int(z["length"]),
                int(z["sink"]),
                int(z["block"]),
                *sums,
                int(z["count"]),
                float(z["loss_sum"]),
                **extra,
            )

    # ------------------------------------------------------------------ estimates
    def window_losses(self, windows: np.ndarray, estimator: str = "token") -> np.ndarray:
        """Estimated loss [L, H, R] of each window in `windows` int [R] (sinks = self.sink).

        'token': sum of mean |E| over entries with i - j >= w and j >= sink (exactly the
        entries `window_sink_mask` drops). 'answer': the same over the answer rows only (the
        profile must have them). 'answer-max': the mean over items of the largest single |E|
        among those answer-row entries (a head that fetches one far fact costs its whole
        influence as soon as the window drops it, however few entries that is). 'copy': the
        mean attention the answer rows put on earlier places of the token they predict (each
        row's share split over those places) that the window drops: a retrieval head's mark,
        which does not fade when the model is sure of its answer as a gradient does.
        'answer-copy': 'answer' plus 'copy' scaled so that both sum to the same over all heads
        at the window N/2 (the search then weighs the two equally). 'window':
        the mean first-order loss change of the whole window with rows renormalised (signed;
        each window must be one the profile was made with). 'block': the reference's block
        form: query block m keeps key blocks below ceil(sink/block) and the last
        ceil(w/block) blocks up to the diagonal; every other causal block's sum counts.
        """
        windows = np.asarray(windows, np.int64)
        n = self.length
        if estimator in ("token", "answer"):
            if estimator == "answer" and self.answer is None:
                raise ValueError(
                    f"the profile at N={n} has no answer-row sums; profile with "
                    f"answer=True or use the 'token' estimator"
                )
            d = self.mean_diag if estimator == "token" else self.answer / max(self.count, 1)
            return suffix_sums(d)[..., np.clip(windows, 0, n)]
        if estimator in ("copy", "answer-copy"):
            if self.copy is None:
                raise ValueError(
                    f"the profile at N={n} has no copy sums; profile the answer "
                    f"rows alone (token=False)"
                )
            copy = suffix_sums(self.copy / max(self.count, 1))
            if estimator == "copy":
                return copy[..., np.clip(windows, 0, n)]
            # on the answer estimate's scale: equal totals over all heads at the window N/2
            answer = suffix_sums(self.answer / max(self.count, 1))
            scale = answer[..., n // 2].sum() / max(copy[..., n // 2].sum(), 1e-30)
            return (answer + scale * copy)[..., np.clip(windows, 0, n)]
        if estimator == "answer-max":
            if self.answer_max is None:
                raise ValueError(
                    f"the profile at N={n} has no answer-row maxima; profile the "
                    f"answer rows alone (token=False)"
                )
            m = np.concatenate(
                [self.answer_max, np.zeros(self.answer_max.shape[:-1] + (1,))], axis=-1
            ) / max(self.count, 1)
            return m[..., np.clip(windows, 0, n)]
        if estimator == "window":
            pos = {int(w): i for i, w in enumerate(self.windows)}
            out = np.zeros(self.heads_shape + (len(windows),))
            for r, w in enumerate(windows):
                if w >= n:
                    continue
                if int(w) not in pos:
                    raise ValueError(
                        f"the profile at N={n} has no rule estimate for window "
                        f"{int(w)} (it has {sorted(pos)}); profile with these "
                        f"windows or use the 'token' estimator"
                    )
                out[..., r] = self.rules[..., pos[int(w)]] / max(self.count, 1)
            return out
        if estimator == "block":
            bl = self.mean_blocks
            nb = bl.shape[-1]
            m = np.arange(nb)[:, None]
            j = np.arange(nb)[None, :]
            sink_blocks = -(-self.sink // self.block)
            out = np.zeros(bl.shape[:2] + (len(windows),))
            for r, w in enumerate(windows):
                if w >= n:
                    continue
                keep = -(-int(w) // self.block)
                dropped = (j <= m - keep) & (j >= sink_blocks)
                out[..., r] = (bl * dropped).sum(axis=(-1, -2))
            return out
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")

    def rule_losses(self, grid, estimator: str = "token") -> np.ndarray:
        """Estimated loss [L, H, R] of each rule of a `RuleGrid` at this profile's length."""
        if grid.sink != self.sink:
            raise ValueError(
                f"the rule grid keeps {grid.sink} sinks but the profile excluded {self.sink}"
            )
        return self.window_losses(grid.windows(self.length), estimator)
