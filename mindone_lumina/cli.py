"""What every command-line tool (``tools/*.py``) shares, so that each treats its user and their files alike.

- Arguments are checked before anything is loaded: numbers with their ranges (``integer``, ``number``, ``seed``,
  ``resolution`` as argparse types), inputs that must exist (``existing``), outputs that must be writable and of the
  right kind (``output_file``, ``output_folder``).
- An error is one line, ``TOOL: error: MESSAGE``, naming the argument and its value: exit status 2 for what the
  caller can fix (``ValueError``, argparse's usage errors included), 1 for what the system refused (``OSError``).
  ``--debug`` (every ``Parser`` has it) prints the traceback before that line. Anything else is a bug in the tool
  and keeps Python's traceback.
- ``--help`` names the default of every flag (``help_text``).
- Files appear whole under names that do not collide with earlier runs (``slug``, ``write_new``; the writing
  itself is ``atomic.atomic_path``, with the user's umask).
- SIGINT and SIGTERM unwind the tool as Ctrl-C does, so every ``finally`` runs: the temporary file or folder being
  written is removed (``atomic``) and finished files stay. Exit status 128 + the signal's number. (Once MindSpore
  2.10 has run an op, its runtime holds SIGINT and passes Ctrl-C on as SIGTERM, measured: the same clean-up, status
  143.)

A tool is ``main(argv)``, which raises ``ValueError`` for bad input (its tests call it directly), run as a command by
``cli.run(main)``.
"""

import argparse
import inspect
import json
import math
import os
import re
import signal
import sys
import traceback

from .atomic import atomic_path, check_creatable

SEED_MAX = 2**32 - 1  # numpy's legacy seeding, torch and diffusers all take seeds of 32 bits


class UsageError(ValueError):
    """A command line argparse refused (unknown flag, missing or malformed value): exit status 2 through ``run``."""


# ------------------------------------------------------------------------------------------------------------------
# The parser
# ------------------------------------------------------------------------------------------------------------------
def help_text(action: argparse.Action) -> str:
    """The help of ``action`` with its default appended, unless the text names one already (the sampling flags say
    what the model decides) or the flag is required. A flag with neither a stated nor a non-None default keeps its
    text as is; ``tests/test_cli.py`` finds such flags in every tool."""
    text = action.help or ""
    if text == argparse.SUPPRESS or not action.option_strings or action.required or "default" in text.lower():
        return text
    if action.default == argparse.SUPPRESS or (action.default is None and action.nargs != 0):
        return text
    default = "off" if action.nargs == 0 and not action.default else action.default
    return f"{text} (default: {str(default).replace('%', '%%')})"  # argparse %-formats help texts


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Tool docstrings as written (their usage examples are laid out by hand), every flag with its default."""

    def _get_help_string(self, action):
        return help_text(action)


class Parser(argparse.ArgumentParser):
    """argparse for the tools: usage errors raise ``UsageError`` (``run`` prints one line, exit status 2) instead of
    printing the usage block and exiting, ``--debug`` on every parser and sub-command, defaults in ``--help``."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true", help="on an error, print its traceback too (default: off)")

    def error(self, message):
        raise UsageError(f"{message} (see --help)")


# argparse types: a ValueError from a type is reported as "invalid <type> value", an ArgumentTypeError as written
def integer(low: int | None = None, high: int | None = None):
    """An argparse type: an integer in [low, high] (either bound may be None)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be an integer {_limits(low, high)}, got {text}")
        return value

    return parse


def _limits(low=None, high=None, above=None) -> str:
    if low is not None and high is not None:
        return f"in {low}..{high}"
    return " and ".join(f"{op} {b}" for op, b in ((">=", low), ("<=", high), (">", above)) if b is not None)


def number(low: float | None = None, high: float | None = None, above: float | None = None):
    """An argparse type: a finite number, >= ``low``, <= ``high``, > ``above`` (each bound may be None)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        ok = math.isfinite(value) and (low is None or value >= low) and (high is None or value <= high)
        if not ok or (above is not None and value <= above):
            raise argparse.ArgumentTypeError(f"must be a finite number {_limits(low, high, above)}, got {text}")
        return value

    return parse


seed = integer(0, SEED_MAX)


def resolution(text: str) -> tuple:
    """An argparse type: ``WIDTHxHEIGHT`` in pixels, both positive, as (width, height). The multiple the sides must
    have depends on the model, which the tool checks next (before loading it)."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT in pixels, e.g. 1024x1024, got {text!r}") from None
    if width < 1 or height < 1:
        raise argparse.ArgumentTypeError(f"width and height must be positive, got {text}")
    return width, height


# ------------------------------------------------------------------------------------------------------------------
# Paths: checked before anything is loaded
# ------------------------------------------------------------------------------------------------------------------
def existing(path: str, flag: str, kind: str | None = None) -> str:
    """``path`` if it exists (as a ``kind``: "file", "folder" or either); ``ValueError`` naming ``flag`` if not."""
    if not os.path.exists(path):
        raise ValueError(f"{flag} {path} does not exist")
    if kind == "file" and not os.path.isfile(path):
        raise ValueError(f"{flag} {path} is a folder; expected a file")
    if kind == "folder" and not os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a file; expected a folder")
    return path


def output_file(path: str, flag: str, overwrite: bool = False, overwrite_flag: str = "--overwrite") -> str:
    """``path`` if a file can be written there: not a folder, absent unless ``overwrite``, in a writable folder."""
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a folder; expected a file name")
    if os.path.lexists(path) and not overwrite:
        raise ValueError(f"{flag} {path} already exists; pass {overwrite_flag} to replace it")
    return _creatable(path, flag)


def output_folder(path: str, flag: str, empty: bool = False) -> str:
    """``path`` if files can be written into it: absent or a writable folder (an empty one if ``empty``)."""
    if os.path.lexists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag} {path} is an existing file, not a folder")
    if empty and os.path.isdir(path) and os.listdir(path):
        raise ValueError(f"{flag} {path} is a folder that is not empty")
    return _creatable(path, flag)


def _creatable(path: str, flag: str) -> str:
    """``path`` if it can be created (its nearest existing parent is a writable folder); the error names ``flag``."""
    try:
        check_creatable(path)
    except ValueError as e:
        raise ValueError(f"{flag} {e}") from None
    return path


# ------------------------------------------------------------------------------------------------------------------
# Output names
# ------------------------------------------------------------------------------------------------------------------
def slug(text: str, limit: int = 40) -> str:
    """A short file-name-safe form of ``text``: its first ASCII words joined by '-', at most ``limit`` characters;
    "prompt" for a text without ASCII words (e.g. a Chinese prompt), "empty" for an empty one."""
    out = ""
    for word in re.findall(r"[a-z0-9]+", text.lower()):
        if out and len(out) + 1 + len(word) > limit:
            break
        out = f"{out}-{word}" if out else word[:limit]
    return out or ("prompt" if text.strip() else "empty")


def numbered(path: str):
    """``path``, then ``stem_2.ext``, ``stem_3.ext``, ...: the names a taken file name counts up through."""
    stem, ext = os.path.splitext(path)
    yield path
    n = 2
    while True:
        yield f"{stem}_{n}{ext}"
        n += 1


def write_new(path: str, write, overwrite: bool = False, counter: bool = True) -> str:
    """``write(tmp)`` into a temporary file published as ``path`` (``atomic.atomic_path``) and returns the name
    written: with ``overwrite`` it replaces ``path``; else a taken name gets a counter (``numbered``) when
    ``counter``, or raises ``FileExistsError``. A name taken while writing (another run) is never replaced."""
    for candidate in [path] if overwrite or not counter else numbered(path):
        if counter and not overwrite and os.path.lexists(candidate):
            continue
        try:
            with atomic_path(candidate, replace=overwrite) as tmp:
                write(tmp)
        except FileExistsError:
            if overwrite or not counter:
                raise
            continue
        return candidate
    raise AssertionError("numbered() is endless")


def save_png(image, path: str, info: dict, overwrite: bool = False, counter: bool = True) -> str:
    """A PIL ``image`` written as PNG with ``info`` in its text chunks (strings as they are, anything else as JSON),
    through ``write_new``: returns the name written."""
    from PIL.PngImagePlugin import PngInfo

    meta = PngInfo()
    for key, value in info.items():
        meta.add_text(key, value if isinstance(value, str) else json.dumps(value))
    return write_new(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=meta), overwrite, counter)


# ------------------------------------------------------------------------------------------------------------------
# Running a tool
# ------------------------------------------------------------------------------------------------------------------
class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM, raised in the main thread so that every ``finally`` runs (a KeyboardInterrupt, so code
    that handles Ctrl-C handles SIGTERM alike)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _interrupt(signum, frame):
    for s in (signal.SIGINT, signal.SIGTERM):  # a second signal must not cut the clean-up short
        signal.signal(s, signal.SIG_IGN)
    raise Interrupted(signum)


def catch_signals() -> dict:
    """SIGINT and SIGTERM raise ``Interrupted`` from here on; returns the handlers they replace."""
    return {s: signal.signal(s, _interrupt) for s in (signal.SIGINT, signal.SIGTERM)}


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__


def run(main, argv=None):
    """Run ``main(argv)`` as a command (module docstring) and exit with its status: ``main``'s return value (None =
    0), 2 for a ``ValueError``, 1 for an ``OSError``, 128 + N for signal N."""
    argv = sys.argv[1:] if argv is None else list(argv)
    name = os.path.basename(inspect.getfile(main))
    previous = catch_signals()
    try:
        status = main(argv)
    except KeyboardInterrupt as e:  # Interrupted, or a plain Ctrl-C where a library had replaced the handler
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"{name}: interrupted ({signal.Signals(signum).name})", file=sys.stderr)
        status = 128 + signum
    except (ValueError, OSError) as e:
        if "--debug" in argv:
            traceback.print_exc()
        print(f"{name}: error: {one_line(e)}", file=sys.stderr)
        status = 2 if isinstance(e, ValueError) else 1
    finally:
        for s, handler in previous.items():
            if handler is not None:  # None: installed outside Python (a library's C handler), cannot be put back
                signal.signal(s, handler)
    sys.exit(status or 0)
