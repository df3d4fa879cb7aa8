"""The supported model families and their HF `config.json` dialects.

Every family runs the one decoder (`moa_jax.models.decoder`); a family is what its checkpoints
say differently, read into `ModelConfig` switches by its module:

  llama    Llama 1/2/3/3.1/3.2 (`model_type` 'llama'): the reference layout.
  mistral  Mistral (`'mistral'`): the config's `sliding_window` is the model's own window.
  qwen2    Qwen2 / Qwen2.5 (`'qwen2'`): biases on q, k, v (not o); `use_sliding_window` with
           `max_window_layers`.
  qwen3    Qwen3 dense (`'qwen3'`): an RMSNorm per head on q and k before RoPE; head_dim
           independent of the hidden size.

Anything else (Gemma, Phi, mixture-of-experts models, ...) is refused in one line that lists
these. Public API:

  config_from_hf(d, source) -> ModelConfig    (an HF config dict, both transformers 4.x and 5.x
                                               rope layouts)
  config_to_hf(cfg) -> dict                   (the config.json transformers loads)
  FAMILIES, family(name), supported_model_types()
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from moa_jax.config import ModelConfig, RopeScaling
from moa_jax.models.families import llama, mistral, qwen2, qwen3
from moa_jax.models.families.base import Family, HFConfigError
from moa_jax.models.families.schema import check_hf_config

FAMILIES: dict[str, Family] = {
    f.name: f for f in (llama.FAMILY, mistral.FAMILY, qwen2.FAMILY, qwen3.FAMILY)
}
_BY_MODEL_TYPE = {t: f for f in FAMILIES.values() for t in f.model_types}

__all__ = [
    "FAMILIES",
    "Family",
    "HFConfigError",
    "config_from_hf",
    "config_to_hf",
    "family",
    "supported_model_types",
]


def family(name: str) -> Family:
    """The family called `name` ('llama', 'mistral', 'qwen2', 'qwen3')."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(
            f"unknown model family {name!r}; families: {', '.join(FAMILIES)}"
        ) from None


def supported_model_types() -> list[str]:
    """The HF `model_type` values moa-jax loads."""
    return sorted(_BY_MODEL_TYPE)


def _rope(d: Mapping[str, Any], max_positions: int) -> tuple[float, RopeScaling]:
    """(theta, scaling) from transformers 5.x `rope_parameters` or 4.x `rope_theta` +
    `rope_scaling`; `max_positions`: the config's max_position_embeddings."""
    rope = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or {}
    for name, value in (("rope_parameters", rope), ("rope_scaling", scaling)):
        if not isinstance(value, Mapping):
            raise HFConfigError(f"{name} must be an object, got {value!r}")
    if any(isinstance(v, Mapping) for v in rope.values()):
        raise HFConfigError("rope_parameters per layer type are not supported")
    params = {**scaling, **rope}
    theta = float(params.get("rope_theta", d.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type")) or "default"
    partial = params.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
    if float(partial) != 1.0:
        raise HFConfigError(f"partial_rotary_factor={partial} (partial RoPE) is not supported")
    original = (
        params.get("original_max_position_embeddings")
        or d.get("original_max_position_embeddings")
        or max_positions
    )
    factor = params.get("factor")
    if factor is None:
        factor = float(max_positions) / float(original) if rope_type == "yarn" else 1.0

    def opt(key: str, default: Any) -> Any:
        value = params.get(key)
        return default if value is None else value

    return theta, RopeScaling(
        rope_type=str(rope_type),
        factor=float(factor),
        low_freq_factor=float(opt("low_freq_factor", 1.0)),
        high_freq_factor=float(opt("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(original),
        beta_fast=float(opt("beta_fast", 32.0)),
        beta_slow=float(opt("beta_slow", 1.0)),
        attention_factor=None
        if params.get("attention_factor") is None
        else float(params["attention_factor"]),
        mscale=None if params.get("mscale") is None else float(params["mscale"]),
        mscale_all_dim=None
        if params.get("mscale_all_dim") is None
        else float(params["mscale_all_dim"]),
        truncate=bool(opt("truncate", True)),
    )


def config_from_hf(d: Mapping[str, Any], source: str = "config.json") -> ModelConfig:
    """The `ModelConfig` of an HF `config.json` dict of a supported family.

    Raises HFConfigError naming `source` and the field: a model_type that is not supported
    (listing those that are), a missing or invalid value, or something the decoder does not do
    (an activation, a rope type, partial RoPE).
    """
    if not isinstance(d, Mapping):
        raise HFConfigError(f"{source} must hold a JSON object, not {type(d).__name__}")
    model_type = d.get("model_type", "llama")
    fam = _BY_MODEL_TYPE.get(model_type)
    if fam is None:
        raise HFConfigError(
            f"{source}: model_type {model_type!r} is not supported; moa-jax loads "
            f"{', '.join(supported_model_types())} checkpoints (Llama 1-3.2, Mistral, "
            f"Qwen2/2.5, Qwen3 dense)"
        )
    check_hf_config(d, fam.hf_keys, source)
    required = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
    )
    missing = [k for k in required if d.get(k) is None]
    if missing:
        raise HFConfigError(f"{source} is missing required keys {missing}")

    def given(key: str) -> Any:
        """d[key]; where the key is left out, what the family's transformers config class
        assumes (None: derived below, as transformers derives it from a null value)."""
        return d[key] if key in d else fam.hf_defaults.get(key)

    try:
        heads = int(d["num_attention_heads"])
        head_dim = given("head_dim") or int(d["hidden_size"]) // max(heads, 1)
        max_positions = int(given("max_position_embeddings") or 8192)
        theta, scaling = _rope(d, max_positions)
        act = d.get("hidden_act", d.get("hidden_activation", "silu"))
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        return ModelConfig(
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_layers=int(d["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(given("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            rope_theta=theta,
            rope_scaling=scaling,
            rms_norm_eps=float(d.get("rms_norm_eps") or 1e-6),  # transformers' default
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            max_position_embeddings=max_positions,
            hidden_act=str(act),
            bos_token_id=None if d.get("bos_token_id") is None else int(d["bos_token_id"]),
            eos_token_ids=tuple(int(e) for e in eos_ids),
            pad_token_id=None if d.get("pad_token_id") is None else int(d["pad_token_id"]),
            family=fam.name,
            **fam.read_hf(d),
        )
    except HFConfigError as e:
        raise HFConfigError(f"{source}: {e}") from None
    except (ValueError, TypeError) as e:
        raise HFConfigError(f"{source}: {e}") from None


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The HF `config.json` dict of `cfg` (transformers 4.x keys, which 5.x also reads), for
    the family's transformers class."""
    fam = family(cfg.family)
    rs = cfg.rope_scaling
    d: dict[str, Any] = {
        "architectures": [fam.hf_architecture],
        "model_type": fam.model_types[0],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": cfg.hidden_act,
        "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "max_position_embeddings": cfg.max_position_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(cfg.eos_token_ids)
        if len(cfg.eos_token_ids) != 1
        else cfg.eos_token_ids[0],
        "pad_token_id": cfg.pad_token_id,
        **fam.write_hf(cfg),
    }
    if rs.rope_type != "default":
        extra: dict[str, Any] = {}
        if rs.rope_type in ("llama3", "yarn"):
            extra["original_max_position_embeddings"] = rs.original_max_position_embeddings
        if rs.rope_type == "llama3":
            extra |= {
                "low_freq_factor": rs.low_freq_factor,
                "high_freq_factor": rs.high_freq_factor,
            }
        if rs.rope_type == "yarn":
            extra |= {"beta_fast": rs.beta_fast, "beta_slow": rs.beta_slow, "truncate": rs.truncate}
            for key in ("attention_factor", "mscale", "mscale_all_dim"):
                if getattr(rs, key) is not None:
                    extra[key] = getattr(rs, key)
        d["rope_scaling"] = {"rope_type": rs.rope_type, "factor": rs.factor, **extra}
    return d
