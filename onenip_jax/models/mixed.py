"""Matmuls with low-precision operands and float32 results, forward and backward.

`matmul_dtype` float32 is the plain float32 dot. bfloat16 rounds both operands to bfloat16 and
accumulates in float32 (`preferred_element_type`), in the forward pass and in both dots of the
backward pass (the float32 cotangent is rounded to bfloat16 too). JAX's own transpose of such a dot
multiplies a float32 cotangent by a bfloat16 operand, which XLA runs as a float32 dot; the custom VJP
here keeps all three dots at bfloat16 speed. Everything outside the dots (activations, softmax,
LayerNorm, losses) stays in the caller's dtype.

On CPU, XLA's own dots compute bfloat16 operands in float32 (converts plus a float32 matmul): the
bfloat16 dots pay only in YNNPACK (`compile_options.compiler_options(library_dots=True)`, which
`training.step.jit_train_step` sets with bfloat16 matmuls). GPUs and TPUs run them natively.
"""
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

Dtype = Any


def resolve_dtype(name: Any) -> jnp.dtype:
  """A dtype from a config value: 'auto' is bfloat16 on GPU/TPU and float32 on CPU."""
  if isinstance(name, str) and name == "auto":
    return jnp.dtype(jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else jnp.float32)
  return jnp.dtype(name)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def _einsum_lowp(spec: str, a: jax.Array, b: jax.Array, dtype: Dtype) -> jax.Array:
  return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


def _einsum_lowp_fwd(spec, a, b, dtype):
  a_l, b_l = a.astype(dtype), b.astype(dtype)
  out = jnp.einsum(spec, a_l, b_l, preferred_element_type=jnp.float32)
  return out, (a_l, b_l, jnp.zeros((), a.dtype), jnp.zeros((), b.dtype))


def _batched_matmul(spec: str, x: jax.Array, y: jax.Array) -> jax.Array:
  """`jnp.einsum(spec, x, y)` with float32 results, as one (batch, M, K) x (batch, K, N) product.

  The attention's backward products contract a non-minor axis of both operands (the query axis of
  the probabilities and of the output's cotangent). Left as einsums, XLA:CPU keeps them as strided
  batched dots, which YNNPACK does not take and XLA's own CPU dot cannot run with bfloat16 operands
  and a float32 result. Transposed into this form first, they run in YNNPACK.
  """
  ins, out = spec.split("->")
  sx, sy = ins.split(",")
  batch = [c for c in out if c in sx and c in sy]
  m = [c for c in sx if c in out and c not in batch]
  n = [c for c in sy if c in out and c not in batch]
  k = [c for c in sx if c in sy and c not in out]
  size = {**dict(zip(sx, x.shape)), **dict(zip(sy, y.shape))}
  prod = lambda cs: math.prod(size[c] for c in cs)

  def arrange(a, sa, order):
    perm = [sa.index(c) for c in order]
    if perm != sorted(perm):
      a = jnp.transpose(a, perm)
    return a

  x3 = arrange(x, sx, batch + m + k).reshape(prod(batch), prod(m), prod(k))
  y3 = arrange(y, sy, batch + k + n).reshape(prod(batch), prod(k), prod(n))
  z = jax.lax.dot_general(x3, y3, (((2,), (1,)), ((0,), (0,))), preferred_element_type=jnp.float32)
  z_spec = "".join(batch + m + n)
  return jnp.einsum(f"{z_spec}->{out}", z.reshape([size[c] for c in z_spec]))


def _einsum_lowp_bwd(spec, dtype, res, ct):
  a_l, b_l, a_proto, b_proto = res
  ins, out = spec.split("->")
  sa, sb = ins.split(",")
  ct_l = ct.astype(dtype)
  batched = any(c in sa and c in sb for c in out)
  if batched and jax.default_backend() == "cpu":
    product = _batched_matmul
  else:
    product = functools.partial(jnp.einsum, preferred_element_type=jnp.float32)
  da = product(f"{out},{sb}->{sa}", ct_l, b_l)
  db = product(f"{sa},{out}->{sb}", a_l, ct_l)
  return da.astype(a_proto.dtype), db.astype(b_proto.dtype)


_einsum_lowp.defvjp(_einsum_lowp_fwd, _einsum_lowp_bwd)


def einsum(spec: str, a: jax.Array, b: jax.Array, matmul_dtype: Dtype = jnp.float32) -> jax.Array:
  """jnp.einsum of two operands with `matmul_dtype` operands.

  float32: exactly `jnp.einsum(spec, a, b)`. Otherwise operands in `matmul_dtype`, float32 result.
  `spec` is explicit ('ab,bc->ac'), without '...', and every index of each operand also appears in
  the other operand or in the output (true of matmul-like contractions), so that both gradients
  are einsums of the same kind.
  """
  if jnp.dtype(matmul_dtype) == jnp.float32:
    return jnp.einsum(spec, a, b)
  return _einsum_lowp(spec, a, b, jnp.dtype(matmul_dtype))


def dot_general(matmul_dtype: Dtype):
  """A `dot_general` for `flax.linen.Dense`/`DenseGeneral`-style calls (contract the last axis of
  the input with the first of the kernel, no batch axes) with `matmul_dtype` operands; None (Flax's
  default `lax.dot_general`) for float32."""
  if jnp.dtype(matmul_dtype) == jnp.float32:
    return None

  def dg(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **_):
    del precision, preferred_element_type
    (lc, rc), (lb, rb) = dimension_numbers
    if lb or rb or tuple(lc) != (lhs.ndim - 1,) or tuple(rc) != (0,):
      raise NotImplementedError(f"mixed-precision dot_general {dimension_numbers}")
    x = lhs.reshape(-1, lhs.shape[-1])
    w = rhs.reshape(rhs.shape[0], -1)
    y = _einsum_lowp("nk,km->nm", x, w, jnp.dtype(matmul_dtype))
    return y.reshape(lhs.shape[:-1] + rhs.shape[1:]).astype(jnp.result_type(lhs, rhs))

  return dg
