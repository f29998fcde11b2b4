"""Scoring calibrated on normal training data only (issue 13). Pure numpy; maps are (N, H, W).

The validation set of a class is its held-out normal training images (`index.holdout`, label 0,
empty masks) and K synthetic anomalies made from each by the training synthesis with another seed
(`validation.calibrate_predictor` collects its maps). Calibration then
  1. normalises each map by its pixel mean / std on the held-out NORMAL images, the refiner's in
     log-odds (its probabilities are nearly binary: their std on normals is ~1e-4, which made any
     w > 0 rank pixels by the refiner alone):
       z_rec = (rec - m_rec) / s_rec,  z_ref = (logodds(ref) - m_ref) / s_ref;
  2. scores every refiner weight w in `calibration.weights` and image-score box size in
     `calibration.pool_sizes` by the mean of I-AUROC, I-AP, P-AUROC and P-AP on the validation set
     for the map S = (1 - w) z_rec + w z_ref (w = 1: refiner only, 0: reconstruction only), and
     the refiner's own probability map (w = 1, `ref_space` "probability": the same pixel ranking
     as log-odds w = 1, but its box means pool probabilities);
  3. takes, among the candidates whose objective is within one standard error of the best one's,
     the box size nearest `eval.pool_size`, then the largest w, then the probability map: the
     refiner is the head trained to output the map, so mixing its input back in, or re-scaling its
     output, must beat the noise of a small validation set. The standard error is that of the
     paired difference over `FOLDS` folds of the held-out images (an image and the synthetic
     anomalies made from it share a fold).
This is done per class (used with class prompts) and once for all classes with shared statistics
(`"global"`, used with pool prompts, where the objective is the mean over the classes).

A calibration is a JSON-able dict (stored with the final checkpoint and in metrics.json):
  {"method": METHOD, "per_class": {cls: PARAMS}, "global": PARAMS, "prompt_mode", ...}
  PARAMS = {"rec_mean", "rec_std", "ref_mean", "ref_std", "ref_space", "weight", "pool_size",
            "objective", "validation": {i_auroc, i_ap, p_auroc, p_ap} of the choice, "n_normal",
            "n_synthetic", "candidates": [{"ref_space", "weight", "pool_size", i_auroc, i_ap,
            p_auroc, p_ap, "objective", "se", "within_se"}]}
  (ref_mean / ref_std of the chosen `ref_space`).
A calibration stored before `ref_space` existed (no key) is in "probability" space for every w and
is applied as it was chosen.
"""
from typing import Mapping, Optional, Sequence

import numpy as np

from onenip_jax import metrics, scoring

METHOD = ("z-scores (refiner in log-odds) and the refiner's probabilities; largest weight within "
          "one paired SE of the best (5 folds)")
OBJECTIVE_KEYS = ("i_auroc", "i_ap", "p_auroc", "p_ap")
FOLDS = 5
_STD_FLOOR = 1e-12
_TIE = 1e-9


def ref_values(ref: np.ndarray, space: str) -> np.ndarray:
  """The refiner map (N, H, W) float32 in `space`: "logodds" (`scoring.logodds`) or
  "probability"."""
  if space == "logodds":
    return scoring.logodds_np(ref)
  if space == "probability":
    return np.asarray(ref, np.float32)
  raise ValueError(f"unknown calibration ref_space {space!r}")


def normal_stats(rec: np.ndarray, ref: np.ndarray, ref_space: str = "logodds") -> dict:
  """Pixel mean and std (float64 accumulation) of the maps (N, H, W) of normal images, the
  refiner's in `ref_space` (`ref_values`)."""
  rec, ref = np.asarray(rec, np.float64), np.asarray(ref_values(ref, ref_space), np.float64)
  return {"rec_mean": float(rec.mean()), "rec_std": float(max(rec.std(), _STD_FLOOR)),
          "ref_mean": float(ref.mean()), "ref_std": float(max(ref.std(), _STD_FLOOR)),
          "ref_space": ref_space}


def fuse(rec: np.ndarray, ref: np.ndarray, stats: Mapping, weight: float) -> np.ndarray:
  """(N, H, W) float32 map (1 - w) (rec - m_rec) / s_rec + w (g(ref) - m_ref) / s_ref, g the
  `stats["ref_space"]` transform (`ref_values`)."""
  z_rec = (np.asarray(rec, np.float32) - np.float32(stats["rec_mean"])) / np.float32(stats["rec_std"])
  if weight == 0.0:
    return z_rec
  z_ref = ((ref_values(ref, stats.get("ref_space", "probability")) - np.float32(stats["ref_mean"]))
           / np.float32(stats["ref_std"]))
  if weight == 1.0:
    return z_ref
  return np.float32(1.0 - weight) * z_rec + np.float32(weight) * z_ref


def box_max(maps: np.ndarray, pool_size: int) -> np.ndarray:
  """(N, H, W) -> (N,) max of the stride-1 VALID `pool_size`-box mean (as `scoring.image_scores`)."""
  n, h, w = maps.shape
  if pool_size > h or pool_size > w:
    raise ValueError(f"calibration.pool_sizes: {pool_size} exceeds the map size {(h, w)}")
  k, out = int(pool_size), np.zeros(n, np.float32)
  for i in range(0, n, 32):  # float64 integral images, 32 maps at a time
    c = np.zeros((len(maps[i:i + 32]), h + 1, w + 1))
    c[:, 1:, 1:] = np.asarray(maps[i:i + 32], np.float64).cumsum(1).cumsum(2)
    box = c[:, k:, k:] - c[:, :-k, k:] - c[:, k:, :-k] + c[:, :-k, :-k]
    out[i:i + 32] = box.reshape(len(c), -1).max(axis=1) / (k * k)
  return out


def _objective(figures: Mapping) -> float:
  values = [figures[k] for k in OBJECTIVE_KEYS if figures.get(k) is not None]
  return float(np.mean(values)) if values else float("nan")


def _pixel_figures(maps: np.ndarray, masks: np.ndarray) -> dict:
  p_auroc, p_ap = metrics.pixel_auroc_ap(maps, masks)
  return {"p_auroc": p_auroc, "p_ap": p_ap}


def _image_figures(scores: np.ndarray, labels: np.ndarray) -> dict:
  return {"i_auroc": metrics.auroc(scores, labels), "i_ap": metrics.average_precision(scores, labels)}


def candidate_figures(groups: Sequence[Mapping], stats: Mapping, weight: float,
                      pool_sizes: Sequence[int]) -> list:
  """Validation figures of weight `weight` for each box size, averaged over `groups`.

  Args:
    groups: one dict per class: 'rec', 'ref' (N, H, W) maps, 'mask' (N, H, W) bool, 'label' (N,).
    stats: `normal_stats` output used for every group.
  Returns:
    [{"ref_space", "weight", "pool_size", i_auroc, i_ap, p_auroc, p_ap, "objective"}] in
    `pool_sizes` order.
  """
  per_group = []
  for g in groups:
    s = fuse(g["rec"], g["ref"], stats, weight)
    pix = _pixel_figures(s, g["mask"])
    per_group.append([dict(pix, **_image_figures(box_max(s, p), g["label"])) for p in pool_sizes])
  out = []
  for j, p in enumerate(pool_sizes):
    row = {"ref_space": stats.get("ref_space", "probability"), "weight": float(weight),
           "pool_size": int(p)}
    for k in OBJECTIVE_KEYS:
      vals = [fig[j][k] for fig in per_group if fig[j][k] is not None]
      row[k] = float(np.mean(vals)) if vals else None
    row["objective"] = _objective(row)
    out.append(row)
  return out


def _folds(groups: Sequence[Mapping]) -> list:
  """The groups split into folds: fold k holds the rows with `source` % folds == k, folds =
  min(FOLDS, held-out images of the smallest group). [fold][group] -> maps as `groups`."""
  folds = min(FOLDS, min(int(g["source"].max()) + 1 for g in groups))
  return [[{key: g[key][g["source"] % folds == k] for key in ("rec", "ref", "mask", "label")}
           for g in groups] for k in range(folds)]


def _fold_objectives(folds: Sequence[Sequence[Mapping]], stats: Mapping, weight: float,
                     pool_sizes: Sequence[int]) -> np.ndarray:
  """(len(pool_sizes), len(folds)) objectives of `weight` on each fold (`_folds`)."""
  return np.asarray([[c["objective"] for c in candidate_figures(parts, stats, weight, pool_sizes)]
                     for parts in folds]).T


def select(candidates: Sequence[dict], fold_objectives: np.ndarray, default_pool_size: int) -> dict:
  """The chosen candidate (module doc, step 3); sets "se" (of its paired difference from the
  best) and "within_se" on every candidate.

  Args:
    candidates: `candidate_figures` rows; fold_objectives: (len(candidates), folds) objectives.
  """
  objs = np.asarray([c["objective"] if np.isfinite(c["objective"]) else -np.inf
                     for c in candidates])
  best = int(np.argmax(objs))
  diffs = fold_objectives[best][None, :] - fold_objectives
  if diffs.shape[1] > 1:
    se = np.nan_to_num(np.nanstd(diffs, axis=1, ddof=1) / np.sqrt(diffs.shape[1]))
  else:
    se = np.zeros(len(candidates))
  for c, o, e in zip(candidates, objs, se):
    c["se"], c["within_se"] = float(e), bool(objs[best] - o <= e + _TIE)
  tied = [c for c in candidates if c["within_se"]]
  return dict(min(tied, key=lambda c: (abs(c["pool_size"] - default_pool_size), -c["weight"],
                                        c["ref_space"] != "probability")))


def fit(groups: Sequence[Mapping], normal_rows: Sequence[np.ndarray], weights: Sequence[float],
        pool_sizes: Sequence[int], default_pool_size: int) -> dict:
  """PARAMS (module doc) for `groups` with statistics over their normal rows.

  Args:
    groups: per-class validation maps (see `candidate_figures`) and 'source' (N,) int: the
      held-out image each row is, or was made from.
    normal_rows: per group, the (n,) rows of the held-out normal images (statistics).
  """
  rec = np.concatenate([g["rec"][r] for g, r in zip(groups, normal_rows)])
  ref = np.concatenate([g["ref"][r] for g, r in zip(groups, normal_rows)])
  stats = {space: normal_stats(rec, ref, space) for space in ("logodds", "probability")}
  del rec, ref
  grid = [("logodds", float(w)) for w in weights] + [("probability", 1.0)]
  folds, candidates, per_fold = _folds(groups), [], []
  for space, w in grid:
    candidates += candidate_figures(groups, stats[space], w, pool_sizes)
    per_fold.append(_fold_objectives(folds, stats[space], w, pool_sizes))
  best = select(candidates, np.concatenate(per_fold), default_pool_size)
  n_normal = int(sum(len(r) for r in normal_rows))
  return dict(stats[best["ref_space"]], weight=best["weight"], pool_size=best["pool_size"],
              objective=best["objective"], validation={k: best[k] for k in OBJECTIVE_KEYS},
              n_normal=n_normal, n_synthetic=int(sum(len(g["label"]) for g in groups)) - n_normal,
              candidates=candidates)


def calibrate(groups: Mapping[str, Mapping], calib_cfg, default_pool_size: int) -> Optional[dict]:
  """Per-class and global calibration (module doc) from validation maps.

  Args:
    groups: {class: {'rec', 'ref' (N, H, W) float32, 'mask' (N, H, W) bool, 'label' (N,) int,
      'normal' (N,) bool: a held-out normal image (else synthetic), 'source' (N,) int: the
      class's held-out image the row is or was made from}}; classes without rows absent.
    calib_cfg: config.calibration (weights, pool_sizes).
  Returns:
    {"method", "per_class": {cls: PARAMS}, "global": PARAMS}, or None without any group.
  """
  groups = {c: g for c, g in groups.items() if np.any(g["normal"])}
  if not groups:
    return None
  weights = tuple(float(w) for w in calib_cfg.weights)
  pools = tuple(int(p) for p in calib_cfg.pool_sizes)
  if not weights or not all(0.0 <= w <= 1.0 for w in weights):
    raise ValueError(f"calibration.weights={weights}: need values in [0, 1]")
  rows = {c: np.flatnonzero(g["normal"]) for c, g in groups.items()}
  per_class = {c: fit([g], [rows[c]], weights, pools, default_pool_size) for c, g in groups.items()}
  return {"method": METHOD, "per_class": per_class,
          "global": fit(list(groups.values()), list(rows.values()), weights, pools,
                        default_pool_size)}


def params_for(calibration: Mapping, cls: Optional[str]) -> dict:
  """PARAMS of class `cls` (its own, else the global ones); the global ones when cls is None."""
  if cls is not None and cls in calibration["per_class"]:
    return calibration["per_class"][cls]
  return calibration["global"]


def apply(rec: np.ndarray, ref: np.ndarray, params: Mapping) -> tuple[np.ndarray, np.ndarray]:
  """Calibrated (N, H, W) float32 anomaly maps and (N,) image scores."""
  s = fuse(rec, ref, params, params["weight"])
  return s, box_max(s, int(params["pool_size"]))


def summary(calibration: Optional[Mapping]) -> str:
  """One line per class (and 'global'): the chosen w, box size and validation objective."""
  if not calibration:
    return "no calibration"
  items = list(calibration["per_class"].items()) + [("global", calibration["global"])]
  return "\n".join(
      f"{c}: w={p['weight']:.1f} pool={p['pool_size']} validation mean "
      f"{100 * p['objective']:.2f} ({p['n_normal']} normal + {p['n_synthetic']} synthetic)"
      for c, p in items)


def add_reference_figures(calibration: dict, groups: Mapping[str, Mapping], c: float, alpha: float,
                          pool_size: int) -> None:
  """Adds "reference_validation" (figures of (1 - alpha) rec + alpha c ref, box `pool_size`) to
  each class's PARAMS and to the global ones (mean over classes), for comparison."""
  stats = {"rec_mean": 0.0, "rec_std": 1.0, "ref_mean": 0.0, "ref_std": 1.0 / c,
           "ref_space": "probability"}
  for cls, params in calibration["per_class"].items():
    params["reference_validation"] = candidate_figures([groups[cls]], stats, alpha, (pool_size,))[0]
  used = [groups[cls] for cls in calibration["per_class"]]
  calibration["global"]["reference_validation"] = candidate_figures(used, stats, alpha,
                                                                    (pool_size,))[0]
