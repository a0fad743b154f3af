"""The controlled tail-patch experiment end to end at a tiny size (slow): every stage runs and
writes its report; the numbers at this size mean nothing, the full run's are in the README."""
import argparse
import json
import os
import sys

import numpy as np
import pytest

from flame.data import lexicon, synthetic
from flame.data.sources import base
from flame.data.sources import synthetic as synthetic_sources

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_synthetic_benchmark_at_a_tiny_size(tmp_path, monkeypatch):
  monkeypatch.setenv(base.TFDS_DIR_ENV, str(tmp_path / "tfds"))
  sys.path.insert(0, os.path.join(REPO, "benchmarks"))
  import tailpatch_synthetic  # pylint: disable=import-outside-toplevel
  out = tmp_path / "bench"
  tailpatch_synthetic.main([f"--out_dir={out}", "--seeds=0", "--steps=8", "--partial_steps=4",
                            "--patch_steps=4", "--heldout_size=8", "--dev_limit=8",
                            "--min_dev_pairs=1", "--harmful_weight=0.2", "--categories=Reasoning"])
  report = json.load(open(out / "results.json"))
  (seed,) = report["seeds"]
  assert sorted(seed["order"]) == sorted(synthetic.ROLES)
  assert set(seed["role_positions"]) == {"target", "helpful", "neutral", "harmful"}
  assert seed["compute"]["optimised"]["steps"] == 8 and seed["compute"]["vanilla"]["steps"] == 8
  assert 0 <= seed["vanilla"]["accuracy"] <= 1 and 0 <= seed["optimised"]["accuracy"] <= 1
  for name in ("heldout.png", "heatmap.png", "economy.png", "results.md"):
    assert (out / name).exists()
  assert (out / "seed0" / "tailpatch" / "analysis" / "weights.tsv").exists()
  assert [p["step"] for p in seed["vanilla_curve"]] == [4, 8]
  # The optimised run trains on the analysis' weights, not on the vanilla mixture.
  operative = (out / "seed0" / "tailpatch" / "optimised" / "config.gin").read_text()
  assert "analysis/weights.tsv" in operative and "vanilla_weights.tsv" not in operative
  assert -1 <= seed["target"]["kendall_tau"] <= 1
  assert "synthetic_arithmetic_pairwise_flipped\t0.2" in (out / "seed0" / "vanilla_weights.tsv").read_text()


@pytest.mark.slow
def test_lexicon_benchmark_at_a_tiny_size(tmp_path, monkeypatch):
  """The banned-word collection: its own roles (neutral tasks from the synthetic builder),
  target category Safety, held-out word pairings."""
  monkeypatch.setenv(base.TFDS_DIR_ENV, str(tmp_path / "tfds"))
  experiment = _benchmark()
  out = tmp_path / "bench"
  experiment.main([f"--out_dir={out}", "--collection=lexicon", "--seeds=0", "--steps=8",
                   "--partial_steps=4", "--patch_steps=4", "--heldout_size=8", "--dev_limit=8",
                   "--min_dev_pairs=1", "--harmful_weight=0.2",
                   "--optimised_binding=optimizers.learning_rate_schedule.warmup_steps = 3"])
  (seed,) = json.load(open(out / "results.json"))["seeds"]
  assert sorted(seed["order"]) == sorted(lexicon.ROLES)
  assert list(seed["baseline"]) == ["Safety"]
  # The dev accuracy beside the rated (debiased, the default) baseline, both from the grid.
  grid_baseline = json.load(open(out / "seed0" / "tailpatch" / "baseline.json"))
  assert seed["score"] == "debiased" and seed["baseline"] == grid_baseline["dev_debiased"]
  assert seed["baseline_accuracy"] == grid_baseline["dev"]
  assert sorted(seed["target"]["order"]) == sorted(lexicon.ROLES)
  weights = (out / "seed0" / "vanilla_weights.tsv").read_text()
  assert "lexicon_answers_flipped\t0.2" in weights and "synthetic_string_order\t1\n" in weights
  # --optimised_binding: the optimised run's schedule only, not the vanilla run's
  def warmup(run):
    config = (out / "seed0" / run / "config.gin").read_text()
    return [l for l in config.splitlines() if "learning_rate_schedule.warmup_steps" in l]
  assert warmup("tailpatch/optimised") == ["learning_rate_schedule.warmup_steps = 3"]
  assert warmup("vanilla") == ["learning_rate_schedule.warmup_steps = 0"]
  assert "4-layer decoder" in (out / "results.md").read_text()
  items = experiment.heldout_items("lexicon", 8)
  assert [i.request.context for i in items] == [e.context for e in lexicon.heldout_examples(8)]


@pytest.mark.slow
def test_vanilla_only_reports_the_target_dev_curve(tmp_path, monkeypatch):
  """--vanilla_only: vanilla runs only, the target's dev accuracy per checkpoint (its
  validation pairs, never the held-out ones), a plot, and a rerun that reads the curve."""
  monkeypatch.setenv(base.TFDS_DIR_ENV, str(tmp_path / "tfds"))
  experiment = _benchmark()
  out = tmp_path / "bench"
  flags = [f"--out_dir={out}", "--collection=lexicon", "--seeds=0", "--steps=4",
           "--partial_steps=2", "--curve_every=2", "--dev_limit=8", "--min_dev_pairs=1",
           "--harmful_weight=0.2", "--vanilla_only", "--binding=LEARNING_RATE = 3e-3",
           "--vanilla_mixture=proportional"]
  experiment.main(flags)
  report = json.load(open(out / "dev_curve.json"))
  curve = report["curves"]["0"]
  assert [p["step"] for p in curve] == [2, 4]
  assert all(0 <= p["accuracy"] <= 1 and p["examples"] > 0 for p in curve)
  assert (out / "dev_curve.png").exists()
  assert not (out / "seed0" / "tailpatch").exists() and not (out / "results.json").exists()
  operative = (out / "seed0" / "vanilla" / "config.gin").read_text()
  assert "learning_rate = 0.003" in operative.lower()
  items = experiment.dev_items("lexicon", 8)
  held_out = {tuple(sorted(e.context.items())) for e in lexicon.heldout_examples()}
  dev_pairs = {tuple(sorted(i.request.context.items())) for i in items}
  assert len(items) == 8 and not dev_pairs & held_out
  # Examples-proportional: a pairwise task's train split holds both orders of its train pairs.
  weights = dict(line.split("\t") for line in
                 (out / "seed0" / "vanilla_weights.tsv").read_text().splitlines())
  dev = len(experiment.dev_items("lexicon", None))
  assert float(weights["lexicon_pairwise"]) == 2 * (synthetic_sources.LEXICON_SIZE - dev)
  assert float(weights["lexicon_pairwise_flipped"]) == pytest.approx(
      0.2 * float(weights["lexicon_pairwise"]))
  os.remove(out / "dev_curve.png")
  experiment.main(flags)  # finished seeds are read back, not retrained
  assert (out / "dev_curve.png").exists()
  assert json.load(open(out / "dev_curve.json"))["curves"]["0"] == curve


def _benchmark():
  sys.path.insert(0, os.path.join(REPO, "benchmarks"))
  import tailpatch_synthetic  # pylint: disable=import-outside-toplevel
  return tailpatch_synthetic


@pytest.mark.parametrize("flags, message", [
    (["--steps=400", "--partial_steps=400"], "--partial_steps=400 must be above 0 and below"),
    (["--steps=400", "--partial_steps=200", "--curve_every=300"],
     "--steps=400 is not a multiple of --curve_every=300"),
    (["--patch_steps=30", "--eval_points=4"], "--patch_steps=30 does not divide into"),
    (["--dev_limit=40"], "--dev_limit=40 dev pairs per task: the analysis needs >= "
                         "--min_dev_pairs=100"),
    (["--categories=Chat"], "--categories=Chat: synthetic categories are"),
    (["--collection=real", "--vanilla_only"], "--vanilla_only needs a controlled collection"),
    (["--neutral_weight=0"], "--neutral_weight=0.0 must be above 0"),
])
def test_settings_that_cannot_work_are_refused_before_training(tmp_path, capsys, flags, message):
  with pytest.raises(SystemExit) as error:
    _benchmark().main([f"--out_dir={tmp_path / 'out'}", *flags])
  assert error.value.code == 2
  assert message in capsys.readouterr().err
  assert not (tmp_path / "out").exists()


def test_vanilla_weights_scale_the_neutral_and_harmful_tasks(tmp_path):
  """--neutral_weight and --harmful_weight scale each role's tasks in the vanilla mixture."""
  bench = _benchmark()
  scaled = argparse.Namespace(collection="lexicon", harmful_weight=0.2, neutral_weight=10.0,
                              vanilla_mixture="equal")
  bindings = bench.vanilla_bindings(scaled, str(tmp_path))
  rows = (line.split("\t") for line in
          (tmp_path / "vanilla_weights.tsv").read_text().splitlines())
  weights = {task: float(weight) for task, weight in rows}
  want = {"target": 1.0, "helpful": 1.0, "neutral": 10.0, "harmful": 0.2}
  assert weights == {t: want[r] for t, r in lexicon.ROLES.items()}
  assert any("vanilla_weights.tsv" in b for b in bindings)
  # two lexicon tasks at 1 among three neutral at 10 and two flipped at 0.2
  assert bench.role_share(weights, lexicon.ROLES) == pytest.approx(2 / (2 + 3 * 10 + 2 * 0.2))
  (tmp_path / "seed3").mkdir()
  os.replace(tmp_path / "vanilla_weights.tsv", tmp_path / "seed3" / "vanilla_weights.tsv")
  assert bench.vanilla_weights(str(tmp_path), 3, lexicon.ROLES) == weights
  assert bench.vanilla_weights(str(tmp_path), 4, lexicon.ROLES) == {t: 1.0 for t in lexicon.ROLES}
  plain = argparse.Namespace(collection="lexicon", harmful_weight=1.0, neutral_weight=1.0,
                             vanilla_mixture="equal")
  assert bench.vanilla_bindings(plain, str(tmp_path / "plain")) == []


def test_kendall_tau_b_matches_scipy_with_ties():
  from scipy import stats  # pylint: disable=import-outside-toplevel
  bench = _benchmark()
  rng = np.random.default_rng(0)
  for _ in range(20):
    x = list(rng.normal(size=6).round(1))
    y = list(rng.integers(-1, 2, size=6).astype(float))
    want = stats.kendalltau(x, y).statistic
    got = bench.kendall_tau_b(x, y)
    assert (np.isnan(want) and got == 0.0) or abs(got - want) < 1e-12
  gains = {t: {"Reasoning": {"target": 0.2, "helpful": 0.1, "neutral": 0.0,
                             "harmful": -0.1}[r] + 0.001 * i}
           for i, (t, r) in enumerate(synthetic.ROLES.items())}
  ranking = bench.target_ranking(gains, "Reasoning")
  assert ranking["ok"] and ranking["kendall_tau"] > 0.8
  flipped = {t: {"Reasoning": -g["Reasoning"]} for t, g in gains.items()}
  assert not bench.target_ranking(flipped, "Reasoning")["ok"]
