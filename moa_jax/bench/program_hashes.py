"""Fingerprints of the programs the GPU runs, computed on any machine (no GPU needed).

    python -m moa_jax.bench.program_hashes            # one line per program: name and hash

The jaxprs, kernel bodies included, of the prefill kernels (Triton and Mosaic GPU, forward and
forward+backward) and of one decode step of the MoA and Recycled Attention backends (Triton
kernels), each traced as for a GPU (`pallas_kernels.dispatch.lowering_for`) and hashed with the
names of the functions inside them left out (a renamed function is the same program). Two trees that
print the same hashes run the same GPU programs, so a change that leaves them alone (a
refactor, a move of code) cannot move a benchmark beyond run-to-run spread; a change that
alters them is one to time on the GPU.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import sys
from collections.abc import Sequence

from moa_jax.cli import help_from_doc, option, parse_config, run
from moa_jax.domains import Options

PROG = "python -m moa_jax.bench.program_hashes"


@dataclasses.dataclass(frozen=True)
class ProgramHashConfig(Options):
    """The flags of `python -m moa_jax.bench.program_hashes`."""

    json: bool = option(False, "print one JSON object instead of lines")


def _digest(jaxpr: object) -> str:
    text = re.sub(r"(name=|jaxpr=|let )\w+", r"\1F", str(jaxpr))
    text = re.sub(r"= \w+ \{ lambda", "= F { lambda", text)
    # object addresses differ between processes, line breaks with the names' lengths
    text = re.sub(r"0x[0-9a-f]+", "", " ".join(text.split()))
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def program_hashes() -> dict[str, str]:
    """{program name: hash} of the programs listed in the module docstring."""
    # jax and the model load after the flags: `--help` does not wait for them
    import jax
    import jax.numpy as jnp

    from moa_jax.config import ModelConfig
    from moa_jax.methods import AttentionConfig, build_attention
    from moa_jax.models.registry import init_random
    from moa_jax.pallas_kernels import dispatch, sparse_attention
    from moa_jax.pallas_kernels.prefill.mosaic_gpu import sparse_attention_mgpu
    from moa_jax.plan import Plan

    with dispatch.lowering_for("gpu"):
        out: dict[str, str] = {}
        q = jnp.zeros((1, 1024, 8, 128), jnp.bfloat16)
        k = jnp.zeros((1, 1024, 2, 128), jnp.bfloat16)
        windows, sinks = (64, 512, 128, 1000) * 2, (16,) * 8

        def triton(q, k, v):
            return sparse_attention(q, k, v, windows=windows, sink=sinks, backend="gpu")

        def mosaic(q, k, v):
            return sparse_attention_mgpu(
                q, k, v, windows=windows, sinks=sinks, q_offset=0, kv_lengths=None, scale=None
            )[0]

        for name, fwd in (("prefill triton", triton), ("prefill mosaic-gpu", mosaic)):
            grad = jax.grad(lambda q, k, v, f=fwd: f(q, k, v).astype(jnp.float32).sum(), (0, 1, 2))
            for suffix, fn in ((" fwd", fwd), (" fwd+bwd", grad)):
                out[name + suffix] = _digest(jax.make_jaxpr(fn)(q, k, k))

        cfg = ModelConfig(
            vocab_size=512,
            hidden_size=256,
            intermediate_size=512,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=64,
            max_position_embeddings=4096,
        )
        model = init_random(cfg, jax.random.key(0), dtype=jnp.bfloat16)
        tokens, positions = jnp.zeros((2,), jnp.int32), jnp.full((2,), 700, jnp.int32)
        plan = Plan.uniform(cfg.num_layers, cfg.num_heads, window=256, sink=16)
        for method, options in (("moa", {}), ("recycled", {"recycled.k": "128"})):
            ac = AttentionConfig(
                config=cfg, plan=plan, impl="native", kernel_backend="gpu", interpret=False,
                options=options,
            )  # fmt: skip
            attention = build_attention(method, ac, 1024)
            cache = attention.init_cache(cfg, 2, 1024, jnp.bfloat16)
            step = jax.make_jaxpr(
                lambda c, a=attention: model.decode_token(tokens, positions, c, a)
            )
            out[f"decode step {method}"] = _digest(step(cache))
        return out


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_config(ProgramHashConfig, argv, prog=PROG, **help_from_doc(__doc__))
    hashes = program_hashes()
    if config.json:
        print(json.dumps(hashes, indent=1))
    else:
        for name, digest in hashes.items():
            print(f"{digest}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
