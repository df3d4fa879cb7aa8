"""Local corpora (`moa_jax.corpora.load_corpus`): the forms read, and every unreadable one refused
in one line naming the file (and the line of a JSON-lines file)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moa_jax.corpora import CorpusError, Document, load_corpus
from moa_jax.errors import UserError


def _write(path: Path, data: str | bytes) -> Path:
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data, encoding="utf-8")
    return path


def test_json_forms_parquet_and_text_are_read(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    lines = _write(
        tmp_path / "a.jsonl",
        '{"text": "one", "title": "T"}\n\n{"text": "two"}\n{"text": null}\n{"text": " "}\n',
    )
    assert load_corpus(str(lines)) == [Document("T", "one"), Document("doc1", "two")]
    array = _write(tmp_path / "b.json", json.dumps([{"body": "x"}, {"body": "y"}]))
    assert [d.text for d in load_corpus(str(array), text_field="body")] == ["x", "y"]
    one = _write(tmp_path / "c.json", '{\n  "text": "only"\n}\n')
    assert load_corpus(str(one)) == [Document("doc0", "only")]
    as_lines = _write(tmp_path / "d.json", '{"text": "p"}\n{"text": "q"}\n')  # JSON lines
    assert [d.text for d in load_corpus(str(as_lines))] == ["p", "q"]
    table = pa.table({"text": ["u", None, "v"], "title": ["U", "W", None]})
    pq.write_table(table, tmp_path / "e.parquet")
    assert load_corpus(str(tmp_path / "e.parquet")) == [Document("U", "u"), Document("doc2", "v")]
    books = tmp_path / "books"
    books.mkdir()
    _write(books / "b.txt", "\ufeffsecond")  # a byte-order mark is not text
    _write(books / "a.txt", "first")
    _write(books / "skipped.jsonl", "not read: the directory has .txt files")
    assert load_corpus(str(books)) == [Document("a", "first"), Document("b", "second")]


@pytest.mark.parametrize(
    "name,data,words",
    [
        ("empty.jsonl", "", ["empty.jsonl is empty"]),
        ("blank.json", "  \n", ["blank.json is empty"]),
        ("binary.jsonl", b'{"text": "a"}\n\xff\xfe\x00', ["binary.jsonl", "not UTF-8", "0xff"]),
        ("binary.txt", b"caf\xe9", ["binary.txt", "not UTF-8"]),
        ("broken.jsonl", '{"text": "a"}\n{"text": \n', ["broken.jsonl: line 2 is not JSON"]),
        ("array.jsonl", '{"text": "a"}\n[1, 2]\n', ["array.jsonl: line 2 is an array, not"]),
        ("string.jsonl", '"text"\n', ["string.jsonl: line 1 is a string, not a JSON object"]),
        ("field.jsonl", '{"body": "a"}\n', ["field.jsonl: line 1 has no 'text' field", "body"]),
        ("number.jsonl", '{"text": 5}\n', ["number.jsonl: line 1: 'text' is a number"]),
        ("broken.json", '[{"text": "a"},', ["broken.json is not valid JSON", "line 1"]),
        ("items.json", '[{"text": "a"}, 3]', ["items.json: item 1 of the array is a number"]),
        ("bad.parquet", "not parquet", ["bad.parquet: not a readable parquet file"]),
        ("none.jsonl", '{"text": ""}\n{"text": null}\n', ["none.jsonl holds no non-empty"]),
        ("table.csv", "text\na\n", ["unsupported corpus file type '.csv'", "table.csv"]),
    ],
)
def test_unreadable_corpora_are_one_line_errors(tmp_path, name, data, words):
    path = _write(tmp_path / name, data)
    with pytest.raises(CorpusError) as e:
        load_corpus(str(path))
    message = str(e.value)
    assert "\n" not in message and isinstance(e.value, UserError)
    for w in words:
        assert w in message, message


def test_parquet_without_the_text_column_or_with_numbers(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["a"]}), tmp_path / "a.parquet")
    with pytest.raises(CorpusError, match=r"a\.parquet has no 'text' column .*columns: body"):
        load_corpus(str(tmp_path / "a.parquet"))
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "b.parquet")
    with pytest.raises(CorpusError, match=r"b\.parquet: column 'text' holds int64, not text"):
        load_corpus(str(tmp_path / "b.parquet"))


def test_missing_and_empty_corpus_directories(tmp_path):
    with pytest.raises(CorpusError, match="no such file or directory"):
        load_corpus(str(tmp_path / "nope.jsonl"))
    (tmp_path / "d").mkdir()
    with pytest.raises(CorpusError, match="holds no .txt, .json, .jsonl or .parquet files"):
        load_corpus(str(tmp_path / "d"))
    _write(tmp_path / "d" / "a.txt", " \n")
    with pytest.raises(CorpusError, match="holds no non-empty documents"):
        load_corpus(str(tmp_path / "d"))


def test_a_saved_hf_dataset_is_a_corpus(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict(
        {"text": ["first doc", "", "second doc"], "title": ["a", "b", "c"]}
    )
    ds.save_to_disk(str(tmp_path / "ds"))
    docs = load_corpus(str(tmp_path / "ds"))
    assert [(d.title, d.text) for d in docs] == [("a", "first doc"), ("c", "second doc")]
    with pytest.raises(CorpusError, match="has no 'body' column"):
        load_corpus(str(tmp_path / "ds"), text_field="body")
    datasets.DatasetDict({"test": ds, "validation": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(CorpusError, match="no 'train' split"):
        load_corpus(str(tmp_path / "dd"))
