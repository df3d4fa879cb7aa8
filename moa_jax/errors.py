"""The errors a user can cause and fix: a bad flag, config, plan, checkpoint or download.

Every such error derives from `UserError`; `moa_jax.cli.run` prints it as one `error:` line and
exits with its `exit_code` (2, or 1 for a failed download, which may succeed when retried).
Python API callers catch them as usual; the subclasses that are bad values are also
`ValueError`s, so `except ValueError` keeps catching them.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in what the user asked for (a file, a flag, a value), told in one line."""

    exit_code = 2


class ConfigError(UserError, ValueError):
    """A command's configuration (flags, YAML keys, option values) is invalid or inconsistent."""


class PlanError(UserError, ValueError):
    """A plan file or spec cannot be read, or does not fit the model it is used with."""


class ArrayError(UserError, ValueError):
    """An array argument of a public function (token ids, q/k/v, a cache, positions) has the wrong
    shape, dtype or values; the message names the argument."""


class ModelConfigError(UserError, ValueError):
    """A model's configuration (an HF `config.json`, GGUF metadata, a `ModelConfig`) is malformed
    or asks for something the family's decoder does not do."""


class DivergenceError(UserError, RuntimeError):
    """A training run's loss or gradients became non-finite; the last good checkpoint is kept."""

    exit_code = 1
