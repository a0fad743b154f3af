"""Tail-patch analysis on hand-made curves: every rule and threshold, ties, bad tables, the
weights file read back as a mixture, the written report."""
import json
import os

import numpy as np
import pytest
import seqio

from flame.data import mixtures, sources
from flame.tailpatch import analyze

RULES = analyze.Rules()  # helpful 0.05, somewhat 0.02, harmful 0.02, stable 0.75


@pytest.mark.parametrize("curve, rating", [
    ([0.50, 0.56, 0.57, 0.58, 0.60], 2),   # large and every point up
    ([0.50, 0.49, 0.58, 0.58, 0.60], 2),   # gain 0.0625, 3 of 4 points up = stable_fraction
    ([0.50, 0.48, 0.47, 0.60, 0.70], 1),   # gain 0.0625 but only 2 of 4 up: not stable
    ([0.50, 0.52, 0.52, 0.52, 0.52], 1),   # gain exactly somewhat_gain
    ([0.50, 0.519, 0.52, 0.52, 0.52], 0),  # just under it
    ([0.50, 0.49, 0.51, 0.50, 0.50], 0),   # noise
    ([0.50, 0.48, 0.48, 0.48, 0.48], -1),  # drop exactly harmful_drop
    ([0.50, 0.40, 0.30, 0.35, 0.45], -1),
])
def test_rating_rules(curve, rating):
  assert analyze.rate(curve, RULES) == rating


def test_gain_matches_numpy_on_random_curves():
  rng = np.random.default_rng(0)
  for _ in range(50):
    curve = rng.uniform(0, 1, size=rng.integers(2, 9))
    assert analyze.gain(list(curve)) == pytest.approx(np.mean(curve[1:] - curve[0]), abs=1e-12)


def test_rules_are_settings():
  strict = analyze.Rules(helpful_gain=0.2, somewhat_gain=0.1, harmful_drop=0.5)
  assert analyze.rate([0.5, 0.6, 0.6], strict) == 1
  assert analyze.rate([0.5, 0.6, 0.6], RULES) == 2
  assert analyze.rate([0.5, 0.1, 0.1], strict) == 0
  with pytest.raises(ValueError, match="somewhat_gain"):
    analyze.Rules(helpful_gain=0.01, somewhat_gain=0.02)
  with pytest.raises(ValueError, match="stable_fraction"):
    analyze.Rules(stable_fraction=0)
  with pytest.raises(ValueError, match="at least one evaluation point"):
    analyze.gain([0.5])


BASE = {"Chat": 0.60, "Math": 0.40}


def _curves(**gains):
  """task -> {category: a flat curve at base + gain} from task=(chat gain, math gain)."""
  return {task: {c: [BASE[c]] + [BASE[c] + g] * 4 for c, g in zip(BASE, pair)}
          for task, pair in gains.items()}


def test_bundles_weights_and_order():
  curves = _curves(both=(0.10, 0.10), chat_only=(0.10, 0.0), math_some=(0.0, 0.03),
                   flat=(0.0, 0.0), bad=(-0.05, -0.05))
  a = analyze.analyze(curves, BASE, analyze.Rules(weak_top_k=1))
  assert a.ratings["both"] == {"Chat": 2, "Math": 2}
  assert a.totals == {"both": 4, "chat_only": 2, "math_some": 1, "flat": 0, "bad": -2}
  # general: total >= 2 categories; category bundles: final score >= base + 0.05.
  assert a.bundles["general"] == ["both", "chat_only"]
  assert a.bundles["Chat"] == ["both", "chat_only"]
  assert a.bundles["Math"] == ["both"]
  assert a.bundles["others"] == ["bad", "flat", "math_some"]
  assert a.thresholds == pytest.approx({"Chat": 0.65, "Math": 0.45})
  # Math is the weak category (lowest baseline); its top task by gain: both → 200K.
  assert a.weak_categories == ["Math"] and a.weak_top == {"Math": ["both"]}
  assert a.weights == {"both": 200_000, "chat_only": 100_000 + 30_000, "math_some": 3_000,
                       "flat": 3_000, "bad": 3_000}
  assert a.order == ["both", "chat_only", "math_some", "flat", "bad"]


def test_explicit_thresholds_general_total_and_weak_categories():
  curves = _curves(t1=(0.10, 0.0), t2=(0.0, 0.10), t3=(0.03, 0.03))
  rules = analyze.Rules(thresholds={"Chat": 0.62}, general_min_total=2,
                        weak_categories=["Chat", "Math"], weak_top_k=1,
                        general_weight=10, specific_weight=1, other_weight=0.5, weak_weight=99)
  a = analyze.analyze(curves, BASE, rules)
  assert a.bundles["Chat"] == ["t1", "t3"]  # τ = 0.62: t3's 0.63 crosses it
  assert a.bundles["Math"] == ["t2"]  # default τ = 0.45
  assert a.bundles["general"] == ["t1", "t2", "t3"]  # totals 2, 2, 2 (>= 2)
  assert a.weak_top == {"Chat": ["t1"], "Math": ["t2"]}
  assert a.weights == {"t1": 99, "t2": 99, "t3": 10 + 1}


def test_ties_break_by_total_gain_then_name():
  curves = _curves(b=(0.06, 0.01), a=(0.06, 0.01), c=(0.06, 0.02))
  a = analyze.analyze(curves, BASE, analyze.Rules(weak_categories=["Chat"], weak_top_k=2))
  assert a.weak_top == {"Chat": ["c", "a"]}  # equal Chat gains: c has more in total; a < b
  assert a.order == ["c", "a", "b"]


def test_bad_tables_are_named():
  curves = _curves(t1=(0.1, 0.1))
  with pytest.raises(ValueError, match="task 't1' has no curve for categories \\['Safety'\\]"):
    analyze.analyze(curves, {**BASE, "Safety": 0.5})
  with pytest.raises(ValueError, match="not at the baseline"):
    analyze.analyze(curves, {"Chat": 0.61, "Math": 0.40})
  with pytest.raises(ValueError, match="Rules name categories \\['Coding'\\]"):
    analyze.analyze(curves, BASE, analyze.Rules(thresholds={"Coding": 0.9}))
  with pytest.raises(ValueError, match="no tail-patch results"):
    analyze.analyze({}, BASE)


def _grid(tmp_path, curves, init="/ckpt/100", **overrides):
  identity = {"init": init, "steps": 8, "eval_points": 4,
              "categories": {c: [f"{c.lower()}_task"] for c in BASE}, "limit_per_task": 4}
  (tmp_path / "results").mkdir(parents=True, exist_ok=True)
  (tmp_path / "baseline.json").write_text(json.dumps({**identity, "dev": BASE}))
  for task, dev in curves.items():
    record = {**identity, "task": task, "dev": dev, "examples": 10, "tokens": 1000,
              **overrides.get(task, {})}
    (tmp_path / "results" / f"{task}.json").write_text(json.dumps(record))
  return tmp_path


def test_weights_file_round_trip_into_a_mixture(tmp_path):
  names = ["synthetic_arithmetic_statement", "synthetic_string_order",
           "synthetic_arithmetic_pairwise_flipped"]
  curves = _curves(**dict(zip(names, [(0.1, 0.1), (0.0, 0.0), (-0.1, -0.1)])))
  out = _grid(tmp_path, curves)
  a, accounting = analyze.run(str(out), analyze.Rules(weak_top_k=0, score="accuracy"))
  path = out / "analysis" / "weights.tsv"
  assert mixtures.read_weights(str(path), sources.task_specs()) == a.weights
  name = mixtures.register_mixture(name="test_tailpatch_weights", weights_file=str(path))
  try:
    rates = mixtures.rates(name)
    assert rates == {f"flame_{t}_bytes": w for t, w in a.weights.items()}
  finally:
    mixtures.remove_mixture(name)
    assert name not in seqio.MixtureRegistry.names()
  assert accounting["tailpatch"] == {"runs": 3, "steps": 24, "examples": 30, "tokens": 3000}
  report = json.load(open(out / "analysis" / "analysis.json"))
  assert report["weights"] == a.weights and report["init"] == "/ckpt/100"
  assert report["rules"]["helpful_gain"] == 0.05
  summary = open(out / "analysis" / "summary.md").read()
  rows = [l for l in summary.splitlines() if l.startswith("| synthetic")]
  assert [r.split(" | ")[0][2:] for r in rows] == a.order
  assert open(out / "analysis" / "heatmap.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_results_of_another_grid_are_refused(tmp_path):
  curves = _curves(t1=(0.1, 0.1), t2=(0.0, 0.0))
  out = _grid(tmp_path / "a", curves, t2={"init": "/elsewhere/5"})
  with pytest.raises(ValueError, match="t2.json: init='/elsewhere/5' differs"):
    analyze.read_results(str(out))
  out = _grid(tmp_path / "b", curves, t2={"dev": {"Chat": [0.6, 0.6]}})
  with pytest.raises(ValueError, match="t2.json: no curve for categories \\['Math'\\]"):
    analyze.read_results(str(out))
  with pytest.raises(FileNotFoundError, match="baseline.json not found"):
    analyze.read_results(str(tmp_path / "empty"))


def test_compute_accounting():
  results = {"a": {"steps": 10, "examples": 80, "tokens": 800},
             "b": {"steps": 10, "examples": 70, "tokens": 700}}
  vanilla = {"steps": 1000, "examples": 16000, "tokens": 160000}
  optimised = {"steps": 100, "examples": 1450, "tokens": 14500}
  out = analyze.compute(results, vanilla, optimised)
  assert out["tailpatch_plus_optimised"] == {"steps": 120, "examples": 1600, "tokens": 16000}
  assert out["vanilla_over_ours"] == {"examples": 10.0, "tokens": 10.0}
  assert "10.00x the examples" in analyze.accounting_text(out)
  assert analyze.compute(results, None, None)["optimised"] is None


def test_categories_near_chance_are_named_not_competent_in_the_summary():
  curves = _curves(a=(0.10, 0.0), b=(0.0, 0.03))
  base = {"Chat": 0.60, "Math": 0.549}
  shifted = {t: {c: [base[c]] + [v + base[c] - BASE[c] for v in curve[1:]]
                 for c, curve in by.items()} for t, by in curves.items()}
  a = analyze.analyze(shifted, base)
  assert a.not_competent == ["Math"]
  text = analyze.summary_markdown(a, analyze.compute({}, None, None))
  assert "**Not competent: Math.**" in text
  assert analyze.analyze(shifted, base, analyze.Rules(competence_margin=0.0)).not_competent == []
  competent = analyze.analyze(_curves(a=(0.1, 0.0)), {"Chat": 0.60, "Math": 0.40},
                              analyze.Rules(chance=0.3))
  assert competent.not_competent == [] and "Not competent" not in analyze.summary_markdown(
      competent, analyze.compute({}, None, None))


def test_categories_on_small_dev_sets_are_named_in_the_summary():
  curves = _curves(a=(0.10, 0.0), b=(0.0, 0.03))
  a = analyze.analyze(curves, BASE, analyze.Rules(), {"Chat": 400, "Math": 199})
  assert a.small_dev == ["Math"]
  assert "**Small dev sets: Math**" in analyze.summary_markdown(a, analyze.compute({}, None,
                                                                                    None))
  assert analyze.analyze(curves, BASE, analyze.Rules(min_dev_pairs=100),
                         {"Chat": 400, "Math": 199}).small_dev == []
  unknown = analyze.analyze(curves, BASE)  # counts not given: nothing claimed
  assert unknown.small_dev == [] and "Small dev sets" not in analyze.summary_markdown(
      unknown, analyze.compute({}, None, None))


def test_the_debiased_score_is_read_when_chosen_and_competence_stays_on_accuracy(tmp_path):
  # Accuracy says t1 helps and t2 does not; the debiased curves say the reverse.
  accuracy = _curves(t1=(0.1, 0.1), t2=(0.0, 0.0))
  debiased_base = {"Chat": 0.51, "Math": 0.505}
  debiased = {t: {c: [debiased_base[c]] + [debiased_base[c] + g] * 4 for c in BASE}
              for t, g in (("t1", -0.03), ("t2", 0.06))}
  out = _grid(tmp_path / "grid", accuracy, t1={"dev_debiased": debiased["t1"]},
              t2={"dev_debiased": debiased["t2"]})
  record = json.loads((out / "baseline.json").read_text())
  (out / "baseline.json").write_text(json.dumps({**record, "dev_debiased": debiased_base}))
  by_accuracy, _ = analyze.run(str(out), analyze.Rules(score="accuracy"))
  by_debiased, _ = analyze.run(str(out), analyze.Rules())  # the default
  assert by_accuracy.order == ["t1", "t2"] and by_debiased.order == ["t2", "t1"]
  assert by_debiased.gains["t2"]["Chat"] == pytest.approx(0.06)
  assert by_debiased.ratings["t1"] == {"Chat": -1, "Math": -1}
  # Competence is judged on accuracy (Math's 40%), not on the debiased score (~50.5%).
  assert by_debiased.not_competent == by_accuracy.not_competent == ["Math"]
  # The dev accuracy is kept beside the debiased baseline (baseline.json's "dev").
  assert by_debiased.accuracy == by_accuracy.accuracy == BASE
  assert by_debiased.baseline == debiased_base
  assert json.loads((out / "analysis" / "analysis.json").read_text())["rules"]["score"] == (
      "debiased")
  summary = (out / "analysis" / "summary.md").read_text()
  assert "Baseline (unpatched) debiased dev score: Chat 51.0, Math 50.5." in summary
  assert "Baseline (unpatched) dev accuracy" not in summary


def test_a_grid_without_debiased_scores_is_named(tmp_path):
  out = _grid(tmp_path / "old", _curves(t1=(0.1, 0.1)))
  with pytest.raises(ValueError, match=r"baseline.json: no 'dev_debiased' scores .* "
                     r"Rules.score='debiased' needs the grid rerun"):
    analyze.run(str(out), analyze.Rules(score="debiased"))
  with pytest.raises(ValueError, match=r"Rules.score='margin': one of \['accuracy', "
                     r"'debiased'\]"):
    analyze.Rules(score="margin")


def test_tiny_gains_keep_their_sign_and_order_in_the_report():
  # From a checkpoint at chance the debiased gains are ~1e-5: "-0.0" for all of them would
  # hide the order the weights were chosen by.
  curves = {"up": {"Chat": [0.5, 0.5 + 2e-5], "Math": [0.4, 0.5]},
            "down": {"Chat": [0.5, 0.5 - 1.2e-5], "Math": [0.4, 0.4]}}
  summary = analyze.summary_markdown(analyze.analyze(curves, {"Chat": 0.5, "Math": 0.4}),
                                     analyze.compute({}, None, None))
  assert "| up | +0.002 (+0) | +10.0 (+2) |" in summary
  assert "| down | -0.0012 (+0) | +0.0 (+0) |" in summary
  assert [analyze.signed_points(g) for g in (0.0, 0.0005, -0.0004999, 0.123)] == [
      "+0.0", "+0.1", "-0.05", "+12.3"]
