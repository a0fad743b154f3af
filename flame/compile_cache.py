"""JAX's persistent compilation cache, for commands that compile the same programs every run.

A merge compiles one small kernel per (tensor shape, method settings); a sweep or the
pipeline's merges compile the same ones again in every process. With the cache on, XLA's
executables are kept on disk and a later process loads them instead of compiling.

Where: `enable(directory)`, else ``$FLAME_COMPILE_CACHE``, else ``~/.cache/flame/xla``.
"off" (the flag or the variable) turns it off. A folder that cannot be created or written
is not an error: the command compiles as without a cache, after one warning.
"""
from __future__ import annotations

import logging
import os
import tempfile
from typing import Optional

ENV = "FLAME_COMPILE_CACHE"
OFF = "off"


def default_dir() -> str:
  return os.environ.get(ENV) or os.path.join(os.path.expanduser("~"), ".cache", "flame", "xla")


def _writable(directory: str) -> Optional[str]:
  """None when `directory` can hold the cache, else why not."""
  try:
    os.makedirs(directory, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=directory, prefix=".probe-"):
      pass
  except OSError as e:
    return e.strerror or type(e).__name__
  return None


def enable(directory: Optional[str] = None) -> Optional[str]:
  """Turns the persistent cache on in `directory` (see the module docstring); returns the
  folder in use, or None when off or not writable. Call before the first compilation."""
  directory = default_dir() if directory is None else directory
  if directory.strip().lower() in (OFF, ""):
    return None
  directory = os.path.abspath(os.path.expanduser(directory))
  problem = _writable(directory)
  if problem:
    logging.warning("compile cache %s is not writable (%s); compiling without a persistent "
                    "cache (set --compile_cache or %s to another folder, or to 'off')",
                    directory, problem, ENV)
    return None
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update("jax_compilation_cache_dir", directory)
  # A merge kernel compiles in well under JAX's default 1 s threshold: keep every one.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  return directory
