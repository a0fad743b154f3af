"""An output that cannot be written is refused before any work, in one line, leaving the
files as they were (`flame.files.check_output_writable`, every command that writes); a write
the machine refuses later (disk full, read-only) is one line too (`flame.cli.run`); a damaged
checkpoint is one line with nothing after it and nothing left behind."""
import errno
import os
import shutil
import subprocess
import sys
import types

import pytest

from flame import cli, files, quiet_imports
from flame.autorater import evaluate, rate

from test_autorater_rate import _jsonl, _rb_rows, _write_checkpoint  # noqa: F401

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def listing(root):
  """Every folder and file under `root`, files with their bytes."""
  out = {}
  for folder, dirs, names in os.walk(root):
    for name in dirs:
      out[os.path.relpath(os.path.join(folder, name), root) + "/"] = None
    for name in names:
      path = os.path.join(folder, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = f.read()
  return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  return _write_checkpoint(tmp_path_factory.mktemp("ckpt") / "random")


@pytest.fixture
def blocked(tmp_path):
  """A path under a regular file: unwritable for every user, root included."""
  (tmp_path / "notes.txt").write_text("a file, not a folder\n")
  return tmp_path / "notes.txt" / "out"


@pytest.fixture
def read_only_dir(tmp_path):
  """A folder on a read-only file system (a tmpfs mounted read-only), where the machine
  allows mounting; skipped elsewhere (chmod does not stop root)."""
  target = tmp_path / "ro"
  target.mkdir()
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro", "none", str(target)],
                    capture_output=True, check=False).returncode:
    pytest.skip("cannot mount a read-only file system here")
  yield target
  subprocess.run(["umount", str(target)], check=False)


def test_the_rule(tmp_path, blocked):
  files.check_output_writable("--output", str(tmp_path / "new" / "deeper" / "out.jsonl"))
  files.check_output_writable("--output_dir", str(tmp_path))
  with pytest.raises(files.OutputNotWritableError,
                     match=f"--output={blocked}: {blocked.parent} is a file, not a folder"):
    files.check_output_writable("--output", str(blocked))
  with pytest.raises(files.OutputNotWritableError, match="is a file"):
    files.check_output_writable("--output", str(blocked / "a" / "b.jsonl"))
  assert not os.path.exists(tmp_path / "new")  # nothing created


def test_a_read_only_folder_is_refused_even_for_root(read_only_dir):
  with pytest.raises(files.OutputNotWritableError,
                     match=f"--work_dir={read_only_dir}/run: cannot write in {read_only_dir}"):
    files.check_output_writable("--work_dir", str(read_only_dir / "run"))


def _one_error_line(err: str, prog: str) -> str:
  lines = [line for line in err.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
  return lines[0]


def test_flame_rate_and_evaluate_refuse_before_judging(tmp_path, checkpoint, blocked, capsys):
  pairs = _jsonl(tmp_path / "pairs.jsonl", _rb_rows(3))
  before = listing(tmp_path)
  assert rate.main([f"--checkpoint={checkpoint}", f"--input={pairs}",
                    f"--output={blocked}.jsonl", "--no_progress"]) == 2
  assert "is a file, not a folder" in _one_error_line(capsys.readouterr().err, "flame-rate")
  assert evaluate.main([f"--checkpoint={checkpoint}", f"--input={pairs}", "--no_progress",
                        f"--output_dir={blocked}"]) == 2
  assert "is a file, not a folder" in _one_error_line(capsys.readouterr().err,
                                                       "flame-evaluate")
  assert listing(tmp_path) == before


@pytest.mark.parametrize("command,flags", [
    ("flame-pipeline", ["--work_dir={out}"]),
    ("flame-train", ["--gin_file=tailpatch/synthetic.gin", "--gin.MODEL_DIR='{out}'",
                     "--gin.TRAIN_STEPS=1"]),
    ("flame-merge", ["--gin_file=merging/linear.gin", "--gin.BASE='{ckpt}'",
                     "--gin.EXPERTS=['{ckpt}', '{ckpt}']", "--output_dir={out}"]),
    ("flame-convert", ["--from=orbax:{ckpt}", "--to=hf:{out}"]),
    ("flame-tailpatch", ["--gin_file=tailpatch/synthetic.gin", "--init={ckpt}",
                         "--out_dir={out}", "--all"]),
    ("flame-tailpatch-optimize", ["--gin_file=tailpatch/synthetic.gin", "--init={ckpt}",
                                  "--initial={ckpt}", "--out_dir={out}"]),
    ("flame-judge", ["--work_dir={out}"]),
    ("flame-merge-study", ["--work_dir={out}"]),
])
def test_each_command_refuses_an_output_it_cannot_write(tmp_path, checkpoint, blocked, command,
                                                        flags):
  before = listing(tmp_path)
  argv = [f.format(out=blocked, ckpt=checkpoint) for f in flags]
  result = subprocess.run([shutil.which(command) or command, *argv], capture_output=True,
                          text=True, cwd=REPO, check=False)
  assert result.returncode == 2, result.stderr
  line = _one_error_line("\n".join(l for l in result.stderr.splitlines()
                                   if " INFO " not in l), command)
  assert f"{blocked.parent} is a file, not a folder" in line
  assert listing(tmp_path) == before


def test_a_write_the_machine_refuses_midway_is_one_line(capsys):
  def body():
    raise OSError(errno.ENOSPC, "No space left on device", "/data/out/results.json")
  assert cli.run("flame-x", body) == 2
  assert capsys.readouterr().err == ("flame-x: error: cannot write /data/out/results.json: No "
                                     "space left on device\n")
  with pytest.raises(OSError):  # --debug keeps the traceback
    cli.run("flame-x", body, debug=True)

  def bug():
    raise OSError(errno.EBADF, "Bad file descriptor")
  with pytest.raises(OSError):  # not a refusal by the machine: a bug keeps its traceback
    cli.run("flame-x", bug)


def test_the_aftermath_of_a_failed_orbax_read_is_dropped_and_nothing_else(monkeypatch):
  seen = []
  monkeypatch.setattr(sys, "unraisablehook", seen.append)
  quiet_imports.quiet_async_aftermath()

  def unraisable(value, obj=None):
    return types.SimpleNamespace(exc_type=type(value), exc_value=value, exc_traceback=None,
                                 err_msg=None, object=obj)

  sys.unraisablehook(unraisable(RuntimeError("Event loop is closed")))
  orbax_code = compile("pass", os.path.join("site-packages", "orbax", "checkpoint", "x.py"),
                       "exec")
  sys.unraisablehook(unraisable(Exception("read failed"), types.SimpleNamespace(
      cr_code=orbax_code)))
  assert seen == []
  other = unraisable(RuntimeError("something else"))
  mine = unraisable(Exception("read failed"), types.SimpleNamespace(
      cr_code=compile("pass", "flame/x.py", "exec")))
  sys.unraisablehook(other)
  sys.unraisablehook(mine)
  assert seen == [other, mine]


@pytest.mark.parametrize("damage", ["arrays", "metadata"])
def test_merging_a_damaged_checkpoint_is_one_line_and_leaves_nothing(tmp_path, checkpoint,
                                                                     damage):
  damaged = tmp_path / "damaged"
  shutil.copytree(checkpoint, damaged)
  # The params item's OCDBT store: array chunks under ocdbt.process_0/d, the arrays'
  # metadata (.zarray) under the top-level d.
  folder = {"arrays": os.path.join("params", "ocdbt.process_0", "d"),
            "metadata": os.path.join("params", "d")}[damage]
  chunks = [os.path.join(dirpath, name) for dirpath, _, names in os.walk(damaged)
            for name in names if dirpath.endswith(os.sep + folder)]
  assert chunks
  for path in chunks:
    os.truncate(path, 16)
  before = listing(tmp_path)
  result = subprocess.run(
      [shutil.which("flame-merge") or "flame-merge", "--gin_file=merging/linear.gin",
       f"--gin.BASE='{checkpoint}'", f"--gin.EXPERTS=['{checkpoint}', '{damaged}']",
       f"--output_dir={tmp_path / 'merged'}", "--no_progress_bar"],
      capture_output=True, text=True, cwd=REPO, check=False)
  assert result.returncode == 2, result.stderr
  line = _one_error_line("\n".join(l for l in result.stderr.splitlines() if " INFO " not in l),
                         "flame-merge")
  assert str(damaged) in line and "damaged or incomplete" in line
  assert "TensorStore" not in line
  assert listing(tmp_path) == before
