"""Console scripts fail like good tools (through the real entry points, in subprocesses): a
short message naming the wrong input, exit status 2, nothing left behind; success exits 0."""
import json
import os
import subprocess
import sys

import gin
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = ["--gin_file=quickstart.gin", "--gin.TRAIN_STEPS=2", "--gin.BATCH_SIZE=8",
         "--gin.train.progress_bar=False", "--gin.train.eval_every=0",
         "--gin.optimizers.learning_rate_schedule.warmup_steps=0"]


def flame_train(*args, cwd=REPO):
  return subprocess.run([sys.executable, "-m", "flame.train", *args], cwd=cwd,
                        capture_output=True, text=True, timeout=600)


def test_train_console_script_refuses_an_unknown_flag_before_writing(tmp_path):
  model_dir = tmp_path / "run"
  done = flame_train(*QUICK, f"--gin.MODEL_DIR={model_dir}", "--train_steps=5")
  assert done.returncode == 2, done.stderr[-2000:]
  assert ("flame-train: error: unknown flag(s) ['--train_steps=5']: flame-train takes"
          in done.stderr)
  assert "Traceback" not in done.stderr and not model_dir.exists()
  debug = flame_train(*QUICK, f"--gin.MODEL_DIR={model_dir}", "--train_steps=5", "--debug")
  assert debug.returncode != 0 and "Traceback" in debug.stderr


@pytest.mark.parametrize("flags, message", [
    (["--gin.TRAIN_STEPS=forty"], "total_steps='forty' (often TRAIN_STEPS): expected a whole"),
    (["--gin.TRAIN_STEPS=forty", "--gin.optimizers.learning_rate_schedule.total_steps=99"],
     "train.train_steps (TRAIN_STEPS) = 'forty': expected a whole"),
    (["--gin.BATCH_SIZE=12"], "BATCH_SIZE = 12 (per microbatch 12) is not divisible by the "
                              "8-way data parallelism"),
    (["--gin.train.num_microbatches=3"], "BATCH_SIZE = 8 is not divisible by "
                                         "train.num_microbatches = 3"),
    (["--gin.trian.seed=1"], "No configurable matching 'trian'"),
])
def test_train_refuses_bad_settings_before_writing(tmp_path, capsys, flags, message):
  from flame import cli, train  # pylint: disable=import-outside-toplevel
  model_dir = tmp_path / "run"
  code = cli.run("flame-train", lambda: train.main(QUICK + [f"--gin.MODEL_DIR={model_dir}",
                                                             *flags]))
  assert code == 2
  assert message in capsys.readouterr().err
  assert not model_dir.exists()


def test_train_success_exits_0_and_a_run_with_nothing_to_do_says_so(tmp_path):
  model_dir = tmp_path / "run"
  done = flame_train(*QUICK, f"--gin.MODEL_DIR={model_dir}")
  assert done.returncode == 0, done.stderr[-3000:]
  assert "examples_seen=" in done.stdout
  assert "training on 8 cpu device(s)" in done.stderr and "mesh {'data': 8" in done.stderr
  assert f"outputs in {model_dir}: checkpoints/" in done.stderr
  config = (model_dir / "config.gin").read_text()
  again = flame_train(*QUICK, f"--gin.MODEL_DIR={model_dir}", "--gin.TRAIN_STEPS=1",
                      "--gin.LEARNING_RATE=0.5")
  assert again.returncode == 0
  assert "nothing to train" in again.stderr and "TRAIN_STEPS is 1" in again.stderr
  assert (model_dir / "config.gin").read_text() == config  # not rewritten


def test_merge_console_script_exits_0_after_a_merge(tmp_path, monkeypatch, capsys):
  import numpy as np  # pylint: disable=import-outside-toplevel
  from flame.checkpoints import manager  # pylint: disable=import-outside-toplevel
  from merging import merge  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  paths = []
  for name in ("base", "a", "b"):
    checkpointer = manager.Checkpointer(str(tmp_path / name), async_save=False)
    checkpointer.save(0, {"params": {"w": rng.standard_normal((4, 3)).astype(np.float32)}},
                      {"note": name}, force=True)
    checkpointer.close()
    paths.append(str(tmp_path / name))
  config = tmp_path / "merge.yml"
  config.write_text(json.dumps({"merge_method": "task_arithmetic", "base_model": paths[0],
                                "models": [{"model": p, "parameters": {"weight": 0.5}}
                                           for p in paths[1:]]}))
  monkeypatch.setattr(sys, "argv", ["flame-merge", f"--config={config}",
                                    f"--output_dir={tmp_path / 'out'}", "--no_progress_bar"])
  with pytest.raises(SystemExit) as exit_info:
    merge.console_main()
  assert exit_info.value.code == 0
  assert capsys.readouterr().out.strip().splitlines() == [str(tmp_path / "out" / "0")]


def test_merge_never_writes_into_a_training_run(tmp_path, capsys):
  """A training MODEL_DIR (checkpoints/, train/, config.gin) or a training checkpoints folder
  (steps with optimizer state) is refused as a merge output, before anything is written."""
  from flame import gin_utils, train  # pylint: disable=import-outside-toplevel
  from merging import merge  # pylint: disable=import-outside-toplevel
  run_dir = tmp_path / "run"
  gin_utils.parse(["quickstart.gin"], [f"MODEL_DIR = '{run_dir}'", "TRAIN_STEPS = 1",
                                       "BATCH_SIZE = 8", "train.progress_bar = False",
                                       "train.eval_every = 0",
                                       "optimizers.learning_rate_schedule.warmup_steps = 0"])
  train.train()
  before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
  config = (run_dir / "config.gin").read_text()
  checkpoint = str(run_dir / "checkpoints")
  for output, message in ((run_dir, "which a merge did not write"),
                          (run_dir / "checkpoints", "holds training checkpoints (steps ['1']")):
    gin.clear_config()
    with pytest.raises(SystemExit) as error:
      merge.main(["--gin_file=merging/task_arithmetic.gin", f"--gin.BASE='{checkpoint}'",
                  f"--gin.EXPERTS=['{checkpoint}', '{checkpoint}']",
                  f"--gin.OUTPUT_DIR='{output}'", "--no_progress_bar"])
    assert message in str(error.value)
  assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before
  assert (run_dir / "config.gin").read_text() == config


@pytest.mark.parametrize("binding, message", [
    ("--gin.DENSITY=1.5", "ties: density must be in [0, 1], got 1.5"),
    ("--gin.WEIGHTS=[1.0, 2.0, 3.0]", "ties: 3 weights for 1 experts"),
])
def test_merge_settings_are_refused_before_the_output_folder_exists(tmp_path, binding,
                                                                    message):
  import numpy as np  # pylint: disable=import-outside-toplevel
  from flame.checkpoints import manager  # pylint: disable=import-outside-toplevel
  from merging import merge  # pylint: disable=import-outside-toplevel
  for name in ("base", "a"):
    checkpointer = manager.Checkpointer(str(tmp_path / name), async_save=False)
    checkpointer.save(0, {"params": {"w": np.ones((4, 3), np.float32)}}, {}, force=True)
    checkpointer.close()
  with pytest.raises(SystemExit) as error:
    merge.main(["--gin_file=merging/ties.gin", f"--gin.BASE='{tmp_path / 'base'}'",
                f"--gin.EXPERTS=['{tmp_path / 'a'}']", f"--gin.OUTPUT_DIR='{tmp_path / 'out'}'",
                "--no_progress_bar", binding])
  assert str(error.value).startswith("flame-merge: error: ") and message in str(error.value)
  assert not (tmp_path / "out").exists()
