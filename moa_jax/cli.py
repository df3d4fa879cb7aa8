"""Shared CLI plumbing: YAML config files whose keys are the command's own flags."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import yaml


def parse_args(parser: argparse.ArgumentParser,
               argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses argv; `--config FILE.yaml` supplies defaults that explicit flags override.

    Unknown keys in the YAML file are an error naming the key and the valid ones.
    """
    parser.add_argument("--config", type=Path, default=None,
                        help="YAML file of flag values (keys as the flags, with underscores)")
    pre, _ = parser.parse_known_args(argv)
    if pre.config is not None:
        if not pre.config.is_file():
            parser.error(f"config file {pre.config} does not exist")
        values = yaml.safe_load(pre.config.read_text()) or {}
        if not isinstance(values, dict):
            parser.error(f"config file {pre.config} must hold a mapping of flag: value")
        valid = {a.dest for a in parser._actions} - {"help", "config"}
        unknown = sorted(set(values) - valid)
        if unknown:
            parser.error(f"unknown key(s) {unknown} in {pre.config}; valid keys: {sorted(valid)}")
        parser.set_defaults(**values)
    return parser.parse_args(argv)


def enable_compilation_cache() -> None:
    """Keeps compiled XLA programs in `$MOA_JAX_CACHE/xla` when running on an accelerator.

    XLA's GPU compiler is slow on whole-model programs (tens of seconds to minutes each), and a
    search, its evaluations and a re-run with other flags compile the same programs again. On
    the CPU compiles are short and the cache is left off. `MOA_JAX_NO_COMPILE_CACHE=1` turns it
    off everywhere. Call it after `moa_jax.parallel.initialize_distributed` (it reads the
    backend).
    """
    import os

    import jax

    if os.environ.get("MOA_JAX_NO_COMPILE_CACHE") or jax.default_backend() == "cpu":
        return
    if jax.config.jax_compilation_cache_dir:          # the user's own setting wins
        return
    from moa_jax.downloads import cache_dir

    jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "xla"))
