"""flame.lazy_imports: a module registered now, executed on its first attribute access."""
import os
import sys
import textwrap

import pytest

from flame import lazy_imports


def test_a_lazy_module_runs_on_first_use(tmp_path, monkeypatch):
  (tmp_path / "flame_lazy_probe.py").write_text(textwrap.dedent("""
      import os
      RUNS = int(os.environ.get("PROBE_RUNS", "0")) + 1
      os.environ["PROBE_RUNS"] = str(RUNS)
      """))
  monkeypatch.syspath_prepend(str(tmp_path))
  monkeypatch.delenv("PROBE_RUNS", raising=False)
  monkeypatch.delitem(sys.modules, "flame_lazy_probe", raising=False)
  module = lazy_imports.lazy_import("flame_lazy_probe")
  assert "PROBE_RUNS" not in os.environ  # registered, not executed
  assert module.RUNS == 1 and os.environ["PROBE_RUNS"] == "1"
  import flame_lazy_probe  # pylint: disable=import-outside-toplevel,import-error
  assert flame_lazy_probe is module  # one module object for every importer
  assert lazy_imports.lazy_import("flame_lazy_probe").RUNS == 1  # executed once


def test_a_module_already_imported_is_returned_as_is():
  assert lazy_imports.lazy_import("os") is os


def test_a_missing_module_is_named():
  with pytest.raises(ImportError, match="no_such_module_here"):
    lazy_imports.lazy_import("no_such_module_here")
