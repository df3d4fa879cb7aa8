"""Calibration set for the MoA plan search: long documents with the dense model's own answers.

MoA's ablation (METHODS.md) finds that supervising with the dense model's own response to a long
context ("model-aligned" data) ranks heads far better than plain LM loss or human answers. So an
item is

    <chat template>[user] {document excerpt}\n\n{instruction} [assistant] {model's greedy answer}

and its loss is the mean cross-entropy on the answer tokens only (`answer_loss.make_batches`).

Construction (choices made here, documented and tested):
- Each length level N gets `count` items; the prompt is sized so that prompt + answer <= N
  (`answer_tokens` are reserved for the answer). A document longer than its token budget is
  trimmed as the reference trims contexts: its first and last halves are kept.
- Documents are shuffled with `seed`; every item uses a different document while there are
  enough (levels take documents in turn), and documents shorter than a level's budget are only
  used when no longer one is left. Instructions rotate over `tasks`.
- Held-out items (for validating candidate plans) come from documents no calibration item uses
  (`split_documents`). A document used by several items gives each a different excerpt
  (`excerpt`).
- Synthetic recall items (`recall_fraction`, interleaved): facts "The <colour> <box> holds
  <object>." hidden in the excerpt and a question about one (`recall_item`). The answer is still
  the dense model's own; they make the answer loss depend on long-range retrieval, which a small
  model's summaries barely do (docs/results.md).
- Answers: greedy `generate()` with the dense model, at most `answer_tokens` new tokens, stopping
  at the model's EOS (the stop token is part of the answer, it is what the model must predict).
  Long prompts are prefilled with a query-chunked attention backend to bound memory.
- Cache: items are appended to a JSON-lines file as they are generated, keyed by a hash of
  everything that determines them (model identity, corpus fingerprint, lengths, counts, tasks,
  seed, format version). Re-running loads them; an interrupted run resumes where it stopped.

Public API:
  CalibrationItem(tokens, answer_start, length, source, task)
  ItemSpec(length, index, doc, task)
  plan_items(docs, doc_tokens, counts, ...) -> list[ItemSpec]
  split_documents(docs, n_holdout, seed) -> (calibration docs, held-out docs)
  build_items(model, tokenizer, docs, counts, *, answer_tokens, seed, cache_file, ...) -> dict
  calibration_key(**fields) -> str
  DEFAULT_TASKS
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from moa_jax.generate import generate
from moa_jax.models.masked_attention import MaskedAttention

FORMAT_VERSION = 1

DEFAULT_TASKS = (
    "Summarise the text above in a few sentences.",
    "Who are the main characters in the text above, and what do they want?",
    "What happens at the beginning and at the end of the text above?",
    "Describe the setting and the main events of the text above.",
)
DOC_MARKER = "\x00DOC\x00"

# Synthetic recall items (`recall_fraction`): facts "The <holder> <container> holds <object>."
# hidden in the document at random depths, and a question about one of them. Words and format
# differ from the evaluation's tasks (numeric passkeys, LongEval lines), so a plan searched with
# them is still scored on unseen formats.
RECALL_TASK = "recall"
RECALL_HOLDERS = (
    "red",
    "blue",
    "green",
    "golden",
    "silver",
    "wooden",
    "iron",
    "glass",
    "paper",
    "velvet",
    "copper",
    "marble",
    "striped",
    "painted",
    "oak",
    "leather",
)
RECALL_CONTAINERS = (
    "box",
    "jar",
    "chest",
    "drawer",
    "bag",
    "basket",
    "envelope",
    "cabinet",
    "trunk",
    "tin",
    "case",
    "cupboard",
)
RECALL_OBJECTS = (
    "a brass key",
    "an old map",
    "a silk glove",
    "a pocket watch",
    "a pearl ring",
    "a sealed letter",
    "a toy soldier",
    "a silver spoon",
    "a blue feather",
    "a wax candle",
    "a tin whistle",
    "a glass marble",
    "a lace handkerchief",
    "a copper coin",
    "a small compass",
    "a dried rose",
    "a chess knight",
    "an ivory comb",
    "a wooden flute",
    "a lump of amber",
)
RECALL_FACTS = 4
RECALL_ANSWER_TOKENS = 24


@dataclasses.dataclass(frozen=True)
class CalibrationItem:
    """One calibration item: tokens = prompt + answer; the loss covers tokens[answer_start:]."""

    tokens: tuple[int, ...]
    answer_start: int
    length: int
    source: str = ""
    task: str = ""

    @property
    def answer(self) -> tuple[int, ...]:
        return self.tokens[self.answer_start :]

    def to_json(self) -> dict[str, Any]:
        return {
            "tokens": list(self.tokens),
            "answer_start": self.answer_start,
            "length": self.length,
            "source": self.source,
            "task": self.task,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> CalibrationItem:
        return cls(
            tuple(int(t) for t in d["tokens"]),
            int(d["answer_start"]),
            int(d["length"]),
            str(d.get("source", "")),
            str(d.get("task", "")),
        )


@dataclasses.dataclass(frozen=True)
class ItemSpec:
    """What to build: item `index` of length level `length` from document `doc` with `task`
    (`RECALL_TASK`: a synthetic recall item, see `recall_item`)."""

    length: int
    index: int
    doc: int
    task: str


def calibration_key(**fields: Any) -> str:
    """A short stable hash of the fields that determine a calibration set."""
    blob = json.dumps({"format": FORMAT_VERSION, **fields}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def corpus_fingerprint(docs: Sequence[Any]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(d.title.encode())
        h.update(str(len(d.text)).encode())
        h.update(d.text[:256].encode(errors="replace"))
    return h.hexdigest()[:16]


def split_documents(
    docs: Sequence[Any], n_holdout: int, seed: int = 0, min_chars: int = 0
) -> tuple[list[Any], list[Any]]:
    """Shuffles documents (seeded) and sets `n_holdout` of the longest-enough ones aside.

    Held-out documents are taken from the end of the shuffled order among those with at least
    `min_chars` characters (falling back to the longest ones).
    """
    order = list(docs)
    random.Random(seed).shuffle(order)
    if n_holdout <= 0:
        return order, []
    if n_holdout >= len(order):
        raise ValueError(f"cannot hold out {n_holdout} of {len(order)} documents")
    long_enough = [i for i, d in enumerate(order) if len(d.text) >= min_chars]
    if len(long_enough) < n_holdout:
        long_enough = sorted(range(len(order)), key=lambda i: len(order[i].text))  # longest last
    held = set(long_enough[-n_holdout:])
    return (
        [d for i, d in enumerate(order) if i not in held],
        [d for i, d in enumerate(order) if i in held],
    )


def plan_items(
    doc_lengths: Sequence[int],
    counts: Mapping[int, int],
    budgets: Mapping[int, int],
    tasks: Sequence[str] = DEFAULT_TASKS,
    recall_fraction: float = 0.0,
) -> list[ItemSpec]:
    """Assigns documents and tasks to items (see module docstring).

    Args:
      doc_lengths: token count of each (already shuffled) document.
      counts: items per length level.
      budgets: document-token budget per length level.
      recall_fraction: share of each level's items that are synthetic recall items
        (interleaved: item i is one when floor((i+1) f) > floor(i f)).
    """
    if not 0.0 <= recall_fraction <= 1.0:
        raise ValueError(f"recall_fraction must be in [0, 1], got {recall_fraction}")
    if not doc_lengths:
        raise ValueError("no documents to calibrate on")
    used = [0] * len(doc_lengths)
    specs, k = [], 0
    for length in sorted(counts):
        for index in range(int(counts[length])):
            need = budgets[length]
            # least used first, then long enough, then original (shuffled) order
            doc = min(range(len(doc_lengths)), key=lambda i: (used[i], doc_lengths[i] < need, i))
            used[doc] += 1
            recall = int((index + 1) * recall_fraction) > int(index * recall_fraction)
            if recall:
                specs.append(ItemSpec(length, index, doc, RECALL_TASK))
            else:
                specs.append(ItemSpec(length, index, doc, tasks[k % len(tasks)]))
                k += 1
    return specs


def _encode_long(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a whole document (no special tokens, no too-long-for-the-model warning)."""
    try:
        return list(tokenizer.encode(text, add_special_tokens=False, verbose=False))
    except TypeError:  # tokenizers without the `verbose` keyword
        return list(tokenizer.encode(text, add_special_tokens=False))


def excerpt(ids: Sequence[int], budget: int, part: int = 0) -> list[int]:
    """The `part`-th excerpt of a document for a budget: part 0 keeps the first and last halves
    of a too-long document (`trim_middle`, as the reference does); later parts (a document used
    again, e.g. a corpus of a few long novels) take consecutive windows further in."""
    ids = list(ids)
    if part == 0 or len(ids) <= budget:
        return trim_middle(ids, budget)
    start = (part * budget) % (len(ids) - budget)
    return ids[start : start + budget]


def trim_middle(ids: Sequence[int], budget: int) -> list[int]:
    """Keeps the first and last halves of a too-long token list (as the MoA reference does)."""
    ids = list(ids)
    if len(ids) <= budget:
        return ids
    head = budget // 2
    return ids[:head] + ids[len(ids) - (budget - head) :]


def recall_item(
    doc_ids: Sequence[int], encode, budget: int, rng: random.Random, facts: int = RECALL_FACTS
) -> tuple[list[int], str]:
    """A synthetic recall item: `facts` sentences "The <holder> <container> holds <object>."
    inserted at random token positions (after a sentence end where one is near) of the trimmed
    document, and the question about one of them. Returns (document ids, instruction)."""
    pairs = rng.sample([(h, c) for h in RECALL_HOLDERS for c in RECALL_CONTAINERS], facts)
    objects = rng.sample(RECALL_OBJECTS, facts)
    sentences = [encode(f" The {h} {c} holds {o}.") for (h, c), o in zip(pairs, objects)]
    room = budget - sum(len(x) for x in sentences)
    if room < facts:
        raise ValueError(f"a document budget of {budget} tokens is too short for recall items")
    ids = trim_middle(doc_ids, room)
    period = set(encode("."))
    stops = {i + 1 for i, t in enumerate(ids) if t in period}
    spots = sorted(rng.randrange(len(ids) + 1) for _ in range(facts))
    spots = [
        min(stops, key=lambda s: abs(s - p)) if stops and min(abs(s - p) for s in stops) < 64 else p
        for p in spots
    ]
    order = sorted(range(facts), key=lambda i: spots[i], reverse=True)
    for i in order:  # from the back so earlier spots stay valid
        ids[spots[i] : spots[i]] = sentences[i]
    h, c = pairs[rng.randrange(facts)]
    return ids, f"What does the {h} {c} hold? Answer in a few words."


class PromptBuilder:
    """Token ids of `template(user: excerpt + instruction)` assembled around document tokens."""

    def __init__(self, tokenizer: Any, chat: bool = True):
        self.tokenizer = tokenizer
        self.chat = chat and bool(getattr(tokenizer, "chat_template", None))
        self._cache: dict[str, tuple[list[int], list[int]]] = {}

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def parts(self, task: str) -> tuple[list[int], list[int]]:
        """(prefix ids, suffix ids) around the document for one instruction."""
        if task not in self._cache:
            content = DOC_MARKER + "\n\n" + task
            if self.chat:
                text = self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": content}],
                    add_generation_prompt=True,
                    tokenize=False,
                )
            else:
                text = content + "\n\nAnswer:"
            pre, post = text.split(DOC_MARKER, 1)
            self._cache[task] = (self._encode(pre), self._encode(post))
        return self._cache[task]

    def overhead(self, tasks: Sequence[str]) -> int:
        return max(len(p) + len(s) for p, s in (self.parts(t) for t in tasks))

    def build(self, doc_ids: Sequence[int], task: str, budget: int, part: int = 0) -> list[int]:
        pre, post = self.parts(task)
        return pre + excerpt(doc_ids, budget, part) + post

    def build_recall(
        self, doc_ids: Sequence[int], budget: int, rng: random.Random, part: int = 0
    ) -> tuple[list[int], str]:
        """A recall prompt (see `recall_item`) that fits `budget` document tokens, and its
        instruction."""
        ids, question = recall_item(excerpt(doc_ids, 4 * budget, part), self._encode, budget, rng)
        pre, post = self.parts(question)
        return pre + ids + post, question


def build_items(
    model: Any,
    tokenizer: Any,
    docs: Sequence[Any],
    counts: Mapping[int, int],
    *,
    answer_tokens: int = 128,
    tasks: Sequence[str] = DEFAULT_TASKS,
    recall_fraction: float = 0.0,
    seed: int = 0,
    chat: bool = True,
    batch_size: int = 1,
    cache_file: str | Path | None = None,
    q_chunk: int = 512,
    progress: bool = True,
    desc: str = "calibration",
) -> dict[int, list[CalibrationItem]]:
    """Builds (or loads from `cache_file`) the items of every length level.

    Args:
      model: the dense model whose own greedy answers are the targets.
      tokenizer: HF-style tokenizer (encode / decode / apply_chat_template).
      docs: documents (`.title`, `.text`), already shuffled / split by the caller.
      counts: {length level N: number of items}.
      answer_tokens: max new tokens per answer (the prompt leaves room for them); recall items
        answer in at most `RECALL_ANSWER_TOKENS`.
      recall_fraction: share of synthetic recall items per level (`plan_items`).
      seed: seeds the recall items' facts (item i of level N: Random((seed, N, i))).
      batch_size: prompts generated together.
      cache_file: JSON-lines file to resume from and append to.
    Returns:
      {N: [CalibrationItem, ...]} in index order.
    """
    counts = {int(n): int(c) for n, c in counts.items() if int(c) > 0}
    builder = PromptBuilder(tokenizer, chat=chat)
    budgets = document_budgets(builder, counts, tasks, recall_fraction, answer_tokens)
    # Character lengths are a cheap proxy to avoid tokenizing every document up front.
    approx = [len(d.text) // 3 for d in docs]
    specs = plan_items(approx, counts, budgets, tasks, recall_fraction)

    cache_file = Path(cache_file) if cache_file else None
    done = _cached_items(cache_file)
    todo = [s for s in specs if (s.length, s.index) not in done]
    part = _document_parts(specs)
    stop_ids = tuple(model.config.eos_token_ids) or None
    doc_ids: dict[int, list[int]] = {}
    bar = tqdm(
        total=len(specs),
        initial=len(specs) - len(todo),
        desc=desc,
        unit="item",
        disable=not progress,
    )
    # group by length and kind so that a batch shares one prompt size and answer budget
    by_len: dict[tuple[int, bool], list[ItemSpec]] = {}
    for s in todo:
        by_len.setdefault((s.length, s.task == RECALL_TASK), []).append(s)
    for (length, recall), group in sorted(by_len.items()):
        attention = MaskedAttention(q_chunk=q_chunk)
        for start in range(0, len(group), batch_size):
            batch = group[start : start + batch_size]
            for s in batch:
                if s.doc not in doc_ids:
                    doc_ids[s.doc] = _encode_long(tokenizer, docs[s.doc].text)
            made = [
                _prompt(builder, doc_ids[s.doc], s, budgets[length], part, recall, seed)
                for s in batch
            ]
            prompts = [p for p, _ in made]
            instructions = [instruction for _, instruction in made]
            new = min(answer_tokens, RECALL_ANSWER_TOKENS) if recall else answer_tokens
            # a short last batch repeats its last prompt: one batch shape, one compiled program
            # per group (a GPU compile of the generate loop takes tens of seconds)
            filler = [prompts[-1]] * (batch_size - len(prompts))
            out = generate(
                model,
                prompts + filler,
                max_new_tokens=new,
                stop_ids=stop_ids,
                attention=attention,
                scan_layers=True,
            )
            lines = []
            for s, p, ans, instruction in zip(batch, prompts, out.rows(), instructions):
                item = CalibrationItem(
                    tuple(p) + tuple(ans), len(p), length, docs[s.doc].title, instruction
                )
                done[(s.length, s.index)] = item
                lines.append(json.dumps({**item.to_json(), "index": s.index}))
            if cache_file is not None:
                cache_file.parent.mkdir(parents=True, exist_ok=True)
                with open(cache_file, "a") as f:
                    f.write("\n".join(lines) + "\n")
            bar.update(len(batch))
    bar.close()
    result: dict[int, list[CalibrationItem]] = {}
    for s in specs:
        result.setdefault(s.length, []).append(done[(s.length, s.index)])
    return result


def document_budgets(
    builder: PromptBuilder,
    counts: Mapping[int, int],
    tasks: Sequence[str],
    recall_fraction: float,
    answer_tokens: int,
) -> dict[int, int]:
    """{length level: document tokens its prompts hold}: the level less the longest prompt
    around the document and the answer."""
    overhead = builder.overhead(tasks)
    if recall_fraction > 0:  # the longest recall question, plus a little tokenizer slack
        longest = (
            f"What does the {max(RECALL_HOLDERS, key=len)} "
            f"{max(RECALL_CONTAINERS, key=len)} hold? Answer in a few words."
        )
        overhead = max(overhead, builder.overhead([longest]) + 4)
    budgets = {}
    for n in counts:
        budgets[n] = n - overhead - answer_tokens
        if budgets[n] < 16:
            raise ValueError(
                f"length {n} leaves only {budgets[n]} document tokens after the "
                f"prompt ({overhead}) and the answer ({answer_tokens}); use longer "
                f"lengths or fewer answer tokens"
            )
    return budgets


def _cached_items(cache_file: Path | None) -> dict[tuple[int, int], CalibrationItem]:
    """{(length, index): item} of the items a cache file holds (none if there is no file)."""
    done: dict[tuple[int, int], CalibrationItem] = {}
    if cache_file is not None and cache_file.exists():
        for line in cache_file.read_text().splitlines():
            try:
                d = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by an interrupted run
                continue
            done[(int(d["length"]), int(d["index"]))] = CalibrationItem.from_json(d)
    return done


def _document_parts(specs: Sequence[ItemSpec]) -> dict[tuple[int, int], int]:
    """{(length, index): how many earlier items used the same document}."""
    uses: dict[int, int] = {}
    part = {}
    for s in specs:
        part[(s.length, s.index)] = uses.get(s.doc, 0)
        uses[s.doc] = uses.get(s.doc, 0) + 1
    return part


def _prompt(
    builder: PromptBuilder,
    doc_ids: Sequence[int],
    s: ItemSpec,
    budget: int,
    part: Mapping[tuple[int, int], int],
    recall: bool,
    seed: int,
) -> tuple[list[int], str]:
    """The prompt of one item and its instruction (a recall question, or the task)."""
    if recall:
        return builder.build_recall(
            doc_ids,
            budget,
            random.Random(f"{seed}-{s.length}-{s.index}"),
            part[(s.length, s.index)],
        )
    return builder.build(doc_ids, s.task, budget, part[(s.length, s.index)]), s.task


def describe(
    items: Mapping[int, Sequence[CalibrationItem]],
    tokenizer: Any = None,
    file: Any = None,
    show: int = 1,
) -> None:
    """Prints counts, answer lengths and (with a tokenizer) a sample answer per level to `file`
    (default: `sys.stderr` at the time of the call)."""
    file = sys.stderr if file is None else file
    for n, its in sorted(items.items()):
        ans = np.array([len(it.answer) for it in its])
        print(
            f"  N={n}: {len(its)} items, prompt {min(it.answer_start for it in its)}.."
            f"{max(it.answer_start for it in its)} tokens, answers {ans.min()}..{ans.max()} "
            f"tokens (mean {ans.mean():.0f})",
            file=file,
        )
        if tokenizer is not None:
            for it in its[:show]:
                text = tokenizer.decode(list(it.answer), skip_special_tokens=True)
                text = " ".join(text.split())
                print(f"    [{it.source}] {it.task} -> {text[:160]!r}", file=file)
