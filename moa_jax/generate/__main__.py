"""`python -m moa_jax.generate` (the `moa-jax-generate` script): generate text with a Llama-family
model (Llama, Mistral, Qwen2, Qwen3) and any registered attention method (`--method`,
`moa_jax.methods`): dense, a MoA plan, Recycled Attention decoding, StreamingLLM, H2O ...

    python -m moa_jax.generate --model smollm2-135m --prompt "Why is the sky blue?"
    python -m moa_jax.generate --plan plan.json --prompt-file chapter.txt   # a long prompt
    (cat chapter.txt; echo "Summarise the chapter above.") | python -m moa_jax.generate \
        --plan plan.json --prompt-file -                                    # from stdin
    python -m moa_jax.generate --model path/to/Qwen2.5-0.5B-Instruct --prompt "..."  # HF dir
    python -m moa_jax.generate --plan plan.json --prompt "..." --prompt "..."   # a batch
    python -m moa_jax.generate --method recycled --method-opt k=2048 --method-opt stride=10

`--plan` alone means `--method moa`, `--recycle-k` means `--method recycled` (with
`--recycle-stride`, `--recycle-threshold` and `--prefill-plan` as its options). The generated
text is the command's output (stdout; one prompt streams as it is produced); progress goes to
the `moa_jax` log on stderr, from process 0 only. After generating, two lines on stderr say what
the method kept and how fast it decoded:

    KV cache: 3,197 of 7,104 tokens per sequence (0.45 of dense), 141.6 MiB vs 312.2 MiB
    64 tokens in 437.1s: first token after 409.1s (compilation + prefill), then 442.9 ms/token
    (decode loop, 63 steps)

(SmolLM2-135M, a searched plan, a 7,000-token prompt, 2 busy CPU cores.) A plan that keeps
every token of the prompt + new tokens runs dense attention and says so (a warning), as a
decode method (StreamingLLM, H2O, Recycled Attention) whose K covers them does.

The KV tokens are the method's kept KV per sequence (its KV density, `moa_jax.methods`: for a
plan the mean over heads, for StreamingLLM, H2O and Recycled Attention the K tokens a decode
step reads) at the cache length (the prompt padded to 64 tokens, plus the new tokens); the bytes
are its cache's allocation for one sequence, against a dense cache's. The time per token is
the host clock between the first and the last generated token: the decode loop alone.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import jax
import numpy as np

from moa_jax.cli import MODEL_HELP, option, parse_config, run, setup_logging
from moa_jax.config import DTYPE_NAMES, ModelConfig
from moa_jax.domains import FRACTION, NON_NEGATIVE, POSITIVE, TEXT, Choice, Float, Int, Options
from moa_jax.errors import ConfigError
from moa_jax.generate import _cache_bytes_per_device, encode_prompt, generate, pad_prompts
from moa_jax.methods import (
    METHODS,
    AttentionConfig,
    build_attention,
    parse_method_options,
    split_method_options,
)
from moa_jax.models import registry
from moa_jax.models.attention import Attention, DenseAttention
from moa_jax.models.recycled_attention import RecycleConfig
from moa_jax.parallel import MeshConfig, initialize_distributed, make_mesh
from moa_jax.plan import Plan
from moa_jax.runtime import enable_compilation_cache
from moa_jax.sampling import SamplingConfig

logger = logging.getLogger(__package__)  # __name__ is '__main__' under `python -m`

PROG = "python -m moa_jax.generate"
DESCRIPTION = (
    "Generate text with a Llama-family model (Llama, Mistral, Qwen2, Qwen3: a preset, an HF "
    "checkpoint directory or a .gguf file) and an attention method (--method): dense, a MoA "
    "plan (--plan), Recycled Attention decoding (--recycle-k), StreamingLLM, H2O ... After the "
    "text, stderr says how much of the KV cache the method kept, against dense, and the decode "
    "loop's time per token."
)


@dataclasses.dataclass(frozen=True)
class GenerateConfig(Options):
    """The flags of `python -m moa_jax.generate` (and the keys of its YAML configs)."""

    model: str = option("smollm2-135m", MODEL_HELP, TEXT)
    prompt: list[str] | None = option(
        None, "prompt text; repeat for a batch", TEXT, action="append"
    )
    prompt_file: list[str] | None = option(
        None,
        "a UTF-8 text file whose whole content is one prompt (trailing line breaks dropped, as "
        "$(cat FILE) does); '-' reads standard input; repeat for a batch. With --prompt, one "
        "batch: the --prompt texts first, then the files",
        TEXT,
        action="append",
        metavar="PATH",
    )
    max_new_tokens: int = option(64, "tokens generated per prompt", POSITIVE)
    temperature: float = option(0.0, "0 = greedy", Float(0.0))
    top_k: int = option(0, "0 = off", NON_NEGATIVE)
    top_p: float = option(1.0, "1.0 = off", FRACTION)
    seed: int = option(0, "PRNG seed for sampling", Int(0, 2**32 - 1))
    dtype: str = option("float32", "compute dtype (float32 | bfloat16)", Choice(*DTYPE_NAMES))
    param_dtype: str = option("float32", "parameter dtype", Choice(*DTYPE_NAMES))
    method: str | None = option(
        None,
        "attention method (moa_jax.methods: dense, dense-kernel, moa, uniform, recycled, "
        "streaming, h2o or a registered one); default: moa with --plan, recycled with "
        "--recycle-k, else dense",
        TEXT,
        metavar="NAME",
    )
    method_opt: list[str] = option(
        [],
        "an option of the method (repeatable), e.g. k=2048 or recycled.stride=none",
        TEXT,
        action="append",
        metavar="[METHOD.]KEY=VALUE",
    )
    plan: str | None = option(
        None,
        "MoA plan: a plan JSON (ours or the MoA reference format; one that records the model "
        "family and shape it was searched for must match --model's), 'dense', or "
        "'streaming:WINDOW[:SINK]' (alone: --method moa); default: plain dense attention",
        TEXT,
    )
    recycle_k: int | None = option(
        None,
        "Recycled Attention decoding with this many recycled tokens per layer "
        "and KV head (--method recycled --method-opt k=K; default: off)",
        POSITIVE,
    )
    recycle_stride: int | None = option(
        None,
        "full attention every S decode steps (with --recycle-threshold: the "
        "query check interval); 0 = never refresh (SnapKV); default 10 (recycled.stride)",
        NON_NEGATIVE,
    )
    recycle_threshold: float | None = option(
        None,
        "dynamic schedule: refresh a layer when the cosine of its query with the "
        "last full step's is at or below this (e.g. 0.85) (recycled.threshold)",
        Float(-1.0, 1.0),
    )
    prefill_plan: str | None = option(
        None,
        "with --recycle-k: MoA plan (same forms as --plan) for the prefill (recycled.prefill=plan)",
        TEXT,
    )
    max_cache_len: int | None = option(
        None, "KV cache capacity in tokens (default: prompt + new tokens)", POSITIVE
    )
    beyond_context: bool = option(
        False,
        "allow prompt + new tokens beyond the model's trained context (max_position_embeddings)",
        action="store_true",
    )
    no_chat_template: bool = option(
        False,
        "feed the prompt as raw text even if the model has a chat template",
        action="store_true",
    )
    mesh: str | None = option(
        None,
        "shard params, batch and KV cache on a device mesh (moa_jax.parallel), "
        "e.g. 1,1,8 (tensor parallel) or -1,1,1; default: one device",
        TEXT,
        metavar="DATA,FSDP,TENSOR",
    )


def method_choice(config: GenerateConfig) -> tuple[str, dict[str, str], str | None]:
    """(method name, its options as text, plan spec) from --method, the alias flags (--plan,
    --recycle-k, --recycle-stride, --recycle-threshold, --prefill-plan) and --method-opt,
    which wins over the aliases. Flags that do not go together, or Recycled Attention settings
    that cannot work, are a usage error."""
    recycled = config.recycle_k is not None or config.method == "recycled"
    method = config.method or (
        "recycled" if recycled else "moa" if config.plan is not None else "dense"
    )
    if config.recycle_k is not None and method != "recycled":
        raise SystemExit(f"--recycle-k is Recycled Attention's K: not for --method {method}")
    if method not in METHODS:
        raise SystemExit(f"unknown --method {method!r}; methods: {sorted(METHODS)}")
    options: dict[str, str] = {}
    spec = config.plan
    if not recycled:
        if (
            config.prefill_plan is not None
            or config.recycle_threshold is not None
            or config.recycle_stride is not None
        ):
            raise SystemExit(
                "--prefill-plan, --recycle-stride and --recycle-threshold need --recycle-k "
                "(or --method recycled)"
            )
    else:
        if config.plan is not None and config.recycle_k is not None:
            raise SystemExit("--plan with --recycle-k: use --prefill-plan for a MoA prefill")
        if config.recycle_k is not None:
            try:
                stride = 10 if config.recycle_stride is None else config.recycle_stride
                RecycleConfig(config.recycle_k, stride or None, config.recycle_threshold)
            except ValueError as e:
                raise SystemExit(f"bad Recycled Attention flags: {e}") from None
            options["k"] = str(config.recycle_k)
        if config.recycle_stride is not None:
            options["stride"] = str(config.recycle_stride)
        if config.recycle_threshold is not None:
            options["threshold"] = str(config.recycle_threshold)
        spec = config.prefill_plan if config.prefill_plan is not None else config.plan
        if spec is not None:
            options["prefill"] = "plan"
    try:
        given = split_method_options(config.method_opt, default_method=method)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    others = sorted(set(given) - {method})
    if others:
        raise SystemExit(f"--method-opt for {others}, but the method is {method!r}")
    extra = given.get(method, {})
    return method, {**options, **extra}, spec


def attention_config(
    config: GenerateConfig, cfg: ModelConfig, plan: Plan | None
) -> tuple[str, AttentionConfig]:
    """(method name, the `AttentionConfig` its backend is built from), the method's options
    parsed here once."""
    method, settings, _ = method_choice(config)
    options = parse_method_options({method: settings})
    return method, AttentionConfig(config=cfg, plan=plan, impl="native", options=options)


def attention_backend(
    config: GenerateConfig, cfg: ModelConfig, plan: Plan | None, length: int
) -> Attention:
    """The run's attention from the method registry (`moa_jax.methods`); `length` is the cache
    length a plan is resolved at."""
    method, ac = attention_config(config, cfg, plan)
    return build_attention(method, ac, length)


# ------------------------------------------------------------------------------ prompts
DEFAULT_PROMPT = "Write one sentence about the sea."
STDIN = "-"


def _utf8(text: str, flag: str) -> str:
    """`text` if it is valid UTF-8 text; else (a command-line argument whose bytes Python kept
    as surrogate escapes) a `ConfigError` naming `flag` and the first bad byte."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        bad = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"U+{code:04X}"
        raise ConfigError(f"{flag} is not UTF-8 text ({bad} at character {e.start})") from None
    return text


def read_prompt_file(path: str, stdin: BinaryIO | None = None) -> str:
    """One prompt: the whole of the file `path` ('-': `stdin`, default the standard input) as
    UTF-8 text, without a byte-order mark or trailing line breaks. A missing, unreadable, empty
    or non-UTF-8 file, or a directory, is a `ConfigError` naming the flag and the file."""
    shown = path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    label = "--prompt-file - (standard input)" if path == STDIN else f"--prompt-file {shown}"
    if path == STDIN:
        stdin = stdin or getattr(sys.stdin, "buffer", None)
        if stdin is None:  # the process was started with its standard input closed
            raise ConfigError(f"{label}: there is no standard input")
        data = stdin.read()
    elif Path(path).is_dir():
        raise ConfigError(f"{label} is a directory, not a text file")
    else:
        try:
            data = Path(path).read_bytes()
        except FileNotFoundError:
            raise ConfigError(f"{label}: no such file") from None
        except OSError as e:
            raise ConfigError(f"{label} cannot be read: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{label} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})"
        ) from None
    text = text.rstrip("\r\n")
    if not text.strip():
        raise ConfigError(f"{label} is empty" + (" (only whitespace)" if text else ""))
    return text


def prompt_texts(config: GenerateConfig, stdin: BinaryIO | None = None) -> list[str]:
    """The batch: the --prompt texts, then the --prompt-file contents (`read_prompt_file`);
    `DEFAULT_PROMPT` when neither is given."""
    texts = [_utf8(t, "--prompt") for t in config.prompt or []]
    if any(not t.strip() for t in texts):
        raise ConfigError("--prompt is empty")
    files = config.prompt_file or []
    if files.count(STDIN) > 1:
        raise ConfigError("--prompt-file - is given twice: the standard input is one prompt")
    texts += [read_prompt_file(f, stdin) for f in files]
    return texts or [DEFAULT_PROMPT]


# ------------------------------------------------------------------------------ reports
def _size(nbytes: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{int(nbytes)} B"


def kv_cache_line(
    method: str, ac: AttentionConfig, attention: Attention, length: int, dtype: Any
) -> str:
    """What the method keeps of one sequence's KV at the cache length `length` (module
    docstring): its kept KV tokens (`Method.kv_density`) and its cache's bytes, against dense."""
    cfg = ac.config
    nbytes = _cache_bytes_per_device(attention, cfg, 1, length, dtype)
    dense = _cache_bytes_per_device(DenseAttention(), cfg, 1, length, dtype)
    m = METHODS[method]
    if m.kv_density is None:
        return f"KV cache: {_size(nbytes)} per sequence vs {_size(dense)} dense"
    density = m.kv_density(ac, length)
    kept = round(density * length)
    if m.decode_only and nbytes >= dense:  # the full cache is kept; decode steps read part
        return (
            f"KV cache: all {length:,} tokens per sequence kept ({_size(nbytes)} vs "
            f"{_size(dense)} dense); decode steps between full ones read {kept:,} of them "
            f"({density:.2f} of dense)"
        )
    if density >= 1.0:
        return f"KV cache: {length:,} tokens per sequence (dense), {_size(nbytes)}"
    return (
        f"KV cache: {kept:,} of {length:,} tokens per sequence ({density:.2f} of dense), "
        f"{_size(nbytes)} vs {_size(dense)}"
    )


class TokenClock:
    """`generate`'s `on_token` callback that notes the host time of every step's tokens and
    passes them on to `then` (the streaming printer, or None)."""

    def __init__(self, then=None):
        self.times: list[float] = []
        self.then = then

    def __call__(self, tok) -> None:
        self.times.append(time.perf_counter())
        if self.then is not None:
            self.then(tok)

    def line(self, start: float, end: float, tokens: int, batch: int) -> str:
        """The timing line of a run from `start` to `end` (host clock) that generated `tokens`
        for `batch` sequences: the whole, the wait for the first tokens (compilation and
        prefill) and the decode loop's time per step (per token of each sequence)."""
        total = end - start
        head = f"{tokens:,} tokens in {total:.1f}s"
        if not self.times:
            return f"{head} (incl. compilation): {tokens / total:.1f} tok/s"
        first = self.times[0] - start
        steps = len(self.times) - 1
        if steps == 0:
            return f"{head}: compilation + prefill (no decode step)"
        per = 1e3 * (self.times[-1] - self.times[0]) / steps
        each = "ms/token" if batch == 1 else f"ms per step of {batch} tokens"
        return (
            f"{head}: first token after {first:.1f}s (compilation + prefill), then "
            f"{per:.1f} {each} (decode loop, {steps} step{'s' if steps > 1 else ''})"
        )


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_config(GenerateConfig, argv, prog=PROG, description=DESCRIPTION)

    # Several processes (JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, or a
    # TPU pod, SLURM, Open MPI): every process runs the same command; process 0 prints and
    # logs (the others' info messages go nowhere).
    initialize_distributed()
    enable_compilation_cache()
    lead = jax.process_index() == 0
    if lead:
        setup_logging()

    method, settings, spec = method_choice(config)
    parse_method_options({method: settings})  # a bad option fails before the weights load
    prompts_text = prompt_texts(config)
    sampling = SamplingConfig(config.temperature, config.top_k, config.top_p)
    # cheap checks first: the plan against the model's config, before the weights are read
    cfg = registry.load_config(config.model)
    plan = None
    if spec is not None:
        plan = Plan.load(spec, cfg.num_layers, cfg.num_heads).validate(cfg)
    why = METHODS[method].unavailable(AttentionConfig(config=cfg, plan=plan))
    if why is not None:
        raise ValueError(f"--method {method} cannot run: {why}")
    t0 = time.perf_counter()
    model, tokenizer = registry.load_model(
        config.model, dtype=config.dtype, param_dtype=config.param_dtype
    )
    if tokenizer is None:
        raise SystemExit(f"model {config.model!r} has no tokenizer; pass token ids via the API")
    logger.info(f"loaded {config.model} in {time.perf_counter() - t0:.1f}s")
    prompts = [encode_prompt(tokenizer, t, not config.no_chat_template) for t in prompts_text]
    longest = max(len(p) for p in prompts) + config.max_new_tokens
    if longest > cfg.max_position_embeddings and not config.beyond_context:
        raise ValueError(
            f"prompt ({max(len(p) for p in prompts)} tokens) + --max-new-tokens "
            f"({config.max_new_tokens}) = {longest} exceeds the model's context of "
            f"{cfg.max_position_embeddings} tokens; shorten them, or pass --beyond-context"
        )
    # the length generate() resolves a plan at: the cache (padded prompt + new tokens)
    n = config.max_cache_len or pad_prompts(prompts, 0)[0].shape[1] + config.max_new_tokens
    if plan is not None:
        logger.info(plan.summary(n))
    method, ac = attention_config(config, cfg, plan)
    attention = build_attention(method, ac, n)
    m = METHODS[method]
    if m.decode_only and m.kv_density is not None and m.kv_density(ac, n) >= 1.0:
        warnings.warn(
            f"--method {method}: its K tokens cover all {n} tokens (prompt + new tokens), "
            "so every decode step reads the whole cache",
            stacklevel=2,
        )

    stream: list[int] = []
    printed = [0]

    def on_token(tok):
        # Streams the first row only; the full batch is printed at the end.
        stream.append(int(np.asarray(tok)[0]))
        text = tokenizer.decode(stream, skip_special_tokens=True)
        sys.stdout.write(text[printed[0] :])
        sys.stdout.flush()
        printed[0] = len(text)

    # the step times come from the token callback: on process 0, and for a batch only in a
    # one-process run (every process of a mesh runs the same program)
    clock = TokenClock(on_token if len(prompts) == 1 else None)
    timed = lead and (len(prompts) == 1 or jax.process_count() == 1)
    mesh = None
    if config.mesh:
        mesh = make_mesh(MeshConfig.parse(config.mesh))
    t0 = time.perf_counter()
    out = generate(
        model,
        prompts,
        max_new_tokens=config.max_new_tokens,
        sampling=sampling,
        key=jax.random.key(config.seed),
        max_cache_len=config.max_cache_len,
        attention=attention,
        mesh=mesh,
        on_token=clock if timed else None,
    )
    jax.effects_barrier()
    end = time.perf_counter()
    if not lead:
        return 0
    if len(prompts) == 1:
        print()
    else:
        for text, row in zip(prompts_text, out.rows()):
            print(f"### {text}\n{tokenizer.decode(row, skip_special_tokens=True)}\n")
    logger.info(kv_cache_line(method, ac, attention, n, model.dtype))
    logger.info(clock.line(t0, end, int(out.lengths.sum()), len(prompts)))
    return 0


def cli() -> int:
    """The `moa-jax-generate` console script: `main` with the CLIs' one-line errors."""
    return run(main)


if __name__ == "__main__":
    raise SystemExit(cli())
