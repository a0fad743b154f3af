"""Sharded, jit-compiled train and eval steps.

The train state is a plain dict ``{"step", "params", "opt_state"}``. The
train step splits the batch into `num_microbatches`, sums the un-normalised
loss terms and gradients over them (`lax.scan`), and divides once by the
number of target tokens in the whole batch, so k micro-batches give the same
update as one k-times-larger batch. Dropout keys are derived from
(seed, step, micro-batch), so a resumed run replays the same randomness.

`trainable` (regular expressions over parameter paths such as
``decoder/layers_29/mlp/wi``): only matching parameters are updated; the others
enter the loss through `stop_gradient`, so autodiff does no backward pass
below the lowest trainable layer (freezing the embedding and the lower 22 of
SmolLM2's 30 layers halves a step's FLOPs) and their updates are zero.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from flame import partitioning
from flame.models import base, layers

State = dict[str, Any]


def split_microbatches(batch: Mapping[str, jax.Array], k: int) -> dict[str, jax.Array]:
  """[B, ...] → [k, B/k, ...]; micro-batch i takes rows i, i+k, i+2k, …

  Strided rows keep every micro-batch spread over all data-parallel shards.
  """
  def split(x):
    if x.shape[0] % k:
      raise ValueError(f"batch size {x.shape[0]} is not divisible by num_microbatches={k}")
    return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)
  return {name: split(x) for name, x in batch.items()}


def most_targets_per_row(host_batch: Mapping[str, Any]) -> int:
  """The most weighted (target) positions any row of a host batch has."""
  weights = np.asarray(host_batch["decoder_loss_weights"])
  return int(np.count_nonzero(weights, axis=-1).max(initial=0))


def trainable_mask(params, patterns: Optional[Sequence[str]]):
  """A tree of bools like `params`: True where some pattern `re.search`es the path.

  None when every parameter trains. A pattern that matches no parameter is an error (a
  typo would otherwise freeze the whole model silently)."""
  if patterns is None:
    return None
  patterns = [patterns] if isinstance(patterns, str) else list(patterns)
  paths = [partitioning.path_name(path)
           for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  compiled = []
  for pattern in patterns:
    try:
      compiled.append(re.compile(pattern))
    except re.error as e:
      raise ValueError(f"train.trainable_params: {pattern!r} is not a regular expression "
                       f"({e})") from None
    if not any(compiled[-1].search(path) for path in paths):
      raise ValueError(f"train.trainable_params: {pattern!r} matches no parameter; the "
                       f"parameters are named like {paths[0]!r} … {paths[-1]!r}")
  keep = [any(c.search(path) for c in compiled) for path in paths]
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), keep)


def count_trainable(params, mask) -> int:
  """How many parameters `mask` (a `trainable_mask`, not None) lets train."""
  return sum(int(np.prod(x.shape)) for x, keep in zip(jax.tree_util.tree_leaves(params),
                                                      jax.tree_util.tree_leaves(mask)) if keep)


@dataclasses.dataclass
class Trainer:
  model: base.Model
  optimizer: optax.GradientTransformation
  partitioner: partitioning.Partitioner
  learning_rate_fn: Any = None
  num_microbatches: int = 1
  seed: int = 0
  loss_positions: Optional[int] = None  # k: head and loss at k target positions per row
  trainable: Optional[Sequence[str]] = None  # regexes over parameter paths; None: all train
  pair_bias_weight: float = 0.0  # > 0: batches of flame.data.pairs, position bias penalised

  def __post_init__(self):
    if self.pair_bias_weight < 0:
      raise ValueError(f"train.pair_bias_weight = {self.pair_bias_weight}: expected >= 0")
    if self.pair_bias_weight and self.num_microbatches > 1:
      raise ValueError("train.pair_bias_weight > 0 with train.num_microbatches = "
                       f"{self.num_microbatches}: micro-batches take every k-th row and would "
                       "separate the two orders of a pair; use one micro-batch")

  def fits_loss_positions(self, host_batch: Mapping[str, Any]) -> bool:
    """Whether no row of `host_batch` has more weighted (target) positions than
    `loss_positions`, so the head-at-targets step computes its exact loss."""
    return self.loss_positions is None or most_targets_per_row(host_batch) <= self.loss_positions

  def without_loss_positions(self) -> "Trainer":
    return dataclasses.replace(self, loss_positions=None)

  # ---- state --------------------------------------------------------------
  def abstract_state(self, batch_size: int, task_feature_lengths: Mapping[str, int]):
    """(abstract state with shardings, state shardings) without allocating."""
    boxed = jax.eval_shape(lambda rng: self.model.init(rng, batch_size, task_feature_lengths),
                           jax.random.PRNGKey(self.seed))["params"]
    param_shardings = self.partitioner.params_shardings(boxed)
    abstract_params = partitioning.with_shardings(nn.meta.unbox(boxed), param_shardings)
    abstract_opt = jax.eval_shape(self.optimizer.init, abstract_params)
    opt_shardings = self.partitioner.optimizer_shardings(abstract_opt, abstract_params,
                                                         param_shardings)
    shardings = {"step": self.partitioner.replicated(), "params": param_shardings,
                 "opt_state": opt_shardings}
    abstract = {"step": jax.ShapeDtypeStruct((), jnp.int32),
                "params": abstract_params, "opt_state": abstract_opt}
    return partitioning.with_shardings(abstract, shardings), shardings

  def init_state(self, batch_size: int, task_feature_lengths: Mapping[str, int]) -> State:
    """Random parameters and fresh optimizer state, created already sharded."""
    _, shardings = self.abstract_state(batch_size, task_feature_lengths)

    def init():
      return self._fresh_state(self.model.init_params(jax.random.PRNGKey(self.seed), batch_size,
                                                      task_feature_lengths))
    return jax.jit(init, out_shardings=shardings)()

  def state_from_params(self, params, shardings) -> State:
    """A step-0 state around given (e.g. restored or imported) parameters."""
    return jax.jit(self._fresh_state, out_shardings=shardings)(params)

  def _fresh_state(self, params) -> State:
    return {"step": jnp.zeros((), jnp.int32), "params": params,
            "opt_state": self.optimizer.init(params)}

  # ---- steps --------------------------------------------------------------
  def _train_step(self, state: State, batch: Mapping[str, jax.Array]):
    with layers.activation_sharding(self.partitioner.batch_sharding(3)):
      return self._train_step_body(state, batch)

  def _train_step_body(self, state: State, batch: Mapping[str, jax.Array]):
    step_rng = jax.random.fold_in(jax.random.PRNGKey(self.seed), state["step"])
    mask = trainable_mask(state["params"], self.trainable)

    def loss_sum(params, mb, rng):
      if mask is not None:
        params = jax.tree_util.tree_map(
            lambda keep, p: p if keep else jax.lax.stop_gradient(p), mask, params)
      terms = self.model.loss_terms(params, mb, rng, self.loss_positions,
                                    self.pair_bias_weight)
      return terms["loss_sum"] + terms.get("penalty_sum", 0.0), terms

    grad_fn = jax.grad(loss_sum, has_aux=True)

    def accumulate(carry, inputs):
      index, mb = inputs
      grads, terms = grad_fn(state["params"], mb, jax.random.fold_in(step_rng, index))
      acc_grads, acc_terms = carry
      return (jax.tree_util.tree_map(jnp.add, acc_grads, grads),
              jax.tree_util.tree_map(jnp.add, acc_terms, terms)), None

    if self.num_microbatches == 1:
      grads, terms = grad_fn(state["params"], batch, jax.random.fold_in(step_rng, 0))
    else:
      zero_grads = jax.tree_util.tree_map(jnp.zeros_like, state["params"])
      zero_terms = {"loss_sum": 0.0, "weight_sum": 0.0, "correct_sum": 0.0}
      zero_terms = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), zero_terms)
      (grads, terms), _ = jax.lax.scan(
          accumulate, (zero_grads, zero_terms),
          (jnp.arange(self.num_microbatches), split_microbatches(batch, self.num_microbatches)))
    denom = jnp.maximum(terms["weight_sum"], 1.0)
    grads = jax.tree_util.tree_map(lambda g: g / denom, grads)
    updates, opt_state = self.optimizer.update(grads, state["opt_state"], state["params"])
    if mask is not None:
      updates = jax.tree_util.tree_map(lambda keep, u: u if keep else jnp.zeros_like(u),
                                       mask, updates)
    params = optax.apply_updates(state["params"], updates)
    _, metrics = base.normalize_loss_terms(terms)
    metrics["grad_norm"] = optax.global_norm(grads)
    metrics["param_norm"] = optax.global_norm(params)
    if self.learning_rate_fn is not None:
      metrics["learning_rate"] = self.learning_rate_fn(state["step"])
    new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state}
    return new_state, metrics

  def compile_train_step(self, state_shardings, batch_shardings=None):
    """jit with explicit shardings; the incoming state is donated."""
    batch_shardings = batch_shardings or self.partitioner.batch_sharding()
    return jax.jit(self._train_step, in_shardings=(state_shardings, batch_shardings),
                   out_shardings=(state_shardings, self.partitioner.replicated()),
                   donate_argnums=(0,))

  def lower_train_step(self, batch_size: int, task_feature_lengths: Mapping[str, int]):
    """(abstract state, the train step lowered for it and an abstract batch): what an
    ahead-of-time compile needs, nothing allocated."""
    abstract, shardings = self.abstract_state(batch_size, task_feature_lengths)
    batch = {name: jax.ShapeDtypeStruct(shape, jnp.int32,
                                        sharding=self.partitioner.batch_sharding(len(shape)))
             for name, shape in self.model.model_feature_shapes(batch_size,
                                                                task_feature_lengths).items()}
    return abstract, self.compile_train_step(shardings).lower(abstract, batch)

  def compile_eval_step(self, params_shardings):
    """Summed loss terms of one eval batch (sum them, then normalise)."""
    def eval_step(params, batch):
      with layers.activation_sharding(self.partitioner.batch_sharding(3)):
        return self.model.loss_terms(params, batch, loss_positions=self.loss_positions)
    return jax.jit(eval_step,
                   in_shardings=(params_shardings, self.partitioner.batch_sharding()),
                   out_shardings=self.partitioner.replicated())
