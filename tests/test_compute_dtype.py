"""bfloat16 compute as an option: float32 parameters whichever dtype computes, checkpoints that
cross between the two, bf16 numerics against float32, and --dtype refused when it is anything
else."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flame import gin_utils, optimizers, partitioning, train as train_lib
from flame.autorater import autorater, evaluate as evaluate_lib, rate
from flame.data import quickstart_tasks  # noqa: F401  (registers the task)
from flame.models import base, decoder
from flame.pipeline import pipeline
from flame.tailpatch import run as tailpatch_run

CONFIG = decoder.DecoderConfig(vocab_size=259, emb_dim=32, num_layers=2, num_heads=4,
                               num_kv_heads=2, head_dim=8, mlp_dim=64)


def _train(model_dir, dtype):
  config = base.with_compute_dtype(CONFIG, dtype)
  train_lib.train(model_dir=str(model_dir), model=decoder.DecoderOnlyModel(config),
                  mixture_or_task_name="truthfulqa_judge_bytes",
                  task_feature_lengths={"inputs": 256, "targets": 8}, train_steps=4,
                  batch_size=8, learning_rate_fn=optimizers.learning_rate_schedule(3e-3),
                  partitioner=partitioning.Partitioner((4, 1, 2)), checkpoint_every=4,
                  async_checkpoints=False, progress_bar=False)
  return str(model_dir)


@pytest.mark.parametrize("trained, evaluated", [("bfloat16", "float32"),
                                                ("float32", "bfloat16")])
def test_a_checkpoint_of_one_compute_dtype_judges_in_the_other(tmp_path, trained, evaluated):
  model_dir = _train(tmp_path / trained, trained)
  items = evaluate_lib.heldout_items(2)[:6]
  own = autorater.Autorater.load(model_dir, max_input_length=256)
  other = autorater.Autorater.load(model_dir, dtype=evaluated, max_input_length=256)
  assert own.model.config.dtype == trained  # default: the checkpoint's own
  assert other.model.config.dtype == evaluated
  for rater in (own, other):
    assert {x.dtype for x in jax.tree_util.tree_leaves(rater.params)} == {jnp.dtype("float32")}
  p_own = [v.probabilities for v in own.judge([i.request for i in items], swap=True)]
  p_other = [v.probabilities for v in other.judge([i.request for i in items], swap=True)]
  for a, b in zip(p_own, p_other):  # bf16 rounding of the same parameters: close, not equal
    assert a.keys() == b.keys()
    assert max(abs(a[k] - b[k]) for k in a) < 0.05


def test_bfloat16_logits_follow_float32_within_bf16_rounding():
  """Random parameters and ids: the bf16 forward against the float32 one (itself checked
  against transformers in test_decoder), and the loss path stays float32."""
  ids = np.random.default_rng(0).integers(1, 259, (2, 24))
  params = decoder.DecoderOnlyModel(CONFIG).init_params(jax.random.PRNGKey(1), 2,
                                                        {"inputs": 16, "targets": 8})
  logits = {}
  for dtype in base.COMPUTE_DTYPES:
    model = decoder.DecoderOnlyModel(base.with_compute_dtype(CONFIG, dtype))
    logits[dtype] = model.module.apply({"params": params}, jnp.asarray(ids))
    assert logits[dtype].dtype == jnp.float32
  scale = float(np.abs(logits["float32"]).max())
  diff = np.abs(np.asarray(logits["bfloat16"]) - np.asarray(logits["float32"]))
  assert 0 < diff.max() < 0.05 * scale  # bf16 keeps 8 bits of mantissa
  log_p = {d: jax.nn.log_softmax(v, axis=-1) for d, v in logits.items()}
  assert np.corrcoef(np.asarray(log_p["float32"]).ravel(),
                     np.asarray(log_p["bfloat16"]).ravel())[0, 1] > 0.999


def test_with_compute_dtype_keeps_float32_parameters():
  config = base.with_compute_dtype(CONFIG, "bfloat16")
  assert config.dtype == "bfloat16" and config.param_dtype == "float32"
  assert base.with_compute_dtype(CONFIG, None) is CONFIG
  params = decoder.DecoderOnlyModel(config).init_params(jax.random.PRNGKey(0), 1,
                                                        {"inputs": 4, "targets": 4})
  assert {x.dtype for x in jax.tree_util.tree_leaves(params)} == {jnp.dtype("float32")}


@pytest.mark.parametrize("main, flags", [
    (rate.main, ["--checkpoint=CKPT", "--input=IN", "--output=OUT"]),
    (evaluate_lib.main, ["--checkpoint=CKPT", "--suite=heldout"]),
    (tailpatch_run.main, ["--init=CKPT", "--out_dir=OUT", "--all"]),
])
def test_dtype_flag_refuses_anything_else_before_any_work(tmp_path, capsys, main, flags):
  flags = [f.replace("OUT", str(tmp_path / "out")).replace("IN", str(tmp_path / "in.jsonl"))
           for f in flags]
  with pytest.raises(SystemExit) as exit_info:
    main(flags + ["--dtype=float16"])
  assert exit_info.value.code == 2
  assert "argument --dtype: invalid choice: 'float16'" in capsys.readouterr().err
  assert os.listdir(tmp_path) == []


def test_dtype_settings_refuse_anything_else():
  with pytest.raises(ValueError, match=r"dtype 'fp16': expected one of \['float32', 'bfloat16'\]"):
    base.with_compute_dtype(CONFIG, "fp16")
  with pytest.raises(ValueError, match="dtype 'fp16'"):
    gin_utils.compute_dtype_bindings("fp16")
  with pytest.raises(ValueError, match="PipelineSettings.dtype='half'"):
    pipeline.PipelineSettings(tasks=["a"], experts={}, categories={}, dtype="half")
  with pytest.raises(ValueError, match="Settings.dtype='half'"):
    tailpatch_run.Settings(mixture="m", dtype="half")
  assert gin_utils.compute_dtype_bindings(None) == []
  assert gin_utils.compute_dtype_bindings("bfloat16") == [
      "flame.models.decoder.DecoderConfig.dtype = 'bfloat16'",
      "flame.models.t5.T5Config.dtype = 'bfloat16'"]
