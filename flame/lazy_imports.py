"""Modules that load on first use, so that a command that never touches them does not pay for them.

`flame-merge` on Hugging Face folders never opens an Orbax checkpoint, yet importing
`orbax.checkpoint` costs ~0.25 s of a ~6 s merge (measured, AMD EPYC, 2 cores). The module is
registered under its own name, so every later ``import orbax.checkpoint`` gets the same object;
it executes on the first attribute read (a plain ``import`` of it elsewhere counts as one).
"""
from __future__ import annotations

import importlib.util
import sys
import types


def lazy_import(name: str) -> types.ModuleType:
  """`name`, imported now if it already was, else loaded on its first attribute access."""
  if name in sys.modules:
    return sys.modules[name]
  spec = importlib.util.find_spec(name)
  if spec is None or spec.loader is None:
    raise ImportError(f"no module named {name!r}")
  loader = importlib.util.LazyLoader(spec.loader)
  spec.loader = loader
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  loader.exec_module(module)
  return module
