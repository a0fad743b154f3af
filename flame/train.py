"""Training entry point: ``python -m flame.train --gin_file=F [--gin.NAME=VALUE …]``.

`train()` is gin-configurable; gin_configs/runs/train.gin spells out the
required macros (MODEL_DIR, MIXTURE_OR_TASK_NAME, TASK_FEATURE_LENGTHS,
TRAIN_STEPS, BATCH_SIZE). A run resumes automatically from the latest
checkpoint in MODEL_DIR/checkpoints and replays the same data order.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import gin
import jax
import numpy as np
import tensorboardX
import tqdm

from flame import (cli, distributed, errors, files, gin_utils, inputs, optimizers, partitioning,
                   progress, trainer as trainer_lib)
from flame.checkpoints import imported, manager
from flame.models import base

if __name__ == "__main__":
  # `python -m flame.train` runs this file as __main__; run the importable module
  # instead so gin registers each configurable once, under flame.train.
  from flame import train as _importable
  _importable.console_main()

# Dense bf16 peak FLOP/s per chip, for the model FLOPs utilisation estimate.
PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
              "TPU v6 lite": 918e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12,
              "NVIDIA A100": 312e12}


class NonFiniteLossError(errors.InputError, FloatingPointError):
  """The loss or gradient became NaN/inf; training stopped before saving it."""


def peak_flops_per_device() -> Optional[float]:
  kind = jax.devices()[0].device_kind
  for prefix, flops in PEAK_FLOPS.items():
    if kind.startswith(prefix):
      return flops
  return None


class MetricsWriter:
  """TensorBoard scalars and one JSON line per write (process 0 only).

  `resume_step`: a resumed run replays the steps after its checkpoint, so the lines of those
  steps (and a line cut short by a kill) are dropped first: each step is logged once.
  """

  def __init__(self, logdir: str, resume_step: Optional[int] = None):
    self.writer = tensorboardX.SummaryWriter(logdir) if jax.process_index() == 0 else None
    self.jsonl = os.path.join(logdir, "metrics.jsonl")
    if self.writer is not None and resume_step is not None and os.path.exists(self.jsonl):
      kept = []
      with open(self.jsonl, encoding="utf-8") as f:
        for line in f:
          try:
            row = json.loads(line)
          except json.JSONDecodeError:
            continue  # the last line of a killed run
          if row.get("step", 0) <= resume_step:
            kept.append(json.dumps(row) + "\n")
      files.write_text_atomically(self.jsonl, "".join(kept))

  def write(self, step: int, metrics: Mapping[str, float]):
    if self.writer is None:
      return
    for name, value in metrics.items():
      self.writer.add_scalar(name, float(value), step)
    self.writer.flush()
    with open(self.jsonl, "a", encoding="utf-8") as f:
      f.write(json.dumps({"step": step, **{k: float(v) for k, v in metrics.items()}}) + "\n")


def evaluate(model: base.Model, eval_step: Callable[[Any], Any], params, partitioner,
             mixture_or_task_name: str, task_feature_lengths, batch_size: int, split: str, max_batches: int,
             pack: bool) -> dict[str, float]:
  """Loss and token accuracy on up to `max_batches` batches of `split` (in order); a final
  partial batch is padded with zero-weight rows and counted, never dropped. `eval_step`:
  host batch → the compiled step for it (a `StepChooser`)."""
  batches = inputs.get_batches(mixture_or_task_name, task_feature_lengths,
                               model.feature_converter(pack), batch_size, split=split,
                               shuffle=False, num_epochs=1, pad_final_batch=True)
  totals = None
  for _, batch in zip(range(max_batches), batches):
    terms = jax.device_get(eval_step(batch)(params, partitioner.shard_batch(batch)))
    totals = terms if totals is None else {k: totals[k] + terms[k] for k in terms}
  if totals is None:
    raise ValueError(f"split {split!r} of {mixture_or_task_name} has no examples")
  denom = max(float(totals["weight_sum"]), 1.0)
  return {"loss": float(totals["loss_sum"]) / denom,
          "accuracy": float(totals["correct_sum"]) / denom}


AUTORATER_SUITES = ("heldout",)


def resolve_loss_positions(setting: Any, task_feature_lengths: Mapping[str, int],
                           pack: bool) -> Optional[int]:
  """`train.loss_positions_per_row` → k target positions per row for the output head, or
  None (every position).

  "auto": the targets feature length (an exact bound for unpacked rows, whose target tokens
  are the only weighted ones) or twice it when packed (a packed row may hold several
  examples; a batch with more is run by the every-position step, see `StepChooser`). For an
  encoder-decoder k is the whole decoder length, so nothing changes.
  """
  if setting is None:
    return None
  if setting == "auto":
    targets = task_feature_lengths.get("targets")
    return None if targets is None else targets * (2 if pack else 1)
  return _whole(setting, "train.loss_positions_per_row", 1)


class StepChooser:
  """The compiled step for each host batch: `trainer`'s (the head at `loss_positions`
  target positions per row) when every row fits, else one over every position, compiled
  on first need; each batch's loss is exact either way. In a multi-process job the row
  counts are gathered first, so every process picks the same step. Counts the batches that
  did not fit, so a run can say how to size `train.loss_positions_per_row`."""

  def __init__(self, trainer: trainer_lib.Trainer, compile_step: Callable[[Any], Any]):
    self.trainer, self.compile_step = trainer, compile_step
    self.fast = compile_step(trainer)
    self.full = None
    self.misses, self.most_targets = 0, 0

  def __call__(self, host_batch: Mapping[str, np.ndarray]):
    if self.trainer.loss_positions is None:
      return self.fast
    most = trainer_lib.most_targets_per_row(host_batch)
    if jax.process_count() > 1:  # Every process must run the same step: the global most.
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      most = int(np.max(multihost_utils.process_allgather(np.int32(most))))
    if most <= self.trainer.loss_positions:
      return self.fast
    self.misses += 1
    self.most_targets = max(self.most_targets, most)
    if self.full is None:
      logging.warning("a batch row has %d target tokens, more than "
                      "train.loss_positions_per_row=%d: such batches run the output head at "
                      "every position (slower, same loss)", self.most_targets,
                      self.trainer.loss_positions)
      self.full = self.compile_step(self.trainer.without_loss_positions())
    return self.full


PROGRESS_SECONDS = 30.0  # a log line at least this often when no progress bar is shown


def progress_line(step: int, total: int, steps_done: int, seconds: float,
                  metrics: Mapping[str, float]) -> str:
  """'train step 70/150 (47%), 4.1 s/step, 172 tokens/s, loss 1.203, ETA 5.5 min': `steps_done`
  steps of this process took `seconds` (the ETA assumes the rest run at that pace)."""
  per_step = seconds / max(steps_done, 1)
  eta_text = progress.duration(per_step * (total - step))
  return (f"train step {step}/{total} ({100 * step / total:.0f}%), {per_step:.1f} s/step, "
          f"{metrics.get('tokens_per_second', 0.0):.0f} tokens/s, "
          f"loss {metrics.get('loss', math.nan):.4g}, ETA {eta_text}")


def _whole(value: Any, name: str, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"{name} = {value!r}: expected a whole number >= {minimum}")
  return int(value)


def check_settings(train_steps, batch_size, num_microbatches, partitioner,
                   task_feature_lengths) -> None:
  """Refuses settings that cannot work, naming the gin setting, before anything is written."""
  _whole(train_steps, "train.train_steps (TRAIN_STEPS)", 0)
  batch_size = _whole(batch_size, "train.batch_size (BATCH_SIZE)", 1)
  microbatches = _whole(num_microbatches, "train.num_microbatches", 1)
  if not isinstance(task_feature_lengths, Mapping) or not task_feature_lengths:
    raise ValueError(f"train.task_feature_lengths (TASK_FEATURE_LENGTHS) = "
                     f"{task_feature_lengths!r}: expected e.g. {{'inputs': 512, 'targets': 32}}")
  for key, length in task_feature_lengths.items():
    _whole(length, f"TASK_FEATURE_LENGTHS[{key!r}]", 1)
  if batch_size % microbatches:
    raise ValueError(f"BATCH_SIZE = {batch_size} is not divisible by train.num_microbatches = "
                     f"{microbatches}")
  data = partitioner.data_parallel_size()
  per_step = batch_size // microbatches
  if per_step % data:
    raise ValueError(f"BATCH_SIZE = {batch_size} (per microbatch {per_step}) is not divisible "
                     f"by the {data}-way data parallelism of the mesh "
                     f"{dict(partitioner.mesh.shape)}: use a multiple of {data}")
  inputs.host_batch_size(batch_size)  # divisible by the processes


def _autorater_judge(model: base.Model, partitioner, limit: int,
                     max_input_length: int) -> Callable[[Any], dict[str, float]]:
  """params → {"heldout/<category>", "heldout/overall", "heldout/swap_consistency"}."""
  # pylint: disable=import-outside-toplevel
  from flame.autorater import autorater, evaluate as autorater_evaluate
  from flame.data import heldout
  items = autorater_evaluate.heldout_items(limit)
  rater = autorater.Autorater(model, None, partitioner,
                              batch_size=max(8, partitioner.data_parallel_size()),
                              max_input_length=max_input_length)

  def judge(params) -> dict[str, float]:
    rater.params = params
    result = autorater_evaluate.evaluate(rater, items, True, heldout.CATEGORIES, progress=False)
    out = {f"heldout/{c}": v for c, v in result["categories"].items()}
    out["heldout/overall"] = result["overall"]
    out["heldout/swap_consistency"] = result["swap_consistency_overall"]
    return out
  return judge


@gin.configurable
def train(model_dir: str = gin.REQUIRED, model: base.Model = gin.REQUIRED,
          mixture_or_task_name: str = gin.REQUIRED,
          task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
          train_steps: int = gin.REQUIRED, batch_size: int = gin.REQUIRED,
          optimizer_factory: Callable[..., Any] = optimizers.adamw,
          learning_rate_fn: Callable[[Any], Any] = gin.REQUIRED,
          partitioner: Optional[partitioning.Partitioner] = None,
          num_microbatches: int = 1, seed: int = 0, pack: bool = False,
          checkpoint_every: int = 100, keep_checkpoints: Optional[int] = 3,
          async_checkpoints: bool = True, init_params_from: Optional[str] = None,
          init_optimizer_state: bool = False,
          eval_every: int = 0, eval_split: str = "validation", eval_batches: int = 10,
          log_every: int = 10, peak_flops: Optional[float] = None,
          progress_bar: bool = True, autorater_eval_suite: Optional[str] = None,
          autorater_eval_limit: int = 16, autorater_eval_max_input_length: int = 1024,
          eval_fn: Optional[Callable[[Any], Mapping[str, float]]] = None,
          loss_positions_per_row: Any = "auto",
          trainable_params: Optional[Sequence[str]] = None, pair_orders: bool = False,
          pair_bias_weight: float = 0.0) -> tuple[dict, dict]:
  """Trains `model` for `train_steps` (global) steps; returns (state, last metrics).

  `init_params_from`: a checkpoint dir (or dir/<step>) whose *params only*
  start this run (fine-tuning); ignored when MODEL_DIR already has a checkpoint.
  `init_optimizer_state`: with `init_params_from`, start from that checkpoint's optimizer
  state too (Adam's moments and count: the run continues the other on new data, as a
  tail-patch does, instead of restarting Adam, whose first steps move every parameter by
  about the learning rate); the step counter and the schedule still start at 0.
  `autorater_eval_suite="heldout"`: at every eval, also judge up to
  `autorater_eval_limit` pairs per held-out subset (both orders) and log the
  category scores, overall and swap consistency as ``heldout/…`` (as
  flame-evaluate computes them).
  `eval_fn`: params → more metrics, logged at every eval with the others (for library callers
  such as tail-patch runs, which score their target categories this way).
  `loss_positions_per_row`: the output head and the loss run only at this many target
  positions per row ("auto": see `resolve_loss_positions`; None: every position). A judge
  reads ~500 input tokens and writes a few dozen: the 49,152-wide head of SmolLM2 is then a
  sixth of the forward FLOPs saved. The loss is the same either way.
  `trainable_params`: regular expressions over parameter paths (``decoder/layers_29/…``); only
  matching parameters are updated and no backward pass runs below the lowest of them
  (`flame.trainer`), e.g. ``["layers_(2[2-9])/", "final_norm"]`` for SmolLM2's top 8 layers.
  `pair_orders`: batches of `flame.data.pairs` instead of seqio's (the mixture's pairwise
  tasks only, both orders of each pair in adjacent unpacked rows); with `pair_bias_weight`
  w > 0 the loss adds w · (mean over pairs of b²), b the verdict's position bias
  (`flame.models.base.Model.loss_terms`), and logs ``pair_bias_rms`` and
  ``pair_swap_consistency``.
  """
  if autorater_eval_suite is not None and autorater_eval_suite not in AUTORATER_SUITES:
    raise ValueError(f"train.autorater_eval_suite={autorater_eval_suite!r}: expected one of "
                     f"{list(AUTORATER_SUITES)}")
  if init_optimizer_state and not init_params_from:
    raise ValueError("train.init_optimizer_state needs train.init_params_from (the checkpoint "
                     "whose optimizer state the run continues)")
  if pair_bias_weight and not pair_orders:
    raise ValueError("train.pair_bias_weight > 0 needs train.pair_orders = True (batches that "
                     "hold both orders of each pair)")
  if pair_orders and pack:
    raise ValueError("train.pair_orders = True reads unpacked rows: set train.pack = False")
  if pair_orders and num_microbatches != 1:
    raise ValueError(f"train.pair_orders = True with train.num_microbatches = "
                     f"{num_microbatches}: micro-batches take every k-th row and would separate "
                     "the two orders of a pair; use one micro-batch")
  partitioner = partitioner or partitioning.Partitioner()
  check_settings(train_steps, batch_size, num_microbatches, partitioner, task_feature_lengths)
  files.check_output_writable("MODEL_DIR (train.model_dir)", model_dir)
  if jax.process_index() == 0:
    devices = jax.devices()
    logging.info("training on %d %s device(s) (%s), %d process(es), mesh %s", len(devices),
                 devices[0].platform, devices[0].device_kind, jax.process_count(),
                 dict(partitioner.mesh.shape))
  loss_positions = resolve_loss_positions(loss_positions_per_row, task_feature_lengths, pack)
  trainer = trainer_lib.Trainer(model, optimizer_factory(learning_rate=learning_rate_fn),
                                partitioner, learning_rate_fn, num_microbatches, seed,
                                loss_positions, trainable_params, pair_bias_weight)
  abstract, shardings = trainer.abstract_state(batch_size, task_feature_lengths)
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(abstract["params"]))
  mask = trainer_lib.trainable_mask(abstract["params"], trainable_params)  # checked up front
  if mask is not None and jax.process_index() == 0:
    logging.info("training %s of %s parameters (train.trainable_params=%s)",
                 f"{trainer_lib.count_trainable(abstract['params'], mask):,}",
                 f"{num_params:,}", list(trainable_params))
  checkpointer = manager.Checkpointer(os.path.join(model_dir, "checkpoints"),
                                      keep=keep_checkpoints,
                                      async_save=async_checkpoints)
  latest = checkpointer.latest_step()
  seen = {"examples_seen": 0, "tokens_seen": 0}  # data consumed, kept in checkpoint meta
  if latest is not None:
    logging.info("resuming from %s/%d", checkpointer.directory, latest)
    state = checkpointer.restore(abstract, latest)
    restored_meta = checkpointer.restore_meta(latest)
    seen = {k: int(restored_meta.get(k, 0)) for k in seen}
  elif init_params_from:
    params = manager.restore_params_from(init_params_from, abstract["params"])
    state = trainer.state_from_params(params, shardings)
    if init_optimizer_state:
      state["opt_state"] = manager.restore_opt_state_from(init_params_from,
                                                          abstract["opt_state"])
  else:
    state = trainer.init_state(batch_size, task_feature_lengths)
  start = int(state["step"])
  if start >= train_steps:
    logging.warning("nothing to train: %s holds step %d and TRAIN_STEPS is %d (raise "
                    "TRAIN_STEPS to train on)", checkpointer.directory, start, train_steps)
    checkpointer.close()
    return state, dict(seen)
  if jax.process_index() == 0:
    gin_utils.write_operative_config(model_dir)

  train_step = StepChooser(trainer, lambda t: t.compile_train_step(shardings))
  eval_step = (StepChooser(trainer, lambda t: t.compile_eval_step(shardings["params"]))
               if eval_every else None)
  read = inputs.get_batches
  if pair_orders:
    from flame.data import pairs  # pylint: disable=import-outside-toplevel
    read = pairs.paired_batches
  batches = read(mixture_or_task_name, task_feature_lengths, model.feature_converter(pack),
                 batch_size, seed=seed, skip_batches=start)
  resumed_at = start if latest is not None else None
  train_writer = MetricsWriter(os.path.join(model_dir, "train"), resumed_at)
  eval_writer = MetricsWriter(os.path.join(model_dir, "eval"), resumed_at)
  peak = peak_flops or peak_flops_per_device()
  meta = {"model": type(model).__name__, "config": imported.config_dict(model.config)}
  # Where the parameters started: merging checks that experts share the base it is given.
  if latest is not None and "fine_tuned_from" in restored_meta:
    meta["fine_tuned_from"] = restored_meta["fine_tuned_from"]
  elif latest is None and init_params_from:
    meta["fine_tuned_from"] = os.path.join(*map(str, manager.resolve_step(init_params_from)))

  metrics: dict[str, float] = dict(seen)
  judge = None
  # A bar on a terminal; in a log (or with progress_bar=False), a line every PROGRESS_SECONDS.
  show_bar = progress_bar and jax.process_index() == 0 and sys.stderr.isatty()
  log_progress = not show_bar and jax.process_index() == 0
  bar = tqdm.tqdm(range(start, train_steps), initial=start, total=train_steps,
                  disable=not show_bar, desc="train")
  last_time = began = time.perf_counter()
  last_progress = -math.inf
  for step in bar:
    waited = time.perf_counter()
    try:
      host_batch = next(batches)
    except StopIteration:
      raise ValueError(f"{mixture_or_task_name} ran out of data at step {step}") from None
    waited = time.perf_counter() - waited
    tokens = sum(v.size for k, v in host_batch.items() if k.endswith("input_tokens"))
    examples, real_tokens = inputs.batch_counts(host_batch)
    seen = {"examples_seen": seen["examples_seen"] + examples * jax.process_count(),
            "tokens_seen": seen["tokens_seen"] + real_tokens * jax.process_count()}
    state, step_metrics = train_step(host_batch)(state, partitioner.shard_batch(host_batch))
    step_metrics = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
    guarded = {k: step_metrics[k] for k in ("loss", "grad_norm", "param_norm")}
    if not all(math.isfinite(v) for v in guarded.values()):
      checkpointer.wait()
      good = checkpointer.latest_step()
      raise NonFiniteLossError(
          f"step {step + 1}: {guarded} is not finite; stopped without saving this step. "
          f"Last good checkpoint: "
          f"{'none' if good is None else os.path.join(checkpointer.directory, str(good))}. "
          "Lower the learning rate or check the data, then rerun to resume from it.")
    now = time.perf_counter()
    seconds, last_time = now - last_time, now
    step_metrics["tokens_per_second"] = tokens * jax.process_count() / seconds
    step_metrics["input_wait_share"] = waited / seconds  # of the step's wall time
    if peak:
      step_metrics["mfu"] = (6 * num_params * step_metrics["tokens_per_second"]
                             / (peak * jax.device_count()))
    metrics = {**step_metrics, **seen}
    if log_progress and (now - last_progress >= PROGRESS_SECONDS or step + 1 == train_steps):
      last_progress = now
      logging.info("%s", progress_line(step + 1, train_steps, step + 1 - start, now - began,
                                       metrics))
    if (step + 1) % log_every == 0 or step + 1 == train_steps:
      train_writer.write(step + 1, metrics)
      bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['accuracy']:.3f}",
                      tok_s=f"{metrics['tokens_per_second']:.0f}")
    if eval_every and ((step + 1) % eval_every == 0 or step + 1 == train_steps):
      eval_metrics = evaluate(model, eval_step, state["params"], partitioner,
                              mixture_or_task_name, task_feature_lengths, batch_size,
                              eval_split, eval_batches, pack)
      if autorater_eval_suite:
        judge = judge or _autorater_judge(model, partitioner, autorater_eval_limit,
                                          autorater_eval_max_input_length)
        eval_metrics.update(judge(state["params"]))
      if eval_fn is not None:
        eval_metrics.update(eval_fn(state["params"]))
      eval_writer.write(step + 1, eval_metrics)
      metrics.update({f"eval_{k}": v for k, v in eval_metrics.items()})
      logging.info("step %d eval %s", step + 1, eval_metrics)
    # After the eval: a checkpointed step always has its eval logged (a run killed between
    # the two replays the step and evaluates it again).
    if (step + 1) % checkpoint_every == 0 or step + 1 == train_steps:
      checkpointer.save(step + 1, state, {**meta, **seen}, force=True)
  checkpointer.wait()
  checkpointer.close()
  if train_step.misses:
    logging.warning("%d of %d steps ran the output head at every position (rows of up to %d "
                    "target tokens): set train.loss_positions_per_row=%d for the fast step",
                    train_step.misses, train_steps - start, train_step.most_targets,
                    train_step.most_targets)
  if jax.process_index() == 0:
    gin_utils.write_operative_config(model_dir)
    logging.info("outputs in %s: checkpoints/, train/ and eval/ metrics (TensorBoard and "
                 "metrics.jsonl), config.gin", os.path.abspath(model_dir))
  return state, metrics


def _flag_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="flame-train", add_help=False,
      usage="flame-train --gin_file=FILE [--gin.NAME=VALUE …] [--multihost] [--debug]")
  parser.add_argument("--debug", action="store_true")
  distributed.add_flags(parser)
  return parser


def main(argv=None) -> dict[str, float]:
  """Parses the command line, trains; returns the last metrics. Refuses unknown flags."""
  argv = list(sys.argv[1:] if argv is None else argv)
  rest = gin_utils.split_flags(argv)[2]
  args, unknown = _flag_parser().parse_known_args(rest)
  if unknown:
    raise ValueError(f"unknown flag(s) {unknown}: flame-train takes --gin_file=FILE, "
                     "--gin.NAME=VALUE (e.g. --gin.TRAIN_STEPS=5), --debug and the "
                     "multi-process flags (--multihost, or --coordinator_address, "
                     "--num_processes and --process_id)")
  distributed.initialize_from(args)
  gin_utils.parse_command_line([a for a in argv if a not in rest])
  cli.setup_logging()
  _, metrics = train()
  return metrics


def console_main() -> None:
  cli.console("flame-train", main,
              lambda m: " ".join(f"{k}={v:.4g}" for k, v in sorted(m.items())))
