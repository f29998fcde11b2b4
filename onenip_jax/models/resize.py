"""Bilinear resizing with `align_corners=True` (spec sections 4 and 14).

`jax.image.resize` uses half-pixel centres and antialiases when down-sampling, so it does not match
PyTorch's `interpolate(mode='bilinear', align_corners=True)` / `UpsamplingBilinear2d`. This module
implements the reference semantics with static, separable gathers plus a linear blend.
"""
from typing import Sequence, Tuple

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


def _resize_axis(x: jnp.ndarray, axis: int, out_size: int) -> jnp.ndarray:
  """Align-corners linear interpolation of `x` along `axis` to `out_size`."""
  in_size = x.shape[axis]
  if in_size == out_size:
    return x
  i0, i1, w = _axis_coords(in_size, out_size)
  x0 = jnp.take(x, jnp.asarray(i0), axis=axis)
  x1 = jnp.take(x, jnp.asarray(i1), axis=axis)
  shape = [1] * x.ndim
  shape[axis] = out_size
  w = jnp.asarray(w.reshape(shape), dtype=x.dtype)
  return x0 * (1 - w) + x1 * w


def resize_align_corners(x: jnp.ndarray, out_hw: Sequence[int]) -> jnp.ndarray:
  """Bilinear resize with align_corners=True, for down- and up-sampling, without antialiasing.

  Output pixel i samples source coordinate i * (in - 1) / (out - 1) in each spatial dimension
  (an output size of 1 samples index 0). Floating inputs keep their dtype (the blend runs in it);
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
