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

from moa_jax.eval.tasks import (
    Item,
    Task,
    TaskContext,
    fit_units,
    item_rng,
    random_keys,
    random_number,
    score_number,
)

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


class LineRetrieval(Task):
    name = "retrieval"
    family = "retrieval"
    max_new_tokens = 12
    nll = True
    primary = "acc"
    metrics = ("acc", "digit_acc")
    description = "LongEval lines: 'line <key>: REGISTER_CONTENT is <n>', ask one line's number"

    def make_items(self, ctx: TaskContext, length: int, num_items: int, seed: int) -> list[Item]:
        budget = self.budget(length)
        items = []
        for i in range(num_items):
            rng = item_rng(seed, self.name, length, i)
            depth = ctx.depths[i % len(ctx.depths)]
            # More lines than can ever fit (a line is >= 8 tokens with any tokenizer we use).
            n_max = max(2, budget // 8)
            keys = random_keys(rng, n_max)
            nums: list[str] = []
            for _ in range(n_max):
                nums.append(random_number(rng, 5))
            lines = [f"line {k}: REGISTER_CONTENT is <{n}>" for k, n in zip(keys, nums)]

            def build(u: int, lines=lines, keys=keys, depth=depth):
                u = max(u, 1)
                q = int(round(depth * (u - 1)))
                prompt = HEADER + "\n".join(lines[:u]) + "\n\n" + QUESTION.format(key=keys[q])
                return prompt, PREFIX.format(key=keys[q]), q, u

            _, (prompt, prefix, q, u) = fit_units(
                build, lambda b: ctx.count(b[0], b[1]), budget, hi=n_max, lo=1
            )
            items.append(
                Item(
                    task=self.name,
                    length=length,
                    index=i,
                    prompt=prompt,
                    answer_prefix=prefix,
                    answer=nums[q],
                    targets=(nums[q],),
                    depth=depth,
                    meta={"num_lines": u, "line": q, "key": keys[q]},
                )
            )
        return items

    def score(self, item: Item, text: str) -> dict[str, float]:
        return score_number(text, item.targets[0])
