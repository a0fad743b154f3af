"""flame.models.mixed: bfloat16 products summed in float32, checked against NumPy float64 on
the same bfloat16-rounded operands, gradients included, and the compiled CPU program's dots all
bfloat16 × bfloat16 → float32 (the only form XLA:CPU runs with bfloat16 kernels)."""
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from flame.models import base, decoder, mixed

CASES = [  # a shape, b shape, b_transposed
    ((37, 24), (24, 50), False),
    ((37, 24), (50, 24), True),  # a tied embedding table [vocab, embed]
    ((2, 3, 40, 16), (2, 3, 16, 24), False),  # attention weights @ values
    ((2, 3, 40, 16), (2, 3, 24, 16), True),  # queries @ keysᵀ
]


def _bf16(x: np.ndarray) -> np.ndarray:
  """x rounded to bfloat16, as float64."""
  return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)


def _reference(a, b, dy, b_transposed):
  """y = a b (or a bᵀ) and the gradients, in float64 from bfloat16-rounded a, b and dy."""
  a64, b64, dy64 = _bf16(a), _bf16(b), _bf16(dy)
  bm = np.swapaxes(b64, -1, -2) if b_transposed else b64  # [..., k, n]
  y = a64 @ bm
  da = dy64 @ np.swapaxes(bm, -1, -2)
  dbm = np.swapaxes(a64, -1, -2) @ dy64
  return y, da, (np.swapaxes(dbm, -1, -2) if b_transposed else dbm)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("a_shape, b_shape, b_transposed", CASES)
def test_values_and_gradients_match_float64_on_bfloat16_operands(a_shape, b_shape, b_transposed,
                                                                  jit):
  rng = np.random.default_rng(len(a_shape) + 2 * b_transposed)
  a = rng.normal(size=a_shape).astype(np.float32)
  b = rng.normal(size=b_shape).astype(np.float32)
  n = b_shape[-2] if b_transposed else b_shape[-1]
  dy = rng.normal(size=(*a_shape[:-1], n)).astype(np.float32)
  y_ref, da_ref, db_ref = _reference(a, b, dy, b_transposed)

  def run(a, b):
    y, pullback = jax.vjp(lambda a, b: mixed.matmul(a, b, b_transposed), a, b)
    return (y, *pullback(jnp.asarray(dy)))

  y, da, db = (jax.jit(run) if jit else run)(a, b)
  for got, want in ((y, y_ref), (da, da_ref), (db, db_ref)):
    assert got.dtype == jnp.float32 and got.shape == want.shape
    # float32 sums of exact bfloat16 products: float32 rounding only, far below bf16's 4e-3
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=2e-5 * np.abs(want).max())
  # and not the float32 product: the operands really are rounded
  assert np.abs(np.asarray(y) - a.astype(np.float64) @ (
      np.swapaxes(b, -1, -2) if b_transposed else b)).max() > 1e-4


def test_gradients_come_back_in_each_operands_dtype():
  a = jnp.ones((8, 16), jnp.bfloat16)
  w = jnp.ones((16, 4), jnp.float32)  # float32 master weights
  da, dw = jax.grad(lambda a, w: mixed.matmul(a, w).sum(), (0, 1))(a, w)
  assert da.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(dw), np.full((16, 4), 8.0))


def _dot_operand_types(hlo: str) -> list[tuple[str, str]]:
  """(lhs, rhs) element types of every dot in a compiled module's text."""
  types = {}
  for name, ty in re.findall(r"%([\w.\-]+)(?: =|:) (\w+)\[", hlo):
    types.setdefault(name, ty)
  return [(types.get(lhs, "?"), types.get(rhs, "?"))
          for lhs, rhs in re.findall(r" dot\(%([\w.\-]+), %([\w.\-]+)\)", hlo)]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's bfloat16 dot path")
def test_a_bfloat16_decoder_training_step_runs_every_dot_in_bfloat16():
  """The forward, both gradients of every projection, attention and the tied head: no dot
  falls back to float32 (XLA:CPU converts a dot it has no bfloat16 kernel for)."""
  config = base.with_compute_dtype(decoder.DecoderConfig(
      vocab_size=300, emb_dim=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
      mlp_dim=128, attention_block=16), "bfloat16")
  module = decoder.DecoderOnlyModel(config).module
  ids = jnp.asarray(np.random.default_rng(0).integers(1, 300, (2, 48)))
  params = module.init(jax.random.PRNGKey(0), ids)["params"]

  def loss(params):
    return jnp.mean(jax.nn.log_softmax(module.apply({"params": params}, ids))[..., 0])

  hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
  dots = _dot_operand_types(hlo)
  assert len(dots) >= 2 * 3 * 7  # layers × (forward, two gradients) × projections
  assert set(dots) == {("bf16", "bf16")}, sorted(set(dots))


def test_bfloat16_decoder_gradients_follow_float32():
  """The custom gradients wired through the decoder: every parameter's bf16 gradient points
  where the float32 one does."""
  base_config = decoder.DecoderConfig(vocab_size=300, emb_dim=64, num_layers=2, num_heads=4,
                                      num_kv_heads=2, head_dim=16, mlp_dim=128,
                                      attention_block=16)
  ids = jnp.asarray(np.random.default_rng(1).integers(1, 300, (2, 48)))
  params = decoder.DecoderOnlyModel(base_config).module.init(jax.random.PRNGKey(0), ids)["params"]
  grads = {}
  for dtype in ("float32", "bfloat16"):
    module = decoder.DecoderOnlyModel(base.with_compute_dtype(base_config, dtype)).module

    def loss(params, module=module):
      log_p = jax.nn.log_softmax(module.apply({"params": params}, ids[:, :-1]))
      return -jnp.mean(jnp.take_along_axis(log_p, ids[:, 1:, None], axis=-1))

    grads[dtype] = jax.grad(loss)(params)
  flat32 = jax.tree_util.tree_leaves_with_path(grads["float32"])
  flat16 = jax.tree_util.tree_leaves(grads["bfloat16"])
  for (path, g32), g16 in zip(flat32, flat16):
    assert g16.dtype == jnp.float32, path
    g32, g16 = np.asarray(g32).ravel(), np.asarray(g16).ravel()
    cosine = g32 @ g16 / (np.linalg.norm(g32) * np.linalg.norm(g16))
    assert cosine > 0.99, (jax.tree_util.keystr(path), cosine)


def _attention_reference(q, k, v, mask, dout):
  """Attention and its gradients in float64 on bfloat16-rounded inputs, through the softmax's
  own Jacobian (dS = P ∘ (dP − rowsum(P ∘ dP))), not the output-based shortcut under test."""
  q, k, v, dout = _bf16(q), _bf16(k), _bf16(v), _bf16(dout)
  scores = np.einsum("bkgqd,bkld->bkgql", q, k)
  scores = np.where(mask, scores, -1e10)
  p = np.exp(scores - scores.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  out = np.einsum("bkgql,bkld->bkgqd", p, v)
  dp = np.einsum("bkgqd,bkld->bkgql", dout, v)
  ds = p * (dp - (p * dp).sum(-1, keepdims=True))
  return (out, np.einsum("bkgql,bkld->bkgqd", ds, k), np.einsum("bkgql,bkgqd->bkld", ds, q),
          np.einsum("bkgql,bkgqd->bkld", p, dout))


@pytest.mark.parametrize("with_mask", [False, True])
def test_attention_and_its_gradients_match_float64(with_mask):
  rng = np.random.default_rng(3 + with_mask)
  b, kv, groups, queries, keys, d = 2, 3, 2, 24, 24, 16
  q = rng.normal(size=(b, kv, groups, queries, d)).astype(np.float32)
  k, v = (rng.normal(size=(b, kv, keys, d)).astype(np.float32) for _ in range(2))
  dout = rng.normal(size=q.shape).astype(np.float32)
  mask = np.ones((b, 1, 1, queries, keys), bool)
  if with_mask:  # causal; the last 5 keys of row 0 padding; row 1's last 3 queries see nothing
    mask = np.tril(np.ones((queries, keys), bool))[None, None, None].repeat(b, 0)
    mask[0, ..., keys - 5:] = False
    mask[1, ..., queries - 3:, :] = False
  wants = _attention_reference(q, k, v, mask, dout)

  def run(q, k, v):
    out, pullback = jax.vjp(lambda q, k, v: mixed.attention(q, k, v, jnp.asarray(mask)), q, k, v)
    return (out, *pullback(jnp.asarray(dout, jnp.bfloat16)))

  gots = jax.jit(run)(*(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32) for x in (q, k, v)))
  assert gots[0].dtype == jnp.bfloat16 and all(g.dtype == jnp.float32 for g in gots[1:])
  for name, got, want in zip(("out", "dq", "dk", "dv"), gots, wants):
    got = np.asarray(got, np.float64)
    # bfloat16 weights, cotangents and result: a few bfloat16 roundings of the largest entry
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-2 * np.abs(want).max(), err_msg=name)
    cosine = (got * want).sum() / (np.linalg.norm(got) * np.linalg.norm(want))
    assert cosine > 0.9999, (name, cosine)
