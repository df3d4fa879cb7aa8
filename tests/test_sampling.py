"""Sampling filters: the support of top-k / top-p draws."""

import jax
import jax.numpy as jnp
import numpy as np

from moa_jax.sampling import SamplingConfig, sample


def _draws(logits, cfg, n=400):
    keys = jax.random.split(jax.random.key(0), n)
    return np.asarray(jax.vmap(lambda k: sample(logits, k, cfg))(keys))


def test_top_k_support():
    logits = jnp.asarray([[0.0, 3.0, 1.0, 2.0, -1.0]])
    draws = _draws(logits, SamplingConfig(temperature=1.0, top_k=2))
    assert set(np.unique(draws)) == {1, 3}


def test_top_p_support():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = jnp.asarray(np.log(probs))[None]
    # Mass before token 2 is 0.8 >= 0.75, so the nucleus is {0, 1}.
    assert set(np.unique(_draws(logits, SamplingConfig(temperature=1.0, top_p=0.75)))) == {0, 1}
    # 0.8 < 0.85, so token 2 joins.
    assert set(np.unique(_draws(logits, SamplingConfig(temperature=1.0, top_p=0.85)))) == {0, 1, 2}


def test_temperature_sharpens():
    logits = jnp.asarray([[0.0, 1.0]])
    cold = _draws(logits, SamplingConfig(temperature=0.1)).mean()
    warm = _draws(logits, SamplingConfig(temperature=1.0)).mean()
    assert cold > 0.99 and 0.6 < warm < 0.85  # p(1) = sigmoid(1) = 0.73 at T=1
