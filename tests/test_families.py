"""Every supported family against its transformers class: random tiny HF models (float32, eager
attention) saved as safetensors and loaded by `load_model` give HF's logits and greedy tokens;
our `save_hf` loads back in transformers; a MoA plan's generate equals the HF model run with the
same per-head window + sink mask; unsupported model types and config features are refused.

Each family's own part is exercised: Llama's llama3 and YaRN rope scaling, tied and untied
heads, attention and MLP biases; Qwen2's q/k/v-only biases; Qwen3's q/k norm with a head_dim
independent of the hidden size (and YaRN); Mistral's explicit head_dim; GQA groups 2 and 3.
The model's own sliding window is covered by test_model_window.py (none here)."""

from __future__ import annotations

import json
from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from moa_jax.generate import generate
from moa_jax.methods import AttentionConfig, build_attention
from moa_jax.models.causal_lm import forward
from moa_jax.models.families import config_from_hf, config_to_hf, supported_model_types
from moa_jax.models.hf_weights import save_hf
from moa_jax.models.registry import load_model
from moa_jax.models.weights import WeightsError
from moa_jax.plan import Plan

NEW_TOKENS = 24
IDS = np.random.default_rng(0).integers(0, 256, size=(2, 17))
PROMPTS = [np.random.default_rng(n).integers(0, 256, n).tolist() for n in (5, 13, 9)]

_BASE: dict[str, Any] = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)
_LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}
_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}

# (id, family, HF config overrides)
CASES: list[tuple[str, str, dict[str, Any]]] = [
    (
        "llama-llama3-bias-untied",
        "llama",
        dict(rope_scaling=_LLAMA3, attention_bias=True, mlp_bias=True),
    ),
    (
        "llama-yarn-tied-gqa3",
        "llama",
        dict(
            rope_scaling=_YARN,
            tie_word_embeddings=True,
            hidden_size=48,
            num_attention_heads=6,
            num_key_value_heads=2,
        ),
    ),
    ("mistral-head_dim", "mistral", dict(head_dim=32, sliding_window=None)),
    ("qwen2-tied", "qwen2", dict(tie_word_embeddings=True)),
    (
        "qwen2-untied-gqa3",
        "qwen2",
        dict(num_attention_heads=6, num_key_value_heads=2, hidden_size=48),
    ),
    ("qwen3-head_dim", "qwen3", dict(hidden_size=48, head_dim=32)),
    (
        "qwen3-yarn-tied-gqa3",
        "qwen3",
        dict(
            hidden_size=48,
            num_attention_heads=6,
            num_key_value_heads=2,
            head_dim=16,
            rope_scaling=_YARN,
            tie_word_embeddings=True,
            attention_bias=True,
        ),
    ),
]
_SHARDED = "llama-llama3-bias-untied"

_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
}


def hf_class(family: str):
    return getattr(transformers, _CLASSES[family][1])


def make_hf(family: str, seed: int = 0, **overrides: Any):
    """A random-weight HF model of `family` (float32, eager attention, eval mode): every weight
    random (norm weights near 1, biases non-zero) so that a mis-mapped tensor shows, the layers
    strong enough against the embeddings that greedy decoding does not just repeat a token."""
    config_cls, _ = _CLASSES[family]
    config = getattr(transformers, config_cls)(**{**_BASE, **overrides})
    torch.manual_seed(seed)
    model = hf_class(family)._from_config(config, attn_implementation="eager", dtype=torch.float32)
    model = model.float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_((0.08 if "embed_tokens" in name else 0.25) * torch.randn_like(p))
    model.generation_config.eos_token_id = None  # always NEW_TOKENS tokens, as ours
    model.generation_config.pad_token_id = 0
    return model


def hf_logits(hf, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def our_logits(model, tokens: np.ndarray, attention=None) -> np.ndarray:
    g, s = nnx.split(model)
    tokens = jnp.asarray(tokens, jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    kw = {} if attention is None else {"attention": attention}
    return np.asarray(forward(g, s, tokens, pos, **kw)[0])


def assert_logits_close(ours: np.ndarray, theirs: np.ndarray) -> None:
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5 * np.abs(theirs).max())


def hf_greedy(hf, prompt: list[int]) -> list[int]:
    with torch.no_grad():
        out = hf.generate(
            torch.as_tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
        )
    return out[0, len(prompt) :].tolist()


def param_names(model) -> set[str]:
    return {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _case(case_id: str):
    return next(c for c in CASES if c[0] == case_id)


@pytest.fixture(params=[c[0] for c in CASES])
def saved(request, tmp_path):
    """(family, HF model, its save_pretrained directory)."""
    case_id, family, overrides = _case(request.param)
    hf = make_hf(family, **overrides)
    shard = {"max_shard_size": "40KB"} if case_id == _SHARDED else {}
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True, **shard)
    return case_id, family, hf, tmp_path


# ------------------------------------------------------------------------ HF parity per family


def test_logits_config_and_save_round_trip(saved):
    case_id, family, hf, tmp = saved
    files = sorted(p.name for p in (tmp / "hf").iterdir())
    assert ("model.safetensors.index.json" in files) == (case_id == _SHARDED)
    if case_id == _SHARDED:
        assert sum(f.endswith(".safetensors") for f in files) > 1
    model, _ = load_model(tmp / "hf")
    cfg, c = model.config, hf.config
    assert cfg.family == family
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (
        c.num_attention_heads,
        c.num_key_value_heads,
        head_dim,
    )
    assert cfg.tie_word_embeddings == c.tie_word_embeddings == (not hasattr(model, "lm_head"))
    rope_type = (c.rope_parameters or {}).get("rope_type", "default")
    assert cfg.rope_scaling.rope_type == rope_type
    names = param_names(model)
    if family == "qwen2":
        assert cfg.qkv_bias and not cfg.o_bias and not cfg.mlp_bias
        assert "layers.0.self_attn.q_proj.bias" in names
        assert "layers.0.self_attn.o_proj.bias" not in names
    if family == "qwen3":
        assert cfg.qk_norm and "layers.1.self_attn.k_norm.weight" in names
        assert cfg.head_dim * cfg.num_heads != cfg.hidden_size
    if case_id == _SHARDED:
        assert cfg.qkv_bias and cfg.o_bias and cfg.mlp_bias
        assert "layers.1.mlp.down_proj.bias" in names

    theirs = hf_logits(hf, IDS)
    assert_logits_close(our_logits(model, IDS), theirs)

    # The config survives our HF dict both ways.
    assert config_from_hf(config_to_hf(cfg)) == cfg
    assert config_from_hf(json.loads((tmp / "hf" / "config.json").read_text())) == cfg

    # Our save_hf loads in the transformers class with every tensor used and the same logits.
    save_hf(model, tmp / "ours")
    back, info = hf_class(family).from_pretrained(
        tmp / "ours", attn_implementation="eager", dtype=torch.float32, output_loading_info=True
    )
    assert type(back).__name__ == _CLASSES[family][1]
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    np.testing.assert_allclose(hf_logits(back.eval(), IDS), theirs, rtol=1e-6, atol=1e-6)


def test_greedy_tokens_match_hf(saved):
    _, _, hf, tmp = saved
    model, _ = load_model(tmp / "hf")
    out = generate(model, PROMPTS, max_new_tokens=NEW_TOKENS, stop_ids=())
    assert out.rows() == [hf_greedy(hf, p) for p in PROMPTS]
    assert min(len(set(r)) for r in out.rows()) >= 8  # not one token repeated


# ------------------------------------------------------------------- config.json dialects

_ROPES = {
    "llama3-4.x": {
        "rope_scaling": {**_LLAMA3, "original_max_position_embeddings": 64},
        "rope_theta": 500000.0,
    },
    "yarn-4.x-type": {
        "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
        "rope_theta": 1000000.0,
    },
    "yarn-5.x-knobs": {
        "rope_parameters": {
            **_YARN,
            "rope_theta": 1000.0,
            "beta_fast": 16.0,
            "beta_slow": 2.0,
            "truncate": False,
        }
    },
    "yarn-attention_factor": {"rope_parameters": {**_YARN, "attention_factor": 1.3}},
    "yarn-mscale": {"rope_parameters": {**_YARN, "mscale": 0.7, "mscale_all_dim": 0.9}},
    "yarn-no-original": {"rope_parameters": {"rope_type": "yarn", "factor": 8.0}},
    "yarn-null-factor": {  # max_position_embeddings / original
        "rope_scaling": {
            "rope_type": "yarn",
            "factor": None,
            "original_max_position_embeddings": 64,
        }
    },
    "linear": {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
}


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("rope", list(_ROPES))
def test_rope_tables_match_transformers(family, rope):
    """The rotary frequencies and cos/sin scale of a config.json (transformers 4.x or 5.x rope
    keys) are those transformers computes from the same file."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from moa_jax.models.rotary import rotary_table

    d = {**_BASE, "model_type": family, "head_dim": 32, **_ROPES[rope]}
    c = getattr(transformers, _CLASSES[family][0]).from_dict(d)
    inv, scale = ROPE_INIT_FUNCTIONS[c.rope_parameters["rope_type"]](c, torch.device("cpu"))
    table = rotary_table(config_from_hf(d))
    np.testing.assert_allclose(table.inv_freq, inv.double().numpy(), rtol=1e-6)
    assert table.scale == pytest.approx(scale, rel=1e-9)


@pytest.mark.parametrize("family", list(_CLASSES))
def test_left_out_keys_take_transformers_defaults(family):
    """A config.json that leaves out optional keys reads as the transformers class reads it
    (e.g. Qwen3's head_dim 128, not hidden / heads; rms_norm_eps 1e-6; Mistral's 8 KV heads)."""
    d = {
        "model_type": family,
        "vocab_size": 256,
        "hidden_size": 2048,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 32,
    }
    c = getattr(transformers, _CLASSES[family][0]).from_dict(d)
    cfg = config_from_hf(d)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    assert (cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps, cfg.max_position_embeddings) == (
        c.num_key_value_heads,
        head_dim,
        c.rms_norm_eps,
        c.max_position_embeddings,
    )
    assert (cfg.rope_theta, cfg.tie_word_embeddings, cfg.hidden_act) == (
        c.rope_parameters["rope_theta"],
        c.tie_word_embeddings,
        c.hidden_act,
    )
    assert cfg.sliding_window == (c.sliding_window if family == "mistral" else None)
    # A null value is derived, as transformers derives it.
    nulls = {"num_key_value_heads": None} if family in ("llama", "qwen2") else {}
    assert (
        config_from_hf({**d, **nulls}).num_kv_heads
        == getattr(transformers, _CLASSES[family][0]).from_dict({**d, **nulls}).num_key_value_heads
    )


# ------------------------------------------------------------------ MoA plan vs HF masked heads


def window_sink_attention(windows: np.ndarray, sinks: np.ndarray):
    """An HF attention function (`AttentionInterface`) where head h of layer l sees key j from
    query i iff j <= i and (i - j < windows[l, h] or j < sinks[l, h]); no padding (the queries
    are the last of the keys)."""
    from transformers.models.llama.modeling_llama import repeat_kv

    def attend(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
        layer = module.layer_idx
        k = repeat_kv(key, module.num_key_value_groups)
        v = repeat_kv(value, module.num_key_value_groups)
        t, s = query.shape[2], k.shape[2]
        i = torch.arange(s - t, s)[:, None]
        j = torch.arange(s)[None, :]
        w = torch.as_tensor(windows[layer])[:, None, None]
        sink = torch.as_tensor(sinks[layer])[:, None, None]
        keep = (j <= i) & ((i - j < w) | (j < sink))  # [H, t, s]
        scores = torch.matmul(query, k.transpose(2, 3)) * scaling
        scores = scores.masked_fill(~keep, float("-inf"))
        p = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        return torch.matmul(p, v).transpose(1, 2).contiguous(), p

    return attend


MOA_CASES = ["llama-yarn-tied-gqa3", "mistral-head_dim", "qwen2-untied-gqa3", "qwen3-head_dim"]


@pytest.mark.parametrize("case_id", MOA_CASES)
def test_moa_plan_matches_hf_with_head_masks(tmp_path, case_id):
    _, family, overrides = _case(case_id)
    hf = make_hf(family, seed=1, **overrides)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    model, _ = load_model(tmp_path)
    cfg = model.config
    rng = np.random.default_rng(2)
    big = 10**6  # a dense head
    windows = rng.choice([1, 3, 6, 11, big], (cfg.num_layers, cfg.num_heads))
    windows[0, 0], windows[1, -1] = 2, big
    sinks = rng.choice([0, 1, 4], (cfg.num_layers, cfg.num_heads))
    plan = Plan.from_windows(windows.tolist(), sinks.tolist())
    prompts = [rng.integers(0, 256, n).tolist() for n in (30, 21)]
    length = max(map(len, prompts)) + NEW_TOKENS
    ac = AttentionConfig(config=cfg, plan=plan, impl="masked")
    backend = build_attention("moa", ac, length)

    name = f"moa_test_{case_id}"
    transformers.AttentionInterface.register(name, window_sink_attention(windows, sinks))
    hf.config._attn_implementation = name

    # Prefill logits: the masks matter (the plan changes them) and agree with HF's.
    theirs = hf_logits(hf, np.asarray([prompts[0]]))
    ours = our_logits(model, np.asarray([prompts[0]]), attention=backend)
    assert_logits_close(ours, theirs)
    hf.config._attn_implementation = "eager"
    assert np.abs(hf_logits(hf, np.asarray([prompts[0]])) - theirs).max() > 1e-3
    hf.config._attn_implementation = name

    out = generate(model, prompts, max_new_tokens=NEW_TOKENS, stop_ids=(), attention=backend)
    assert out.rows() == [hf_greedy(hf, p) for p in prompts]
    assert min(len(set(r)) for r in out.rows()) >= 8


# ------------------------------------------------------------------------------- refusals


def _write_config(path, d: dict[str, Any]):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(d))
    return path


@pytest.mark.parametrize("model_type", ["gemma", "phi3", "mixtral", "qwen2_moe", "qwen3_moe"])
def test_unsupported_model_types_are_refused(tmp_path, model_type):
    d = {**_BASE, "model_type": model_type, "hidden_act": "silu"}
    with pytest.raises(WeightsError) as e:
        load_model(_write_config(tmp_path / model_type, d))
    msg = str(e.value)
    assert "\n" not in msg and f"model_type {model_type!r} is not supported" in msg
    assert ", ".join(supported_model_types()) in msg


@pytest.mark.parametrize(
    "family,change,field",
    [
        ("llama", {"hidden_act": "gelu"}, "hidden_act"),
        ("qwen2", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_type"),
        (
            "llama",
            {
                "rope_scaling": {
                    "rope_type": "longrope",
                    "short_factor": [1.0] * 8,
                    "long_factor": [2.0] * 8,
                    "original_max_position_embeddings": 64,
                }
            },
            "rope_type",
        ),
        ("qwen3", {"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ],
)
def test_unsupported_config_features_are_refused(tmp_path, family, change, field):
    d = {**_BASE, "model_type": family, **change}
    with pytest.raises(WeightsError) as e:
        load_model(_write_config(tmp_path / "m", d))
    msg = str(e.value)
    assert "\n" not in msg and field in msg and "config.json" in msg


def test_case_table_covers_every_family():
    assert {c[1] for c in CASES} == set(supported_model_types()) == set(_CLASSES)
    groups = {config_from_hf({**_BASE, **o, "model_type": f}).group_size for _, f, o in CASES}
    assert {2, 3} <= groups
