"""One error style for the autorater's console scripts: an expected error (bad input, a
checkpoint that cannot be read) prints ``<prog>: error: <message>`` and exits 2; success
exits 0; ``--debug`` shows the traceback instead."""
from __future__ import annotations

import sys
from typing import Any, Callable


def run(prog: str, body: Callable[[], Any], show: Callable[[Any], str], debug: bool) -> int:
  """Runs `body`, prints `show(result)`; returns the exit status."""
  from flame.checkpoints import convert, manager  # pylint: disable=import-outside-toplevel
  try:
    result = body()
  except (convert.ConvertError, manager.CheckpointError, FileNotFoundError, ValueError) as e:
    if debug:
      raise
    print(f"{prog}: error: {e}", file=sys.stderr)
    return 2
  print(show(result))
  return 0
