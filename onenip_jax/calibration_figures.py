"""The figures of calibration candidates on one class (`onenip_jax.calibration`), computed on the
default device in jnp, every candidate's fused map, pixel metrics and image scores from one sort.

Pixel AUROC and AP are exact as `metrics.pixel_auroc_ap` (ties as one threshold; float32 sums in
blocks), on all rows and on each fold from the same sort; image AUROC and AP come from
`metrics` on the host. Candidates are mapped over in batches of about `_PIXEL_BUDGET` pixels.
"""
import functools
import math
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from onenip_jax import metrics, scoring

FIGURE_KEYS = ("i_auroc", "i_ap", "p_auroc", "p_ap")
_PIXEL_BUDGET = 1 << 26  # candidates scored at once: about this many pixels in all
_SUM_BLOCK = 4096        # float32 sums in blocks of this many terms


def _candidate_rows(stats: Mapping, grid: Sequence[tuple[str, float]]) -> np.ndarray:
  """(C, 6) float32 [m_rec, s_rec, m_ref, s_ref, w, 1 - w] of each (ref_space, w) of `grid`,
  `stats` {ref_space: stats dict}; the last column in the float32 rounding of `fuse`."""
  return np.asarray([[stats[s]["rec_mean"], stats[s]["rec_std"], stats[s]["ref_mean"],
                      stats[s]["ref_std"], w, np.float32(1.0 - w)] for s, w in grid], np.float32)


def _fuse_jnp(rec, ref_lo, ref_p, row, logodds):
  """`calibration.fuse` in jnp: (N, H, W) maps and one `_candidate_rows` row; `logodds` a bool scalar."""
  z_rec = (rec - row[0]) / row[1]
  z_ref = (jnp.where(logodds, ref_lo, ref_p) - row[2]) / row[3]
  mix = row[5] * z_rec + row[4] * z_ref
  return jnp.where(row[4] == 0.0, z_rec, jnp.where(row[4] == 1.0, z_ref, mix))


def _block_sum(x):
  """float32 sum of (n,) `x`, in blocks (round-off ~ eps, not n eps)."""
  pad = (-x.shape[0]) % _SUM_BLOCK
  return jnp.sum(jnp.sum(jnp.pad(x, (0, pad)).reshape(-1, _SUM_BLOCK), axis=1))


def _sorted_auroc_ap(desc, label, member):
  """(AUROC, AP) of the `member` pixels of scores sorted in descending order `desc` (n,),
  `label` (n,) bool, exactly as `metrics.pixel_auroc_ap` on those pixels (ties as one
  threshold); NaN where one class is missing.

  A negative at a tie run adds (TP before the run + TP at its end) / 2 to the AUROC's trapezoid,
  a positive adds TP / (TP + FP) at the end of its run to the AP."""
  n = desc.shape[0]
  pos = (label & member).astype(jnp.int32)
  neg = (~label & member)
  tp = jnp.cumsum(pos)
  seen = jnp.cumsum(member.astype(jnp.int32))
  diff = desc[1:] != desc[:-1]
  start = jnp.concatenate([jnp.ones(1, bool), diff])
  end = jnp.concatenate([diff, jnp.ones(1, bool)])
  big = jnp.iinfo(jnp.int32).max
  tp_before = jax.lax.cummax(jnp.where(start, tp - pos, 0))  # non-decreasing in the order
  tp_end = jax.lax.cummin(jnp.where(end, tp, big), reverse=True)
  seen_end = jax.lax.cummin(jnp.where(end, seen, big), reverse=True)
  n_pos, n_neg = tp[n - 1], seen[n - 1] - tp[n - 1]
  p, q = jnp.maximum(n_pos, 1).astype(jnp.float32), jnp.maximum(n_neg, 1).astype(jnp.float32)
  auroc = _block_sum(jnp.where(neg, (tp_before.astype(jnp.float32) + tp_end.astype(jnp.float32))
                               / (2.0 * p), 0.0)) / q
  ap = _block_sum(jnp.where(pos > 0, tp_end.astype(jnp.float32)
                            / jnp.maximum(seen_end, 1).astype(jnp.float32), 0.0)) / p
  ok = (n_pos > 0) & (n_neg > 0)
  return jnp.where(ok, auroc, jnp.nan), jnp.where(ok, ap, jnp.nan)


@functools.partial(jax.jit, static_argnames=("n_folds", "pool_sizes", "batch"))
def _score(rec, ref, mask, fold, rows, logodds, n_folds: int, pool_sizes: tuple, batch: int):
  """Figures of every candidate on one class.

  Args:
    rec, ref: (N, H, W) float32 maps; mask: (N, H, W) bool; fold: (N,) int32 fold of each row,
      max(n_folds, 1) for padding rows (left out of every figure).
    rows: (C, 6) `_candidate_rows`; logodds: (C,) bool, the candidate's ref_space is log-odds.
  Returns:
    pixel (C, 1 + n_folds, 2) [P-AUROC, P-AP] on all rows then on each fold (NaN: undefined),
    image (C, len(pool_sizes), N) image scores (`box_max`).
  """
  ref_lo = scoring.logodds(ref)
  fold_px = jnp.broadcast_to(fold[:, None, None], rec.shape).reshape(-1)
  label_px = mask.reshape(-1)

  def one(args):
    row, lo = args
    s = _fuse_jnp(rec, ref_lo, ref, row, lo)
    boxes = []
    for k in pool_sizes:  # separable box sums in float32, no cancellation
      b = jax.lax.reduce_window(s, 0.0, jax.lax.add, (1, k, 1), (1, 1, 1), "VALID")
      b = jax.lax.reduce_window(b, 0.0, jax.lax.add, (1, 1, k), (1, 1, 1), "VALID")
      boxes.append(jnp.max(b.reshape(b.shape[0], -1), axis=1) / float(k * k))
    neg_sorted, payload = jax.lax.sort((-s.reshape(-1), fold_px * 2 + label_px.astype(jnp.int32)),
                                             num_keys=1)
    desc, label, fold_sorted = -neg_sorted, (payload % 2) == 1, payload // 2
    figs = [_sorted_auroc_ap(desc, label, fold_sorted < max(n_folds, 1))]
    figs += [_sorted_auroc_ap(desc, label, fold_sorted == k) for k in range(n_folds)]
    return jnp.asarray(figs), jnp.stack(boxes)

  return jax.lax.map(one, (rows, logodds), batch_size=batch)


def _bucket(n: int) -> int:
  """The smallest 8 ceil(2 ** (k / 4) / 8) >= n: row counts padded to at most ~19 % more."""
  k = 0
  while 8 * math.ceil(2 ** (k / 4) / 8) < n:
    k += 1
  return 8 * math.ceil(2 ** (k / 4) / 8)


def _image_figures(scores: np.ndarray, labels: np.ndarray) -> dict:
  return {"i_auroc": metrics.auroc(scores, labels), "i_ap": metrics.average_precision(scores, labels)}


class DeviceClass:
  """One class's validation maps on the device, rows padded to `_bucket` (`class_figures`).

  Attributes:
    rec, ref: (M, H, W) float32 device arrays; mask: (M, H, W) bool; M = _bucket(n).
    source, label: (n,) host arrays; n: the class's rows.
  """

  def __init__(self, g: Mapping, name: str = ""):
    for key in ("rec", "ref"):
      if not np.all(np.isfinite(g[key])):
        raise ValueError(f"calibration: the validation {key} maps of class {name!r} hold NaN or "
                         "inf (a diverged model?)")
    self.n, h, w = np.shape(g["rec"])
    self.shape = (h, w)
    self.source, self.label = np.asarray(g["source"]), np.asarray(g["label"])
    padded = _bucket(self.n)  # few distinct shapes, few compilations

    def put(x, dtype):
      buf = np.zeros((padded, h, w), dtype)
      buf[:self.n] = x
      return jax.device_put(buf)

    self.rec, self.ref = put(g["rec"], np.float32), put(g["ref"], np.float32)
    self.mask = put(g["mask"], bool)


def class_figures(d: DeviceClass, stats: Mapping, grid: Sequence[tuple[str, float]],
                  pool_sizes: Sequence[int], n_folds: int) -> np.ndarray:
  """Figures of every candidate of `grid` on one class with statistics `stats`.

  Args:
    d: the class's maps ('rec', 'ref' (N, H, W) float32, 'mask' (N, H, W) bool, 'label' (N,),
      'source' (N,) int) on the device.
    stats: {ref_space: `calibration.normal_stats` dict}; grid: [(ref_space, w)].
    n_folds: folds (rows with `source` % n_folds == k), 0 for none.
  Returns:
    (len(grid), len(pool_sizes), 1 + n_folds, 4) float64 figures in FIGURE_KEYS order on all
    rows, then on each fold; NaN where undefined.
  """
  n, (h, w) = d.n, d.shape
  for p in pool_sizes:
    if p > h or p > w:
      raise ValueError(f"calibration.pool_sizes: {p} exceeds the map size {(h, w)}")
  fold = (d.source % n_folds if n_folds else np.zeros(n, np.int64)).astype(np.int32)
  padded = d.rec.shape[0]
  batch = max(1, min(len(grid), _PIXEL_BUDGET // max(padded * h * w, 1)))
  pixel, image = _score(d.rec, d.ref, d.mask,
                        jnp.asarray(np.pad(fold, (0, padded - n),
                                           constant_values=max(n_folds, 1))),
                        jnp.asarray(_candidate_rows(stats, grid)),
                        jnp.asarray([s == "logodds" for s, _ in grid]), n_folds=n_folds,
                        pool_sizes=tuple(int(p) for p in pool_sizes), batch=batch)
  pixel, image = np.asarray(pixel, np.float64), np.asarray(image)[:, :, :n]
  out = np.full((len(grid), len(pool_sizes), 1 + n_folds, 4), np.nan)
  subsets = [np.ones(n, bool)] + [fold == k for k in range(n_folds)]
  for c in range(len(grid)):
    for j in range(len(pool_sizes)):
      for f, rows in enumerate(subsets):
        im = _image_figures(image[c, j, rows], d.label[rows])
        out[c, j, f] = [np.nan if im[k] is None else im[k] for k in ("i_auroc", "i_ap")] + list(
            pixel[c, f])
  return out
