"""`Family`: what a model family's checkpoints say differently from Llama's."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from moa_jax.config import ModelConfig
from moa_jax.errors import ModelConfigError


class HFConfigError(ModelConfigError):
    """An HF `config.json` that moa-jax cannot run as written."""


@dataclasses.dataclass(frozen=True)
class Family:
    """A model family.

    Attributes:
      name: `ModelConfig.family`.
      model_types: the HF `model_type` values it reads (the first is written).
      hf_architecture: the transformers class named in a written `config.json`.
      gguf_arch: llama.cpp's architecture name of its GGUF files, or None.
      differs: what differs from Llama, in a few words (README, `--help`).
      read_hf: HF config dict -> the family's `ModelConfig` fields (biases, q/k norm, window).
      write_hf: `ModelConfig` -> the family's `config.json` keys.
      hf_defaults: what the transformers config class assumes for keys a `config.json` leaves
        out, where that differs from Llama's (`num_key_value_heads`: the number of query heads,
        `head_dim`: hidden / heads), e.g. Qwen3's head_dim 128.
      hf_keys: the `config.json` keys the family reads besides the common ones
        (`schema.COMMON_KEYS`), with their domains; any other key is refused.
    """

    name: str
    model_types: tuple[str, ...]
    hf_architecture: str
    gguf_arch: str | None
    differs: str
    read_hf: Callable[[Mapping[str, Any]], dict[str, Any]]
    write_hf: Callable[[ModelConfig], dict[str, Any]]
    hf_defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    hf_keys: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def layer_windows(d: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
    """`sliding_window` and `window_layers` of a Qwen2/Qwen3 config: the window applies when
    `use_sliding_window` is set, to the layers from `max_window_layers` on (or to those that
    `layer_types` marks 'sliding_attention')."""
    if not d.get("use_sliding_window", False) or d.get("sliding_window") is None:
        return {"sliding_window": None, "window_layers": None}
    window = int(d["sliding_window"])
    types = d.get("layer_types")
    if types is not None:
        if len(types) != num_layers:
            raise HFConfigError(f"layer_types has {len(types)} entries for {num_layers} layers")
        unknown = sorted(set(types) - {"sliding_attention", "full_attention"})
        if unknown:
            raise HFConfigError(f"layer_types {unknown} are not supported")
        layers = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    else:
        first = int(d.get("max_window_layers", num_layers))
        layers = tuple(range(min(first, num_layers), num_layers))
    return {"sliding_window": window, "window_layers": layers}


def window_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The config.json keys of `cfg`'s model window, Qwen2/Qwen3 style."""
    if cfg.sliding_window is None:
        return {"use_sliding_window": False}
    layers = cfg.window_layers if cfg.window_layers is not None else range(cfg.num_layers)
    return {
        "use_sliding_window": True,
        "sliding_window": cfg.sliding_window,
        "max_window_layers": cfg.num_layers,
        "layer_types": [
            "sliding_attention" if i in layers else "full_attention" for i in range(cfg.num_layers)
        ],
    }
