"""LongEval-style key-value line retrieval (the MoA paper's retrieval test).

The context is a record of lines `line <key>: REGISTER_CONTENT is <NNNNN>` with keys made of two
random words and 5-digit random numbers, as many lines as fit the length; the question asks for
the number of one line. The queried line sits at the item's depth (the depth grid, cycled over
items). The assistant's turn is forced to start with `The <REGISTER_CONTENT> in line <key> is <`
so that the next tokens are the digits (SmolLM2's tokenizer splits digits, so the answer NLL is
per digit).

Scores: `acc` (the first number produced equals the gold one), `digit_acc` (position-wise digit
accuracy, missing digits wrong) and, teacher-forced, the mean NLL of the gold digits.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moa_jax.eval.tasks import NumberTask, TaskContext, fit_units, random_keys, random_number

HEADER = (
    "Below is a record of lines to remember. Each line starts with 'line <key>' and ends "
    "with a <REGISTER_CONTENT> that is a number. Memorise the number of every line: at the "
    "end of the record I will ask for the <REGISTER_CONTENT> of one line.\n\n"
    "The record starts now:\n"
)
QUESTION = (
    "The record is over. What is the <REGISTER_CONTENT> in line {key}? Answer with the number only."
)
PREFIX = "The <REGISTER_CONTENT> in line {key} is <"


class LineRetrieval(NumberTask):
    name = "retrieval"
    family = "retrieval"
    nll = True
    description = "LongEval lines: 'line <key>: REGISTER_CONTENT is <n>', ask one line's number"

    def draw(
        self, ctx: TaskContext, rng: np.random.Generator, budget: int, index: int, sizes: Any
    ) -> dict[str, Any]:
        depth = ctx.depths[index % len(ctx.depths)]
        # More lines than can ever fit (a line is >= 8 tokens with any tokenizer we use).
        n_max = max(2, budget // 8)
        keys = random_keys(rng, n_max)
        nums: list[str] = []
        for _ in range(n_max):
            nums.append(random_number(rng, 5))
        lines = [f"line {k}: REGISTER_CONTENT is <{n}>" for k, n in zip(keys, nums)]

        def build(u: int):
            u = max(u, 1)
            q = int(round(depth * (u - 1)))
            prompt = HEADER + "\n".join(lines[:u]) + "\n\n" + QUESTION.format(key=keys[q])
            return prompt, PREFIX.format(key=keys[q]), q, u

        _, (prompt, prefix, q, u) = fit_units(
            build, lambda b: ctx.count(b[0], b[1]), budget, hi=n_max, lo=1
        )
        return {
            "prompt": prompt,
            "answer_prefix": prefix,
            "answer": nums[q],
            "targets": (nums[q],),
            "depth": depth,
            "meta": {"num_lines": u, "line": q, "key": keys[q]},
        }
