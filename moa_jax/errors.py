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
