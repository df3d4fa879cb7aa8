"""Checks the bench commands run before any work: the machine they time, and the folder their
report goes to (a run of minutes must not end in an unwritable path)."""

from __future__ import annotations

from pathlib import Path

from moa_jax.errors import ConfigError


def cpu_only() -> bool:
    """Whether JAX runs on the CPU alone (no GPU or TPU); starts JAX's backend."""
    # jax loads here: the bench CLIs import this module before parsing flags (--help)
    import jax

    return jax.default_backend() == "cpu"


def check_out(flag: str, path: str | None) -> None:
    """`path` (None: no report) is a file to write in an existing folder, else a `ConfigError`
    naming `flag`; nothing is created."""
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{flag} {path} is a folder; give a file name")
    if not p.parent.is_dir():
        raise ConfigError(f"{flag} {path}: the folder {p.parent} does not exist")
