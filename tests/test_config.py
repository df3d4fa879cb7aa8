"""ModelConfig parsing from both HF config.json layouts, the families' dialects, and dtype names."""

import jax.numpy as jnp
import pytest
from transformers import LlamaConfig

from moa_jax.config import RopeScaling, parse_dtype
from moa_jax.models.families import HFConfigError, config_from_hf, config_to_hf
from moa_jax.models.hf_weights import hf_model_config
from moa_jax.models.weights import WeightsError, WeightsNotFoundError

LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def _legacy_dict():
    # The transformers 4.x / published-checkpoint layout: top-level theta and scaling.
    return {
        "vocab_size": 100,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rope_theta": 500000.0,
        "rope_scaling": dict(LLAMA3_SCALING),
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "eos_token_id": [7, 9],
        "bos_token_id": 1,
    }


def test_legacy_layout():
    cfg = config_from_hf(_legacy_dict())
    assert cfg.head_dim == 16 and cfg.num_kv_heads == 2 and cfg.group_size == 2
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    assert cfg.eos_token_ids == (7, 9)


def test_transformers5_layout_matches_legacy():
    # transformers 5.x normalises into `rope_parameters`; both must give the same config.
    d = LlamaConfig(**_legacy_dict()).to_dict()
    assert config_from_hf(d) == config_from_hf(_legacy_dict())


def test_round_trip_through_hf_dict():
    cfg = config_from_hf(_legacy_dict())
    assert config_from_hf(config_to_hf(cfg)) == cfg
    assert config_from_hf(LlamaConfig(**config_to_hf(cfg)).to_dict()) == cfg


def test_explicit_head_dim():
    d = _legacy_dict() | {"head_dim": 32}
    assert config_from_hf(d).head_dim == 32


def test_bad_configs():
    with pytest.raises(HFConfigError, match="missing required keys.*vocab_size"):
        config_from_hf({k: v for k, v in _legacy_dict().items() if k != "vocab_size"})
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        config_from_hf(_legacy_dict() | {"num_key_value_heads": 3})
    with pytest.raises(HFConfigError, match="unsupported rope_type 'dynamic'"):
        config_from_hf(_legacy_dict() | {"rope_scaling": {"rope_type": "dynamic", "factor": 4.0}})
    with pytest.raises(HFConfigError, match="hidden_act 'gelu' is not supported"):
        config_from_hf(_legacy_dict() | {"hidden_act": "gelu"})
    with pytest.raises(HFConfigError, match="model_type 'gemma' is not supported.*llama, mistral"):
        config_from_hf(_legacy_dict() | {"model_type": "gemma"})
    with pytest.raises(HFConfigError, match="must hold a JSON object"):
        config_from_hf([1, 2])


def test_missing_config_file(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="config.json"):
        hf_model_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(WeightsError, match="not valid JSON"):
        hf_model_config(tmp_path)


def test_parse_dtype():
    assert parse_dtype("bf16") == jnp.bfloat16
    assert parse_dtype("float32") == jnp.float32
    assert parse_dtype(jnp.float16) == jnp.float16
    with pytest.raises(ValueError, match="unknown dtype name 'float33'"):
        parse_dtype("float33")


def test_atomic_writes_replace_whole_files_and_leave_no_temporaries(tmp_path, monkeypatch):
    from moa_jax import files

    path = files.atomic_write_text(tmp_path / "a.json", "first ü\n")
    assert path.read_text(encoding="utf-8") == "first ü\n"
    files.atomic_write_bytes(path, b"second")
    assert path.read_bytes() == b"second"

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(files.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        files.atomic_write_text(path, "third")
    assert path.read_bytes() == b"second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_compilation_cache_on_accelerators_only(monkeypatch, tmp_path):
    """CLIs keep compiled programs under $MOA_JAX_CACHE/xla on an accelerator, not on the CPU."""
    import jax

    from moa_jax.runtime import enable_compilation_cache

    monkeypatch.setenv("MOA_JAX_CACHE", str(tmp_path))
    old = jax.config.jax_compilation_cache_dir
    try:
        enable_compilation_cache()  # CPU: left off
        assert jax.config.jax_compilation_cache_dir == old
        monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
        monkeypatch.setenv("MOA_JAX_NO_COMPILE_CACHE", "1")
        enable_compilation_cache()  # opted out
        assert jax.config.jax_compilation_cache_dir == old
        monkeypatch.delenv("MOA_JAX_NO_COMPILE_CACHE")
        enable_compilation_cache()
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xla")
    finally:
        jax.config.update("jax_compilation_cache_dir", old)


def test_no_transformers_advisory_on_import():
    """Importing moa_jax then transformers prints nothing, with or without PyTorch."""
    import subprocess
    import sys

    code = (
        "import sys, moa_jax; sys.modules['torch'] = None; import transformers; "
        "from transformers import AutoConfig"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "PyTorch was not found" not in out.stderr + out.stdout


@pytest.mark.parametrize("command", ["profile", "eval", "train"])
def test_config_files_load(command):
    """Every configs/<command>/*.yaml parses into its command's typed config, each key as
    written (lists and numbers keep their values; eval's comma lists resolve to lists)."""
    from pathlib import Path

    import yaml

    from moa_jax.cli import parse_config

    root = Path(__file__).resolve().parents[1] / "configs" / command
    files = sorted(root.glob("*.yaml"))
    assert files
    for path in files:
        argv = ["--config", str(path)]
        values = yaml.safe_load(path.read_text())
        if command == "profile":
            from moa_jax.profile import ProfileConfig

            config = parse_config(ProfileConfig, argv, prog="p", description="")
        elif command == "eval":
            from moa_jax.eval.__main__ import EvalConfig

            config = parse_config(EvalConfig, argv, prog="e", description="")
            assert all(isinstance(getattr(config, k), list) for k in ("tasks", "lengths"))
            values = {k: v for k, v in values.items() if k not in ("tasks", "methods", "out")}
        else:
            from moa_jax.train.config import parse_config as train_config

            config = train_config(argv)
        for key, value in values.items():
            assert getattr(config, key) == value, (path, key)


@pytest.mark.parametrize(
    "change, words",
    [
        ({"hidden_sizee": 64}, "unknown key(s) ['hidden_sizee']"),
        ({"sliding_window": 16}, "unknown key(s) ['sliding_window'] for model_type 'llama'"),
        ({"hidden_size": "64"}, "hidden_size must be an integer >= 1, got '64'"),
        ({"num_hidden_layers": 2.0}, "num_hidden_layers must be an integer >= 1, got 2.0"),
        ({"vocab_size": -3}, "vocab_size must be an integer >= 1, got -3"),
        ({"rms_norm_eps": float("nan")}, "rms_norm_eps must be a finite number > 0, got nan"),
        ({"tie_word_embeddings": 1}, "tie_word_embeddings must be true or false, got 1"),
        ({"eos_token_id": [2, "x"]}, "eos_token_id must be a token id or a list of token ids"),
        ({"quantization_config": {"bits": 4}}, "quantized checkpoints are not supported"),
        ({"num_local_experts": 8}, "mixture-of-experts models are not supported"),
        ({"rope_interleaved": True}, "rope_interleaved must be one of False"),
        ({"rope_scaling": {"rope_type": "llama3", "factr": 8.0}}, "rope_scaling: unknown key(s)"),
        ({"rope_scaling": {"rope_type": "linear", "factor": -2}}, "factor must be a finite number"),
        ({"rope_scaling": [1, 2]}, "rope_scaling must be an object"),
    ],
)
def test_hf_config_schema_refuses_naming_the_key(change, words):
    d = {**_legacy_dict(), **change}
    with pytest.raises(HFConfigError) as e:
        config_from_hf(d, "m/config.json")
    assert "m/config.json" in str(e.value) and words in str(e.value), str(e.value)


def test_hf_config_schema_takes_the_keys_real_checkpoints_carry():
    """Metadata keys of real config.json files (transformers' own, SmolLM2's) are read as
    nothing; null is "not set"."""
    extra = {
        "_name_or_path": "x",
        "transformers_version": "4.44.0",
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "initializer_range": 0.02,
        "attention_dropout": 0.0,
        "pretraining_tp": 1,
        "is_llama_config": True,
        "rope_interleaved": False,
        "pad_token_id": None,
    }
    assert config_from_hf({**_legacy_dict(), **extra}) == config_from_hf(_legacy_dict())
