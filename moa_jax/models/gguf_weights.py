"""llama.cpp GGUF files -> the model: dequantised weights, config from the header, tokenizer.

Architectures 'llama' (Llama, and Mistral, which llama.cpp writes as 'llama'), 'qwen2' and
'qwen3'. GGUF tensor names come from `gguf`'s own table for the architecture
(`gguf.TensorNameMap`, the one llama.cpp's converter uses); the tensors are dequantised, put in
HF layout (llama.cpp's q/k row permutation of 'llama' files undone; the Qwen files are not
permuted) and assembled through `weights.param_table`.

Public API:
  load_gguf(path, *, dtype, param_dtype) -> (CausalLM, tokenizer | None)
  gguf_model_config(path) -> ModelConfig
  gguf_config(meta, tensor_shapes, rope_freqs=None) -> ModelConfig
  gguf_metadata(reader) -> dict
  unpermute_qk(w, n_heads) -> np.ndarray
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from moa_jax.config import ModelConfig, RopeScaling
from moa_jax.models.causal_lm import CausalLM
from moa_jax.models.rotary import rotary_table
from moa_jax.models.tokenizer import tokenizer_from_gguf_metadata
from moa_jax.models.weights import (
    WeightsError,
    WeightsNotFoundError,
    assemble,
    param_table,
    short_list,
)

# Carries configuration (llama3 RoPE factors), not parameters.
_ROPE_FREQS = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"


# GGUF architecture -> (family, gguf's MODEL_ARCH)
_ARCHS = {
    "llama": ("llama", gguf.MODEL_ARCH.LLAMA),
    "qwen2": ("qwen2", gguf.MODEL_ARCH.QWEN2),
    "qwen3": ("qwen3", gguf.MODEL_ARCH.QWEN3),
}


def _gguf_names(cfg: ModelConfig) -> dict[str, str]:
    """HF name -> GGUF name of every tensor a GGUF of `cfg`'s family and depth may hold (biases
    and an untied output projection included, so that a file's extra tensors are named in
    errors)."""
    full = dataclasses.replace(
        cfg, qkv_bias=True, o_bias=True, mlp_bias=True, tie_word_embeddings=False
    )
    arch = next(a for fam, a in _ARCHS.values() if fam == cfg.family)
    names = gguf.get_tensor_name_map(arch, cfg.num_layers)
    return {hf: names.get_name(hf, try_suffixes=(".weight", ".bias")) for hf in param_table(full)}


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undoes llama.cpp's per-head row permutation of a q/k projection.

    llama.cpp's converter reorders each head's rows from HF's rotate-half layout
    (2, head_dim/2) to interleaved pairs (head_dim/2, 2) for its RoPE kernel.

    Args:
      w: GGUF weight [n_heads * head_dim, in] (or bias [n_heads * head_dim]).
      n_heads: query heads for q, KV heads for k.
    Returns:
      the HF-layout tensor, same shape.
    """
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise WeightsError(f"cannot un-permute a q/k tensor with {rows} rows over {n_heads} heads")
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_metadata(reader: Any) -> dict[str, Any]:
    """All GGUF key/value metadata as Python values (strings, numbers, lists)."""
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        meta[key] = field.contents()
    return meta


def _tidy(x: float) -> float:
    """`x` as a float, snapped to the nearest integer when within float32 storage noise."""
    r = round(float(x))
    return float(r) if abs(float(x) - r) <= 1e-4 * max(1.0, abs(r)) else float(x)


def _fit_llama3_scaling(
    factors: np.ndarray, theta: float, head_dim: int, original_context: int | None
) -> RopeScaling:
    """Recovers RoPE scaling parameters from llama.cpp's `rope_freqs` tensor.

    llama.cpp stores per-frequency divisors f_i (inv_freq_i = theta^(-2i/d) / f_i) instead of the
    llama3 hyper-parameters. Frequencies with 1 < f < factor lie in the smooth band where
    1/f = (1 - s)/factor + s and s is affine in 1/wavelength; fitting that line recovers the band
    edges low_wavelen = old_ctx/low_freq_factor and high_wavelen = old_ctx/high_freq_factor,
    which (with factor) fully determine the scaling. old_ctx is the GGUF's
    `rope.scaling.original_context_length` if given, else low_wavelen (so low_freq_factor = 1,
    as in Llama 3.x). The fit is checked by recomputing the frequencies.

    Args:
      factors: [head_dim // 2] divisors; theta: RoPE base; head_dim: per-head dimension.
    """
    factors = np.asarray(factors, np.float64).reshape(-1)
    if factors.shape[0] != head_dim // 2:
        raise WeightsError(f"rope_freqs has {factors.shape[0]} entries, expected {head_dim // 2}")
    factor = _tidy(factors.max())
    if np.allclose(factors, 1.0, rtol=1e-6):
        return RopeScaling()
    if np.allclose(factors, factor, rtol=1e-6):
        return RopeScaling(rope_type="linear", factor=factor)
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    wavelen = 2 * math.pi / inv
    tol = 1e-4 * factor
    medium = (factors > 1 + tol) & (factors < factor - tol)
    if medium.sum() >= 2:
        s = (1 / factors[medium] - 1 / factor) / (1 - 1 / factor)
        a, b = np.polyfit(1 / wavelen[medium], s, 1)  # s = a / wavelen + b
        low_wavelen, high_wavelen = -a / b, a / (1 - b)
    else:  # no smooth band: any edges between the unscaled and fully scaled frequencies do
        ones = wavelen[factors <= 1 + tol]
        full = wavelen[factors >= factor - tol]
        if medium.sum() == 1 or not len(ones) or not len(full):
            raise WeightsError("rope_freqs cannot be expressed as llama3 RoPE scaling")
        mid = math.sqrt(ones.max() * full.min())
        low_wavelen, high_wavelen = mid * 1.0001, mid / 1.0001
    old = int(original_context) if original_context else int(round(low_wavelen))
    scaling = RopeScaling(
        rope_type="llama3",
        factor=factor,
        low_freq_factor=_tidy(old / low_wavelen),
        high_freq_factor=_tidy(old / high_wavelen),
        original_max_position_embeddings=old,
    )
    probe = ModelConfig(
        vocab_size=1,
        hidden_size=head_dim,
        intermediate_size=1,
        num_layers=1,
        num_heads=1,
        num_kv_heads=1,
        head_dim=head_dim,
        rope_theta=theta,
        rope_scaling=scaling,
    )
    if not np.allclose(rotary_table(probe).inv_freq, inv / factors, rtol=1e-4):
        raise WeightsError("rope_freqs cannot be expressed as llama3 RoPE scaling")
    return scaling


def gguf_config(
    meta: Mapping[str, Any],
    tensor_shapes: Mapping[str, tuple[int, ...]],
    rope_freqs: np.ndarray | None = None,
) -> ModelConfig:
    """Builds a `ModelConfig` from GGUF metadata.

    Args:
      meta: GGUF metadata (`gguf_metadata`).
      tensor_shapes: GGUF tensor name -> numpy-order shape (tying and bias are read from it).
      rope_freqs: the `rope_freqs.weight` tensor if the file has one (llama3 scaling).
    """
    arch = meta.get("general.architecture")
    if arch not in _ARCHS:
        raise WeightsError(
            f"unsupported GGUF architecture {arch!r}: moa-jax reads {', '.join(_ARCHS)}"
        )
    family = _ARCHS[arch][0]

    def key(name: str, default: Any = None, required: bool = False) -> Any:
        full = name.format(arch=arch)  # a gguf.Keys template, e.g. '{arch}.context_length'

        if full not in meta:
            if required:
                raise WeightsError(f"GGUF metadata lacks {full!r}")
            return default
        return meta[full]

    hidden = int(key(gguf.Keys.LLM.EMBEDDING_LENGTH, required=True))
    heads = int(key(gguf.Keys.Attention.HEAD_COUNT, required=True))
    head_dim = int(key(gguf.Keys.Attention.KEY_LENGTH, hidden // heads))
    rot = key(gguf.Keys.Rope.DIMENSION_COUNT)
    if rot is not None and int(rot) != head_dim:
        raise WeightsError(
            f"partial RoPE (rope.dimension_count={rot}, head_dim={head_dim}) is not supported"
        )
    theta = float(key(gguf.Keys.Rope.FREQ_BASE, 10000.0))
    context = int(key(gguf.Keys.LLM.CONTEXT_LENGTH, 8192))
    scaling_type = key(gguf.Keys.Rope.SCALING_TYPE, "none")
    if rope_freqs is not None:
        scaling = _fit_llama3_scaling(
            rope_freqs, theta, head_dim, key(gguf.Keys.Rope.SCALING_ORIG_CTX_LEN)
        )
    elif scaling_type in ("none", None):
        scaling = RopeScaling()
    elif scaling_type == "linear":
        scaling = RopeScaling(
            rope_type="linear", factor=float(key(gguf.Keys.Rope.SCALING_FACTOR, 1.0))
        )
    else:
        raise WeightsError(f"unsupported GGUF rope scaling type {scaling_type!r}")

    if "tokenizer.ggml.tokens" in meta:
        vocab = len(meta["tokenizer.ggml.tokens"])
    elif key(gguf.Keys.LLM.VOCAB_SIZE) is not None:
        vocab = int(key(gguf.Keys.LLM.VOCAB_SIZE))
    else:
        vocab = int(tensor_shapes["token_embd.weight"][0])

    def token_id(name: str) -> int | None:
        v = meta.get(f"tokenizer.ggml.{name}")
        return None if v is None else int(v)

    eos = [i for i in (token_id("eos_token_id"), token_id("eot_token_id")) if i is not None]
    return ModelConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(key(gguf.Keys.LLM.FEED_FORWARD_LENGTH, required=True)),
        num_layers=int(key(gguf.Keys.LLM.BLOCK_COUNT, required=True)),
        num_heads=heads,
        num_kv_heads=int(key(gguf.Keys.Attention.HEAD_COUNT_KV, heads)),
        head_dim=head_dim,
        rope_theta=theta,
        rope_scaling=scaling,
        rms_norm_eps=float(key(gguf.Keys.Attention.LAYERNORM_RMS_EPS, 1e-5)),
        tie_word_embeddings="output.weight" not in tensor_shapes,
        max_position_embeddings=context,
        family=family,
        qkv_bias="blk.0.attn_q.bias" in tensor_shapes,
        o_bias="blk.0.attn_output.bias" in tensor_shapes,
        mlp_bias="blk.0.ffn_up.bias" in tensor_shapes,
        qk_norm=family == "qwen3",
        bos_token_id=token_id("bos_token_id"),
        eos_token_ids=tuple(dict.fromkeys(eos)),
        pad_token_id=token_id("padding_token_id"),
    )


def _open_gguf(path: Path) -> gguf.GGUFReader:
    if not path.is_file():
        raise WeightsNotFoundError(f"GGUF file {path} does not exist")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError/struct.error/IndexError on bad files
        raise WeightsError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def _read_gguf(
    path: Path,
) -> tuple[gguf.GGUFReader, dict[str, Any], ModelConfig, Callable[[str], np.ndarray]]:
    """(reader, metadata, ModelConfig, dequant(name) -> float32 array) of a GGUF file: reads the
    header and the small RoPE-factor tensor only."""
    reader = _open_gguf(path)
    meta = gguf_metadata(reader)
    tensors = {t.name: t for t in reader.tensors}
    # GGUF lists dimensions fastest-first; numpy order is the reverse.
    shapes = {n: tuple(int(d) for d in reversed(t.shape)) for n, t in tensors.items()}

    def dequant(name: str) -> np.ndarray:
        t = tensors[name]
        try:
            arr = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise WeightsError(f"{path}: tensor {name!r}: {e}") from None
        except (ValueError, IndexError) as e:  # truncated data
            raise WeightsError(
                f"{path}: tensor {name!r} cannot be read ({e}); the file is truncated or corrupt"
            ) from None
        return np.asarray(arr, np.float32).reshape(shapes[name])

    rope_freqs = dequant(_ROPE_FREQS) if _ROPE_FREQS in tensors else None
    return reader, meta, gguf_config(meta, shapes, rope_freqs), dequant


def gguf_model_config(path: str | Path) -> ModelConfig:
    """The architecture of a GGUF file, from its header (no weights read)."""
    return _read_gguf(Path(path))[2]


def load_gguf(
    path: str | Path, *, dtype: Any = "float32", param_dtype: Any = "float32"
) -> tuple[CausalLM, Any]:
    """Loads a llama.cpp GGUF file: dequantised weights and its tokenizer.

    Args:
      path: a `.gguf` file of architecture 'llama', 'qwen2' or 'qwen3' (any type
        `gguf.quants.dequantize` handles).
      dtype: compute dtype; param_dtype: storage dtype the dequantised weights are cast to.
    Returns:
      (model, tokenizer): tokenizer is a `transformers.PreTrainedTokenizerFast`, or None if the
      file has no tokenizer.
    """
    path = Path(path)
    reader, meta, cfg, dequant = _read_gguf(path)
    hf_to_gguf = _gguf_names(cfg)
    gguf_to_hf = {name: hf for hf, name in hf_to_gguf.items()}
    present = [t.name for t in reader.tensors if t.name != _ROPE_FREQS]
    unknown = sorted(name for name in present if name not in gguf_to_hf)
    if unknown:
        raise WeightsError(f"{path}: unexpected GGUF tensor(s) {short_list(unknown)}")

    def get(hf_name: str) -> np.ndarray:
        name = hf_to_gguf[hf_name]
        arr = dequant(name)
        if cfg.family == "llama" and ".attn_q." in name:
            arr = unpermute_qk(arr, cfg.num_heads)
        elif cfg.family == "llama" and ".attn_k." in name:
            arr = unpermute_qk(arr, cfg.num_kv_heads)
        return arr

    model = assemble(
        cfg,
        [gguf_to_hf[name] for name in present],
        get,
        dtype=dtype,
        param_dtype=param_dtype,
        source=str(path),
        progress=f"dequantising {path.name}",
        describe=lambda hf: f"{hf_to_gguf[hf]!r} (HF {hf!r})",
    )
    tokenizer = (
        tokenizer_from_gguf_metadata(meta, model_max_length=cfg.max_position_embeddings)
        if "tokenizer.ggml.tokens" in meta
        else None
    )
    return model, tokenizer
