"""Dropout and Gaussian noise: `jax.random`, with threefry unrolled on XLA:CPU.

JAX lowers threefry2x32 for CPU as a rolled 5-iteration loop (to keep compile times short), so every
round reads and writes the whole counter array: on XLA:CPU a dropout mask of 7.4M elements costs
~150 ms, more than the attention that uses it. On the CPU backend the same 20 rounds are written out
here as plain uint32 arithmetic, which XLA fuses into one elementwise loop (and into the mask's
consumer). On GPU and TPU, whose lowerings of threefry are already fused, every function here is the
`jax.random` one (`unrolled_by_default`).

XLA fuses the hash into every consumer of a mask, and a differentiated dropout has three: the
forward product and two backward fusions (the masked gradient and the dropped values that the next
product's gradient reads). `Dropout` therefore draws its CPU mask inside a conditional whose two
branches are the same function: XLA cannot fuse across a conditional, so the mask is hashed once
into a bool buffer that all three read (the Lite2 train step takes ~6 % less time).

The unrolled bits are identical to `jax.random.bits(key, shape)` for threefry keys (the default
`jax_threefry_partitionable` counter layout), and `bernoulli`, `normal` and `Dropout` repeat
`jax.random.bernoulli`, `jax.random.normal` and `flax.linen.Dropout` operation for operation: both
paths draw exactly the same masks and noise, so a run resumes on the same trajectory on any backend.
Keys of any other PRNG implementation always use `jax.random`. Each function's `unrolled` argument
(None: `unrolled_by_default()`) picks the path.
"""
import math
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _rotl(x: jax.Array, r: int) -> jax.Array:
  return (x << np.uint32(r)) | (x >> np.uint32(32 - r))


def threefry2x32(k1: jax.Array, k2: jax.Array, x1: jax.Array, x2: jax.Array) -> tuple:
  """Threefry-2x32 with 20 rounds (Salmon et al. 2011) on uint32 arrays, unrolled.

  Args:
    k1, k2: () uint32 key words.
    x1, x2: uint32 counter words, any (equal) shape.

  Returns:
    (y1, y2), uint32 arrays shaped like x1.
  """
  ks = (k1, k2, k1 ^ k2 ^ np.uint32(0x1BD11BDA))
  x = [x1 + ks[0], x2 + ks[1]]
  for i in range(5):
    for r in _ROTATIONS[i % 2]:
      x[0] = x[0] + x[1]
      x[1] = _rotl(x[1], r) ^ x[0]
    x = [x[0] + ks[(i + 1) % 3], x[1] + ks[(i + 2) % 3] + np.uint32(i + 1)]
  return x[0], x[1]


def _key_words(key: jax.Array) -> Optional[tuple]:
  """The two uint32 words of a threefry key (typed, or raw under the default impl), else None."""
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    if str(jax.random.key_impl(key)) not in ("threefry2x32", "fry"):
      return None
    key = jax.random.key_data(key)
  elif jax.config.jax_default_prng_impl != "threefry2x32" or key.shape != (2,):
    return None
  return key[0], key[1]


def _materialized(fn, key: jax.Array) -> jax.Array:
  """fn(key), computed once into a buffer that XLA cannot fuse into its consumers (module doc).

  Both branches of the conditional are fn, so its (runtime) predicate does not change the result.
  Under `vmap` over keys a conditional becomes a select of both branches (twice the work).
  """
  k1, k2 = _key_words(key)
  return jax.lax.cond(k1 <= k2, fn, fn, key)


def unrolled_by_default() -> bool:
  """Whether the unrolled threefry is used: on the CPU backend only (module doc)."""
  return jax.default_backend() == "cpu"


def _use_unrolled(key: jax.Array, unrolled: Optional[bool]) -> bool:
  """The unrolled path for a threefry `key`: `unrolled`, or `unrolled_by_default()` if None."""
  if _key_words(key) is None:
    return False
  return unrolled_by_default() if unrolled is None else bool(unrolled)


def random_bits(key: jax.Array, shape: Sequence[int],
                unrolled: Optional[bool] = None) -> jax.Array:
  """uint32 bits of `shape`: `jax.random.bits(key, shape)`, unrolled on CPU (module doc)."""
  shape = tuple(int(d) for d in shape)
  if not _use_unrolled(key, unrolled):
    return jax.random.bits(key, shape, jnp.uint32)
  size = math.prod(shape)
  if size >= 2 ** 32:
    raise ValueError(f"random_bits: {shape} has more than 2**32 elements")
  k1, k2 = _key_words(key)
  lo = jax.lax.iota(jnp.uint32, size).reshape(shape) if shape else jnp.zeros((), jnp.uint32)
  y1, y2 = threefry2x32(k1, k2, jnp.zeros_like(lo), lo)   # counter = (hi, lo) of a uint64 iota
  return y1 ^ y2


def uniform(key: jax.Array, shape: Sequence[int], minval: float = 0.0, maxval: float = 1.0,
            unrolled: Optional[bool] = None) -> jax.Array:
  """float32 U[minval, maxval) of `shape`: `jax.random.uniform`, unrolled on CPU."""
  if not _use_unrolled(key, unrolled):
    return jax.random.uniform(key, tuple(shape), jnp.float32, minval, maxval)
  bits = random_bits(key, shape, unrolled=True)
  mantissa = (bits >> np.uint32(32 - 23)) | np.uint32(np.float32(1.0).view(np.uint32))
  floats = jax.lax.bitcast_convert_type(mantissa, jnp.float32) - jnp.float32(1.0)
  lo, hi = jnp.float32(minval), jnp.float32(maxval)
  return jnp.maximum(lo, floats * (hi - lo) + lo)


def bernoulli(key: jax.Array, p: float, shape: Sequence[int],
              unrolled: Optional[bool] = None) -> jax.Array:
  """bool mask of `shape`, True with probability p: `jax.random.bernoulli`, unrolled on CPU."""
  if not _use_unrolled(key, unrolled):
    return jax.random.bernoulli(key, p, tuple(shape))
  return uniform(key, shape, unrolled=True) < jnp.float32(p)


def normal(key: jax.Array, shape: Sequence[int], unrolled: Optional[bool] = None) -> jax.Array:
  """float32 standard normal samples of `shape`: `jax.random.normal`, unrolled on CPU."""
  if not _use_unrolled(key, unrolled):
    return jax.random.normal(key, tuple(shape), jnp.float32)
  lo = np.nextafter(np.float32(-1.0), np.float32(0.0), dtype=np.float32)
  u = uniform(key, shape, lo, 1.0, unrolled=True)
  return jnp.float32(np.sqrt(2)) * jax.lax.erf_inv(u)


class Dropout(nn.Module):
  """`flax.linen.Dropout` (rng collection 'dropout', no broadcast dims) with the fused mask.

  Attributes:
    rate: probability of zeroing an element.
    unrolled: the mask's threefry path (None: `unrolled_by_default()`).
  """
  rate: float
  unrolled: Optional[bool] = None

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool,
               rng: Optional[jax.Array] = None) -> jax.Array:
    """x: any shape. Returns x masked and scaled by 1 / (1 - rate), or x when deterministic."""
    if self.rate == 0.0 or deterministic:
      return x
    if self.rate == 1.0:
      return jnp.zeros_like(x)
    keep = 1.0 - self.rate
    key = self.make_rng("dropout") if rng is None else rng
    if _use_unrolled(key, self.unrolled):
      mask = _materialized(lambda k: bernoulli(k, keep, x.shape, unrolled=True), key)
    else:   # jax.random's lowering on GPU and TPU
      mask = bernoulli(key, keep, x.shape, unrolled=False)
    return jax.lax.select(mask, x / keep, jnp.zeros_like(x))
