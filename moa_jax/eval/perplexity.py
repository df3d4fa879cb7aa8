"""Perplexity of the last tokens of long book windows (2k / 4k / 8k ...).

Item i is a stretch of `max_length` tokens of book text (`--corpus`) from a random document and
paragraph (drawn from the seed and i only). The window of context length L is its *last* L
tokens, so every length of one run scores the same final `ppl_tail` tokens and differs only in
how much text precedes them: if the model (or a sparse method) uses long-range context, the
perplexity falls as L grows (the recycled-attention paper's protocol: last tokens of 8k/16k).

Per item the runner reports the mean NLL of the tail tokens; a cell reports `ppl`, exp of the
mean NLL over all tail tokens of its items (every item has the same tail size).
"""

from __future__ import annotations

from moa_jax.eval.tasks import Item, Task, TaskContext, item_rng


class TailPerplexity(Task):
    name = "perplexity"
    uses_corpus = True
    family = "perplexity"
    kind = "lm"
    max_new_tokens = 0
    primary = "ppl"
    metrics = ()
    description = "perplexity of the last tokens of book windows, same tail at every length"

    def budget(self, length: int) -> int:
        return int(length)

    def make_items(self, ctx: TaskContext, length: int, num_items: int, seed: int) -> list[Item]:
        total = max(ctx.max_length, length)
        tail = min(ctx.ppl_tail, length - 1)
        if tail < 1:
            raise ValueError(f"length {length} is too short for perplexity")
        items = []
        for i in range(num_items):
            n_chars = total * 6
            while True:
                # The item's generator ignores the length: the same text at every L.
                text, title = ctx.book_text(item_rng(seed, self.name, 0, i), n_chars)
                ids = ctx.encode(text)
                if len(ids) >= total or n_chars > total * 64:
                    break
                n_chars *= 2
            if len(ids) < total:
                raise ValueError(f"corpus {ctx.corpus!r} has fewer than {total} tokens")
            window = tuple(int(t) for t in ids[total - length : total])
            items.append(
                Item(
                    task=self.name,
                    length=length,
                    index=i,
                    token_ids=window,
                    meta={"document": title, "tail": tail},
                )
            )
        return items
