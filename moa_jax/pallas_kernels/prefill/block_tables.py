"""Block tables for per-head sliding windows plus sinks, computed in numpy.

The mask (see `reference.window_sink_mask`): query head h at position i sees key j iff
`j <= i and (i - j < w[h] or j < sink[h])`. Queries sit at positions [q_offset, q_offset + T),
keys at [0, S).

A `MaskSpec` (small, hashable: windows, sinks, lengths, offset, block sizes) describes one call;
`block_tables(spec)` turns it into `BlockTables` of static-shaped int32 tables, cached per spec:

forward / dq (for every head h and query block m):
  `kv_blocks[h, m, :]` the key blocks to visit, **partial blocks first, then full ones**, padded to
  the static maximum count with a repeat of a valid index; `kv_num_partial[h, m]` how many of them
  need element masking; `kv_num[h, m]` how many to visit.
dk/dv (the transpose, for every head h and key block n):
  `q_blocks[h, n, :]`, `q_num_partial[h, n]`, `q_num[h, n]`: the query blocks that see key block n.

A block (m, n) is *visited* iff some entry in it is visible, and *full* iff every entry (of real
rows and of real key columns, `j < S`) is visible; only full blocks skip the element mask. Padded
key columns (`j >= S`) are never visible, so a block that runs past S is partial. Query rows past
T are padding: the kernels compute them and the wrapper drops them.

Work: the tables are built from per-(head, query block) key-block intervals, so their size is the
number of visited blocks (plus the padding to the static maximum), never N^2 / block^2 booleans.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from moa_jax.pallas_kernels.reference import visible


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """Static description of one sparse attention call (hashable: a jit static argument)."""

    windows: tuple[int, ...]
    sinks: tuple[int, ...]
    q_len: int
    kv_len: int
    q_offset: int = 0
    block_q: int = 128
    block_k: int = 128

    def __post_init__(self):
        w = tuple(int(x) for x in self.windows)
        s = tuple(int(x) for x in self.sinks)
        if len(s) == 1 and len(w) > 1:
            s = s * len(w)
        if len(s) != len(w):
            raise ValueError(f"{len(w)} windows but {len(s)} sinks")
        if any(x < 1 for x in w):
            raise ValueError(f"windows must be >= 1, got {w}")
        if any(x < 0 for x in s):
            raise ValueError(f"sinks must be >= 0, got {s}")
        for name in ("q_len", "kv_len", "block_q", "block_k"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if int(self.q_offset) < 0:
            raise ValueError(f"q_offset must be >= 0, got {self.q_offset}")
        object.__setattr__(self, "windows", w)
        object.__setattr__(self, "sinks", s)
        for name in ("q_len", "kv_len", "q_offset", "block_q", "block_k"):
            object.__setattr__(self, name, int(getattr(self, name)))

    @property
    def num_heads(self) -> int:
        return len(self.windows)

    @property
    def num_q_blocks(self) -> int:
        return cdiv(self.q_len, self.block_q)

    @property
    def num_k_blocks(self) -> int:
        return cdiv(self.kv_len, self.block_k)

    def dense_mask(self) -> np.ndarray:
        """bool [H, T, S] element mask (tests and small inputs only)."""
        i = self.q_offset + np.arange(self.q_len)[:, None]
        j = np.arange(self.kv_len)[None, :]
        w = np.asarray(self.windows)[:, None, None]
        s = np.asarray(self.sinks)[:, None, None]
        return visible(i, j, w, s)

    def kept_entries(self) -> int:
        """Number of visible (head, query, key) entries (exact, no N^2 materialisation)."""
        i = self.q_offset + np.arange(self.q_len, dtype=np.int64)
        total = 0
        for w, s in zip(self.windows, self.sinks):
            hi = np.minimum(i, self.kv_len - 1)  # last visible key
            lo = np.maximum(i - w + 1, 0)
            win = np.maximum(hi - lo + 1, 0)
            sink = np.maximum(np.minimum(np.minimum(s, lo), hi + 1), 0)
            total += int((win + sink).sum())
        return total


@dataclasses.dataclass(frozen=True, eq=False)
class BlockTables:
    """The int32 tables of a `MaskSpec` (see module docstring)."""

    spec: MaskSpec
    kv_blocks: np.ndarray  # [H, nq, Kmax]
    kv_num_partial: np.ndarray  # [H, nq]
    kv_num: np.ndarray  # [H, nq]
    q_blocks: np.ndarray  # [H, nk, Qmax]
    q_num_partial: np.ndarray  # [H, nk]
    q_num: np.ndarray  # [H, nk]

    @property
    def max_kv_blocks(self) -> int:
        return self.kv_blocks.shape[-1]

    @property
    def max_q_blocks(self) -> int:
        return self.q_blocks.shape[-1]

    @property
    def visited_blocks(self) -> int:
        return int(self.kv_num.sum())

    @property
    def full_blocks(self) -> int:
        return int((self.kv_num - self.kv_num_partial).sum())

    def block_mask(self) -> np.ndarray:
        """int8 [H, nq, nk]: 0 skipped, 1 partial, 2 full (tests / debugging)."""
        h, nq = self.kv_num.shape
        out = np.zeros((h, nq, self.spec.num_k_blocks), np.int8)
        for hh in range(h):
            for m in range(nq):
                blocks = self.kv_blocks[hh, m]
                npart, n = self.kv_num_partial[hh, m], self.kv_num[hh, m]
                out[hh, m, blocks[:npart]] = 1
                out[hh, m, blocks[npart:n]] = 2
        return out


def _classify(spec: MaskSpec, h: int, m: np.ndarray, n: np.ndarray):
    """(visible, full) for blocks (m, n) of head h (arrays broadcast together)."""
    w, s = spec.windows[h], spec.sinks[h]
    a = spec.q_offset + m * spec.block_q  # first query position
    b = spec.q_offset + np.minimum((m + 1) * spec.block_q, spec.q_len) - 1  # last real query
    c = n * spec.block_k  # first key
    d = np.minimum((n + 1) * spec.block_k, spec.kv_len) - 1  # last real key
    window_hit = (c <= b) & (d >= a - w + 1)
    sink_hit = (c < s) & (c <= b)
    visible = (c <= d) & (window_hit | sink_hit)
    no_pad = (n + 1) * spec.block_k <= spec.kv_len
    full = visible & no_pad & (d <= a) & ((d < s) | (b - np.maximum(c, s) < w))
    return visible, full


@functools.lru_cache(maxsize=256)
def block_tables(spec: MaskSpec) -> BlockTables:
    """Builds (and caches) the forward and transposed block tables of `spec`."""
    H, nq, nk = spec.num_heads, spec.num_q_blocks, spec.num_k_blocks
    bq, bk = spec.block_q, spec.block_k
    m = np.arange(nq)
    a = spec.q_offset + m * bq
    b = spec.q_offset + np.minimum((m + 1) * bq, spec.q_len) - 1
    fwd_lists = []  # per head: list over m of (partial blocks, full blocks)
    for h in range(H):
        w, s = spec.windows[h], spec.sinks[h]
        last = np.minimum(b, spec.kv_len - 1) // bk  # causal diagonal block
        first = np.maximum(a - w + 1, 0) // bk  # window's first block
        first = np.minimum(first, nk)
        sink_end = np.minimum(np.minimum(s, b + 1), spec.kv_len)  # sink keys [0, sink_end)
        nsink = cdiv_arr(sink_end, bk)
        rows = []
        for mi in range(nq):
            lo, hi = int(first[mi]), int(last[mi])
            ns = int(nsink[mi])
            if lo <= ns:
                cand = np.arange(0, hi + 1)
            else:
                cand = np.concatenate([np.arange(0, min(ns, hi + 1)), np.arange(lo, hi + 1)])
            if cand.size:
                vis, full = _classify(spec, h, np.full_like(cand, mi), cand)
                cand, full = cand[vis], full[vis]
            else:
                full = np.zeros(0, bool)
            rows.append((cand[~full], cand[full]))
        fwd_lists.append(rows)

    kmax = max(1, max(len(p) + len(f) for rows in fwd_lists for p, f in rows))
    kv_blocks = np.zeros((H, nq, kmax), np.int32)
    kv_np = np.zeros((H, nq), np.int32)
    kv_n = np.zeros((H, nq), np.int32)
    hs, ms, ns, fs = [], [], [], []
    for h, rows in enumerate(fwd_lists):
        for mi, (part, full) in enumerate(rows):
            seq = np.concatenate([part, full]).astype(np.int32)
            kv_np[h, mi] = len(part)
            kv_n[h, mi] = len(seq)
            if len(seq):
                kv_blocks[h, mi, : len(seq)] = seq
                kv_blocks[h, mi, len(seq) :] = seq[-1]
                hs.append(np.full(len(seq), h))
                ms.append(np.full(len(seq), mi))
                ns.append(seq)
                fs.append(np.arange(len(seq)) >= len(part))
    q_blocks, q_np, q_n = _transpose(H, nk, hs, ms, ns, fs)
    for arr in (kv_blocks, kv_np, kv_n, q_blocks, q_np, q_n):
        arr.setflags(write=False)
    return BlockTables(spec, kv_blocks, kv_np, kv_n, q_blocks, q_np, q_n)


def _transpose(H, nk, hs, ms, ns, fs):
    """Per (head, key block): the query blocks visiting it, partial ones first (vectorised)."""
    if not hs:
        return (
            np.zeros((H, nk, 1), np.int32),
            np.zeros((H, nk), np.int32),
            np.zeros((H, nk), np.int32),
        )
    h = np.concatenate(hs).astype(np.int64)
    m = np.concatenate(ms).astype(np.int64)
    n = np.concatenate(ns).astype(np.int64)
    f = np.concatenate(fs)
    order = np.lexsort((m, f, n, h))  # by head, key block, partial-first, query block
    h, m, n, f = h[order], m[order], n[order], f[order]
    key = h * nk + n
    q_n = np.bincount(key, minlength=H * nk)
    q_np = np.bincount(key, weights=~f, minlength=H * nk).astype(np.int64)
    start = np.concatenate([[0], np.cumsum(q_n)[:-1]])
    slot = np.arange(len(key)) - start[key]
    qmax = max(1, int(q_n.max()))
    q_blocks = np.zeros((H * nk, qmax), np.int32)
    q_blocks[key, slot] = m
    last = np.where(q_n > 0, q_blocks[np.arange(H * nk), np.maximum(q_n - 1, 0)], 0)
    pad = np.arange(qmax)[None, :] >= q_n[:, None]
    q_blocks = np.where(pad, last[:, None], q_blocks).astype(np.int32)
    return (
        q_blocks.reshape(H, nk, qmax),
        q_np.reshape(H, nk).astype(np.int32),
        q_n.reshape(H, nk).astype(np.int32),
    )


def cdiv_arr(x: np.ndarray, d: int) -> np.ndarray:
    return -(-np.asarray(x) // d)


def head_groups(windows, sinks) -> dict[tuple[int, int], tuple[int, ...]]:
    """Query heads grouped by equal (window, sink), in order of first appearance."""
    groups: dict[tuple[int, int], list[int]] = {}
    for h, (w, s) in enumerate(zip(windows, sinks)):
        groups.setdefault((int(w), int(s)), []).append(h)
    return {k: tuple(v) for k, v in groups.items()}


def work_order(num: np.ndarray) -> np.ndarray:
    """Flat work items sorted by decreasing block count (stable): with a static grid, the
    heaviest programs launch first (longest-processing-time order)."""
    return np.argsort(-np.asarray(num).reshape(-1), kind="stable").astype(np.int32)


def kernel_tables(
    spec: MaskSpec,
    blocks: np.ndarray,
    num_partial: np.ndarray,
    num: np.ndarray,
    work: np.ndarray | None = None,
) -> list[np.ndarray]:
    """The int32 scalar tables a block-sparse kernel reads, flattened per work item:
    [work order (heaviest first by `work`, default `num`), windows [H], sinks [H],
    blocks [items * max], num_partial [items], num [items]]."""
    return [
        work_order(num if work is None else work),
        np.asarray(spec.windows, np.int32),
        np.asarray(spec.sinks, np.int32),
        np.asarray(blocks, np.int32).reshape(-1),
        np.asarray(num_partial, np.int32).reshape(-1),
        np.asarray(num, np.int32).reshape(-1),
    ]
