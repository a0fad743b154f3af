"""benchmarks/tailpatch_envelope.py: its settings grid, the refusals before training, its
analysis (checked against a direct computation with scipy's Kendall tau) and, slow, the whole
experiment at a tiny size."""
import json
import os
import sys

import numpy as np
import pytest

from flame.data import synthetic
from flame.data.sources import base

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROLE_SCORE = {"target": 1, "helpful": 1, "neutral": 0, "harmful": -1}


def _envelope():
  sys.path.insert(0, os.path.join(REPO, "benchmarks"))
  import tailpatch_envelope  # pylint: disable=import-outside-toplevel
  return tailpatch_envelope


def test_the_grid_is_the_centre_and_one_change_at_a_time():
  envelope = _envelope()
  args = envelope.build_parser().parse_args(["--partials=50,200", "--patch_steps_grid=8",
                                             "--lr_scales=0.3,1"])
  grid = envelope.settings_grid(args)
  centre = envelope.Setting(200, 32, 1.0)
  assert grid[0] == centre and len(grid) == len(set(grid)) == 4
  assert set(grid) == {centre, envelope.Setting(50, 32, 1.0), envelope.Setting(200, 8, 1.0),
                       envelope.Setting(200, 32, 0.3)}


@pytest.mark.parametrize("flags, message", [
    (["--partials=30"], "must be positive multiples of --checkpoint_every=25"),
    (["--centre_partial=0"], "must be positive multiples"),
    (["--lr_scales=0"], "--lr_scales=[0.0], --centre_lr_scale=1.0: scales must be positive"),
    (["--patch_steps_grid=0"], "patch steps must be >= 1"),
    (["--dev_sizes=50,400"], "--dev_sizes=[50, 400] must lie in [2, --dev_limit=200]"),
])
def test_settings_that_cannot_work_are_refused_before_training(tmp_path, capsys, flags,
                                                               message):
  with pytest.raises(SystemExit) as error:
    _envelope().main([f"--out_dir={tmp_path / 'out'}", *flags])
  assert error.value.code == 2
  assert message in capsys.readouterr().err
  assert not (tmp_path / "out").exists()


def _records(rng, grid, num_pairs, effects):
  """Seeds' records with per-pair verdict bits: the checkpoint right on 60% of the pairs, each
  task's patch flipping pairs to move its accuracy by effects[role] points plus noise."""
  records = []
  for seed in range(3):
    baseline, patches = {}, {}
    for setting in grid:
      base_bits = (rng.random(num_pairs) < 0.6).astype(int)
      baseline[str(setting.partial)] = base_bits.tolist()
      tasks = {}
      for task, role in synthetic.ROLES.items():
        bits = base_bits.copy()
        change = int(round(num_pairs * (effects[role] + rng.normal(0, 0.02))))
        pool = np.flatnonzero(bits == (0 if change > 0 else 1))
        bits[rng.choice(pool, size=min(abs(change), len(pool)), replace=False)] ^= 1
        tasks[task] = {"correct": bits.tolist(), "examples": 10, "seconds": 1.0}
      patches[setting.name] = tasks
    records.append({"seed": seed, "baseline": baseline, "patches": patches})
  return records


def test_the_analysis_against_scipy_on_random_verdicts():
  from scipy import stats  # pylint: disable=import-outside-toplevel
  envelope = _envelope()
  rng = np.random.default_rng(0)
  args = envelope.build_parser().parse_args(["--partials=100", "--patch_steps_grid=",
                                             "--lr_scales=", "--dev_sizes=20,198",
                                             "--resamples=30"])
  grid = envelope.settings_grid(args)
  effects = {"target": 0.10, "helpful": 0.06, "neutral": 0.0, "harmful": -0.15}
  records = _records(rng, grid, 198, effects)
  analysis = envelope.analyse(records, grid, args)
  tasks = list(synthetic.ROLES)
  for setting in grid:
    row = analysis["settings"][setting.name]
    for record, tau, ok in zip(records, row["tau"], row["ok"]):
      base_bits = np.array(record["baseline"][str(setting.partial)], float)
      gains = [np.mean(record["patches"][setting.name][t]["correct"]) - base_bits.mean()
               for t in tasks]
      expected = stats.kendalltau(gains, [ROLE_SCORE[synthetic.ROLES[t]] for t in tasks])
      assert tau == pytest.approx(expected.statistic)
      order = sorted(tasks, key=lambda t: -gains[tasks.index(t)])
      position = {r: np.mean([i for i, t in enumerate(order) if synthetic.ROLES[t] == r])
                  for r in ROLE_SCORE}
      assert ok == bool(max(position["target"], position["helpful"]) < position["neutral"]
                        < position["harmful"])
    assert row["seeds_ok"] == sum(row["ok"]) and row["tau_mean"][0] == pytest.approx(
        np.mean(row["tau"]))
  # Role contrasts at the centre: the point estimate is the difference of the roles' mean
  # gains, inside its paired bootstrap interval; planted 6 points apart, the interval of
  # helpful - neutral lies above 0 on every seed.
  for record, contrast in zip(records, analysis["contrasts"]["accuracy"]):
    patches = record["patches"][grid[0].name]
    base_bits = np.array(record["baseline"][str(grid[0].partial)], float)
    gain = {t: np.mean(patches[t]["correct"]) - base_bits.mean() for t in tasks}
    by_role = {r: np.mean([gain[t] for t in tasks if synthetic.ROLES[t] == r]) for r in ROLE_SCORE}
    mean, low, high = contrast["helpful-neutral"]
    assert mean == pytest.approx(by_role["helpful"] - by_role["neutral"]) and low < mean < high
    assert low > 0
    assert contrast["neutral-harmful"][0] == pytest.approx(by_role["neutral"] - by_role["harmful"])
  assert "debiased" not in analysis["contrasts"]  # the records hold verdict bits only
  # Planted effects well above the noise: in order on every seed; on 20 resampled pairs the
  # order holds less often than on all 198.
  assert analysis["settings"][grid[0].name]["seeds_ok"] == 3
  small, full = analysis["dev_sizes"]["20"], analysis["dev_sizes"]["198"]
  assert full["ok_rate_mean"] == 1.0 and small["ok_rate_mean"] < 1.0
  assert small["tau_mean"][0] < full["tau_mean"][0]


def test_dev_scores_against_the_log_probs_of_each_order(tmp_path):
  """Per pair: the bit is the judge's own two-order verdict; the margin is the gold response's
  log-odds averaged over both orders, from the raw log-probs in float64 (a real tiny
  random-weight checkpoint and real lexicon pairs, half of them swapped so gold is A or B)."""
  from test_autorater_rate import _write_checkpoint  # pylint: disable=import-outside-toplevel
  from flame.autorater import autorater, evaluate  # pylint: disable=import-outside-toplevel
  from flame.data import lexicon  # pylint: disable=import-outside-toplevel
  from flame.tailpatch import categories  # pylint: disable=import-outside-toplevel
  envelope = _envelope()
  rater = autorater.Autorater.load(_write_checkpoint(tmp_path / "ckpt", seed=3), batch_size=8,
                                   max_input_length=1024)
  items = [evaluate.Item(autorater.Request(lexicon.PAIRWISE, dict(e.context), e.example_id),
                         "Safety", e.outputs["answer"]) for e in lexicon.heldout_examples(12)]
  assert {i.gold for i in items} == {"A", "B"}
  scores = envelope.dev_scores(rater, items, rater.params)
  verdicts = rater.judge([i.request for i in items], swap=True)
  assert scores["correct"] == [int(v.verdict == i.gold) for v, i in zip(verdicts, items)]
  for item, margin in zip(items, scores["margin"]):
    first, second = rater.scorer.log_probs(rater.params, [
        rater._query(item.request)[0], rater._query(item.request.swapped())[0]])
    gold = "AB".index(item.gold)
    expected = ((first[gold] - first[1 - gold]) + (second[1 - gold] - second[gold])) / 2
    assert margin == pytest.approx(expected, abs=1e-3)
  assert len(set(scores["margin"])) > 1  # not a constant
  # The tail-patch runner's scorer: accuracy and the mean sigmoid of the same margins.
  metrics = categories.scorer(rater, items)(rater.params)
  assert metrics["dev/Safety"] == pytest.approx(np.mean(scores["correct"]))
  assert metrics["dev_debiased/Safety"] == pytest.approx(
      np.mean(1 / (1 + np.exp(-np.array(scores["margin"], np.float64)))), abs=1e-4)


def test_pair_scores_of_a_category_with_classification_items(tmp_path):
  """A category may hold classification tasks: one order, margin = gold log-prob minus the
  likeliest other label's; pairs beside them keep their two-order scores."""
  from test_autorater_rate import _write_checkpoint  # pylint: disable=import-outside-toplevel
  from flame.autorater import autorater, evaluate  # pylint: disable=import-outside-toplevel
  from flame.tailpatch import categories  # pylint: disable=import-outside-toplevel
  rater = autorater.Autorater.load(_write_checkpoint(tmp_path / "ckpt", seed=4), batch_size=8,
                                   max_input_length=1024)
  spec = synthetic.SPECS["synthetic_arithmetic_statement"]
  pair_spec = synthetic.SPECS["synthetic_string_order"]
  items = [evaluate.Item(autorater.Request(s, dict(e.context), e.example_id), "X",
                         e.outputs[s.answer_field])
           for s in (spec, pair_spec) for e in synthetic.generate(s.name, 4)]
  correct, margins = categories.pair_scores(rater, items)
  verdicts = rater.judge([i.request for i in items], swap=True)
  assert correct == [int(v.verdict == i.gold) for v, i in zip(verdicts, items)]
  for item, margin in zip(items[:4], margins[:4]):
    (log_probs,) = rater.scorer.log_probs(rater.params, [rater._query(item.request)[0]])
    labels = list(rater.labels_of(spec))
    gold = labels.index(item.gold)
    assert margin == pytest.approx(log_probs[gold] - np.delete(log_probs, gold).max(), abs=1e-6)
  pairs_only = categories.pair_scores(rater, items[4:])
  assert pairs_only == (correct[4:], margins[4:])


def test_debiased_rating_is_the_mean_sigmoid_of_the_margins_over_points():
  envelope = _envelope()
  rng = np.random.default_rng(1)
  points = [{"correct": rng.integers(0, 2, 50).tolist(),
             "margin": rng.normal(0, 2, 50).round(3).tolist()} for _ in range(3)]
  entry = {"correct": points[-1]["correct"], "points": points}
  pick = rng.choice(50, 20, replace=False)
  expected = np.mean([np.mean(1 / (1 + np.exp(-np.array(p["margin"])[pick]))) for p in points])
  assert envelope.measure(entry, "debiased", pick) == pytest.approx(expected)
  assert envelope.measure(entry, "accuracy") == pytest.approx(
      np.mean([np.mean(p["correct"]) for p in points]))
  with pytest.raises(ValueError, match="predates"):  # a record of verdict bits only
    envelope.measure(points[0]["correct"], "debiased")


@pytest.mark.slow
def test_the_envelope_at_a_tiny_size(tmp_path, monkeypatch):
  monkeypatch.setenv(base.TFDS_DIR_ENV, str(tmp_path / "tfds"))
  out = tmp_path / "envelope"
  _envelope().main([f"--out_dir={out}", "--seeds=0", "--centre_partial=4", "--partials=",
                    "--centre_steps=2", "--patch_steps_grid=1", "--lr_scales=0.5",
                    "--checkpoint_every=4", "--dev_limit=8", "--dev_sizes=4,8",
                    "--resamples=5"])
  report = json.load(open(out / "results.json"))
  (record,) = report["records"]
  assert sorted(record["patches"]) == ["partial4_steps1_lr1", "partial4_steps2_lr0.5",
                                       "partial4_steps2_lr1"]
  for tasks in record["patches"].values():
    assert sorted(tasks) == sorted(synthetic.ROLES)
    assert all(len(t["correct"]) == 8 for t in tasks.values())  # one bit per dev pair
  assert (out / "envelope.png").exists() and (out / "results.md").exists()
  assert not (out / "seed0" / "patch").exists()  # each patch's checkpoints are deleted
