"""Hyper-parameter sweep (merging/sweep.py) with fake merge / evaluate functions whose best
point is known by construction."""
import json
import math
import os

import pytest

from merging import evaluate, sweep

VALIDATION = evaluate.Benchmark(held_in={"QA": ["q_val"], "NLI": ["n_val"]},
                                expert_scores={"qa": {"q_val": 0.8}, "nli": {"n_val": 0.5}})
TEST = evaluate.Benchmark(held_in={"QA": ["q_test"], "NLI": ["n_test"]},
                          held_out={"coref": ["c"]},
                          expert_scores={"qa": {"q_test": 0.8}, "nli": {"n_test": 0.9}},
                          base_scores={"c": 0.5})
GRIDS = {"ties": {"lam": [0.5, 1.0, 1.5], "density": [0.1, 0.2, 0.3]},
         "average": {},
         "flat": {"lam": [0.7, 0.9, 1.1]}}


def quality(params):
  """Normalised validation score by construction: 1 at lam=1, density=0.2, lower elsewhere;
  every "flat" point scores the same (a tie), "average" scores 0.5."""
  if params["method"] == "average":
    return 0.5
  if params["method"] == "flat":
    return 0.9
  return 1 - (params["lam"] - 1) ** 2 - 10 * (params["density"] - 0.2) ** 2


class Fakes:
  def __init__(self):
    self.merges = []

  def merge_fn(self, method, **point):
    self.merges.append((method, point))
    return {"method": method, **point}

  def evaluate_fn(self, params):
    return {"q_val": 0.8 * quality(params), "n_val": 0.5 * quality(params)}

  def test_fn(self, params):
    return {"q_test": 0.6, "n_test": 0.45, "c": 0.6 * (params.get("lam", 1.0))}


def test_grid_points_order():
  assert sweep.grid_points({"lam": [1, 2], "density": [0.1, 0.2]}) == [
      {"lam": 1, "density": 0.1}, {"lam": 1, "density": 0.2},
      {"lam": 2, "density": 0.1}, {"lam": 2, "density": 0.2}]
  assert sweep.grid_points({}) == [{}]
  with pytest.raises(ValueError, match="'lam' needs a non-empty list"):
    sweep.grid_points({"lam": []})


def test_select_best_prefers_first_and_ignores_nan():
  records = [{"scores": {"held_in": v}, "i": i} for i, v in enumerate([math.nan, 0.7, 0.9, 0.9])]
  assert sweep.select_best(records)["i"] == 2


def test_sweep_picks_the_constructed_best_and_tests_only_it(tmp_path):
  fakes = Fakes()
  result = sweep.sweep(GRIDS, fakes.merge_fn, fakes.evaluate_fn, VALIDATION, fakes.test_fn,
                       TEST, out_dir=str(tmp_path))
  assert result.best["ties"]["params"] == {"lam": 1.0, "density": 0.2}
  assert result.best["ties"]["scores"]["held_in"] == pytest.approx(1.0)
  assert result.best["average"]["params"] == {}
  assert result.best["flat"]["params"] == {"lam": 0.7}  # All tie: the first in grid order.
  # 9 + 1 + 3 validation merges, then one test merge per method, of its best point.
  validation_merges = [("ties", p) for p in sweep.grid_points(GRIDS["ties"])] + [
      ("average", {})] + [("flat", {"lam": v}) for v in (0.7, 0.9, 1.1)]
  assert fakes.merges == (validation_merges[:9] + [("ties", {"lam": 1.0, "density": 0.2})] +
                          [("average", {}), ("average", {})] + validation_merges[10:] +
                          [("flat", {"lam": 0.7})])
  # Test of ties' best: q 0.6/0.8 = 0.75, n 0.45/0.9 = 0.5 -> held-in 0.625; c 0.6/0.5 = 1.2.
  ties_test = result.test["ties"]["scores"]
  assert ties_test["held_in"] == pytest.approx(0.625)
  assert ties_test["held_out"] == pytest.approx(1.2)
  assert result.test["flat"]["scores"]["held_out"] == pytest.approx(0.6 * 0.7 / 0.5)
  assert len(result.records) == 16

  with open(tmp_path / sweep.RESULTS_JSONL) as f:
    written = [json.loads(line) for line in f]
  assert written == result.records
  assert [r["phase"] for r in written].count("test") == 3
  markdown = (tmp_path / sweep.RESULTS_MD).read_text()
  assert "| ties (lam=1.0, density=0.2) | 62.5 | 120.0 | 75.0 | 50.0 | 120.0 |" in markdown
  assert "| ties (lam=0.5, density=0.1) | 65.0 | – |" in markdown  # 1 - 0.25 - 0.1
  assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_resume_reuses_records(tmp_path):
  fakes = Fakes()
  first = sweep.sweep(GRIDS, fakes.merge_fn, fakes.evaluate_fn, VALIDATION, fakes.test_fn, TEST,
                      out_dir=str(tmp_path))

  def must_not_merge(method, **point):
    raise AssertionError(f"merged {method} {point} again")

  again = sweep.sweep(GRIDS, must_not_merge, fakes.evaluate_fn, VALIDATION, fakes.test_fn, TEST,
                      out_dir=str(tmp_path), resume=True)
  assert again.records == first.records and again.best == first.best


def test_without_test_phase_and_argument_errors():
  fakes = Fakes()
  result = sweep.sweep({"ties": GRIDS["ties"]}, fakes.merge_fn, fakes.evaluate_fn, VALIDATION)
  assert result.test == {} and len(result.records) == 9
  with pytest.raises(ValueError, match="test_fn and test together"):
    sweep.sweep(GRIDS, fakes.merge_fn, fakes.evaluate_fn, VALIDATION, fakes.test_fn)


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
  path = str(tmp_path / "r.jsonl")
  sweep.write_jsonl(path, [{"a": 1}])

  def fail(fd):
    raise OSError("disk full")

  monkeypatch.setattr(os, "fsync", fail)  # Fails after the new text is in the temporary file.
  with pytest.raises(OSError, match="disk full"):
    sweep.write_jsonl(path, [{"a": 2}])
  assert sweep.read_jsonl(path) == [{"a": 1}]
  assert os.listdir(tmp_path) == ["r.jsonl"]
