"""Influence profiling: E = -A/(1-A) * (G - rowsum(G*A)) against the true loss change, block and
diagonal reductions, chunking invariance and the rule-loss estimators."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moa_jax.config import ModelConfig
from moa_jax.models.attention import Attention
from moa_jax.models.causal_lm import CausalLM, stack_layers
from moa_jax.models.masked_attention import MaskedAttention, chunked_attention
from moa_jax.models.registry import init_random
from moa_jax.pallas_kernels.reference import window_sink_mask
from moa_jax.search.answer_loss import (
    Batch,
    answer_losses,
    answer_nll,
    make_batches,
    row_positions,
)
from moa_jax.search.influence import answer_tap, attention_with_influence
from moa_jax.search.influence_profile import InfluenceProfile
from moa_jax.search.rules import scaled_grid
from moa_jax.search.sensitivity import (
    InfluenceAttention,
    answer_rows,
    influence_dense,
    layer_influence,
    profile_batch,
    profile_items,
)

# The checks call these compiled: eagerly, every op of their loops and vjps dispatches (and
# compiles for its shapes) on its own, several times slower on the CPU.
influence_dense = jax.jit(influence_dense)
layer_influence = jax.jit(
    layer_influence, static_argnames=("sink", "block", "q_chunk", "key_groups")
)

T = 128
ANSWER_START = 100
CFG = ModelConfig(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    pad_token_id=0,
)


@dataclasses.dataclass
class Item:
    tokens: list
    answer_start: int


@functools.partial(jax.tree_util.register_dataclass, data_fields=("bias",), meta_fields=())
@dataclasses.dataclass(frozen=True)
class BiasedAttention(Attention):
    """Dense causal attention plus one layer's additive logit bias [H, T, T]."""

    bias: jax.Array
    layer_uniform = True

    def __call__(self, q, k, v, *, layer, positions, lengths=None):
        b, t, h, d = q.shape
        g = h // k.shape[2]
        k, v = jnp.repeat(k, g, 2), jnp.repeat(v, g, 2)
        logits = jnp.einsum("bqhd,bshd->bhqs", q, k) * d**-0.5 + self.bias[None]
        logits = jnp.where(jnp.tril(jnp.ones((t, t), bool)), logits, -1e30)
        return jnp.einsum("bhqs,bshd->bqhd", jax.nn.softmax(logits, -1), v)


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=("perturbation",), meta_fields=("q_chunk",)
)
@dataclasses.dataclass(frozen=True)
class PerturbedAttention(Attention):
    """Dense causal attention plus one layer's perturbation [B, T, H, D] (zeros) of its output,
    so the loss's gradient with respect to it is that layer's dL/dO; its probe is the
    layer's (q, k, v), to recompute A afterwards."""

    perturbation: jax.Array
    q_chunk: int = 512

    def __call__(self, q, k, v, *, layer, positions, lengths=None):
        out = chunked_attention(q, k, v, positions, q_chunk=self.q_chunk, checkpoint=True)
        return (out.astype(jnp.float32) + self.perturbation).astype(q.dtype)

    def probe(self, q, k, v, *, layer, positions):
        return q, k, v


def answer_grads(model: CausalLM, batch: Batch, *, q_chunk: int = 512):
    """Answer losses [B], dL/dO per layer ([B, N, H, D] each) and (q, k, v) per layer, all in
    memory at once (`profile_batch` reduces them as it goes)."""
    cfg = model.config
    b, n = batch.shape
    tokens, *tgt = batch.arrays()
    zeros = (jnp.zeros((b, n, cfg.num_heads, cfg.head_dim), jnp.float32),) * cfg.num_layers

    def f(perturbations):
        attention = tuple(PerturbedAttention(p, q_chunk) for p in perturbations)
        hidden, qkv = model.hidden_states(tokens, row_positions(b, n), attention=attention)
        per_item = answer_nll(model, hidden, *tgt)
        return per_item.sum(), (per_item, qkv)

    dout, (losses, qkv) = jax.jit(jax.grad(f, has_aux=True))(zeros)
    return np.asarray(losses), dout, qkv


@pytest.fixture(scope="module")
def setup():
    model = init_random(CFG, seed=1)
    graphdef, state = nnx.split(model)
    # Larger weights give peaked attention, so single entries matter.
    state = jax.tree.map(lambda x: x * 3.0 if x.ndim == 2 else x, state)
    model = nnx.merge(graphdef, state)
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, CFG.vocab_size, T).tolist()
    batch = make_batches([Item(tokens, ANSWER_START)], T, 1, 0)[0]
    losses, dout, qkv = answer_grads(model, batch, q_chunk=32)
    return model, tokens, batch, losses, dout, qkv


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _biased_logits(graphdef, state, tokens, biases):
    attention = tuple(BiasedAttention(b) for b in biases)
    return nnx.merge(graphdef, state)(tokens, jnp.arange(T)[None], attention=attention)[0]


def _loss_with_bias(model, tokens, biases):
    logits = _biased_logits(*nnx.split(model), jnp.asarray([tokens]), tuple(biases))
    lp = jax.nn.log_softmax(logits[0], -1)
    pos = np.arange(ANSWER_START - 1, T - 1)
    return float(-lp[pos, np.asarray(tokens)[ANSWER_START:]].mean())


def test_answer_loss_matches_model_forward(setup):
    model, tokens, _, losses, _, _ = setup
    zero = [jnp.zeros((CFG.num_heads, T, T)) for _ in range(CFG.num_layers)]
    assert losses[0] == pytest.approx(_loss_with_bias(model, tokens, zero), rel=1e-5)


def test_influence_predicts_masking_one_entry(setup):
    """Dropping entry (i, j) of a small A_ij and renormalising changes the answer loss by about
    E_ij. The model's loss is non-linear in A (2 layers deep), so the first-order match is
    statistical: most entries within 10%, all within 40%, same sign, correlation near 1."""
    model, tokens, _, _, dout, qkv = setup
    zero = [jnp.zeros((CFG.num_heads, T, T)) for _ in range(CFG.num_layers)]
    base = _loss_with_bias(model, tokens, zero)
    e = [np.asarray(influence_dense(*qkv[layer], dout[layer]))[0] for layer in range(2)]
    a = [_probs(*qkv[layer][:2]) for layer in range(2)]
    rng = np.random.default_rng(3)
    est, true = [], []
    for _ in range(400):
        layer, h = int(rng.integers(2)), int(rng.integers(CFG.num_heads))
        i = int(rng.integers(ANSWER_START - 1, T - 1))
        j = int(rng.integers(1, i + 1))
        # small perturbations only, and |E| well above the float32 noise of a loss difference
        if a[layer][h, i, j] > 0.05 or abs(e[layer][h, i, j]) < 5e-5:
            continue
        biases = list(zero)
        biases[layer] = biases[layer].at[h, i, j].set(-1e9)
        true.append(_loss_with_bias(model, tokens, biases) - base)
        est.append(e[layer][h, i, j])
        if len(est) == 16:
            break
    est, true = np.asarray(est), np.asarray(true)
    assert len(est) >= 10
    rel = np.abs(true - est) / np.abs(est)
    assert np.all(np.sign(true) == np.sign(est))
    assert np.mean(rel < 0.1) >= 0.75, rel
    assert rel.max() < 0.4, rel
    assert np.corrcoef(est, true)[0, 1] > 0.98


def _probs(q, k):
    """Dense causal attention probabilities [H, T, T] of row 0 of the batch."""
    g = q.shape[2] // k.shape[2]
    k = jnp.repeat(k, g, 2)
    logits = jnp.einsum("bqhd,bshd->bhqs", q, k) * q.shape[-1] ** -0.5
    logits = jnp.where(jnp.tril(jnp.ones((T, T), bool)), logits, -1e30)
    return np.asarray(jax.nn.softmax(logits, -1))[0]


def test_influence_exact_when_loss_is_linear_in_attention():
    """With L = sum(W * O), O = A V, the loss is linear in A, and masking + renormalising changes
    A exactly as E assumes: E_ij must equal the true change for any A_ij (the 1/(1-A) factor
    matters here: peaked rows have A_ij near 1)."""
    rng = np.random.default_rng(0)
    n, h, hkv, d = 24, 4, 2, 8
    q = jnp.asarray(rng.normal(size=(1, n, h, d)) * 3, jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, n, hkv, d)) * 3, jnp.float32)
    v = jnp.asarray(rng.normal(size=(1, n, hkv, d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(1, n, h, d)), jnp.float32)
    e = np.asarray(influence_dense(q, k, v, w))[0]
    kk, vv = (
        np.repeat(np.asarray(k, np.float64), 2, 2)[0],
        np.repeat(np.asarray(v, np.float64), 2, 2)[0],
    )
    qq, ww = np.asarray(q, np.float64)[0], np.asarray(w, np.float64)[0]
    a_max = 0.0
    for hh in range(h):
        logits = qq[:, hh] @ kk[:, hh].T / np.sqrt(d)
        logits[np.triu_indices(n, 1)] = -np.inf
        a = np.exp(logits - logits.max(1, keepdims=True))
        a /= a.sum(1, keepdims=True)
        for i in range(1, n):
            for j in range(i + 1):
                if a[i, j] > 0.999:  # 1 - A loses float32 precision (and hits EPS)
                    continue
                a2 = a[i].copy()
                a2[j] = 0
                a2 /= a2.sum()
                true = ww[i, hh] @ (vv[:, hh].T @ (a2 - a[i]))
                assert e[hh, i, j] == pytest.approx(true, rel=2e-3, abs=1e-5), (hh, i, j, a[i, j])
                a_max = max(a_max, a[i, j])
    assert a_max > 0.9  # the check covered strongly peaked rows
    # row 0 has a single key: only the direct term -A*G (dropping it zeroes the output)
    g00 = [ww[0, hh] @ vv[0, hh] for hh in range(h)]
    np.testing.assert_allclose(e[:, 0, 0], -np.asarray(g00), rtol=1e-4)


def test_influence_sign_and_masked_entries(setup):
    _, _, _, _, dout, qkv = setup
    e = np.asarray(influence_dense(*qkv[0], dout[0]))[0]
    assert np.all(np.triu(e, 1) == 0)  # future keys: no influence
    assert np.isfinite(e).all()


def test_block_and_diag_sums_match_dense(setup):
    _, _, _, _, dout, qkv = setup
    q, k, v = qkv[1]
    e = np.abs(np.asarray(influence_dense(q, k, v, dout[1]))[0])  # [H, T, T]
    bl, dg = layer_influence(q, k, v, dout[1], sink=4, block=16, q_chunk=T)
    want_bl = e.reshape(CFG.num_heads, T // 16, 16, T // 16, 16).sum(axis=(2, 4))
    np.testing.assert_allclose(np.asarray(bl), want_bl, rtol=1e-5, atol=1e-9)
    es = e.copy()
    es[..., :4] = 0
    want_dg = np.stack(
        [[np.trace(es[h], offset=-d) for d in range(T)] for h in range(CFG.num_heads)]
    )
    np.testing.assert_allclose(np.asarray(dg), want_dg, rtol=1e-5, atol=1e-9)


def test_chunked_equals_unchunked(setup):
    _, _, _, _, dout, qkv = setup
    q, k, v = qkv[0]
    full = layer_influence(q, k, v, dout[0], sink=16, block=16, q_chunk=T, key_groups=1)
    for qc, groups in ((16, 1), (32, 3), (64, 2), (16, 8)):
        part = layer_influence(q, k, v, dout[0], sink=16, block=16, q_chunk=qc, key_groups=groups)
        for a, b in zip(full, part):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-10)


def test_whole_model_profile_matches_per_layer_influence(setup):
    """profile_batch (one jitted forward + backward, influence from the probes' gradients) gives
    each layer's block and diagonal sums as layer_influence on that layer's own dL/dO."""
    model, _, batch, losses, dout, qkv = setup
    sums = profile_batch(model, batch, sink=16, block=16, q_chunk=32)
    blocks, diag = sums.blocks, sums.diag
    np.testing.assert_allclose(sums.losses, losses, rtol=1e-5)
    assert sums.answer.shape == (CFG.num_layers, CFG.num_heads, 0)
    assert sums.answer_max is None and sums.copy is None
    again = profile_batch(model, batch, sink=16, block=16, q_chunk=32, remat=True, answer=True)
    blocks_r, diag_r, answer = again.blocks, again.diag, again.answer
    rows = np.asarray(answer_rows(jnp.asarray(batch.tgt_pos), jnp.asarray(batch.tgt_w), T))
    assert rows.sum() == (batch.tgt_w > 0).sum() and rows[:, : ANSWER_START - 1].sum() == 0
    np.testing.assert_allclose(np.asarray(blocks_r), np.asarray(blocks), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(np.asarray(diag_r), np.asarray(diag), rtol=1e-5, atol=1e-9)
    for layer in range(CFG.num_layers):
        bl, dg = layer_influence(*qkv[layer], dout[layer], sink=16, block=16, q_chunk=T)
        scale = float(np.abs(np.asarray(bl)).max())
        np.testing.assert_allclose(
            np.asarray(blocks[layer]), np.asarray(bl), rtol=1e-3, atol=1e-5 * scale
        )
        np.testing.assert_allclose(
            np.asarray(diag[layer]), np.asarray(dg), rtol=1e-3, atol=1e-5 * scale
        )
        # the answer rows' diagonal sums, from the dense E of this layer
        e = np.abs(np.asarray(influence_dense(*qkv[layer], dout[layer])))  # [B, H, T, T]
        e = np.einsum("bhij,bi->hij", e, rows)
        e[..., :16] = 0
        want = np.stack(
            [[np.trace(e[hh], offset=-d) for d in range(T)] for hh in range(CFG.num_heads)]
        )
        np.testing.assert_allclose(np.asarray(answer[layer]), want, rtol=1e-3, atol=1e-5 * scale)
        # in the last layer only the answer rows reach the loss; below it the others do too
        ratio = want.sum() / np.asarray(dg).sum()
        assert ratio < 0.999 if layer < CFG.num_layers - 1 else abs(ratio - 1) < 1e-4


@pytest.mark.parametrize(
    "h,hkv,n,qc,groups,dtype",
    [
        (4, 2, 64, 16, 4, jnp.float32),
        (6, 2, 96, 32, 2, jnp.float32),
        (4, 4, 128, 32, 3, jnp.float32),
        (8, 2, 64, 32, 1, jnp.bfloat16),
    ],
)
def test_attention_with_influence_value_and_gradients(h, hkv, n, qc, groups, dtype):
    """Its output and dq/dk/dv equal dense causal attention's (autodiff of the jnp oracle), for
    GQA ratios, chunkings and dtypes; the probes' gradients equal the dense |E| sums."""
    rng = np.random.default_rng(n + h)
    q, k, v, w = (
        jnp.asarray(rng.normal(size=s), dtype)
        for s in ((2, n, h, 16), (2, n, hkv, 16), (2, n, hkv, 16), (2, n, h, 16))
    )

    def ref(q, k, v):
        g = h // hkv
        kk, vv = jnp.repeat(k, g, 2).astype(jnp.float32), jnp.repeat(v, g, 2).astype(jnp.float32)
        lg = jnp.einsum("bqhd,bshd->bhqs", q.astype(jnp.float32), kk) * 16**-0.5
        lg = jnp.where(jnp.tril(jnp.ones((n, n), bool)), lg, -1e30)
        return jnp.einsum("bhqs,bshd->bqhd", jax.nn.softmax(lg, -1), vv)

    probes = (jnp.zeros((h, n // 16, n // 16)), jnp.zeros((h, n)), jnp.zeros((h, n)))
    row_w = jnp.asarray(rng.uniform(size=(2, n)) * (rng.uniform(size=(2, n)) < 0.3), jnp.float32)

    def ours(q, k, v, pb, pd, pa):
        return attention_with_influence(
            q, k, v, pb, pd, jnp.zeros((h, 0)), pa, row_w, 8, 16, qc, groups
        )

    tol = dict(rtol=2e-2, atol=2e-2) if dtype == jnp.bfloat16 else dict(rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(jax.jit(ours)(q, k, v, *probes), np.float32), np.asarray(ref(q, k, v)), **tol
    )
    want = jax.jit(
        jax.grad(lambda *a: jnp.sum(ref(*a) * w.astype(jnp.float32)), argnums=(0, 1, 2))
    )(q, k, v)
    got = jax.jit(
        jax.grad(
            lambda *a: jnp.sum(ours(*a).astype(jnp.float32) * w.astype(jnp.float32)),
            argnums=(0, 1, 2, 3, 4, 5),
        )
    )(q, k, v, *probes)
    for a, b in zip(got[:3], want):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), **tol)
    e = np.abs(
        np.asarray(
            influence_dense(
                q.astype(jnp.float32),
                k.astype(jnp.float32),
                v.astype(jnp.float32),
                w.astype(jnp.float32),
            )
        )
    )
    ew = np.einsum("bhij,bi->hij", e, np.asarray(row_w))
    e = e.sum(0)
    want_bl = e.reshape(h, n // 16, 16, n // 16, 16).sum(axis=(2, 4))
    e[..., :8] = 0
    ew[..., :8] = 0
    want_dg = np.stack([[np.trace(e[hh], offset=-d) for d in range(n)] for hh in range(h)])
    want_an = np.stack([[np.trace(ew[hh], offset=-d) for d in range(n)] for hh in range(h)])
    scale = float(want_bl.max())
    tol = (
        dict(rtol=5e-2, atol=2e-2 * scale)
        if dtype == jnp.bfloat16
        else dict(rtol=1e-4, atol=1e-6 * scale)
    )
    np.testing.assert_allclose(np.asarray(got[3]), want_bl, **tol)
    np.testing.assert_allclose(np.asarray(got[4]), want_dg, **tol)
    np.testing.assert_allclose(np.asarray(got[5]), want_an, **tol)


@pytest.mark.parametrize("qc,groups", [(32, 1), (16, 3)])
def test_window_rule_estimate_is_exact_for_a_loss_linear_in_attention(qc, groups):
    """With L = sum(W * O) the loss is linear in A, so the first-order change of dropping a whole
    window (all rows at once, each renormalised) is the true change: the 'rules' cotangent must
    equal it, for GQA, sinks, windows 1 and beyond the length."""
    rng = np.random.default_rng(7)
    n, h, hkv, d, sink = 64, 4, 2, 8, 4
    windows = (1, 5, 16, 40, 100)
    q = jnp.asarray(rng.normal(size=(2, n, h, d)) * 1.5, jnp.float32)
    k = jnp.asarray(rng.normal(size=(2, n, hkv, d)) * 1.5, jnp.float32)
    v = jnp.asarray(rng.normal(size=(2, n, hkv, d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(2, n, h, d)), jnp.float32)
    probes = (jnp.zeros((h, n // 16, n // 16)), jnp.zeros((h, n)), jnp.zeros((h, len(windows))))
    got = jax.jit(
        jax.grad(
            lambda pr: jnp.sum(
                attention_with_influence(
                    q,
                    k,
                    v,
                    probes[0],
                    probes[1],
                    pr,
                    jnp.zeros((h, 0)),
                    jnp.zeros((2, 0)),
                    sink,
                    16,
                    qc,
                    groups,
                    windows,
                )
                * w
            )
        )
    )(probes[2])
    qq, kk = np.asarray(q, np.float64), np.repeat(np.asarray(k, np.float64), 2, 2)
    vv, ww = np.repeat(np.asarray(v, np.float64), 2, 2), np.asarray(w, np.float64)
    want = np.zeros((h, len(windows)))
    for b in range(2):
        for hh in range(h):
            lg = qq[b, :, hh] @ kk[b, :, hh].T / np.sqrt(d)
            lg[np.triu_indices(n, 1)] = -np.inf
            a = np.exp(lg - lg.max(1, keepdims=True))
            a /= a.sum(1, keepdims=True)
            base = np.einsum("qd,qs,sd->", ww[b, :, hh], a, vv[b, :, hh])
            for r, win in enumerate(windows):
                i, j = np.indices((n, n))
                keep = (j <= i) & ((j < sink) | (i - j < win))
                a2 = np.where(keep, a, 0.0)
                a2 /= a2.sum(1, keepdims=True)
                want[hh, r] += np.einsum("qd,qs,sd->", ww[b, :, hh], a2, vv[b, :, hh]) - base
    assert np.abs(want[:, -1]).max() < 1e-9 and np.abs(want).max() > 1
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-3, atol=2e-3)


def test_window_estimator_ranks_rules_like_the_profile(setup, tmp_path):
    """profile_items with windows: the 'window' estimator reads them back (mean over items),
    survives save/load and merge, and refuses windows it was not profiled with."""
    model, _, batch, _, _, _ = setup
    items = [Item(list(batch.tokens[0]), ANSWER_START)] * 2
    prof = profile_items(
        model, items, T, sink=16, batch_size=1, windows=(16, 64, 200), progress=False
    )
    assert list(prof.windows) == [16, 64]  # windows >= N drop nothing
    est = prof.window_losses(np.array([16, 64, T]), "window")
    np.testing.assert_allclose(est[..., :2], prof.rules / 2)
    assert np.all(est[..., 2] == 0)
    prof.save(tmp_path / "w.npz")
    back = InfluenceProfile.load(tmp_path / "w.npz")
    np.testing.assert_array_equal(back.rules, prof.rules)
    assert back.merge(prof).count == 4
    with pytest.raises(ValueError, match="no rule estimate for window 32"):
        prof.window_losses(np.array([32]), "window")


def test_answer_estimator_reads_the_answer_rows_sums(setup, tmp_path):
    """profile_items(answer=True): the 'answer' estimator is the token estimator on the answer
    rows' diagonal sums (smaller than all rows'); they survive save/load and merge, a profile
    without them refuses the estimator and will not merge with one that has them."""
    model, _, batch, _, _, _ = setup
    items = [Item(list(batch.tokens[0]), ANSWER_START)] * 2
    prof = profile_items(model, items, T, sink=16, batch_size=2, answer=True, progress=False)
    plain = profile_items(model, items, T, sink=16, batch_size=2, progress=False)
    np.testing.assert_allclose(prof.diag, plain.diag, rtol=1e-5, atol=1e-12)
    w = np.array([8, 32, 100, T])
    ans, tok = prof.window_losses(w, "answer"), prof.window_losses(w, "token")
    suffix = np.cumsum(prof.answer[..., ::-1], -1)[..., ::-1] / 2
    np.testing.assert_allclose(ans[..., :3], suffix[..., w[:3]])
    assert np.all(ans[..., 3] == 0) and np.all(ans <= tok + 1e-12) and ans.sum() > 0
    prof.save(tmp_path / "a.npz")
    back = InfluenceProfile.load(tmp_path / "a.npz")
    np.testing.assert_array_equal(back.answer, prof.answer)
    np.testing.assert_allclose(back.merge(prof).answer, 2 * prof.answer)
    with pytest.raises(ValueError, match="no answer-row sums"):
        plain.window_losses(w, "answer")
    with pytest.raises(ValueError, match="sums"):
        plain.merge(prof)


def test_answer_rows_alone_match_the_full_profile(setup, tmp_path):
    """profile_items(token=False): the answer rows' sums from the dense kernel plus the answer
    tap equal those of the every-row pass, with the same losses; such a profile has no token
    sums, refuses the token estimator, survives save/load and merges only with its kind."""
    model, tokens, batch, _, _, _ = setup
    rng = np.random.default_rng(5)
    other = rng.integers(1, CFG.vocab_size, T - 20).tolist()
    items = [
        Item(list(batch.tokens[0]), ANSWER_START),
        Item(other, 70),
        Item(tokens[:64], 40),
    ]  # ragged lengths and answer positions
    full = profile_items(model, items, T, sink=16, batch_size=2, answer=True, progress=False)
    fast = profile_items(
        model, items, T, sink=16, batch_size=2, answer=True, token=False, progress=False
    )
    assert not fast.token and fast.blocks is None and fast.diag is None
    assert fast.count == full.count == 3
    # on GPU / TPU the fast path's attention kernel takes bfloat16 operands
    tol = 1e-3 if jax.default_backend() == "cpu" else 5e-2
    np.testing.assert_allclose(fast.loss_sum, full.loss_sum, rtol=tol / 10)
    scale = np.abs(full.answer).max()
    np.testing.assert_allclose(fast.answer, full.answer, rtol=tol, atol=tol / 100 * scale)
    w = np.array([8, 32, 100])
    np.testing.assert_allclose(
        fast.window_losses(w, "answer"),
        full.window_losses(w, "answer"),
        rtol=tol,
        atol=tol / 100 * scale,
    )
    with pytest.raises(ValueError, match="answer rows' sums only"):
        fast.window_losses(w, "token")
    # 'answer-max': per item the largest dropped answer-row |E|, only from the answer-rows pass
    assert full.answer_max is None and fast.answer_max is not None
    with pytest.raises(ValueError, match="no answer-row maxima"):
        full.window_losses(w, "answer-max")
    mx = fast.window_losses(np.array([1, 8, 32, 100, T]), "answer-max")
    assert np.all(np.diff(mx, axis=-1) <= 1e-12) and np.all(mx[..., -1] == 0) and mx.max() > 0
    assert np.all(mx[..., :4] <= fast.window_losses(np.array([1, 8, 32, 100]), "answer") + 1e-12)
    fast.save(tmp_path / "f.npz")
    back = InfluenceProfile.load(tmp_path / "f.npz")
    assert not back.token
    np.testing.assert_array_equal(back.answer, fast.answer)
    np.testing.assert_array_equal(back.answer_max, fast.answer_max)
    np.testing.assert_array_equal(back.copy, fast.copy)
    assert back.merge(fast).count == 6
    # 'copy': dropped attention on the predicted tokens' earlier places, only from this pass
    cp = fast.window_losses(np.array([0, 1, 8, 32, 100, T]), "copy")
    assert np.all(np.diff(cp, axis=-1) <= 1e-12) and np.all(cp[..., -1] == 0) and cp.max() > 0
    most = max(len(it.tokens) - it.answer_start for it in items)
    assert np.all(cp[..., 0] <= most + 1e-6)  # at most one unit per answer row
    both = fast.window_losses(np.array([T // 2]), "answer-copy")
    ans = fast.window_losses(np.array([T // 2]), "answer")
    np.testing.assert_allclose(both.sum(), 2 * ans.sum(), rtol=1e-9)  # equal totals at N/2
    with pytest.raises(ValueError, match="no copy sums"):
        full.window_losses(w, "copy")
    with pytest.raises(ValueError, match="sums"):
        fast.merge(full)
    with pytest.raises(ValueError, match="needs the token sums, the answer-row sums or both"):
        profile_items(model, items, T, sink=16, token=False, progress=False)


def test_answer_rows_pass_on_the_pallas_kernel():
    """The accelerators' branch of the answer-rows pass (the Pallas kernel with bfloat16
    operands, here in interpret mode) gives the jnp branch's layer output, input gradients and
    answer sums to bfloat16 accuracy."""
    b, n, h, hkv, d = 1, 128, 4, 2, 16
    rng = np.random.default_rng(3)
    q, dout = (jnp.asarray(rng.normal(size=(b, n, h, d)), jnp.float32) for _ in range(2))
    k, v = (jnp.asarray(rng.normal(size=(b, n, hkv, d)), jnp.float32) for _ in range(2))
    rows = jnp.arange(96, 128)[None] - 1
    weights = jnp.ones((b, 32), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, 6, (b, n)))
    targets = jnp.asarray(rng.integers(0, 6, (b, 32)))
    positions = jnp.arange(n)[None]

    def run(kernel):
        att = InfluenceAttention(sink=8, q_chunk=32, answer=True, token=False, kernel=kernel)

        def f(pa, pm, pc, q, k, v):
            layer = att.with_probes((pa, pm, pc), (rows, weights, tokens, targets))
            return layer(q, k, v, layer=0, positions=positions)

        out, vjp = jax.vjp(f, *[jnp.zeros((h, n))] * 3, q, k, v)
        return (out,) + vjp(dout)

    run = jax.jit(run, static_argnums=0)
    for want, got in zip(run("jnp"), run("pallas")):
        assert got.dtype == want.dtype == jnp.float32
        scale = float(jnp.abs(want).max())
        np.testing.assert_allclose(got, want, rtol=3e-2, atol=2e-2 * scale)
    with pytest.raises(ValueError, match="kernel must be"):
        InfluenceAttention(answer=True, token=False, kernel="cudnn")


@pytest.mark.parametrize("sink", [0, 8])
def test_answer_tap_matches_the_every_row_backward(sink):
    """answer_tap: dL/dout passes through, q/k/v get no gradient from it, and its probes'
    cotangents are the answer rows' diagonal sums of attention_with_influence (rows anywhere,
    row 0 included, zero-weight padding), per item the largest |E| at offsets >= d, and the
    rows' attention on keys holding their target token, shared over those keys."""
    b, n, h, hkv, d = 2, 128, 4, 2, 16
    rng = np.random.default_rng(sink)
    q, dout = (jnp.asarray(rng.normal(size=(b, n, h, d)), jnp.float32) for _ in range(2))
    k, v = (jnp.asarray(rng.normal(size=(b, n, hkv, d)), jnp.float32) for _ in range(2))
    rows = jnp.array([[0, 5, 100, 101, 102, 0], [120, 121, 122, 127, 3, 0]])
    weights = jnp.array([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0]], jnp.float32)
    dense_w = jnp.zeros((b, n)).at[jnp.arange(b)[:, None], rows].max(weights)
    tokens = jnp.asarray(rng.integers(0, 7, (b, n)))
    targets = jnp.asarray(rng.integers(0, 7, (b, rows.shape[1])))

    def every_row(pa):
        return attention_with_influence(
            q,
            k,
            v,
            jnp.zeros((h, n // 16, n // 16)),
            jnp.zeros((h, n)),
            jnp.zeros((h, 0)),
            pa,
            dense_w,
            sink,
            16,
            32,
            2,
        )

    want = jax.jit(lambda: jax.vjp(every_row, jnp.zeros((h, n)))[1](dout)[0])()

    def tapped(pa, pm, pc, q, k, v):
        out = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        return answer_tap(out, q, k, v, pa, pm, pc, rows, weights, tokens, targets, sink)

    got, got_max, got_copy, dq, dk, dv = jax.jit(
        lambda: jax.vjp(tapped, *[jnp.zeros((h, n))] * 3, q, k, v)[1](dout)
    )()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * float(jnp.abs(want).max()))
    plain = jax.grad(
        lambda q, k, v: jnp.sum(jax.nn.dot_product_attention(q, k, v, is_causal=True) * dout),
        argnums=(0, 1, 2),
    )
    for x, y in zip((dq, dk, dv), jax.jit(plain)(q, k, v)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    e = np.abs(np.asarray(influence_dense(q, k, v, dout)))  # [B, H, N, N]
    want_max = np.zeros((h, n))
    for offset in range(n):  # per item: max over its rows and keys sink..i-offset
        for bb in range(b):
            best = np.zeros(h)
            for i, w in zip(np.asarray(rows[bb]), np.asarray(weights[bb])):
                if w and i - offset >= sink:
                    best = np.maximum(best, e[bb, :, i, sink : i - offset + 1].max(-1))
            want_max[:, offset] += best
    np.testing.assert_allclose(got_max, want_max, rtol=1e-5, atol=1e-7 * want_max.max())
    assert np.all(np.diff(np.asarray(got_max), axis=-1) <= 1e-7)  # a wider window drops less
    probs = np.asarray(
        jax.nn.softmax(
            jnp.where(
                jnp.tril(jnp.ones((n, n), bool)),
                jnp.einsum("bqhd,bkhd->bhqk", q, jnp.repeat(k, h // hkv, axis=2)) * d**-0.5,
                -1e30,
            ),
            -1,
        )
    )
    want_copy = np.zeros((h, n))
    toks, tgts = np.asarray(tokens), np.asarray(targets)
    for bb in range(b):
        for r, (i, w) in enumerate(zip(np.asarray(rows[bb]), np.asarray(weights[bb]))):
            places = [j for j in range(sink, i + 1) if toks[bb, j] == tgts[bb, r]]
            for j in places:
                want_copy[:, i - j] += w * probs[bb, :, i, j] / len(places)
    assert want_copy.sum() > 0
    np.testing.assert_allclose(got_copy, want_copy, rtol=1e-5, atol=1e-7)


def test_attention_chunk_does_not_change_gradients(setup):
    model, _, batch, losses, dout, _ = setup
    l2, d2, _ = answer_grads(model, batch, q_chunk=T)
    np.testing.assert_allclose(np.asarray(l2), np.asarray(losses), rtol=1e-6)
    for a, b in zip(dout, d2):
        scale = float(np.abs(np.asarray(a)).max())
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-3, atol=1e-4 * scale)


def test_token_estimator_is_exact_masked_sum(setup):
    """window_losses('token') = sum of |E| over exactly the entries window_sink_mask drops."""
    _, _, _, _, dout, qkv = setup
    sink = 16
    e = [np.abs(np.asarray(influence_dense(*qkv[layer], dout[layer]))[0]) for layer in range(2)]
    prof = InfluenceProfile.zeros(CFG.num_layers, CFG.num_heads, T, sink, block=16)
    for layer in range(2):
        bl, dg = layer_influence(*qkv[layer], dout[layer], sink=sink, block=16, q_chunk=32)
        prof.blocks[layer], prof.diag[layer] = np.asarray(bl), np.asarray(dg)
    prof.count = 1
    windows = np.array([1, 16, 40, 64, 100, T])
    est = prof.window_losses(windows, "token")
    pos = jnp.arange(T)[None]
    for r, w in enumerate(windows):
        keep = np.asarray(window_sink_mask(pos, jnp.arange(T), jnp.full((1,), w), sink))[0, 0]
        causal = np.tril(np.ones((T, T), bool))
        dropped = causal & ~keep
        for layer in range(2):
            want = (e[layer] * dropped[None]).sum(axis=(1, 2))
            np.testing.assert_allclose(est[layer, :, r], want, rtol=1e-5, atol=1e-9)
    # block estimator: with block-aligned windows the block form also drops the partial
    # diagonal block the token form keeps, so it is never smaller
    blk = prof.window_losses(windows, "block")
    aligned = windows % 16 == 0
    assert (blk[..., aligned] >= est[..., aligned] - 1e-9).all()
    assert np.all(est[..., -1] == 0) and np.all(blk[..., -1] == 0)


def test_profile_items_accumulates_and_resumes(tmp_path):
    model = init_random(CFG, seed=2)
    rng = np.random.default_rng(1)
    items = [Item(rng.integers(1, 128, n).tolist(), n - 20) for n in (100, 128, 90)]
    full = profile_items(model, items, 128, sink=64, batch_size=2, progress=False)
    assert full.count == 3 and full.diag.shape == (2, 4, 128)
    part = profile_items(model, items[:1], 128, sink=64, batch_size=1, progress=False)
    part.save(tmp_path / "p.npz")
    resumed = profile_items(
        model,
        items,
        128,
        sink=64,
        batch_size=1,
        progress=False,
        profile=InfluenceProfile.load(tmp_path / "p.npz"),
    )
    np.testing.assert_allclose(resumed.diag, full.diag, rtol=1e-4, atol=1e-12)
    assert resumed.loss_sum == pytest.approx(full.loss_sum, rel=1e-5)
    grid = scaled_grid([128])
    est = full.rule_losses(grid)
    assert est.shape == (2, 4, len(grid))
    assert np.all(est[..., grid.dense_index()] == 0)
    # monotone: a rule that keeps more entries at N never has a larger estimate
    w = grid.windows(128)
    order = np.argsort(w)
    assert np.all(np.diff(est[..., order], axis=-1) <= 1e-12)


def test_masked_attention_backend_matches_mask(setup):
    """MaskedAttention with windows = the masked oracle (answer losses through both paths)."""
    model, tokens, batch, losses, _, _ = setup
    dense = answer_losses(model, [batch], MaskedAttention(q_chunk=32))
    np.testing.assert_allclose(dense, np.asarray(losses), rtol=1e-5)
    windows = ((8, 16, 32, 128), (4, 128, 64, 9))
    sinks = ((4, 4, 0, 0), (16, 0, 4, 4))
    got = answer_losses(model, [batch], MaskedAttention(windows, sinks, q_chunk=32))
    biases = []
    for layer in range(2):
        m = np.asarray(
            window_sink_mask(
                jnp.arange(T)[None],
                jnp.arange(T),
                jnp.asarray(windows[layer]),
                jnp.asarray(sinks[layer]),
            )
        )
        biases.append(jnp.where(m[0], 0.0, -1e9))
    want = _loss_with_bias(model, tokens, biases)
    assert got[0] == pytest.approx(want, rel=1e-5)


def test_hidden_states_scan_matches_layer_loop():
    """`CausalLM.hidden_states` with a layer stack (one scanned layer, stacked states) = the
    unrolled layer loop, with and without remat (and the loop with remat)."""
    model = init_random(CFG, seed=3)
    tokens = jnp.asarray(np.random.default_rng(2).integers(1, 128, (2, 64)), jnp.int32)
    pos = row_positions(2, 64)
    want, _ = model.hidden_states(tokens, pos, attention=MaskedAttention())
    for remat, stack in ((False, stack_layers(model)), (True, stack_layers(model)), (True, None)):
        got, _ = model.hidden_states(
            tokens, pos, attention=MaskedAttention(), remat=remat, layer_stack=stack
        )
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_short_last_batch_is_filled_and_compiles_once():
    """A short last batch gets zero-weight rows: one program per length, the same profile."""
    from moa_jax.search import sensitivity as sp

    batches = make_batches([Item([5] * 40, 30)] * 5, 64, 2, pad_id=0, fill=True)
    assert [b.shape for b in batches] == [(2, 64)] * 3 and [b.rows for b in batches] == [2, 2, 1]
    assert batches[-1].tgt_w[1].sum() == 0 and batches[-1].tgt_w[0].sum() == 10
    model = init_random(CFG, seed=4)
    rng = np.random.default_rng(3)
    items = [Item(rng.integers(1, 128, 96).tolist(), 80) for _ in range(3)]
    before = sp._profile_step._cache_size()
    batched = profile_items(
        model, items, 128, sink=16, batch_size=2, windows=(16, 64), progress=False
    )
    assert sp._profile_step._cache_size() == before + 1  # 2 + 1(+1 filler): one shape
    single = profile_items(
        model, items, 128, sink=16, batch_size=1, windows=(16, 64), progress=False
    )
    assert batched.count == single.count == 3
    assert batched.loss_sum == pytest.approx(single.loss_sum, rel=1e-5)
    for a, b in (
        (batched.diag, single.diag),
        (batched.blocks, single.blocks),
        (batched.rules, single.rules),
    ):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-9)
