"""Gin flags: file lookup, overrides, required macros, typos failing before any work."""
import os
import subprocess
import sys

import gin
import pytest

from flame import gin_utils, train as train_lib  # noqa: F401  (registers train)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gin_files_are_found_in_gin_configs():
  assert gin_utils.find_gin_file("quickstart.gin") == os.path.join(REPO, "gin_configs",
                                                                    "quickstart.gin")
  assert gin_utils.find_gin_file("models/decoder_tiny.gin").endswith("models/decoder_tiny.gin")
  with pytest.raises(FileNotFoundError, match="nope.gin.*not found"):
    gin_utils.find_gin_file("nope.gin")


def test_overrides_take_literals_references_and_bare_strings():
  files, bindings, rest = gin_utils.split_flags(
      ["--gin_file", "a.gin", "--gin_file=b.gin", "--gin.TRAIN_STEPS=7",
       "--gin.MODEL_DIR=/tmp/run 1", "--gin.train.partitioner=@partitioning.Partitioner()",
       "--gin.NAME='quoted'", "--other"])
  assert files == ["a.gin", "b.gin"] and rest == ["--other"]
  assert bindings == ["TRAIN_STEPS = 7", "MODEL_DIR = '/tmp/run 1'",
                      "train.partitioner = @partitioning.Partitioner()", "NAME = 'quoted'"]


def test_quickstart_binds_every_required_macro(tmp_path):
  gin_utils.parse(["quickstart.gin"], [f"MODEL_DIR = '{tmp_path}'"])
  assert gin.query_parameter("%TRAIN_STEPS") == 300
  assert gin.query_parameter("%MIXTURE_OR_TASK_NAME") == "truthfulqa_judge_bytes"


def test_missing_required_macro_is_reported_by_name():
  with pytest.raises(ValueError, match="MODEL_DIR.*gin.REQUIRED"):
    gin_utils.parse(["quickstart.gin"], [])


def test_missing_include_is_a_named_file_not_found(tmp_path):
  config = tmp_path / "run.gin"
  config.write_text("include 'nope/missing.gin'\n")
  with pytest.raises(FileNotFoundError, match=r"gin include: Unable to open file: "
                     r"nope/missing.gin\..*In file \"" + str(config) + r"\", line 1"):
    gin_utils.parse([str(config)])


def test_typo_in_binding_fails_at_parse_time_with_gins_message():
  with pytest.raises(ValueError, match="batch_sise"):
    gin_utils.parse(["quickstart.gin"], ["train.batch_sise = 3", "MODEL_DIR = '/tmp/x'"])


def test_cli_typo_fails_before_any_work(tmp_path):
  model_dir = tmp_path / "run"
  result = subprocess.run(
      [sys.executable, "-m", "flame.train", "--gin_file=quickstart.gin",
       f"--gin.MODEL_DIR={model_dir}", "--gin.train.batch_sise=3"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert "batch_sise" in result.stderr
  assert not model_dir.exists()


@pytest.mark.parametrize("name,expected", [("data_parallel", (8, 1, 1)), ("fsdp", (1, 8, 1)),
                                           ("fsdp_tensor_parallel", (1, 2, 4))])
def test_partitioning_gin_files_build_their_meshes(tmp_path, name, expected):
  from flame import partitioning
  gin_utils.parse(["quickstart.gin", f"partitioning/{name}.gin"], [f"MODEL_DIR = '{tmp_path}'"])
  mesh = partitioning.Partitioner().mesh
  assert tuple(mesh.shape.values()) == expected
