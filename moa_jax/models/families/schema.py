"""The schema of an HF `config.json`: every key moa-jax reads or knowingly ignores, with its
domain (`moa_jax.domains`).

`check_hf_config(d, family_keys, source)` refuses, in one line naming the file and the key:
an unknown key (a typo, or a feature of another architecture that the decoder would silently
leave out), a value outside its key's domain (a string where a size goes, a negative size, a
NaN epsilon), and a feature the decoder does not run (`quantization_config`, experts,
interleaved RoPE). Keys a family reads beyond the common
ones (`sliding_window`, `attention_bias`, ...) are declared by the family (`Family.hf_keys`);
the same key in another family's config is unknown there.

`null` is accepted for every key (transformers reads it as "not set").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from moa_jax.domains import NON_NEGATIVE, POSITIVE, Choice, Domain, Float, Int
from moa_jax.models.families.base import HFConfigError

_ANY = None  # a key whose value is not read (metadata)
BOOL = Domain(bool)
TOKEN_ID = Int(0)

COMMON_KEYS: dict[str, Domain | None] = {
    "model_type": Domain(str, nonempty=True),
    "vocab_size": POSITIVE,
    "hidden_size": POSITIVE,
    "intermediate_size": POSITIVE,
    "num_hidden_layers": POSITIVE,
    "num_attention_heads": POSITIVE,
    "num_key_value_heads": POSITIVE,
    "head_dim": POSITIVE,
    "hidden_act": Domain(str, nonempty=True),  # ModelConfig refuses all but the supported
    "rope_theta": Float(0.0, lo_open=True),
    "rope_scaling": _ANY,  # checked key by key in `check_rope`
    "rope_parameters": _ANY,
    "partial_rotary_factor": Float(0.0, 1.0, lo_open=True),
    "rms_norm_eps": Float(0.0, lo_open=True),
    "tie_word_embeddings": BOOL,
    "max_position_embeddings": POSITIVE,
    "original_max_position_embeddings": POSITIVE,
    "bos_token_id": TOKEN_ID,
    "eos_token_id": _ANY,  # an id or a list of ids: `_check_ids`
    "pad_token_id": TOKEN_ID,
    # read by no family's decoder; harmless metadata or training-only settings
    "architectures": _ANY,
    "_name_or_path": _ANY,
    "transformers_version": _ANY,
    "torch_dtype": _ANY,
    "dtype": _ANY,
    "use_cache": _ANY,
    "initializer_range": _ANY,
    "attention_dropout": Float(0.0, 1.0),
    "pretraining_tp": POSITIVE,  # a slicing of the same matmuls in transformers
    "output_attentions": _ANY,
    "output_hidden_states": _ANY,
    "return_dict": _ANY,
    "id2label": _ANY,
    "label2id": _ANY,
    "problem_type": _ANY,
    "is_encoder_decoder": Choice(False),
    "chunk_size_feed_forward": _ANY,
    "tokenizer_class": _ANY,
    "is_llama_config": _ANY,  # SmolLM2's configs
    "rope_interleaved": Choice(False),  # interleaved (GPT-J) rotary pairs are not run
    "transformers.js_config": _ANY,
}

REFUSED_KEYS: dict[str, str] = {
    "quantization_config": "quantized checkpoints are not supported: use the full-precision "
    "weights",
    "num_experts": "mixture-of-experts models are not supported",
    "num_local_experts": "mixture-of-experts models are not supported",
}

ROPE_KEYS: dict[str, Domain | None] = {
    "rope_type": Domain(str, nonempty=True),  # `RopeScaling` refuses the unsupported ones
    "type": Domain(str, nonempty=True),
    "rope_theta": Float(0.0, lo_open=True),
    "factor": Float(0.0, lo_open=True),
    "low_freq_factor": Float(0.0, lo_open=True),
    "high_freq_factor": Float(0.0, lo_open=True),
    "original_max_position_embeddings": POSITIVE,
    "beta_fast": Float(0.0, lo_open=True),
    "beta_slow": Float(0.0, lo_open=True),
    "attention_factor": Float(0.0, lo_open=True),
    "mscale": Float(0.0, lo_open=True),
    "mscale_all_dim": Float(0.0, lo_open=True),
    "truncate": BOOL,
    "partial_rotary_factor": Float(0.0, 1.0, lo_open=True),
}

WINDOW_KEYS: dict[str, Domain | None] = {
    "use_sliding_window": BOOL,
    "sliding_window": POSITIVE,
    "max_window_layers": NON_NEGATIVE,
    "layer_types": _ANY,  # checked by `base.layer_windows`
}


def check_hf_config(
    d: Mapping[str, Any], family_keys: Mapping[str, Domain | None], source: str
) -> None:
    """Raises `HFConfigError` (a `ModelConfigError`) naming `source` and the key for an unknown
    or refused key or a value outside its domain; `family_keys` are the keys the family reads
    besides `COMMON_KEYS`."""
    known = {**COMMON_KEYS, **family_keys}
    for key, why in REFUSED_KEYS.items():
        if d.get(key) not in (None, 0, {}):
            raise HFConfigError(f"{source}: {key}: {why}")
    unknown = sorted(k for k in d if k not in known and k not in REFUSED_KEYS)
    if unknown:
        raise HFConfigError(
            f"{source}: unknown key(s) {unknown} for model_type {d.get('model_type', 'llama')!r}"
            f" (moa-jax would not run what they ask for; a typo?)"
        )
    for key, value in d.items():
        domain = known.get(key)
        if value is None or domain is None:
            continue
        try:
            domain.check(value)
        except ValueError as e:
            raise HFConfigError(f"{source}: {key} {e}") from None
    _check_ids(d.get("eos_token_id"), "eos_token_id", source)
    for key in ("rope_scaling", "rope_parameters"):
        if d.get(key) is not None:
            check_rope(d[key], f"{source}: {key}")


def check_rope(params: Any, where: str) -> None:
    """A `rope_scaling` / `rope_parameters` object: known keys, each in its domain."""
    if not isinstance(params, Mapping):
        raise HFConfigError(f"{where} must be an object, got {params!r}")
    if any(isinstance(v, Mapping) for v in params.values()):
        raise HFConfigError(f"{where}: rope parameters per layer type are not supported")
    unknown = sorted(set(params) - set(ROPE_KEYS))
    if unknown:
        raise HFConfigError(
            f"{where}: unknown key(s) {unknown}; rope parameters moa-jax reads: "
            f"{', '.join(sorted(ROPE_KEYS))}"
        )
    for key, value in params.items():
        domain = ROPE_KEYS[key]
        if value is None or domain is None:
            continue
        try:
            domain.check(value)
        except ValueError as e:
            raise HFConfigError(f"{where}: {key} {e}") from None


def _check_ids(value: Any, key: str, source: str) -> None:
    ids = value if isinstance(value, list) else [value]
    for v in ids:
        if v is None and not isinstance(value, list):
            continue
        try:
            TOKEN_ID.check(v)
        except ValueError as e:
            raise HFConfigError(
                f"{source}: {key} must be a token id or a list of token ids; {v!r} {e}"
            ) from None
