"""Learning-rate schedules and optimizers (optax), bound from gin.

Schedule: linear warmup from 0 to `base_learning_rate` over `warmup_steps`,
then one of
  constant: lr = base
  rsqrt:    lr = base * sqrt(max(warmup_steps, 1) / max(step, warmup_steps, 1))
            (T5's inverse square root decay, continuous at the end of warmup)
  cosine:   lr = base * (f + (1 - f) * (1 + cos(pi * s)) / 2), with
            s = (step - warmup_steps) / (total_steps - warmup_steps) clipped to
            [0, 1] and f = `final_fraction`.
"""
from __future__ import annotations

from typing import Optional

import gin
import jax.numpy as jnp
import optax

DECAYS = ("constant", "rsqrt", "cosine")


@gin.configurable
def learning_rate_schedule(base_learning_rate: float = 1e-3, warmup_steps: int = 0,
                           decay: str = "constant", total_steps: Optional[int] = None,
                           final_fraction: float = 0.0) -> optax.Schedule:
  if decay not in DECAYS:
    raise ValueError(f"learning_rate_schedule.decay={decay!r}; expected one of {DECAYS}")
  for name, value in (("warmup_steps", warmup_steps), ("total_steps", total_steps)):
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
      raise ValueError(f"learning_rate_schedule.{name}={value!r} (often TRAIN_STEPS): expected "
                       "a whole number >= 0")
  if isinstance(base_learning_rate, bool) or not isinstance(base_learning_rate, (int, float)):
    raise ValueError(f"learning_rate_schedule.base_learning_rate={base_learning_rate!r} "
                     "(LEARNING_RATE): expected a number")
  if decay == "cosine" and (total_steps is None or total_steps <= warmup_steps):
    raise ValueError("cosine decay needs total_steps > warmup_steps "
                     f"(got total_steps={total_steps}, warmup_steps={warmup_steps})")

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = jnp.minimum(1.0, (step + 1.0) / warmup_steps) if warmup_steps else 1.0
    if decay == "constant":
      after = 1.0
    elif decay == "rsqrt":
      after = jnp.sqrt(max(warmup_steps, 1) / jnp.maximum(step, max(warmup_steps, 1)))
    else:
      s = jnp.clip((step - warmup_steps) / (total_steps - warmup_steps), 0.0, 1.0)
      after = final_fraction + (1.0 - final_fraction) * 0.5 * (1.0 + jnp.cos(jnp.pi * s))
    return base_learning_rate * warm * after

  return schedule


@gin.configurable
def adamw(learning_rate: optax.Schedule = gin.REQUIRED, b1: float = 0.9, b2: float = 0.999,
          eps: float = 1e-8, weight_decay: float = 0.0,
          clip_norm: Optional[float] = 1.0) -> optax.GradientTransformation:
  """AdamW (decoupled weight decay), with optional global-norm clipping first."""
  parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
  parts.append(optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
  return optax.chain(*parts)


@gin.configurable
def adafactor(learning_rate: optax.Schedule = gin.REQUIRED, decay_rate: float = 0.8,
              clipping_threshold: Optional[float] = 1.0, momentum: Optional[float] = None,
              weight_decay: float = 0.0, factored: bool = True) -> optax.GradientTransformation:
  """Adafactor (Shazeer & Stern, 2018) as T5 uses it: factored second moments."""
  return optax.adafactor(learning_rate, decay_rate=decay_rate,
                         clipping_threshold=clipping_threshold, momentum=momentum,
                         weight_decay_rate=weight_decay or None, factored=factored,
                         multiply_by_parameter_scale=False)
