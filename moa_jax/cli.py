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
