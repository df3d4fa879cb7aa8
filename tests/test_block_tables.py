"""Block schedules against a brute-force classification of the element mask."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moa_jax.pallas_kernels.prefill.block_tables import MaskSpec, block_tables, head_groups


def _brute_blocks(spec: MaskSpec) -> np.ndarray:
    """int8 [H, nq, nk]: 0 none visible, 1 some, 2 all (real columns, padded columns invisible)."""
    mask = spec.dense_mask()  # [H, T, S]
    H, nq, nk = spec.num_heads, spec.num_q_blocks, spec.num_k_blocks
    bq, bk = spec.block_q, spec.block_k
    out = np.zeros((H, nq, nk), np.int8)
    for m in range(nq):
        for n in range(nk):
            blk = mask[:, m * bq : (m + 1) * bq, n * bk : (n + 1) * bk]
            padded = (n + 1) * bk > spec.kv_len
            anyv = blk.any(axis=(1, 2))
            allv = blk.all(axis=(1, 2)) & (not padded)
            out[:, m, n] = np.where(allv, 2, np.where(anyv, 1, 0))
    return out


def _check(spec: MaskSpec):
    sch = block_tables(spec)
    expect = _brute_blocks(spec)
    np.testing.assert_array_equal(sch.block_mask(), expect)
    # Partial blocks come first, lists hold no duplicates, padding repeats a valid index.
    for h in range(spec.num_heads):
        for m in range(spec.num_q_blocks):
            n, npart = sch.kv_num[h, m], sch.kv_num_partial[h, m]
            lst = sch.kv_blocks[h, m, :n]
            assert len(set(lst.tolist())) == n
            assert (expect[h, m, lst[:npart]] == 1).all() and (expect[h, m, lst[npart:]] == 2).all()
            if n:
                assert (sch.kv_blocks[h, m, n:] == lst[-1]).all()
    # Transposed schedule: the same (m, n) pairs with the same classification.
    t = np.zeros_like(expect)
    for h in range(spec.num_heads):
        for n in range(spec.num_k_blocks):
            cnt, npart = sch.q_num[h, n], sch.q_num_partial[h, n]
            lst = sch.q_blocks[h, n, :cnt]
            assert len(set(lst.tolist())) == cnt
            t[h, lst[:npart], n] = 1
            t[h, lst[npart:], n] = 2
    np.testing.assert_array_equal(t, expect)
    assert sch.max_kv_blocks == max(1, int(sch.kv_num.max()))
    assert sch.max_q_blocks == max(1, int(sch.q_num.max()))
    return sch


@pytest.mark.parametrize(
    "windows,sinks,t,s,off,bq,bk",
    [
        ((1, 5, 16, 1000), (0, 0, 3, 64), 100, 100, 0, 16, 16),
        ((1, 7, 33, 64), (64, 1, 0, 17), 37, 121, 84, 16, 32),
        ((200,), (0,), 200, 200, 0, 32, 16),
        ((3, 3), (5, 5), 1, 50, 49, 16, 16),  # single decode-like query
        ((8,), (2,), 64, 64, 0, 64, 16),
    ],
)
def test_schedule_cases(windows, sinks, t, s, off, bq, bk):
    _check(MaskSpec(windows, sinks, t, s, off, bq, bk))


@settings(max_examples=40, deadline=None)
@given(
    w=st.lists(st.integers(1, 150), min_size=1, max_size=3),
    sink=st.integers(0, 70),
    t=st.integers(1, 130),
    extra=st.integers(0, 60),
    bq=st.sampled_from([16, 32]),
    bk=st.sampled_from([16, 32, 64]),
)
def test_schedule_random(w, sink, t, extra, bq, bk):
    _check(MaskSpec(tuple(w), (sink,), t, t + extra, extra, bq, bk))


def test_work_proportional_to_kept():
    """A short window visits O(N * w / block^2) blocks, not O(N^2 / block^2)."""
    n, b = 16384, 128
    dense = block_tables(MaskSpec((n,), (0,), n, n, 0, b, b))
    local = block_tables(MaskSpec((1024,), (64,), n, n, 0, b, b))
    nb = n // b
    assert dense.visited_blocks == nb * (nb + 1) // 2
    assert local.visited_blocks <= nb * (1024 // b + 2)
    assert local.max_kv_blocks <= 1024 // b + 2
    assert dense.full_blocks == nb * (nb - 1) // 2


def test_spec_validation_and_groups():
    with pytest.raises(ValueError, match="windows must be >= 1"):
        MaskSpec((0,), (0,), 4, 4)
    with pytest.raises(ValueError, match="2 windows but 3 sinks"):
        MaskSpec((1, 2), (0, 0, 0), 4, 4)
    assert MaskSpec((1, 2), (3,), 4, 4).sinks == (3, 3)
    assert head_groups((5, 7, 5, 7), (0, 0, 0, 1)) == {(5, 0): (0, 2), (7, 0): (1,), (7, 1): (3,)}
    hash(MaskSpec((1, 2), (3,), 4, 4))
