"""Anomaly maps, fusion and image scores (docs/algorithm.md §11). Maps are NHWC.

The jnp functions are pure and jit-able; `fused_maps` and `image_scores_np` are their numpy
host counterparts used by the evaluation (one compiled program for every class).
"""
import functools
from typing import Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jnp.ndarray
# Probabilities are clipped to [smallest normal float32, 1 - 2^-24] before the log-odds (float32
# sigmoid outputs reach 0 and 1): log-odds in about [-87.3, 16.6].
_LOGODDS_LO, _LOGODDS_HI = float(np.finfo(np.float32).tiny), 1.0 - 2.0 ** -24


def anomaly_maps(outputs: Mapping[str, Optional[Array]]) -> Tuple[Array, Optional[Array]]:
  """Per-pixel maps from the model outputs.

  Args:
    outputs: dict with 'rec' (B, H, W, 1) and optionally 'ref_logit' (B, H, W, 1).

  Returns:
    (rec (B, H, W), ref (B, H, W) = sigmoid(ref_logit), or None without a refiner), float32.
  """
  rec = outputs["rec"].astype(jnp.float32)[..., 0]
  logit = outputs.get("ref_logit")
  ref = None if logit is None else jax.nn.sigmoid(logit.astype(jnp.float32))[..., 0]
  return rec, ref


def logodds(p: Array) -> Array:
  """float32 log(p / (1 - p)) of refiner probabilities (any shape), clipped as above."""
  p = jnp.clip(jnp.asarray(p, jnp.float32), _LOGODDS_LO, _LOGODDS_HI)
  return jnp.log(p) - jnp.log1p(-p)


def logodds_np(p: np.ndarray) -> np.ndarray:
  """`logodds` in numpy (the evaluation's fusion is numpy)."""
  p = np.clip(np.asarray(p, np.float32), np.float32(_LOGODDS_LO), np.float32(_LOGODDS_HI))
  return np.log(p) - np.log1p(-p)


def mid_range(min_value: Array, max_value: Array) -> Array:
  """Fusion scale c = (min + max) / 2 of the reconstruction map (docs/algorithm.md §11.2)."""
  return 0.5 * (jnp.asarray(min_value, jnp.float32) + jnp.asarray(max_value, jnp.float32))


def fuse(rec: Array, ref: Optional[Array], c: Array, alpha: float = 0.5) -> Array:
  """S = (1 - alpha) * rec + alpha * c * ref (reference: 0.5 rec + 0.5 c ref); rec when ref is None.

  Args:
    rec: reconstruction map, any shape.
    ref: refiner probabilities, same shape as rec, or None.
    c: scale, scalar (or broadcastable).
    alpha: refiner weight.
  """
  rec = rec.astype(jnp.float32)
  if ref is None:
    return rec
  return (1.0 - alpha) * rec + alpha * jnp.asarray(c, jnp.float32) * ref.astype(jnp.float32)


def image_scores(anomaly_map: Array, pool_size: int = 16) -> Array:
  """Image score: max of the stride-1, VALID, pool_size x pool_size mean-filtered map (docs/algorithm.md §11.3).

  Args:
    anomaly_map: (B, H, W, 1) or (B, H, W).
    pool_size: box size; must not exceed H or W.

  Returns:
    (B,) float32.
  """
  x = anomaly_map.astype(jnp.float32)
  if x.ndim == 4:
    x = x[..., 0]
  if x.ndim != 3:
    raise ValueError(f"expected (B, H, W[, 1]), got {anomaly_map.shape}")
  if pool_size > x.shape[1] or pool_size > x.shape[2]:
    raise ValueError(f"pool_size {pool_size} exceeds the map size {x.shape[1:]}")
  # Separable box sum (rows, then columns): 2k adds per pixel instead of k^2, same result up to
  # float32 round-off (XLA:CPU runs a k x k reduce_window ~50x slower).
  summed = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, pool_size, 1), (1, 1, 1), "VALID")
  summed = jax.lax.reduce_window(summed, 0.0, jax.lax.add, (1, 1, pool_size), (1, 1, 1), "VALID")
  return jnp.max(summed, axis=(1, 2)) / float(pool_size * pool_size)


def fused_maps(maps: dict, rows: np.ndarray, c: float, alpha: float) -> np.ndarray:
  """(len(rows), H, W) float32 anomaly maps S = (1-alpha) rec + alpha c ref (rec alone without refiner).

  numpy, as `fuse` computes it (jnp run eagerly would compile once per class's shape).
  """
  rec = maps["rec"][rows].astype(np.float32)
  if maps["ref"] is None:
    return rec
  ref = maps["ref"][rows].astype(np.float32)
  return np.float32(1.0 - alpha) * rec + (np.float32(alpha) * np.float32(c)) * ref


@functools.cache
def _image_scores_fn():
  return jax.jit(image_scores, static_argnums=1)


def image_scores_np(maps: np.ndarray, pool_size: int, chunk: int = 64) -> np.ndarray:
  """(N, H, W) -> (N,) max of the stride-1 `pool_size` box-filtered map (`image_scores`, jitted).

  Chunks of `chunk` maps, the last one zero-padded, so one compiled program serves every class.
  """
  out = []
  for i in range(0, len(maps), chunk):
    part = maps[i:i + chunk].astype(np.float32)
    padded = np.zeros((chunk,) + part.shape[1:], np.float32)
    padded[:len(part)] = part
    out.append(np.asarray(_image_scores_fn()(padded, pool_size))[:len(part)])
  return np.concatenate(out) if out else np.zeros(0, np.float32)
