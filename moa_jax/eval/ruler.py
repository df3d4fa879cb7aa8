"""RULER-style synthetic tasks (Hsieh et al. 2024), written for moa-jax, sized by tokens.

Below a 1024-token budget (CI sizes), `mk_needle` and `mv_needle` use 2 needles instead of 4.

- `mk_needle` (multi-key needles): `num_keys` needles `One of the special magic numbers for
  <key> is: NNNNN.` at random depths of book text; the question asks for one key's number
  (the others are distractors). Scores `acc`, `digit_acc` (of the first number produced).
- `mv_needle` (multi-value needles): one key with `num_values` numbers at random depths; asks for
  all of them. Score `recall`: the fraction of the numbers that appear in the output.
- `var_track` (variable tracking): a chain `VAR A = NNNNN.`, `VAR B = VAR A.`, ... (`hops` + 1
  variables of 5 capital letters) spread in order through filler sentences; asks for every
  variable that holds NNNNN. Score `recall` of the chain's names.
- `common_words` (common-words extraction): a numbered list of words where `num_common` words
  appear `freq_common` times each and the rest `freq_rare` times; asks for the most common
  ones. Frequencies shrink at short lengths so that the common words take about 40% of the
  list. Score `recall` of the common words.

Each item's assistant turn starts with a fixed answer prefix (as RULER does), so the scored
continuation is the answer itself.
"""

from __future__ import annotations

import abc
import dataclasses
import re
import string
from collections.abc import Callable
from typing import Any

import numpy as np

from moa_jax.eval.tasks import (
    WORDS,
    DrawnTask,
    Item,
    TaskContext,
    extract_numbers,
    fit_units,
    insert_at_depths,
    random_keys,
    random_number,
    recall,
    score_number,
)

NEEDLE_INSTRUCTION = (
    "Some special magic numbers are hidden inside the following text. "
    "Memorise them: I will ask about them afterwards.\n\n"
)
VT_INSTRUCTION = "Memorise the variable assignments hidden in the following text.\n\n"
FILLER = (
    "The river runs down to the sea. The hills are quiet today. A bird sings in the old "
    "oak tree. The road goes on and on. "
)


@dataclasses.dataclass
class Draft:
    """One RULER item before its prompt is fitted to the token budget.

    Attributes:
      build: the prompt holding the first `u` units of its source (characters of text, or rare
        words of a list); the task's builder fits the largest `u` within the budget.
      units: the most units the source has.
      prefix, answer, targets, depth, meta: as the `Item`'s.
      units_key: when set, `meta[units_key]` records the fitted `u`.
    """

    build: Callable[[int], str]
    units: int
    prefix: str
    answer: str
    targets: tuple[str, ...]
    depth: float | None = None
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    units_key: str | None = None


class RulerTask(DrawnTask):
    """A RULER task: each item is a `Draft` from its own random generator, fitted to the budget.

    Subclasses write `draft` (and `sizes` for settings shared by every item of a length) and
    `score`.
    """

    family = "ruler"

    @abc.abstractmethod
    def draft(self, ctx: TaskContext, rng: np.random.Generator, budget: int, sizes: Any) -> Draft:
        """The item drawn from `rng` for a `budget`-token prompt."""

    def draw(
        self, ctx: TaskContext, rng: np.random.Generator, budget: int, index: int, sizes: Any
    ) -> dict[str, Any]:
        d = self.draft(ctx, rng, budget, sizes)
        u, prompt = fit_units(d.build, lambda p: ctx.count(p, d.prefix), budget, hi=d.units)
        return {
            "prompt": prompt,
            "answer_prefix": d.prefix,
            "answer": d.answer,
            "targets": d.targets,
            "depth": d.depth,
            "meta": {**d.meta, d.units_key: u} if d.units_key else d.meta,
        }


def _needle_draft(
    source: str, needles: list[str], depths: list[float], question: str, **fields: Any
) -> Draft:
    """A needle item: the first `u` characters of the book text `source` with the needles at
    their depths, then the question; `fields` are the rest of the `Draft`."""

    def build(u: int) -> str:
        return NEEDLE_INSTRUCTION + insert_at_depths(source[:u], needles, depths) + question

    return Draft(build=build, units=len(source), **fields)


def _distinct_numbers(rng: np.random.Generator, n: int) -> list[str]:
    """`n` different random 5-digit numbers."""
    nums: list[str] = []
    for _ in range(n):
        nums.append(random_number(rng, 5, exclude=nums))
    return nums


class MultiKeyNeedle(RulerTask):
    name = "mk_needle"
    uses_corpus = True
    max_new_tokens = 12
    primary = "acc"
    metrics = ("acc", "digit_acc")
    description = "RULER multi-key NIAH: 4 keyed numbers in book text, ask for one key"
    num_keys = 4

    def draft(self, ctx: TaskContext, rng: np.random.Generator, budget: int, sizes: Any) -> Draft:
        keys = random_keys(rng, self.num_keys if budget >= 1024 else 2)
        nums = _distinct_numbers(rng, len(keys))
        depths = rng.uniform(0.0, 1.0, size=len(keys)).tolist()
        q = int(rng.integers(len(keys)))
        needles = [f"One of the special magic numbers for {k} is: {n}." for k, n in zip(keys, nums)]
        source, title = ctx.book_text(rng, budget * 8)
        question = (
            f"\n\nWhat is the special magic number for {keys[q]} mentioned in the "
            "text above? Answer with the number only."
        )
        return _needle_draft(
            source,
            needles,
            depths,
            question,
            prefix=f"The special magic number for {keys[q]} mentioned in the text is ",
            answer=nums[q],
            targets=(nums[q],),
            depth=depths[q],
            meta={
                "document": title,
                "key": keys[q],
                "distractors": [n for j, n in enumerate(nums) if j != q],
            },
        )

    def score(self, item: Item, text: str) -> dict[str, float]:
        return score_number(text, item.targets[0])


class MultiValueNeedle(RulerTask):
    name = "mv_needle"
    uses_corpus = True
    max_new_tokens = 40
    primary = "recall"
    metrics = ("recall",)
    description = "RULER multi-value NIAH: one key with 4 numbers in book text, ask for all"
    num_values = 4

    def draft(self, ctx: TaskContext, rng: np.random.Generator, budget: int, sizes: Any) -> Draft:
        key = random_keys(rng, 1)[0]
        nums = _distinct_numbers(rng, self.num_values if budget >= 1024 else 2)
        depths = np.sort(rng.uniform(0.0, 1.0, size=len(nums))).tolist()
        needles = [f"One of the special magic numbers for {key} is: {n}." for n in nums]
        source, title = ctx.book_text(rng, budget * 8)
        question = (
            f"\n\nWhat are all the special magic numbers for {key} mentioned in the "
            "text above? Answer with the numbers only."
        )
        return _needle_draft(
            source,
            needles,
            depths,
            question,
            prefix=f"The special magic numbers for {key} mentioned in the text are:",
            answer=" " + ", ".join(nums),
            targets=tuple(nums),
            meta={"document": title, "key": key, "depths": depths},
        )

    def score(self, item: Item, text: str) -> dict[str, float]:
        return {"recall": recall(extract_numbers(text), item.targets)}


_VAR = re.compile(r"\b[A-Z]{5}\b")


class VariableTracking(RulerTask):
    name = "var_track"
    max_new_tokens = 32
    primary = "recall"
    metrics = ("recall",)
    description = "RULER variable tracking: a chain of 5 assignments in filler text"
    hops = 4

    def draft(self, ctx: TaskContext, rng: np.random.Generator, budget: int, sizes: Any) -> Draft:
        names: list[str] = []
        while len(names) < self.hops + 1:
            n = "".join(rng.choice(list(string.ascii_uppercase), size=5))
            if n not in names:
                names.append(n)
        value = random_number(rng, 5)
        chain = [f"VAR {names[0]} = {value}."] + [
            f"VAR {names[j + 1]} = VAR {names[j]}." for j in range(self.hops)
        ]
        depths = np.sort(rng.uniform(0.0, 1.0, size=len(chain))).tolist()
        question = (
            f"\n\nWhich variables are assigned the value {value}, directly or "
            "through other variables, in the text above? List their names."
        )
        filler = FILLER * (budget * 8 // len(FILLER) + 1)

        def build(u: int) -> str:
            return VT_INSTRUCTION + insert_at_depths(filler[:u], chain, depths) + question

        return Draft(
            build=build,
            units=len(filler),
            prefix=f"The variables that hold the value {value} are:",
            answer=" " + ", ".join(names),
            targets=tuple(names),
            meta={"value": value, "depths": depths},
        )

    def score(self, item: Item, text: str) -> dict[str, float]:
        return {"recall": recall(_VAR.findall(text), item.targets)}


_WORD = re.compile(r"[a-z]+")


class CommonWords(RulerTask):
    name = "common_words"
    max_new_tokens = 64
    primary = "recall"
    metrics = ("recall",)
    description = "RULER common-words extraction: the most frequent words of a numbered list"

    def sizes(self, ctx: TaskContext, budget: int) -> tuple[int, int, int]:
        """(number of common words, times each common word appears, times each rare one does)."""
        sample = " ".join(f"{j + 100}. {w}" for j, w in enumerate(WORDS[:50]))
        per_entry = max(1.0, len(ctx.encode(sample)) / 50)
        entries = budget / per_entry
        n_common = 10 if entries >= 400 else 3
        freq_common = int(np.clip(round(0.4 * entries / n_common), 2, 30))
        freq_rare = max(1, min(3, freq_common // 4))
        return n_common, freq_common, freq_rare

    def draft(self, ctx: TaskContext, rng: np.random.Generator, budget: int, sizes: Any) -> Draft:
        n_common, f_common, f_rare = sizes
        vocab = [WORDS[j] for j in rng.permutation(len(WORDS))]
        vocab += [f"{a}{b}" for a, b in zip(vocab, vocab[1:] + vocab[:1])]  # more types
        common, rare = vocab[:n_common], vocab[n_common:]
        order_seed = int(rng.integers(2**31))
        question = (
            f"\n\nWhat are the {n_common} most common words in the list above? "
            "Answer with the words only."
        )

        def build(u: int) -> str:
            words = common * f_common + rare[:u] * f_rare
            perm = np.random.default_rng(order_seed).permutation(len(words))
            listing = " ".join(f"{j + 1}. {words[p]}" for j, p in enumerate(perm))
            return "Below is a numbered list of words.\n\n" + listing + question

        return Draft(
            build=build,
            units=len(rare),
            prefix=f"The {n_common} most common words in the list are:",
            answer=" " + ", ".join(common),
            targets=tuple(common),
            meta={"freq_common": f_common, "freq_rare": f_rare},
            units_key="rare_words",
        )

    def score(self, item: Item, text: str) -> dict[str, float]:
        return {"recall": recall(_WORD.findall(text.lower()), item.targets)}


__all__ = [
    "Draft",
    "RulerTask",
    "MultiKeyNeedle",
    "MultiValueNeedle",
    "VariableTracking",
    "CommonWords",
]
