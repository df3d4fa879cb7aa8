"""Block-sparse flash attention with per-head windows and sinks: Pallas, Triton backend.

Forward: one program per (work item, batch row), a work item being one (query head, query block);
work items run heaviest first (longest key-block lists), a static longest-processing-time order
that keeps the GPU busy when dense and short-window heads are mixed. A program walks only its
tabled key blocks (`block_tables`): first the partial blocks with the element mask, then the
full blocks without it, with an online softmax in base 2. K/V are read at their KV head
(`h // group`), never repeated.

Backward (`jax.custom_vjp`, FlashAttention-2 style, recomputing the probabilities from the saved
log-sum-exp): a dq kernel over the forward block tables and a dk/dv kernel over the transposed ones,
one program per (KV head, key block) looping over the query heads of its group (each with its own
window) so dk/dv accumulate in registers and are written once.

All block tables are int32 arrays read by the kernels as scalars (Triton has no scalar
prefetch); the grid is static. Padding of T/S to the block sizes and of D to a power of two
happens in the wrapper.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from moa_jax.pallas_kernels.heuristics import (
    TRITON_DKV_BLOCK_Q,
    TRITON_PREFILL_STAGES,
    triton_head_dim,
    triton_prefill_warps,
)
from moa_jax.pallas_kernels.prefill import flash_vjp
from moa_jax.pallas_kernels.prefill.block_tables import MaskSpec, block_tables, cdiv, kernel_tables
from moa_jax.pallas_kernels.prefill.flash_vjp import BackwardRefs
from moa_jax.pallas_kernels.reference import visible

try:  # jax >= 0.4.3x: pallas.triton; name changed over versions.
    from jax.experimental.pallas import triton as _pltriton

    _CompilerParams = getattr(_pltriton, "CompilerParams", None) or getattr(
        _pltriton, "TritonCompilerParams", None
    )
except ImportError:  # pragma: no cover
    _pltriton = None
    _CompilerParams = None

_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Static configuration of one sparse attention call (hashable)."""

    fwd: MaskSpec  # forward block tables (block_q, block_k)
    dq: MaskSpec  # dq block tables
    dkv: MaskSpec  # dk/dv (transposed) block tables
    num_kv_heads: int
    scale: float
    has_kv_lengths: bool
    interpret: bool
    num_warps: int | None = None
    num_stages: int = 2
    num_warps_bwd: int | None = None
    num_stages_bwd: int = 2


def compiler_params(num_warps, num_stages):
    """Triton compiler parameters (None where this jax has no Triton backend)."""
    if _CompilerParams is None:
        return None
    return _CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _dot(a, b, contract=((1,), (1,))):
    """a @ b^T by default (f32 accumulation; exact f32 for f32 inputs)."""
    prec = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(
        a, b, (contract, ((), ())), precision=prec, preferred_element_type=jnp.float32
    )


def _visible(rows, cols, w, s, kv_valid):
    """Element mask for query positions rows [bq, 1] and key positions cols [1, bk]."""
    return visible(rows, cols, w, s) & (cols < kv_valid)


class _Statics(NamedTuple):
    """The static arguments every kernel takes: block sizes, the query heads per KV head, the
    mask's query offset and key count, the softmax scale, whether kv lengths are given."""

    bq: int
    bk: int
    group: int
    q_offset: int
    kv_len: int
    scale: float
    has_kvlen: bool


def _query_block(order_ref, win_ref, sink_ref, kvlen_ref, nq: int, st: _Statics):
    """This program's work item of a query-block grid (item of order_ref, row): (item, row b,
    query head h, query block m, KV head, h's window and sinks, the row's valid key count)."""
    item = order_ref[pl.program_id(0)]
    b = pl.program_id(1)
    h = item // nq
    kv_valid = jnp.minimum(kvlen_ref[b], st.kv_len) if st.has_kvlen else st.kv_len
    return item, b, h, item % nq, h // st.group, win_ref[h], sink_ref[h], kv_valid


def _block_loop(body, npart: int, num: int, has_kvlen: bool, carry):
    """carry after body(i, carry, masked) for the blocks i in [0, num) of a block table whose
    first npart blocks are partial (masked); with kv lengths any block may be cut, so all are."""
    if has_kvlen:
        return lax.fori_loop(0, num, functools.partial(body, masked=True), carry)
    carry = lax.fori_loop(0, npart, functools.partial(body, masked=True), carry)
    return lax.fori_loop(npart, num, functools.partial(body, masked=False), carry)


# --------------------------------------------------------------------------- forward kernel
def _fwd_kernel(
    order_ref,
    win_ref,
    sink_ref,
    blocks_ref,
    npart_ref,
    num_ref,
    kvlen_ref,
    q_ref,
    k_ref,
    v_ref,
    *rest,
    nq,
    kmax,
    st: _Statics,
    poison,
):
    if poison:
        rest = rest[2:]
    o_ref, lse_ref = rest
    bq, bk, _, q_offset, _, scale, has_kvlen = st
    item, b, h, m, kvh, w, s_, kv_valid = _query_block(
        order_ref, win_ref, sink_ref, kvlen_ref, nq, st
    )
    q = q_ref[b, pl.ds(m * bq, bq), h, :]
    d = q.shape[-1]
    base = item * kmax
    npart = npart_ref[item]
    num = num_ref[item]
    c = scale * _LOG2E
    rows = q_offset + m * bq + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)

    def body(i, carry, masked):
        acc, m_prev, l_prev = carry
        n = blocks_ref[base + i]
        k = k_ref[b, pl.ds(n * bk, bk), kvh, :]
        v = v_ref[b, pl.ds(n * bk, bk), kvh, :]
        sc = _dot(q, k) * c
        if masked:
            cols = n * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
            sc = jnp.where(_visible(rows, cols, w, s_, kv_valid), sc, -jnp.inf)
        m_new = jnp.maximum(m_prev, jnp.max(sc, axis=1))
        if masked:
            m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        else:
            m_use = m_new
        alpha = jnp.exp2(m_prev - m_use)
        p = jnp.exp2(sc - m_use[:, None])
        l_new = alpha * l_prev + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v, ((1,), (0,)))
        return acc, m_new, l_new

    carry = (
        jnp.zeros((bq, d), jnp.float32),
        jnp.full((bq,), -jnp.inf, jnp.float32),
        jnp.zeros((bq,), jnp.float32),
    )
    acc, m_i, l_i = _block_loop(body, npart, num, has_kvlen, carry)
    ok = l_i > 0
    l_safe = jnp.where(ok, l_i, 1.0)
    out = acc / l_safe[:, None]
    o_ref[b, pl.ds(m * bq, bq), h, :] = out.astype(o_ref.dtype)
    lse = jnp.where(ok, (m_i + jnp.log2(l_safe)) * _LN2, -jnp.inf)
    lse_ref[b, h, pl.ds(m * bq, bq)] = lse


def _fwd_call(cfg: KernelConfig, q, k, v, kv_lengths, poison=False):
    spec = cfg.fwd
    sch = block_tables(spec)
    B, Tp, H, D = q.shape
    nq = spec.num_q_blocks
    kernel = functools.partial(
        _fwd_kernel,
        nq=nq,
        kmax=sch.max_kv_blocks,
        st=_pass_statics(cfg, spec, H // cfg.num_kv_heads),
        poison=poison,
    )
    tables = [
        jnp.asarray(t) for t in kernel_tables(spec, sch.kv_blocks, sch.kv_num_partial, sch.kv_num)
    ] + [kv_lengths.astype(jnp.int32)]
    out_shape = [
        jax.ShapeDtypeStruct((B, Tp, H, D), q.dtype),
        jax.ShapeDtypeStruct((B, H, Tp), jnp.float32),
    ]
    args = tables + [q, k, v]
    aliases = {}
    if poison:
        args += [
            jnp.full((B, Tp, H, D), jnp.nan, q.dtype),
            jnp.full((B, H, Tp), jnp.nan, jnp.float32),
        ]
        aliases = {len(args) - 2: 0, len(args) - 1: 1}
    nw = cfg.num_warps or triton_prefill_warps(D)
    return pl.pallas_call(
        kernel,
        grid=(H * nq, B),
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=None if cfg.interpret else compiler_params(nw, cfg.num_stages),
        interpret=cfg.interpret,
        name="moa_sparse_fwd",
    )(*args)


# ------------------------------------------------------------------------------ dq kernel
def _dq_kernel(*refs, nq, kmax, st: _Statics):
    r, (dq_ref,) = BackwardRefs.split(refs)
    bq, bk, _, q_offset, _, scale, has_kvlen = st
    item, b, h, m, kvh, w, s_, kv_valid = _query_block(r.order, r.win, r.sink, r.kvlen, nq, st)
    q = r.q[b, pl.ds(m * bq, bq), h, :]
    do = r.do[b, pl.ds(m * bq, bq), h, :]
    lse = r.lse[b, h, pl.ds(m * bq, bq)]
    lse2 = jnp.where(lse == -jnp.inf, jnp.inf, lse * _LOG2E)
    delta = r.delta[b, h, pl.ds(m * bq, bq)]
    base = item * kmax
    npart = r.npart[item]
    num = r.num[item]
    c = scale * _LOG2E
    rows = q_offset + m * bq + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)

    def body(i, dq, masked):
        n = r.blocks[base + i]
        k = r.k[b, pl.ds(n * bk, bk), kvh, :]
        v = r.v[b, pl.ds(n * bk, bk), kvh, :]
        sc = _dot(q, k) * c
        if masked:
            cols = n * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
            sc = jnp.where(_visible(rows, cols, w, s_, kv_valid), sc, -jnp.inf)
        p = jnp.exp2(sc - lse2[:, None])
        dp = _dot(do, v)
        ds = p * (dp - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k, ((1,), (0,)))

    dq = jnp.zeros(q.shape, jnp.float32)
    dq = _block_loop(body, npart, num, has_kvlen, dq)
    dq_ref[b, pl.ds(m * bq, bq), h, :] = (dq * scale).astype(dq_ref.dtype)


# ---------------------------------------------------------------------------- dk/dv kernel
def _dkv_kernel(*refs, nk, qmax, st: _Statics):
    r, (dk_ref, dv_ref) = BackwardRefs.split(refs)
    bq, bk, group, q_offset, kv_len, scale, has_kvlen = st
    item = r.order[pl.program_id(0)]
    b = pl.program_id(1)
    kvh = item // nk
    n = item % nk
    kv_valid = jnp.minimum(r.kvlen[b], kv_len) if has_kvlen else kv_len
    k = r.k[b, pl.ds(n * bk, bk), kvh, :]
    v = r.v[b, pl.ds(n * bk, bk), kvh, :]
    c = scale * _LOG2E
    cols = n * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
    dk = jnp.zeros(k.shape, jnp.float32)
    dv = jnp.zeros(v.shape, jnp.float32)
    for g in range(group):
        h = kvh * group + g
        w = r.win[h]
        s_ = r.sink[h]
        hn = h * nk + n
        base = hn * qmax
        npart = r.npart[hn]
        num = r.num[hn]

        def body(i, carry, masked, h=h, w=w, s_=s_, base=base):
            dk, dv = carry
            mq = r.blocks[base + i]
            q = r.q[b, pl.ds(mq * bq, bq), h, :]
            do = r.do[b, pl.ds(mq * bq, bq), h, :]
            lse = r.lse[b, h, pl.ds(mq * bq, bq)]
            lse2 = jnp.where(lse == -jnp.inf, jnp.inf, lse * _LOG2E)
            delta = r.delta[b, h, pl.ds(mq * bq, bq)]
            sc = _dot(q, k) * c
            if masked:
                rows = q_offset + mq * bq + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
                sc = jnp.where(_visible(rows, cols, w, s_, kv_valid), sc, -jnp.inf)
            p = jnp.exp2(sc - lse2[:, None])  # [bq, bk]
            dv = dv + _dot(p.astype(do.dtype), do, ((0,), (0,)))
            dp = _dot(do, v)
            ds = p * (dp - delta[:, None])
            dk = dk + _dot(ds.astype(q.dtype), q, ((0,), (0,)))
            return dk, dv

        dk, dv = _block_loop(body, npart, num, has_kvlen, (dk, dv))
    dk_ref[b, pl.ds(n * bk, bk), kvh, :] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[b, pl.ds(n * bk, bk), kvh, :] = dv.astype(dv_ref.dtype)


def _pass_statics(cfg: KernelConfig, spec: MaskSpec, group: int) -> _Statics:
    """The static arguments of one pass (forward, dq or dk/dv) over `spec`'s block tables."""
    return _Statics(
        bq=spec.block_q,
        bk=spec.block_k,
        group=group,
        q_offset=spec.q_offset,
        kv_len=spec.kv_len,
        scale=cfg.scale,
        has_kvlen=cfg.has_kv_lengths,
    )


def _bwd_call(cfg: KernelConfig, q, k, v, kv_lengths, out, lse, do, dlse):
    B, Tp, H, D = q.shape
    Hkv = k.shape[2]
    group = H // Hkv
    delta = flash_vjp.backward_delta(out, do, lse, dlse)
    kvl = kv_lengths.astype(jnp.int32)
    nw = cfg.num_warps_bwd or triton_prefill_warps(D)
    cp = None if cfg.interpret else compiler_params(nw, cfg.num_stages_bwd)

    # dq over the forward-style block tables of cfg.dq.
    spec = cfg.dq
    sch = block_tables(spec)
    nq = spec.num_q_blocks
    tables = [
        jnp.asarray(t) for t in kernel_tables(spec, sch.kv_blocks, sch.kv_num_partial, sch.kv_num)
    ] + [kvl]
    dq = pl.pallas_call(
        functools.partial(
            _dq_kernel,
            nq=nq,
            kmax=sch.max_kv_blocks,
            st=_pass_statics(cfg, spec, group),
        ),
        grid=(H * nq, B),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=cp,
        interpret=cfg.interpret,
        name="moa_sparse_dq",
    )(*tables, q, k, v, do, lse, delta)

    # dk/dv over the transposed block tables of cfg.dkv, one program per (KV head, key block).
    spec = cfg.dkv
    sch = block_tables(spec)
    nk = spec.num_k_blocks
    per_kv = sch.q_num.reshape(Hkv, group, nk).sum(axis=1)
    tables = [
        jnp.asarray(t)
        for t in kernel_tables(spec, sch.q_blocks, sch.q_num_partial, sch.q_num, work=per_kv)
    ] + [kvl]
    dk, dv = pl.pallas_call(
        functools.partial(
            _dkv_kernel,
            nk=nk,
            qmax=sch.max_q_blocks,
            st=_pass_statics(cfg, spec, group),
        ),
        grid=(Hkv * nk, B),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=cp,
        interpret=cfg.interpret,
        name="moa_sparse_dkv",
    )(*tables, q, k, v, do, lse, delta)
    return dq, dk, dv


_attention = flash_vjp.flash_attention(_fwd_call, _bwd_call)


def sparse_attention_gpu(
    q,
    k,
    v,
    *,
    windows,
    sinks,
    q_offset=0,
    kv_lengths=None,
    scale=None,
    block_q=128,
    block_k=128,
    block_q_dq=None,
    block_k_dq=None,
    block_q_dkv=None,
    block_k_dkv=None,
    interpret=False,
    num_warps=None,
    num_stages=TRITON_PREFILL_STAGES,
    num_warps_bwd=None,
    num_stages_bwd=TRITON_PREFILL_STAGES,
    poison=False,
):
    """Pallas/Triton per-head window + sink attention. Returns (out [B,T,H,D], lse [B,H,T])."""
    B, T, H, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    scale = float(D**-0.5 if scale is None else scale)
    bq_dq = block_q_dq or block_q
    bk_dq = block_k_dq or block_k
    bq_dkv = block_q_dkv or min(block_q, TRITON_DKV_BLOCK_Q)
    bk_dkv = block_k_dkv or block_k
    qb = max(block_q, bq_dq, bq_dkv)
    kb = max(block_k, bk_dq, bk_dkv)
    for x in (block_q, block_k, bq_dq, bk_dq, bq_dkv, bk_dkv):
        if x & (x - 1) or x < 1:
            raise ValueError(f"block sizes must be powers of two, got {x}")
    Tp = cdiv(T, qb) * qb
    Sp = cdiv(S, kb) * kb
    Dp = triton_head_dim(D)
    mk = lambda bq, bk: MaskSpec(windows, sinks, T, S, q_offset, bq, bk)  # noqa: E731
    cfg = KernelConfig(
        fwd=mk(block_q, block_k),
        dq=mk(bq_dq, bk_dq),
        dkv=mk(bq_dkv, bk_dkv),
        num_kv_heads=Hkv,
        scale=scale,
        has_kv_lengths=kv_lengths is not None,
        interpret=bool(interpret),
        num_warps=num_warps,
        num_stages=num_stages,
        num_warps_bwd=num_warps_bwd,
        num_stages_bwd=num_stages_bwd,
    )
    qp, kp, vp, kvl = flash_vjp.pad_inputs(q, k, v, kv_lengths, Tp, Sp, Dp)
    if poison:  # test hook: unwritten output blocks stay NaN (no gradient support).
        out, lse = _fwd_call(cfg, qp, kp, vp, kvl, poison=True)
    else:
        out, lse = _attention(qp, kp, vp, kvl, cfg)
    return out[:, :T, :, :D], lse[:, :, :T]
