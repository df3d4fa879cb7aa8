"""Causal attention whose backward pass also yields every head's masking influence.

MoA's influence (METHODS.md): with A one head's attention probabilities and G = dL/dA, masking
entry (i, j) and renormalising row i changes the loss, to first order, by

    E_ij = A_ij / (1 - A_ij) * (rowsum(G * A)_i - G_ij),

with `1 - A` guarded by `EPS`, and only the direct term `-A_ij G_ij` on a row with a single valid
key (row 0). Since O = A V, G = dO V^T and rowsum(G * A) = rowsum(dO * O) (the D term of a flash
attention backward), so E needs nothing the attention backward does not already compute.

`attention_with_influence(q, k, v, probe_blocks, probe_diag)` is dense causal attention (the
probes do not change its value) with a custom VJP: its backward pass computes dq, dk, dv as any
attention backward does, one query chunk at a time, and from the same recomputed A returns as
the probes' cotangents

- blocks [H, N/block, N/block]: |E| summed over block x block tiles (the reference's profile),
- diag [H, N]: |E| summed along each diagonal offset d = i - j over keys j >= sink (the exact
  loss estimate of a sliding window w is sum_{d >= w} diag[d]),

- answer [H, N] (when its probe is not empty): `diag` restricted to the rows with a non-zero
  `row_weights` [B, N] (the rows that predict the answer tokens), each row's |E| times its
  weight. The summed |E| of all rows is dominated by the document rows, whose far entries
  reach the loss only through later layers; the answer rows' far entries are where a head
  retrieves for the answer (docs/results.md: this ranks the measured retrieval heads better),

and, given candidate windows w_1..w_R (`windows`),

- rules [H, R]: the first-order loss change of dropping, in every row at once, all keys a window
  w_r drops (sink <= j <= i - w_r) with the row renormalised. With s_i the dropped probability
  mass of row i and g_i = sum over the dropped keys of G * A, it is
  `sum_i (rowsum(G * A)_i * s_i - g_i) / (1 - s_i)` (signed and exact to first order for the
  whole rule, where summing |E| over single entries adds up their noise),

all summed over the batch. So `jax.grad` of a model's answer loss with respect to zero probes
in every layer gives every layer's and head's influence from one jitted forward + backward
(`moa_jax.search.sensitivity.profile_batch`), with memory O(B x H x q_chunk x N) per layer at a
time: no N x N matrix is ever stored.

Causal skipping: query chunks are split into `key_groups` consecutive groups, one `lax.scan`
each, group g reading keys up to its last query (work ~ (G+1)/(2G) of dense instead of 1).

Public API:
  EPS
  influence_rows(q, k, v, dout, q0) -> E [B, H, Tq, S]        (the formula, dense in keys)
  diag_sums(x, q0) -> [h, S]
  attention_with_influence(q, k, v, probe_blocks, probe_diag, probe_rules, probe_answer,
                           row_weights, sink, block, q_chunk, key_groups, windows)
                           -> out [B, N, H, D]
  answer_influence(q, k, v, dout, rows, weights, tokens, targets, sink)
                           -> (answer, answer_max, copy [H, N])   (the answer rows alone)
  answer_tap(out, q, k, v, probe_answer, probe_max, probe_copy, rows, weights, tokens,
             targets, sink) -> out (identity; the probes' cotangents are answer_influence)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

EPS = 1e-6
_NEG = -1e30
_F32 = jnp.float32


def _grouped(x: jax.Array, hkv: int) -> jax.Array:
    """[B, T, H, D] -> [B, T, Hkv, G, D] (query head h = kv * G + g reads KV head kv)."""
    b, t, h, d = x.shape
    return x.reshape(b, t, hkv, h // hkv, d)


def _scores(q, k):
    """q [B, Tq, H, D], k [B, S, Hkv, D] -> [B, H, Tq, S] (float32, no scaling)."""
    b, tq, h, _ = q.shape
    hkv = k.shape[2]
    s = jnp.einsum("bqkgd,bskd->bkgqs", _grouped(q, hkv).astype(_F32), k.astype(_F32))
    return s.reshape(b, h, tq, k.shape[1])


def influence_rows(
    q: jax.Array, k: jax.Array, v: jax.Array, dout: jax.Array, q0: int | jax.Array
) -> jax.Array:
    """E for query rows [q0, q0 + Tq) over keys [0, S), causal.

    q, dout [B, Tq, H, D]; k, v [B, S, Hkv, D]. Returns E float32 [B, H, Tq, S] (zero on masked
    entries).
    """
    a, g = _probs_and_grads(q, k, v, dout, q0)
    return _influence(a, g, jnp.sum(g * a, axis=-1, keepdims=True), q0)


def _probs(q, k, q0):
    """A [B, H, Tq, S] for rows [q0, q0 + Tq) over keys [0, S), causal (zero above)."""
    tq, s = q.shape[1], k.shape[1]
    logits = _scores(q, k) * q.shape[-1] ** -0.5
    mask = jnp.arange(s)[None, :] <= q0 + jnp.arange(tq)[:, None]
    a = jax.nn.softmax(jnp.where(mask, logits, _NEG), axis=-1)
    return jnp.where(mask, a, 0.0)


def _probs_and_grads(q, k, v, dout, q0):
    """(A, G = dO V^T) for rows [q0, q0 + Tq) over keys [0, S)."""
    return _probs(q, k, q0), _scores(dout, v)


def _influence(a, g, rs, q0):
    tq = a.shape[2]
    e = a / jnp.maximum(1.0 - a, EPS) * (rs - g)
    single = (q0 + jnp.arange(tq) == 0)[None, None, :, None]  # only row 0 has one key
    return jnp.where(single, -a * g, e)


def diag_sums(x: jax.Array, q0: int) -> jax.Array:
    """x [h, Tq, S], rows [q0, q0 + Tq) of an S-wide matrix with S = q0 + Tq and zeros for
    j > i -> [h, S] with out[d] = sum_r x[r, q0 + r - d] (sums along each diagonal offset).

    Also right for any q0' <= S - Tq (more zeros): read the result shifted by S - Tq - q0'.
    """
    h, tq, s = x.shape
    r = jnp.flip(x, axis=-1)  # r[., t, c] = x[., t, s-1-c]
    r = jnp.pad(r, ((0, 0), (0, 0), (0, 1))).reshape(h, tq * (s + 1))
    y = r[:, tq - 1 : tq - 1 + tq * s].reshape(h, tq, s)  # y[., t, d] = x[., t, q0+t-d]
    return y.sum(axis=1)


def _groups(n_chunks: int, key_groups: int) -> list[tuple[int, int]]:
    g = max(1, min(int(key_groups), n_chunks))
    bounds = [round(i * n_chunks / g) for i in range(g + 1)]
    return [(c0, c1) for c0, c1 in zip(bounds[:-1], bounds[1:]) if c1 > c0]


def _forward(q, k, v, q_chunk, key_groups):
    b, n, h, d = q.shape
    outs = []
    for c0, c1 in _groups(n // q_chunk, key_groups):
        kend = c1 * q_chunk
        kc, vc = k[:, :kend], v[:, :kend]
        qs = q[:, c0 * q_chunk : kend].reshape(b, c1 - c0, q_chunk, h, d).swapaxes(0, 1)

        def step(_, xs, kc=kc, vc=vc):
            qi, q0 = xs
            a = _probs(qi, kc, q0)
            bb, hh, tq, s = a.shape
            hkv = vc.shape[2]
            o = jnp.einsum(
                "bkgqs,bskd->bqkgd", a.reshape(bb, hkv, hh // hkv, tq, s), vc.astype(_F32)
            )
            return None, o.reshape(bb, tq, hh, d).astype(q.dtype)

        starts = jnp.arange(c0, c1, dtype=jnp.int32) * q_chunk
        _, o = jax.lax.scan(step, None, (qs, starts))
        outs.append(o.swapaxes(0, 1).reshape(b, (c1 - c0) * q_chunk, h, d))
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10, 11, 12))
def attention_with_influence(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    probe_blocks: jax.Array,
    probe_diag: jax.Array,
    probe_rules: jax.Array,
    probe_answer: jax.Array,
    row_weights: jax.Array,
    sink: int,
    block: int,
    q_chunk: int,
    key_groups: int = 4,
    windows: tuple[int, ...] = (),
) -> jax.Array:
    """Dense causal attention; the probes' cotangents are the layer's influence sums.

    Args:
      q [B, N, H, D]; k, v [B, N, Hkv, D] (after RoPE; positions [0, N)).
      probe_blocks float32 [H, N/block, N/block], probe_diag float32 [H, N], probe_rules float32
        [H, len(windows)], probe_answer float32 [H, N] or [H, 0]: zeros; they do not change
        the output, their gradients are the block and diagonal sums of |E|, the windows' loss
        changes and the answer rows' diagonal sums (not computed when the probe is [H, 0]).
      row_weights float32 [B, N] (or [B, 0] without the answer probe): each row's weight in
        the answer sums (its gradient is zero).
      sink: keys j < sink are left out of the diagonal sums (every rule keeps them).
      block: tile edge of the block sums; N and q_chunk must be multiples of it.
      q_chunk: query rows per step (memory ~ B x H x q_chunk x N floats a few times).
      key_groups: causal skipping groups (see module docstring).
      windows: candidate windows (tokens, sinks excluded) of the rules estimate.
    Returns:
      out [B, N, H, D] in q's dtype.
    """
    del probe_blocks, probe_diag, probe_rules, probe_answer, row_weights
    return _forward(q, k, v, q_chunk, key_groups)


def _rule_changes(a, g, rs, q0, sink, windows):
    """[H, R] first-order loss change of each window (module docstring), summed over rows and
    the batch. a, g [B, H, C, S]; rs [B, H, C, 1].

    Written with the kept mass k_i = 1 - s_i and kept k'_i = rowsum(G * A)_i - g_i as
    k'_i / k_i - rowsum(G * A)_i, both summed from the kept side (a prefix for the sinks, a
    suffix for the band up to the diagonal), so that float32 keeps its accuracy when a window
    drops almost all of a row's mass.
    """
    b, h, c, s = a.shape
    ga = g * a

    def prefix(x):  # sum over the sink keys [0, sink)
        return jnp.sum(x[..., :sink], axis=-1, keepdims=True) if sink > 0 else 0.0

    def suffixes(x):  # [.., j] = sum over keys >= j (zero past the diagonal)
        return jnp.flip(jnp.cumsum(jnp.flip(x, -1), axis=-1), -1)

    last = (q0 + jnp.arange(c))[:, None] - jnp.asarray(windows, jnp.int32)[None, :]  # [C, R]
    valid = (last >= sink)[None, None]
    idx = jnp.broadcast_to(jnp.clip(last + 1, 0, s - 1)[None, None], (b, h, c, len(windows)))
    kept_a = prefix(a) + jnp.take_along_axis(suffixes(a), idx, axis=-1)
    kept_ga = prefix(ga) + jnp.take_along_axis(suffixes(ga), idx, axis=-1)
    change = kept_ga / jnp.maximum(kept_a, EPS) - rs
    return jnp.where(valid, change, 0.0).sum(axis=(0, 2))


def _fwd(
    q,
    k,
    v,
    probe_blocks,
    probe_diag,
    probe_rules,
    probe_answer,
    row_weights,
    sink,
    block,
    q_chunk,
    key_groups,
    windows,
):
    n = q.shape[1]
    if n % q_chunk or q_chunk % block:
        raise ValueError(
            f"length {n} must be a multiple of q_chunk {q_chunk}, itself a "
            f"multiple of block {block}"
        )
    answer = probe_answer.shape[-1] > 0
    if answer and row_weights.shape != q.shape[:2]:
        raise ValueError(f"row_weights must be [B, N] = {q.shape[:2]}, got {row_weights.shape}")
    out = _forward(q, k, v, q_chunk, key_groups)
    # the probe (zeros, [H, 0] when off) travels along so that the backward sees its shape
    return out, (q, k, v, out, row_weights, probe_answer)


def _diag_of_chunk(ea, q0, kend, q_chunk, n):
    """[H, N] diagonal sums of a chunk ea [H, C, kend] of rows [q0, q0 + C)."""
    # diag_sums reads the chunk as rows [kend - C, kend); ours start at q0 <= that
    shifted = jnp.pad(diag_sums(ea, kend - q_chunk), ((0, 0), (0, kend)))
    dg = jax.lax.dynamic_slice_in_dim(shifted, kend - q_chunk - q0, kend, axis=1)
    return jnp.pad(dg, ((0, 0), (0, n - kend)))


def _bwd(sink, block, q_chunk, key_groups, windows, res, dout):
    q, k, v, out, row_weights, probe_answer = res
    answer = probe_answer.shape[-1] > 0
    b, n, h, d = q.shape
    hkv = k.shape[2]
    nb, qb = n // block, q_chunk // block
    scale = d**-0.5
    dq_parts, bl_parts = [], []
    dk = jnp.zeros(k.shape, _F32)
    dv = jnp.zeros(v.shape, _F32)
    diag = jnp.zeros((h, n), _F32)
    rules = jnp.zeros((h, len(windows)), _F32)
    ans = jnp.zeros((h, n if answer else 0), _F32)
    for c0, c1 in _groups(n // q_chunk, key_groups):
        kend = c1 * q_chunk
        kc, vc = k[:, :kend], v[:, :kend]

        def chunked(x):
            x = x[:, c0 * q_chunk : kend]
            return x.reshape(b, c1 - c0, q_chunk, *x.shape[2:]).swapaxes(0, 1)

        def step(carry, xs, kc=kc, vc=vc, kend=kend):
            dk_acc, dv_acc, dg_acc, rl_acc, an_acc = carry
            qi, doi, oi, rwi, q0 = xs
            a, g = _probs_and_grads(qi, kc, vc, doi, q0)
            # rowsum(G * A) = dO . O exactly (O = A V)
            rs = jnp.einsum("bqhd,bqhd->bhq", doi.astype(_F32), oi.astype(_F32))[..., None]
            ds = a * (g - rs)  # dL/dlogits [B, H, C, S]
            dsg = ds.reshape(b, hkv, h // hkv, q_chunk, kend)
            dqi = jnp.einsum("bkgqs,bskd->bqkgd", dsg, kc.astype(_F32)) * scale
            dk_acc = (
                dk_acc
                + jnp.einsum("bkgqs,bqkgd->bskd", dsg, _grouped(qi, hkv).astype(_F32)) * scale
            )
            dv_acc = dv_acc + jnp.einsum(
                "bkgqs,bqkgd->bskd",
                a.reshape(b, hkv, h // hkv, q_chunk, kend),
                _grouped(doi, hkv).astype(_F32),
            )
            if windows:
                rl_acc = rl_acc + _rule_changes(a, g, rs, q0, sink, windows)
            eb = jnp.abs(_influence(a, g, rs, q0))  # [B, H, C, S]
            ea = eb.sum(axis=0)
            bl = ea.reshape(h, qb, block, kend // block, block).sum(axis=(2, 4))
            bl = jnp.pad(bl, ((0, 0), (0, 0), (0, nb - kend // block)))
            nonsink = jnp.arange(kend)[None, None, :] >= sink
            if sink > 0:
                ea = jnp.where(nonsink, ea, 0.0)
            dg_acc = dg_acc + _diag_of_chunk(ea, q0, kend, q_chunk, n)
            if answer:
                ew = jnp.einsum("bhcs,bc->hcs", eb, rwi)
                if sink > 0:
                    ew = jnp.where(nonsink, ew, 0.0)
                an_acc = an_acc + _diag_of_chunk(ew, q0, kend, q_chunk, n)
            return (dk_acc, dv_acc, dg_acc, rl_acc, an_acc), (dqi.reshape(b, q_chunk, h, d), bl)

        starts = jnp.arange(c0, c1, dtype=jnp.int32) * q_chunk
        (dkc, dvc, diag, rules, ans), (dqs, bls) = jax.lax.scan(
            step,
            (jnp.zeros(kc.shape, _F32), jnp.zeros(vc.shape, _F32), diag, rules, ans),
            (
                chunked(q),
                chunked(dout),
                chunked(out),
                chunked(row_weights.astype(_F32)) if answer else None,
                starts,
            ),
        )
        dk = dk.at[:, :kend].add(dkc)
        dv = dv.at[:, :kend].add(dvc)
        dq_parts.append(dqs.swapaxes(0, 1).reshape(b, (c1 - c0) * q_chunk, h, d))
        bl_parts.append(bls.transpose(1, 0, 2, 3).reshape(h, (c1 - c0) * qb, nb))
    dq = jnp.concatenate(dq_parts, axis=1)
    blocks = jnp.concatenate(bl_parts, axis=1)
    drw = jnp.zeros_like(row_weights)
    return (
        dq.astype(q.dtype),
        dk.astype(k.dtype),
        dv.astype(v.dtype),
        blocks,
        diag,
        rules,
        ans,
        drw,
    )


attention_with_influence.defvjp(_fwd, _bwd)


# ----------------------------------------------------------------------------- answer rows only
def answer_influence(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    dout: jax.Array,
    rows: jax.Array,
    weights: jax.Array,
    tokens: jax.Array,
    targets: jax.Array,
    sink: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The answer rows' influence of one layer, from those rows alone, and their copy mass.

    q, dout [B, N, H, D]; k, v [B, N, Hkv, D]; rows int [B, A]: the rows that predict the
    answer tokens (any positions; padding rows have weight 0); weights float [B, A]; tokens
    int [B, N]: the items' tokens; targets int [B, A]: the token each row predicts.
    Returns, over the keys j >= sink and by diagonal offset d = i - j,
      answer float32 [H, N]: each row's |E| times its weight summed over the rows and the
        batch (the `answer` probe of `attention_with_influence`);
      answer_max float32 [H, N]: per item the largest weighted |E| at any offset >= d in any
        of its rows, summed over the batch: at d = w, the largest single entry that a window
        w drops (the 'answer-max' estimator);
      copy float32 [H, N]: the attention probability each row puts on keys that hold the
        token it predicts, divided by the number of such keys (<= the row) and times the row's
        weight, summed over the rows and the batch (the 'copy' estimators: a head that
        fetches the answer from the context attends to where the answer's tokens stand, which
        a first-order estimate misses when the model is sure of the answer).

    Work and memory are O(B x H x A x N): the answer rows' probabilities are recomputed here,
    so the attention itself can be any kernel (`answer_tap`); rowsum(G * A) comes from the
    recomputed float32 A and G, not from that kernel's output.
    """
    n, d = q.shape[1], q.shape[3]
    take = functools.partial(jnp.take_along_axis, indices=rows[:, :, None, None], axis=1)
    qa, da = take(q), take(dout)  # [B, A, H, D]
    logits = _scores(qa, k) * d**-0.5  # [B, H, A, N]
    keys = jnp.arange(n)
    mask = (keys[None, None, :] <= rows[:, :, None])[:, None]  # [B, 1, A, N]
    a = jnp.where(mask, jax.nn.softmax(jnp.where(mask, logits, _NEG), axis=-1), 0.0)
    g = _scores(da, v)
    rs = jnp.sum(g * a, axis=-1, keepdims=True)
    e = a / jnp.maximum(1.0 - a, EPS) * (rs - g)
    e = jnp.where((rows == 0)[:, None, :, None], -a * g, e)  # a single valid key
    w = weights.astype(_F32)[:, None, :, None]
    ew = jnp.where(keys >= sink, jnp.abs(e), 0.0) * w
    # a row's copy mass is split over the keys that hold its token: a match with a token that
    # stands once in the context is evidence of retrieval, one with a frequent token is not
    same = (tokens[:, None, :] == targets[:, :, None]) & (keys >= sink) & mask[:, 0]  # [B, A, N]
    share = 1.0 / jnp.maximum(same.sum(axis=-1), 1).astype(_F32)  # [B, A]
    cw = jnp.where(same[:, None], a, 0.0) * (w * share[:, None, :, None])
    # by offset: per_offset[b, h, r, d] = ew[b, h, r, rows[b, r] - d]
    j = rows[:, :, None] - keys[None, None, :]  # [B, A, N] key of offset d

    def by_offset(x):
        x = jnp.take_along_axis(x, jnp.clip(j, 0, n - 1)[:, None], axis=-1)
        return jnp.where((j >= 0)[:, None], x, 0.0)

    per_offset = by_offset(ew)
    answer = per_offset.sum(axis=(0, 2))
    answer_max = jax.lax.cummax(per_offset.max(axis=2), axis=2, reverse=True).sum(axis=0)
    return answer, answer_max, by_offset(cw).sum(axis=(0, 2))


@functools.partial(jax.custom_vjp, nondiff_argnums=(11,))
def answer_tap(
    out: jax.Array,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    probe_answer: jax.Array,
    probe_max: jax.Array,
    probe_copy: jax.Array,
    rows: jax.Array,
    weights: jax.Array,
    tokens: jax.Array,
    targets: jax.Array,
    sink: int,
) -> jax.Array:
    """Identity on an attention output out [B, N, H, D] computed from q, k, v by any exact
    causal attention; in the backward pass dL/dout passes through unchanged and the probes'
    cotangents (probe_answer, probe_max, probe_copy [H, N], zeros) are `answer_influence` of
    the answer rows. q, k, v, rows, weights, tokens and targets get no gradient from here.

    With the answer rows only (the 'answer' estimators) the attention and its backward can be
    the fastest kernel at hand instead of `attention_with_influence`'s chunked jnp pass over
    every row: the influence costs O(A x N) per head instead of O(N^2).
    """
    del q, k, v, probe_answer, probe_max, probe_copy, rows, weights, tokens, targets
    return out


def _tap_fwd(
    out, q, k, v, probe_answer, probe_max, probe_copy, rows, weights, tokens, targets, sink
):
    return out, (q, k, v, rows, weights, tokens, targets)


def _tap_bwd(sink, res, dout):
    q, k, v, rows, weights, tokens, targets = res
    sums = answer_influence(q, k, v, dout, rows, weights, tokens, targets, sink)

    def no_grad(x):
        return np.zeros(x.shape, jax.dtypes.float0)

    return (
        dout,
        jnp.zeros_like(q),
        jnp.zeros_like(k),
        jnp.zeros_like(v),
        *sums,
        no_grad(rows),
        jnp.zeros_like(weights),
        no_grad(tokens),
        no_grad(targets),
    )


answer_tap.defvjp(_tap_fwd, _tap_bwd)
