"""Training data: documents -> tokens -> fixed-length rows -> deterministic, resumable batches.

Documents come from `moa_jax.corpora.load_corpus` (the bundled public-domain corpora, or local
json / jsonl / parquet through `datasets`, or .txt files). Each row holds `seq_len + 1` tokens
(inputs are the first `seq_len`, targets the last `seq_len`). Packings:

- `chunk`: each row is a contiguous window of one document (non-overlapping windows; documents
  shorter than a row are dropped and counted). Positions 0..seq_len-1. The long-context form that
  Recycled Attention training needs (its prefix and tail come from one document).
- `concat`: the documents joined with EOS between them, cut into rows; attention and positions
  run across document boundaries (the classic GPT packing).
- `segments`: the same stream, but positions restart at 0 at every document start (and at every
  row start), so the training attention (`TrainDenseAttention(segments=True)`) masks attention
  across documents from the position resets; the loss skips the targets that cross a boundary.

Batches are drawn from an endless stream of rows: epoch e visits the rows in the order of
`permutation(seed, e)`; the iterator's whole state is one integer, the number of rows consumed,
so resuming from a checkpoint continues the stream exactly.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from moa_jax.corpora import Document, load_corpus

PACKINGS = ("chunk", "concat", "segments")


@dataclasses.dataclass
class Batch:
    """One batch (numpy): inputs / targets / positions int32 [B, T], loss_mask float32 [B, T]."""

    inputs: np.ndarray
    targets: np.ndarray
    positions: np.ndarray
    loss_mask: np.ndarray

    def as_dict(self) -> dict[str, np.ndarray]:
        return dataclasses.asdict(self)

    def reshape(self, *lead: int) -> Batch:
        """The batch with its leading axis split into `lead` (e.g. (grad_accum, micro_batch))."""
        return Batch(*(x.reshape(*lead, x.shape[-1]) for x in dataclasses.astuple(self)))


@dataclasses.dataclass
class PackedData:
    """Rows of `seq_len + 1` tokens.

    Attributes:
      tokens: int32 [N, seq_len + 1].
      positions: int32 [N, seq_len + 1] (None: 0..seq_len for every row).
      packing: how the rows were made.
      num_documents, dropped_documents, num_tokens: statistics of the source.
    """

    tokens: np.ndarray
    positions: np.ndarray | None
    packing: str
    num_documents: int = 0
    dropped_documents: int = 0
    num_tokens: int = 0
    _fingerprint: str | None = dataclasses.field(default=None, repr=False)

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1] - 1

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def fingerprint(self) -> str:
        """A short hash of the rows (a resumed run checks that its data did not change)."""
        if self._fingerprint is None:
            h = hashlib.sha256(np.ascontiguousarray(self.tokens).tobytes())
            if self.positions is not None:
                h.update(np.ascontiguousarray(self.positions).tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def batch(self, rows: Sequence[int] | np.ndarray) -> Batch:
        rows = np.asarray(rows, np.int64)
        tok = self.tokens[rows]
        if self.positions is None:
            pos = np.broadcast_to(np.arange(tok.shape[1], dtype=np.int32), tok.shape)
        else:
            pos = self.positions[rows]
        same_doc = pos[:, 1:] == pos[:, :-1] + 1
        return Batch(
            inputs=np.ascontiguousarray(tok[:, :-1], np.int32),
            targets=np.ascontiguousarray(tok[:, 1:], np.int32),
            positions=np.ascontiguousarray(pos[:, :-1], np.int32),
            loss_mask=same_doc.astype(np.float32),
        )


def tokenize_documents(
    docs: Sequence[Document], tokenizer: Any, batch_size: int = 16
) -> list[np.ndarray]:
    """Token ids (int32) of each document's text, without special tokens."""
    out: list[np.ndarray] = []
    for i in range(0, len(docs), batch_size):
        texts = [d.text for d in docs[i : i + batch_size]]
        ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        out.extend(np.asarray(x, np.int32) for x in ids)
    return out


def pack(
    token_docs: Sequence[np.ndarray],
    seq_len: int,
    packing: str = "chunk",
    eos_id: int | None = None,
) -> PackedData:
    """Cuts tokenised documents into rows of `seq_len + 1` tokens (see the module docstring)."""
    if packing not in PACKINGS:
        raise ValueError(f"packing must be one of {PACKINGS}, got {packing!r}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    row = seq_len + 1
    total = int(sum(len(d) for d in token_docs))
    if packing == "chunk":
        rows, dropped = [], 0
        for d in token_docs:
            n = len(d) // row
            if n == 0:
                dropped += 1
                continue
            rows.append(np.asarray(d[: n * row], np.int32).reshape(n, row))
        tokens = np.concatenate(rows) if rows else np.zeros((0, row), np.int32)
        return PackedData(tokens, None, packing, len(token_docs), dropped, total)
    if eos_id is None:
        raise ValueError(f"packing {packing!r} needs an EOS token id to separate documents")
    pieces = [np.append(np.asarray(d, np.int32), np.int32(eos_id)) for d in token_docs]
    stream = np.concatenate(pieces) if pieces else np.zeros((0,), np.int32)
    n = len(stream) // row
    tokens = stream[: n * row].reshape(n, row)
    positions = None
    if packing == "segments":
        doc_pos = np.concatenate([np.arange(len(p), dtype=np.int64) for p in pieces])[: n * row]
        doc_pos = doc_pos.reshape(n, row)
        col = np.broadcast_to(np.arange(row), (n, row))
        start = (doc_pos == 0) | (col == 0)
        start_col = np.maximum.accumulate(np.where(start, col, 0), axis=1)
        positions = (col - start_col).astype(np.int32)
    return PackedData(tokens, positions, packing, len(token_docs), 0, total)


def split_documents(
    docs: Sequence[Document], heldout: int, seed: int = 0
) -> tuple[list[Document], list[Document]]:
    """(train, held-out): `heldout` documents picked by a seeded permutation (order kept)."""
    if heldout < 0:
        raise ValueError(f"heldout_docs must be >= 0, got {heldout}")
    if heldout == 0:
        return list(docs), []
    if heldout >= len(docs):
        raise ValueError(f"cannot hold out {heldout} of {len(docs)} documents and still train")
    pick = set(np.random.default_rng(seed).permutation(len(docs))[:heldout].tolist())
    return (
        [d for i, d in enumerate(docs) if i not in pick],
        [d for i, d in enumerate(docs) if i in pick],
    )


def load_documents(
    corpus: str, *, text_field: str = "text", max_documents: int = 0
) -> list[Document]:
    """`load_corpus` with a clear error for a missing path; the first `max_documents` (0: all)."""
    try:
        docs = load_corpus(corpus, text_field=text_field)
    except FileNotFoundError as e:
        raise ValueError(f"dataset {corpus!r} not found: {e}") from None
    if not docs:
        raise ValueError(f"dataset {corpus!r} holds no documents")
    return docs[:max_documents] if max_documents else docs


def eval_rows(data: PackedData, n: int) -> np.ndarray:
    """Up to `n` row indices for evaluation, evenly spaced over the rows (which are in document
    order, so they spread over the documents)."""
    total = len(data)
    if n <= 0 or total == 0:
        return np.zeros((0,), np.int64)
    return np.linspace(0, total - 1, min(n, total)).round().astype(np.int64)


class BatchIterator:
    """Endless, deterministic batches of rows; the state is `position` (rows consumed).

    Epoch e visits all rows in the order `np.random.default_rng([seed, e]).permutation(N)`.
    """

    def __init__(
        self,
        data: PackedData,
        batch_size: int,
        *,
        seed: int = 0,
        position: int = 0,
        shuffle: bool = True,
    ):
        if len(data) == 0:
            raise ValueError(
                "no training rows: every document is shorter than seq_len + 1 "
                "tokens (use a shorter seq_len, packing 'concat', or more text)"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.data, self.batch_size, self.seed, self.shuffle = data, batch_size, seed, shuffle
        self.position = int(position)
        self._perm_epoch, self._perm = -1, None

    def _order(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            n = len(self.data)
            self._perm = (
                np.random.default_rng([self.seed, epoch]).permutation(n)
                if self.shuffle
                else np.arange(n)
            )
            self._perm_epoch = epoch
        return self._perm

    def row_indices(self, position: int, count: int) -> np.ndarray:
        n = len(self.data)
        out = np.empty(count, np.int64)
        for i in range(count):
            epoch, j = divmod(position + i, n)
            out[i] = self._order(epoch)[j]
        return out

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        rows = self.row_indices(self.position, self.batch_size)
        self.position += self.batch_size
        return self.data.batch(rows)

    @property
    def epoch(self) -> float:
        return self.position / len(self.data)

    def state(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "seed": self.seed,
            "num_rows": len(self.data),
            "fingerprint": self.data.fingerprint(),
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Continues from a saved `state()`; the data must be the same rows."""
        if (
            int(state["num_rows"]) != len(self.data)
            or state.get("fingerprint", self.data.fingerprint()) != self.data.fingerprint()
        ):
            raise ValueError(
                f"the training data differ from the checkpoint's ({state['num_rows']} rows, "
                f"fingerprint {state.get('fingerprint')}; now {len(self.data)} rows, "
                f"{self.data.fingerprint()}): resuming would not continue the same stream"
            )
        if int(state["seed"]) != self.seed:
            raise ValueError(f"data_seed {self.seed} differs from the checkpoint's {state['seed']}")
        self.position = int(state["position"])
