"""Mesh construction, logical-axis shardings, and mesh-independence of a train step."""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from flame import inputs, optimizers, partitioning, trainer as trainer_lib
from flame.data import quickstart_tasks  # noqa: F401  (registers the task)
from flame.models import decoder

LENGTHS = {"inputs": 64, "targets": 4}
CONFIG = decoder.DecoderConfig(vocab_size=259, emb_dim=32, num_layers=2, num_heads=4,
                               num_kv_heads=2, head_dim=8, mlp_dim=64)


def make_trainer(mesh_shape, num_microbatches=1, axis_names=("data", "fsdp", "model")):
  model = decoder.DecoderOnlyModel(CONFIG)
  schedule = optimizers.learning_rate_schedule(1e-2)
  return trainer_lib.Trainer(model, optimizers.adamw(schedule), partitioning.Partitioner(
      mesh_shape, axis_names), schedule, num_microbatches, seed=0)


@pytest.fixture(scope="module")
def real_batch():
  model = decoder.DecoderOnlyModel(CONFIG)
  return next(inputs.get_batches("truthfulqa_judge_bytes", LENGTHS, model.feature_converter(),
                                 8, shuffle=False))


def test_make_mesh_absorbs_remaining_devices():
  mesh = partitioning.make_mesh((2, -1), ("data", "model"))
  assert dict(mesh.shape) == {"data": 2, "model": 4}
  with pytest.raises(ValueError, match=r"mesh_shape \(data=2, model=3\) needs 6 devices, "
                     "8 devices available"):
    partitioning.make_mesh((2, 3), ("data", "model"))
  with pytest.raises(ValueError, match=r"mesh_shape \(data=-1, model=3\) cannot cover 8 "
                     r"devices: the fixed dimensions multiply to 3"):
    partitioning.make_mesh((-1, 3), ("data", "model"))
  with pytest.raises(ValueError, match="at most one"):
    partitioning.make_mesh((-1, -1), ("data", "model"))


def test_logical_to_spec_replicates_indivisible_dimensions():
  mesh = partitioning.make_mesh((2, 4), ("data", "model"))
  rules = partitioning.DEFAULT_RULES
  assert partitioning.logical_to_spec(("embed", "heads", "kv"), (32, 8, 8), rules, mesh) == P(
      None, "model", None)
  # 3 KV heads cannot split over 4 model shards: replicated rather than an error.
  assert partitioning.logical_to_spec(("embed", "kv_heads", "kv"), (32, 3, 8), rules, mesh) == P(
      None, None, None)


def test_params_and_batches_carry_expected_shardings(real_batch):
  trainer = make_trainer((2, 1, 4))
  state = trainer.init_state(8, LENGTHS)
  mesh = trainer.partitioner.mesh
  attention = state["params"]["layers_0"]["attention"]
  assert attention["query"].sharding.spec == P(None, "model", None)
  assert attention["out"].sharding.spec == P("model", None, None)
  assert state["params"]["layers_0"]["mlp"]["wi_0"]["kernel"].sharding.spec == P(None, "model")
  assert state["params"]["token_embedder"]["embedding"].sharding.spec == P(None, None)  # 259 % 4
  # Each of 4 model shards holds a quarter of the heads.
  assert attention["query"].addressable_shards[0].data.shape == (32, 1, 8)
  assert attention["query"].sharding.mesh == mesh
  # AdamW moments follow their parameters.
  mu = state["opt_state"][1][0].mu["layers_0"]["attention"]["query"]
  assert mu.sharding.spec == P(None, "model", None)
  batch = trainer.partitioner.shard_batch(real_batch)
  assert batch["decoder_input_tokens"].sharding.spec == P("data", None)
  assert batch["decoder_input_tokens"].addressable_shards[0].data.shape == (4, 68)


def test_fsdp_shards_embed_dimension():
  trainer = make_trainer((1, 8, 1))
  state = trainer.init_state(8, LENGTHS)
  assert state["params"]["layers_0"]["mlp"]["wo"]["kernel"].sharding.spec == P(None, "fsdp")


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 1, 4), (1, 1, 8), (2, 2, 2)])
def test_train_step_is_mesh_independent(mesh_shape, real_batch):
  trainer = make_trainer(mesh_shape)
  _, shardings = trainer.abstract_state(8, LENGTHS)
  state = trainer.init_state(8, LENGTHS)
  step = trainer.compile_train_step(shardings)
  losses = []
  for _ in range(3):
    state, metrics = step(state, trainer.partitioner.shard_batch(real_batch))
    losses.append(float(metrics["loss"]))
  np.testing.assert_allclose(losses, _reference_losses(real_batch), rtol=2e-5)


_REFERENCE = {}


def _reference_losses(real_batch):
  """The same three steps on a single device (no mesh partitioning at all)."""
  if "losses" not in _REFERENCE:
    trainer = trainer_lib.Trainer(
        decoder.DecoderOnlyModel(CONFIG), optimizers.adamw(optimizers.learning_rate_schedule(1e-2)),
        partitioning.Partitioner((1, 1, 1), devices=jax.devices()[:1]), None, 1, seed=0)
    _, shardings = trainer.abstract_state(8, LENGTHS)
    state, step = trainer.init_state(8, LENGTHS), trainer.compile_train_step(shardings)
    losses = []
    for _ in range(3):
      state, metrics = step(state, trainer.partitioner.shard_batch(real_batch))
      losses.append(float(metrics["loss"]))
    _REFERENCE["losses"] = losses
  return _REFERENCE["losses"]


def test_a_mesh_that_does_not_divide_a_multi_process_job_names_the_processes():
  class Device:  # what the message reads of another process's device: its process index
    def __init__(self, process_index):
      self.process_index = process_index
  devices = [Device(p) for p in (0, 0, 1, 1)]
  with pytest.raises(ValueError, match=r"mesh_shape \(data=1, fsdp=-1, model=3\) cannot cover "
                     r"4 devices \(2 processes × 2\)"):
    partitioning.make_mesh((1, -1, 3), ("data", "fsdp", "model"), devices)


def _fsdp_step_temporaries(monkeypatch, constrained: bool) -> int:
  """Bytes of temporaries per device of an FSDP train step over the 8 CPU devices."""
  from flame.models import layers
  import contextlib
  if not constrained:
    monkeypatch.setattr(layers, "activation_sharding", lambda sharding: contextlib.nullcontext())
  config = decoder.DecoderConfig(vocab_size=259, emb_dim=256, num_layers=2, num_heads=4,
                                 num_kv_heads=2, head_dim=64, mlp_dim=512, scan_layers=True)
  trainer = trainer_lib.Trainer(decoder.DecoderOnlyModel(config), optimizers.adamw(1e-3),
                                partitioning.Partitioner((1, -1, 1)), lambda step: 1e-3)
  _, lowered = trainer.lower_train_step(16, {"inputs": 248, "targets": 8})
  return lowered.compile().memory_analysis().temp_size_in_bytes


def test_fsdp_keeps_activations_split_by_batch(monkeypatch):
  """With weights split on `embed` over fsdp, each device must hold its own rows'
  activations only; unconstrained, GSPMD follows the weights and gathers every row."""
  constrained = _fsdp_step_temporaries(monkeypatch, True)
  unconstrained = _fsdp_step_temporaries(monkeypatch, False)
  assert constrained * 2 < unconstrained, (constrained, unconstrained)
