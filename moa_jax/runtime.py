"""Process-wide JAX runtime settings that a command applies once, after parsing its flags."""

from __future__ import annotations

import os

from moa_jax.downloads import cache_dir


def enable_compilation_cache() -> None:
    """Keeps compiled XLA programs in `$MOA_JAX_CACHE/xla` when running on an accelerator.

    XLA's GPU compiler is slow on whole-model programs (tens of seconds to minutes each), and a
    search, its evaluations and a re-run with other flags compile the same programs again. On
    the CPU compiles are short and the cache is left off. `MOA_JAX_NO_COMPILE_CACHE=1` turns it
    off everywhere. Call it after `moa_jax.parallel.initialize_distributed` (it reads the
    backend).
    """
    # Imported here, not at the top: commands import this module before parsing their flags, and
    # `--help` should not wait for jax.
    import jax

    if os.environ.get("MOA_JAX_NO_COMPILE_CACHE") or jax.default_backend() == "cpu":
        return
    if jax.config.jax_compilation_cache_dir:  # the user's own setting wins
        return
    jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "xla"))
