"""Batched autoregressive generation: one jitted prefill, then a `lax.while_loop` of decode steps.

Prompts of different lengths are right-padded: row b's prompt sits at positions [0, len_b), its
first generated token at len_b. Causal masking alone keeps padding invisible to real tokens, and
decode steps overwrite the padded cache slots in order. The command line is `__main__.py`:

    python -m moa_jax.generate --model smollm2-135m --prompt "Why is the sky blue?"
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from moa_jax.domains import FLAG, POSITIVE, Int, checked
from moa_jax.errors import ArrayError, ConfigError
from moa_jax.models.attention import Attention, CachedAttention, DenseAttention
from moa_jax.models.causal_lm import CausalLM, stack_layers
from moa_jax.parallel import (
    batch_sharding,
    cache_shardings,
    mesh_context,
    param_shardings,
)
from moa_jax.sampling import SamplingConfig, sample

PROMPT_BUCKET = 64


@dataclasses.dataclass
class GenerateOutput:
    """tokens: int [B, max_new_tokens], padded with pad_id after a row stops.
    lengths: int [B], generated tokens per row (a stop token is counted and kept)."""

    tokens: np.ndarray
    lengths: np.ndarray

    def rows(self) -> list[list[int]]:
        return [t[:n].tolist() for t, n in zip(self.tokens, self.lengths)]


def pad_prompts(
    prompts: Sequence[Sequence[int]], pad_id: int, bucket: int = PROMPT_BUCKET
) -> tuple[np.ndarray, np.ndarray]:
    """Right-pads prompts to a common length rounded up to `bucket` (fewer recompilations).

    Returns tokens int32 [B, T] and lengths int32 [B].
    """
    if not len(prompts):
        raise ArrayError("pad_prompts: no prompts given")
    lengths = np.array([len(p) for p in prompts], np.int32)
    if lengths.min() < 1:
        raise ArrayError("pad_prompts: every prompt needs at least one token")
    t = int(-(-lengths.max() // bucket) * bucket)
    tokens = np.full((len(prompts), t), pad_id, np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = np.asarray(p, np.int32)
    return tokens, lengths


def _generate_impl(
    graphdef,
    state,
    tokens,
    lengths,
    key,
    stop_ids,
    pad_id,
    *,
    max_new_tokens,
    sampling,
    attention,
    cache_len,
    on_token,
    mesh,
    scan_layers=False,
):
    model: CausalLM = nnx.merge(graphdef, state)
    cfg = model.config
    b, t = tokens.shape
    cache = attention.init_cache(cfg, b, cache_len, model.dtype)
    if mesh is not None:
        cache = jax.lax.with_sharding_constraint(cache, cache_shardings(cache, mesh))
    stack = None
    if scan_layers:  # stacked once, outside the decode loop
        stack = stack_layers(model)
        cache = jax.tree.map(lambda *layers: jnp.stack(layers), *cache)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    logits, cache = model(
        tokens,
        positions,
        cache,
        attention,
        logits_at=lengths - 1,
        lengths=lengths,
        mode="prefill",
        layer_stack=stack,
    )
    key, sub = jax.random.split(key)
    first = sample(logits, sub, sampling)
    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
    done = jnp.isin(first, stop_ids)
    n_gen = jnp.ones((b,), jnp.int32)
    if on_token is not None:
        jax.debug.callback(on_token, first, ordered=True)

    def cond(carry):
        i, _, _, done, *_ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, tok, pos, done, n_gen, out, cache, key = carry
        logits, cache = model.decode_token(tok, pos, cache, attention, stack)
        key, sub = jax.random.split(key)
        nxt = jnp.where(done, pad_id, sample(logits, sub, sampling))
        out = out.at[:, i].set(nxt)
        n_gen = n_gen + (~done).astype(jnp.int32)
        done = done | jnp.isin(nxt, stop_ids)
        if on_token is not None:
            jax.debug.callback(on_token, nxt, ordered=True)
        return i + 1, nxt, pos + 1, done, n_gen, out, cache, key

    carry = (jnp.int32(1), first, lengths, done, n_gen, out, cache, key)
    _, _, _, _, n_gen, out, _, _ = jax.lax.while_loop(cond, body, carry)
    return out, n_gen


_generate_jit = jax.jit(
    _generate_impl,
    static_argnames=(
        "graphdef",
        "attention",
        "max_new_tokens",
        "sampling",
        "cache_len",
        "on_token",
        "mesh",
        "scan_layers",
    ),
)


def _prompt_rows(prompts: Any, vocab_size: int) -> list[np.ndarray]:
    """The prompts as int arrays, each 1-d, non-empty and within the vocabulary (one host read
    of a prompt given as an array), or ArrayError naming the prompt."""
    want = "a list of token id lists or an int [B, T] array"
    if hasattr(prompts, "shape"):
        prompts = np.asarray(prompts)
        if prompts.ndim != 2:
            raise ArrayError(
                f"generate: prompts must be {want}, got a {prompts.ndim}-d array; pass one "
                "prompt as [ids]"
            )
    if isinstance(prompts, (str, bytes)) or not hasattr(prompts, "__len__"):
        raise ArrayError(f"generate: prompts must be {want}, got {type(prompts).__name__}")
    if not len(prompts):
        raise ArrayError("generate: no prompts given (prompts is empty)")
    rows = []
    for i, p in enumerate(prompts):
        if isinstance(p, (str, bytes)):
            raise ArrayError(
                f"generate: prompts[{i}] is a string; encode it to token ids first "
                "(moa_jax.generate.encode_prompt)"
            )
        if isinstance(p, (list, tuple)) and any(isinstance(t, (bool, np.bool_)) for t in p):
            raise ArrayError(f"generate: prompts[{i}] holds booleans, not token ids")
        a = np.asarray(p)
        if a.ndim != 1:
            got = f"shape {a.shape}" if a.ndim else f"{p!r:.40} ({type(p).__name__})"
            raise ArrayError(
                f"generate: prompts[{i}] must be a 1-d list of token ids, got {got}; prompts is "
                f"{want} (one prompt: [ids])"
            )
        if a.dtype.kind not in "iu" and a.size:
            raise ArrayError(f"generate: prompts[{i}] must hold int token ids, got {a.dtype}")
        if not a.size:
            raise ArrayError(
                f"generate: prompts[{i}] is empty; every prompt needs at least one token"
            )
        if a.min() < 0 or a.max() >= vocab_size:
            bad = a.min() if a.min() < 0 else a.max()
            raise ArrayError(
                f"generate: prompt token ids must be in [0, {vocab_size}) (the model's "
                f"vocab_size), got {bad} in prompts[{i}]"
            )
        rows.append(a)
    return rows


def _check_generate_args(
    cfg,
    prompts,
    max_new_tokens,
    sampling,
    key,
    stop_ids,
    pad_id,
    attention,
    max_cache_len,
    on_token,
    scan_layers,
) -> tuple[list[np.ndarray], int, tuple[int, ...], int, int | None]:
    """`generate`'s checks, on host values before anything is traced; returns (prompt rows,
    max_new_tokens, stop_ids, pad_id, max_cache_len) with the config's defaults filled in."""
    vocab = cfg.vocab_size
    max_new_tokens = checked("generate: max_new_tokens", max_new_tokens, POSITIVE)
    if not isinstance(sampling, SamplingConfig):
        raise ConfigError(
            f"generate: sampling must be a SamplingConfig, got {type(sampling).__name__}"
        )
    if key is None and not sampling.greedy:
        raise ConfigError("generate: sampling with temperature > 0 needs an explicit PRNG `key`")
    if key is not None and not (
        hasattr(key, "dtype")
        and (
            (jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) and key.shape == ())
            or (key.dtype == jnp.uint32 and key.shape == (2,))
        )
    ):
        raise ArrayError(
            "generate: key must be one PRNG key (jax.random.key(seed)), got "
            + (f"{key.dtype} {list(key.shape)}" if hasattr(key, "dtype") else type(key).__name__)
        )
    rows = _prompt_rows(prompts, vocab)
    name = "generate: pad_id"
    if pad_id is None:
        pad_id, name = cfg.pad_token_id or 0, "generate: pad_id (the config's pad_token_id)"
    token_id = Int(0, vocab - 1)
    pad_id = checked(name, pad_id, token_id)
    name = "generate: stop_ids"
    if stop_ids is None:
        stop_ids, name = cfg.eos_token_ids, "generate: stop_ids (the config's eos_token_ids)"
    if isinstance(stop_ids, (str, bytes)) or not hasattr(stop_ids, "__iter__"):
        raise ConfigError(
            f"{name} must be a sequence of token ids, got {stop_ids!r} ({type(stop_ids).__name__})"
        )
    stop_ids = tuple(checked(f"{name}[{i}]", t, token_id) for i, t in enumerate(stop_ids))
    if not isinstance(attention, CachedAttention):
        raise ConfigError(
            "generate: attention must be a CachedAttention (a backend with a KV cache; "
            f"moa_jax.methods.build_attention builds one), got {type(attention).__name__}"
        )
    max_cache_len = checked("generate: max_cache_len", max_cache_len, POSITIVE, optional=True)
    if on_token is not None and not callable(on_token):
        raise ConfigError(f"generate: on_token must be callable, got {type(on_token).__name__}")
    checked("generate: scan_layers", scan_layers, FLAG)
    return rows, max_new_tokens, stop_ids, pad_id, max_cache_len


def generate(
    model: CausalLM,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 64,
    sampling: SamplingConfig = SamplingConfig(),
    key: jax.Array | None = None,
    stop_ids: Sequence[int] | None = None,
    pad_id: int | None = None,
    attention: Attention = DenseAttention(),
    max_cache_len: int | None = None,
    on_token: Callable[[np.ndarray], Any] | None = None,
    mesh: Mesh | None = None,
    scan_layers: bool = False,
) -> GenerateOutput:
    """Generates up to `max_new_tokens` tokens for each prompt.

    Args:
      model: the model (any supported family).
      prompts: token id lists (or an int [B, T] array, one prompt per row) of any lengths >= 1,
        ids in [0, vocab_size).
      sampling: greedy by default; temperature / top-k / top-p otherwise (then `key` is required).
      max_new_tokens: an int >= 1.
      stop_ids: tokens that end a row (default: the config's eos ids), in [0, vocab_size).
      pad_id: filler after a row stops (default: the config's pad id, else 0), in
        [0, vocab_size).
      attention: attention backend (dense by default); `moa_jax.methods.build_attention` builds
        any registered method's (MoA plans, Recycled Attention decoding, ...).
      max_cache_len: cache capacity in tokens; default the padded prompt length + max_new_tokens.
        A prompt that does not fit is an error, never a silent truncation.
      on_token: called with the int [B] tokens of every step as they are produced (streaming).
      mesh: shard params (by `moa_jax.parallel` rules), the batch and the KV cache on this mesh.
      scan_layers: run the decoder layers as one `lax.scan` (backends with `layer_uniform`:
        dense attention; no mesh). The program then compiles one layer instead of L, far
        faster (XLA's GPU compiler took 67-89 s for each 30-layer SmolLM2 generate program),
        but every decode step writes a new stacked cache, so long generations are slower: for
        short ones where compilation dominates (calibration answers).
    Returns:
      GenerateOutput with tokens [B, max_new_tokens] and lengths [B].
    Raises:
      ArrayError: prompts or key malformed (not token id lists, empty, ids outside the
        vocabulary); ConfigError: an option out of its domain (the message names it);
        ValueError: a prompt that does not fit the cache, a cache that does not fit the device.
    """
    cfg = model.config
    prompts, max_new_tokens, stop_ids, pad_id, max_cache_len = _check_generate_args(
        cfg,
        prompts,
        max_new_tokens,
        sampling,
        key,
        stop_ids,
        pad_id,
        attention,
        max_cache_len,
        on_token,
        scan_layers,
    )
    tokens, lengths = pad_prompts(prompts, pad_id)
    needed = int(lengths.max()) + max_new_tokens
    cache_len = max_cache_len or tokens.shape[1] + max_new_tokens
    if needed > cache_len:
        raise ValueError(
            f"prompt of {int(lengths.max())} tokens + {max_new_tokens} new tokens = {needed} "
            f"exceeds the KV cache length {cache_len}"
        )
    # Prefill writes the padded prompt block; it must fit too.
    cache_len = max(cache_len, tokens.shape[1])
    if scan_layers and (mesh is not None or not attention.layer_uniform):
        raise ValueError(
            "scan_layers needs a backend that treats every layer alike (dense "
            f"attention) and no mesh; got {type(attention).__name__}"
            + (" on a mesh" if mesh is not None else "")
        )
    _check_cache_fits(attention, cfg, tokens.shape[0], cache_len, model.dtype, mesh)
    graphdef, state = nnx.split(model)
    tokens, lengths = jnp.asarray(tokens), jnp.asarray(lengths)
    if mesh is not None:
        state = jax.device_put(state, param_shardings(state, mesh))
        tokens = jax.device_put(tokens, batch_sharding(mesh, tokens.shape))
        lengths = jax.device_put(lengths, batch_sharding(mesh, lengths.shape))
        attention = attention.on_mesh(mesh)
    stop = jnp.asarray(stop_ids if stop_ids else (-1,), jnp.int32)
    with mesh_context(mesh):
        out, n = _generate_jit(
            graphdef,
            state,
            tokens,
            lengths,
            jax.random.key(0) if key is None else key,
            stop,
            jnp.int32(pad_id),
            max_new_tokens=max_new_tokens,
            sampling=sampling,
            attention=attention,
            cache_len=cache_len,
            on_token=on_token,
            mesh=mesh,
            scan_layers=scan_layers,
        )
    if not out.is_fully_addressable:  # a mesh over several processes: every one gets all
        out, n = multihost_utils.process_allgather((out, n), tiled=True)
    return GenerateOutput(np.asarray(out), np.asarray(n))


def _device_memory(devices=None) -> tuple[int, int] | None:
    """(bytes limit, bytes in use) of the device with the least free memory among `devices`
    (default: the first device), None where unknown (the CPU)."""
    free = []
    for d in devices or jax.devices()[:1]:
        stats = d.memory_stats() or {}
        if not stats.get("bytes_limit"):
            return None
        free.append((int(stats["bytes_limit"]), int(stats.get("bytes_in_use", 0))))
    return min(free, key=lambda m: m[0] - m[1])


# share of the free device memory a KV cache may take (the prefill's activations need the rest)
CACHE_MEMORY_SHARE = 0.8


def _cache_bytes_per_device(
    attention: Attention, cfg, batch: int, cache_len: int, dtype, mesh=None
) -> int:
    """Bytes of the backend's KV cache on one device (its shard of every leaf on `mesh`)."""
    shapes = jax.eval_shape(lambda: attention.init_cache(cfg, batch, cache_len, dtype))
    if mesh is None:
        return sum(c.nbytes for c in shapes)
    leaves = jax.tree.leaves(shapes)
    shards = jax.tree.leaves(cache_shardings(shapes, mesh))
    return sum(
        int(np.prod(sh.shard_shape(x.shape))) * jnp.dtype(x.dtype).itemsize
        for x, sh in zip(leaves, shards)
    )


def _check_cache_fits(
    attention: Attention, cfg, batch: int, cache_len: int, dtype, mesh=None
) -> None:
    """Raises before allocation when the backend's KV cache (each device's shard of it on a
    mesh) cannot fit in the free memory of the fullest device, naming the largest batch (and
    the length at this batch) that would."""
    devices = (
        None
        if mesh is None
        else [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    )
    mem = _device_memory(devices)
    if mem is None:
        return
    limit, in_use = mem
    need = _cache_bytes_per_device(attention, cfg, batch, cache_len, dtype, mesh)
    room = CACHE_MEMORY_SHARE * (limit - in_use)
    if need <= room:
        return
    fit_batch = int(room // max(need / batch, 1))
    fit_len = int(cache_len * room / need)
    where = "each device's share of " if mesh is not None else ""
    raise ValueError(
        f"{where}the KV cache for batch {batch} x {cache_len} tokens needs "
        f"{need / 2**30:.1f} GiB, more than the device's free "
        f"{(limit - in_use) / 2**30:.1f} GiB allows ({CACHE_MEMORY_SHARE:.0%} of it); the "
        f"largest batch that fits is {fit_batch}, or at batch {batch} about {fit_len} tokens"
    )


def encode_prompt(tokenizer: Any, text: str, chat: bool) -> list[int]:
    """Token ids for `text`, through the tokenizer's chat template when it has one and `chat`."""
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
        )
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return list(tokenizer.encode(text))
