"""TPU prefill: jax's splash attention driven with per-head window + sink masks.

Splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`, Mosaic TPU) takes one mask
per head and builds block-sparse tables from it. With several distinct masks in one call it
stops shrinking its grid and loads partial-block masks from memory (DESIGN.md), so heads are
grouped by equal (window, sink) and splash is called once per group, each with a single
*computable* mask (`WindowSinkMask`) that it evaluates inside the kernel from iotas:

    (kv <= q) & ((q - kv < window) | (kv < sink)) & (kv < kv_len),   q = row + q_offset.

MoA plans have at most two rules per layer, so this is at most two calls per layer.

GQA: a group whose query heads all read one KV head runs splash's MQA form (K/V not copied);
otherwise the group's K/V heads are gathered (a copy of Hg x S x D, since splash's MHA form takes
one K/V per query head). Per-row padding (`kv_lengths`) uses splash's segment ids (padding keys get
another segment). Rows that see no key at all (only possible with padding) are zeroed here with
lse -inf, as in the oracle. The log-sum-exp comes from splash's residuals and is not differentiable
(the output is: splash's own backward kernels, on the same block-sparse tables); a call with
`return_lse=True` runs splash with residuals, which splash does not differentiate.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from moa_jax.pallas_kernels.prefill.block_tables import cdiv, head_groups
from moa_jax.pallas_kernels.reference import visible

try:
    from jax.experimental.pallas.ops.tpu import splash_attention as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as _sm

    _Computable = getattr(_sm, "_ComputableMask", None)
except ImportError:  # pragma: no cover
    splash = None
    _sm = None
    _Computable = None


def _window_sink_fn(q_ids, kv_ids, *, window, sink, q_offset, kv_len):
    q = q_ids + q_offset if q_offset else q_ids
    return visible(q, kv_ids, window, sink) & (kv_ids < kv_len)


if _Computable is not None:

    class WindowSinkMask(_Computable):
        """Causal sliding window of `window` tokens plus `sink` initial tokens, computed
        in-kernel."""

        def __init__(
            self,
            shape,
            window: int,
            sink: int,
            q_offset: int = 0,
            kv_len: int | None = None,
            shard_count: int = 1,
        ):
            self.window, self.sink, self.q_offset = int(window), int(sink), int(q_offset)
            self.kv_len = int(shape[1] if kv_len is None else kv_len)
            fn = functools.partial(
                _window_sink_fn,
                window=self.window,
                sink=self.sink,
                q_offset=self.q_offset,
                kv_len=self.kv_len,
            )
            super().__init__(shape=shape, mask_function=fn, shard_count=shard_count)

        def __eq__(self, other):
            return (
                type(self) is type(other)
                and self.shape == other.shape
                and (self.window, self.sink, self.q_offset, self.kv_len)
                == (other.window, other.sink, other.q_offset, other.kv_len)
            )

        def __hash__(self):
            return hash(
                (type(self), self.shape, self.window, self.sink, self.q_offset, self.kv_len)
            )
else:  # pragma: no cover
    WindowSinkMask = None


def _make_mask(shape, window, sink, q_offset, kv_len):
    if WindowSinkMask is not None:
        return WindowSinkMask(shape, window, sink, q_offset, kv_len)
    # Fallback for splash versions without computable masks: a materialised numpy mask.
    rows = np.arange(shape[0])[:, None]
    cols = np.arange(shape[1])[None, :]
    return splash.NumpyMask(
        _window_sink_fn(rows, cols, window=window, sink=sink, q_offset=q_offset, kv_len=kv_len)
    )


@functools.lru_cache(maxsize=64)
def _kernel(
    tp, sp, window, sink, q_offset, kv_len, nheads, mqa, block_q, block_k, save_res, interpret
):
    mask = _make_mask((tp, sp), window, sink, q_offset, kv_len)
    mh = splash.MultiHeadMask(tuple(mask for _ in range(nheads)))
    bs = splash.BlockSizes(
        block_q=block_q,
        block_kv=block_k,
        block_kv_compute=block_k,
        block_q_dkv=block_q,
        block_kv_dkv=block_k,
        block_kv_dkv_compute=block_k,
        block_q_dq=block_q,
        block_kv_dq=block_k,
    )
    make = splash.make_splash_mqa_single_device if mqa else splash.make_splash_mha_single_device
    return make(mask=mh, block_sizes=bs, save_residuals=save_res, interpret=interpret)


def _prescale(q, k, scale: float, exact: bool):
    """Splash takes q pre-scaled. In bf16 (or f16) a scale that is not a power of two (head_dim
    128: 128 ** -0.5) rounds q * scale, which moves the logits by ~1e-3 relative and the lse by
    ~1e-2. With `exact`, q * scale is split into a rounded part and its rounding error, both in
    q's dtype, and the head dimension doubled ([hi, lo] . [k, k] = hi . k + lo . k): the logits
    are then exact to ~2^-16 for one more pass over K. Returns (q', k') for splash.
    """
    if q.dtype == jnp.float32 or not exact or math.frexp(scale)[0] == 0.5:
        return (q.astype(jnp.float32) * scale).astype(q.dtype), k
    qf = q.astype(jnp.float32) * scale
    hi = qf.astype(q.dtype)
    lo = (qf - hi.astype(jnp.float32)).astype(q.dtype)
    return jnp.concatenate([hi, lo], axis=-1), jnp.concatenate([k, k], axis=-1)


def sparse_attention_tpu(
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
    interpret=False,
    return_lse=True,
):
    """Splash-attention per-head windows + sinks. Returns (out [B,T,H,D], lse [B,H,T] or None)."""
    if splash is None:  # pragma: no cover
        raise RuntimeError("jax.experimental.pallas.ops.tpu.splash_attention is unavailable")
    B, T, H, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    g = H // Hkv
    scale = float(D**-0.5 if scale is None else scale)
    Tp = cdiv(T, block_q) * block_q
    Sp = cdiv(S, block_k) * block_k
    qs, k = _prescale(q, k, scale, exact=return_lse)
    qs = jnp.pad(qs, ((0, 0), (0, Tp - T), (0, 0), (0, 0)))
    kp = jnp.pad(k, ((0, 0), (0, Sp - S), (0, 0), (0, 0)))
    vp = jnp.pad(v, ((0, 0), (0, Sp - S), (0, 0), (0, 0)))
    seg = None
    if kv_lengths is not None:
        kvl = jnp.asarray(kv_lengths, jnp.int32)
        kv_seg = (jnp.arange(Sp)[None, :] >= kvl[:, None]).astype(jnp.int32)  # [B, Sp]
        q_seg = jnp.zeros((B, Tp), jnp.int32)
    out = jnp.zeros((B, Tp, H, D), q.dtype)
    lse = jnp.full((B, H, Tp), -jnp.inf, jnp.float32)
    for (w, s), heads in head_groups(windows, sinks).items():
        heads = np.asarray(heads)
        kv_heads = np.unique(heads // g)
        mqa = len(kv_heads) == 1
        kern = _kernel(
            Tp,
            Sp,
            min(int(w), Sp + Tp + q_offset),
            int(s),
            int(q_offset),
            S,
            len(heads),
            mqa,
            block_q,
            block_k,
            bool(return_lse),
            bool(interpret),
        )
        qh = jnp.moveaxis(qs[:, :, heads], 2, 1)  # [B, Hg, Tp, D]
        if mqa:
            kh, vh = kp[:, :, kv_heads[0]], vp[:, :, kv_heads[0]]  # [B, Sp, D]
        else:
            kh = jnp.moveaxis(kp[:, :, heads // g], 2, 1)  # [B, Hg, Sp, D]
            vh = jnp.moveaxis(vp[:, :, heads // g], 2, 1)
        if kv_lengths is None:
            res = jax.vmap(kern)(qh, kh, vh)
        else:
            seg = splash.SegmentIds(q=q_seg, kv=kv_seg)
            res = jax.vmap(lambda a, b_, c, sg: kern(a, b_, c, segment_ids=sg))(qh, kh, vh, seg)
        o = res[0] if return_lse else res
        out = out.at[:, :, heads].set(jnp.moveaxis(o, 1, 2).astype(q.dtype))
        if return_lse:
            lse = lse.at[:, heads].set(res[1][0].astype(jnp.float32))
    out, lse = out[:, :T], lse[:, :, :T]
    if kv_lengths is not None:
        # Rows with no visible key: the last visible candidate is min(i, kv_len - 1).
        i = q_offset + jnp.arange(T)[None, None, :]
        last = jnp.minimum(i, jnp.asarray(kv_lengths)[:, None, None] - 1)
        w = jnp.asarray(windows)[None, :, None]
        s = jnp.asarray(sinks)[None, :, None]
        ok = (last >= 0) & ((i - last < w) | (s > 0))
        out = jnp.where(jnp.moveaxis(ok, 1, 2)[..., None], out, 0).astype(q.dtype)
        lse = jnp.where(ok, lse, -jnp.inf)
    return out, (lse if return_lse else None)
