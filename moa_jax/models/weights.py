"""The one table between our model's params and HF tensor names, shared by every weight format.

`_RULES` maps our NNX parameter path (dotted, e.g. `layers.3.self_attn.q_proj.kernel`) to the HF
tensor name and the layout transform. HF `nn.Linear.weight` is [out, in]; our `nnx.Linear.kernel`
is [in, out] (transposed); embeddings ([V, E]) and norm weights ([E]) are identical. Readers of a
format (`hf_weights`: HF safetensors, `gguf_weights`: llama.cpp GGUF) name their tensors in HF
terms and HF layout and build the model through `assemble`.

Public API:
  param_table(cfg) -> {hf_name: ParamSpec}
  hf_spec(path, shape) -> ParamSpec
  assemble(cfg, names, get, ...) -> the model
  WeightsError, WeightsNotFoundError
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from moa_jax.config import ModelConfig, parse_dtype
from moa_jax.models.decoder import DecoderLM, abstract_model


class WeightsError(ValueError):
    """A checkpoint cannot be read or does not match the model config."""


class WeightsNotFoundError(WeightsError, FileNotFoundError):
    """A checkpoint path (directory, file, shard) does not exist."""


# --------------------------------------------------------------------------------------------
# The table: our param path <-> HF tensor name, with the layout transform.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Rule:
    pattern: str  # regex over our dotted param path (full match)
    hf_template: str  # `re` replacement template giving the HF tensor name
    transpose: bool  # HF layout is the transpose of ours (Linear [out, in] vs kernel [in, out])


_PROJ = r"self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj"
_RULES: tuple[_Rule, ...] = (
    _Rule(r"embed_tokens\.embedding", "model.embed_tokens.weight", False),
    _Rule(rf"layers\.(\d+)\.({_PROJ})\.kernel", r"model.layers.\1.\2.weight", True),
    _Rule(rf"layers\.(\d+)\.({_PROJ})\.bias", r"model.layers.\1.\2.bias", False),
    _Rule(
        r"layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight",
        r"model.layers.\1.\2.weight",
        False,
    ),
    _Rule(
        r"layers\.(\d+)\.self_attn\.(q_norm|k_norm)\.weight",
        r"model.layers.\1.self_attn.\2.weight",
        False,
    ),
    _Rule(r"norm\.weight", "model.norm.weight", False),
    _Rule(r"lm_head\.kernel", "lm_head.weight", True),
)

# HF tensors that carry no parameters of ours and are skipped silently.
_IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One parameter: our path, its HF name, the layout transform and both shapes."""

    path: tuple[str | int, ...]
    hf_name: str
    transpose: bool
    shape: tuple[int, ...]  # ours
    hf_shape: tuple[int, ...]  # HF layout

    def to_ours(self, hf_array: np.ndarray) -> np.ndarray:
        return hf_array.T if self.transpose else hf_array

    def to_hf(self, array: np.ndarray) -> np.ndarray:
        return array.T if self.transpose else array


def hf_spec(path: tuple[Any, ...], shape: tuple[int, ...]) -> ParamSpec:
    """The `ParamSpec` of our parameter at `path` (NNX path) of shape `shape` (ours)."""
    dotted = ".".join(str(p) for p in path)
    for rule in _RULES:
        m = re.fullmatch(rule.pattern, dotted)
        if m:
            hf_shape = tuple(reversed(shape)) if rule.transpose else tuple(shape)
            return ParamSpec(
                tuple(path), m.expand(rule.hf_template), rule.transpose, tuple(shape), hf_shape
            )
    raise WeightsError(f"internal: no HF name rule for parameter {dotted!r}")


def param_table(cfg: ModelConfig) -> dict[str, ParamSpec]:
    """Maps every HF tensor name the config needs to its `ParamSpec` (no allocation)."""
    _, state = nnx.split(abstract_model(cfg))
    table = {}
    for path, var in nnx.to_flat_state(state):
        spec = hf_spec(tuple(path), tuple(var.get_value().shape))
        table[spec.hf_name] = spec
    return table


def _is_ignored(name: str, cfg: ModelConfig) -> bool:
    if name.endswith(_IGNORED_HF_SUFFIXES):
        return True
    # Some tied checkpoints still store the (duplicate) output projection.
    return cfg.tie_word_embeddings and name == "lm_head.weight"


def assemble(
    cfg: ModelConfig,
    names: Iterable[str],
    get: Callable[[str], np.ndarray],
    *,
    dtype: Any,
    param_dtype: Any,
    source: str,
    progress: str | None = None,
    describe: Callable[[str], str] = repr,
) -> DecoderLM:
    """Builds the model from HF-named, HF-layout tensors.

    Args:
      cfg: the architecture the tensors must match.
      names: every tensor name available in the source.
      get: returns the tensor (HF layout, any float dtype) for a name.
      source: file/dir name used in error messages.
      progress: tqdm description, or None for no progress bar.
      describe: how error messages name a tensor, given its HF name.
    """
    table = param_table(cfg)
    names = set(names)
    extra = sorted(n for n in names - set(table) if not _is_ignored(n, cfg))
    if extra:
        raise WeightsError(
            f"{source}: unexpected tensor(s) not used by the model config: "
            f"{short_list(extra, describe)}"
        )
    missing = sorted(set(table) - names)
    if missing:
        raise WeightsError(f"{source}: missing tensor(s) {short_list(missing, describe)}")
    np_param_dtype = np.dtype(parse_dtype(param_dtype))

    graphdef, state = nnx.split(abstract_model(cfg, dtype=dtype, param_dtype=param_dtype))
    flat = list(nnx.to_flat_state(state))
    by_path = {spec.path: spec for spec in table.values()}
    new_flat = []
    for path, var in tqdm(flat, desc=progress, disable=progress is None, unit="tensor"):
        spec = by_path[tuple(path)]
        arr = get(spec.hf_name)
        if tuple(arr.shape) != spec.hf_shape:
            raise WeightsError(
                f"{source}: tensor {describe(spec.hf_name)} has shape {tuple(arr.shape)} but the "
                f"config expects {spec.hf_shape}"
            )
        value = np.ascontiguousarray(spec.to_ours(arr)).astype(np_param_dtype, copy=False)
        if not np.isfinite(value).all():
            bad = int(value.size - np.isfinite(value).sum())
            raise WeightsError(
                f"{source}: tensor {describe(spec.hf_name)} has {bad} non-finite "
                f"value(s) (NaN or inf); the checkpoint is corrupt"
            )
        new_flat.append((path, var.replace(jnp.asarray(value))))
    return nnx.merge(graphdef, nnx.from_flat_state(new_flat))


def short_list(names: list[str], describe: Callable[[str], str] = repr, n: int = 8) -> str:
    """The first `n` names, described, for an error message."""
    shown = ", ".join(describe(x) for x in names[:n])
    return shown + (f", ... ({len(names)} in all)" if len(names) > n else "")
