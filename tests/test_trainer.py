"""Trainer: learning on real data, gradient accumulation, schedules, NaN guard, the head at
target positions."""
import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flame import inputs, optimizers, partitioning, plot, train as train_lib, trainer as trainer_lib
from flame.checkpoints import convert, manager
from flame.data import quickstart_tasks  # noqa: F401  (registers the task)
from flame.models import base, decoder

TASK = "truthfulqa_judge_bytes"
LENGTHS = {"inputs": 64, "targets": 4}
CONFIG = decoder.DecoderConfig(vocab_size=259, emb_dim=32, num_layers=2, num_heads=4,
                               num_kv_heads=2, head_dim=8, mlp_dim=64)


def run(model_dir, steps, **overrides):
  kwargs = dict(model_dir=str(model_dir), model=decoder.DecoderOnlyModel(CONFIG),
                mixture_or_task_name=TASK, task_feature_lengths=LENGTHS, train_steps=steps,
                batch_size=8, learning_rate_fn=optimizers.learning_rate_schedule(3e-3),
                partitioner=partitioning.Partitioner((4, 1, 2)), checkpoint_every=3,
                async_checkpoints=True, log_every=1, progress_bar=False)
  kwargs.update(overrides)
  return train_lib.train(**kwargs)


def test_loss_falls_on_real_data(tmp_path):
  state, metrics = run(tmp_path, 40, eval_every=40, eval_batches=4, checkpoint_every=40)
  assert metrics["loss"] < 1.5 and metrics["eval_loss"] < 1.5  # from ~5.6 (uniform over 259)
  assert os.path.exists(tmp_path / "config.gin")
  assert os.listdir(tmp_path / "train")  # TensorBoard event file
  assert manager.Checkpointer(tmp_path / "checkpoints").all_steps() == [40]
  assert int(state["step"]) == 40
  meta = manager.Checkpointer(tmp_path / "checkpoints").restore_meta()
  assert meta["config"]["class"] == "DecoderConfig" and meta["config"]["num_layers"] == 2
  assert convert.config_from_meta(meta) == CONFIG  # typed fields read back exactly
  logged = plot.read_metrics(str(tmp_path / "train" / "metrics.jsonl"))
  assert [row["step"] for row in logged] == list(range(1, 41))
  assert logged[-1]["loss"] == pytest.approx(metrics["loss"])
  png = plot.plot_run(str(tmp_path))
  with open(png, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_metrics_reader_keeps_last_value_per_step_and_names_bad_lines(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n')
  assert [r["loss"] for r in plot.read_metrics(str(path))] == [3.0, 1.5]
  path.write_text('{"step": 1, "loss": 3.0}\nnot json\n')
  with pytest.raises(ValueError, match="metrics.jsonl:2"):
    plot.read_metrics(str(path))


def test_gradient_accumulation_equals_large_batch():
  model = decoder.DecoderOnlyModel(CONFIG)
  batch = next(inputs.get_batches(TASK, LENGTHS, model.feature_converter(), 8, shuffle=False))
  results = []
  for k in (1, 4):
    # Plain SGD with lr 1: the parameter change is exactly the (summed, normalised) gradient.
    trainer = trainer_lib.Trainer(model, optax.sgd(1.0),
                                  partitioning.Partitioner((2, 1, 1), devices=jax.devices()[:2]),
                                  num_microbatches=k)
    _, shardings = trainer.abstract_state(8, LENGTHS)
    state, step = trainer.init_state(8, LENGTHS), trainer.compile_train_step(shardings)
    state, metrics = step(state, trainer.partitioner.shard_batch(batch))
    results.append((jax.device_get(state["params"]), float(metrics["loss"])))
  (params_1, loss_1), (params_4, loss_4) = results
  assert loss_1 == pytest.approx(loss_4, rel=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(params_1), jax.tree_util.tree_leaves(params_4)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


TOP = ["layers_1/", "final_norm"]  # CONFIG has 2 layers: the top one and the final norm train


def test_frozen_parameters_stay_and_trainable_ones_take_the_full_models_gradient():
  """SGD with lr 1: a trainable parameter moves by exactly its gradient in the unfrozen model
  (jax.grad of the whole loss, the reference); every other parameter keeps its value."""
  model = decoder.DecoderOnlyModel(CONFIG)
  batch = next(inputs.get_batches(TASK, LENGTHS, model.feature_converter(), 8, shuffle=False))
  trainer = trainer_lib.Trainer(model, optax.sgd(1.0), partitioning.Partitioner(),
                                trainable=TOP)
  _, shardings = trainer.abstract_state(8, LENGTHS)
  state = trainer.init_state(8, LENGTHS)
  before = jax.device_get(state["params"])
  device_batch = trainer.partitioner.shard_batch(batch)

  def loss(p):
    rng = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(0), 0), 0)  # step 0, mb 0
    terms = model.loss_terms(p, device_batch, rng)
    return terms["loss_sum"] / terms["weight_sum"]
  reference = jax.device_get(jax.grad(loss)(state["params"]))
  state, metrics = trainer.compile_train_step(shardings)(state, device_batch)
  after = jax.device_get(state["params"])
  flat = jax.tree_util.tree_flatten_with_path(before)[0]
  trained = 0
  for (path, old), new, grad in zip(flat, jax.tree_util.tree_leaves(after),
                                    jax.tree_util.tree_leaves(reference)):
    name = partitioning.path_name(path)
    if any(pattern in name for pattern in TOP):
      trained += 1
      np.testing.assert_allclose(old - new, grad, rtol=1e-4, atol=1e-7, err_msg=name)
    else:
      np.testing.assert_array_equal(new, old, err_msg=name)
  assert 0 < trained < len(flat)
  top_norm = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2))
                           for (path, _), g in zip(flat, jax.tree_util.tree_leaves(reference))
                           if any(p in partitioning.path_name(path) for p in TOP)))
  assert float(metrics["grad_norm"]) == pytest.approx(top_norm, rel=1e-4)


def test_freezing_the_lower_layers_prunes_their_backward_pass():
  """The compiled step's FLOPs: freezing the embedding and layer 0 leaves out their backward."""
  config = dataclasses.replace(CONFIG, num_layers=4)
  model = decoder.DecoderOnlyModel(config)

  def flops(trainable):
    trainer = trainer_lib.Trainer(model, optax.sgd(1.0), partitioning.Partitioner(),
                                  trainable=trainable)
    _, lowered = trainer.lower_train_step(8, LENGTHS)
    return lowered.compile().cost_analysis()["flops"]
  everything, top = flops(None), flops(["layers_3/", "final_norm"])
  assert top < 0.7 * everything


@pytest.mark.parametrize("patterns, message", [
    (["layers_9/"], r"'layers_9/' matches no parameter; the parameters are named like"),
    (["layers_(1/"], r"'layers_\(1/' is not a regular expression"),
])
def test_trainable_patterns_are_checked(patterns, message):
  params = decoder.DecoderOnlyModel(CONFIG).init_params(jax.random.PRNGKey(0), 2, LENGTHS)
  with pytest.raises(ValueError, match=message):
    trainer_lib.trainable_mask(params, patterns)


def test_progress_line_reports_step_pace_and_eta():
  line = train_lib.progress_line(70, 150, 70, 280.0, {"tokens_per_second": 171.6, "loss": 1.2032})
  assert line == ("train step 70/150 (47%), 4.0 s/step, 172 tokens/s, loss 1.203, "
                  "ETA 5.3 min")  # 80 steps left at 4 s
  assert train_lib.progress_line(9, 10, 4, 8.0, {}).endswith("loss nan, ETA 2 s")


def test_a_run_without_a_terminal_logs_progress_lines(tmp_path, monkeypatch, caplog):
  monkeypatch.setattr(train_lib, "PROGRESS_SECONDS", 0.0)
  with caplog.at_level("INFO"):
    run(tmp_path, 3, progress_bar=True)  # pytest's stderr is no terminal: lines, no bar
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("train step")]
  assert [line.split(" (")[0] for line in lines] == [f"train step {i}/3" for i in (1, 2, 3)]
  assert lines[-1].endswith("ETA 0 s")


def test_microbatches_must_divide_batch():
  with pytest.raises(ValueError, match="not divisible by num_microbatches=3"):
    trainer_lib.split_microbatches({"x": jnp.zeros((8, 2))}, 3)


def test_schedules_match_their_formulas():
  warm = optimizers.learning_rate_schedule(1.0, warmup_steps=10, decay="rsqrt")
  assert float(warm(4)) == pytest.approx(0.5)
  assert float(warm(40)) == pytest.approx(math.sqrt(10 / 40))
  cosine = optimizers.learning_rate_schedule(2.0, warmup_steps=0, decay="cosine",
                                             total_steps=100, final_fraction=0.1)
  assert float(cosine(50)) == pytest.approx(2.0 * (0.1 + 0.9 * 0.5))
  assert float(cosine(100)) == pytest.approx(0.2)
  with pytest.raises(ValueError, match="expected one of"):
    optimizers.learning_rate_schedule(decay="linear")


def test_adafactor_trains_and_is_sharded(tmp_path):
  schedule = optimizers.learning_rate_schedule(1e-2)
  trainer = trainer_lib.Trainer(decoder.DecoderOnlyModel(CONFIG),
                                optimizers.adafactor(schedule),
                                partitioning.Partitioner((2, 1, 4)), schedule)
  _, shardings = trainer.abstract_state(8, LENGTHS)
  state, step = trainer.init_state(8, LENGTHS), trainer.compile_train_step(shardings)
  batch = next(inputs.get_batches(TASK, LENGTHS, trainer.model.feature_converter(), 8))
  losses = []
  for _ in range(5):
    state, metrics = step(state, trainer.partitioner.shard_batch(batch))
    losses.append(float(metrics["loss"]))
  assert losses[-1] < losses[0]


def test_nan_stops_the_run_and_keeps_last_good_checkpoint(tmp_path):
  def explodes_at_step_4(step):
    return jnp.where(step >= 4, jnp.nan, 1e-3)
  with pytest.raises(train_lib.NonFiniteLossError, match="step 5.*Last good checkpoint: .*3"):
    run(tmp_path, 10, learning_rate_fn=explodes_at_step_4, checkpoint_every=3)
  checkpointer = manager.Checkpointer(tmp_path / "checkpoints")
  assert checkpointer.all_steps() == [3]
  abstract, _ = trainer_lib.Trainer(decoder.DecoderOnlyModel(CONFIG), optimizers.adamw(1e-3),
                                    partitioning.Partitioner((4, 1, 2))).abstract_state(8, LENGTHS)
  params = checkpointer.restore_params(abstract["params"])
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(params))


@pytest.mark.slow
def test_packed_bf16_training_with_dropout(tmp_path):
  config = decoder.DecoderConfig(vocab_size=259, emb_dim=32, num_layers=2, num_heads=4,
                                 num_kv_heads=2, head_dim=8, mlp_dim=64, dtype="bfloat16",
                                 dropout_rate=0.1)
  model = decoder.DecoderOnlyModel(config)
  lengths = {"inputs": 400, "targets": 4}
  batch = next(inputs.get_batches(TASK, lengths, model.feature_converter(pack=True), 8))
  assert batch["decoder_segment_ids"].max() > 1  # several examples per row
  params = model.init_params(jax.random.PRNGKey(0), 8, lengths)
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))
  assert model.logits(params, batch).dtype == jnp.float32
  deterministic = float(model.loss(params, batch)[0])
  assert deterministic == float(model.loss(params, batch)[0])
  dropped = [float(model.loss(params, batch, jax.random.PRNGKey(i))[0]) for i in range(2)]
  assert dropped[0] != dropped[1] and deterministic not in dropped
  state, metrics = run(tmp_path, 20, model=model, pack=True, checkpoint_every=20,
                       task_feature_lengths=lengths)
  assert metrics["loss"] < 3.0


def test_periodic_eval_counts_a_final_partial_batch():
  """10 validation examples at batch size 8: the eval sums all 10 (reference: one example at
  a time through the model's own loss terms, float64 sums)."""
  import seqio
  import tensorflow as tf
  from flame import partitioning, train as train_lib, trainer as trainer_lib, optimizers
  from flame.autorater import features
  from flame.models import decoder

  pairs = [(f"question {i}: " + "x" * i, f"ans {i % 3}") for i in range(10)]

  def dataset(split, shuffle_files=False, seed=None):
    return tf.data.Dataset.from_tensor_slices({"inputs": [p[0] for p in pairs],
                                               "targets": [p[1] for p in pairs]})
  vocab = seqio.ByteVocabulary()
  name = "test_partial_eval_bytes"
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add(
      name, source=seqio.FunctionDataSource(dataset, splits=("validation",)),
      preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim],
      output_features={k: seqio.Feature(vocab, add_eos=True) for k in ("inputs", "targets")})
  model = decoder.DecoderOnlyModel(decoder.DecoderConfig(vocab_size=259, emb_dim=16,
                                                         num_layers=1, num_heads=2,
                                                         num_kv_heads=1, head_dim=8, mlp_dim=32))
  lengths = {"inputs": 32, "targets": 8}
  partitioner = partitioning.Partitioner()
  # The head at the 8 target positions of each row, against every position row by row.
  trainer = trainer_lib.Trainer(model, optimizers.adamw(learning_rate=1e-3), partitioner,
                                loss_positions=8)
  state = trainer.init_state(8, lengths)
  shardings = trainer.abstract_state(8, lengths)[1]["params"]
  eval_step = train_lib.StepChooser(trainer, lambda t: t.compile_eval_step(shardings))
  got = train_lib.evaluate(model, eval_step, state["params"], partitioner, name, lengths,
                           batch_size=8, split="validation", max_batches=10, pack=False)
  loss_sum = weight_sum = 0.0
  for x, y in pairs:
    feats, _ = features.model_features(model.feature_converter_cls,
                                       [vocab.encode(x) + [1]], [vocab.encode(y) + [1]], 40, 8)
    terms = jax.device_get(model.loss_terms(state["params"], feats))
    loss_sum += float(terms["loss_sum"])
    weight_sum += float(terms["weight_sum"])
  assert got["loss"] == pytest.approx(loss_sum / weight_sum, rel=1e-5)


def test_training_logs_the_autorater_heldout_scores(tmp_path, monkeypatch):
  from flame.autorater import autorater, evaluate
  from flame.data import heldout
  from flame.data.sources import base as source_base
  monkeypatch.setenv(source_base.TFDS_DIR_ENV, str(tmp_path / "tfds"))
  run(tmp_path / "run", 2, eval_every=2, eval_batches=1, autorater_eval_suite="heldout",
      autorater_eval_limit=2, autorater_eval_max_input_length=512)
  logged = plot.read_metrics(str(tmp_path / "run" / "eval" / "metrics.jsonl"))[-1]
  rater = autorater.Autorater.load(str(tmp_path / "run"), max_input_length=512)
  expected = evaluate.evaluate(rater, evaluate.heldout_items(2), True, heldout.CATEGORIES,
                               progress=False)
  assert logged["heldout/overall"] == pytest.approx(expected["overall"], abs=1e-6)
  assert logged["heldout/Chat Hard"] == pytest.approx(expected["categories"]["Chat Hard"])
  assert logged["heldout/swap_consistency"] == pytest.approx(
      expected["swap_consistency_overall"])


def test_unknown_autorater_suite_is_refused_before_anything_is_written(tmp_path):
  with pytest.raises(ValueError, match="autorater_eval_suite='bogus'"):
    run(tmp_path / "run", 1, autorater_eval_suite="bogus")
  assert not (tmp_path / "run").exists()


def test_examples_and_tokens_seen_are_counted_and_survive_a_resume(tmp_path):
  """Packed rows hold several examples: the counts (kept in checkpoint meta) equal a count by
  hand over the same batches, and a run resumed halfway counts what an uninterrupted one does."""
  model = decoder.DecoderOnlyModel(CONFIG)
  lengths = {"inputs": 400, "targets": 4}
  common = dict(model=model, pack=True, task_feature_lengths=lengths, checkpoint_every=3)
  _, whole = run(tmp_path / "whole", 6, **common)
  run(tmp_path / "halves", 3, **common)
  _, resumed = run(tmp_path / "halves", 6, **common)
  examples = tokens = 0
  batches = inputs.get_batches(TASK, lengths, model.feature_converter(pack=True), 8)
  for _, batch in zip(range(6), batches):
    for segments, targets in zip(batch["decoder_segment_ids"], batch["decoder_target_tokens"]):
      examples += len({int(s) for s in segments if s > 0})
      tokens += sum(1 for t in targets if t != 0)
  assert examples > 6 * 8  # packing put several examples in a row
  assert (whole["examples_seen"], whole["tokens_seen"]) == (examples, tokens)
  assert (resumed["examples_seen"], resumed["tokens_seen"]) == (examples, tokens)
  meta = manager.Checkpointer(tmp_path / "halves" / "checkpoints").restore_meta(6)
  assert (meta["examples_seen"], meta["tokens_seen"]) == (examples, tokens)


def test_metrics_hold_each_step_once_after_a_resume(tmp_path):
  """A run killed after step 5 but before its checkpoint (simulated: step 5's checkpoint
  removed, a half-written line appended) replays steps 4-5; its logs keep each step once."""
  import json  # pylint: disable=import-outside-toplevel
  import shutil  # pylint: disable=import-outside-toplevel
  run(tmp_path, 5, checkpoint_every=3, async_checkpoints=False, eval_every=1, eval_batches=1)
  shutil.rmtree(tmp_path / "checkpoints" / "5")
  with open(tmp_path / "train" / "metrics.jsonl", "a") as f:
    f.write('{"step": 6, "lo')
  run(tmp_path, 5, checkpoint_every=3, async_checkpoints=False, eval_every=1, eval_batches=1)
  for name in ("train", "eval"):
    lines = [json.loads(l) for l in open(tmp_path / name / "metrics.jsonl")]
    assert [row["step"] for row in lines] == [1, 2, 3, 4, 5], name


def test_target_positions_are_the_first_k_weighted_positions_of_each_row():
  weights = (np.random.default_rng(0).random((6, 40)) < 0.3).astype(np.int32)
  for k in (1, 5, 40):
    got = np.asarray(base.target_positions(jnp.asarray(weights), k))
    assert got.shape == (6, k)
    for row, picked in zip(weights, got):
      expected = list(np.flatnonzero(row)[:k])
      assert list(picked[:len(expected)]) == expected
      assert not row[picked[len(expected):]].any()  # the fill carries no weight
      assert len(set(picked)) == k


def test_head_at_target_positions_gives_the_loss_and_gradient_of_every_position():
  """Packed rows of real data (several examples each): the head at the k target positions
  of each row against the head at every position."""
  model = decoder.DecoderOnlyModel(CONFIG)
  lengths = {"inputs": 400, "targets": 4}
  batch = next(inputs.get_batches(TASK, lengths, model.feature_converter(pack=True), 4,
                                  shuffle=False))
  most = int(np.count_nonzero(batch["decoder_loss_weights"], axis=-1).max())
  assert batch["decoder_segment_ids"].max() > 1 and most > lengths["targets"]
  params = model.init_params(jax.random.PRNGKey(0), 4, lengths)

  def terms(k):
    def loss(p):
      t = model.loss_terms(p, batch, loss_positions=k)
      return t["loss_sum"], t
    (_, t), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return jax.device_get(t), jax.device_get(grads)

  (full, full_grads), (at_targets, grads) = terms(None), terms(most)
  for name in ("loss_sum", "weight_sum", "correct_sum"):
    assert float(at_targets[name]) == pytest.approx(float(full[name]), rel=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(full_grads), jax.tree_util.tree_leaves(grads)):
    np.testing.assert_allclose(b, a, rtol=2e-4, atol=1e-6)
  too_few, _ = terms(most - 1)  # a row loses a target: the host check must catch this
  assert float(too_few["weight_sum"]) < float(full["weight_sum"])
  trainer = trainer_lib.Trainer(model, optax.sgd(1.0), partitioning.Partitioner(),
                                loss_positions=most)
  assert trainer.fits_loss_positions(batch)
  assert not dataclasses.replace(trainer, loss_positions=most - 1).fits_loss_positions(batch)


@pytest.mark.parametrize("setting", [1, "auto"])
def test_training_with_the_head_at_targets_matches_every_position(tmp_path, setting):
  """Packed batches: rows with more targets than `setting` allows run the every-position step
  (counted), the others the head-at-targets one; the run equals a run at every position."""
  lengths = {"inputs": 400, "targets": 4}
  common = dict(pack=True, task_feature_lengths=lengths, checkpoint_every=3)
  _, reference = run(tmp_path / "every", 3, loss_positions_per_row=None, **common)
  _, got = run(tmp_path / "targets", 3, loss_positions_per_row=setting, **common)
  for name in ("loss", "accuracy", "grad_norm", "param_norm"):
    assert got[name] == pytest.approx(reference[name], rel=1e-4), name


def test_loss_positions_setting_is_checked():
  assert train_lib.resolve_loss_positions("auto", {"inputs": 480, "targets": 32}, False) == 32
  assert train_lib.resolve_loss_positions("auto", {"inputs": 480, "targets": 32}, True) == 64
  assert train_lib.resolve_loss_positions(None, {"inputs": 480, "targets": 32}, False) is None
  with pytest.raises(ValueError, match="train.loss_positions_per_row"):
    train_lib.resolve_loss_positions(0, {"inputs": 480, "targets": 32}, False)
