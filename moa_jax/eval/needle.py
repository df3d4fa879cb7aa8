"""Passkey / needle in a haystack of real book text, on a depth x length grid.

The haystack is a contiguous stretch of a public-domain book (`--corpus`, Austen by default),
cut to fill the length; the needle `The pass key is NNNNN. Remember it. NNNNN is the pass key.`
is inserted at the item's depth (snapped to a sentence end), item i taking depth
`depths[i % len(depths)]`. The assistant's turn starts with `The pass key is `.

Scores: `acc` (first number produced == passkey), `digit_acc`, and the teacher-forced NLL of the
passkey digits when asked for (`--nll all`).
"""

from __future__ import annotations

from moa_jax.eval.tasks import (
    Item,
    Task,
    TaskContext,
    fit_units,
    insert_at_depths,
    item_rng,
    random_number,
    score_number,
)

INSTRUCTION = (
    "There is a pass key hidden inside a lot of irrelevant text. Find it and "
    "memorise it: I will ask you for it afterwards.\n\n"
)
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "\n\nWhat is the pass key? Answer with the number only."
PREFIX = "The pass key is "


class Passkey(Task):
    name = "needle"
    family = "needle"
    max_new_tokens = 12
    nll = False
    primary = "acc"
    metrics = ("acc", "digit_acc")
    description = "passkey hidden at a depth of real book text"

    def make_items(self, ctx: TaskContext, length: int, num_items: int, seed: int) -> list[Item]:
        budget = self.budget(length)
        items = []
        for i in range(num_items):
            rng = item_rng(seed, self.name, length, i)
            depth = ctx.depths[i % len(ctx.depths)]
            key = random_number(rng, 5)
            source, title = ctx.book_text(rng, budget * 8)
            needle = NEEDLE.format(key=key)

            def build(u: int, source=source, needle=needle, depth=depth):
                hay = insert_at_depths(source[:u], [needle], [depth])
                return INSTRUCTION + hay + QUESTION

            n_chars, prompt = fit_units(
                build, lambda p: ctx.count(p, PREFIX), budget, hi=len(source)
            )
            items.append(
                Item(
                    task=self.name,
                    length=length,
                    index=i,
                    prompt=prompt,
                    answer_prefix=PREFIX,
                    answer=key,
                    targets=(key,),
                    depth=depth,
                    meta={"document": title, "haystack_chars": n_chars},
                )
            )
        return items

    def score(self, item: Item, text: str) -> dict[str, float]:
        return score_number(text, item.targets[0])
