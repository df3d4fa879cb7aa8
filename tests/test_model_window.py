"""The model's own sliding window (Mistral, Qwen2 with `use_sliding_window`) composes with every
method and every cache and is never widened: tiny random windowed models against HF
transformers (eager attention, float32), plans composed with the window
(`Plan.within_model_window`), the head-major decode kernels' `window` argument against the jnp
reference, and the refusals (a backend that ignores the window, the profile)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moa_jax.config import ModelConfig
from moa_jax.methods import AttentionConfig, RecycledOptions, build_attention
from moa_jax.models.attention import DenseAttention
from moa_jax.models.masked_attention import MaskedAttention
from moa_jax.models.moa_attention import MoAAttention
from moa_jax.pallas_kernels import full_step_decode, recycled_decode
from moa_jax.pallas_kernels.reference import head_major_decode_reference, window_sink_mask
from moa_jax.plan import Plan

from conftest import tiny_config

W = 8  # the model's window
SEQ = 32  # 4 x the window
PROMPT = 20  # > the window
NEW = 24


def _config(family: str) -> ModelConfig:
    extra = dict(qkv_bias=True, window_layers=(1,)) if family == "qwen2" else {}
    return tiny_config(
        vocab_size=96,
        max_position_embeddings=256,
        eos_token_ids=(),
        family=family,
        sliding_window=W,
        **extra,
    )


FAMILIES = ("mistral", "qwen2")


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory):
    """(our model, the HF model loaded from its `save_hf` checkpoint, eager attention)."""
    import torch
    import transformers

    from moa_jax.models.hf_weights import save_hf
    from moa_jax.models.registry import init_random

    cfg = _config(request.param)
    model = init_random(cfg, seed=3)
    # non-trivial norms and biases, so that a mis-mapped tensor shows
    from flax import nnx

    graphdef, state = nnx.split(model)
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    leaves = [
        x + 0.05 * jax.random.normal(k, x.shape, x.dtype) if x.ndim == 1 else x
        for x, k in zip(leaves, keys)
    ]
    model = nnx.merge(graphdef, jax.tree.unflatten(tree, leaves))
    out = tmp_path_factory.mktemp(f"hf-{request.param}")
    save_hf(model, out)
    cls = {
        "mistral": transformers.MistralForCausalLM,
        "qwen2": transformers.Qwen2ForCausalLM,
    }[request.param]
    hf = cls.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    hf.generation_config.eos_token_id = None
    return model, hf


def _tokens(seed: int = 0, t: int = SEQ, b: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, 96, size=(b, t)).astype(np.int32)


def _hf_logits(hf, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return hf(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()


def _close(ours, ref, rtol=1e-5):
    ours, ref = np.asarray(ours), np.asarray(ref)
    scale = np.abs(ref).max()
    np.testing.assert_allclose(ours, ref, rtol=0, atol=rtol * scale)


def _run(model, attention, tokens, start=0, cache=None, mode="stateless"):
    """The jitted forward (`causal_lm.forward`) over tokens at positions start.."""
    from flax import nnx

    from moa_jax.models.causal_lm import forward

    t = jnp.asarray(tokens)
    pos = start + jnp.broadcast_to(jnp.arange(t.shape[1], dtype=jnp.int32), t.shape)
    graphdef, state = nnx.split(model)
    return forward(graphdef, state, t, pos, cache, attention=attention, mode=mode)


def _stateless(model, attention, tokens):
    return np.asarray(_run(model, attention, tokens)[0])


def _prefill(model, attention, tokens, prompt: int, max_len: int):
    cache = attention.init_cache(model.config, tokens.shape[0], max_len, jnp.float32)
    return _run(model, attention, tokens[:, :prompt], 0, cache, "prefill")


def _teacher_forced(model, attention, tokens, prompt: int):
    """Logits at positions prompt - 1 .. T - 1: the prompt's prefill into a cache of T slots,
    then one decode step per remaining token; and the prefill's logits."""
    t = tokens.shape[1]
    logits, cache = _prefill(model, attention, tokens, prompt, t)
    out = [np.asarray(logits[:, -1])]
    for p in range(prompt, t):
        lg, cache = _run(model, attention, tokens[:, p : p + 1], p, cache, "decode")
        out.append(np.asarray(lg[:, 0]))
    return np.stack(out, 1), np.asarray(logits)


def _ac(model, impl="masked", **kw) -> AttentionConfig:
    kw.setdefault("kernel_backend", "reference")
    return AttentionConfig(model.config, impl=impl, **kw)


# --------------------------------------------------------------------------- (a) dense logits
@pytest.mark.parametrize("impl", ["masked", "native"])
def test_dense_logits_match_transformers(pair, impl):
    model, hf = pair
    tokens = _tokens()
    ref = _hf_logits(hf, tokens)
    att = build_attention("dense", _ac(model, impl), SEQ)
    assert att.applies_model_window
    _close(_stateless(model, att, tokens), ref)
    # generate's path: the prompt's prefill, then teacher-forced decode steps over the cache
    steps, prefill = _teacher_forced(model, att, tokens, PROMPT)
    _close(prefill, ref[:, :PROMPT])
    _close(steps, ref[:, PROMPT - 1 :])
    # the window binds: the model without it gives other logits
    plain = dataclasses.replace(model.config, sliding_window=None, window_layers=None)
    assert not np.allclose(
        _stateless(_with_config(model, plain), DenseAttention(), tokens)[:, W:],
        ref[:, W:],
        atol=1e-4,
    )


def _with_config(model, cfg):
    from flax import nnx

    from moa_jax.models.registry import init_random

    other = init_random(cfg, seed=0)
    nnx.update(other, nnx.state(model))
    return other


# --------------------------------------------------------------------------- (b) greedy tokens
@pytest.mark.parametrize("impl", ["masked", "native"])
def test_dense_generate_matches_transformers(pair, impl):
    import torch

    from moa_jax.generate import generate

    model, hf = pair
    prompt = _tokens(1, PROMPT, 1)
    att = build_attention("dense", _ac(model, impl), PROMPT + NEW)
    ours = generate(model, [prompt[0].tolist()], max_new_tokens=NEW, attention=att, stop_ids=())
    with torch.no_grad():
        ref = hf.generate(
            torch.as_tensor(prompt, dtype=torch.long),
            max_new_tokens=NEW,
            do_sample=False,
            pad_token_id=0,
        )
    assert ours.tokens[0].tolist() == ref[0, PROMPT:].tolist()


# --------------------------------------------------------------------------- (c) MoA plans
def _plan(cfg) -> Plan:
    """Mixed heads: short and long fixed spans, an elastic one, and sinks."""
    alphas = [[4.0, 6.0, 12.0, 30.0], [5.0, 20.0, 3.0, 0.0]]
    betas = [[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.5]]
    return Plan(alphas=alphas, betas=betas, sinks=2, granularity=1, min_span=0)


def _expected(plan: Plan, cfg, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The rule, computed here: a windowed layer's heads get sink 0 and window min(w', W) with
    w' the span resolved with no sinks; other layers keep the plan's window and sinks."""
    raw_w, raw_s = plan.resolve(n), plan.sink_array()
    span = np.ceil(np.round(plan.spans(n), 6)).astype(np.int64)
    w_nosink = np.where(span >= n, n, np.maximum(span, 1))
    win, sink = raw_w.copy(), raw_s.copy()
    for layer in range(cfg.num_layers):
        m = cfg.model_window(layer)
        if m is not None:
            win[layer] = np.minimum(w_nosink[layer], m)
            sink[layer] = 0
    return win, sink


def test_plan_composition_rule(pair):
    model, _ = pair
    cfg = model.config
    plan = _plan(cfg)
    composed = plan.within_model_window(cfg)
    assert composed != plan and hash(composed) != hash(plan)
    assert composed.within_model_window(cfg) == composed
    assert "model_windows" not in composed.to_dict()
    assert Plan.from_dict(composed.to_dict()) == plan  # the file keeps the plan itself
    for n in (6, W, 13, SEQ, 100):
        win, sink = _expected(plan, cfg, n)
        np.testing.assert_array_equal(composed.resolve(n), win)
        np.testing.assert_array_equal(composed.sink_array(), sink)
        for layer in range(cfg.num_layers):
            assert composed.layer_windows(n, layer) == tuple(win[layer])
            assert composed.layer_sinks(layer) == tuple(sink[layer])
            sched = composed.schedule(n, layer, cfg.num_kv_heads)
            assert sched.windows == tuple(win[layer]) and sched.sinks == tuple(sink[layer])
        kept = np.minimum(win, n) + np.minimum(sink, n - np.minimum(win, n))
        np.testing.assert_array_equal(composed.kept_kv(n), kept)
        # a windowed layer never keeps more than the window
        for layer in range(cfg.num_layers):
            if cfg.model_window(layer) is not None:
                assert composed.kept_kv(n)[layer].max() <= W
    # the AttentionConfig composes once; uniform and dense compose too
    ac = _ac(model, plan=plan)
    assert ac.plan == composed
    uni = build_attention("uniform", _ac(model, plan=plan), SEQ)
    assert isinstance(uni, MaskedAttention) and uni.applies_model_window
    for layer in range(cfg.num_layers):
        if cfg.model_window(layer) is not None:
            assert max(uni.windows[layer]) <= W and set(uni.sinks[layer]) == {0}


@pytest.mark.parametrize("impl", ["masked", "native"])
def test_moa_masks_stay_inside_the_window(pair, impl):
    model, _ = pair
    cfg = model.config
    plan = _plan(cfg)
    n = PROMPT + NEW
    att = build_attention("moa", _ac(model, impl, plan=plan), n)
    assert att.applies_model_window
    win, sink = _expected(plan, cfg, n)
    qpos = jnp.arange(n, dtype=jnp.int32)[None]
    for layer in range(cfg.num_layers):
        if impl == "masked":
            assert isinstance(att, MaskedAttention)
            w, s = att.windows[layer], att.sinks[layer]
        else:
            assert isinstance(att, MoAAttention)
            sched = att.schedule(layer, n, cfg.num_kv_heads)
            w, s = sched.windows, sched.sinks
        assert tuple(w) == tuple(win[layer]) and tuple(s) == tuple(sink[layer])
        mask = np.asarray(window_sink_mask(qpos, qpos[0], jnp.asarray(w), jnp.asarray(s)))[0]
        m = cfg.model_window(layer)
        if m is not None:
            i, j = np.nonzero(mask.any(0))
            assert (i - j < m).all(), f"layer {layer} sees a key outside the model window"


def _hf_with_masks(hf, windows, sinks):
    """`hf` running the per-head window + sink masks through a custom attention function."""
    import torch
    from transformers import AttentionInterface

    w_all = torch.as_tensor(np.asarray(windows))
    s_all = torch.as_tensor(np.asarray(sinks))

    def per_head(module, query, key, value, attention_mask, scaling=None, **kwargs):
        b, h, t, d = query.shape
        s = key.shape[2]
        g = h // key.shape[1]
        key = key.repeat_interleave(g, dim=1)
        value = value.repeat_interleave(g, dim=1)
        qp = torch.arange(s - t, s)[:, None]
        kp = torch.arange(s)[None, :]
        w = w_all[module.layer_idx][:, None, None]
        sk = s_all[module.layer_idx][:, None, None]
        mask = (kp <= qp) & ((qp - kp < w) | (kp < sk))  # [H, T, S]
        logits = torch.matmul(query, key.transpose(2, 3)) * (scaling or d**-0.5)
        logits = logits.masked_fill(~mask[None], float("-inf"))
        p = torch.softmax(logits.float(), dim=-1).to(query.dtype)
        return torch.matmul(p, value).transpose(1, 2).contiguous(), p

    AttentionInterface.register("moa_per_head", per_head)
    hf.config._attn_implementation = "moa_per_head"
    for layer in hf.model.layers:
        layer.self_attn.config._attn_implementation = "moa_per_head"
    return hf


@pytest.mark.parametrize("impl", ["masked", "native"])
def test_moa_generate_matches_transformers_per_head_masks(pair, impl):
    import copy

    import torch

    from moa_jax.generate import generate

    model, hf = pair
    cfg = model.config
    plan = _plan(cfg)
    n = PROMPT + NEW
    win, sink = _expected(plan, cfg, n)
    hf_masked = _hf_with_masks(copy.deepcopy(hf), win, sink)
    prompt = _tokens(2, PROMPT, 1)
    att = build_attention("moa", _ac(model, impl, plan=plan), n)
    ours = generate(model, [prompt[0].tolist()], max_new_tokens=NEW, attention=att, stop_ids=())
    with torch.no_grad():
        ref = hf_masked.generate(
            torch.as_tensor(prompt, dtype=torch.long),
            max_new_tokens=NEW,
            do_sample=False,
            pad_token_id=0,
            use_cache=False,  # every step recomputes the whole sequence: positions are 0..S-1
        )
    assert ours.tokens[0].tolist() == ref[0, PROMPT:].tolist()


# ------------------------------------------------------------------ (d) head-major backends
METHOD_OPTIONS = {
    "dense-kernel": {},
    "recycled": {"recycled": RecycledOptions(k=W + 4, stride=4)},  # K >= W + S
    "streaming": {"streaming": {"k": str(W)}},  # no sinks under the window: K most recent
    "h2o": {"h2o": {"k": str(W)}},  # slots outside the window are evicted first
}


@pytest.mark.parametrize(
    "method,impl",
    [(m, "masked") for m in sorted(METHOD_OPTIONS)] + [("recycled", "native")],
)
def test_head_major_methods_equal_windowed_dense(pair, method, impl):
    """With K >= the window (K >= W + S for recycled) every method equals the model's own
    windowed dense decoding: none attends outside the window (it would change the logits).
    'masked' runs the kernels' jnp oracle, 'native' the Triton kernels in interpret mode."""
    model, hf = pair
    cfg = model.config
    if method != "dense-kernel" and not all(
        cfg.model_window(i) is not None for i in range(cfg.num_layers)
    ):
        pytest.skip("K slots equal dense only where every layer has the window")
    opts = METHOD_OPTIONS[method]
    ac = _ac(model, impl, options=opts)
    if impl == "native":
        ac = dataclasses.replace(ac, kernel_backend="gpu", interpret=True)
    att = build_attention(method, ac, SEQ)
    assert att.applies_model_window
    tokens = _tokens(4)
    ref = _hf_logits(hf, tokens)
    steps, prefill = _teacher_forced(model, att, tokens, PROMPT)
    _close(prefill, ref[:, :PROMPT], rtol=1e-4 if impl == "native" else 1e-5)
    _close(steps, ref[:, PROMPT - 1 :], rtol=1e-4 if impl == "native" else 1e-5)


def test_recycled_selection_stays_inside_the_window(pair):
    """A recycled cache of K < W: every selection (the prompt's seed, each full step) takes
    only positions the next query still sees inside the window (the partial steps' kernel
    masks the entries that leave it: `test_gathered_step_window_kernels_match_reference`)."""
    model, _ = pair
    cfg = model.config
    stride = 3
    att = build_attention(
        "recycled", _ac(model, options={"recycled": RecycledOptions(k=4, stride=stride)}), SEQ
    )
    tokens = _tokens(5)
    t = tokens.shape[1]
    _, cache = _prefill(model, att, tokens, PROMPT, t)

    def check(p):
        for layer in range(cfg.num_layers):
            idx = np.asarray(cache[layer].idx)[..., : cache[layer].top_k]
            m = cfg.model_window(layer)
            sel = idx[idx >= 0]
            assert sel.size and (sel <= p).all()
            if m is not None:
                assert (sel > p + 1 - m).all(), f"layer {layer} selected outside the window"

    check(PROMPT - 1)
    for step, p in enumerate(range(PROMPT, t), start=1):
        _, cache = _run(model, att, tokens[:, p : p + 1], p, cache, "decode")
        if step % stride == 0:
            check(p)


# ------------------------------------------------------------------ kernels: the window argument
def _decode_inputs(seed=0, b=2, hkv=1, group=2, n=48, d=16, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(seed), 6)
    q = jax.random.normal(ks[0], (b, hkv * group, d), dtype)
    k = jax.random.normal(ks[1], (b, hkv, n, d), dtype)
    v = jax.random.normal(ks[2], (b, hkv, n, d), dtype)
    return q, k, v, ks


# (backend, window, scores): the Triton and the Mosaic TPU kernel in interpret mode; windows
# inside one block, across blocks and wider than the cache
FULL_STEP_CASES = [
    ("gpu", 5, "max"),
    ("gpu", 20, None),
    ("gpu", 100, "sum"),
    ("tpu", 1, "sum"),
    ("tpu", 20, "max"),
    ("reference", 7, "max"),
]


@pytest.mark.parametrize("backend,window,scores", FULL_STEP_CASES)
def test_full_step_window_kernels_match_reference(backend, window, scores):
    q, k, v, _ = _decode_inputs()
    qp = jnp.asarray([29, 47], jnp.int32)
    ref = head_major_decode_reference(q, k, v, qp, scores=scores, window=window)
    kw = dict(scores=scores, window=window, backend=backend, interpret=True, block_k=16)
    if backend == "gpu":
        kw["num_splits"] = 2
    got = full_step_decode(q, k, v, qp, **kw)
    if scores is None:
        np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)
        return
    np.testing.assert_allclose(got[0], ref[0], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(got[1], ref[1], atol=1e-5, rtol=1e-5)
    # nothing outside the window gets a score, and the window is not the whole row
    j = np.arange(k.shape[2])[None, None]
    qn = np.asarray(qp)[:, None, None]
    outside = np.broadcast_to((j > qn) | (j <= qn - window), got[1].shape)
    assert (np.asarray(got[1])[outside] == 0).all()
    if window < 20:
        dense = head_major_decode_reference(q, k, v, qp)
        assert not np.allclose(got[0], dense, atol=1e-4)


@pytest.mark.parametrize("backend,window", [("gpu", 6), ("tpu", 6), ("reference", 1)])
def test_gathered_step_window_kernels_match_reference(backend, window):
    q, k, v, ks = _decode_inputs(n=32)
    b, hkv = k.shape[:2]
    qp = jnp.asarray([40, 25], jnp.int32)
    pos = jax.random.randint(ks[3], (b, hkv, 32), -1, 41).astype(jnp.int32)
    k_new = jax.random.normal(ks[4], (b, hkv, q.shape[-1]))
    v_new = jax.random.normal(ks[5], (b, hkv, q.shape[-1]))
    ref = head_major_decode_reference(
        q, k, v, qp, pos=pos, k_new=k_new, v_new=v_new, scores="sum", window=window
    )
    got = recycled_decode(
        q,
        k,
        v,
        pos,
        qp,
        k_new,
        v_new,
        scores="sum",
        window=window,
        backend=backend,
        interpret=True,
        block_k=16,
    )
    for a, r in zip(got, ref):
        np.testing.assert_allclose(a, r, atol=1e-5, rtol=1e-5)
    outside = np.asarray(pos) <= np.asarray(qp)[:, None, None] - window
    assert outside.any() and (np.asarray(got[1])[outside] == 0).all()
    if window == 1:  # only the current token
        np.testing.assert_allclose(
            got[0], jnp.repeat(v_new, q.shape[1] // hkv, axis=1), atol=1e-6, rtol=1e-6
        )


def test_window_argument_checked():
    q, k, v, _ = _decode_inputs()
    with pytest.raises(ValueError, match="window must be"):
        full_step_decode(q, k, v, jnp.zeros(2, jnp.int32), window=0)


# --------------------------------------------------------------------------- (e) refusals
def test_decoder_refuses_a_backend_that_ignores_the_window(pair):
    model, _ = pair
    cfg = model.config
    tokens = _tokens(t=W + 1)
    with pytest.raises(ValueError, match=f"sliding window of {W} tokens"):
        _stateless(model, DenseAttention(), tokens)
    with pytest.raises(ValueError, match=f"sliding window of {W} tokens"):
        _prefill(model, DenseAttention(), tokens, 4, W + 1)  # the cache outgrows the window
    # within the window, dense attention is the model's own
    short = _tokens(t=W)
    _close(
        _stateless(model, DenseAttention(), short),
        _stateless(model, build_attention("dense", _ac(model), W), short),
    )
    # a backend built for a model without the window does not apply it
    plain = AttentionConfig(dataclasses.replace(cfg, sliding_window=None, window_layers=None))
    assert not build_attention("dense-kernel", plain, SEQ).applies_model_window


def test_moa_dense_when_full_never_drops_the_window(pair):
    """The MoA method's switch to `DenseAttention` for a plan that keeps every token never
    fires on a windowed model (the cache may outgrow the window the switch was judged at);
    nor does a training form that ignores the window run past it."""
    import warnings

    from moa_jax.methods import TrainAttentionConfig, build_train_attention

    model, _ = pair
    cfg = model.config
    dense = Plan.dense(cfg.num_layers, cfg.num_heads)
    for n in (W, SEQ):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            att = build_attention("moa", _ac(model, "native", plan=dense), n)
        assert isinstance(att, MoAAttention) and att.applies_model_window
    ac = _ac(model, plan=dense)
    assert build_train_attention("moa", ac, TrainAttentionConfig(), SEQ).applies_model_window
    with pytest.raises(ValueError, match=f"sliding window of {W} tokens"):
        build_train_attention("dense", ac, TrainAttentionConfig(), SEQ)
    build_train_attention("dense", ac, TrainAttentionConfig(), W)  # within the window


def test_profile_refuses_lengths_past_the_window(pair):
    from moa_jax.search.sensitivity import profile_items, refuse_model_window

    model, _ = pair
    refuse_model_window(model.config, W)  # within the window: the profile is exact
    with pytest.raises(ValueError, match=f"sliding window of {W} tokens"):
        refuse_model_window(model.config, 64)
    with pytest.raises(ValueError, match="does not model"):
        profile_items(model, [], 64, progress=False)
