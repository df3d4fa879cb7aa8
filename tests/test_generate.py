"""generate(): greedy equals full recomputation, batching, stopping, sampling, bad input, HF."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moa_jax.generate import generate, pad_prompts
from moa_jax.models.causal_lm import forward
from moa_jax.models.registry import init_random
from moa_jax.sampling import SamplingConfig

from conftest import tiny_config


@pytest.fixture(scope="module")
def model():
    return init_random(tiny_config(), seed=0)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.RandomState(0)
    return [rng.randint(4, 128, n).tolist() for n in (5, 70, 9)]


def recompute_greedy(model, prompt, n):
    """Greedy decoding by re-running the whole sequence without a cache at every step."""
    g, s = nnx.split(model)
    seq = list(prompt)
    for _ in range(n):
        logits, _ = forward(g, s, jnp.asarray([seq]), jnp.arange(len(seq))[None])
        seq.append(int(jnp.argmax(logits[0, -1])))
    return seq[len(prompt) :]


def test_greedy_equals_full_recomputation(model, prompts):
    out = generate(model, prompts, max_new_tokens=10, stop_ids=())
    assert out.tokens.shape == (3, 10) and out.lengths.tolist() == [10, 10, 10]
    for p, row in zip(prompts, out.rows()):
        assert row == recompute_greedy(model, p, 10)


def test_batch_rows_are_independent(model, prompts):
    batched = generate(model, prompts, max_new_tokens=6, stop_ids=()).rows()
    for p, row in zip(prompts, batched):
        assert generate(model, [p], max_new_tokens=6, stop_ids=()).rows()[0] == row


def test_per_row_stop(model, prompts):
    free = generate(model, prompts, max_new_tokens=8, stop_ids=())
    stop = free.tokens[1, 2]  # row 1's third token becomes a stop token
    out = generate(model, prompts, max_new_tokens=8, stop_ids=(int(stop),), pad_id=0)
    for r in range(3):
        hits = np.nonzero(free.tokens[r] == stop)[0]
        n = hits[0] + 1 if hits.size else 8
        assert out.lengths[r] == n
        np.testing.assert_array_equal(out.tokens[r, :n], free.tokens[r, :n])
        assert (out.tokens[r, n:] == 0).all()
    assert out.lengths[1] <= 3


def test_sampling_limits(model, prompts):
    greedy = generate(model, prompts, max_new_tokens=6, stop_ids=()).tokens
    key = jax.random.key(3)
    top1 = generate(
        model,
        prompts,
        max_new_tokens=6,
        stop_ids=(),
        key=key,
        sampling=SamplingConfig(temperature=1.0, top_k=1),
    ).tokens
    tiny_p = generate(
        model,
        prompts,
        max_new_tokens=6,
        stop_ids=(),
        key=key,
        sampling=SamplingConfig(temperature=1.0, top_p=1e-6),
    ).tokens
    np.testing.assert_array_equal(top1, greedy)
    np.testing.assert_array_equal(tiny_p, greedy)
    hot = SamplingConfig(temperature=2.0)
    a = generate(model, prompts, max_new_tokens=6, stop_ids=(), key=key, sampling=hot).tokens
    b = generate(model, prompts, max_new_tokens=6, stop_ids=(), key=key, sampling=hot).tokens
    c = generate(
        model, prompts, max_new_tokens=6, stop_ids=(), key=jax.random.key(4), sampling=hot
    ).tokens
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


def test_streaming_callback_sees_every_step(model, prompts):
    seen = []
    out = generate(
        model, prompts, max_new_tokens=5, stop_ids=(), on_token=lambda t: seen.append(np.asarray(t))
    )
    jax.effects_barrier()
    np.testing.assert_array_equal(np.stack(seen, 1), out.tokens)


def test_bad_input(model, prompts):
    with pytest.raises(ValueError, match="exceeds the KV cache length 32"):
        generate(model, [[5] * 30], max_new_tokens=8, max_cache_len=32)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 128\)"):
        generate(model, [[5, 500]], max_new_tokens=2)
    with pytest.raises(ValueError, match="needs an explicit PRNG"):
        generate(model, prompts, sampling=SamplingConfig(temperature=0.7))
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1"):
        generate(model, prompts, max_new_tokens=0)
    with pytest.raises(ValueError, match="no prompts"):
        generate(model, [], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"top_p must be a finite number in \(0, 1\]"):
        SamplingConfig(temperature=1.0, top_p=0.0)


def test_scanned_layers_generate_the_same_tokens(model, prompts):
    """scan_layers (one scanned layer, a stacked cache) against the layer loop, with the dense
    backends; sampling too, with the same key. Backends that differ per layer are refused."""
    from moa_jax.models.masked_attention import MaskedAttention
    from moa_jax.models.moa_attention import MoAAttention
    from moa_jax.plan import Plan

    for attention in (None, MaskedAttention(q_chunk=32)):
        kw = {} if attention is None else {"attention": attention}
        ref = generate(model, prompts, max_new_tokens=9, stop_ids=(), **kw)
        out = generate(model, prompts, max_new_tokens=9, stop_ids=(), scan_layers=True, **kw)
        np.testing.assert_array_equal(out.tokens, ref.tokens)
    samp = SamplingConfig(temperature=0.8, top_k=20)
    key = jax.random.key(3)
    ref = generate(model, prompts, max_new_tokens=6, sampling=samp, key=key, stop_ids=())
    out = generate(
        model, prompts, max_new_tokens=6, sampling=samp, key=key, stop_ids=(), scan_layers=True
    )
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    n = model.config.num_layers
    with pytest.raises(ValueError, match="treats every layer alike"):
        generate(
            model,
            prompts,
            max_new_tokens=2,
            scan_layers=True,
            attention=MaskedAttention(windows=((8,) * 4,) * n, sinks=((0,) * 4,) * n),
        )
    plan = Plan.uniform(n, model.config.num_heads, window=16, sink=4)
    with pytest.raises(ValueError, match="MoAAttention"):
        generate(model, prompts, max_new_tokens=2, scan_layers=True, attention=MoAAttention(plan))


def test_pad_prompts_buckets():
    tokens, lengths = pad_prompts([[1, 2, 3], [4]], pad_id=9, bucket=4)
    np.testing.assert_array_equal(tokens, [[1, 2, 3, 9], [4, 9, 9, 9]])
    np.testing.assert_array_equal(lengths, [3, 1])


def test_greedy_matches_transformers_generate(tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForCausalLM

    from moa_jax.models.hf_weights import load_hf

    hf_cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    hf = LlamaForCausalLM(hf_cfg).eval()
    # Larger weights give peaked, non-repetitive greedy paths that really test the cache.
    with torch.no_grad():
        for p in hf.parameters():
            p.mul_(4.0) if p.ndim == 2 else None
    hf.save_pretrained(tmp_path)
    model = load_hf(tmp_path)
    rng = np.random.RandomState(5)
    prompts = [rng.randint(3, 128, n).tolist() for n in (7, 12)]
    ours = generate(model, prompts, max_new_tokens=20, stop_ids=()).rows()
    for p, row in zip(prompts, ours):
        with torch.no_grad():
            ref = hf.generate(
                torch.tensor([p]),
                max_new_tokens=20,
                min_new_tokens=20,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
        assert row == ref[0, len(p) :].tolist()
