"""One error style for every console script.

An expected error (bad input, a setting that cannot work, a checkpoint that cannot be read)
prints ``<prog>: error: <message>`` on stderr and exits 2; success exits 0; ``--debug``
shows the traceback instead. Any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import errno
import logging
import re
import sys
from typing import Any, Callable, Optional

from flame import errors, quiet_imports

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


def add_dtype_flag(parser) -> None:
  """--dtype {float32,bfloat16}: what a model computes in (argparse names a wrong value)."""
  from flame.models import base  # pylint: disable=import-outside-toplevel
  parser.add_argument("--dtype", choices=base.COMPUTE_DTYPES, default=None,
                      help="compute dtype of the forward pass (bfloat16: bf16 matmuls, float32 "
                           "softmax, norms and log-probabilities); default: the checkpoint's "
                           "own. Parameters are read as stored (float32).")


def positive_int(text: str) -> int:
  """argparse type: a whole number >= 1 (argparse names the flag in its error)."""
  try:
    value = int(text)
  except ValueError:
    value = 0
  if value < 1:
    raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
  return value


class UsageError(ValueError):
  """A command line that cannot work (missing or conflicting flags)."""


def expected_errors() -> tuple[type[BaseException], ...]:
  """Exception types that mean "the input is wrong", not "flame has a bug"."""
  return (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, errors.InputError)


# OSErrors that mean the machine refused a write (not a bug): one line naming the path.
WRITE_REFUSALS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT})


# gin appends "  In call to configurable 'NAME' (<function NAME at 0x…>)" to errors it passes on.
_GIN_CALL = re.compile(r"\n\s*In call to configurable '([\w.]+)' \(<[^>]*>\)")


def describe(error: BaseException) -> str:
  """The one-line-ish message for an expected error (gin's call note shortened)."""
  return _GIN_CALL.sub(r" (in gin configurable '\1')", str(error))


def setup_logging(level: int = logging.INFO) -> None:
  """Our log lines with time and level; the libraries' own INFO chatter (Orbax announces
  every manager, restore and save; seqio every source) is kept to warnings and errors; their
  notices about nothing wrong are dropped from the moment flame is imported
  (`flame.quiet_imports.LibraryNotices`)."""
  root = logging.getLogger()
  for handler in list(root.handlers):  # The default one an early logging.info() installed;
    if type(handler) is logging.StreamHandler:  # pylint: disable=unidiomatic-typecheck
      root.removeHandler(handler)  # others (pytest's capture, a user's) stay.
  logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s")
  root.setLevel(level)
  absl = logging.getLogger("absl")
  absl.setLevel(max(level, logging.WARNING))


def run(prog: str, body: Callable[[], Any], show: Optional[Callable[[Any], str]] = None,
        debug: bool = False) -> int:
  """Runs `body`, prints `show(result)` if given; returns the exit status."""
  try:
    result = body()
  except expected_errors() as e:
    if debug:
      raise
    print(f"{prog}: error: {describe(e)}", file=sys.stderr)
    return EXIT_ERROR
  except OSError as e:
    if debug or e.errno not in WRITE_REFUSALS:
      raise
    print(f"{prog}: error: cannot write {e.filename or 'an output'}: {e.strerror}",
          file=sys.stderr)
    return EXIT_ERROR
  except KeyboardInterrupt:
    print(f"{prog}: interrupted", file=sys.stderr)
    return EXIT_INTERRUPTED
  if show is not None:
    text = show(result)
    if text:
      print(text)
  return 0


def console(prog: str, main: Callable[[list[str]], Any],
            show: Optional[Callable[[Any], str]] = None) -> None:
  """Exits with the status of `main(sys.argv[1:])` run under `run` (``--debug`` taken off),
  logging set up by `setup_logging` first (so no command shows the libraries' noise)."""
  setup_logging()
  args = [a for a in sys.argv[1:] if a != "--debug"]
  debug = "--debug" in sys.argv[1:]
  if not debug:
    quiet_imports.quiet_async_aftermath()
  sys.exit(run(prog, lambda: main(args), show, debug))
