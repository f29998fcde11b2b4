"""The figures of calibration candidates on one class (`onenip_jax.evaluation.calibration`): each
candidate's fused map, image scores, and pixel AUROC and AP on all rows and on each fold.

On a GPU or TPU this runs in jnp on the default device from one sort per candidate, candidates
mapped over in batches of about `_PIXEL_BUDGET` pixels (float32 sums in blocks). On the CPU
backend the sorts and the pixel figures are numpy's (XLA:CPU's sort is ~50x slower): each fold's
negative and positive float32 scores sorted apart, then all of them, and counted with binary
searches; candidates run on threads within `_HOST_BUDGET`, each thread in one reused buffer.

A candidate is a scoring vector: its map and image scores are `scoring.score`'s on both paths.
Pixel AUROC and AP are exact as `metrics.pixel_auroc_ap` (ties as one threshold); image AUROC and
AP come from `metrics` on the host.
"""
import concurrent.futures
import functools
import math
import os
from typing import Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from onenip_jax.evaluation import metrics, scoring

FIGURE_KEYS = ("i_auroc", "i_ap", "p_auroc", "p_ap")
_PIXEL_BUDGET = 1 << 24  # accelerator: candidates scored at once, about this many pixels in all
_SUM_BLOCK = 4096        # float32 sums in blocks of this many terms
_HOST_BUDGET = 3 << 28   # CPU: bytes of the candidates' workspaces (4 per pixel) held at once


def candidate_vectors(stats: Mapping, grid: Sequence[tuple[str, float]]) -> np.ndarray:
  """(C, 7) float32 scoring vectors (`scoring.SCORING_KEYS`) of the calibrated scoring of each
  (ref_space, w) of `grid`, `stats` {ref_space: `calibration.normal_stats`-like dict}."""
  return np.stack([scoring.vector(scoring.scoring_params("calibrated",
                                                         calibrated=dict(stats[s], weight=w)))
                   for s, w in grid])


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
def _score(rec, ref, mask, fold, vectors, n_folds: int, pool_sizes: tuple, batch: int):
  """Figures of every candidate on one class.

  Args:
    rec, ref: (N, H, W) float32 maps; mask: (N, H, W) bool; fold: (N,) int32 fold of each row,
      max(n_folds, 1) for padding rows (left out of every figure).
    vectors: (C, 7) scoring vectors (`candidate_vectors`).
  Returns:
    pixel (C, 1 + n_folds, 2) [P-AUROC, P-AP] on all rows then on each fold (NaN: undefined),
    image (C, len(pool_sizes), N) image scores.
  """
  fold_px = jnp.broadcast_to(fold[:, None, None], rec.shape).reshape(-1)
  label_px = mask.reshape(-1)

  def one(v):
    boxes = []
    for k in pool_sizes:  # the same map for every box size
      s, image = scoring.score(rec, ref, v, k)
      boxes.append(image)
    neg_sorted, payload = jax.lax.sort((-s.reshape(-1), fold_px * 2 + label_px.astype(jnp.int32)),
                                       num_keys=1)
    desc, label, fold_sorted = -neg_sorted, (payload % 2) == 1, payload // 2
    figs = [_sorted_auroc_ap(desc, label, fold_sorted < max(n_folds, 1))]
    figs += [_sorted_auroc_ap(desc, label, fold_sorted == k) for k in range(n_folds)]
    return jnp.asarray(figs), jnp.stack(boxes)

  return jax.lax.map(one, vectors, batch_size=batch)


def _bucket(n: int) -> int:
  """The smallest 8 ceil(2 ** (k / 4) / 8) >= n: row counts padded to at most ~19 % more."""
  k = 0
  while 8 * math.ceil(2 ** (k / 4) / 8) < n:
    k += 1
  return 8 * math.ceil(2 ** (k / 4) / 8)


def _image_figures(scores: np.ndarray, labels: np.ndarray) -> dict:
  return {"i_auroc": metrics.auroc(scores, labels), "i_ap": metrics.average_precision(scores, labels)}


def on_accelerator() -> bool:
  """Whether candidates are scored in jnp (a GPU or TPU); on the CPU backend they are scored in
  numpy (XLA:CPU sorts ~50x slower than numpy), with the same figures."""
  return jax.default_backend() != "cpu"


class ClassMaps:
  """One class's validation maps as `class_figures` scores them: on the accelerator, rows padded
  to `_bucket` (few shapes, few compilations); else the host arrays.

  Attributes:
    rec, ref: (M, H, W) float32; mask: (M, H, W) bool (M = n on the host, _bucket(n) on the
      accelerator); source, label: (n,) host arrays; n: the class's rows; device: which.
  """

  def __init__(self, g: Mapping, name: str = "", device: Optional[bool] = None):
    for key in ("rec", "ref"):
      if not np.all(np.isfinite(g[key])):
        raise ValueError(f"calibration: the validation {key} maps of class {name!r} hold NaN or "
                         "inf (a diverged model?)")
    self.n, h, w = np.shape(g["rec"])
    self.shape = (h, w)
    self.source, self.label = np.asarray(g["source"]), np.asarray(g["label"])
    self.device = on_accelerator() if device is None else device
    padded = _bucket(self.n) if self.device else self.n

    def put(x, dtype):
      if not self.device:
        return np.asarray(x, dtype)
      buf = np.zeros((padded, h, w), dtype)
      buf[:self.n] = x
      return jax.device_put(buf)

    self.rec, self.ref = put(g["rec"], np.float32), put(g["ref"], np.float32)
    self.mask = put(g["mask"], bool)


def sorted_auroc_ap(neg: np.ndarray, pos: np.ndarray) -> tuple[float, float]:
  """(AUROC, AP) of pixel scores from the negatives' and the positives' scores, each (n,) sorted
  ascending; NaN where one is empty. Exact as `metrics.pixel_auroc_ap` (a curve point per run of
  equal scores): a run of positives at score t counts the negatives below t and half those at t
  (AUROC, integer sums), and adds TP / (TP + FP) of the threshold t to the AP (float64)."""
  n_pos, n_neg = len(pos), len(neg)
  if not n_pos or not n_neg:
    return np.nan, np.nan
  starts = np.flatnonzero(np.r_[True, pos[1:] != pos[:-1]])
  values, counts = pos[starts], np.diff(np.r_[starts, n_pos])
  below = np.searchsorted(neg, values, "left")
  at_most = np.searchsorted(neg, values, "right")
  auroc = float(np.dot(counts, below + at_most)) / (2.0 * n_pos * n_neg)
  tp = n_pos - starts  # positives >= each value
  ap = float(np.dot(counts.astype(np.float64), tp / (tp + (n_neg - below)))) / n_pos
  return auroc, ap


def _layout(d: ClassMaps, fold: np.ndarray, folds: int) -> tuple[np.ndarray, np.ndarray]:
  """Where each fold's negatives and positives start in a candidate's buffer (`_candidate_np`):
  (folds + 1,) offsets of the negatives, then (folds + 1,) of the positives."""
  row_pos = np.count_nonzero(d.mask.reshape(d.n, -1), axis=1)
  fold_pos = np.bincount(fold, weights=row_pos, minlength=folds).astype(np.int64)
  fold_px = np.bincount(fold, minlength=folds).astype(np.int64) * int(np.prod(d.shape))
  neg_at = np.r_[0, np.cumsum(fold_px - fold_pos)]
  return neg_at, neg_at[-1] + np.r_[0, np.cumsum(fold_pos)]


def _candidate_np(d: ClassMaps, v: np.ndarray, fold: np.ndarray, n_folds: int,
                  layout: tuple[np.ndarray, np.ndarray], pool_sizes: Sequence[int],
                  work: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(pixel (1 + n_folds, 2), image (len(pool_sizes), n)) figures of the scoring vector `v` on the
  host. `scoring.score_host` scores up to 32 rows of a fold at a time; their negative and
  positive pixel scores go to `work` ((H W n,) float32, reused: fresh pages are slow to fault
  in), laid out [negatives of fold 0, 1, ... | positives of fold 0, 1, ...]. Each fold's part is
  sorted and counted (`sorted_auroc_ap`), then all negatives and all positives.

  Args:
    fold: (n,) int64 fold of each row in [0, max(n_folds, 1)); layout: `_layout`'s.
  """
  image = np.zeros((len(pool_sizes), d.n), np.float32)
  folds, (neg_at, pos_at) = max(n_folds, 1), layout
  for k in range(folds):
    rows_k, n_at, p_at = np.flatnonzero(fold == k), neg_at[k], pos_at[k]
    for i in range(0, len(rows_k), 32):
      rows = rows_k[i:i + 32]
      for j, p in enumerate(pool_sizes):  # the same map for every box size
        s, image[j, rows] = scoring.score_host(d.rec[rows], d.ref[rows], v, p, chunk=32)
      m = d.mask[rows]
      neg, pos = s[~m], s[m]
      work[n_at:n_at + len(neg)], work[p_at:p_at + len(pos)] = neg, pos
      n_at, p_at = n_at + len(neg), p_at + len(pos)
  parts = []
  for k in range(folds):
    neg, pos = work[neg_at[k]:neg_at[k + 1]], work[pos_at[k]:pos_at[k + 1]]
    neg.sort()
    pos.sort()
    parts.append(sorted_auroc_ap(neg, pos))
  if folds == 1:  # all rows are one fold: no folds (n_folds 0) or one
    return np.asarray(parts * (1 + n_folds)), image
  neg, pos = work[:neg_at[-1]], work[neg_at[-1]:pos_at[-1]]  # the folds' sorted runs, merged
  neg.sort()
  pos.sort()
  return np.asarray([sorted_auroc_ap(neg, pos)] + parts), image


@functools.cache
def _threads() -> concurrent.futures.ThreadPoolExecutor:
  """The CPU path's worker threads, kept for the process: a new thread gets a new malloc arena,
  which keeps the memory freed in it (with fresh threads, host memory grew ~90 MB per class scored)."""
  return concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1,
                                               thread_name_prefix="calibration")


def class_figures(d: ClassMaps, vectors: np.ndarray, pool_sizes: Sequence[int],
                  n_folds: int) -> np.ndarray:
  """Figures of every candidate scoring vector on one class.

  Args:
    d: the class's maps ('rec', 'ref' (N, H, W) float32, 'mask' (N, H, W) bool, 'label' (N,),
      'source' (N,) int).
    vectors: (C, 7) scoring vectors (`candidate_vectors`, or a named scoring's).
    n_folds: folds (rows with `source` % n_folds == k), 0 for none.
  Returns:
    (C, len(pool_sizes), 1 + n_folds, 4) float64 figures in FIGURE_KEYS order on all
    rows, then on each fold; NaN where undefined.
  """
  n, (h, w) = d.n, d.shape
  for p in pool_sizes:
    if p > h or p > w:
      raise ValueError(f"calibration.pool_sizes: {p} exceeds the map size {(h, w)}")
  fold = (d.source % n_folds if n_folds else np.zeros(n, np.int64)).astype(np.int64)
  if d.device:
    padded = d.rec.shape[0]
    batch = max(1, min(len(vectors), _PIXEL_BUDGET // max(padded * h * w, 1)))
    pixel, image = _score(d.rec, d.ref, d.mask,
                          jnp.asarray(np.pad(fold, (0, padded - n),
                                             constant_values=max(n_folds, 1)).astype(np.int32)),
                          jnp.asarray(vectors, jnp.float32), n_folds=n_folds,
                          pool_sizes=tuple(int(p) for p in pool_sizes), batch=batch)
    pixel, image = np.asarray(pixel, np.float64), np.asarray(image)[:, :, :n]
  else:
    threads = max(1, min(os.cpu_count() or 1, len(vectors),
                         _HOST_BUDGET // max(4 * d.rec.size, 1)))
    spaces = [np.empty(d.rec.size, np.float32) for _ in range(threads)]
    layout = _layout(d, fold, max(n_folds, 1))

    def run(t):  # thread t scores candidates t, t + threads, ...
      return [_candidate_np(d, vectors[c], fold, n_folds, layout, pool_sizes, spaces[t])
              for c in range(t, len(vectors), threads)]

    done = list(_threads().map(run, range(threads)))  # numpy and XLA drop the GIL
    del spaces
    by_candidate = [done[c % threads][c // threads] for c in range(len(vectors))]
    pixel = np.stack([p for p, _ in by_candidate])
    image = np.stack([i for _, i in by_candidate])
  out = np.full((len(vectors), len(pool_sizes), 1 + n_folds, 4), np.nan)
  subsets = [np.ones(n, bool)] + [fold == k for k in range(n_folds)]
  for c in range(len(vectors)):
    for j in range(len(pool_sizes)):
      for f, rows in enumerate(subsets):
        im = _image_figures(image[c, j, rows], d.label[rows])
        out[c, j, f] = [np.nan if im[k] is None else im[k] for k in ("i_auroc", "i_ap")] + list(
            pixel[c, f])
  return out
