"""Keeps library noise off the first screen: TensorFlow's import-time C++ log lines on a
CPU-only machine (`install`), and library log records about nothing wrong (`LibraryNotices`).

TensorFlow writes a few lines straight to file descriptor 2 while it is imported (oneDNN is on,
no CUDA drivers, the absl "before InitializeLog" warning) before any log level applies, so
``TF_CPP_MIN_LOG_LEVEL`` cannot hide them, and an error line (``failed call to cuInit``) the
first time it looks for devices. `install` puts a finder on ``sys.meta_path`` that, the first
time ``tensorflow`` is imported (by seqio or anyone else), runs that import and the device
lookup with fd 2 pointed at a temporary file and then writes back every line except those
known lines: real warnings and errors still reach the screen, in order. Installed by
``flame/__init__.py`` only where the machine has no accelerator, so the CUDA lines are noise.
"""
from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import logging
import os
import re
import sys
import tempfile
from typing import Iterator

NOISE = re.compile(
    r"All log messages before absl::InitializeLog\(\) is called"
    r"|^[IWE]\d{4} [\d:. ]+\d+ (port\.cc|cudart_stub\.cc|cpu_feature_guard\.cc|cuda_\w+\.cc):"
    r"|^To enable the following instructions: .*rebuild TensorFlow")


def keep(line: str) -> bool:
  """Whether a line written during the import is worth showing."""
  return not NOISE.search(line)


@contextlib.contextmanager
def filtered_stderr() -> Iterator[None]:
  """Runs the body with fd 2 captured, then writes back the lines `keep` accepts."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile(mode="w+b") as captured:
    os.dup2(captured.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      text = captured.read().decode("utf-8", "replace")
      kept = "".join(line for line in text.splitlines(keepends=True) if keep(line))
      if kept:
        sys.stderr.write(kept)
        sys.stderr.flush()


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder):
  """Runs the first import of ``tensorflow`` and its device probe in `filtered_stderr`."""

  def find_spec(self, fullname, path=None, target=None):
    if fullname != "tensorflow":
      return None
    sys.meta_path.remove(self)  # Find the real spec with the other finders, and only once.
    spec = importlib.util.find_spec(fullname)
    if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
      return spec
    exec_module = spec.loader.exec_module

    def quiet_exec_module(module):
      with filtered_stderr():
        exec_module(module)
        module.config.list_physical_devices()  # Its CUDA probe, here, filtered.

    spec.loader.exec_module = quiet_exec_module
    return spec


class LibraryNotices(logging.Filter):
  """Library log records about nothing wrong: seqio advising to cache a FunctionDataSource
  (ours are deterministic: a resumed run reads the same batches, tested); Orbax announcing
  that a read-only manager saves nothing and that a params-only step has no step metadata
  file; TFDS noting that a folder it is about to prepare has no dataset_info.json yet; gin
  naming every config file it finds (on the root logger)."""

  BENIGN = ("Using an uncached FunctionDataset", "CheckpointManagerOptions.read_only=True",
            "Given directory is read only", "Metadata file does not exist: ",
            "Variant folder ", "system_path_file_exists:")

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(self.BENIGN)


def filter_library_notices() -> None:
  """Puts `LibraryNotices` on the absl logger (Orbax, TFDS, seqio) and the root logger (gin),
  once: for console scripts and library callers alike."""
  for logger in (logging.getLogger("absl"), logging.getLogger()):
    if not any(isinstance(f, LibraryNotices) for f in logger.filters):
      logger.addFilter(LibraryNotices())


class _AsyncAftermath(logging.Filter):
  """asyncio's report of a gathered read that failed after its sibling's failure was raised."""

  def filter(self, record: logging.LogRecord) -> bool:
    return "exception was never retrieved" not in str(record.msg)


def quiet_async_aftermath() -> None:
  """When one array of an Orbax restore cannot be read (a damaged checkpoint), Orbax raises
  that error (which the command reports in one line) and closes its event loop while
  TensorStore still finishes the sibling reads: each then fails to call back into the closed
  loop ("RuntimeError: Event loop is closed", an unraisable exception, one traceback per
  read), the sibling read coroutines are dropped raising the same read error (unraisable
  again, each with TensorStore's 40-line spec) and asyncio logs the gathered future's
  exception as never retrieved. All repeat the error already reported; this drops exactly
  those (console scripts, not with --debug)."""
  logger = logging.getLogger("asyncio")
  if not any(isinstance(f, _AsyncAftermath) for f in logger.filters):
    logger.addFilter(_AsyncAftermath())
  previous = sys.unraisablehook

  def hook(unraisable) -> None:
    value, code = unraisable.exc_value, getattr(unraisable.object, "cr_code", None)
    closed_loop = isinstance(value, RuntimeError) and str(value) == "Event loop is closed"
    orbax_read = code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename
    if not (closed_loop or orbax_read):
      previous(unraisable)

  sys.unraisablehook = hook


def install() -> None:
  """Quiets the first import of TensorFlow unless it is imported (or quieted) already."""
  if "tensorflow" not in sys.modules and not any(
      isinstance(f, _QuietTensorFlowImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _QuietTensorFlowImport())
