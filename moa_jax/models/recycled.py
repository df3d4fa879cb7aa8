"""Recycled Attention decoding (Xu, Goyal, Choi 2024) and the K-slot baselines it is compared with.

Backends (same interface as `moa_jax.models.attention`; all prefill with full causal attention,
or with a MoA `Plan` through the block-sparse kernel when `prefill_plan` is given):

- `RecycledAttention(RecycleConfig(k, stride, dynamic_threshold))`: two caches per layer
  (`RecycledKVCache`): the full cache C_f (every token, never evicted) and the recycled cache
  C_p of exactly K entries per KV head, kept as indices into C_f plus a gathered copy of their
  keys and values (so partial steps read K contiguous slots).
- `StreamingAttention(k, sink=4)`: StreamingLLM, 4 sinks + the K - 4 most recent tokens.
- `H2OAttention(k)`: H2O, K/2 heavy hitters by accumulated attention + K/2 recent tokens.
- `FullCacheAttention()`: dense decoding through the same head-major cache and kernel (the
  recycled full step without the selection): the dense baseline of the same machinery.

Recycled Attention, as implemented (METHODS.md "Recycled Attention"):

- Selection (`select_top_k`): fp32 softmax probabilities of the single current query over C_f;
  per KV head the max over its query heads; a 1-D max-pool over tokens (kernel `pool` = 7,
  stride 1, same size, -inf padding), invalid slots re-masked to -inf after pooling; top-K.
  No sinks or recent tokens are forced in: every layer and KV head keeps exactly what scores
  highest. The K entries are stored sorted by ascending score (empty entries, when fewer than
  K tokens exist, first).
- Prefill is step 0: the last prompt token's probabilities over C_f (computed by the full-step
  kernel after the prompt is written; with a MoA prefill too, so the seed sees the whole prompt
  although the prefill itself was sparse) seed C_p.
- Partial step: attend over C_p plus the current token (K + 1 keys), then write the current
  token over the entry at a pointer that starts at 0 after each refresh and advances by one:
  with the ascending order this evicts the lowest-scored selected token still present, and the
  tokens generated since the last refresh are never evicted (needs S <= K). The token is also
  written to C_f, whose entries are never recomputed.
- Full step: attend over all of C_f and rebuild C_p (and reset the pointer) from the same pass's
  probabilities (`pallas_kernels.recycled_decode_gpu.full_step_decode` returns both).
- Schedule, per layer inside the decode `lax.while_loop`: each layer's cache carries a decode
  step counter (the prefill is step 0), the pointer and the head-averaged query of its last full
  step, and `lax.cond` picks the full or the partial branch at run time, so a partial step never
  touches C_f beyond writing one token.
  * fixed (`dynamic_threshold=None`): steps t = S, 2S, ... are full (t counted from 1).
  * dynamic: every `stride` (= QC) steps a layer compares the cosine of the current
    head-averaged query (pre-RoPE by default, `pre_rope_query`) with the one at its last full
    step, and refreshes at or below the threshold. The decision is per row: the full branch runs
    when any row of the batch needs it and the other rows take the partial result, so a row's
    output never depends on the rest of the batch. A row whose C_p holds nothing but tokens
    generated since its last refresh (K partial steps in a row) is refreshed too (forced), so no
    generated token is ever evicted between refreshes.
  * never (`stride=None`): the seed selection is kept for good (SnapKV with a one-token
    observation window and the same pooling); after K new tokens the pointer wraps and the
    oldest generated token goes first.
- Exact limits (tested): S = 1 equals dense decoding; K >= final length equals dense decoding.

Memory per layer (`RecycledKVCache.nbytes`): the full cache 2 * B * Hkv * Lp * D * itemsize
plus 2 * B * Hkv * Kp * D * itemsize for C_p and 4 * B * Hkv * Kp for its positions (Lp, Kp:
L and K rounded up to the kernel block), i.e. L + K tokens as the paper states: nothing saved.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh

from moa_jax.config import ModelConfig
from moa_jax.models.attention import AttentionBackend
from moa_jax.pallas_kernels.head_sharding import same_kernel_on_mesh, sparse_attention_on_mesh
from moa_jax.pallas_kernels.recycled_decode_gpu import full_step_decode, recycled_decode
from moa_jax.pallas_kernels.reference import visible
from moa_jax.plan import Plan

STREAMINGLLM_SINK = 4


def _round_up(x: int, m: int) -> int:
    return -(-int(x) // m) * m


def default_block() -> int:
    """Cache padding granularity (and kernel block bound): 128 lanes on TPU, 64 elsewhere."""
    return 128 if jax.default_backend() == "tpu" else 64


# ------------------------------------------------------------------------------ config
@dataclasses.dataclass(frozen=True)
class RecycleConfig:
    """Recycled Attention settings.

    Args:
      k: entries of the recycled cache per layer and KV head.
      stride: fixed schedule: a full step every `stride` decode steps (S; S = 1 is dense);
        dynamic schedule: the query check interval QC; None: never refresh (SnapKV).
      dynamic_threshold: None for the fixed schedule; else the cosine similarity s at or below
        which a layer refreshes (0.85 for Llama-3.1-8B, 0.95 for Qwen2-7B in the paper).
      pre_rope_query: the dynamic rule compares queries before RoPE (the paper's default);
        False compares the rotated queries.
      pool: max-pool kernel over tokens (odd; 1 disables pooling).
    """

    k: int
    stride: int | None = 10
    dynamic_threshold: float | None = None
    pre_rope_query: bool = True
    pool: int = 7

    def __post_init__(self):
        if int(self.k) < 1:
            raise ValueError(f"RecycleConfig.k must be >= 1, got {self.k}")
        if self.stride is not None and int(self.stride) < 1:
            raise ValueError(f"RecycleConfig.stride must be >= 1 or None, got {self.stride}")
        if self.dynamic_threshold is not None and self.stride is None:
            raise ValueError("the dynamic schedule needs a check interval: set stride (QC)")
        if self.mode == "fixed" and self.stride > self.k:
            raise ValueError(
                f"stride S={self.stride} > k={self.k}: tokens generated between "
                f"refreshes would be evicted (S <= K is required)"
            )
        if self.pool < 1 or self.pool % 2 == 0:
            raise ValueError(f"pool must be an odd kernel size >= 1, got {self.pool}")

    @property
    def mode(self) -> str:
        """'fixed', 'dynamic' or 'never'."""
        if self.stride is None:
            return "never"
        return "fixed" if self.dynamic_threshold is None else "dynamic"


# ------------------------------------------------------------------------------ caches
@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=("k", "v", "kp", "vp", "idx", "ptr", "step", "ref_q"),
    meta_fields=("top_k", "max_len"),
)
@dataclasses.dataclass
class RecycledKVCache:
    """One layer's Recycled Attention state.

    k, v: [B, Hkv, Lp, D] the full cache C_f, head-major, slot j holds position j.
    kp, vp: [B, Hkv, Kp, D] the recycled cache C_p (a gathered copy of the selected tokens).
    idx: int32 [B, Hkv, Kp], the position held by each C_p entry, -1 when empty; entries
      [0, top_k) are live, sorted by ascending selection score at the last refresh (entries
      overwritten since hold generated tokens), entries [top_k, Kp) are padding, always -1.
    ptr: int32 [B], the C_p entry the next generated token goes to.
    step: int32 [], decode steps done since the prefill (the prefill is step 0).
    ref_q: float32 [B, D], the head-averaged query of the last full step (dynamic schedule).
    top_k: K (static); max_len: the logical capacity in tokens (static, <= Lp).
    """

    k: jax.Array
    v: jax.Array
    kp: jax.Array
    vp: jax.Array
    idx: jax.Array
    ptr: jax.Array
    step: jax.Array
    ref_q: jax.Array
    top_k: int
    max_len: int

    @classmethod
    def zeros(
        cls,
        batch: int,
        max_len: int,
        num_kv_heads: int,
        head_dim: int,
        top_k: int,
        dtype: Any = jnp.bfloat16,
        block: int = 64,
    ) -> "RecycledKVCache":
        lp, kp = _round_up(max_len, block), _round_up(top_k, block)
        full = (batch, num_kv_heads, lp, head_dim)
        sel = (batch, num_kv_heads, kp, head_dim)
        return cls(
            jnp.zeros(full, dtype),
            jnp.zeros(full, dtype),
            jnp.zeros(sel, dtype),
            jnp.zeros(sel, dtype),
            jnp.full(sel[:3], -1, jnp.int32),
            jnp.zeros((batch,), jnp.int32),
            jnp.zeros((), jnp.int32),
            jnp.zeros((batch, head_dim), jnp.float32),
            int(top_k),
            int(max_len),
        )

    def logical_axes(self) -> "RecycledKVCache":
        kv = ("batch", "kv_heads", "seq", "head_dim")
        return dataclasses.replace(
            self,
            k=kv,
            v=kv,
            kp=kv,
            vp=kv,
            idx=("batch", "kv_heads", "seq"),
            ptr=("batch",),
            step=(),
            ref_q=("batch", "head_dim"),
        )

    def nbytes(self) -> int:
        return int(sum(x.nbytes for x in jax.tree_util.tree_leaves(self)))

    def selected(self) -> jax.Array:
        """int32 [B, Hkv, K]: positions held by the live C_p entries (-1 empty)."""
        return self.idx[..., : self.top_k]


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=("kp", "vp", "idx", "acc"),
    meta_fields=("top_k", "max_len"),
)
@dataclasses.dataclass
class SelectedKVCache:
    """One layer's K-slot cache of the eviction baselines (StreamingLLM, H2O): no full cache.

    kp, vp: [B, Hkv, Kp, D]; idx: int32 [B, Hkv, Kp] position per slot (-1 empty; slots
    [top_k, Kp) are padding); acc: float32 [B, Hkv, Kp] accumulated attention per slot (H2O;
    -inf for empty slots) or None (StreamingLLM).
    """

    kp: jax.Array
    vp: jax.Array
    idx: jax.Array
    acc: jax.Array | None
    top_k: int
    max_len: int

    @classmethod
    def zeros(
        cls,
        batch: int,
        max_len: int,
        num_kv_heads: int,
        head_dim: int,
        top_k: int,
        dtype: Any = jnp.bfloat16,
        block: int = 64,
        with_scores: bool = False,
    ):
        kp = _round_up(top_k, block)
        sel = (batch, num_kv_heads, kp, head_dim)
        acc = jnp.full(sel[:3], -jnp.inf, jnp.float32) if with_scores else None
        return cls(
            jnp.zeros(sel, dtype),
            jnp.zeros(sel, dtype),
            jnp.full(sel[:3], -1, jnp.int32),
            acc,
            int(top_k),
            int(max_len),
        )

    def logical_axes(self) -> "SelectedKVCache":
        kv = ("batch", "kv_heads", "seq", "head_dim")
        return dataclasses.replace(
            self,
            kp=kv,
            vp=kv,
            idx=("batch", "kv_heads", "seq"),
            acc=None if self.acc is None else ("batch", "kv_heads", "seq"),
        )

    def nbytes(self) -> int:
        return int(sum(x.nbytes for x in jax.tree_util.tree_leaves(self)))

    def selected(self) -> jax.Array:
        return self.idx[..., : self.top_k]


# ------------------------------------------------------------------------------ selection
def max_pool_scores(scores: jax.Array, valid: jax.Array, pool: int) -> jax.Array:
    """1-D max-pool over the last axis (kernel `pool`, stride 1, same size, -inf padding);
    invalid slots are -inf before and after pooling."""
    s = jnp.where(valid, scores, -jnp.inf)
    if pool > 1:
        dims = (1,) * (s.ndim - 1) + (pool,)
        pad = ((0, 0),) * (s.ndim - 1) + ((pool // 2, pool // 2),)
        s = lax.reduce_window(s, -jnp.inf, lax.max, dims, (1,) * s.ndim, pad)
    return jnp.where(valid, s, -jnp.inf)


def select_top_k(
    scores: jax.Array, valid: jax.Array, k: int, pool: int = 7, slots: int | None = None
) -> jax.Array:
    """The K best positions per (row, KV head), sorted by ascending pooled score.

    Args:
      scores: float32 [B, Hkv, N], per-KV-head scores (probabilities max over the group).
      valid: bool broadcastable to [B, Hkv, N].
      k: entries to keep; pool: max-pool kernel.
      slots: pad the result to this many entries (>= k) with -1 at the end.
    Returns:
      int32 [B, Hkv, slots or k]: positions, lowest score first; -1 (empty) entries, when
      fewer than k positions are valid, come before all valid ones.
    """
    s = max_pool_scores(scores, jnp.broadcast_to(valid, scores.shape), pool)
    n = s.shape[-1]
    kk = min(k, n)
    vals, ids = lax.top_k(s, kk)  # descending
    ids = jnp.where(vals == -jnp.inf, -1, ids).astype(jnp.int32)
    if kk < k:
        ids = jnp.concatenate([ids, jnp.full(ids.shape[:-1] + (k - kk,), -1, jnp.int32)], -1)
    ids = ids[..., ::-1]  # ascending
    slots = k if slots is None else slots
    if slots > k:
        ids = jnp.concatenate([ids, jnp.full(ids.shape[:-1] + (slots - k,), -1, jnp.int32)], -1)
    return ids


def _gather(buf: jax.Array, idx: jax.Array) -> jax.Array:
    """buf [B, Hkv, N, D], idx [B, Hkv, M] (-1 allowed) -> [B, Hkv, M, D]."""
    return jnp.take_along_axis(buf, jnp.maximum(idx, 0)[..., None], axis=2)


def _after(slot: jax.Array, out: jax.Array) -> jax.Array:
    """`slot` unchanged, but computed from `out`: a cache write at `slot` then depends on the
    attention that read the cache, so XLA orders the write after the read and updates the
    buffer in place; without the dependence it copies the whole buffer every step. (Zero for
    finite outputs; a NaN output would shift the slot by one, but then the step is lost.)"""
    return slot + (out.reshape(-1)[0] * 0 != 0).astype(slot.dtype)


def _head_mean(q: jax.Array) -> jax.Array:
    return jnp.mean(q.astype(jnp.float32), axis=-2)


def _cosine(a: jax.Array, b: jax.Array) -> jax.Array:
    num = jnp.sum(a * b, axis=-1)
    den = jnp.sqrt(jnp.sum(a * a, axis=-1) * jnp.sum(b * b, axis=-1))
    return jnp.clip(num / jnp.maximum(den, 1e-30), -1.0, 1.0)


# ------------------------------------------------------------------------------ shared parts
def _prefill_windows(opts, layer: int, h: int, t: int, max_len: int):
    if opts.prefill_plan is None:
        return (max(t, 1),) * h, (0,) * h
    plan = opts.prefill_plan
    if plan.num_heads != h:
        raise ValueError(f"prefill plan has {plan.num_heads} heads, the model {h}")
    return (plan.layer_windows(opts.prefill_length or max_len, layer), plan.layer_sinks(layer))


def _prefill_attention(opts, q, k, v, layer, max_len):
    """Causal attention of a prompt at positions [0, T): dense or the plan's windows."""
    h, t = q.shape[2], q.shape[1]
    windows, sinks = _prefill_windows(opts, layer, h, t, max_len)
    return sparse_attention_on_mesh(
        q,
        k,
        v,
        opts.mesh,
        windows=windows,
        sinks=sinks,
        backend=opts.kernel_backend,
        interpret=opts.interpret,
        block_q=opts.prefill_block_q,
        block_k=opts.prefill_block_k,
    )


def _kernel_kw(opts) -> dict:
    return dict(backend=opts.kernel_backend, interpret=opts.interpret, num_splits=opts.num_splits)


def _full_step(opts, q, k, v, q_positions, scores):
    """`full_step_decode` on the backend's mesh (rows and KV heads split, `head_sharding`)."""
    fn = functools.partial(full_step_decode, scores=scores, **_kernel_kw(opts))
    return same_kernel_on_mesh(
        fn, opts.mesh, (q, k, v, q_positions), (1, 1, 1, None), 1, k.shape[1]
    )


def _recycled(opts, q, k, v, pos, q_positions, k_new, v_new, scores=None):
    """`recycled_decode` on the backend's mesh (rows and KV heads split, `head_sharding`)."""
    fn = functools.partial(recycled_decode, scores=scores, **_kernel_kw(opts))
    return same_kernel_on_mesh(
        fn,
        opts.mesh,
        (q, k, v, pos, q_positions, k_new, v_new),
        (1, 1, 1, 1, None, 1, 1),
        1,
        k.shape[1],
    )


def _chunk_info(q, positions, lengths):
    """(start [B], lengths [B], last position [B], rows [B]) of a prefill chunk."""
    b, t = q.shape[:2]
    lengths = jnp.full((b,), t, jnp.int32) if lengths is None else lengths.astype(jnp.int32)
    start = positions[:, 0].astype(jnp.int32)
    return start, lengths, start + lengths - 1, jnp.arange(b)


def _is_prefill(q, lengths) -> bool:
    # A one-token call without `lengths` is a decode step (generate passes lengths to prefill).
    return q.shape[1] > 1 or lengths is not None


def _write_full(buf: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """buf [B, Hkv, L, D] <- new [B, T, Hkv, D] at slots [start[b], start[b] + T)."""
    new = jnp.swapaxes(new, 1, 2).astype(buf.dtype)

    def put(bf, nw, s):
        return lax.dynamic_update_slice_in_dim(bf, nw, s, axis=1)

    return jax.vmap(put)(buf, new, start)


def _block_for(opts) -> int:
    return opts.block or default_block()


# ------------------------------------------------------------------------------ options
@dataclasses.dataclass(frozen=True, kw_only=True)
class KernelOptions(AttentionBackend):
    """Keyword-only options of the head-major-cache backends (recycled, dense kernel,
    StreamingLLM, H2O).

    Args:
      prefill_plan: optional MoA `Plan` for the prompt's prefill (block-sparse kernel); the full
        cache stays dense, and the seed selection scores the whole prompt.
      prefill_length: length at which the plan is resolved (None: the cache's max_len).
      kernel_backend: 'auto' | 'gpu' | 'tpu' | 'reference' (the jnp oracles throughout).
      interpret: Pallas interpret mode (None: automatic, True off the kernel's platform).
      block: cache padding granularity in tokens (None: 128 on TPU, 64 elsewhere).
      num_splits: GPU split-K factor of the decode kernels (None: automatic).
      prefill_block_q, prefill_block_k: prefill kernel blocks (None: defaults).
      mesh: device mesh: the kernels run under `shard_map`, rows over data x fsdp and KV heads
        over tensor (`head_sharding`); set by `generate(mesh=...)`.
    """

    prefill_plan: Plan | None = None
    prefill_length: int | None = None
    kernel_backend: str = "auto"
    interpret: bool | None = None
    block: int | None = None
    num_splits: int | None = None
    prefill_block_q: int | None = None
    prefill_block_k: int | None = None
    mesh: Mesh | None = None


# ------------------------------------------------------------------------------ recycled
@dataclasses.dataclass(frozen=True)
class RecycledAttention(KernelOptions):
    """Recycled Attention (see the module docstring).

    Args:
      config: the `RecycleConfig` (K, stride, dynamic threshold).
      options: keyword-only, see `KernelOptions`.
    """

    config: RecycleConfig

    @property
    def wants_pre_rope_query(self) -> bool:
        """Asks the model for the pre-RoPE queries (`q_pre_rope=`): the dynamic rule's default."""
        return self.config.mode == "dynamic" and self.config.pre_rope_query

    def init_cache(self, cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.bfloat16):
        if self.prefill_plan is not None:
            self.prefill_plan.validate(cfg)
        return tuple(
            RecycledKVCache.zeros(
                batch,
                max_len,
                cfg.num_kv_heads,
                cfg.head_dim,
                self.config.k,
                dtype,
                _block_for(self),
            )
            for _ in range(cfg.num_layers)
        )

    def _query_summary(self, q, q_pre):
        """Head-averaged query [B, D] (f32) for the dynamic rule, from [B, H, D] arrays."""
        if self.config.mode != "dynamic":
            return None
        if self.config.pre_rope_query:
            return _head_mean(q_pre)
        return _head_mean(q)

    def __call__(self, q, k, v, *, layer, positions, cache, lengths=None, q_pre_rope=None):
        if self.wants_pre_rope_query and q_pre_rope is None and cache is not None:
            raise ValueError(
                "RecycleConfig(pre_rope_query=True) needs the model to pass "
                "q_pre_rope= (moa_jax.models.llama does)"
            )
        if cache is None:
            return _prefill_attention(self, q, k, v, layer, q.shape[1]), None
        if _is_prefill(q, lengths):
            return self._prefill(q, k, v, layer, positions, cache, lengths, q_pre_rope)
        return self._decode(q, k, v, positions, cache, q_pre_rope)

    def _prefill(self, q, k, v, layer, positions, cache, lengths, q_pre):
        out = _prefill_attention(self, q, k, v, layer, cache.max_len)
        start, lengths, last, rows = _chunk_info(q, positions, lengths)
        ck, cv = _write_full(cache.k, k, start), _write_full(cache.v, v, start)
        cache = dataclasses.replace(cache, k=ck, v=cv)
        q_last = q[rows, lengths - 1]  # [B, H, D]
        _, probs = _full_step(self, q_last, ck, cv, last, "max")
        valid = jnp.arange(probs.shape[-1])[None, None] <= last[:, None, None]
        idx = select_top_k(probs, valid, self.config.k, self.config.pool, cache.kp.shape[2])
        kp, vp = _gather(ck, idx), _gather(cv, idx)
        summ = self._query_summary(q_last, None if q_pre is None else q_pre[rows, lengths - 1])
        return out, dataclasses.replace(
            cache,
            kp=kp,
            vp=vp,
            idx=idx,
            ptr=jnp.zeros_like(cache.ptr),
            step=jnp.zeros((), jnp.int32),
            ref_q=cache.ref_q if summ is None else summ,
        )

    def _decode(self, q, k, v, positions, cache, q_pre):
        # Layout for XLA: the lax.cond returns C_p untouched on partial steps (its attention only
        # reads it) and the current token is written at the pointer after the cond, by a
        # scatter that drops the write on refreshed rows and depends on the attention output
        # (`_after`). Writing inside the branch, after reading C_p there, makes XLA copy C_p
        # around the cond at every step.
        cfg = self.config
        q0, k0, v0, pos = q[:, 0], k[:, 0], v[:, 0], positions[:, 0].astype(jnp.int32)
        b = q0.shape[0]
        rows = jnp.arange(b)
        ck = cache.k.at[rows, :, pos].set(k0.astype(cache.k.dtype))
        cv = cache.v.at[rows, :, pos].set(v0.astype(cache.v.dtype))
        step = cache.step + 1
        summ = self._query_summary(q0, None if q_pre is None else q_pre[:, 0])
        sel = (cache.kp, cache.vp, cache.idx, cache.ref_q)

        def partial_branch():
            out = _recycled(self, q0, cache.kp, cache.vp, cache.idx, pos, k0, v0)
            return (out,) + sel

        def full_branch(need):
            out, probs = _full_step(self, q0, ck, cv, pos, "max")
            idx = select_top_k(
                probs,
                jnp.arange(probs.shape[-1])[None, None] <= pos[:, None, None],
                cfg.k,
                cfg.pool,
                cache.kp.shape[2],
            )
            ref_q = cache.ref_q if summ is None else summ
            if need is None:
                return out, _gather(ck, idx), _gather(cv, idx), idx, ref_q
            # Rows that keep their selection: C_p is by construction C_f at its positions, so
            # re-gathering it from C_f (rather than reading C_p here) reproduces it exactly.
            idx = jnp.where(need[:, None, None], idx, cache.idx)
            kp, vp = _gather(ck, idx), _gather(cv, idx)
            out_p = _recycled(self, q0, kp, vp, idx, pos, k0, v0)
            return (
                jnp.where(need[:, None, None], out, out_p),
                kp,
                vp,
                idx,
                jnp.where(need[:, None], ref_q, cache.ref_q),
            )

        if cfg.mode == "never":
            refreshed = jnp.zeros((b,), bool)
            out, kp, vp, idx, ref_q = partial_branch()
        elif cfg.mode == "fixed":
            full = step % cfg.stride == 0
            refreshed = jnp.broadcast_to(full, (b,))
            out, kp, vp, idx, ref_q = lax.cond(full, lambda: full_branch(None), partial_branch)
        else:
            check = step % cfg.stride == 0
            refreshed = (check & (_cosine(summ, cache.ref_q) <= cfg.dynamic_threshold)) | (
                cache.ptr >= cfg.k
            )
            out, kp, vp, idx, ref_q = lax.cond(
                jnp.any(refreshed), lambda: full_branch(refreshed), partial_branch
            )
        # Rows that took a partial step: the current token replaces the entry at the pointer.
        ptr = jnp.remainder(cache.ptr, cfg.k) if cfg.mode == "never" else cache.ptr
        slot = _after(jnp.where(refreshed, kp.shape[2], ptr), out)  # out of range: dropped
        kp = kp.at[rows, :, slot].set(k0.astype(kp.dtype), mode="drop")
        vp = vp.at[rows, :, slot].set(v0.astype(vp.dtype), mode="drop")
        idx = idx.at[rows, :, slot].set(jnp.broadcast_to(pos[:, None], k0.shape[:2]), mode="drop")
        return out[:, None], dataclasses.replace(
            cache,
            k=ck,
            v=cv,
            kp=kp,
            vp=vp,
            idx=idx,
            step=step,
            ptr=jnp.where(refreshed, 0, ptr + 1).astype(jnp.int32),
            ref_q=ref_q,
        )


# ------------------------------------------------------------------------------ dense (same path)
@functools.partial(
    jax.tree_util.register_dataclass, data_fields=("k", "v"), meta_fields=("max_len",)
)
@dataclasses.dataclass
class HeadMajorKVCache:
    """A dense cache in the head-major layout of the recycled kernels: k, v [B, Hkv, Lp, D]."""

    k: jax.Array
    v: jax.Array
    max_len: int

    def logical_axes(self) -> "HeadMajorKVCache":
        kv = ("batch", "kv_heads", "seq", "head_dim")
        return dataclasses.replace(self, k=kv, v=kv)

    def nbytes(self) -> int:
        return int(self.k.nbytes + self.v.nbytes)


@dataclasses.dataclass(frozen=True)
class FullCacheAttention(KernelOptions):
    """Dense decoding with the full-step kernel (no selection) over a head-major dense cache:
    the dense baseline of this machinery (options: `KernelOptions`)."""

    def init_cache(self, cfg, batch, max_len, dtype=jnp.bfloat16):
        shape = (batch, cfg.num_kv_heads, _round_up(max_len, _block_for(self)), cfg.head_dim)
        return tuple(
            HeadMajorKVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), int(max_len))
            for _ in range(cfg.num_layers)
        )

    def __call__(self, q, k, v, *, layer, positions, cache, lengths=None):
        if cache is None:
            return _prefill_attention(self, q, k, v, layer, q.shape[1]), None
        if _is_prefill(q, lengths):
            out = _prefill_attention(self, q, k, v, layer, cache.max_len)
            start = positions[:, 0].astype(jnp.int32)
            return out, dataclasses.replace(
                cache, k=_write_full(cache.k, k, start), v=_write_full(cache.v, v, start)
            )
        pos = positions[:, 0].astype(jnp.int32)
        rows = jnp.arange(q.shape[0])
        ck = cache.k.at[rows, :, pos].set(k[:, 0].astype(cache.k.dtype))
        cv = cache.v.at[rows, :, pos].set(v[:, 0].astype(cache.v.dtype))
        out = _full_step(self, q[:, 0], ck, cv, pos, None)
        return out[:, None], dataclasses.replace(cache, k=ck, v=cv)


# ------------------------------------------------------------------------------ StreamingLLM
def streaming_positions(last: jax.Array, top_k: int, sink: int, slots: int) -> jax.Array:
    """int32 [B, slots]: the position each slot holds after tokens [0, last] were written one by
    one (slot p for p < sink, else sink + (p - sink) % (top_k - sink)); -1 for empty slots."""
    ring = top_k - sink
    j = jnp.arange(slots, dtype=jnp.int32)[None, :]
    last = last[:, None]
    i = j - sink
    ring_pos = sink + i + ring * jnp.floor_divide(last - sink - i, ring)
    p = jnp.where(j < sink, j, ring_pos)
    ok = (j < top_k) & (p <= last) & ((j < sink) | (p >= sink))
    return jnp.where(ok, p, -1).astype(jnp.int32)


def _gather_chunk(k: jax.Array, idx: jax.Array, start: jax.Array) -> jax.Array:
    """k [B, T, Hkv, D] (positions start + t), idx [B, Hkv, M] -> [B, Hkv, M, D]."""
    t = k.shape[1]
    local = jnp.clip(idx - start[:, None, None], 0, t - 1)
    return _gather(jnp.swapaxes(k, 1, 2), local)


@dataclasses.dataclass(frozen=True)
class StreamingAttention(KernelOptions):
    """StreamingLLM decoding: `sink` sinks + the K - sink most recent tokens per layer.

    The prompt is prefilled with full causal attention (or `prefill_plan`) and then only the
    sinks and the most recent tokens are kept; a decode step attends over the K cached tokens
    plus the current one (as the recycled partial step does), then writes the current token
    over the oldest recent one. Options: `KernelOptions`.
    """

    k: int
    sink: int = STREAMINGLLM_SINK

    def __post_init__(self):
        if not 0 <= self.sink < self.k:
            raise ValueError(
                f"StreamingAttention needs 0 <= sink < k, got sink {self.sink}, k {self.k}"
            )

    def init_cache(self, cfg, batch, max_len, dtype=jnp.bfloat16):
        if self.prefill_plan is not None:
            self.prefill_plan.validate(cfg)
        return tuple(
            SelectedKVCache.zeros(
                batch, max_len, cfg.num_kv_heads, cfg.head_dim, self.k, dtype, _block_for(self)
            )
            for _ in range(cfg.num_layers)
        )

    def __call__(self, q, k, v, *, layer, positions, cache, lengths=None):
        if cache is None:
            return _prefill_attention(self, q, k, v, layer, q.shape[1]), None
        hkv = k.shape[2]
        slots = cache.kp.shape[2]
        if _is_prefill(q, lengths):
            out = _prefill_attention(self, q, k, v, layer, cache.max_len)
            start, lengths, last, _ = _chunk_info(q, positions, lengths)
            idx = streaming_positions(last, self.k, self.sink, slots)
            idx = jnp.broadcast_to(idx[:, None], (q.shape[0], hkv, slots))
            # The prefill chunk starts the sequence (positions [0, T)).
            return out, dataclasses.replace(
                cache,
                kp=_gather_chunk(k, idx, start).astype(cache.kp.dtype),
                vp=_gather_chunk(v, idx, start).astype(cache.vp.dtype),
                idx=idx,
            )
        q0, k0, v0 = q[:, 0], k[:, 0], v[:, 0]
        pos = positions[:, 0].astype(jnp.int32)
        out = _recycled(self, q0, cache.kp, cache.vp, cache.idx, pos, k0, v0)
        kp, vp, idx = cache.kp, cache.vp, cache.idx
        slot = _after(
            jnp.where(
                pos < self.sink, pos, self.sink + jnp.remainder(pos - self.sink, self.k - self.sink)
            ),
            out,
        )
        rows = jnp.arange(q.shape[0])
        return out[:, None], dataclasses.replace(
            cache,
            kp=kp.at[rows, :, slot].set(k0.astype(kp.dtype)),
            vp=vp.at[rows, :, slot].set(v0.astype(vp.dtype)),
            idx=idx.at[rows, :, slot].set(jnp.broadcast_to(pos[:, None], (q.shape[0], hkv))),
        )


# ------------------------------------------------------------------------------ H2O
def prompt_attention_sums(
    q: jax.Array, k: jax.Array, lengths: jax.Array, windows, sinks, *, chunk: int = 128
) -> jax.Array:
    """Accumulated attention of each prompt token: for KV head g and key j, the sum over the
    query heads of group g and the valid queries i of softmax_j(q_i . k_j) under the causal
    (window + sink) mask. Queries are processed `chunk` at a time (memory B*H*chunk*T floats).

    Args:
      q: [B, T, H, D]; k: [B, T, Hkv, D], positions [0, T); lengths: int [B] valid tokens.
      windows, sinks: per-query-head window and sink (static tuples; window >= T is causal).
    Returns:
      float32 [B, Hkv, T] (0 for padding keys).
    """
    b, t, h, d = q.shape
    hkv = k.shape[2]
    group = h // hkv
    c = min(chunk, t)
    tp = _round_up(t, c)
    qf = jnp.pad(q.astype(jnp.float32), ((0, 0), (0, tp - t), (0, 0), (0, 0)))
    qf = qf.reshape(b, tp // c, c, hkv, group, d)
    kf = k.astype(jnp.float32)
    w = jnp.asarray(windows, jnp.int32).reshape(hkv, group)[:, :, None, None]
    s = jnp.asarray(sinks, jnp.int32).reshape(hkv, group)[:, :, None, None]
    kpos = jnp.arange(t)[None, None, None, :]
    scale = d**-0.5

    def body(carry, xs):
        qc, n = xs  # [B, c, Hkv, G, D]
        qpos = (n * c + jnp.arange(c))[None, None, :, None]
        mask = visible(qpos, kpos, w, s)  # [Hkv, G, c, T]
        valid_q = (n * c + jnp.arange(c))[None, :] < lengths[:, None]  # [B, c]
        lg = jnp.einsum("bckgd,btkd->bkgct", qc, kf, precision=lax.Precision.HIGHEST) * scale
        lg = jnp.where(mask[None], lg, -jnp.inf)
        p = jax.nn.softmax(lg, axis=-1)
        p = jnp.where(mask[None] & valid_q[:, None, None, :, None], p, 0.0)
        return carry + jnp.sum(p, axis=(2, 3)), None

    init = jnp.zeros((b, hkv, t), jnp.float32)
    xs = (jnp.moveaxis(qf, 1, 0), jnp.arange(tp // c))
    acc, _ = lax.scan(body, init, xs)
    return acc


@dataclasses.dataclass(frozen=True)
class H2OAttention(KernelOptions):
    """H2O decoding: K/2 heavy hitters by accumulated attention + K/2 recent tokens.

    Per layer and KV head, each cached token carries its accumulated attention: after the prompt
    the sum of the prompt queries' probabilities on it (`prompt_attention_sums`), then every
    decode step adds the current query's probabilities (summed over the KV group's query heads;
    the current token starts with its own). A step attends over the K cached tokens plus the
    current one, then evicts, among cached tokens outside the K - K//2 most recent positions
    (the current one included), the one with the lowest accumulated attention (empty slots
    first), and writes the current token there. Options: `KernelOptions`;
    `score_chunk` is the query chunk of the prompt's score pass.
    """

    k: int
    score_chunk: int = 128

    def __post_init__(self):
        if self.k < 2:
            raise ValueError(f"H2OAttention needs k >= 2, got {self.k}")

    @property
    def recent(self) -> int:
        return self.k - self.k // 2

    def init_cache(self, cfg, batch, max_len, dtype=jnp.bfloat16):
        if self.prefill_plan is not None:
            self.prefill_plan.validate(cfg)
        return tuple(
            SelectedKVCache.zeros(
                batch,
                max_len,
                cfg.num_kv_heads,
                cfg.head_dim,
                self.k,
                dtype,
                _block_for(self),
                with_scores=True,
            )
            for _ in range(cfg.num_layers)
        )

    def __call__(self, q, k, v, *, layer, positions, cache, lengths=None):
        if cache is None:
            return _prefill_attention(self, q, k, v, layer, q.shape[1]), None
        if _is_prefill(q, lengths):
            return self._prefill(q, k, v, layer, positions, cache, lengths)
        return self._decode(q, k, v, positions, cache)

    def _prefill(self, q, k, v, layer, positions, cache, lengths):
        out = _prefill_attention(self, q, k, v, layer, cache.max_len)
        b, t, h, _ = q.shape
        start, lengths, last, _ = _chunk_info(q, positions, lengths)
        windows, sinks = _prefill_windows(self, layer, h, t, cache.max_len)
        acc = prompt_attention_sums(q, k, lengths, windows, sinks, chunk=self.score_chunk)
        j = start[:, None, None] + jnp.arange(t)[None, None, :]  # positions of the chunk
        valid = j <= last[:, None, None]
        recent = valid & (j > last[:, None, None] - self.recent)
        key = jnp.where(recent, jnp.inf, jnp.where(valid, acc, -jnp.inf))
        kk = min(self.k, t)
        vals, loc = lax.top_k(key, kk)
        keep = vals > -jnp.inf
        idx = jnp.where(keep, jnp.take_along_axis(j, loc, -1), -1).astype(jnp.int32)
        sel_acc = jnp.where(keep, jnp.take_along_axis(acc, loc, -1), -jnp.inf)
        slots = cache.kp.shape[2]
        pad = slots - kk
        idx = jnp.pad(idx, ((0, 0), (0, 0), (0, pad)), constant_values=-1)
        sel_acc = jnp.pad(sel_acc, ((0, 0), (0, 0), (0, pad)), constant_values=-jnp.inf)
        return out, dataclasses.replace(
            cache,
            kp=_gather_chunk(k, idx, start).astype(cache.kp.dtype),
            vp=_gather_chunk(v, idx, start).astype(cache.vp.dtype),
            idx=idx,
            acc=sel_acc,
        )

    def _decode(self, q, k, v, positions, cache):
        q0, k0, v0 = q[:, 0], k[:, 0], v[:, 0]
        pos = positions[:, 0].astype(jnp.int32)
        out, sc, new_sc = recycled_decode(
            q0, cache.kp, cache.vp, cache.idx, pos, k0, v0, scores="sum", **_kernel_kw(self)
        )
        kp, vp = cache.kp, cache.vp
        acc = cache.acc + sc
        idx = cache.idx
        live = jnp.arange(idx.shape[-1])[None, None, :] < self.k
        recent = idx > (pos[:, None, None] - self.recent)
        key = jnp.where(
            ~live, jnp.inf, jnp.where(idx < 0, -jnp.inf, jnp.where(recent, jnp.inf, acc))
        )
        slot = _after(jnp.argmin(key, axis=-1).astype(jnp.int32), out)  # [B, Hkv]
        b, hkv = slot.shape
        rb, hb = jnp.arange(b)[:, None], jnp.arange(hkv)[None, :]
        return out[:, None], dataclasses.replace(
            cache,
            kp=kp.at[rb, hb, slot].set(k0.astype(kp.dtype)),
            vp=vp.at[rb, hb, slot].set(v0.astype(vp.dtype)),
            idx=idx.at[rb, hb, slot].set(jnp.broadcast_to(pos[:, None], (b, hkv))),
            acc=acc.at[rb, hb, slot].set(new_sc),
        )


__all__ = [
    "RecycleConfig",
    "RecycledKVCache",
    "SelectedKVCache",
    "HeadMajorKVCache",
    "RecycledAttention",
    "StreamingAttention",
    "H2OAttention",
    "FullCacheAttention",
    "select_top_k",
    "max_pool_scores",
    "streaming_positions",
    "prompt_attention_sums",
]
