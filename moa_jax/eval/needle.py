"""Passkey / needle in a haystack of real book text, on a depth x length grid.

The haystack is a contiguous stretch of a public-domain book (`--corpus`, Austen by default),
cut to fill the length; the needle `The pass key is NNNNN. Remember it. NNNNN is the pass key.`
is inserted at the item's depth (snapped to a sentence end), item i taking depth
`depths[i % len(depths)]`. The assistant's turn starts with `The pass key is `.

Scores: `acc` (first number produced == passkey), `digit_acc`, and the teacher-forced NLL of the
passkey digits when asked for (`--nll all`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moa_jax.eval.tasks import NumberTask, TaskContext, fit_units, insert_at_depths, random_number

INSTRUCTION = (
    "There is a pass key hidden inside a lot of irrelevant text. Find it and "
    "memorise it: I will ask you for it afterwards.\n\n"
)
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "\n\nWhat is the pass key? Answer with the number only."
PREFIX = "The pass key is "


class Passkey(NumberTask):
    name = "needle"
    uses_corpus = True
    family = "needle"
    nll = False
    description = "passkey hidden at a depth of real book text"

    def draw(
        self, ctx: TaskContext, rng: np.random.Generator, budget: int, index: int, sizes: Any
    ) -> dict[str, Any]:
        depth = ctx.depths[index % len(ctx.depths)]
        key = random_number(rng, 5)
        source, title = ctx.book_text(rng, budget * 8)
        needle = NEEDLE.format(key=key)

        def build(u: int) -> str:
            return INSTRUCTION + insert_at_depths(source[:u], [needle], [depth]) + QUESTION

        n_chars, prompt = fit_units(build, lambda p: ctx.count(p, PREFIX), budget, hi=len(source))
        return {
            "prompt": prompt,
            "answer_prefix": PREFIX,
            "answer": key,
            "targets": (key,),
            "depth": depth,
            "meta": {"document": title, "haystack_chars": n_chars},
        }
