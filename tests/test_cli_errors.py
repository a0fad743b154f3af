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


def run_module(module, *args, cwd=REPO):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True,
                        text=True, timeout=600)


def tiny_checkpoints(tmp_path, names=("base", "a", "b")):
  import numpy as np  # pylint: disable=import-outside-toplevel
  from flame.checkpoints import manager  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  paths = []
  for name in names:
    checkpointer = manager.Checkpointer(str(tmp_path / name), async_save=False)
    checkpointer.save(0, {"params": {"w": rng.standard_normal((4, 3)).astype(np.float32)}},
                      {"note": name}, force=True)
    checkpointer.close()
    paths.append(str(tmp_path / name))
  return paths


def test_train_console_script_refuses_an_unknown_flag_before_writing(tmp_path):
  model_dir = tmp_path / "run"
  done = run_module("flame.train", *QUICK, f"--gin.MODEL_DIR={model_dir}", "--train_steps=5")
  assert done.returncode == 2, done.stderr[-2000:]
  assert ("flame-train: error: unknown flag(s) ['--train_steps=5']: flame-train takes"
          in done.stderr)
  assert "Traceback" not in done.stderr and not model_dir.exists()
  debug = run_module("flame.train", *QUICK, f"--gin.MODEL_DIR={model_dir}", "--train_steps=5",
                     "--debug")
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
  done = run_module("flame.train", *QUICK, f"--gin.MODEL_DIR={model_dir}")
  assert done.returncode == 0, done.stderr[-3000:]
  assert "examples_seen=" in done.stdout
  first, *_, last = done.stderr.strip().splitlines()  # the first screen: no library noise
  assert "INFO training on 8 cpu device(s)" in first and "mesh {'data': 8" in first
  assert f"INFO outputs in {model_dir}: checkpoints/" in last
  config = (model_dir / "config.gin").read_text()
  again = run_module("flame.train", *QUICK, f"--gin.MODEL_DIR={model_dir}",
                     "--gin.TRAIN_STEPS=1", "--gin.LEARNING_RATE=0.5")
  assert again.returncode == 0
  assert "nothing to train" in again.stderr and "TRAIN_STEPS is 1" in again.stderr
  assert (model_dir / "config.gin").read_text() == config  # not rewritten


def test_merge_never_writes_into_a_training_run(tmp_path, capsys):
  """A training MODEL_DIR (checkpoints/, train/, config.gin) or a training checkpoints folder
  (steps with optimizer state) is refused as a merge output, before anything is written."""
  from flame import cli, gin_utils, train  # pylint: disable=import-outside-toplevel
  from merging import merge  # pylint: disable=import-outside-toplevel
  run_dir = tmp_path / "run"
  gin_utils.parse(["quickstart.gin"], [f"MODEL_DIR = '{run_dir}'", "TRAIN_STEPS = 1",
                                       "BATCH_SIZE = 8", "train.progress_bar = False",
                                       "train.eval_every = 0",
                                       "optimizers.learning_rate_schedule.warmup_steps = 0"])
  train.train()
  before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
  config = (run_dir / "config.gin").read_text()
  tiny_checkpoints(tmp_path, ("base", "a"))
  inputs = [f"--gin.BASE='{tmp_path / 'base'}'", f"--gin.EXPERTS=['{tmp_path / 'a'}']"]
  checkpoint = str(run_dir / "checkpoints")
  for output, message, merge_inputs in (
      (run_dir, "which a merge did not write", inputs),
      (run_dir / "checkpoints", "holds training checkpoints (steps ['1']", inputs),
      # The run's own checkpoints as inputs: the output may not contain its inputs.
      (run_dir, "contains the input", [f"--gin.BASE='{checkpoint}'",
                                       f"--gin.EXPERTS=['{checkpoint}', '{checkpoint}']"])):
    gin.clear_config()
    with pytest.raises(cli.expected_errors()) as error:
      merge.main(["--gin_file=merging/task_arithmetic.gin", *merge_inputs,
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
  from merging import merge  # pylint: disable=import-outside-toplevel
  tiny_checkpoints(tmp_path, ("base", "a"))
  with pytest.raises(ValueError) as error:
    merge.main(["--gin_file=merging/ties.gin", f"--gin.BASE='{tmp_path / 'base'}'",
                f"--gin.EXPERTS=['{tmp_path / 'a'}']", f"--gin.OUTPUT_DIR='{tmp_path / 'out'}'",
                "--no_progress_bar", binding])
  assert message in str(error.value)
  assert not (tmp_path / "out").exists()


def test_merge_console_script_names_the_bad_yaml_key_exits_2_and_leaves_nothing(tmp_path):
  base, a, b = tiny_checkpoints(tmp_path)
  config = tmp_path / "merge.yml"
  config.write_text(json.dumps({"merge_method": "task_arithmetic", "base_model": base,
                                "models": [{"model": a}, {"model": b}], "slices": []}))
  done = run_module("merging.merge", f"--config={config}", f"--output_dir={tmp_path / 'out'}")
  assert done.returncode == 2, done.stderr[-2000:]
  assert done.stderr.strip().splitlines()[-1].startswith(f"flame-merge: error: {config}: slices")
  assert "Traceback" not in done.stderr and not (tmp_path / "out").exists()
  config.write_text(json.dumps({"merge_method": "task_arithmetic", "base_model": base,
                                "models": [{"model": m, "parameters": {"weight": 0.5}}
                                           for m in (a, b)]}))
  done = run_module("merging.merge", f"--config={config}", f"--output_dir={tmp_path / 'out'}",
                    "--no_progress_bar")
  assert done.returncode == 0, done.stderr[-2000:]
  assert done.stdout.strip() == str(tmp_path / "out" / "0")


def test_convert_console_script_refuses_a_folder_holding_files_and_a_missing_source(tmp_path):
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "keep.txt").write_text("mine")
  done = run_module("flame.checkpoints.convert", f"--from=orbax:{tmp_path / 'missing'}",
                    f"--to=hf:{tmp_path / 'out'}")
  assert done.returncode == 2, done.stderr[-2000:]
  assert (f"flame-convert: error: {tmp_path / 'out'} exists and is not empty" in done.stderr
          and "Traceback" not in done.stderr)
  assert os.listdir(tmp_path / "out") == ["keep.txt"]
  assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
  done = run_module("flame.checkpoints.convert", f"--from=orbax:{tmp_path / 'missing'}",
                    f"--to=hf:{tmp_path / 'new'}")
  assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
  assert str(tmp_path / "missing") in done.stderr.splitlines()[-1]
  assert not (tmp_path / "new").exists()


def test_aot_console_script_usage_errors_exit_2():
  done = run_module("flame.aot", "--topology=v5e:2x2")
  assert done.returncode == 2
  assert done.stderr.strip() == ("flame-aot: error: at least one --gin_file=FILE is required "
                                 "(see gin_configs/)")


def test_first_screen_on_a_cpu_machine_has_no_tensorflow_or_cuda_noise():
  """Importing flame, then TensorFlow (as seqio does) and looking up devices prints nothing
  on a machine without accelerators; a real line written during the import still shows."""
  from flame import quiet_imports  # pylint: disable=import-outside-toplevel
  if os.environ.get("JAX_PLATFORMS", "cpu") != "cpu":
    pytest.skip("this machine has an accelerator")
  done = subprocess.run([sys.executable, "-c", "import flame, seqio, tensorflow as tf; "
                         "tf.config.list_physical_devices(); tf.constant(1) + 1; import jax; "
                         "jax.devices()"], cwd=REPO, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0 and done.stderr == "", done.stderr
  noise = ("WARNING: All log messages before absl::InitializeLog() is called are written to "
           "STDERR\nI0000 00:00:1796053342.737549    9819 port.cc:153] oneDNN custom operations "
           "are on.\nE0000 00:00:1796053427.170978   10170 cuda_platform.cc:52] failed call to "
           "cuInit: INTERNAL\n")
  real = "W0000 00:00:1.0  1 dataset.cc:9] a real warning\nsomething else\n"
  assert [line for line in (noise + real).splitlines(keepends=True)
          if quiet_imports.keep(line)] == real.splitlines(keepends=True)


def test_every_console_script_hides_orbaxs_notices_and_keeps_real_warnings():
  """`cli.console` sets up logging before the command runs: Orbax's notices about a read-only
  manager never reach the screen; another library's real warning does."""
  body = ("from absl import logging; from flame import cli; "
          "cli.console('flame-x', lambda args: logging.warning("
          "'CheckpointManagerOptions.read_only=True, setting max_to_keep=None.') or "
          "logging.warning('Given directory is read only=/x') or "
          "logging.warning('a real warning'))")
  done = subprocess.run([sys.executable, "-c", body], cwd=REPO, capture_output=True, text=True,
                        timeout=600)
  assert done.returncode == 0, done.stderr
  assert "a real warning" in done.stderr
  assert "read_only" not in done.stderr and "read only" not in done.stderr, done.stderr
