"""Checkpoints: kill-and-resume, restore onto another mesh, params-only, bad checkpoints."""
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from flame import gin_utils, optimizers, partitioning, train as train_lib, trainer as trainer_lib
from flame.checkpoints import manager
from flame.models import decoder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ["--gin_file=quickstart.gin", "--gin.TRAIN_STEPS=40", "--gin.train.checkpoint_every=4",
         "--gin.TASK_FEATURE_LENGTHS={'inputs': 48, 'targets': 4}", "--gin.BATCH_SIZE=8",
         "--gin.train.eval_every=0", "--gin.train.progress_bar=False"]
CONFIG = decoder.DecoderConfig(vocab_size=259, emb_dim=32, num_layers=2, num_heads=4,
                               num_kv_heads=2, head_dim=8, mlp_dim=64)
LENGTHS = {"inputs": 48, "targets": 4}


def train_with_gin(model_dir):
  import gin
  gin.clear_config()
  files, bindings, _ = gin_utils.split_flags(FLAGS + [f"--gin.MODEL_DIR={model_dir}"])
  gin_utils.parse(files, bindings)
  return train_lib.train()


def final_params(model_dir, step=40):
  trainer = trainer_lib.Trainer(decoder.DecoderOnlyModel(decoder.DecoderConfig()),
                                optimizers.adamw(1e-3), partitioning.Partitioner())
  abstract, _ = trainer.abstract_state(8, LENGTHS)
  return jax.device_get(manager.Checkpointer(model_dir, read_only=True).restore_params(
      abstract["params"], step))


def test_killed_run_resumes_to_the_same_parameters(tmp_path):
  killed, clean = tmp_path / "killed", tmp_path / "clean"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.Popen([sys.executable, "-m", "flame.train", *FLAGS,
                           f"--gin.MODEL_DIR={killed}"], cwd=REPO, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if os.path.isdir(killed / "checkpoints") and manager.Checkpointer(
        killed / "checkpoints", read_only=True).all_steps():
      break
    time.sleep(0.05)
  assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  steps_at_kill = manager.Checkpointer(killed / "checkpoints", read_only=True).all_steps()
  assert steps_at_kill and max(steps_at_kill) < 40

  resumed_state, _ = train_with_gin(killed)
  assert int(resumed_state["step"]) == 40
  train_with_gin(clean)
  for a, b in zip(jax.tree_util.tree_leaves(final_params(killed / "checkpoints")),
                  jax.tree_util.tree_leaves(final_params(clean / "checkpoints"))):
    np.testing.assert_array_equal(a, b)


def _trainer(mesh_shape):
  return trainer_lib.Trainer(decoder.DecoderOnlyModel(CONFIG), optimizers.adamw(1e-3),
                             partitioning.Partitioner(mesh_shape))


@pytest.fixture
def saved_state(tmp_path):
  trainer = _trainer((8, 1, 1))
  state = trainer.init_state(8, LENGTHS)
  checkpointer = manager.Checkpointer(tmp_path / "ckpt")
  checkpointer.save(7, state, {"note": "test"})
  checkpointer.wait()
  return tmp_path / "ckpt", jax.device_get(state)


def test_restore_onto_another_mesh(saved_state):
  directory, original = saved_state
  trainer = _trainer((2, 1, 4))
  abstract, _ = trainer.abstract_state(8, LENGTHS)
  restored = manager.Checkpointer(directory).restore(abstract)
  query = restored["params"]["layers_0"]["attention"]["query"]
  assert query.sharding.spec == jax.sharding.PartitionSpec(None, "model", None)
  assert dict(query.sharding.mesh.shape) == {"data": 2, "fsdp": 1, "model": 4}
  assert int(restored["step"]) == 7
  for a, b in zip(jax.tree_util.tree_leaves(jax.device_get(restored["params"])),
                  jax.tree_util.tree_leaves(original["params"])):
    np.testing.assert_array_equal(a, b)
  assert manager.Checkpointer(directory).restore_meta()["note"] == "test"


def test_params_only_initialisation_for_fine_tuning(saved_state, tmp_path):
  directory, original = saved_state
  state, _ = train_lib.train(
      model_dir=str(tmp_path / "finetune"), model=decoder.DecoderOnlyModel(CONFIG),
      mixture_or_task_name="truthfulqa_judge_bytes", task_feature_lengths=LENGTHS,
      train_steps=0, batch_size=8, learning_rate_fn=optimizers.learning_rate_schedule(1e-3),
      init_params_from=str(directory / "7"), progress_bar=False)
  assert int(state["step"]) == 0
  for a, b in zip(jax.tree_util.tree_leaves(jax.device_get(state["params"])),
                  jax.tree_util.tree_leaves(original["params"])):
    np.testing.assert_array_equal(a, b)
  assert not np.any([np.any(x) for x in jax.tree_util.tree_leaves(
      jax.device_get(state["opt_state"][1][0].mu))])  # fresh optimizer state


def _fine_tune(directory, out, **kwargs):
  return train_lib.train(
      model_dir=str(out), model=decoder.DecoderOnlyModel(CONFIG),
      mixture_or_task_name="truthfulqa_judge_bytes", task_feature_lengths=LENGTHS,
      train_steps=0, batch_size=8, learning_rate_fn=optimizers.learning_rate_schedule(1e-3),
      init_params_from=str(directory), progress_bar=False, **kwargs)


def test_optimizer_state_continued_from_the_checkpoint(tmp_path):
  """init_optimizer_state: Adam's moments and count come from the checkpoint (random here,
  so that a fresh state cannot pass), the step counter restarts at 0."""
  schedule = optimizers.learning_rate_schedule(1e-3)  # as train() builds it
  trainer = trainer_lib.Trainer(decoder.DecoderOnlyModel(CONFIG), optimizers.adamw(schedule),
                                partitioning.Partitioner((8, 1, 1)))
  state = jax.device_get(trainer.init_state(8, LENGTHS))
  rng = np.random.default_rng(0)
  state["opt_state"] = jax.tree_util.tree_map(
      lambda x: (rng.standard_normal(x.shape).astype(x.dtype) ** 2
                 if np.issubdtype(x.dtype, np.floating) else x + 7), state["opt_state"])
  checkpointer = manager.Checkpointer(tmp_path / "ckpt")
  checkpointer.save(5, state, {})
  checkpointer.wait()
  continued, _ = _fine_tune(tmp_path / "ckpt" / "5", tmp_path / "ft", init_optimizer_state=True)
  assert int(continued["step"]) == 0
  got = jax.tree_util.tree_leaves(jax.device_get(continued["opt_state"]))
  want = jax.tree_util.tree_leaves(state["opt_state"])
  assert len(got) == len(want)
  for a, b in zip(got, want):
    np.testing.assert_array_equal(a, b)
  fresh, _ = _fine_tune(tmp_path / "ckpt" / "5", tmp_path / "ft2")
  assert not np.any(jax.device_get(fresh["opt_state"][1][0].mu["final_norm"]["scale"]))


def test_optimizer_state_that_does_not_fit_is_a_clear_error(saved_state, tmp_path):
  directory, _ = saved_state  # saved with AdamW at a constant rate (no schedule state)
  with pytest.raises(ValueError, match="init_optimizer_state needs train.init_params_from"):
    train_lib.train(model_dir=str(tmp_path / "x"), model=decoder.DecoderOnlyModel(CONFIG),
                    mixture_or_task_name="truthfulqa_judge_bytes", task_feature_lengths=LENGTHS,
                    train_steps=0, batch_size=8,
                    learning_rate_fn=optimizers.learning_rate_schedule(1e-3),
                    init_optimizer_state=True, progress_bar=False)
  with pytest.raises(manager.CheckpointError, match=r"ckpt/7: its optimizer state does not fit"):
    _fine_tune(directory / "7", tmp_path / "adafactor", init_optimizer_state=True,
               optimizer_factory=optimizers.adafactor)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
  abstract, _ = _trainer((8, 1, 1)).abstract_state(8, LENGTHS)
  with pytest.raises(manager.CheckpointError, match="no checkpoint found in .*empty"):
    manager.Checkpointer(tmp_path / "empty").restore(abstract)
  with pytest.raises(manager.CheckpointError, match="no checkpoint directory at .*nowhere"):
    manager.restore_params_from(str(tmp_path / "nowhere"), abstract["params"])


def test_wrong_step_lists_available_steps(saved_state):
  directory, _ = saved_state
  abstract, _ = _trainer((8, 1, 1)).abstract_state(8, LENGTHS)
  with pytest.raises(manager.CheckpointError, match=r"no checkpoint for step 3 .*\[7\]"):
    manager.Checkpointer(directory).restore(abstract, step=3)


def test_corrupt_checkpoint_names_the_checkpoint(saved_state):
  directory, _ = saved_state
  params_dir = directory / "7" / "params"
  for entry in os.listdir(params_dir):
    if entry.startswith("ocdbt") or entry == "d":
      shutil.rmtree(params_dir / entry, ignore_errors=True)
  abstract, _ = _trainer((8, 1, 1)).abstract_state(8, LENGTHS)
  with pytest.raises(manager.CheckpointError, match=f"cannot restore checkpoint {directory}/7"):
    manager.Checkpointer(directory).restore(abstract)
  # The parameters alone (flame-convert, init_params_from): the same named error, not a
  # TypeError from the layer-layout probe of unreadable metadata.
  with pytest.raises(manager.CheckpointError, match=f"cannot restore checkpoint {directory}/7"):
    manager.Checkpointer(directory).restore_params(abstract["params"])


def test_checkpoint_for_a_different_model_is_refused(saved_state):
  directory, _ = saved_state
  bigger = decoder.DecoderConfig(vocab_size=259, emb_dim=48, num_layers=2, num_heads=4,
                                 num_kv_heads=2, head_dim=8, mlp_dim=64)
  trainer = trainer_lib.Trainer(decoder.DecoderOnlyModel(bigger), optimizers.adamw(1e-3),
                                partitioning.Partitioner((8, 1, 1)))
  abstract, _ = trainer.abstract_state(8, LENGTHS)
  with pytest.raises(manager.CheckpointError) as error:
    manager.Checkpointer(directory).restore_params(abstract["params"])
  message = str(error.value)
  assert f"checkpoint {directory}/7 holds parameters of another model" in message
  assert "final_norm/scale: checkpoint (32,) vs model (48,)" in message
  assert "The checkpoint is intact" in message and "delete" not in message


def test_keeps_only_the_newest_checkpoints(tmp_path):
  state = jax.device_get(_trainer((8, 1, 1)).init_state(8, LENGTHS))
  checkpointer = manager.Checkpointer(tmp_path / "ckpt", keep=2)
  for step in (1, 2, 3, 4):
    checkpointer.save(step, state)
  checkpointer.wait()
  assert checkpointer.all_steps() == [3, 4]
  assert sorted(os.listdir(tmp_path / "ckpt")) == ["3", "4"]


def test_params_only_checkpoint_restores_params_and_meta(tmp_path):
  trainer = _trainer((8, 1, 1))
  params = jax.device_get(trainer.init_state(8, LENGTHS)["params"])
  checkpointer = manager.Checkpointer(tmp_path / "imported")
  checkpointer.save(0, {"params": params}, {"source": "unit test"})
  checkpointer.wait()
  abstract, _ = trainer.abstract_state(8, LENGTHS)
  restored = manager.restore_params_from(str(tmp_path / "imported"), abstract["params"])
  for a, b in zip(jax.tree_util.tree_leaves(jax.device_get(restored)),
                  jax.tree_util.tree_leaves(params)):
    np.testing.assert_array_equal(a, b)
  assert checkpointer.restore_meta()["source"] == "unit test"


def test_an_import_removes_the_staging_left_by_a_killed_import(tmp_path):
  """A killed import leaves a hidden staging folder; the next import (same host) removes it
  once its process is gone, and leaves a live import's and unknown folders alone."""
  import json  # pylint: disable=import-outside-toplevel
  import socket  # pylint: disable=import-outside-toplevel
  from flame.checkpoints import imported  # pylint: disable=import-outside-toplevel
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True).stdout.strip()
  folders = {}
  for name, pid in (("killed", int(dead)), ("live", os.getpid())):
    folders[name] = tmp_path / f"{imported.STAGING_PREFIX}{name}"
    (folders[name] / "ckpt").mkdir(parents=True)
    (folders[name] / imported.OWNER_FILE).write_text(
        json.dumps({"pid": pid, "host": socket.gethostname()}))
  (tmp_path / ".import-unknown").mkdir()
  model = decoder.DecoderOnlyModel(CONFIG)
  params = jax.device_get(model.init_params(jax.random.PRNGKey(0), 1, LENGTHS))
  imported.write_orbax(imported.ImportedModel(CONFIG, params, {"format": "test"}),
                       str(tmp_path / "model"))
  assert sorted(p.name for p in tmp_path.iterdir()) == [
      ".import-live", ".import-unknown", "model"]
