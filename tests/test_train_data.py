"""Training data: tokenising, packing (chunk / concat / segments), shuffling, resumable position."""

import json

import numpy as np
import pytest

from moa_jax.corpora import Document
from moa_jax.models.tokenizer import byte_level_tokenizer
from moa_jax.train.data import (
    BatchIterator,
    eval_rows,
    load_documents,
    pack,
    split_documents,
    tokenize_documents,
)

DOCS = [np.arange(100, 110), np.arange(200, 225), np.arange(300, 303)]


def test_chunk_packing_keeps_documents_apart():
    data = pack(DOCS, seq_len=4, packing="chunk")
    assert data.tokens.shape == (2 + 5, 5) and data.dropped_documents == 1
    np.testing.assert_array_equal(data.tokens[0], [100, 101, 102, 103, 104])
    np.testing.assert_array_equal(data.tokens[2], [200, 201, 202, 203, 204])
    b = data.batch([0, 2])
    np.testing.assert_array_equal(b.inputs, [[100, 101, 102, 103], [200, 201, 202, 203]])
    np.testing.assert_array_equal(b.targets, [[101, 102, 103, 104], [201, 202, 203, 204]])
    np.testing.assert_array_equal(b.positions, [[0, 1, 2, 3]] * 2)
    assert b.loss_mask.dtype == np.float32 and b.loss_mask.all()


def test_concat_and_segments_packing():
    stream = np.concatenate([np.append(d, 2) for d in DOCS])  # EOS = 2 after each doc
    cat = pack(DOCS, seq_len=7, packing="concat", eos_id=2)
    np.testing.assert_array_equal(cat.tokens.ravel(), stream[: cat.tokens.size])
    assert cat.positions is None and cat.batch([1]).loss_mask.all()

    seg = pack(DOCS, seq_len=7, packing="segments", eos_id=2)
    np.testing.assert_array_equal(seg.tokens, cat.tokens)
    # Row 0 = doc0 (10 tokens + EOS) cut at 8: positions 0..7; row 1 starts inside doc0 (reset
    # to 0 at the row start), then doc1 starts at column 3.
    np.testing.assert_array_equal(seg.positions[0], np.arange(8))
    np.testing.assert_array_equal(seg.positions[1], [0, 1, 2, 0, 1, 2, 3, 4])
    b = seg.batch([1])
    np.testing.assert_array_equal(b.loss_mask[0], [1, 1, 0, 1, 1, 1, 1])  # EOS -> next doc
    np.testing.assert_array_equal(b.positions[0], [0, 1, 2, 0, 1, 2, 3])
    with pytest.raises(ValueError, match="EOS"):
        pack(DOCS, seq_len=7, packing="concat")
    with pytest.raises(ValueError, match="packing must be one of"):
        pack(DOCS, seq_len=7, packing="zip")


def test_tokenize_and_split():
    tok = byte_level_tokenizer()
    docs = [Document(f"d{i}", "ab" * (i + 1)) for i in range(5)]
    ids = tokenize_documents(docs, tok, batch_size=2)
    assert [len(x) for x in ids] == [2, 4, 6, 8, 10]
    np.testing.assert_array_equal(ids[0], [3 + ord("a"), 3 + ord("b")])  # 3 specials first
    train, held = split_documents(docs, 2, seed=1)
    assert len(train) == 3 and len(held) == 2
    assert split_documents(docs, 2, seed=1) == (train, held)  # deterministic
    assert {d.title for d in train} | {d.title for d in held} == {d.title for d in docs}
    with pytest.raises(ValueError, match="cannot hold out"):
        split_documents(docs, 5)


def test_shuffling_is_deterministic_per_epoch_and_resumable():
    data = pack([np.arange(i * 1000, i * 1000 + 50) for i in range(4)], seq_len=4)
    n = len(data)
    it = BatchIterator(data, 3, seed=7)
    batches = [next(it) for _ in range(2 * n // 3 + 2)]
    first_epoch = np.concatenate([b.inputs[:, 0] for b in batches])[:n]
    assert sorted(first_epoch.tolist()) == sorted(data.tokens[:, 0].tolist())  # a permutation
    # Resuming from the state after 5 batches continues the same stream.
    it2 = BatchIterator(data, 3, seed=7)
    for _ in range(5):
        next(it2)
    state = it2.state()
    it3 = BatchIterator(data, 3, seed=7)
    it3.restore(json.loads(json.dumps(state)))
    for b in batches[5:]:
        np.testing.assert_array_equal(next(it3).inputs, b.inputs)
    # Another seed is another order; changed data refuse to resume.
    assert not np.array_equal(next(BatchIterator(data, 3, seed=8)).inputs, batches[0].inputs)
    other = pack([np.arange(i * 1000 + 1, i * 1000 + 51) for i in range(4)], seq_len=4)
    with pytest.raises(ValueError, match="differ from the checkpoint"):
        BatchIterator(other, 3, seed=7).restore(state)
    with pytest.raises(ValueError, match="no training rows"):
        BatchIterator(pack([np.arange(3)], seq_len=4), 2)


def test_eval_rows_spread_over_the_data():
    data = pack([np.arange(100)] * 5, seq_len=9)
    rows = eval_rows(data, 5)
    assert rows.tolist() == [0, 12, 24, 37, 49]
    assert eval_rows(data, 500).tolist() == list(range(50))


def test_local_files_and_missing_path(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(
        "\n".join(json.dumps({"title": f"t{i}", "body": "x" * (i + 5)}) for i in range(3)) + "\n"
    )
    docs = load_documents(str(path), text_field="body", max_documents=2)
    assert [d.title for d in docs] == ["t0", "t1"] and docs[1].text == "x" * 6
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "a.txt").write_text("hello")
    assert load_documents(str(tmp_path / "txt"))[0].text == "hello"
    with pytest.raises(ValueError, match="no such file or directory"):
        load_documents(str(tmp_path / "missing.jsonl"))
