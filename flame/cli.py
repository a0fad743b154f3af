"""One error style for every console script.

An expected error (bad input, a setting that cannot work, a checkpoint that cannot be read)
prints ``<prog>: error: <message>`` on stderr and exits 2; success exits 0; ``--debug``
shows the traceback instead. Any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import sys
from typing import Any, Callable, Optional

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


def expected_errors() -> tuple[type[BaseException], ...]:
  """Exception types that mean "the input is wrong", not "flame has a bug"."""
  # pylint: disable=import-outside-toplevel
  from flame import aot, train
  from flame.checkpoints import manager
  from flame.data import download
  return (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError,
          manager.CheckpointError, train.NonFiniteLossError, aot.TopologyError,
          download.DataFileError)


def run(prog: str, body: Callable[[], Any], show: Optional[Callable[[Any], str]] = None,
        debug: bool = False) -> int:
  """Runs `body`, prints `show(result)` if given; returns the exit status."""
  try:
    result = body()
  except expected_errors() as e:
    if debug:
      raise
    print(f"{prog}: error: {e}", file=sys.stderr)
    return EXIT_ERROR
  except KeyboardInterrupt:
    print(f"{prog}: interrupted", file=sys.stderr)
    return EXIT_INTERRUPTED
  if show is not None:
    text = show(result)
    if text:
      print(text)
  return 0


def pop_debug(argv: list[str]) -> tuple[list[str], bool]:
  """(argv without ``--debug``, whether it was there)."""
  return [a for a in argv if a != "--debug"], "--debug" in argv
