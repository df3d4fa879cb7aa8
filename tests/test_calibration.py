"""Calibration set: document assignment, trimming, prompts, model-aligned answers, disk cache."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moa_jax.corpora import Document
from moa_jax.generate import generate
from moa_jax.models.registry import load_model
from moa_jax.search import calibration as cal
from moa_jax.search.answer_loss import make_batches


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-random")


def _docs(n=6, size=3000):
    rng = np.random.default_rng(0)
    words = ["the", "king", "queen", "sea", "night", "love", "sword", "crown", "storm", "ghost"]
    return [Document(f"doc{i}", " ".join(rng.choice(words, size // 5 + 200 * i))) for i in range(n)]


def test_trim_middle_keeps_both_ends():
    ids = list(range(100))
    assert cal.trim_middle(ids, 200) == ids
    t = cal.trim_middle(ids, 10)
    assert t == [0, 1, 2, 3, 4, 95, 96, 97, 98, 99]
    assert cal.trim_middle(ids, 11) == [0, 1, 2, 3, 4] + list(range(94, 100))


def test_plan_items_spreads_documents_and_rotates_tasks():
    specs = cal.plan_items(
        [50, 500, 500, 500, 10], {256: 2, 512: 2}, {256: 200, 512: 400}, tasks=("a", "b", "c")
    )
    assert [(s.length, s.index) for s in specs] == [(256, 0), (256, 1), (512, 0), (512, 1)]
    docs = [s.doc for s in specs]
    assert len(set(docs)) == 4  # one document per item while there are enough
    assert all(d in (1, 2, 3) for d in docs[:3])  # long-enough documents first
    assert [s.task for s in specs] == ["a", "b", "c", "a"]
    more = cal.plan_items([500, 500], {256: 5}, {256: 100})
    assert sorted(s.doc for s in more) == [0, 0, 0, 1, 1]


def test_split_documents_is_disjoint_and_deterministic():
    docs = _docs(8)
    a, b = cal.split_documents(docs, 2, seed=3, min_chars=0)
    a2, b2 = cal.split_documents(docs, 2, seed=3, min_chars=0)
    assert [d.title for d in a] == [d.title for d in a2] and len(b) == 2
    assert not {d.title for d in a} & {d.title for d in b}
    assert {d.title for d in a} | {d.title for d in b} == {d.title for d in docs}
    _, long_ = cal.split_documents(docs, 2, seed=3, min_chars=len(docs[-1].text))
    assert {d.title for d in long_} == {"doc6", "doc7"}  # too few long ones: the longest
    with pytest.raises(ValueError):
        cal.split_documents(docs, 8)


def test_prompt_builder_uses_chat_template(tiny):
    _, tok = tiny
    builder = cal.PromptBuilder(tok)
    doc = list(tok.encode("Once upon a time", add_special_tokens=False))
    ids = builder.build(doc, "Summarise it.", budget=100)
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>user\nOnce upon a time\n\nSummarise it.<|im_end|>")
    assert text.endswith("<|im_start|>assistant\n")
    short = builder.build(doc, "Summarise it.", budget=6)
    assert len(short) == len(ids) - len(doc) + 6


def test_build_items_model_aligned_and_cached(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    docs = _docs(4)
    cache = tmp_path / "cal.jsonl"
    counts = {192: 2, 256: 1}
    items = cal.build_items(
        model, tok, docs, counts, answer_tokens=12, cache_file=cache, batch_size=2, progress=False
    )
    assert sorted(items) == [192, 256] and len(items[192]) == 2 and len(items[256]) == 1
    for n, its in items.items():
        for it in its:
            assert len(it.tokens) <= n and 1 <= len(it.answer) <= 12
            assert it.source in {d.title for d in docs} and it.task in cal.DEFAULT_TASKS
    # the answer is the dense model's own greedy continuation of the prompt
    it = items[192][0]
    out = generate(model, [list(it.tokens[: it.answer_start])], max_new_tokens=12)
    assert tuple(out.rows()[0]) == it.answer
    # a second call loads everything from the cache without generating
    lines = cache.read_text().splitlines()
    assert len(lines) == 3

    def boom(*a, **k):
        raise AssertionError("should not generate")

    monkeypatch.setattr(cal, "generate", boom)
    again = cal.build_items(
        model, tok, docs, counts, answer_tokens=12, cache_file=cache, progress=False
    )
    assert again == items
    monkeypatch.undo()
    # resume: a truncated cache (and a half-written line) regenerates only what is missing
    cache.write_text(lines[0] + "\n" + lines[1][:20])
    resumed = cal.build_items(
        model, tok, docs, counts, answer_tokens=12, cache_file=cache, progress=False
    )
    assert resumed == items
    assert (
        len(
            [ln for ln in cache.read_text().splitlines() if ln.startswith("{") and ln.endswith("}")]
        )
        == 3
    )


def test_build_items_rejects_too_short_lengths(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="document tokens"):
        cal.build_items(model, tok, _docs(2), {64: 1}, answer_tokens=32, progress=False)


def test_calibration_key_changes_with_inputs():
    k1 = cal.calibration_key(model="m", counts={1: 2})
    assert k1 == cal.calibration_key(counts={1: 2}, model="m")
    assert k1 != cal.calibration_key(model="m", counts={1: 3})


def test_batches_target_the_answer_tokens_only():
    item = cal.CalibrationItem(tuple(range(10, 20)), 7, 16)
    b = make_batches([item], 16, 1, pad_id=0, answer_bucket=4)[0]
    assert b.tokens.shape == (1, 16) and list(b.tokens[0, 10:]) == [0] * 6
    assert list(b.tgt_pos[0]) == [6, 7, 8, 0] and list(b.tgt_ids[0, :3]) == [17, 18, 19]
    assert list(b.tgt_w[0]) == [1, 1, 1, 0]
    rt = cal.CalibrationItem.from_json(json.loads(json.dumps(item.to_json())))
    assert rt == item


def test_masked_attention_in_generate_matches_dense(tiny):
    """The query-chunked backend used for long calibration prompts generates what the dense
    backend does (right-padded batch of different prompt lengths)."""
    from moa_jax.models.masked_attention import MaskedAttention

    model, _ = tiny
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 500, n).tolist() for n in (150, 97)]
    want = generate(model, prompts, max_new_tokens=8)
    got = generate(model, prompts, max_new_tokens=8, attention=MaskedAttention(q_chunk=32))
    assert got.rows() == want.rows()


def test_excerpt_parts_are_distinct_windows():
    ids = list(range(1000))
    assert cal.excerpt(ids, 100, 0) == cal.trim_middle(ids, 100)
    parts = [cal.excerpt(ids, 100, p) for p in range(1, 5)]
    assert all(len(p) == 100 and p == list(range(p[0], p[0] + 100)) for p in parts)
    assert len({p[0] for p in parts}) == 4
    assert cal.excerpt(ids[:50], 100, 3) == ids[:50]  # short documents stay whole


def test_plan_items_interleaves_recall_items():
    specs = cal.plan_items([500] * 4, {256: 8}, {256: 200}, tasks=("a", "b"), recall_fraction=0.5)
    kinds = [s.task for s in specs]
    assert kinds.count(cal.RECALL_TASK) == 4
    assert kinds == ["a", cal.RECALL_TASK, "b", cal.RECALL_TASK] * 2
    assert all(s.task != cal.RECALL_TASK for s in cal.plan_items([500], {256: 3}, {256: 200}))
    with pytest.raises(ValueError, match="recall_fraction"):
        cal.plan_items([500], {256: 3}, {256: 200}, recall_fraction=1.5)


def test_recall_item_hides_facts_and_asks_one():
    import random
    import zlib

    def encode(text):  # a word-level "tokenizer": word -> id (crc32: the same in every process)
        return [zlib.crc32(w.encode()) % 99991 + 3 for w in text.split()]

    vocab = {}
    for h in cal.RECALL_HOLDERS:
        for c in cal.RECALL_CONTAINERS:
            for o in cal.RECALL_OBJECTS:
                vocab[tuple(encode(f" The {h} {c} holds {o}."))] = (h, c)
    doc = list(range(1000, 1600))
    ids, question = cal.recall_item(doc, encode, 300, random.Random(0))
    assert len(ids) <= 300
    found = [
        key for key in vocab if any(ids[i : i + len(key)] == list(key) for i in range(len(ids)))
    ]
    assert len(found) == cal.RECALL_FACTS
    asked = question.removeprefix("What does the ").split(" hold?")[0]
    assert asked in {f"{vocab[k][0]} {vocab[k][1]}" for k in found}
    again, q2 = cal.recall_item(doc, encode, 300, random.Random(0))
    assert (again, q2) == (ids, question)  # seeded
    with pytest.raises(ValueError, match="too short"):
        cal.recall_item(doc, encode, 20, random.Random(0))


def test_build_items_with_recall_items(tiny, tmp_path):
    model, tok = tiny
    items = cal.build_items(
        model,
        tok,
        _docs(3),
        {512: 4},
        answer_tokens=40,
        recall_fraction=0.5,
        seed=3,
        progress=False,
        cache_file=tmp_path / "c.jsonl",
    )[512]
    recall = [it for it in items if it.task.startswith("What does the ")]
    assert len(recall) == 2
    assert all(len(it.answer) <= cal.RECALL_ANSWER_TOKENS for it in recall)
    assert all(len(it.tokens) <= 512 for it in items)
    text = tok.decode(list(recall[0].tokens[: recall[0].answer_start]))
    assert sum(text.count(f" {c} holds ") for c in cal.RECALL_CONTAINERS) == cal.RECALL_FACTS
