"""Matrix products with bfloat16 operands and float32 accumulation, fast on XLA:CPU too.

`matmul(a, b)` is a[..., m, k] @ b[..., k, n] (or a @ bᵀ for b[..., n, k] with
`b_transposed`): the operands rounded to bfloat16, the products summed in float32, a float32
result. Its gradients are two more such products, with the cotangent rounded to bfloat16 (as
`torch.autocast` does), each returned in its operand's own dtype: a float32 kernel gets a
float32 gradient (float32 master weights).

Why not `jnp.matmul` on bfloat16 arrays: XLA:CPU computes a bfloat16 × bfloat16 → bfloat16
dot in float32 (converting both operands), and runs bfloat16 kernels (YNNPACK, with
AVX512-BF16 / AMX where the CPU has them) only for bfloat16 × bfloat16 → float32 dots whose
left operand is a plain row-major [..., m, k] matrix. The automatic gradient of such a dot
breaks both rules (a float32 cotangent against bfloat16 operands; a transposed left operand
in the weight gradient), hence the custom VJP here, which has every operand written out
row-major in memory (`_row_major`), a transposed one included. On TPU and GPU the same program is plain bfloat16 matmuls with float32
accumulation, which those compilers run natively.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.layout import Layout, with_layout_constraint

Array = jax.Array


def _dot(a: Array, b: Array, b_transposed: bool) -> Array:
  """a[..., m, k] @ b[..., k, n] (b[..., n, k] if `b_transposed`), bfloat16 in, float32 out."""
  batch = tuple(range(a.ndim - 2))
  contract_b = b.ndim - 1 if b_transposed else b.ndim - 2
  dims = (((a.ndim - 1,), (contract_b,)), (batch, batch))
  a, b = _row_major(a.astype(jnp.bfloat16)), _row_major(b.astype(jnp.bfloat16))
  return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _row_major(a: Array) -> Array:
  """a laid out row-major in memory. XLA makes a transpose (of attention's heads and
  positions, say) a strided view; a dot reading one has no bfloat16 kernel on XLA:CPU."""
  if jax.default_backend() != "cpu" or not isinstance(a, jax.core.Tracer):
    return a  # TPU/GPU dots read any layout natively; an eager array is already row-major.
  return with_layout_constraint(a, Layout(major_to_minor=tuple(range(a.ndim))))


def _left_transposed_dot(a: Array, b: Array) -> Array:
  """aᵀ @ b over the leading (m) dimension: a[..., m, k], b[..., m, n] -> [..., k, n], with aᵀ
  written out in memory. (Computing (bᵀ a)ᵀ instead would transpose fewer elements when
  k > n, but XLA folds that outer transpose back into a dot with a transposed left operand.)"""
  return _dot(jnp.swapaxes(a, -1, -2), b, False)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def matmul(a: Array, b: Array, b_transposed: bool = False) -> Array:
  """a[..., m, k] @ b[..., k, n], or a @ bᵀ for b[..., n, k] when `b_transposed` (a tied
  embedding table, attention keys: read as stored, since a transposed view of them would
  leave the bfloat16 path). bfloat16 products, float32 sums and result."""
  return _dot(a, b, b_transposed)


def _dtype_likes(*arrays: Array) -> tuple[Array, ...]:
  """Zero-size stand-ins that carry the operands' dtypes to a backward pass (each gradient
  is returned in its operand's dtype)."""
  return tuple(jnp.zeros((0,), x.dtype) for x in arrays)


def _matmul_fwd(a, b, b_transposed):
  ab, bb = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
  return _dot(ab, bb, b_transposed), (ab, bb, _dtype_likes(a, b))


def _matmul_bwd(b_transposed, residuals, dy):
  ab, bb, (a_like, b_like) = residuals
  dyb = dy.astype(jnp.bfloat16)
  if b_transposed:  # y = a bᵀ: da = dy b, db = dyᵀ a
    da = _dot(dyb, bb, False)
    db = _left_transposed_dot(dyb, ab)
  else:  # y = a b: da = dy bᵀ, db = aᵀ dy
    da = _dot(dyb, bb, True)
    db = _left_transposed_dot(ab, dyb)
  return da.astype(a_like.dtype), db.astype(b_like.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


# ---------------------------------------------------------------------------------------------
# Attention.

NEG_INF = -1e10


@jax.custom_vjp
def attention(q: Array, k: Array, v: Array, mask) -> Array:
  """softmax(q kᵀ, masked) v for q [b, kv_heads, groups, queries, d], k and v [b, kv_heads,
  keys, d] and a boolean mask broadcastable to [b, kv_heads, groups, queries, keys] (or
  None): both products in bfloat16 with float32 sums, the softmax in float32, a bfloat16
  result. (q carries the 1/√d scale already.)

  Its gradient is written out (as FlashAttention's backward, without the tiling): with P
  the weights and O the output, dV = Pᵀ dO, dS = P ∘ (dO Vᵀ − rowsum(dO ∘ O)), dQ = dS K,
  dK = dSᵀ Q. rowsum(dO ∘ O) is a [queries, d] reduction where the softmax's own gradient
  would reduce over [queries, keys], and masked keys need no pass of their own (P is 0
  there); on XLA:CPU the attention core's elementwise passes cost as much as its products.
  """
  return _attention_fwd(q, k, v, mask)[0]


def _attention_fwd(q, k, v, mask):
  likes = _dtype_likes(q, k, v)
  b, kv, g, lq, d = q.shape
  rows = q.astype(jnp.bfloat16).reshape(b, kv, g * lq, d)  # every (group, query) a row
  logits = _dot(rows, k, True).reshape(b, kv, g, lq, k.shape[2])
  if mask is not None:
    logits = jnp.where(mask, logits, NEG_INF)
  p = jax.nn.softmax(logits, axis=-1).astype(jnp.bfloat16).reshape(b, kv, g * lq, -1)
  out = _dot(p, v, False).astype(jnp.bfloat16)
  residuals = (rows, k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), p, out, likes)
  return out.reshape(q.shape), residuals


def _attention_bwd(residuals, dout):
  q, k, v, p, out, (q_like, k_like, v_like) = residuals
  do = dout.astype(jnp.bfloat16).reshape(out.shape)
  dv = _left_transposed_dot(p, do)
  dp = _dot(do, v, True)
  delta = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
  ds = (p.astype(jnp.float32) * (dp - delta)).astype(jnp.bfloat16)
  dq = _dot(ds, k, False).reshape(dout.shape)
  dk = _left_transposed_dot(ds, q)
  return dq.astype(q_like.dtype), dk.astype(k_like.dtype), dv.astype(v_like.dtype), None


attention.defvjp(_attention_fwd, _attention_bwd)
