"""`python -m moa_jax.generate`'s prompts from files and standard input (`--prompt-file`), their
refusals, and the lines it prints after generating: the KV cache the method kept and the time
per token. tiny-random, 2 new tokens."""

from __future__ import annotations

import io
import re
import warnings

import numpy as np
import pytest

import moa_jax.generate.__main__ as gen
from moa_jax.cli import run
from moa_jax.models.registry import TINY_RANDOM_CONFIG
from moa_jax.plan import Plan

from test_bad_input import _one_line_error

TINY = ["--model", "tiny-random", "--max-new-tokens", "2"]
TEXT = "It is a truth universally acknowledged, that a single man in possession of a fortune"


class Stop(Exception):
    pass


def _prompts_given_to_generate(monkeypatch, argv, stdin: bytes | None = None) -> list[list[int]]:
    """The token ids `main(argv)` hands to `generate` (which is not run)."""

    def stop(model, prompts, **kw):
        raise Stop(prompts)

    monkeypatch.setattr(gen, "generate", stop)
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    with pytest.raises(Stop) as e:
        gen.main(argv)
    return e.value.args[0]


def test_prompt_file_gives_the_tokens_of_the_same_prompt(tmp_path, monkeypatch):
    """A file or the standard input holding the --prompt text (with the final line break a
    file has) hands `generate` the same token ids, so the same tokens come out."""
    f = tmp_path / "prompt.txt"
    f.write_text(TEXT + "\n", encoding="utf-8")
    (want,) = _prompts_given_to_generate(monkeypatch, TINY + ["--prompt", TEXT])
    (from_file,) = _prompts_given_to_generate(monkeypatch, TINY + ["--prompt-file", str(f)])
    (from_stdin,) = _prompts_given_to_generate(
        monkeypatch, TINY + ["--prompt-file", "-"], stdin=TEXT.encode() + b"\n\n"
    )
    assert from_file == want == from_stdin and len(want) > 20


def test_a_short_prompt_runs_dense_and_says_so(monkeypatch):
    """A plan that keeps every token of the prompt + new tokens: the warning of `moa`, and a
    KV line that says dense."""
    with pytest.warns(UserWarning, match="the MoA plan keeps every token .* running dense"):
        _prompts_given_to_generate(monkeypatch, TINY + ["--plan", "streaming:1024:64"])
    config = gen.GenerateConfig(model="tiny-random", plan="streaming:1024:64")
    cfg = TINY_RANDOM_CONFIG
    method, ac = gen.attention_config(config, cfg, Plan.load(config.plan, 2, 4))
    with pytest.warns(UserWarning):
        attention = gen.build_attention(method, ac, 130)
    dense = cfg.num_layers * 2 * 130 * cfg.num_kv_heads * cfg.head_dim * 4
    line = gen.kv_cache_line(method, ac, attention, 130, "float32")
    assert line == f"KV cache: 130 tokens per sequence (dense), {gen._size(dense)}"


def test_stdin_and_batches(tmp_path, monkeypatch):
    """`--prompt-file -` reads the standard input; --prompt texts come first in a batch."""
    f = tmp_path / "p.txt"
    f.write_bytes(b"\xef\xbb\xbf" + b"second\r\n")  # a BOM and a Windows line break
    batch = _prompts_given_to_generate(
        monkeypatch,
        TINY + ["--prompt-file", str(f), "--prompt", TEXT, "--prompt-file", "-"],
        stdin=b"third",
    )
    alone = [
        _prompts_given_to_generate(monkeypatch, TINY + ["--prompt", t])[0]
        for t in (TEXT, "second", "third")
    ]
    assert batch == alone


def _refusals(tmp_path):
    """(argv, the standard input (bytes, "closed" or None), words of the error line) of the
    prompts generate refuses."""
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blank.txt").write_bytes(b" \n\n")
    (tmp_path / "latin1.txt").write_bytes("café au lait".encode("latin-1"))
    (tmp_path / "folder").mkdir()
    missing = tmp_path / "missing.txt"
    return [
        (["--prompt-file", str(missing)], None, f"--prompt-file {missing}: no such file"),
        # a file name that is not UTF-8 is a name like any other, shown escaped
        (["--prompt-file", str(tmp_path / "nop\udce9.txt")], None, "nop\\xe9.txt: no such file"),
        (["--prompt-file", str(tmp_path / "folder")], None, "folder is a directory"),
        (["--prompt-file", str(tmp_path / "empty.txt")], None, "empty.txt is empty"),
        (["--prompt-file", str(tmp_path / "blank.txt")], None, "blank.txt is empty"),
        (
            ["--prompt-file", str(tmp_path / "latin1.txt")],
            None,
            "latin1.txt is not UTF-8 text (byte 0xe9 at offset 3)",
        ),
        (["--prompt-file", "-"], b"", "--prompt-file - (standard input) is empty"),
        (["--prompt-file", "-"], b"\xff", "(standard input) is not UTF-8 text (byte 0xff"),
        (["--prompt-file", "-", "--prompt-file", "-"], b"x", "--prompt-file - is given twice"),
        (["--prompt-file", "-"], "closed", "(standard input): there is no standard input"),
        # bytes that are not UTF-8 on the command line reach Python as surrogate escapes
        (["--prompt", "caf\udce9"], None, "--prompt is not UTF-8 text (byte 0xe9 at character 3)"),
        (["--prompt-file", ""], None, "--prompt-file"),
    ]


@pytest.mark.parametrize("i", range(12))
def test_bad_prompts_are_refused_before_the_weights_load(tmp_path, capsys, monkeypatch, i):
    import moa_jax.models.registry as reg

    argv, stdin, words = _refusals(tmp_path)[i]
    before = sorted(tmp_path.rglob("*"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(reg, "load_model", lambda *a, **k: pytest.fail("weights were loaded"))
    if stdin == "closed":
        monkeypatch.setattr("sys.stdin", None)
    elif stdin is not None:
        monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    _one_line_error(capsys, run(gen.main, TINY + argv), 2, words)
    assert sorted(tmp_path.rglob("*")) == before  # nothing written


def test_kv_cache_line_of_a_streaming_plan(tmp_path, capsys):
    """A prompt (from a file) longer than the plan's window: the kept tokens are the plan's KV
    density at the cache length, the bytes the span cache's against a dense cache's; then the
    time per token of the decode loop."""
    window, sink = 16, 4
    f = tmp_path / "prompt.txt"
    f.write_text(TEXT + "\n", encoding="utf-8")
    argv = TINY + ["--plan", f"streaming:{window}:{sink}", "--prompt-file", str(f)]
    assert run(gen.main, argv) == 0
    err = capsys.readouterr().err
    m = re.search(
        r"KV cache: ([\d,]+) of ([\d,]+) tokens per sequence \(([\d.]+) of dense\), "
        r"(.+) vs (.+)",
        err,
    )
    assert m, err
    kept, n = (int(g.replace(",", "")) for g in m.group(1, 2))
    plan = Plan.load(f"streaming:{window}:{sink}", 2, 4)
    assert kept == window + sink == round(plan.kv_density(n) * n) and n > window + sink
    assert float(m.group(3)) == pytest.approx(kept / n, abs=0.005)
    cfg = TINY_RANDOM_CONFIG
    dense = cfg.num_layers * 2 * n * cfg.num_kv_heads * cfg.head_dim * np.dtype("float32").itemsize
    assert m.group(5).strip() == gen._size(dense)
    assert m.group(4) != m.group(5)
    t = re.search(
        r"2 tokens in [\d.]+s: first token after [\d.]+s \(compilation \+ prefill\), "
        r"then ([\d.]+) ms/token \(decode loop, 1 step\)",
        err,
    )
    assert t and float(t.group(1)) > 0, err


def test_decode_methods_that_keep_every_token_say_so(monkeypatch):
    """Recycled Attention with K above the prompt + new tokens reads every token: a warning;
    with K below, none."""
    for k, warned in (("512", True), ("16", False)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _prompts_given_to_generate(monkeypatch, TINY + ["--recycle-k", k, "--prompt", TEXT])
        said = [str(w.message) for w in caught if "K tokens cover" in str(w.message)]
        assert len(said) == warned, (k, said)
        if warned:
            assert said[0].startswith("--method recycled: its K tokens cover all")


def test_help_says_how_prompt_and_prompt_file_combine(capsys):
    with pytest.raises(SystemExit):
        gen.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--prompt-file PATH" in text and "With --prompt, one batch" in text
