"""Preparing a dataset prints one log line, not TFDS's console output, into flame's cache,
and leaves nothing in the temporary folder."""
import logging
import os
import tempfile

from flame.autorater import evaluate
from flame.data.sources import base


def test_default_data_dir_is_flames_cache_and_the_variable_wins(monkeypatch, tmp_path):
  monkeypatch.delenv(base.TFDS_DIR_ENV, raising=False)
  monkeypatch.setenv("HOME", str(tmp_path))
  assert base.default_data_dir() == os.path.join(str(tmp_path), ".cache", "flame", "tfds")
  monkeypatch.setenv(base.TFDS_DIR_ENV, str(tmp_path / "mine"))
  assert base.default_data_dir() == str(tmp_path / "mine")


def test_preparing_a_task_is_one_log_line_and_nothing_on_the_console(monkeypatch, tmp_path,
                                                                     capfd, caplog):
  monkeypatch.setenv(base.TFDS_DIR_ENV, str(tmp_path / "tfds"))
  scratch = tmp_path / "scratch"  # the temporary folder, isolated from other processes
  scratch.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(scratch))
  with caplog.at_level(logging.INFO):
    items = evaluate.task_items("synthetic_string_order", "validation", 5, "Strings")
  assert len(items) == 5
  assert os.listdir(scratch) == []  # TFDS left an empty tmp…tfds folder per builder here
  out, err = capfd.readouterr()
  assert out == ""
  assert not [line for line in err.splitlines()
              if "Downloading and preparing" in line or "Generating" in line
              or "Shuffling" in line or "dataset_info" in line], err
  preparing = [r.getMessage() for r in caplog.records if r.getMessage().startswith("preparing")]
  assert preparing == [f"preparing flame_synthetic/synthetic_string_order/1.0.0 in "
                       f"{tmp_path / 'tfds'}/flame_synthetic/synthetic_string_order/1.0.0"]
  # Prepared: a second use says nothing.
  caplog.clear()
  evaluate.task_items("synthetic_string_order", "validation", 5, "Strings")
  assert not [r for r in caplog.records if r.getMessage().startswith("preparing")]
  # A second config of the same builder: no TFDS notice about its version folder.
  caplog.clear()
  evaluate.task_items("synthetic_string_reversal", "validation", 5, "Strings")
  assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  assert "Variant folder" not in capfd.readouterr().err
