"""Weight conversion: HF safetensors <-> `Llama` params, and GGUF (llama.cpp) -> `Llama`.

Every format goes through ONE table, `_RULES`, from our NNX parameter path (dotted, e.g.
`layers.3.self_attn.q_proj.kernel`) to the HF tensor name and the per-tensor transform between
layouts. HF `nn.Linear.weight` is [out, in]; our `nnx.Linear.kernel` is [in, out] (transposed);
embeddings ([V, E]) and norm weights ([E]) are identical. GGUF tensors are first renamed to HF
names (`_gguf_to_hf_name`) and put in HF layout (llama.cpp's q/k row permutation undone), then
assembled through the same table.

Public API:
  load_hf(path, *, dtype, param_dtype) -> Llama
  save_hf(model, path, *, dtype=None, tokenizer=None, max_shard_bytes=None)
  load_gguf(path, *, dtype, param_dtype) -> (Llama, tokenizer)
  param_table(cfg) -> {hf_name: ParamSpec}
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import struct
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from moa_jax.config import ModelConfig, RopeScaling, parse_dtype
from moa_jax.models.llama import Llama, abstract_model, rope_inv_freq
from moa_jax.models.tokenizer import tokenizer_from_gguf_metadata


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


def _hf_spec(path: tuple[Any, ...], shape: tuple[int, ...]) -> ParamSpec:
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
        spec = _hf_spec(tuple(path), tuple(var.get_value().shape))
        table[spec.hf_name] = spec
    return table


def _is_ignored(name: str, cfg: ModelConfig) -> bool:
    if name.endswith(_IGNORED_HF_SUFFIXES):
        return True
    # Some tied checkpoints still store the (duplicate) output projection.
    return cfg.tie_word_embeddings and name == "lm_head.weight"


def _assemble(
    cfg: ModelConfig,
    names: Iterable[str],
    get: Callable[[str], np.ndarray],
    *,
    dtype: Any,
    param_dtype: Any,
    source: str,
    progress: str | None = None,
    describe: Callable[[str], str] = repr,
) -> Llama:
    """Builds a `Llama` from HF-named, HF-layout tensors.

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
            f"{_short_list(extra, describe)}"
        )
    missing = sorted(set(table) - names)
    if missing:
        raise WeightsError(f"{source}: missing tensor(s) {_short_list(missing, describe)}")
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


def _short_list(names: list[str], describe: Callable[[str], str] = repr, n: int = 8) -> str:
    shown = ", ".join(describe(x) for x in names[:n])
    return shown + (f", ... ({len(names)} in all)" if len(names) > n else "")


# --------------------------------------------------------------------------------------------
# Safetensors reading (numpy; bf16/fp8 through ml_dtypes).
# --------------------------------------------------------------------------------------------

_RAW_DTYPES = {
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
}


class _SafetensorsFile:
    """One .safetensors file: validated header, tensors read as numpy arrays."""

    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise WeightsError(f"{path}: truncated or corrupt safetensors file (no header)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise WeightsError(
                    f"{path}: truncated or corrupt safetensors file (header of "
                    f"{n} bytes, file of {size} bytes)"
                )
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise WeightsError(f"{path}: corrupt safetensors header: {e}") from None
        self.data_start = 8 + n
        header.pop("__metadata__", None)
        self.header: dict[str, dict[str, Any]] = header
        end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
        if self.data_start + end > size:
            raise WeightsError(
                f"{path}: truncated safetensors file: tensors need "
                f"{self.data_start + end} bytes, file has {size}"
            )
        try:
            from safetensors import safe_open

            self._handle = safe_open(str(path), framework="numpy")
        except Exception as e:  # SafetensorError has no stable import path across versions
            raise WeightsError(f"{path}: cannot read safetensors file: {e}") from None

    def keys(self) -> list[str]:
        return list(self.header)

    def get(self, name: str) -> np.ndarray:
        info = self.header[name]
        raw = _RAW_DTYPES.get(info["dtype"])
        if raw is None:
            return self._handle.get_tensor(name)
        start, stop = (int(x) for x in info["data_offsets"])
        with open(self.path, "rb") as f:
            f.seek(self.data_start + start)
            buf = f.read(stop - start)
        return np.frombuffer(buf, dtype=raw).reshape(info["shape"])


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


def load_hf(path: str | Path, *, dtype: Any = "float32", param_dtype: Any = "float32") -> Llama:
    """Loads an HF Llama checkpoint directory (`config.json` + safetensors, sharded or not).

    Args:
      path: directory with `config.json` and `model.safetensors` or
        `model.safetensors.index.json` + shards.
      dtype: compute dtype of the model.
      param_dtype: storage dtype the weights are cast to.
    Returns:
      the `Llama` model with the checkpoint's weights.
    Raises:
      WeightsNotFoundError: missing directory, config or safetensors files.
      WeightsError: corrupt/truncated files, missing/unexpected tensors, shape mismatches.
    """
    directory = Path(path)
    cfg = hf_model_config(directory)
    files = _open_safetensors(directory)
    return _assemble(
        cfg,
        files,
        lambda n: files[n].get(n),
        dtype=dtype,
        param_dtype=param_dtype,
        source=str(directory),
    )


def hf_model_config(directory: str | Path) -> ModelConfig:
    """The architecture of an HF Llama checkpoint directory, from its `config.json`.

    Raises WeightsNotFoundError (no directory or config.json) or WeightsError (invalid JSON,
    not a Llama, missing or invalid values).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise WeightsNotFoundError(f"HF checkpoint directory {directory} does not exist")
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise WeightsNotFoundError(f"no config.json in {directory}")
    try:
        hf_cfg = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise WeightsError(f"{config_path} is not valid JSON: {e}") from None
    model_type = hf_cfg.get("model_type", "llama")
    if model_type != "llama":
        raise WeightsError(
            f"{config_path}: model_type {model_type!r} is not supported; moa-jax "
            f"loads Llama checkpoints (model_type 'llama')"
        )
    if not isinstance(hf_cfg, dict):
        raise WeightsError(f"{config_path} must hold a JSON object")
    try:
        return ModelConfig.from_hf_dict(hf_cfg)
    except (ValueError, TypeError) as e:
        raise WeightsError(f"{config_path}: {e}") from None


# --------------------------------------------------------------------------------------------
# Saving in HF format.
# --------------------------------------------------------------------------------------------


def hf_state_dict(model: Llama, *, dtype: Any = None) -> dict[str, np.ndarray]:
    """The model's parameters as HF-named numpy arrays in HF layout (cast to `dtype` if given)."""
    target = None if dtype is None else np.dtype(parse_dtype(dtype))
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = np.asarray(var.get_value())
        spec = _hf_spec(tuple(path), tuple(value.shape))
        arr = spec.to_hf(value)
        if target is not None:
            arr = arr.astype(target)
        out[spec.hf_name] = np.ascontiguousarray(arr)
    return out


_TORCH_DTYPE_NAMES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def save_hf(
    model: Llama,
    path: str | Path,
    *,
    dtype: Any = None,
    tokenizer: Any = None,
    max_shard_bytes: int | None = None,
) -> None:
    """Writes an HF Llama checkpoint that `transformers.LlamaForCausalLM.from_pretrained` loads.

    Args:
      model: the model to save.
      path: output directory (created if needed).
      dtype: storage dtype of the tensors (default: the params' own dtype).
      tokenizer: optional HF tokenizer, saved beside the weights with `save_pretrained`.
      max_shard_bytes: if given, split the weights into shards of at most this many bytes
        (plus `model.safetensors.index.json`); otherwise one `model.safetensors`.
    """
    from safetensors.numpy import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tensors = hf_state_dict(model, dtype=dtype)
    hf_cfg = model.config.to_hf_dict()
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


# --------------------------------------------------------------------------------------------
# GGUF (llama.cpp).
# --------------------------------------------------------------------------------------------

_GGUF_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GGUF_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Tensors that carry configuration, not parameters (llama3 rope factors).
_GGUF_ROPE_FREQS = "rope_freqs.weight"


def _hf_to_gguf_name(hf_name: str) -> str:
    """GGUF name of an HF tensor name (inverse of `_gguf_to_hf_name`), or the name itself."""
    for gguf_name, hf in _GGUF_TOP_NAMES.items():
        if hf == hf_name:
            return gguf_name
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", hf_name)
    if m:
        for short, long in _GGUF_BLOCK_NAMES.items():
            if long == m.group(2):
                return f"blk.{m.group(1)}.{short}.{m.group(3)}"
    return hf_name


def _gguf_to_hf_name(name: str) -> str | None:
    """HF name of a GGUF tensor, or None if the tensor is unknown."""
    if name in _GGUF_TOP_NAMES:
        return _GGUF_TOP_NAMES[name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if m and m.group(2) in _GGUF_BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_GGUF_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
    return None


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
    if not np.allclose(rope_inv_freq(probe), inv / factors, rtol=1e-4):
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
    if arch != "llama":
        raise WeightsError(f"unsupported GGUF architecture {arch!r}: moa-jax reads 'llama'")

    def key(name: str, default: Any = None, required: bool = False) -> Any:
        full = f"{arch}.{name}"
        if full not in meta:
            if required:
                raise WeightsError(f"GGUF metadata lacks {full!r}")
            return default
        return meta[full]

    hidden = int(key("embedding_length", required=True))
    heads = int(key("attention.head_count", required=True))
    head_dim = int(key("attention.key_length", hidden // heads))
    rot = key("rope.dimension_count")
    if rot is not None and int(rot) != head_dim:
        raise WeightsError(
            f"partial RoPE (rope.dimension_count={rot}, head_dim={head_dim}) is not supported"
        )
    theta = float(key("rope.freq_base", 10000.0))
    context = int(key("context_length", 8192))
    scaling_type = key("rope.scaling.type", "none")
    if rope_freqs is not None:
        scaling = _fit_llama3_scaling(
            rope_freqs, theta, head_dim, key("rope.scaling.original_context_length")
        )
    elif scaling_type in ("none", None):
        scaling = RopeScaling()
    elif scaling_type == "linear":
        scaling = RopeScaling(rope_type="linear", factor=float(key("rope.scaling.factor", 1.0)))
    else:
        raise WeightsError(f"unsupported GGUF rope scaling type {scaling_type!r}")

    if "tokenizer.ggml.tokens" in meta:
        vocab = len(meta["tokenizer.ggml.tokens"])
    elif key("vocab_size") is not None:
        vocab = int(key("vocab_size"))
    else:
        vocab = int(tensor_shapes["token_embd.weight"][0])

    def token_id(name: str) -> int | None:
        v = meta.get(f"tokenizer.ggml.{name}")
        return None if v is None else int(v)

    eos = [i for i in (token_id("eos_token_id"), token_id("eot_token_id")) if i is not None]
    return ModelConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length", required=True)),
        num_layers=int(key("block_count", required=True)),
        num_heads=heads,
        num_kv_heads=int(key("attention.head_count_kv", heads)),
        head_dim=head_dim,
        rope_theta=theta,
        rope_scaling=scaling,
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        tie_word_embeddings="output.weight" not in tensor_shapes,
        max_position_embeddings=context,
        attention_bias="blk.0.attn_q.bias" in tensor_shapes,
        mlp_bias="blk.0.ffn_up.bias" in tensor_shapes,
        bos_token_id=token_id("bos_token_id"),
        eos_token_ids=tuple(dict.fromkeys(eos)),
        pad_token_id=token_id("padding_token_id"),
    )


def _open_gguf(path: Path) -> Any:
    import gguf

    if not path.is_file():
        raise WeightsNotFoundError(f"GGUF file {path} does not exist")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError/struct.error/IndexError on bad files
        raise WeightsError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def _read_gguf(path: Path):
    """(reader, metadata, ModelConfig, dequant(name) -> float32 array) of a GGUF file: reads the
    header and the small RoPE-factor tensor only."""
    import gguf

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

    rope_freqs = dequant(_GGUF_ROPE_FREQS) if _GGUF_ROPE_FREQS in tensors else None
    return reader, meta, gguf_config(meta, shapes, rope_freqs), dequant


def gguf_model_config(path: str | Path) -> ModelConfig:
    """The architecture of a GGUF file, from its header (no weights read)."""
    return _read_gguf(Path(path))[2]


def load_gguf(
    path: str | Path, *, dtype: Any = "float32", param_dtype: Any = "float32"
) -> tuple[Llama, Any]:
    """Loads a llama.cpp GGUF file: dequantised weights and its tokenizer.

    Args:
      path: a `.gguf` file of architecture 'llama' (any type `gguf.quants.dequantize` handles).
      dtype: compute dtype; param_dtype: storage dtype the dequantised weights are cast to.
    Returns:
      (model, tokenizer): tokenizer is a `transformers.PreTrainedTokenizerFast`, or None if the
      file has no tokenizer.
    """

    path = Path(path)
    reader, meta, cfg, dequant = _read_gguf(path)
    tensors = {t.name: t for t in reader.tensors}

    hf_to_gguf = {}
    unknown = []
    for name in tensors:
        if name == _GGUF_ROPE_FREQS:
            continue
        hf = _gguf_to_hf_name(name)
        if hf is None:
            unknown.append(name)
        else:
            hf_to_gguf[hf] = name
    if unknown:
        raise WeightsError(f"{path}: unexpected GGUF tensor(s) {_short_list(sorted(unknown))}")

    def get(hf_name: str) -> np.ndarray:
        name = hf_to_gguf[hf_name]
        arr = dequant(name)
        if ".attn_q." in name:
            arr = unpermute_qk(arr, cfg.num_heads)
        elif ".attn_k." in name:
            arr = unpermute_qk(arr, cfg.num_kv_heads)
        return arr

    model = _assemble(
        cfg,
        hf_to_gguf,
        get,
        dtype=dtype,
        param_dtype=param_dtype,
        source=str(path),
        progress=f"dequantising {path.name}",
        describe=lambda hf: f"{_hf_to_gguf_name(hf)!r} (HF {hf!r})",
    )
    tokenizer = (
        tokenizer_from_gguf_metadata(meta, model_max_length=cfg.max_position_embeddings)
        if "tokenizer.ggml.tokens" in meta
        else None
    )
    return model, tokenizer
