"""Tokenizers: from GGUF metadata (llama.cpp's `tokenizer.ggml.*` keys) or an HF directory.
(Reading a GGUF file is `models.gguf_weights`' job; this module never opens one.)

The GGUF tokenizer is rebuilt as a `tokenizers.Tokenizer` (byte-level BPE: the vocabulary and
merges from the file, the pre-tokenizer named by `tokenizer.ggml.pre`, a byte-level decoder) and
wrapped as a `transformers.PreTrainedTokenizerFast`, so it has `encode`, `decode` and
`apply_chat_template` (with the file's `tokenizer.chat_template`).

Public API:
  tokenizer_from_gguf_metadata(meta, *, model_max_length=None) -> PreTrainedTokenizerFast
  load_hf_tokenizer(path) -> PreTrainedTokenizerBase | None
  byte_level_tokenizer(specials=..., chat_template=...) -> PreTrainedTokenizerFast
  byte_alphabet() -> list[str]
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

logger = logging.getLogger(__name__)

# llama.cpp token types (gguf.TokenType).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizers llama.cpp applies to byte-level BPE vocabularies, keyed by `tokenizer.ggml.pre`.
# All of them end in GPT-2's ByteLevel regex; some split digits one by one first.
_DIGIT_SPLIT_PRES = ("smollm", "starcoder", "refact")
_GPT2_PRES = ("default", "gpt2", "gpt-2")
_LLAMA3_PRES = ("llama-bpe", "llama3")
_LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _pre_tokenizer(pre: str | None) -> tuple[pre_tokenizers.PreTokenizer, bool]:
    """(pre-tokenizer, ignore_merges) for a llama.cpp pre-tokenizer name."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGIT_SPLIT_PRES:
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        ), False
    if pre in _LLAMA3_PRES:
        split = pre_tokenizers.Split(Regex(_LLAMA3_PATTERN), behavior="isolated", invert=False)
        return pre_tokenizers.Sequence(
            [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        ), True
    if pre not in _GPT2_PRES and pre is not None:
        logger.warning("unknown GGUF pre-tokenizer %r; using GPT-2's byte-level rules", pre)
    return byte_level, False


def tokenizer_from_gguf_metadata(
    meta: Mapping[str, Any], *, model_max_length: int | None = None
) -> Any:
    """Builds the HF fast tokenizer described by GGUF `tokenizer.*` metadata.

    Args:
      meta: GGUF metadata with `tokenizer.ggml.model` == 'gpt2' (byte-level BPE), `.tokens`,
        `.merges`, optional `.token_type`, `.pre`, `.bos/eos/unknown/padding_token_id`,
        `.add_bos_token`, `.add_eos_token` and `tokenizer.chat_template`.
      model_max_length: recorded on the tokenizer (the model's context length).
    Returns:
      a `transformers.PreTrainedTokenizerFast`.
    """
    # imported on use: transformers takes seconds to import, and only tokenizers need it
    from transformers import PreTrainedTokenizerFast

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(
            f"unsupported GGUF tokenizer model {kind!r}: only byte-level BPE ('gpt2') is supported"
        )
    tokens: Sequence[str] = list(meta["tokenizer.ggml.tokens"])
    types: Sequence[int] = list(meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens))
    if len(types) != len(tokens):
        raise ValueError(f"GGUF has {len(tokens)} tokens but {len(types)} token types")
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    bad = [m for m in merges if len(m) != 2]
    if bad:
        raise ValueError(f"malformed GGUF merges, e.g. {bad[0]!r}")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("GGUF token list has duplicate tokens")

    pre, ignore_merges = _pre_tokenizer(meta.get("tokenizer.ggml.pre"))
    tk = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            unk_token=None,
            fuse_unk=False,
            byte_fallback=False,
            ignore_merges=ignore_merges,
        )
    )
    tk.pre_tokenizer = pre
    tk.decoder = decoders.ByteLevel()

    # Control tokens are special (skipped by decode(skip_special_tokens=True)); user-defined
    # tokens are matched verbatim in the text, like llama.cpp does.
    tk.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, ty in zip(tokens, types)
            if ty == _CONTROL
        ]
    )
    tk.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, ty in zip(tokens, types)
            if ty == _USER_DEFINED
        ]
    )

    def tok(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        return None if i is None or not 0 <= int(i) < len(tokens) else tokens[int(i)]

    bos, eos = tok("bos_token_id"), tok("eos_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    steps: list[Any] = [processors.ByteLevel(trim_offsets=False)]
    if add_bos or add_eos:

        def segment(seq: str, type_id: int) -> str:
            return " ".join(
                ([f"{bos}:{type_id}"] if add_bos else [])
                + [f"{seq}:{type_id}"]
                + ([f"{eos}:{type_id}"] if add_eos else [])
            )

        single, pair = segment("$A", 0), segment("$A", 0) + " " + segment("$B", 1)
        special = sorted({(t, vocab[t]) for t, flag in ((bos, add_bos), (eos, add_eos)) if flag})
        steps.append(
            processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)
        )
    tk.post_processor = processors.Sequence(steps)

    kwargs: dict[str, Any] = dict(
        tokenizer_object=tk,
        clean_up_tokenization_spaces=False,
        bos_token=bos,
        eos_token=eos,
        unk_token=tok("unknown_token_id"),
        pad_token=tok("padding_token_id"),
    )
    if model_max_length is not None:
        kwargs["model_max_length"] = int(model_max_length)
    hf = PreTrainedTokenizerFast(**{k: v for k, v in kwargs.items() if v is not None})
    template = meta.get("tokenizer.chat_template")
    if template:
        hf.chat_template = template
    return hf


_HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


def load_hf_tokenizer(path: str | Path) -> Any:
    """`AutoTokenizer.from_pretrained(path)` if the directory has tokenizer files, else None."""
    # imported on use: transformers takes seconds to import, and only tokenizers need it
    from transformers import AutoTokenizer

    directory = Path(path)
    if not any((directory / f).is_file() for f in _HF_TOKENIZER_FILES):
        return None
    return AutoTokenizer.from_pretrained(str(directory))


def byte_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values (ByteLevel alphabet), in byte order."""
    keep = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping, extra = {}, 0
    for b in range(256):
        if b in keep:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return [mapping[b] for b in range(256)]


def byte_level_tokenizer(
    specials: Sequence[str] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
    chat_template: str = CHATML_TEMPLATE,
) -> Any:
    """A merge-free byte-level tokenizer: the special tokens, then one token per byte.

    Ids: specials[i] -> i, byte b -> len(specials) + b. bos = specials[1], eos = pad =
    specials[2] when present (ChatML). For random-weight presets and tests.
    """
    tokens = list(specials) + byte_alphabet()
    meta: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [_CONTROL] * len(specials) + [_NORMAL] * 256,
        "tokenizer.ggml.merges": [],
        "tokenizer.chat_template": chat_template,
    }
    if len(specials) >= 3:
        meta.update(
            {
                "tokenizer.ggml.bos_token_id": 1,
                "tokenizer.ggml.eos_token_id": 2,
                "tokenizer.ggml.padding_token_id": 2,
            }
        )
    return tokenizer_from_gguf_metadata(meta)
