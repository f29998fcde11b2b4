"""The one scoring function: maps -> anomaly map and image score (docs/algorithm.md §11, §13).

Every scoring (reference, refiner, reconstruction, calibrated) is one vector of SCORING_KEYS:

  S = rec_weight (rec - rec_mean) / rec_std + ref_weight (g(ref) - ref_mean) / ref_std,
  g = `logodds` where ref_logodds is 1, the identity where it is 0,

and the image score is the max of S's stride-1 VALID box mean (§11.3). `score` computes both, in
jnp; the Predictor (and so the exported program), evaluation, calibration and the export's
thresholds all call it (`score_host` runs it on host arrays). The named vectors are
`scoring_params`. Maps are (B, H, W).
"""
from typing import Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jnp.ndarray
# The scoring vector's layout (export.json's `scoring.params`, the exported program's argument).
SCORING_KEYS = ("rec_mean", "rec_std", "ref_mean", "ref_std", "rec_weight", "ref_weight",
                "ref_logodds")
# Probabilities are clipped to [smallest normal float32, 1 - 2^-24] before the log-odds (float32
# sigmoid outputs reach 0 and 1): log-odds in about [-87.3, 16.6].
_LOGODDS_LO, _LOGODDS_HI = float(np.finfo(np.float32).tiny), 1.0 - 2.0 ** -24


def logodds(p: Array) -> Array:
  """float32 log(p / (1 - p)) of refiner probabilities (any shape), clipped as above."""
  p = jnp.clip(jnp.asarray(p, jnp.float32), _LOGODDS_LO, _LOGODDS_HI)
  return jnp.log(p) - jnp.log1p(-p)


def mid_range(min_value: Array, max_value: Array) -> Array:
  """Fusion scale c = (min + max) / 2 of the reconstruction map (docs/algorithm.md §11.2)."""
  return 0.5 * (jnp.asarray(min_value, jnp.float32) + jnp.asarray(max_value, jnp.float32))


def scoring_params(name: str, *, alpha: float = 0.5, c: float = 1.0,
                   calibrated: Optional[Mapping] = None) -> dict:
  """{SCORING_KEYS: float} of scoring `name`.

  reference: (1 - alpha) rec + alpha c ref (weights rounded to float32 as products of float32);
  refiner / reconstruction: that map alone; calibrated: the PARAMS of a calibration
  (`onenip_jax.evaluation.calibration`): (1 - w) z_rec + w z_ref, ref in its `ref_space` (a
  calibration without one: probability).
  """
  if name == "reference":
    values = (0.0, 1.0, 0.0, 1.0, float(np.float32(1.0 - alpha)),
              float(np.float32(alpha) * np.float32(c)), 0.0)
  elif name == "refiner":
    values = (0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0)
  elif name == "reconstruction":
    values = (0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0)
  elif name == "calibrated":
    p = calibrated
    values = (p["rec_mean"], p["rec_std"], p["ref_mean"], p["ref_std"],
              float(np.float32(1.0 - p["weight"])), float(p["weight"]),
              float(p.get("ref_space", "probability") == "logodds"))
  else:
    raise ValueError(f"unknown scoring {name!r}")
  return dict(zip(SCORING_KEYS, map(float, values)))


def vector(params: Mapping) -> np.ndarray:
  """(7,) float32 scoring vector of {SCORING_KEYS: value}."""
  return np.asarray([params[k] for k in SCORING_KEYS], np.float32)


def image_scores(anomaly_map: Array, pool_size: int = 16) -> Array:
  """Image score: max of the stride-1, VALID, pool_size x pool_size mean-filtered map (§11.3).

  Args:
    anomaly_map: (B, H, W).
    pool_size: box size; must not exceed H or W.

  Returns:
    (B,) float32.
  """
  x = anomaly_map.astype(jnp.float32)
  if x.ndim != 3:
    raise ValueError(f"expected (B, H, W), got {anomaly_map.shape}")
  if pool_size > x.shape[1] or pool_size > x.shape[2]:
    raise ValueError(f"pool_size {pool_size} exceeds the map size {x.shape[1:]}")
  # Separable box sum (rows, then columns): 2k adds per pixel instead of k^2, same result up to
  # float32 round-off (XLA:CPU runs a k x k reduce_window ~50x slower).
  summed = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, pool_size, 1), (1, 1, 1), "VALID")
  summed = jax.lax.reduce_window(summed, 0.0, jax.lax.add, (1, 1, pool_size), (1, 1, 1), "VALID")
  return jnp.max(summed, axis=(1, 2)) / float(pool_size * pool_size)


def score(rec: Array, ref: Optional[Array], scoring_vector: Array,
          pool_size: int) -> Tuple[Array, Array]:
  """The anomaly map and image score of one scoring (module doc).

  Args:
    rec: (B, H, W) reconstruction error; ref: (B, H, W) refiner probability, or None (no refiner).
    scoring_vector: (7,) float32 in SCORING_KEYS order (`vector`).
    pool_size: the image score's box size.
  Returns:
    (anomaly map (B, H, W) float32, image score (B,) float32).
  """
  p = jnp.asarray(scoring_vector, jnp.float32)
  s = p[4] * ((rec.astype(jnp.float32) - p[0]) / p[1])
  if ref is not None:
    ref = ref.astype(jnp.float32)
    ref = jnp.where(p[6] > 0.5, logodds(ref), ref)
    s = s + p[5] * ((ref - p[2]) / p[3])
  return s, image_scores(s, pool_size)


_score_jit = jax.jit(score, static_argnums=3)


def score_host(rec: np.ndarray, ref: Optional[np.ndarray], scoring_vector: np.ndarray,
               pool_size: int, chunk: int = 64) -> Tuple[np.ndarray, np.ndarray]:
  """`score` of host maps (N, H, W) -> (anomaly maps (N, H, W) float32, image scores (N,)).

  Runs jitted on chunks of `chunk` maps, the last one zero-padded, so one compiled program serves
  every class and every scoring.
  """
  v, n = np.asarray(scoring_vector, np.float32), len(rec)
  maps, scores = np.zeros(np.shape(rec), np.float32), np.zeros(n, np.float32)
  for i in range(0, n, chunk):
    m = min(chunk, n - i)
    s, k = _score_jit(_pad(rec[i:i + m], chunk),
                      None if ref is None else _pad(ref[i:i + m], chunk), v, int(pool_size))
    maps[i:i + m], scores[i:i + m] = np.asarray(s)[:m], np.asarray(k)[:m]
  return maps, scores


def _pad(x: np.ndarray, rows: int) -> np.ndarray:
  """float32 `x` (n, ...) zero-padded to `rows` rows."""
  out = np.zeros((rows,) + x.shape[1:], np.float32)
  out[:len(x)] = x
  return out
