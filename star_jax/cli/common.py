"""Shared command-line plumbing: config loading with `--config file.py:args` and dotted overrides."""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags


def parse(argv: list[str], define=None):
    """Parses `argv` with a `--config` file flag (plus `--config.a.b=v` overrides) and `--workdir`.

    `define(flag_values)` may add command-specific flags. Returns the parsed FlagValues.
    """
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, "config file, e.g. configs/star.py:size=tiny", flag_values=fv, sys_argv=argv
    )
    flags.DEFINE_string("workdir", None, "where checkpoints, metrics and samples go", flag_values=fv)
    if define is not None:
        define(fv)
    fv(argv)
    return fv
