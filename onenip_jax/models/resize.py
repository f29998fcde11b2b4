"""Bilinear resizing with `align_corners=True` (docs/algorithm.md §3.3).

`jax.image.resize` uses half-pixel centres and antialiases when down-sampling, so it does not match
PyTorch's `interpolate(mode='bilinear', align_corners=True)` / `UpsamplingBilinear2d`. This module
implements the reference semantics as two small static interpolation matrices (two non-zeros per
row), applied with matmuls: fast on every backend and in the backward pass, where gathers would
turn into slow scatter-adds on CPU.
"""
from typing import Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np


def _axis_coords(in_size: int, out_size: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Source indices and blend weights for one axis.

  Args:
    in_size: input length along the axis.
    out_size: output length along the axis.

  Returns:
    (i0, i1, w): int32 indices (out_size,) of the two neighbours and float32 weights (out_size,) of
    `i1`, with src = i * (in - 1) / (out - 1) (src = 0 when out_size == 1).
  """
  if in_size < 1 or out_size < 1:
    raise ValueError(f"sizes must be positive, got in={in_size}, out={out_size}")
  if out_size > 1:
    # PyTorch computes the scale and the source coordinate in float32 for float32 inputs.
    scale = np.float32((in_size - 1) / (out_size - 1))
    src = np.arange(out_size, dtype=np.float32) * scale
  else:
    src = np.zeros((1,), np.float32)
  i0 = np.minimum(np.floor(src).astype(np.int32), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  w = (src - i0).astype(np.float32)
  return i0, i1, w


def interpolation_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out_size, in_size) float32 matrix M with (M @ v)[i] = (1 - w_i) v[i0_i] + w_i v[i1_i]."""
  i0, i1, w = _axis_coords(in_size, out_size)
  m = np.zeros((out_size, in_size), np.float32)
  rows = np.arange(out_size)
  np.add.at(m, (rows, i0), 1 - w)
  np.add.at(m, (rows, i1), w)
  return m


def _resize_axis(x: jnp.ndarray, axis: int, out_size: int) -> jnp.ndarray:
  """Align-corners linear interpolation of `x` along spatial `axis` (1 or 2) to `out_size`."""
  in_size = x.shape[axis]
  if in_size == out_size:
    return x
  m = jnp.asarray(interpolation_matrix(in_size, out_size), dtype=x.dtype)
  spec = "oh,bhwc->bowc" if axis == 1 else "ow,bhwc->bhoc"
  return jnp.einsum(spec, m, x, precision=jax.lax.Precision.HIGHEST)


def resize_align_corners(x: jnp.ndarray, out_hw: Sequence[int]) -> jnp.ndarray:
  """Bilinear resize with align_corners=True, for down- and up-sampling, without antialiasing.

  Output pixel i samples source coordinate i * (in - 1) / (out - 1) in each spatial dimension
  (an output size of 1 samples index 0). Floating inputs keep their dtype (the matmul runs in it);
  integer and bool inputs are promoted to float32.

  Args:
    x: (B, h, w, C) NHWC array.
    out_hw: (H, W) output spatial size.

  Returns:
    (B, H, W, C) array.
  """
  if x.ndim != 4:
    raise ValueError(f"expected (B, h, w, C), got shape {x.shape}")
  out_h, out_w = int(out_hw[0]), int(out_hw[1])
  if not jnp.issubdtype(x.dtype, jnp.floating):
    x = x.astype(jnp.float32)
  x = _resize_axis(x, 1, out_h)
  return _resize_axis(x, 2, out_w)
