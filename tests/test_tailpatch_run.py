"""Tail-patch runs on the tiny decoder and the real synthetic tasks: a task killed mid-run
(SIGKILL) and resumed gives the same result file as an uninterrupted run; finished tasks are
skipped; results of another init checkpoint and tasks not in the mixture are refused."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import gin
import jax
import numpy as np
import pytest

from flame.checkpoints import imported
from flame.data import mixtures, sources
from flame.data.sources import base
from flame.models import decoder
from flame.tailpatch import analyze, optimize, run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = ["synthetic_string_order", "synthetic_arithmetic_statement"]
GIN = f"""
include 'runs/train.gin'
include 'models/decoder_tiny.gin'
import flame.data.mixtures
MIXTURE_OR_TASK_NAME = @mixtures.register_mixture()
mixtures.register_mixture.name = "test_tailpatch_vanilla"
mixtures.register_mixture.tasks = {TASKS}
TASK_FEATURE_LENGTHS = {{"inputs": 272, "targets": 24}}
BATCH_SIZE = 8
LEARNING_RATE = 3e-3
Settings.steps = 4
Settings.eval_points = 2
Settings.limit_per_task = 4
Settings.categories = {{"Strings": ["synthetic_string_order"],
                       "Reasoning": ["synthetic_arithmetic_pairwise"]}}
train.progress_bar = False
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """(gin file, init checkpoint): random tiny-decoder params with decoder_tiny.gin's shape."""
  root = tmp_path_factory.mktemp("tailpatch")
  config = decoder.DecoderConfig(vocab_size=259, emb_dim=64, num_layers=2, num_heads=4,
                                 num_kv_heads=2, head_dim=16, mlp_dim=128, tie_embeddings=True)
  params = jax.tree_util.tree_map(np.array, jax.device_get(decoder.DecoderOnlyModel(
      config).init_params(jax.random.PRNGKey(0), 1, {"inputs": 8, "targets": 8})))
  init = imported.write_orbax(imported.ImportedModel(config, params, {"format": "test"}),
                              str(root / "init"))
  gin_file = root / "tailpatch_test.gin"
  gin_file.write_text(GIN)
  return str(gin_file), init, root


def _grid(gin_file, init, out_dir):
  return run.Grid(run.configure([gin_file]), init, str(out_dir))


def _result(path):
  record = json.load(open(path))
  record.pop("seconds")
  return record


@pytest.mark.slow  # 45 s; resuming a killed stage is also covered by test_pipeline's runner.
def test_killed_task_resumes_to_the_same_result(setup, tmp_path, monkeypatch):
  gin_file, init, root = setup
  monkeypatch.setenv(base.TFDS_DIR_ENV, str(root / "tfds"))
  killed = tmp_path / "killed"
  checkpoint = killed / "tasks" / TASKS[1] / "checkpoints" / "2"
  # The mixture's tasks sorted: index 0 is synthetic_arithmetic_statement.
  proc = subprocess.Popen(
      [sys.executable, "-m", "flame.tailpatch.run", f"--gin_file={gin_file}", f"--init={init}",
       f"--out_dir={killed}", "--task_index=0"], cwd=REPO,
      env={**os.environ, base.TFDS_DIR_ENV: str(root / "tfds")},
      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  deadline = time.time() + 240
  while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  stderr = proc.communicate()[1].decode(errors="replace")
  assert checkpoint.exists(), stderr[-3000:]
  result_file = killed / "results" / f"{TASKS[1]}.json"
  assert not result_file.exists()  # killed mid-run, before its result

  grid = _grid(gin_file, init, killed)
  assert [run.flame_name(t) for t in grid.tasks] == sorted(TASKS)
  resumed = grid.patch(grid.task_of(index=0))
  assert resumed["steps_evaluated"] == [0, 2, 4]
  assert not (killed / "tasks" / TASKS[1] / "checkpoints").exists()  # deleted once done

  fresh = run.Grid(grid.settings, init, str(tmp_path / "fresh"))
  fresh.patch(fresh.task_of(name=TASKS[1]))
  assert _result(result_file) == _result(tmp_path / "fresh" / "results" / f"{TASKS[1]}.json")
  record = _result(result_file)
  assert record["init"] == os.path.join(init, "0") and record["task"] == TASKS[1]
  assert set(record["dev"]) == {"Strings", "Reasoning"}
  assert all(len(curve) == 3 and all(0 <= v <= 1 for v in curve)
             for curve in record["dev"].values())
  baseline = json.load(open(killed / "baseline.json"))
  assert {c: v[0] for c, v in record["dev"].items()} == baseline["dev"]
  # The bias-free score beside accuracy: same points, starting at the baseline's.
  assert {c: len(v) for c, v in record["dev_debiased"].items()} == {"Strings": 3, "Reasoning": 3}
  assert {c: v[0] for c, v in record["dev_debiased"].items()} == baseline["dev_debiased"]
  assert all(0 < v < 1 for curve in record["dev_debiased"].values() for v in curve)
  assert record["dev_examples"] == {"Strings": 4, "Reasoning": 4}
  assert 4 * 8 <= record["examples"] and record["tokens"] > record["examples"] * 200

  # A finished task is skipped (its file is returned untouched); --all runs the rest.
  before = os.stat(result_file).st_mtime_ns
  results = run.run(grid.settings, run.build_parser().parse_args(
      [f"--init={init}", f"--out_dir={killed}", "--all"]))
  assert [r["task"] for r in results] == sorted(TASKS)
  assert os.stat(result_file).st_mtime_ns == before
  assert (killed / "results" / f"{TASKS[0]}.json").exists()


def test_bad_input_is_refused_with_its_name(setup, tmp_path, monkeypatch, capsys):
  gin_file, init, root = setup
  monkeypatch.setenv(base.TFDS_DIR_ENV, str(root / "tfds"))
  grid = _grid(gin_file, init, tmp_path)
  with pytest.raises(ValueError, match="--task='truthfulqa_truthfulness' is not a task of the "
                                       "mixture 'test_tailpatch_vanilla'"):
    grid.task_of(name="truthfulqa_truthfulness")
  with pytest.raises(ValueError, match="--task_index=2: the mixture .* has 2 tasks"):
    grid.task_of(index=2)
  other = tmp_path / "results" / f"{TASKS[0]}.json"
  other.parent.mkdir(parents=True)
  other.write_text(json.dumps({"init": "/other/checkpoints/7", **grid.settings.identity()}))
  with pytest.raises(ValueError, match=f"{other} was made from init checkpoint "
                                       "'/other/checkpoints/7'"):
    grid.patch(grid.task_of(name=TASKS[0]))
  other.write_text(json.dumps({"init": grid.init, **grid.settings.identity(), "steps": 8}))
  with pytest.raises(ValueError, match="has steps=8 but this grid has steps=4"):
    grid.patch(grid.task_of(name=TASKS[0]))
  # A grid whose patches continue the optimizer state does not take a fresh-Adam result.
  other.write_text(json.dumps({"init": grid.init, **grid.settings.identity()}))
  continuing = dataclasses.replace(grid.settings, continue_optimizer=True)
  assert continuing.identity() == {**grid.settings.identity(), "continue_optimizer": True}
  grid.settings = continuing
  with pytest.raises(ValueError, match="has continue_optimizer=None but this grid has "
                                       "continue_optimizer=True"):
    grid.patch(grid.task_of(name=TASKS[0]))
  with pytest.raises(ValueError, match="positive multiple of Settings.eval_points"):
    run.Settings(mixture="m", steps=6, eval_points=4)
  with pytest.raises(ValueError, match="task 'x' is in target categories 'A' and 'B'"):
    run.Settings(mixture="m", categories={"A": ["x"], "B": ["x", "y"]})
  with pytest.raises(FileNotFoundError, match="no checkpoint step found"):
    run.resolve_init(str(tmp_path / "nothing"))
  gin.clear_config()
  code = run.main([f"--gin_file={gin_file}", f"--init={init}", f"--out_dir={tmp_path / 'x'}",
                   "--task=hhh_helpful"])
  assert code == 2
  assert "flame-tailpatch: error: --task='hhh_helpful' is not a task" in capsys.readouterr().err


def test_one_command_patches_analyses_and_trains_the_optimised_run(setup, tmp_path,
                                                                   monkeypatch):
  gin_file, init, root = setup
  monkeypatch.setenv(base.TFDS_DIR_ENV, str(root / "tfds"))
  out = tmp_path / "opt"
  args = optimize.build_parser().parse_args(
      [f"--init={init}", f"--initial={init}", f"--out_dir={out}", "--optimised_steps=2",
       "--optimised_binding=optimizers.learning_rate_schedule.warmup_steps = 7",
       "--patch_binding=LEARNING_RATE = 0.000123", "--patch_binding=Rules.weak_top_k = 1"])
  # tailpatch/tailpatch.gin comes after the given files; it sets no Settings but the mixture.
  # --patch_binding's rules reach the analysis (weak_top below is the top 1, not 2).
  analysis, accounting = optimize.optimize([gin_file], [], args)
  assert sorted(analysis.weights) == sorted(TASKS)
  weak = analysis.weak_categories[0]
  assert analysis.weak_top[weak] == sorted(TASKS, key=lambda t: (
      -analysis.gains[t][weak], -sum(analysis.gains[t].values()), t))[:1]
  written = mixtures.read_weights(str(out / "analysis" / "weights.tsv"), sources.task_specs())
  assert written == analysis.weights
  rates = mixtures.rates("flame_tailpatch_optimised")  # what the optimised run trained on
  assert rates == {f"flame_{t}_bytes": w for t, w in analysis.weights.items()}
  seen = analyze.checkpoint_seen(str(out / "optimised"))
  assert seen["steps"] == 2 and seen == accounting["optimised"]
  assert accounting["tailpatch"]["runs"] == 2 and accounting["tailpatch"]["steps"] == 8
  summary = open(out / "analysis" / "summary.md").read()
  assert "Optimised run: 2 steps" in summary
  config = open(out / "optimised" / "config.gin").read().replace('"', "'")
  assert f"INITIAL_CHECKPOINT = '{init}'" in config  # the run started from --initial
  assert "train.init_params_from = %INITIAL_CHECKPOINT" in config
  # --optimised_binding reaches the optimised run only, never a patch
  assert "learning_rate_schedule.warmup_steps = 7" in config
  patch = open(out / "tasks" / TASKS[0] / "config.gin").read()
  assert "learning_rate_schedule.warmup_steps = 0" in patch
  # --patch_binding reaches the patches only, never the optimised run
  assert "LEARNING_RATE = 0.000123" in patch and "0.000123" not in config


def test_dev_items_are_the_validation_split_never_trained_on(setup, monkeypatch):
  _, _, root = setup
  monkeypatch.setenv(base.TFDS_DIR_ENV, str(root / "tfds"))
  from flame.autorater import evaluate  # pylint: disable=import-outside-toplevel
  from flame.tailpatch import categories  # pylint: disable=import-outside-toplevel
  items = categories.dev_items({"Strings": ["synthetic_string_order"]}, limit_per_task=1000)
  train_ids = {i.request.request_id for i in evaluate.task_items(
      "synthetic_string_order", "train", None)}
  dev_ids = [i.request.request_id for i in items]
  assert len(dev_ids) > 50 and not set(dev_ids) & train_ids
  assert dev_ids == sorted(dev_ids) and {i.subset for i in items} == {"Strings"}
  with pytest.raises(ValueError, match="task 'unieval_sfres_overall' is pointwise"):
    categories.dev_items({"Chat": ["unieval_sfres_overall"]})
  with pytest.raises(ValueError, match="task 'hhh_helpful' has no 'validation' split"):
    categories.dev_items({"Chat": ["hhh_helpful"]})


@pytest.mark.parametrize("flag, message", [
    ("--initial={missing}", "--initial={missing}: not a checkpoint"),
    ("--vanilla={missing}", "--vanilla={missing}: not a checkpoint"),
    ("--optimised_steps=0", "--optimised_steps=0: the optimised run needs at least 1 step"),
    ("--optimised_binding=optimizers.no_such_schedule.steps = 3",
     "the optimised run's gin (--optimised_recipe=tailpatch/optimised.gin, "
     "--optimised_binding=['optimizers.no_such_schedule.steps = 3']): No configurable matching"),
    ("--optimised_binding=TRAIN_STEPS = = 3", "the optimised run's gin"),
])
def test_optimize_checks_its_last_phases_flags_before_the_grid(setup, tmp_path, capsys, flag,
                                                               message):
  gin_file, init, _ = setup
  missing = str(tmp_path / "missing")
  out = tmp_path / "opt"
  code = optimize.main([f"--gin_file={gin_file}", f"--init={init}", f"--initial={init}",
                        f"--out_dir={out}", flag.format(missing=missing)])
  assert code == 2
  assert message.format(missing=missing) in capsys.readouterr().err
  assert not out.exists()  # nothing patched, nothing written


def test_a_gin_file_that_does_not_import_the_mixtures_still_lists_the_tasks(setup, tmp_path):
  """flame-tailpatch's vanilla gin need not import flame.data.mixtures itself (it used to
  fail with gin's "new configurable after the config was locked")."""
  gin_file = tmp_path / "vanilla.gin"
  gin_file.write_text("include 'runs/train.gin'\ninclude 'models/decoder_tiny.gin'\n"
                      "MIXTURE_OR_TASK_NAME = 'flame_synthetic_bytes'\n"
                      "TASK_FEATURE_LENGTHS = {'inputs': 512, 'targets': 24}\nBATCH_SIZE = 4\n")
  assert "mixtures" not in gin_file.read_text()
  result = subprocess.run(
      [sys.executable, "-m", "flame.tailpatch.run", f"--gin_file={gin_file}",
       f"--init={setup[1]}", f"--out_dir={tmp_path / 'out'}", "--list"],
      capture_output=True, text=True, cwd=REPO, check=False)
  assert result.returncode == 0, result.stderr
  assert "synthetic_arithmetic_pairwise_flipped" in result.stdout
  assert not os.path.exists(tmp_path / "out")
