"""Shared command-line plumbing of every `star-jax` command and of `python -m star_jax.bench`.

One flag system: absl flags, each command on its own `flags.FlagValues` (never the global one),
parsed by `parse_flags`; `--config file.py:args` with `--config.a.b=v` overrides through `parse`;
subcommands (`star-jax vq encode`, `star-jax eval qa`, `star-jax <command>`) through `dispatch`.
Every command starts the distributed runtime right after its flags are parsed, before anything
touches a device (`star_jax.distributed`): from `config.distributed` for commands with a config
(`--config.distributed.mode=auto|explicit`), from `--distributed=off|auto|explicit` (default off)
for the others. One behaviour for all of them:
- `-h` / `--help` prints the usage line, the command's doc and its flags; exit 0;
- an unknown or malformed flag, a missing required flag, a stray argument, an unknown subcommand,
  a `--config` file that does not exist or fails to load, or an override of a key the config does
  not have (with the closest key suggested) prints one line on stderr naming it; exit 2;
- a bad input found after parsing (no checkpoint, an unreadable image): `error(prog, message)`
  prints one line on stderr and the command returns 2.
`--config configs/<file>.py` (and `projects/...`) also resolves from the installed package
(`star_jax.configs`, `star_jax.projects`) when the command runs outside the repository.

A quiet console (`quiet_console`, around every command `star_jax.main.run` dispatches): progress, results, warnings
and errors; library messages that mean nothing to a user (`CONSOLE_NOISE`: Orbax's read-only and
metadata notices, platform fallbacks, TensorFlow import chatter) go only to the log file, which
`log_to(path)` names once a command knows its workdir (records before that are kept until then).
"""

from __future__ import annotations

import collections
import contextlib
import difflib
import importlib
import importlib.util
import logging
import os
import re
import sys
import tempfile
from collections.abc import Callable
from typing import NoReturn

import ml_collections
from absl import flags
from ml_collections import config_flags

from star_jax import distributed

HELP_ARGS = ("-h", "--help", "-help", "--helpfull")


def parse(argv: list[str], define: Callable[[flags.FlagValues], None] | None = None, doc: str | None = None):
    """Parses `argv` with a `--config` file flag (plus `--config.a.b=v` overrides) and `--workdir`.

    `define(flag_values)` may add command-specific flags. Returns the parsed FlagValues; help
    and flag errors as in `parse_flags`; a config file that does not exist, fails to load, or an
    override of a key it does not have exits 2 with one line.
    """
    prog = argv[0] if argv else "star-jax"
    argv = resolve_config_path(prog, list(argv))
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, "config file, e.g. configs/star.py:size=tiny", flag_values=fv, sys_argv=argv
    )
    flags.DEFINE_string("workdir", None, "where checkpoints, metrics and samples go", flag_values=fv)
    if define is not None:
        define(fv)
    try:
        parse_flags(fv, argv, doc)
    except (AttributeError, KeyError, TypeError) as e:  # raised by ml_collections for an override
        usage_error(prog, _override_error(fv, argv, e))
    return fv


def _config_arg(argv: list[str]) -> tuple[int, str, str] | None:
    """(index, prefix, value) of the `--config` argument: prefix is "--config=" or "" (value in the next one)."""
    for i, a in enumerate(argv[1:], 1):
        for dash in ("--", "-"):
            if a.startswith(f"{dash}config="):
                return i, f"{dash}config=", a[len(dash) + 7 :]
            if a == f"{dash}config" and i + 1 < len(argv):
                return i + 1, "", argv[i + 1]
    return None


def _package_dir(name: str) -> str | None:
    try:
        spec = importlib.util.find_spec(name)
    except ImportError:
        return None
    return list(spec.submodule_search_locations)[0] if spec and spec.submodule_search_locations else None


def resolve_config_path(prog: str, argv: list[str]) -> list[str]:
    """`argv` with its `--config` path resolved: as given when it exists; else `configs/...` and
    `projects/...` from the installed `star_jax.configs` / `star_jax.projects`; else one line, exit 2."""
    found = _config_arg(argv)
    if found is None:
        return argv
    i, prefix, value = found
    path, sep, args = value.partition(":")
    if os.path.exists(path):
        return argv
    rel = os.path.normpath(path)
    for top, package in (("configs", "star_jax.configs"), ("projects", "star_jax.projects")):
        if rel.split(os.sep)[0] == top and (root := _package_dir(package)):
            candidate = os.path.join(root, os.path.relpath(rel, top))
            if os.path.exists(candidate):
                return argv[:i] + [prefix + candidate + sep + args] + argv[i + 1 :]
    known = ""
    if root := _package_dir("star_jax.configs"):
        files = sorted(f for f in os.listdir(root) if f.endswith(".py") and _defines_get_config(os.path.join(root, f)))
        known = f"; the installed configs: {', '.join('configs/' + f for f in files)}" if files else ""
    usage_error(prog, f"--config file {path!r} does not exist{known}")


def _defines_get_config(path: str) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            return "\ndef get_config(" in f.read()
    except OSError:
        return False


def _keys(node, prefix: str = "") -> list[str]:
    """The dotted paths of `node`'s leaves."""
    out = []
    for key, value in node.items():
        if isinstance(value, ml_collections.ConfigDict):
            out += _keys(value, f"{prefix}{key}.")
        else:
            out.append(prefix + key)
    return out


def _override_error(fv: flags.FlagValues, argv: list[str], error: Exception) -> str:
    """One line naming the `--config.a.b=v` override whose key the config lacks, with the closest key."""
    config, found = None, _config_arg(argv)
    if found is not None:
        try:  # the flag holds no value yet: ml_collections checks the overrides while parsing --config
            config = fv["config"].parser.parse(found[2])
        except Exception:  # the config itself failed: say what ml_collections said
            config = None
    if isinstance(config, ml_collections.ConfigDict):
        for a in argv[1:]:
            name = a.lstrip("-").split("=", 1)[0]
            if not name.startswith("config."):
                continue
            key = name[len("config.") :]
            node = config
            for part in key.split("."):
                if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                    close = difflib.get_close_matches(key, _keys(config), n=1, cutoff=0.6)
                    hint = f"; did you mean --config.{close[0]}?" if close else ""
                    return f"--{name}: the config has no key {key!r}{hint}"
                node = node[part]
    detail = error.args[0] if isinstance(error, KeyError) and error.args else error
    return f"--config override: {one_line(str(detail))}"


def parse_flags(fv: flags.FlagValues, argv: list[str], doc: str | None = None) -> None:
    """Parses `argv` (argv[0]: the program name, e.g. "star-jax vq encode") into `fv`, then starts
    the distributed runtime (`start_distributed`).

    `-h` / `--help` prints the usage, `doc` and the flags, then exits 0; an unknown or malformed
    flag, a missing required one or a positional argument exits 2 with one line naming it; so does
    a distributed start that cannot work (`distributed.DistributedError`).
    """
    prog = argv[0] if argv else "star-jax"
    if "distributed" not in fv:
        flags.DEFINE_enum(
            "distributed",
            "off",
            distributed.MODES,
            "multi-process start: off | auto (TPU pod, Slurm, Open MPI) | explicit (JAX_COORDINATOR_ADDRESS, "
            "JAX_NUM_PROCESSES, JAX_PROCESS_ID); with --config, config.distributed.mode",
            flag_values=fv,
        )
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
    start_distributed(prog, fv)


def start_distributed(prog: str, fv: flags.FlagValues) -> None:
    """`distributed.initialize` from `fv`: a `--config` with a `distributed` block gives the settings
    (`--distributed`, when not off, overrides its mode); otherwise `--distributed` alone. A setting
    that cannot work prints one line and exits 2."""
    config = fv["config"].value if "config" in fv else None
    try:
        if isinstance(config, ml_collections.ConfigDict) and "distributed" in config:
            if fv.distributed != "off":
                config.distributed.mode = fv.distributed
            distributed.initialize_from_config(config)
        else:
            distributed.initialize(fv.distributed)
    except distributed.DistributedError as e:
        raise SystemExit(error(prog, e)) from None


def one_line(message: str) -> str:
    """`message` on one line: a multi-line one (e.g. a traceback absl wraps) keeps its first and last lines."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else ""
    return f"{lines[0].rstrip(':')}: {lines[-1]}"


def usage_error(prog: str, message: str) -> NoReturn:
    """Prints `prog: message (see prog --help)` on stderr, on one line, and exits 2."""
    print(f"{prog}: {one_line(message)} (see {prog} --help)", file=sys.stderr)
    raise SystemExit(2)


def error(prog: str, message) -> int:
    """Prints `prog: message` on stderr, on one line; returns 2, the exit status of a bad input."""
    print(f"{prog}: {one_line(message)}", file=sys.stderr)
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


# -- the console and the log file -------------------------------------------------------------------

# (logger name prefix, message regex) of library messages that mean nothing to a user: kept in the
# log file, never shown. Errors (level >= ERROR) always reach the console.
CONSOLE_NOISE = (
    ("absl", r"Given directory is read only"),  # Orbax, on every read-only checkpoint open
    ("absl", r"Metadata file does not exist"),  # Orbax, reading checkpoints written without it
    ("absl", r"^\[process=\d+\]"),  # Orbax's per-process bookkeeping
    ("jax", r"GPU may be present|Falling back to cpu|No GPU/TPU found|Platform '\w+' is experimental"),
    ("jax", r"Unable to initialize backend"),
    ("py.warnings", r"/(tensorflow|tensorflow_datasets|tensorboard|keras|google/protobuf)/"),
    ("tensorflow", r""),  # TensorFlow's import chatter (it is only an optional dependency)
)
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_BUFFERED = 20_000  # records kept before `log_to` names the file


def is_noise(record: logging.LogRecord) -> bool:
    """Whether `record` is a library message that stays off the console (`CONSOLE_NOISE`)."""
    if record.levelno >= logging.ERROR:
        return False
    for prefix, pattern in CONSOLE_NOISE:
        if record.name == prefix or record.name.startswith(prefix + "."):
            if re.search(pattern, record.getMessage()):
                return True
    return False


class _Console(logging.StreamHandler):
    """WARNING and above on the current sys.stderr, library noise left out."""

    def __init__(self):
        super().__init__(sys.stderr)
        self.setLevel(logging.WARNING)
        self.setFormatter(logging.Formatter("%(levelname)s:%(name)s:%(message)s"))
        self.addFilter(lambda record: not is_noise(record))

    def emit(self, record):
        self.stream = sys.stderr  # follows redirections (and pytest's capture)
        super().emit(record)


class _LogFile(logging.Handler):
    """INFO and above, noise included: kept in memory until `log_to(path)`, then appended to path."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.setFormatter(logging.Formatter(LOG_FORMAT))
        self.pending: collections.deque = collections.deque(maxlen=_BUFFERED)
        self.file: logging.FileHandler | None = None

    def emit(self, record):
        if self.file is None:
            self.pending.append(record)
        else:
            self.file.emit(record)

    def open(self, path: str) -> None:
        if self.file is not None:
            self.file.close()
        self.file = logging.FileHandler(path, mode="a", encoding="utf-8")
        self.file.setFormatter(self.formatter)
        while self.pending:
            self.file.emit(self.pending.popleft())

    def close(self):
        if self.file is not None:
            self.file.close()
        super().close()


@contextlib.contextmanager
def quiet_console():
    """Routes logging for a command-line run, restored on exit: the console shows WARNING and above
    without `CONSOLE_NOISE`; everything from INFO up, noise included, goes to the log file (`log_to`).
    Python warnings are logged too (`py.warnings`); TensorFlow / XLA C++ INFO lines are off unless
    TF_CPP_MIN_LOG_LEVEL is set."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    for handler in saved_handlers:  # basicConfig's plain stderr handler would print the noise
        if type(handler) is logging.StreamHandler and handler.stream in (sys.stderr, sys.__stderr__):
            root.removeHandler(handler)
    ours = [_Console(), _LogFile()]
    for handler in ours:
        root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > logging.INFO:
        root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    try:
        yield
    finally:
        logging.captureWarnings(False)
        for handler in ours:
            root.removeHandler(handler)
            handler.close()
        for handler in saved_handlers:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(saved_level)


def log_to(path: str) -> str | None:
    """Appends the log (what `quiet_console` kept so far, then everything after) to `path`, creating
    its directory. Call once the command's inputs are checked, so that a refused command writes
    nothing. Returns the path, or None when `quiet_console` is not installed or the file cannot be opened.
    A URL (gs://...) is not a local file: the log goes to the same name under the temporary directory."""
    if "://" in path:
        path = os.path.join(tempfile.gettempdir(), "star_jax", path.split("://", 1)[1].lstrip("/"))
    for handler in logging.getLogger().handlers:
        if isinstance(handler, _LogFile):
            try:
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
                handler.open(path)
            except OSError as e:  # a read-only workdir: the console still works
                print(f"(no log file: {e})", file=sys.stderr)
                return None
            return path
    return None
