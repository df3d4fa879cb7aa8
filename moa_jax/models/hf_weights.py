"""HF checkpoints of the supported families (`config.json` + safetensors, sharded or not) <->
the model.

Tensors are read and written by the `safetensors` package's numpy loaders (bf16 as ml_dtypes'
bfloat16) and mapped through `weights.param_table`.

Public API:
  load_hf(path, *, dtype, param_dtype) -> CausalLM
  hf_model_config(directory) -> ModelConfig
  hf_state_dict(model, *, dtype=None) -> {hf_name: np.ndarray}
  save_hf(model, path, *, dtype=None, tokenizer=None, max_shard_bytes=None)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import SafetensorError, deserialize, safe_open
from safetensors.numpy import save_file

from moa_jax.config import ModelConfig, parse_dtype
from moa_jax.models.causal_lm import CausalLM
from moa_jax.models.families import HFConfigError, config_from_hf, config_to_hf
from moa_jax.models.weights import WeightsError, WeightsNotFoundError, assemble, hf_spec

# safetensors' numpy loader has no fp8 dtypes; these are read from its raw deserializer.
_FP8_DTYPES = {"F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}


class _SafetensorsFile:
    """One .safetensors file, header validated by `safe_open`; tensors as numpy arrays."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self._handle = safe_open(path, framework="numpy")
        except SafetensorError as e:
            if "JSON" in str(e):
                raise WeightsError(f"{path}: corrupt safetensors header ({e})") from None
            raise WeightsError(f"{path}: truncated or corrupt safetensors file ({e})") from None
        self._raw: dict[str, dict[str, Any]] | None = None

    def keys(self) -> list[str]:
        return list(self._handle.keys())

    def get(self, name: str) -> np.ndarray:
        fp8 = _FP8_DTYPES.get(self._handle.get_slice(name).get_dtype())
        if fp8 is None:
            return self._handle.get_tensor(name)
        if self._raw is None:
            self._raw = dict(deserialize(self.path.read_bytes()))
        info = self._raw[name]
        return np.frombuffer(info["data"], dtype=fp8).reshape(info["shape"])


def _open_safetensors(directory: Path) -> dict[str, _SafetensorsFile]:
    """Maps every tensor name in an HF directory to the file holding it."""
    index_path = directory / "model.safetensors.index.json"
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise WeightsError(f"{index_path}: not a valid safetensors index ({e})") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (directory / f).is_file()]
        if missing:
            raise WeightsNotFoundError(f"{index_path} names shard(s) that do not exist: {missing}")
    elif (directory / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        files = sorted(p.name for p in directory.glob("*.safetensors"))
    if not files:
        others = sorted(
            p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf")
        )
        hint = f" (found {others}: only safetensors is supported)" if others else ""
        raise WeightsNotFoundError(f"no *.safetensors files in {directory}{hint}")
    where: dict[str, _SafetensorsFile] = {}
    for name in files:
        sf = _SafetensorsFile(directory / name)
        for key in sf.keys():
            if key in where:
                raise WeightsError(
                    f"tensor {key!r} appears in both {where[key].path.name} and {name}"
                )
            where[key] = sf
    return where


def load_hf(path: str | Path, *, dtype: Any = "float32", param_dtype: Any = "float32") -> CausalLM:
    """Loads an HF checkpoint directory of a supported family (`config.json` + safetensors,
    sharded or not).

    Args:
      path: directory with `config.json` and `model.safetensors` or
        `model.safetensors.index.json` + shards.
      dtype: compute dtype of the model.
      param_dtype: storage dtype the weights are cast to.
    Returns:
      the model with the checkpoint's weights.
    Raises:
      WeightsNotFoundError: missing directory, config or safetensors files.
      WeightsError: corrupt/truncated files, missing/unexpected tensors, shape mismatches.
    """
    directory = Path(path)
    cfg = hf_model_config(directory)
    files = _open_safetensors(directory)
    return assemble(
        cfg,
        files,
        lambda n: files[n].get(n),
        dtype=dtype,
        param_dtype=param_dtype,
        source=str(directory),
    )


def hf_model_config(directory: str | Path) -> ModelConfig:
    """The architecture of an HF checkpoint directory, from its `config.json`.

    Raises WeightsNotFoundError (no directory or config.json) or WeightsError (invalid JSON,
    a family or feature moa-jax does not run, missing or invalid values).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise WeightsNotFoundError(f"HF checkpoint directory {directory} does not exist")
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise WeightsNotFoundError(f"no config.json in {directory}")
    try:
        hf_cfg = json.loads(config_path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{config_path} is not valid JSON (UTF-8): {e}") from None
    try:
        return config_from_hf(hf_cfg, str(config_path))
    except HFConfigError as e:
        raise WeightsError(str(e)) from None


def hf_state_dict(model: CausalLM, *, dtype: Any = None) -> dict[str, np.ndarray]:
    """The model's parameters as HF-named numpy arrays in HF layout (cast to `dtype` if given)."""
    target = None if dtype is None else np.dtype(parse_dtype(dtype))
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = np.asarray(var.get_value())
        spec = hf_spec(tuple(path), tuple(value.shape))
        arr = spec.to_hf(value)
        if target is not None:
            arr = arr.astype(target)
        out[spec.hf_name] = np.ascontiguousarray(arr)
    return out


_TORCH_DTYPE_NAMES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def save_hf(
    model: CausalLM,
    path: str | Path,
    *,
    dtype: Any = None,
    tokenizer: Any = None,
    max_shard_bytes: int | None = None,
) -> None:
    """Writes an HF checkpoint that the family's transformers class (`LlamaForCausalLM`,
    `MistralForCausalLM`, `Qwen2ForCausalLM`, `Qwen3ForCausalLM`) loads with `from_pretrained`.

    Args:
      model: the model to save.
      path: output directory (created if needed).
      dtype: storage dtype of the tensors (default: the params' own dtype).
      tokenizer: optional HF tokenizer, saved beside the weights with `save_pretrained`.
      max_shard_bytes: if given, split the weights into shards of at most this many bytes
        (plus `model.safetensors.index.json`); otherwise one `model.safetensors`.
    """
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tensors = hf_state_dict(model, dtype=dtype)
    hf_cfg = config_to_hf(model.config)
    dtype_name = next(iter(tensors.values())).dtype.name
    hf_cfg["torch_dtype"] = _TORCH_DTYPE_NAMES.get(dtype_name, "float32")
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
    meta = {"format": "pt"}
    if max_shard_bytes is None:
        save_file(tensors, out / "model.safetensors", metadata=meta)
    else:
        shards: list[dict[str, np.ndarray]] = [{}]
        size = 0
        for name, arr in tensors.items():
            if shards[-1] and size + arr.nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = arr
            size += arr.nbytes
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, out / fname, metadata=meta)
            weight_map.update({name: fname for name in shard})
        index = {
            "metadata": {"total_size": sum(a.nbytes for a in tensors.values())},
            "weight_map": weight_map,
        }
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
