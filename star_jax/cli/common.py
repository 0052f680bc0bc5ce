"""Shared command-line plumbing: config loading with `--config file.py:args` and dotted overrides."""

from __future__ import annotations

import sys

from absl import flags
from ml_collections import config_flags


def parse(argv: list[str], define=None):
    """Parses `argv` with a `--config` file flag (plus `--config.a.b=v` overrides) and `--workdir`.

    `define(flag_values)` may add command-specific flags. Returns the parsed FlagValues; help
    and flag errors as in `parse_flags`.
    """
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, "config file, e.g. configs/star.py:size=tiny", flag_values=fv, sys_argv=argv
    )
    flags.DEFINE_string("workdir", None, "where checkpoints, metrics and samples go", flag_values=fv)
    if define is not None:
        define(fv)
    parse_flags(fv, argv)
    return fv


def parse_flags(fv: flags.FlagValues, argv: list[str]) -> None:
    """Parses `argv` into `fv`. `-h` / `--help` prints the flags and exits 0; an unknown or
    malformed flag exits 2 with a one-line message naming it (not a traceback)."""
    if any(a in ("-h", "--help", "-help", "--helpfull") for a in argv[1:]):
        print(f"usage: {argv[0]} [flags]\n\n{fv.get_help()}")
        raise SystemExit(0)
    try:
        fv(argv)
    except flags.Error as e:
        print(f"{argv[0]}: {e} (see {argv[0]} --help)", file=sys.stderr)
        raise SystemExit(2) from None
