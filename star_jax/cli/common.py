"""Shared command-line plumbing of every `star-jax` command and of `python -m star_jax.bench`.

One flag system: absl flags, each command on its own `flags.FlagValues` (never the global one),
parsed by `parse_flags`; `--config file.py:args` with `--config.a.b=v` overrides through `parse`;
subcommands (`star-jax vq encode`, `star-jax eval qa`, `star-jax <command>`) through `dispatch`.
One behaviour for all of them:
- `-h` / `--help` prints the usage line, the command's doc and its flags; exit 0;
- an unknown or malformed flag, a missing required flag, a stray argument or an unknown
  subcommand prints one line on stderr naming it; exit 2;
- a bad input found after parsing (no checkpoint, an unreadable image): `error(prog, message)`
  prints one line on stderr and the command returns 2.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import NoReturn

from absl import flags
from ml_collections import config_flags

HELP_ARGS = ("-h", "--help", "-help", "--helpfull")


def parse(argv: list[str], define: Callable[[flags.FlagValues], None] | None = None, doc: str | None = None):
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
    parse_flags(fv, argv, doc)
    return fv


def parse_flags(fv: flags.FlagValues, argv: list[str], doc: str | None = None) -> None:
    """Parses `argv` (argv[0]: the program name, e.g. "star-jax vq encode") into `fv`.

    `-h` / `--help` prints the usage, `doc` and the flags, then exits 0; an unknown or malformed
    flag, a missing required one or a positional argument exits 2 with one line naming it.
    """
    prog = argv[0] if argv else "star-jax"
    if any(a in HELP_ARGS for a in argv[1:]):
        text = f"usage: {prog} [flags]\n\n"
        if doc:
            text += doc.strip() + "\n\n"
        print(text + fv.get_help(include_special_flags=False).lstrip("\n"))
        raise SystemExit(0)
    try:
        rest = fv([prog, *argv[1:]])
    except flags.Error as e:
        usage_error(prog, str(e))
    if len(rest) > 1:
        usage_error(prog, f"unexpected argument {rest[1]!r} (flags are --name=value)")


def usage_error(prog: str, message: str) -> NoReturn:
    """Prints `prog: message (see prog --help)` on stderr and exits 2."""
    print(f"{prog}: {message} (see {prog} --help)", file=sys.stderr)
    raise SystemExit(2)


def error(prog: str, message) -> int:
    """Prints `prog: message` on stderr; returns 2, the exit status of a bad input."""
    print(f"{prog}: {message}", file=sys.stderr)
    return 2


# A subcommand: its `main(argv)` (or the dotted name of a module holding one, imported only when
# chosen, so one subcommand's optional dependencies never load for another) and a one-line help.
Subcommands = dict[str, tuple[Callable[[list[str]], int] | str, str]]


def dispatch(argv: list[str], commands: Subcommands, doc: str | None = None) -> int:
    """Runs subcommand argv[1] of program argv[0] as `main([f"{argv[0]} {name}", *argv[2:]])`.

    No subcommand, or `-h` / `--help` in its place, prints the usage, `doc` and the list (exit 2 /
    0); an unknown one exits 2 with one line. A module whose import lacks an optional dependency
    returns 2 naming it.
    """
    prog = argv[0] if argv else "star-jax"
    if len(argv) < 2 or argv[1] in HELP_ARGS or argv[1] == "help":
        width = max(len(name) for name in commands) + 2
        text = f"usage: {prog} {{{'|'.join(commands)}}} [flags]\n\n"
        if doc:
            text += doc.strip() + "\n\n"
        text += "commands:\n" + "\n".join(f"  {name:<{width}}{help_}" for name, (_, help_) in commands.items())
        print(text + f"\n\n`{prog} <command> --help` lists a command's flags.")
        return 0 if len(argv) >= 2 else 2
    name = argv[1]
    if name not in commands:
        usage_error(prog, f"unknown command {name!r}; known: {', '.join(commands)}")
    target, _ = commands[name]
    if isinstance(target, str):
        try:
            target = importlib.import_module(target).main
        except ModuleNotFoundError as e:
            if e.name and not e.name.startswith("star_jax"):
                return error(prog, f"command {name!r} is not available in this build (no module {e.name!r})")
            raise
    return target([f"{prog} {name}", *argv[2:]]) or 0
