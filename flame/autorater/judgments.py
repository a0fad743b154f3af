"""Verdicts from verdict log-probabilities: pairwise (with position swap), pointwise,
classification. Pure functions of NumPy arrays.

Pairwise position swap: the pair is scored as (A=first, B=second) and as
(A=second, B=first). With p1 the verdict distribution of the first order and
p2 that of the swapped one, over the labels (L0, L1[, others]) where L0 names
the first response slot and L1 the second:

  P(L0) = (p1[L0] + p2[L1]) / 2,  P(L1) = (p1[L1] + p2[L0]) / 2,
  P(other) = (p1[other] + p2[other]) / 2.

So rating the reversed pair gives exactly the complementary probabilities.
The verdict survives the swap (`swap_consistent`) when the first order's
verdict, and the swapped order's verdict mapped back to the original
positions, agree.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

from flame.autorater import scoring


@dataclasses.dataclass(frozen=True)
class Verdict:
  """One judgment.

  verdict: the most probable label (ties go to the earlier label);
  probabilities: label → probability (renormalised over the labels, summing to 1);
  mass: the probability the model put on the verdict tokens before renormalising
    (mean over the orders scored);
  swap_consistent: pairwise with swap only;
  expected_rating: pointwise only, Σ value × probability.
  """
  verdict: str
  probabilities: dict[str, float]
  mass: float
  swap_consistent: Optional[bool] = None
  expected_rating: Optional[float] = None

  def to_json(self) -> dict:
    out = {"verdict": self.verdict, "probabilities": self.probabilities, "mass": self.mass}
    if self.swap_consistent is not None:
      out["swap_consistent"] = self.swap_consistent
    if self.expected_rating is not None:
      out["expected_rating"] = self.expected_rating
    return out


def _argmax_label(labels: Sequence[str], probabilities: np.ndarray) -> str:
  return labels[int(np.argmax(probabilities))]


def swapped_order(num_labels: int) -> np.ndarray:
  """Index map from the swapped order's labels to the original ones (L0 <-> L1)."""
  order = np.arange(num_labels)
  order[0], order[1] = 1, 0
  return order


def _mass(log_probs: np.ndarray) -> float:
  return float(np.exp(np.asarray(log_probs, np.float64)).sum())


def pairwise(labels: Sequence[str], log_probs: np.ndarray,
             swapped_log_probs: Optional[np.ndarray] = None) -> Verdict:
  """The verdict from one order, or from both when `swapped_log_probs` is given."""
  labels = tuple(labels)
  p1 = scoring.normalize(log_probs)
  if swapped_log_probs is None:
    return Verdict(_argmax_label(labels, p1), dict(zip(labels, map(float, p1))),
                   _mass(log_probs))
  p2 = scoring.normalize(swapped_log_probs)[swapped_order(len(labels))]
  p = (p1 + p2) / 2
  consistent = _argmax_label(labels, p1) == _argmax_label(labels, p2)
  return Verdict(_argmax_label(labels, p), dict(zip(labels, map(float, p))),
                 (_mass(log_probs) + _mass(swapped_log_probs)) / 2, consistent)


def classification(labels: Sequence[str], log_probs: np.ndarray) -> Verdict:
  p = scoring.normalize(log_probs)
  return Verdict(_argmax_label(labels, p), dict(zip(labels, map(float, p))), _mass(log_probs))


def scale_labels(scale: Sequence[float]) -> tuple[str, ...]:
  """The rating strings of an integer scale (low, high): "low" … "high"."""
  low, high = scale
  if int(low) != low or int(high) != high or low >= high:
    raise ValueError(f"a rating scale must be two integers low < high, got {tuple(scale)}")
  return tuple(str(v) for v in range(int(low), int(high) + 1))


def pointwise(labels: Sequence[str], log_probs: np.ndarray) -> Verdict:
  """Distribution over the ratings `labels` (numeric strings) and its expectation."""
  p = scoring.normalize(log_probs)
  expected = float(np.dot(p, np.array([float(v) for v in labels], np.float64)))
  return Verdict(_argmax_label(labels, p), dict(zip(labels, map(float, p))), _mass(log_probs),
                 expected_rating=expected)
