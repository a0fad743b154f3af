"""Paired batches (both orders of a pair in adjacent rows) and the position-bias penalty.

Real data: PandaLM's pairwise task (with ties) and TruthfulQA (classification, refused),
prepared from the mirror into a temporary FLAME_TFDS_DIR; the penalty is checked against
NumPy float64 on random logits and through a real tiny decoder."""
import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio

from flame import optimizers, partitioning, plot, train as train_lib, trainer as trainer_lib
from flame.data import pairs
from flame.data import tasks as flame_tasks
from flame.models import base, decoder

PANDALM = "pandalm_preference"
TRUTHFUL = "truthfulqa_truthfulness"
LENGTHS = {"inputs": 768, "targets": 32}
BYTES = seqio.ByteVocabulary()
CONVERTER = seqio.PrefixLMFeatureConverter(pack=False)
TINY = decoder.DecoderConfig(vocab_size=259, emb_dim=32, num_layers=2, num_heads=4,
                             num_kv_heads=2, head_dim=8, mlp_dim=64)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, prepared_data_dir):
  with prepared_data_dir(str(tmp_path_factory.mktemp("flame_tfds")), (PANDALM, TRUTHFUL)) as path:
    yield path


def name(task):
  return flame_tasks.seqio_task_name(task, "bytes")


def batches(count, **kwargs):
  stream = pairs.paired_batches(name(PANDALM), LENGTHS, CONVERTER, 8, **kwargs)
  return [next(stream) for _ in range(count)]


def verdict(row_targets, position):
  return BYTES.decode([int(row_targets[position])])


def test_rows_hold_each_pair_in_both_orders(data_dir):
  labels = collections.Counter()
  for batch in batches(12):
    width = batch["decoder_target_tokens"].shape[1]
    assert width in pairs.features.bucket_lengths(sum(LENGTHS.values()), per_octave=2)
    longest = int(np.count_nonzero(batch["decoder_target_tokens"], axis=1).max())
    assert longest <= width < 2 * longest + 16  # padded to a bucket, not to the full length
    for i in range(0, 8, 2):
      first, second = (batch["decoder_target_tokens"][i + k] for k in (0, 1))
      weights = batch["decoder_loss_weights"][i:i + 2]
      # The same input text in another order: the same tokens, not the same sequence.
      inputs = [row[(row > 0) & (w == 0)] for row, w in zip((first, second), weights)]
      assert sorted(inputs[0]) == sorted(inputs[1])
      assert not np.array_equal(*inputs)
      # The verdict position holds the verdict, right after "answer: ".
      got = [verdict(batch["decoder_target_tokens"][i + k],
                     batch["pair_verdict_position"][i + k, 0]) for k in (0, 1)]
      assert got in (["A", "B"], ["B", "A"], ["T", "T"])  # a tie is a tie in both orders
      labels[got[0]] += 1
      for k in (0, 1):
        target = batch["decoder_target_tokens"][i + k][weights[k] > 0]
        assert BYTES.decode(target.tolist()).startswith("EVALUATION:\nanswer: ")
      assert batch["pair_label_tokens"][i].tolist() == [BYTES.encode("A")[0], BYTES.encode("B")[0]]
  assert labels["A"] and labels["B"] and labels["T"]  # 48 PandaLM pairs hold all three


def test_same_seed_same_batches_and_a_resume_skips_what_was_consumed(data_dir):
  first, again, later = batches(5, seed=3), batches(5, seed=3), batches(2, seed=3, skip_batches=3)
  other = batches(5, seed=4)
  for a, b in zip(first, again):
    assert all(np.array_equal(a[k], b[k]) for k in a)
  for a, b in zip(first[3:], later):
    assert all(np.array_equal(a[k], b[k]) for k in a)
  def rows(stream):
    return {row[row > 0].tobytes() for batch in stream for row in batch["decoder_target_tokens"]}
  assert rows(first) != rows(other)  # another seed draws other pairs


def test_every_pair_is_drawn_once_per_pass(data_dir):
  sizes, picks = [5, 3], []
  schedule = pairs.pair_schedule(sizes, [5.0, 3.0], 4, np.random.default_rng(0))
  for _ in range(40):
    picks += next(schedule)
  counts = collections.Counter(picks)
  assert set(counts) == {(t, p) for t, size in enumerate(sizes) for p in range(size)}
  share = sum(1 for t, _ in picks if t == 0) / len(picks)
  assert 0.5 < share < 0.75  # rates 5:3 -> 0.625
  # One task: every pass is a permutation of its pairs, each pass in another order.
  single = pairs.pair_schedule([5], [1.0], 5, np.random.default_rng(1))
  passes = [next(single) for _ in range(4)]
  assert all(sorted(p for _, p in batch) == list(range(5)) for batch in passes)
  assert len({tuple(batch) for batch in passes}) > 1


def test_bad_inputs_are_named(data_dir):
  with pytest.raises(ValueError, match="must be even"):
    next(pairs.paired_batches(name(PANDALM), LENGTHS, CONVERTER, 7))
  with pytest.raises(ValueError, match=f"{name(TRUTHFUL)}.*classification.*only pairwise"):
    next(pairs.paired_batches(name(TRUTHFUL), LENGTHS, CONVERTER, 8))
  targets = np.array([[5, 6, 7, 1, 0]])
  with pytest.raises(ValueError, match="example 'x/1': no verdict token at target position 1"):
    pairs.verdict_positions(targets, (targets > 0).astype(int), 1, (8, 9), "t", ["x/1"])


def reference_terms(logits, verdict_at, label_tokens, weight, weight_sum):
  """NumPy float64: per row m = log p(A) - log p(B) at its verdict position; per pair b."""
  x = np.asarray(logits, np.float64)
  x = x - x.max(axis=-1, keepdims=True)
  log_probs = x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
  rows = np.arange(len(x))
  at = log_probs[rows, verdict_at]
  m = at[rows, label_tokens[:, 0]] - at[rows, label_tokens[:, 1]]
  m = m.reshape(-1, 2)
  b = (m[:, 0] + m[:, 1]) / 2
  return {"penalty_sum": weight * np.mean(b ** 2) * weight_sum, "pairs": len(b),
          "pair_bias_sq_sum": np.sum(b ** 2),
          "pair_consistent_sum": np.sum(m[:, 0] * m[:, 1] < 0)}


def test_penalty_matches_numpy_with_and_without_the_head_at_targets():
  rng = np.random.default_rng(0)
  rows, length, vocab = 6, 10, 12
  logits = rng.normal(0, 3, (rows, length, vocab)).astype(np.float32)
  verdict_at = rng.integers(2, length, rows)
  label_tokens = np.tile([3, 7], (rows, 1))
  batch = {"pair_verdict_position": jnp.asarray(verdict_at[:, None], jnp.int32),
           "pair_label_tokens": jnp.asarray(label_tokens, jnp.int32)}
  want = reference_terms(logits, verdict_at, label_tokens, 0.3, 50.0)
  got = base.pair_bias_terms(jnp.asarray(logits), None, batch, 0.3, jnp.float32(50.0))
  for key, value in want.items():
    np.testing.assert_allclose(float(got[key]), value, rtol=1e-5)
  # Head at targets: logits only at k positions per row, the verdict among them.
  positions = np.stack([np.sort(rng.choice(np.setdiff1d(np.arange(length), [v]), 3,
                                           replace=False).tolist() + [v]) for v in verdict_at])
  picked = np.take_along_axis(logits, positions[:, :, None], axis=1)
  got = base.pair_bias_terms(jnp.asarray(picked), jnp.asarray(positions), batch, 0.3,
                             jnp.float32(50.0))
  for key, value in want.items():
    np.testing.assert_allclose(float(got[key]), value, rtol=1e-5)
  with pytest.raises(ValueError, match="pair_orders"):
    base.pair_bias_terms(jnp.asarray(logits), None, {}, 0.3, jnp.float32(1.0))


def test_loss_terms_of_a_real_decoder_add_the_penalty_to_the_cross_entropy(data_dir):
  model = decoder.DecoderOnlyModel(TINY)
  batch = batches(1)[0]
  params = model.init_params(jax.random.PRNGKey(1), 8, LENGTHS)
  device_batch = {k: jnp.asarray(v) for k, v in batch.items()}
  plain = model.loss_terms(params, device_batch, loss_positions=32)
  penalised = model.loss_terms(params, device_batch, loss_positions=32, pair_bias_weight=0.5)
  assert float(penalised["loss_sum"]) == pytest.approx(float(plain["loss_sum"]), rel=1e-6)
  logits = np.asarray(model.logits(params, device_batch))  # every position
  want = reference_terms(logits, batch["pair_verdict_position"][:, 0],
                         batch["pair_label_tokens"], 0.5, float(plain["weight_sum"]))
  for key, value in want.items():
    np.testing.assert_allclose(float(penalised[key]), value, rtol=1e-4, atol=1e-6)


def test_training_on_pairs_logs_the_bias_and_lowers_it(data_dir, tmp_path):
  def run(path, weight):
    return train_lib.train(
        model_dir=str(path), model=decoder.DecoderOnlyModel(TINY),
        mixture_or_task_name=name(PANDALM), task_feature_lengths=LENGTHS, train_steps=30,
        batch_size=8, learning_rate_fn=optimizers.learning_rate_schedule(3e-3),
        partitioner=partitioning.Partitioner((4, 1, 2)), checkpoint_every=30, log_every=1,
        progress_bar=False, pair_orders=True, pair_bias_weight=weight)
  run(tmp_path / "free", 0.0)
  run(tmp_path / "penalised", 10.0)
  free = plot.read_metrics(str(tmp_path / "free" / "train" / "metrics.jsonl"))
  penalised = plot.read_metrics(str(tmp_path / "penalised" / "train" / "metrics.jsonl"))
  assert 0 <= penalised[-1]["pair_swap_consistency"] <= 1
  # Same data, same start: the penalised run ends with the smaller position bias.
  def late(rows):
    return np.mean([row["pair_bias_rms"] for row in rows[-10:]])
  assert late(penalised) < 0.5 * late(free)


def test_settings_that_cannot_pair_are_refused(data_dir, tmp_path):
  model = decoder.DecoderOnlyModel(TINY)
  with pytest.raises(ValueError, match="num_microbatches"):
    trainer_lib.Trainer(model, optimizers.adamw(1e-3), partitioning.Partitioner((4, 1, 2)),
                        num_microbatches=2, pair_bias_weight=0.1)
  common = dict(model=model, mixture_or_task_name=name(PANDALM), task_feature_lengths=LENGTHS,
                train_steps=1, batch_size=8,
                learning_rate_fn=optimizers.learning_rate_schedule(1e-3),
                partitioner=partitioning.Partitioner((4, 1, 2)), progress_bar=False)
  with pytest.raises(ValueError, match="needs train.pair_orders"):
    train_lib.train(model_dir=str(tmp_path / "a"), pair_bias_weight=0.1, **common)
  with pytest.raises(ValueError, match="train.pack = False"):
    train_lib.train(model_dir=str(tmp_path / "b"), pair_orders=True, pack=True, **common)
  with pytest.raises(ValueError, match="num_microbatches = 2"):  # w = 0 pairs split as well
    train_lib.train(model_dir=str(tmp_path / "c"), pair_orders=True, num_microbatches=2,
                    **common)
