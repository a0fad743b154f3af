"""The FLAMe recipes (gin_configs/flame/flame.gin, flame_rm.gin, flame_opt_rm.gin) train a few
steps with the tiny model through flame-train, each from the previous one's checkpoint.

For time, the FLAMe run's mixture is narrowed to two tasks (`register_mixture.tasks`); its
other settings are the recipe's, and the RM and Opt-RM recipes run with their own tasks."""
import json
import os

import gin
import pytest

from flame import train
from flame.data import mixtures
from flame.data.sources import base


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tfds"))
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv(base.TFDS_DIR_ENV, path)
    mixtures.register(vocabularies=("bytes",))
    yield path
  mixtures.register(vocabularies=("bytes",))


COMMON = ["--gin_file=models/decoder_tiny.gin", "--gin.TRAIN_STEPS=2", "--gin.BATCH_SIZE=8",
          "--gin.TASK_FEATURE_LENGTHS={'inputs': 512, 'targets': 32}",
          "--gin.train.progress_bar=False"]


def _steps(model_dir):
  return sorted(int(n) for n in os.listdir(os.path.join(model_dir, "checkpoints")) if n.isdigit())


@pytest.mark.slow
def test_recipes_chain(tmp_path, data_dir):
  flame_dir = str(tmp_path / "flame")
  train.main(["--gin_file=flame/flame.gin", f"--gin.MODEL_DIR={flame_dir}", *COMMON,
              "--gin.mixtures.register_mixture.tasks=['truthfulqa_truthfulness', "
              "'hh_rlhf_harmlessness']"])
  assert _steps(flame_dir) == [2]
  config = open(os.path.join(flame_dir, "config.gin")).read()
  for binding in ("DROPOUT_RATE = 0.05", "LEARNING_RATE = 0.0001", "cap = 65536",
                  "dropout_rate = %DROPOUT_RATE", "train.pack = True"):
    assert binding in config
  gin.clear_config()

  rm_dir = str(tmp_path / "flame_rm")
  train.main(["--gin_file=flame/flame_rm.gin", f"--gin.MODEL_DIR={rm_dir}", *COMMON,
              f"--gin.FLAME_CHECKPOINT={flame_dir}/checkpoints"])
  assert _steps(rm_dir) == [2]
  rates = mixtures.rates("flame_rm_recipe")
  assert len(rates) == 4 and set(rates.values()) == {1.0}  # an equal mix
  gin.clear_config()

  weights = tmp_path / "weights.json"
  weights.write_text(json.dumps({"hh_rlhf_harmlessness": 200000, "truthfulqa_truthfulness": 3000}))
  opt_dir = str(tmp_path / "flame_opt_rm")
  train.main(["--gin_file=flame/flame_opt_rm.gin", f"--gin.MODEL_DIR={opt_dir}", *COMMON,
              f"--gin.INITIAL_CHECKPOINT={flame_dir}/checkpoints", f"--gin.WEIGHTS_FILE={weights}"])
  assert _steps(opt_dir) == [2]
  assert mixtures.rates("flame_opt_rm_recipe") == {
      "flame_hh_rlhf_harmlessness_bytes": 200000.0, "flame_truthfulqa_truthfulness_bytes": 3000.0}
