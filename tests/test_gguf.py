"""GGUF -> moa_jax: files written by `gguf.GGUFWriter` from random HF models, the way llama.cpp's
converter lays them out (reversed dimension order; q/k rows permuted per head for 'llama' files,
Mistral's included, not for 'qwen2' / 'qwen3')."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from moa_jax.models.gguf_weights import load_gguf, unpermute_qk
from moa_jax.models.tokenizer import byte_alphabet, tokenizer_from_gguf_metadata
from moa_jax.models.weights import WeightsError, WeightsNotFoundError

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "1 2", "e m"]
TOKENS = SPECIALS + byte_alphabet() + ["Ġt", "he", "Ġthe", "12", "em"]
VOCAB = len(TOKENS)  # 264
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
IDS = np.random.default_rng(1).integers(0, VOCAB, size=(2, 20))

# GGUF architecture -> gguf's tensor-name table
_TENSOR_ARCH = {
    "llama": gguf.MODEL_ARCH.LLAMA,
    "qwen2": gguf.MODEL_ARCH.QWEN2,
    "qwen3": gguf.MODEL_ARCH.QWEN3,
}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf q/k layout: per head, rows (2, d/2) -> (d/2, 2)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_gguf(
    path: Path,
    hf,
    *,
    qtype: Q = Q.F32,
    arch: str = "llama",
    pre: str = "smollm",
    drop: tuple[str, ...] = (),
    extra: dict[str, np.ndarray] | None = None,
    rope_freqs: np.ndarray | None = None,
    linear_rope: float | None = None,
    yarn: bool = False,
    add_bos: bool = False,
) -> None:
    """Writes `hf` (an HF Llama, Mistral, Qwen2 or Qwen3 model) as llama.cpp would, under GGUF
    architecture `arch`; 2-D weights stored as `qtype`. Tensor names come from gguf's table for
    the architecture (Llama's for an architecture without one); q/k rows are permuted except in
    'qwen2' / 'qwen3' files."""
    c = hf.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    names = gguf.get_tensor_name_map(_TENSOR_ARCH.get(arch, gguf.MODEL_ARCH.LLAMA), 64)
    permute = arch not in _TENSOR_ARCH or arch == "llama"
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(head_dim)
    if head_dim != c.hidden_size // c.num_attention_heads:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if linear_rope is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(linear_rope)
    if yarn:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(4.0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(TOKENS)
    w.add_token_types([3] * len(SPECIALS) + [1] * (VOCAB - len(SPECIALS)))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_add_bos_token(add_bos)
    w.add_chat_template(TEMPLATE)
    for name, t in hf.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        arr = t.float().numpy()
        if permute and ".q_proj." in name:
            arr = llama_cpp_permute(arr, c.num_attention_heads)
        elif permute and ".k_proj." in name:
            arr = llama_cpp_permute(arr, c.num_key_value_heads)
        g = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if g in drop:
            continue
        if arr.ndim == 2 and qtype != Q.F32:
            w.add_tensor(g, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(g, arr.astype(np.float32))
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    for g, arr in (extra or {}).items():
        w.add_tensor(g, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def quantised_reference(hf, qtype: Q):
    """`hf` with every 2-D weight replaced by its `qtype` round trip (what the GGUF holds)."""
    with torch.no_grad():
        for p in hf.parameters():
            if p.ndim == 2:
                q = gguf.quants.quantize(p.numpy(), qtype)
                p.copy_(torch.from_numpy(gguf.quants.dequantize(q, qtype).reshape(p.shape)))
    return hf


def test_permutation_is_undone():
    w = np.arange(4 * 16 * 3, dtype=np.float32).reshape(64, 3)
    assert not np.array_equal(llama_cpp_permute(w, 4), w)
    np.testing.assert_array_equal(unpermute_qk(llama_cpp_permute(w, 4), 4), w)
    b = np.arange(32, dtype=np.float32)
    np.testing.assert_array_equal(unpermute_qk(llama_cpp_permute(b, 2), 2), b)


@pytest.mark.parametrize(
    "qtype,tied", [(Q.F32, False), (Q.F16, True), (Q.Q8_0, False)], ids=["f32", "f16-tied", "q8_0"]
)
def test_gguf_logits_match_hf(tmp_path, make_hf_llama, our_logits, hf_logits, qtype, tied):
    hf = make_hf_llama(
        vocab_size=VOCAB, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=0
    )
    write_gguf(tmp_path / "m.gguf", hf, qtype=qtype)
    model, tok = load_gguf(tmp_path / "m.gguf")
    cfg = model.config
    assert (cfg.vocab_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (
        VOCAB,
        2,
        4,
        2,
        16,
    )
    assert cfg.tie_word_embeddings == tied and not cfg.qkv_bias
    assert (cfg.bos_token_id, cfg.eos_token_ids, cfg.pad_token_id) == (1, (2,), 0)
    assert cfg.rope_scaling.rope_type == "default" and cfg.rope_theta == 10000.0
    ours = our_logits(model, IDS)
    if qtype == Q.F32:
        ref = hf_logits(hf, IDS)
    else:  # exact reference: the HF model holding the same rounded weights
        exact = hf_logits(hf, IDS)
        ref = hf_logits(quantised_reference(hf, qtype), IDS)
        assert 1e-5 < np.abs(ref - exact).max() < 0.1  # the rounding is real, and small
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    assert tok is not None
    assert tok.encode("<|im_start|>the") == [1, TOKENS.index("t"), TOKENS.index("he")]


def test_gguf_without_unpermute_would_be_wrong(tmp_path, make_hf_llama, our_logits, hf_logits):
    """Guards the test itself: the permutation in the file changes the logits if not undone."""
    hf = make_hf_llama(vocab_size=VOCAB)
    write_gguf(tmp_path / "m.gguf", hf)
    model, _ = load_gguf(tmp_path / "m.gguf")
    for layer in model.layers:  # re-apply llama.cpp's permutation to our kernels ([in, out])
        for proj, heads in ((layer.self_attn.q_proj, 4), (layer.self_attn.k_proj, 2)):
            k = np.asarray(proj.kernel[...])
            proj.kernel[...] = llama_cpp_permute(k.T, heads).T
    assert np.abs(our_logits(model, IDS) - hf_logits(hf, IDS)).max() > 1e-2


def test_gguf_llama3_rope_from_rope_freqs(tmp_path, make_hf_llama, our_logits, hf_logits):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    hf = make_hf_llama(vocab_size=VOCAB, rope_scaling=rope)
    inv_llama3 = ROPE_INIT_FUNCTIONS["llama3"](hf.config, "cpu")[0].double().numpy()
    inv = 1.0 / 10000.0 ** (np.arange(0, 16, 2) / 16)
    write_gguf(tmp_path / "m.gguf", hf, rope_freqs=inv / inv_llama3)  # llama.cpp's divisors
    model, _ = load_gguf(tmp_path / "m.gguf")
    rs = model.config.rope_scaling
    assert (
        rs.rope_type,
        rs.factor,
        rs.low_freq_factor,
        rs.high_freq_factor,
        rs.original_max_position_embeddings,
    ) == ("llama3", 8.0, 1.0, 4.0, 64)
    np.testing.assert_allclose(our_logits(model, IDS), hf_logits(hf, IDS), atol=1e-4, rtol=0)


def test_gguf_linear_rope_and_bias(tmp_path, make_hf_llama, our_logits, hf_logits):
    hf = make_hf_llama(
        vocab_size=VOCAB, rope_scaling={"rope_type": "linear", "factor": 2.0}, attention_bias=True
    )
    write_gguf(tmp_path / "m.gguf", hf, linear_rope=2.0)
    model, _ = load_gguf(tmp_path / "m.gguf")
    assert model.config.rope_scaling.rope_type == "linear" and model.config.o_bias
    np.testing.assert_allclose(our_logits(model, IDS), hf_logits(hf, IDS), atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "family,overrides",
    [
        ("qwen2", dict(tie_word_embeddings=True)),
        ("qwen2", dict(num_attention_heads=6, num_key_value_heads=2, hidden_size=48)),
        ("qwen3", dict(hidden_size=48, head_dim=32)),
        ("qwen3", dict(tie_word_embeddings=True, attention_bias=True)),
    ],
    ids=["qwen2-tied", "qwen2-gqa3", "qwen3-head_dim", "qwen3-bias-tied"],
)
def test_gguf_qwen_logits_match_hf(tmp_path, our_logits, hf_logits, family, overrides):
    """'qwen2' / 'qwen3' GGUFs: gguf's own tensor names, q/k rows not permuted (llama.cpp
    rotates Qwen's q/k in HF's rotate-half layout), biases and q/k norms from the tensors."""
    from test_families import assert_logits_close, make_hf

    hf = make_hf(family, vocab_size=VOCAB, **overrides)
    write_gguf(tmp_path / "m.gguf", hf, arch=family)
    model, _ = load_gguf(tmp_path / "m.gguf")
    cfg, c = model.config, hf.config
    assert cfg.family == family and cfg.qk_norm == (family == "qwen3")
    assert cfg.tie_word_embeddings == c.tie_word_embeddings
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (
        c.num_attention_heads,
        c.num_key_value_heads,
        getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
    )
    bias = family == "qwen2" or c.attention_bias
    assert (cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias) == (bias, bias and family == "qwen3", False)
    assert cfg.rms_norm_eps == pytest.approx(c.rms_norm_eps)
    assert_logits_close(our_logits(model, IDS), hf_logits(hf, IDS))


def test_gguf_mistral_written_as_llama(tmp_path, our_logits, hf_logits):
    """llama.cpp writes Mistral as architecture 'llama' (q/k permuted); it loads as a Llama,
    an explicit head_dim (not hidden / heads) included."""
    from test_families import assert_logits_close, make_hf

    hf = make_hf("mistral", vocab_size=VOCAB, head_dim=32, sliding_window=None)
    write_gguf(tmp_path / "m.gguf", hf, arch="llama")
    model, _ = load_gguf(tmp_path / "m.gguf")
    assert model.config.family == "llama" and model.config.head_dim == 32
    assert_logits_close(our_logits(model, IDS), hf_logits(hf, IDS))


# --------------------------------------------------------------------------------- tokenizer


def _meta(pre: str = "smollm", add_bos: bool = False) -> dict:
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": TOKENS,
        "tokenizer.ggml.token_type": [3] * 3 + [1] * (VOCAB - 3),
        "tokenizer.ggml.merges": MERGES,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.padding_token_id": 0,
        "tokenizer.ggml.add_bos_token": add_bos,
        "tokenizer.chat_template": TEMPLATE,
    }


def test_tokenizer_from_tiny_vocab():
    tok = tokenizer_from_gguf_metadata(_meta())
    pieces = tok.convert_ids_to_tokens(tok.encode("the theme 12"))
    assert pieces == ["t", "he", "Ġthe", "m", "e", "Ġ", "1", "2"]  # digits split one by one
    assert tok.convert_ids_to_tokens(tok.encode("x 12", add_special_tokens=False)) == [
        "x",
        "Ġ",
        "1",
        "2",
    ]
    gpt2 = tokenizer_from_gguf_metadata(_meta(pre="gpt2"))
    assert gpt2.convert_ids_to_tokens(gpt2.encode("the 12")) == ["t", "he", "Ġ", "12"]
    texts = ["naïve café — 日本語 🙂", "a  b\t\tc\n\n\nd  ", "<|im_start|>x<|im_end|>", ""]
    for text in texts:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
    assert tok.encode("<|im_start|>hi<|im_end|>") == [1, TOKENS.index("h"), TOKENS.index("i"), 2]
    assert tok.decode([1, TOKENS.index("h"), 2], skip_special_tokens=True) == "h"
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 0)
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    with_bos = tokenizer_from_gguf_metadata(_meta(add_bos=True))
    assert with_bos.encode("he") == [1, TOKENS.index("he")]


def test_tokenizer_rejects_non_bpe():
    with pytest.raises(ValueError, match="unsupported GGUF tokenizer model 'llama'"):
        tokenizer_from_gguf_metadata({**_meta(), "tokenizer.ggml.model": "llama"})


# ------------------------------------------------------------------------------------ errors


def test_gguf_errors(tmp_path, make_hf_llama):
    hf = make_hf_llama(vocab_size=VOCAB)
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        load_gguf(tmp_path / "none.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + bytes(range(200)))
    with pytest.raises(WeightsError, match="not a readable GGUF"):
        load_gguf(tmp_path / "junk.gguf")
    write_gguf(tmp_path / "arch.gguf", hf, arch="gpt2")
    with pytest.raises(WeightsError, match="unsupported GGUF architecture 'gpt2'"):
        load_gguf(tmp_path / "arch.gguf")
    write_gguf(tmp_path / "miss.gguf", hf, drop=("blk.1.ffn_up.weight",))
    with pytest.raises(WeightsError, match=r"missing tensor.*blk\.1\.ffn_up\.weight"):
        load_gguf(tmp_path / "miss.gguf")
    write_gguf(
        tmp_path / "extra.gguf", hf, extra={"blk.0.attn_qkv.weight": np.zeros((4, 64), np.float32)}
    )
    with pytest.raises(WeightsError, match=r"unexpected GGUF tensor.*blk\.0\.attn_qkv\.weight"):
        load_gguf(tmp_path / "extra.gguf")
    write_gguf(tmp_path / "yarn.gguf", hf, yarn=True)
    with pytest.raises(WeightsError, match="rope scaling type 'yarn'"):
        load_gguf(tmp_path / "yarn.gguf")
    small = make_hf_llama(vocab_size=VOCAB, intermediate_size=96)
    write_gguf(tmp_path / "shape.gguf", small)
    import gguf as g

    # A header that claims FFN 128 over tensors of FFN 96: the shape check names the tensor.
    r = g.GGUFReader(str(tmp_path / "shape.gguf"), "r+")
    r.fields["llama.feed_forward_length"].parts[-1][0] = 128
    del r
    with pytest.raises(
        WeightsError,
        match=r"blk\.0\.ffn_(gate|up|down)\.weight.*has shape"
        r".*expects",
    ):
        load_gguf(tmp_path / "shape.gguf")


@pytest.mark.parametrize("factor", [8.0, 32.0])  # Llama 3.1 and Llama 3.2 settings
def test_llama3_scaling_recovered_at_real_shapes(factor):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from moa_jax.models.gguf_weights import _fit_llama3_scaling

    rope = {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_theta": 500000.0,
    }
    c = LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_parameters=rope)
    inv_scaled = ROPE_INIT_FUNCTIONS["llama3"](c, "cpu")[0].double().numpy()
    inv = 1.0 / 500000.0 ** (np.arange(0, 128, 2) / 128)
    rs = _fit_llama3_scaling((inv / inv_scaled).astype(np.float32), 500000.0, 128, None)
    assert (
        rs.rope_type,
        rs.factor,
        rs.low_freq_factor,
        rs.high_freq_factor,
        rs.original_max_position_embeddings,
    ) == ("llama3", factor, 1.0, 4.0, 8192)


def test_byte_alphabet_and_byte_level_tokenizer():
    from tokenizers import pre_tokenizers

    from moa_jax.models.tokenizer import byte_level_tokenizer

    alphabet = byte_alphabet()
    assert len(set(alphabet)) == 256 and set(alphabet) == set(pre_tokenizers.ByteLevel.alphabet())
    tok = byte_level_tokenizer()
    text = "Añ\n"  # bytes 0x41, 0xc3 0xb1, 0x0a
    assert tok.encode(text) == [3 + b for b in text.encode()]
    assert tok.decode(tok.encode(text)) == text and len(tok) == 259
