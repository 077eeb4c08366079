"""User mistakes get one line and exit code 2; bugs keep their traceback.

Every error a user can cause (a config field, a data file, a checkpoint, a command-line
argument) is a `UserError` (or a subclass owned by the module that detects it) whose message
names the culprit and the fix. Entry points run through `run_main`, which prints
`error: <message>` and exits 2 for those, and lets anything else raise. `MDM_JAX_DEBUG=1` shows
the traceback for user errors too.

A message names an option as its caller typed it. Library code names an option by its keyword
(`option("mc_num", 7)`: the Python spelling, which lm-eval's `model_args` share) and a command
line declares its own spelling around its work (`with spelling(flags=True): ...`), so one
message reads `mc_num=7` from Python or the harness and `--mc-num 7` on the command line.
Every command names the model it reads `--model PATH` (`ArgumentParser.add_model_argument`).
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import os
import sys
import traceback
from collections.abc import Callable, Iterator

DEBUG_ENV = "MDM_JAX_DEBUG"


class UserError(Exception):
    """Bad input: the message names the input and what to do about it."""


def debug() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0", "false")


def fail(message: str) -> None:
    """Print one `error:` line and exit 2."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def run_main(main: Callable, *args, **kwargs):
    """Call an entry point's main; a UserError becomes one line and exit code 2. A reader
    that stops early (`... | head`) ends the output quietly, as for any Unix tool."""
    try:
        return main(*args, **kwargs)
    except UserError as e:
        if debug():
            raise
        fail(str(e).strip().replace("\n", " "))
    except BrokenPipeError:
        # Python would report the failed flush of stdout at exit: point it at /dev/null.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(141) from None  # 128 + SIGPIPE, what a shell reports for `yes | head`


def run_absl(define_flags: Callable, main: Callable) -> None:
    """An absl entry point with a `--config` file flag: `define_flags()` defines the flags and
    returns that one; `main(config)` runs with its value, user errors as one line each."""
    from absl import app

    holder = define_flags()
    app.run(lambda argv: run_main(main, holder.value), flags_parser=config_flags_parser)


def config_flags_parser(argv: list[str]) -> list[str]:
    """absl's flag parsing, for the CLIs with a `--config` file flag: bad flags get one
    `error:` line and exit 2 (absl prints two lines and exits 1; its "Did you mean" stays).

    ml_collections reports a config file's own mistakes as tracebacks (or, for a missing file,
    not until the config is first used); here each is one `error:` line and exit 2 like any
    bad flag: a file that does not exist or does not load, a get_config() that raises (its
    message kept), and a `--config.FIELD=...` naming no field (its "Did you mean" kept).
    MDM_JAX_DEBUG=1 shows the traceback instead.
    """
    from absl import flags

    try:
        rest = flags.FLAGS(argv)
    except Exception as e:  # anything but a config-file mistake is re-raised below
        if debug():
            raise
        if isinstance(e, (flags.Error, UserError)):
            fail(_short(str(e)))
        if not _from_config_flags(e):
            raise
        fail(_config_error(argv, e))
    import ml_collections

    config = flags.FLAGS["config"].value if "config" in flags.FLAGS else None
    if config is not None and not isinstance(config, ml_collections.ConfigDict):
        try:
            config.keys()  # ml_collections' stand-in for a config that did not load raises here
        except OSError as e:
            fail(_config_error(argv, e))
        fail(f"--config={_config_arg(argv)}: get_config() returned a {type(config).__name__}, "
             f"not an ml_collections.ConfigDict")
    return rest


def _short(message: str) -> str:
    """One line: a get_config() traceback that ml_collections pasted into a flag error is cut
    to its last line (the exception and its message)."""
    if "Traceback (most recent call last)" in message:
        head = message.split("Traceback (most recent call last)")[0]
        head = head.replace("Error whilst parsing config file:", "").strip().rstrip(":")
        last = [line for line in message.splitlines() if line.strip()][-1].strip()
        message = f"{head}: {last}"
    return " ".join(message.split())


def _from_config_flags(e: BaseException) -> bool:
    """Raised while ml_collections loaded the config file or applied a --config.FIELD."""
    frames = traceback.extract_tb(e.__traceback__)
    return any("ml_collections" in frame.filename for frame in frames)


def _config_arg(argv: list[str]) -> str:
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.partition("=")[2]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return "?"


def _config_file_shape(path: str) -> str | None:
    """What is wrong with a config file that loads but is not usable: no get_config(), or one
    that returns something other than a ConfigDict. None when neither."""
    import importlib.util

    import ml_collections

    file, _, arg = path.partition(":")
    try:
        spec = importlib.util.spec_from_file_location("mdm_jax_config_check", file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except Exception:
        return None
    if not callable(getattr(module, "get_config", None)):
        return f"--config={path}: {file} defines no get_config() function"
    try:
        config = module.get_config(arg) if arg else module.get_config()
    except Exception:
        return None
    if not isinstance(config, ml_collections.ConfigDict):
        return (f"--config={path}: get_config() returned a {type(config).__name__}, not an "
                f"ml_collections.ConfigDict")
    return None


def _config_error(argv: list[str], e: BaseException) -> str:
    path = _config_arg(argv)
    if isinstance(e, OSError):
        file = path.split(":", 1)[0]
        if not os.path.exists(file):
            return (f"--config={path}: no such file {file!r}; give a config file, e.g. "
                    f"--config=experiments/tiny.py or --config=experiments/isoflop.py:micro")
        cause = e.__cause__ or e
        return _short(f"--config={path}: cannot load {file!r}: {cause}")
    if isinstance(e, (KeyError, AttributeError)):  # a --config.FIELD override with no FIELD
        shape = _config_file_shape(path)  # ...unless the file itself is the problem
        if shape:
            return shape
        inner = e
        while isinstance(inner, BaseException) and inner.args:
            inner = inner.args[0]
        field, _, hint = str(inner).partition("\n")
        name = field.strip("'\"")
        culprit = next((a.split("=")[0] for a in argv if a.startswith("--config.")
                        and name in a.split("=")[0].split(".")), "--config.*")
        return _short(f"{culprit}: the config {path} has no field {field}. {hint}".strip())
    message = _short(f"--config={path}: {type(e).__name__}: {e}")
    if isinstance(e, TypeError) and "positional argument" in message and ":" in path:
        message += " (the part after ':' is passed to get_config(); drop it or accept it)"
    return message


# ---- options, spelled as the caller typed them ------------------------------------------------

_SPELLING: contextvars.ContextVar[tuple[bool, dict[str, str]]] = contextvars.ContextVar(
    "mdm_jax_option_spelling", default=(False, {}))
_NO_VALUE = object()


def option(name: str, value: object = _NO_VALUE) -> str:
    """Option `name` (a keyword: `mc_num`), with `value` if given, as the caller spells it:
    `mc_num` / `mc_num=7` by default (Python, lm-eval model_args), `--mc-num` / `--mc-num 7`
    inside `spelling(flags=True)`, or the name `spelling` renamed it to. Library messages name
    their options through this, never as hard-coded flags."""
    flags, renamed = _SPELLING.get()
    typed = renamed.get(name) or (f"--{name.replace('_', '-')}" if flags else name)
    if value is _NO_VALUE:
        return typed
    return f"{typed} {value}" if typed.startswith("-") else f"{typed}={value}"


@contextlib.contextmanager
def spelling(flags: bool = False, **renamed: str) -> Iterator[None]:
    """Inside, `option()` spells keywords as command-line flags (`flags`: `block_length` ->
    `--block-length`) and each keyword in `renamed` as given (`kv_cache="--no-kv-cache"`,
    `batch_size="mc_batch_size"`)."""
    token = _SPELLING.set((flags, renamed))
    try:
        yield
    finally:
        _SPELLING.reset(token)


# ---- argparse ----------------------------------------------------------------------------------

MODEL_HELP = "a run's workdir or an export folder"


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one ``error:`` line and exit code 2, like a UserError
    under ``run_main`` (argparse's own prints the usage too), and whose renamed options keep
    their old names for one release (`add_model_argument`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._renamed: list[tuple[argparse.Action, tuple[str, ...]]] = []  # (new, old flags)
        self._typed: dict[str, str] = {}

    def error(self, message: str):
        fail(f"{message} (see --help)")

    def add_model_argument(self, *old: str, help: str = MODEL_HELP) -> None:
        """`--model PATH` (required), the one name of the model a command reads; `old` are
        the names it had, accepted until the next release with a one-line note on stderr.
        Giving two of them is an error. The value is `args.model`."""
        # Shown as required in --help; parse_known_args checks it (an old name will do).
        action = self.add_argument("--model", metavar="PATH", help=help)
        for flag in old:
            self.add_argument(flag, dest=_old_dest(flag), metavar="PATH", help=argparse.SUPPRESS)
        self._renamed.append((action, old))

    def typed(self, dest: str) -> str:
        """The flag the user typed for a renamed option (its new name unless an old one)."""
        return self._typed[dest]

    def format_usage(self) -> str:
        with self._renamed_required():
            return super().format_usage()

    def format_help(self) -> str:
        with self._renamed_required():
            return super().format_help()

    @contextlib.contextmanager
    def _renamed_required(self) -> Iterator[None]:
        for action, _ in self._renamed:
            action.required = True
        try:
            yield
        finally:
            for action, _ in self._renamed:
                action.required = False

    def parse_known_args(self, args=None, namespace=None):
        ns, rest = super().parse_known_args(args, namespace)
        for action, old in self._renamed:
            dest, flag = action.dest, action.option_strings[0]
            given = [(f, v) for f in old if (v := vars(ns).pop(_old_dest(f), None)) is not None]
            if getattr(ns, dest) is not None:
                given.insert(0, (flag, getattr(ns, dest)))
            if len(given) > 1:
                typed = " and ".join(f for f, _ in given)
                self.error(f"{typed} name the same option ({', '.join(old)}: the old name of "
                           f"{flag}); give only {flag}")
            if not given:
                self.error(f"the following arguments are required: {flag}")
            self._typed[dest], value = given[0]
            if self._typed[dest] != flag:
                print(f"note: {self._typed[dest]} is now {flag}; the old name works until the "
                      f"next release", file=sys.stderr, flush=True)
            setattr(ns, dest, value)
        return ns, rest


def _old_dest(flag: str) -> str:
    return "_old_" + flag.lstrip("-").replace("-", "_")


def positive_int(text: str) -> int:
    """An argparse ``type`` for counts and sizes: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value
