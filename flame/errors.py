"""The base of errors that mean "the input is wrong" — a flag, file, checkpoint, setting or
topology — and not "flame has a bug".

Console scripts print these as one line and exit 2 (`flame.cli`); the modules that raise them
subclass `InputError` (and the builtin type that fits), so the command-line layer needs to
import none of them.
"""


class InputError(Exception):
  """Raised for bad input; `flame.cli` reports it without a traceback."""
