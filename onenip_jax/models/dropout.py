"""Dropout and Gaussian noise with JAX's own threefry stream, fused by XLA on every backend.

JAX lowers threefry2x32 for CPU as a rolled 5-iteration loop (to keep compile times short), so every
round reads and writes the whole counter array: on XLA:CPU a dropout mask of 7.4M elements costs
~150 ms, more than the attention that uses it. Here the same 20 rounds are written out as plain
uint32 arithmetic, which XLA fuses into one elementwise loop (and into the mask's consumer).

The bits are identical to `jax.random.bits(key, shape)` for threefry keys (the default
`jax_threefry_partitionable` counter layout), and `bernoulli`, `normal` and `Dropout` repeat
`jax.random.bernoulli`, `jax.random.normal` and `flax.linen.Dropout` operation for operation: a run
draws exactly the masks and noise it drew with the library functions, so checkpoints resume on the
same trajectory. Keys of any other PRNG implementation fall back to `jax.random`.
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


def _is_threefry(key: jax.Array) -> bool:
  return _key_words(key) is not None


def random_bits(key: jax.Array, shape: Sequence[int]) -> jax.Array:
  """uint32 bits of `shape`, equal to `jax.random.bits(key, shape)` (typed threefry key)."""
  shape = tuple(int(d) for d in shape)
  if not _is_threefry(key):
    return jax.random.bits(key, shape, jnp.uint32)
  size = math.prod(shape)
  if size >= 2 ** 32:
    raise ValueError(f"random_bits: {shape} has more than 2**32 elements")
  k1, k2 = _key_words(key)
  lo = jax.lax.iota(jnp.uint32, size).reshape(shape) if shape else jnp.zeros((), jnp.uint32)
  y1, y2 = threefry2x32(k1, k2, jnp.zeros_like(lo), lo)   # counter = (hi, lo) of a uint64 iota
  return y1 ^ y2


def uniform(key: jax.Array, shape: Sequence[int], minval: float = 0.0,
            maxval: float = 1.0) -> jax.Array:
  """float32 U[minval, maxval), the same values as `jax.random.uniform` (threefry key)."""
  if not _is_threefry(key):
    return jax.random.uniform(key, tuple(shape), jnp.float32, minval, maxval)
  bits = random_bits(key, shape)
  mantissa = (bits >> np.uint32(32 - 23)) | np.uint32(np.float32(1.0).view(np.uint32))
  floats = jax.lax.bitcast_convert_type(mantissa, jnp.float32) - jnp.float32(1.0)
  lo, hi = jnp.float32(minval), jnp.float32(maxval)
  return jnp.maximum(lo, floats * (hi - lo) + lo)


def bernoulli(key: jax.Array, p: float, shape: Sequence[int]) -> jax.Array:
  """bool mask, True with probability p: `jax.random.bernoulli(key, p, shape)`."""
  return uniform(key, shape) < jnp.float32(p)


def normal(key: jax.Array, shape: Sequence[int]) -> jax.Array:
  """float32 standard normal samples: `jax.random.normal(key, shape)`."""
  if not _is_threefry(key):
    return jax.random.normal(key, tuple(shape), jnp.float32)
  lo = np.nextafter(np.float32(-1.0), np.float32(0.0), dtype=np.float32)
  u = uniform(key, shape, lo, 1.0)
  return jnp.float32(np.sqrt(2)) * jax.lax.erf_inv(u)


class Dropout(nn.Module):
  """`flax.linen.Dropout` (rng collection 'dropout', no broadcast dims) with the fused mask.

  Attributes:
    rate: probability of zeroing an element.
  """
  rate: float

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
    mask = bernoulli(key, keep, x.shape)
    return jax.lax.select(mask, x / keep, jnp.zeros_like(x))
