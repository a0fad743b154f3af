"""Bootstrap intervals for a judge's scores, and paired intervals for two judges' difference.

Resampling is stratified by subset: a resample draws each subset's pairs with replacement, as
many as the subset has, so RewardBench's count weights (`flame.autorater.rewardbench`) stay
fixed and a category's spread comes only from which pairs were drawn. Every resample is
scored by `rewardbench.report` itself, so the intervals follow the same accounting as the
point scores.

Two judges evaluated on the same pairs are compared *paired*: both are scored on the same
draws and the interval is that of their difference. Pairs that are hard for one are mostly
hard for the other, so the paired interval is much narrower than two separate intervals would
suggest, and it is the one that says whether a fine-tune beat its starting point.

Intervals are percentile intervals (the 2.5th and 97.5th percentiles of 2,000 resamples by
default), seeded, so a rerun prints the same numbers.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np

from flame.autorater import rewardbench

RESAMPLES = 2000
LEVEL = 0.95


def stratified_draws(subsets: Sequence[str], resamples: int, seed: int) -> dict[str, np.ndarray]:
  """{subset: [resamples, n] positions into the items}: each row one stratified resample."""
  if resamples < 1:
    raise ValueError(f"resamples={resamples}: expected at least 1")
  names = np.asarray(subsets, dtype=object)
  rng = np.random.default_rng(seed)
  draws = {}
  for subset in dict.fromkeys(subsets):
    positions = np.flatnonzero(names == subset)
    draws[subset] = positions[rng.integers(0, len(positions), (resamples, len(positions)))]
  return draws


def resampled_scores(subsets: Sequence[str], correct: Sequence[float],
                     categories: Optional[Mapping[str, Sequence[str]]],
                     draws: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """{"overall": [R], category: [R]}: the report of each resample in `draws`."""
  correct = np.asarray(correct, np.float64)
  if len(correct) != len(subsets):
    raise ValueError(f"{len(correct)} correctness values for {len(subsets)} items")
  accuracy = {s: correct[rows].mean(axis=1) for s, rows in draws.items()}
  counts = {s: rows.shape[1] for s, rows in draws.items()}
  resamples = next(iter(draws.values())).shape[0]
  reports = [rewardbench.report({s: (accuracy[s][r], counts[s]) for s in draws}, categories)
             for r in range(resamples)]
  out = {c: np.array([rep.categories[c] for rep in reports]) for c in reports[0].categories}
  if reports[0].overall is not None:
    out["overall"] = np.array([rep.overall for rep in reports])
  return out


def _interval(values: np.ndarray, level: float) -> list[float]:
  tail = (1.0 - level) / 2.0
  low, high = np.quantile(values, [tail, 1.0 - tail])
  return [float(low), float(high)]


def score_intervals(subsets: Sequence[str], correct: Sequence[float],
                    categories: Optional[Mapping[str, Sequence[str]]] = None,
                    resamples: int = RESAMPLES, seed: int = 0,
                    level: float = LEVEL) -> dict[str, list[float]]:
  """{"overall" and each category: [low, high]} of one judge's scores."""
  draws = stratified_draws(subsets, resamples, seed)
  scores = resampled_scores(subsets, correct, categories, draws)
  return {name: _interval(values, level) for name, values in scores.items()}


def paired_difference(subsets: Sequence[str], correct: Sequence[float],
                      baseline_correct: Sequence[float],
                      categories: Optional[Mapping[str, Sequence[str]]] = None,
                      resamples: int = RESAMPLES, seed: int = 0,
                      level: float = LEVEL) -> dict[str, dict[str, object]]:
  """{"overall" and each category: {"difference": judge − baseline, "interval": [low, high]}},
  both judges scored on the same draws of the same items (same order, same subsets)."""
  draws = stratified_draws(subsets, resamples, seed)
  mine = resampled_scores(subsets, correct, categories, draws)
  theirs = resampled_scores(subsets, baseline_correct, categories, draws)
  point = rewardbench.report(rewardbench.subset_accuracies(subsets, correct), categories)
  base = rewardbench.report(rewardbench.subset_accuracies(subsets, baseline_correct), categories)
  points = {**point.categories, "overall": point.overall}
  bases = {**base.categories, "overall": base.overall}
  return {name: {"difference": points[name] - bases[name],
                 "interval": _interval(mine[name] - theirs[name], level)}
          for name in mine}


def mean_interval(values: Sequence[float], resamples: int = RESAMPLES, seed: int = 0,
                  level: float = LEVEL) -> list[float]:
  """[low, high] of a plain mean (e.g. swap consistency over pairs), resampling the values."""
  values = np.asarray(values, np.float64)
  if values.size == 0:
    raise ValueError("an interval of no values")
  rows = np.random.default_rng(seed).integers(0, values.size, (resamples, values.size))
  return _interval(values[rows].mean(axis=1), level)
