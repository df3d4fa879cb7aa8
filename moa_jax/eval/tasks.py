"""Evaluation tasks: the item type, the task interface, shared generators and scorers.

Every task builds its items from a seed alone (no hub): synthetic records, or real book text
from `moa_jax.corpora`. An item is built for one context length in tokens of the *model's own
tokenizer*, chat template included: its prompt has at most `length - task.max_new_tokens`
tokens, and (by filling with whole units until the next would not fit) at least a little
less than that, so that all items of one (task, length) cell share one padded shape (one
compilation per method).

Two kinds of task:
- 'generate': the prompt (a user message) plus an `answer_prefix` forced at the start of the
  assistant's turn; the model continues greedily and `Task.score(item, text)` scores the
  continuation. Optionally the gold `answer` is teacher-forced after the prefix and its
  per-token NLL is reported (one forward pass).
- 'lm': `item.token_ids` is a window of text; the NLL of its last tokens is reported.

Randomness: item i of (task, length, seed) draws from
`numpy.random.default_rng([seed, crc32(task), length, i])`, so an item does not depend on how
many items are asked for, nor on Python's hash seed.

The task families live in `retrieval.py`, `needle.py`, `ruler.py` and `perplexity.py`; `TASKS`
(filled by `moa_jax.eval`) maps names to instances and `GROUPS` names sets of them.
"""

from __future__ import annotations

import abc
import bisect
import dataclasses
import re
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from moa_jax.corpora import load_corpus
from moa_jax.generate import encode_prompt

# Common English words for record keys, variable-free vocabularies and distractors.
WORDS = tuple(
    """
able acid actor album alley amber angel ankle apple apron arena armor arrow aspen atlas attic
autumn avenue bacon badge baker bamboo banana banner barley barrel basket beacon beaver bell
bench berry bicycle biscuit blanket blossom border bottle branch bread breeze brick bridge
bronze brook bubble bucket buffalo butter button cabin cable cactus camel candle canoe canyon
carbon carpet carrot castle cattle cedar cellar cement chalk chapel cherry chess chimney cider
circle citrus clay cliff clock cloud clover cobalt cocoa coffee comet copper coral cotton
cradle crater crayon creek cricket crystal cube curtain cushion daisy dancer delta desert
diamond dinner dolphin donkey dragon drum eagle echo elbow ember engine falcon feather fence
fern ferry fiddle field flame flannel flute forest fossil fountain frost galaxy garden garlic
garnet gazelle ginger glacier globe granite grape gravel guitar hammer harbor harvest hazel
helmet hermit heron hollow honey horizon hunter island ivory jacket jasmine jelly jigsaw
jungle kayak kennel kettle kitten ladder lagoon lantern lava lemon lentil library lily linen
lizard lobster locket lotus lumber magnet mango maple marble market meadow melon mirror
mitten monkey mosaic motor muffin mural napkin nectar needle nickel noodle novel nutmeg oasis
ocean olive onion orbit orchard otter oyster paddle palace panda paper parrot pastry pebble
pencil pepper pepper piano pickle pillow pilot pine planet plaster plum pocket pollen pond
poppy potato prairie pumpkin puzzle quartz quill rabbit radar radish raft railway raisin
raven reef ribbon river robin rocket saddle salmon sandal satin scarf shadow shell shelter
silver sketch sled slipper socket spider spindle sponge spruce squash stable statue stone
storm sugar summit sunset swan tablet tailor teapot temple thistle thunder tiger timber
tomato topaz torch tower trumpet tulip tunnel turnip turtle umbrella valley velvet violet
violin wagon walnut walrus wander window winter wizard wombat yacht yarn zebra zephyr
""".split()
)
WORDS = tuple(dict.fromkeys(WORDS))  # de-duplicated, order kept


# ----------------------------------------------------------------------------- items
@dataclasses.dataclass(frozen=True)
class Item:
    """One evaluation example.

    Attributes:
      task, length, index: where it belongs (length = the cell's context length in tokens).
      prompt: the user message (generate tasks).
      answer_prefix: assistant text forced before generation ('' for none).
      answer: the gold continuation after the prefix (teacher-forced for the answer NLL).
      targets: gold values the scorer looks for (numbers, words, variable names).
      depth: relative position in [0, 1] of the needle / queried record, when there is one.
      token_ids: the text window of an 'lm' item.
      meta: free-form details (document title, keys, ...).
    """

    task: str
    length: int
    index: int
    prompt: str = ""
    answer_prefix: str = ""
    answer: str = ""
    targets: tuple[str, ...] = ()
    depth: float | None = None
    token_ids: tuple[int, ...] | None = None
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False)

    def to_dict(self, with_text: bool = False) -> dict[str, Any]:
        d: dict[str, Any] = {
            "task": self.task,
            "length": self.length,
            "index": self.index,
            "answer": self.answer,
            "targets": list(self.targets),
            "depth": self.depth,
            **dict(self.meta),
        }
        if with_text:
            d["prompt"] = self.prompt
            d["answer_prefix"] = self.answer_prefix
        return d


def item_rng(seed: int, task: str, length: int, index: int) -> np.random.Generator:
    """The item's own generator (independent of the number of items and of hash seeds)."""
    return np.random.default_rng([int(seed), zlib.crc32(task.encode()), int(length), int(index)])


# ----------------------------------------------------------------------------- context
class TaskContext:
    """What generators need: the tokenizer (lengths are in its tokens), the chat switch, the
    book corpus (loaded on first use) and run-wide settings.

    Args:
      tokenizer: an HF tokenizer (the model's).
      chat: wrap prompts in the tokenizer's chat template (instruct models).
      corpus: a `moa_jax.corpora.load_corpus` name or path (book text for haystacks).
      depths: needle depths of the depth x length grid.
      max_length: the longest context length of the run (perplexity windows share their end).
      ppl_tail: tokens scored at the end of each perplexity window.
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        chat: bool = True,
        corpus: str = "austen",
        depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
        max_length: int = 0,
        ppl_tail: int = 128,
        docs: Sequence[Any] | None = None,
    ):
        self.tokenizer = tokenizer
        self.chat = chat
        self.corpus = corpus
        self.depths = tuple(float(d) for d in depths)
        if not self.depths or any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise ValueError(f"depths must be in [0, 1], got {depths}")
        self.max_length = int(max_length)
        self.ppl_tail = int(ppl_tail)
        self._docs = list(docs) if docs is not None else None
        self._norm: list[str] | None = None

    # -- text source
    @property
    def docs(self) -> list[Any]:
        if self._docs is None:
            docs = [d for d in load_corpus(self.corpus) if d.text.strip()]
            if not docs:
                raise ValueError(f"corpus {self.corpus!r} has no text")
            self._docs = docs
        return self._docs

    def book_text(self, rng: np.random.Generator, n_chars: int) -> tuple[str, str]:
        """`n_chars` characters of book text from a random document and offset (continuing into
        the next documents if one is too short), starting at a paragraph. Returns (text, title).
        """
        docs = self.docs
        if self._norm is None:
            self._norm = [normalise_text(doc.text) for doc in docs]
        d = int(rng.integers(len(docs)))
        text = self._norm[d]
        start = 0
        if len(text) > n_chars:
            start = int(rng.integers(0, len(text) - n_chars))
            para = text.rfind("\n\n", 0, start)
            start = para + 2 if para >= 0 else 0
        out, title, j = text[start : start + n_chars], docs[d].title, d
        while len(out) < n_chars:
            j = (j + 1) % len(docs)
            out += "\n\n" + self._norm[j]
            out = out[:n_chars]
        return out, title

    # -- token counting, exactly as the runner encodes
    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def prompt_ids(self, prompt: str, answer_prefix: str = "") -> list[int]:
        """The token ids fed to the model: chat-wrapped prompt + the forced answer prefix."""
        ids = encode_prompt(self.tokenizer, prompt, self.chat)
        return ids + (self.encode(answer_prefix) if answer_prefix else [])

    def answer_ids(self, answer_prefix: str, answer: str) -> list[int]:
        """Token ids of `answer` as it continues `answer_prefix` (tokenised together, so that a
        leading space merges as it would in the model's own output)."""
        if not answer_prefix:
            return self.encode(answer)
        pre = self.encode(answer_prefix)
        both = self.encode(answer_prefix + answer)
        if both[: len(pre)] == pre:
            return both[len(pre) :]
        return self.encode(answer)

    def count(self, prompt: str, answer_prefix: str = "") -> int:
        return len(self.prompt_ids(prompt, answer_prefix))


def normalise_text(text: str) -> str:
    """Book text as paragraphs: hard line wraps joined with spaces, paragraphs separated by one
    blank line, runs of spaces collapsed."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    paras = re.split(r"\n\s*\n", text)
    paras = [re.sub(r"\s+", " ", p).strip() for p in paras]
    return "\n\n".join(p for p in paras if p)


# ----------------------------------------------------------------------------- fitting
def fit_units(
    build: Callable[[int], Any], count: Callable[[Any], int], budget: int, hi: int, lo: int = 0
) -> tuple[int, Any]:
    """The largest u in [lo, hi] with count(build(u)) <= budget, and build(u).

    Binary search (count is taken to grow with u; tokenisation makes it only nearly
    monotone, so the result is checked and stepped down if needed). Raises ValueError when even
    `lo` units do not fit.
    """
    a, b = lo, hi
    if count(build(a)) > budget:
        raise ValueError(
            f"the fixed part of the prompt needs more than {budget} tokens; "
            "use a longer context length"
        )
    while a < b:
        mid = (a + b + 1) // 2
        if count(build(mid)) <= budget:
            a = mid
        else:
            b = mid - 1
    out = build(a)
    while a > lo and count(out) > budget:
        a -= 1
        out = build(a)
    return a, out


_SENTENCE_END = re.compile(
    r"""(?<!\bMr)(?<!\bMrs)(?<!\bMs)(?<!\bDr)(?<!\bSt)[.!?]["')\]]*[ \n]+|\n+"""
)


def insert_at_depths(text: str, needles: Sequence[str], depths: Sequence[float]) -> str:
    """Inserts each needle (as its own sentence) at relative depth d of `text`, snapped to the
    nearest sentence end or line break (depth 0: the very start, 1: the very end)."""
    ends = [0] + [m.end() for m in _SENTENCE_END.finditer(text)] + [len(text)]
    spots = []
    for needle, d in zip(needles, depths):
        pos = int(round(float(d) * len(text)))
        if 0 < pos < len(text):
            i = bisect.bisect_right(ends, pos)
            pos = min(ends[i - 1], ends[min(i, len(ends) - 1)], key=lambda e: abs(e - pos))
        spots.append((pos, len(spots), needle))
    # Insert from the back so earlier offsets stay valid; needles snapped to one spot keep their
    # given order (the later one is inserted first).
    for pos, _, needle in sorted(spots, reverse=True):
        left, right = text[:pos], text[pos:]
        sep_l = "" if not left or left.endswith((" ", "\n")) else " "
        sep_r = "" if not right or right.startswith((" ", "\n")) else " "
        text = f"{left}{sep_l}{needle}{sep_r}{right}"
    return text


def random_number(rng: np.random.Generator, digits: int = 5, exclude: Sequence[str] = ()) -> str:
    """A random number of exactly `digits` digits (no leading zero), not in `exclude`."""
    while True:
        s = str(int(rng.integers(10 ** (digits - 1), 10**digits)))
        if s not in exclude:
            return s


def random_keys(rng: np.random.Generator, n: int, words: int = 2) -> list[str]:
    """n distinct keys of `words` random words joined by '-' (e.g. 'maple-otter')."""
    keys: dict[str, None] = {}
    if n > len(WORDS) ** words // 2:
        raise ValueError(f"cannot make {n} distinct keys of {words} words")
    while len(keys) < n:
        idx = rng.integers(len(WORDS), size=words)
        keys["-".join(WORDS[i] for i in idx)] = None
    return list(keys)


# ----------------------------------------------------------------------------- scoring
_NUM = re.compile(r"\d+")


def extract_numbers(text: str) -> list[str]:
    """Runs of digits in order (commas inside numbers are not joined)."""
    return _NUM.findall(text)


def digit_accuracy(pred: str | None, gold: str) -> float:
    """Fraction of the gold digits matched position by position; missing digits count wrong,
    extra predicted digits are ignored."""
    if not gold:
        raise ValueError("empty gold answer")
    pred = pred or ""
    return sum(p == g for p, g in zip(pred, gold)) / len(gold)


def score_number(text: str, gold: str) -> dict[str, float]:
    """Exact match of the first number in `text` and its per-digit accuracy."""
    nums = extract_numbers(text)
    first = nums[0] if nums else None
    return {"acc": float(first == gold), "digit_acc": digit_accuracy(first, gold)}


def recall(found: Sequence[str], targets: Sequence[str]) -> float:
    """Fraction of the distinct targets present in `found`."""
    t = set(targets)
    if not t:
        raise ValueError("no targets")
    return len(t & set(found)) / len(t)


# ----------------------------------------------------------------------------- tasks
class Task(abc.ABC):
    """A task family member.

    Attributes:
      name: registry name; family: 'retrieval' | 'needle' | 'ruler' | 'perplexity'.
      kind: 'generate' or 'lm'.
      max_new_tokens: greedy generation budget (and the answer budget of a cell).
      nll: teacher-force the gold answer and report its NLL by default.
      primary: the headline metric ('acc', 'recall' or 'ppl').
      metrics: per-item metrics this task's scorer returns (besides 'nll').
      uses_corpus: its items are made of the context's book text (`TaskContext.docs`).
    """

    name: str = ""
    family: str = ""
    kind: str = "generate"
    max_new_tokens: int = 16
    nll: bool = False
    primary: str = "acc"
    metrics: tuple[str, ...] = ("acc",)
    description: str = ""
    uses_corpus: bool = False

    @abc.abstractmethod
    def make_items(self, ctx: TaskContext, length: int, num_items: int, seed: int) -> list[Item]:
        """`num_items` items whose prompts fit `length - max_new_tokens` tokens."""

    def score(self, item: Item, text: str) -> dict[str, float]:
        raise NotImplementedError(f"{self.name} has no generation scorer")

    def budget(self, length: int) -> int:
        b = int(length) - self.max_new_tokens
        if b < 32:
            raise ValueError(f"length {length} is too short for task {self.name}")
        return b

    def __repr__(self) -> str:
        return f"<task {self.name}>"


class DrawnTask(Task):
    """A generate task whose item i is drawn from its own generator (`item_rng`) by `draw`.

    Subclasses write `draw` (and `sizes` for settings shared by every item of a length) and
    `score`.
    """

    def sizes(self, ctx: TaskContext, budget: int) -> Any:
        """Settings shared by every item of one budget (passed to `draw`)."""
        return None

    @abc.abstractmethod
    def draw(
        self, ctx: TaskContext, rng: np.random.Generator, budget: int, index: int, sizes: Any
    ) -> dict[str, Any]:
        """The `Item` fields (prompt, answer_prefix, answer, targets, depth, meta) of item
        `index`, drawn from `rng`, its prompt fitted to `budget` tokens."""

    def make_items(self, ctx: TaskContext, length: int, num_items: int, seed: int) -> list[Item]:
        budget = self.budget(length)
        sizes = self.sizes(ctx, budget)
        return [
            Item(
                task=self.name,
                length=length,
                index=i,
                **self.draw(ctx, item_rng(seed, self.name, length, i), budget, i, sizes),
            )
            for i in range(num_items)
        ]


class NumberTask(DrawnTask):
    """A drawn task whose answer is one number, at the depth `ctx.depths[index % len]`: scores
    `acc` and `digit_acc` of the first number produced."""

    max_new_tokens = 12
    primary = "acc"
    metrics = ("acc", "digit_acc")

    def score(self, item: Item, text: str) -> dict[str, float]:
        return score_number(text, item.targets[0])


TASKS: dict[str, Task] = {}
GROUPS: dict[str, tuple[str, ...]] = {}


def register_task(task: Task) -> Task:
    if task.name in TASKS:
        raise ValueError(f"task {task.name!r} is already registered")
    TASKS[task.name] = task
    return task


def resolve_tasks(spec: str | Sequence[str]) -> list[Task]:
    """Task objects for a comma-separated list of names and groups ('all', 'ruler', ...)."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[Task] = []
    for raw in names:
        name = raw.strip()
        if not name:
            continue
        if name == "all":
            expanded = tuple(TASKS)
        elif name in GROUPS:
            expanded = GROUPS[name]
        elif name in TASKS:
            expanded = (name,)
        else:
            raise ValueError(
                f"unknown task {name!r}; tasks: {sorted(TASKS)}, groups: {sorted(GROUPS) + ['all']}"
            )
        out += [TASKS[n] for n in expanded if TASKS[n] not in out]
    if not out:
        raise ValueError("no tasks selected")
    return out
