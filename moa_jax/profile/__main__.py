"""`python -m moa_jax.profile`: flags (or `--config FILE.yaml`) -> `ProfileConfig` -> `run`."""

from __future__ import annotations

from collections.abc import Sequence

from moa_jax import cli
from moa_jax.profile import ProfileConfig, run
from moa_jax.runtime import enable_compilation_cache

PROG = "python -m moa_jax.profile"
DESCRIPTION = (
    "Search a MoA plan (per-head elastic spans) for a model: calibrate, profile head influence "
    "with jax.grad, solve a MILP per length under a KV-density budget, validate the Pareto "
    "candidates, write plan.json and a report."
)


def main(argv: Sequence[str] | None = None) -> int:
    config = cli.parse_config(ProfileConfig, argv, prog=PROG, description=DESCRIPTION)
    cli.setup_logging()
    enable_compilation_cache()
    run(config)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli.run(main))
