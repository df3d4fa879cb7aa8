"""One layer's resolved MoA plan: the static schedule the span cache and the decode kernels share.

A `MoASchedule` is what a plan becomes at one length for one layer (`Plan.schedule`, or
`MoASchedule.build` from explicit windows): per query head its window and sinks, per KV head the
ring of its group's largest window, the packed cache layout (segments, offsets, slots) and the
decode kernels' tables (the split-K work list, the per-group window and sink tables). It is a
frozen dataclass of ints and tuples, hashable, so it rides in `SpanKVCache`'s static metadata
and reaches the kernels as part of the cache's tree structure (as splash attention's `MaskInfo`
reaches its kernel), built once instead of recomputed by each reader.

Cache layout: one flat buffer of `slots` slots per layer. KV head g owns the segment
[offsets[g], offsets[g] + segments[g]) of `sink_slots` sink slots followed by a ring of
`rings[g]` slots, padded to a multiple of `block`. With `shards` > 1 (heads split over
devices) the KV heads form `shards` contiguous groups, each packed into its own stretch of
slots / shards (padded to the largest group), so splitting the slot axis evenly gives every
device its own heads' segments (`shard`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import numpy as np

from moa_jax.pallas_kernels.heuristics import GPU_PROGRAMS, SPAN_MIN_BLOCKS


@dataclasses.dataclass(frozen=True)
class SegmentSplits:
    """A static split-K work list over segments of different lengths (numpy, made outside jit).

    Item i walks blocks [start[i], start[i] + count[i]) (absolute block indices) of segment
    segment[i]; items are ordered by segment. `table` [S, C] lists each segment's items,
    padded with the out-of-range id I (the merge gathers them with a fill value)."""

    segment: np.ndarray
    start: np.ndarray
    count: np.ndarray
    table: np.ndarray

    @property
    def num_items(self) -> int:
        return len(self.segment)


def split_segments(
    blocks: Sequence[int],
    batch: int,
    per_split: int | None = None,
    offsets: Sequence[int] | None = None,
    programs: int = GPU_PROGRAMS,
    min_blocks: int = SPAN_MIN_BLOCKS,
) -> SegmentSplits:
    """Cuts segments of `blocks[s]` blocks, segment s starting at block `offsets[s]` (default:
    laid out one after another), into work items of about `per_split` blocks, so every program
    of a launch does about the same work however uneven the segments are (a MoA span cache:
    dense heads' segments beside short windows).

    Default `per_split`: the work of a row batch spread over `programs` programs (a GPU's
    ~132 SMs twice), but no more than the shortest segment (so a long segment becomes several
    items of the short ones' length) and no less than `min_blocks`. A segment of n blocks
    becomes round(n / per_split) (at least 1) items of near-equal length.
    """
    blocks = [int(x) for x in blocks]
    if min(blocks) < 1:
        raise ValueError(f"every segment needs at least one block, got {blocks}")
    if per_split is None:
        per_split = -(-batch * sum(blocks) // programs)
        per_split = max(min_blocks, min(per_split, min(blocks)))
    per_split = max(1, int(per_split))
    if offsets is None:
        offsets = np.cumsum([0] + blocks[:-1])
    segment, start, count, rows = [], [], [], []
    for s, n in enumerate(blocks):
        k = min(n, max(1, int(n / per_split + 0.5)))
        base, extra = divmod(n, k)
        rows.append(list(range(len(segment), len(segment) + k)))
        at = int(offsets[s])
        for j in range(k):
            c = base + (j < extra)
            segment.append(s)
            start.append(at)
            count.append(c)
            at += c
    width = max(len(r) for r in rows)
    table = np.full((len(blocks), width), len(segment), np.int32)
    for s, r in enumerate(rows):
        table[s, : len(r)] = r
    as32 = functools.partial(np.asarray, dtype=np.int32)
    return SegmentSplits(as32(segment), as32(start), as32(count), table)


def _ints(x: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(v) for v in x)


@dataclasses.dataclass(frozen=True)
class MoASchedule:
    """One layer's static MoA schedule (see the module docstring for the cache layout).

    Attributes:
      windows, sinks: per query head (H entries) window in tokens (sinks excluded, >= 1) and
        sink count; query i sees key j iff j <= i and (i - j < window or j < sink).
      num_kv_heads: Hkv, a divisor of H; KV head g serves query heads [g H/Hkv, (g+1) H/Hkv).
      sink_slots: sink slots of every KV head (the first `sink_slots` positions).
      rings: per KV head ring size in slots.
      block: cache block in slots (segments are padded to it; the kernels walk it).
      max_len: the longest sequence the cache serves (prompt + new tokens).
      shards: head groups the slots are packed in (the mesh's `tensor` size, or 1).
      slots: slots of the whole buffer, a multiple of `shards` (default: the largest group of
        segments times `shards`).
      segments, offsets: per KV head segment size and first slot (derived).
    """

    windows: tuple[int, ...]
    sinks: tuple[int, ...]
    num_kv_heads: int
    sink_slots: int
    rings: tuple[int, ...]
    block: int
    max_len: int
    shards: int = 1
    slots: int | None = None
    segments: tuple[int, ...] = dataclasses.field(init=False)
    offsets: tuple[int, ...] = dataclasses.field(init=False)

    @classmethod
    def build(
        cls,
        windows: Sequence[int],
        sinks: Sequence[int],
        num_kv_heads: int,
        max_len: int,
        *,
        block: int = 64,
        shards: int = 1,
    ) -> MoASchedule:
        """The schedule of per-query-head windows and sinks for sequences of up to max_len
        tokens: every KV head keeps the largest sink count of the layer and a ring of its
        query group's largest window, rounded up to `block` and capped at what max_len needs."""
        windows, sinks = _ints(windows), _ints(sinks)
        h = len(windows)
        if num_kv_heads < 1 or h % num_kv_heads:
            raise ValueError(f"{h} query-head windows do not divide into {num_kv_heads} KV heads")
        if min(windows) < 1:
            raise ValueError(f"windows must be >= 1 token, got min {min(windows)}")
        if num_kv_heads % shards:
            raise ValueError(f"{num_kv_heads} KV heads do not split into {shards} shards")
        sink = min(max(sinks, default=0), int(max_len))
        rings = tuple(
            max(1, min(-(-w // block) * block, max_len - sink))
            for w in _group_max(windows, num_kv_heads)
        )
        return cls(windows, sinks, num_kv_heads, sink, rings, block, max_len, shards)

    def __post_init__(self):
        for name in ("num_kv_heads", "sink_slots", "block", "max_len", "shards"):
            object.__setattr__(self, name, int(getattr(self, name)))
        for name in ("windows", "sinks", "rings"):
            object.__setattr__(self, name, _ints(getattr(self, name)))
        h, hkv = len(self.windows), self.num_kv_heads
        if len(self.sinks) != h:
            raise ValueError(f"{h} windows but {len(self.sinks)} sinks")
        if len(self.rings) != hkv or h % hkv or hkv % self.shards:
            raise ValueError(
                f"{h} query heads, {len(self.rings)} rings, {hkv} KV heads and {self.shards} "
                "shards do not fit together"
            )
        sizes = tuple(-(-(self.sink_slots + r) // self.block) * self.block for r in self.rings)
        per = hkv // self.shards
        groups = [sizes[i * per : (i + 1) * per] for i in range(self.shards)]
        if self.slots is None:
            object.__setattr__(self, "slots", self.shards * max(sum(g) for g in groups))
        object.__setattr__(self, "slots", int(self.slots))
        stretch = self.slots // self.shards
        if self.slots % self.shards or max(sum(g) for g in groups) > stretch:
            raise ValueError(f"{self.slots} slots in {self.shards} shards do not hold {sizes}")
        offsets = [
            i * stretch + int(x) for i, g in enumerate(groups) for x in np.cumsum((0,) + g[:-1])
        ]
        object.__setattr__(self, "segments", sizes)
        object.__setattr__(self, "offsets", tuple(offsets))
        needs = zip(self.rings, _group_max(self.windows, hkv), _group_max(self.sinks, hkv))
        for g, (ring, need, sink) in enumerate(needs):
            # a ring capped at max_len - sink holds everything
            if need > ring and ring < self.max_len - self.sink_slots:
                raise ValueError(f"KV head {g}: window {need} exceeds its ring of {ring} slots")
            if sink > self.sink_slots and self.sink_slots < self.max_len:
                raise ValueError(
                    f"KV head {g}: sink {sink} exceeds the cache's {self.sink_slots} sink slots"
                )

    @property
    def num_heads(self) -> int:
        return len(self.windows)

    @property
    def group(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    def shard(self, i: int) -> MoASchedule:
        """Shard i's own schedule: its query and KV heads over its stretch of slots."""
        per, heads = self.num_kv_heads // self.shards, self.num_heads // self.shards
        return MoASchedule(
            self.windows[i * heads : (i + 1) * heads],
            self.sinks[i * heads : (i + 1) * heads],
            per,
            self.sink_slots,
            self.rings[i * per : (i + 1) * per],
            self.block,
            self.max_len,
            1,
            self.slots // self.shards,
        )

    # ---------------------------------------------------------------- kernel tables
    @property
    def segment_blocks(self) -> np.ndarray:
        """int [Hkv]: blocks of each KV head's segment."""
        return np.asarray(self.segments) // self.block

    @property
    def block_offsets(self) -> np.ndarray:
        """int [Hkv]: first block of each KV head's segment."""
        return np.asarray(self.offsets) // self.block

    def work_list(self, batch: int, per_split: int | None = None) -> SegmentSplits:
        """The split-K work list over the segments for a launch of `batch` rows (padding
        between head-shard stretches is visited by no item)."""
        return split_segments(self.segment_blocks, batch, per_split, offsets=self.block_offsets)

    def group_tables(self, rows: int) -> tuple[np.ndarray, np.ndarray]:
        """int32 [Hkv, rows] windows and sinks of each KV head's query heads, zero-padded to
        `rows` (the padded query tile of a decode kernel)."""
        out = []
        for x in (self.windows, self.sinks):
            t = np.zeros((self.num_kv_heads, rows), np.int32)
            t[:, : self.group] = np.asarray(x, np.int32).reshape(self.num_kv_heads, self.group)
            out.append(t)
        return out[0], out[1]

    def slot_layout(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per slot (int32 [slots]): owning KV head (padding: its group's last head), kind
        (0 sink, 1 ring, 2 padding) and index within its kind."""
        heads, kinds, index = [], [], []
        per, stretch = self.num_kv_heads // self.shards, self.slots // self.shards
        for g, (r, size) in enumerate(zip(self.rings, self.segments)):
            s = self.sink_slots
            heads += [g] * size
            kinds += [0] * s + [1] * r + [2] * (size - s - r)
            index += list(range(s)) + list(range(r)) + [0] * (size - s - r)
            if (g + 1) % per == 0:  # the group's stretch ends: pad it
                pad = (g + 1) // per * stretch - len(heads)
                heads += [g] * pad
                kinds += [2] * pad
                index += [0] * pad
        return (
            np.asarray(heads, np.int32),
            np.asarray(kinds, np.int32),
            np.asarray(index, np.int32),
        )


def _group_max(x: Sequence[int], num_kv_heads: int) -> tuple[int, ...]:
    """The largest of a per-query-head value among each KV head's query heads."""
    group = len(x) // num_kv_heads
    return tuple(max(x[g * group : (g + 1) * group]) for g in range(num_kv_heads))
