"""Scoring calibrated on normal training data only. Maps are (N, H, W); candidates are scoring
vectors (`onenip_jax.evaluation.scoring`), scored one class at a time by
`onenip_jax.evaluation.candidates` (jnp on a GPU or TPU, the sort in numpy on the CPU).

The validation set of a class is its held-out normal training images (`index.holdout`, label 0,
empty masks) and K synthetic anomalies made from each by the training synthesis with another seed
(`holdout.calibrate` collects its maps). Calibration then
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
(`"global"`, used with pool prompts and exports, fitted on pool-prompt maps), where the figures
are the mean over the classes of each class's figures.

Streaming: the figures of a class depend only on its own maps and on the statistics used, so
`calibrate` reads one class at a time (its argument may be a lazy mapping): a first pass over the
normal rows gives each class's statistics and, combined (float64 count, mean and squared
deviations), the global ones; a second pass scores every candidate of a class with both and keeps
only the figures. Host memory holds one class's maps (and, on the CPU, a float32 buffer of one
candidate's pixel scores per thread).

A calibration is a JSON-able dict (stored with the final checkpoint and in metrics.json):
  {"method": METHOD, "per_class": {cls: PARAMS}, "global": PARAMS, "prompt_mode", ...}
  PARAMS = {"rec_mean", "rec_std", "ref_mean", "ref_std", "ref_space", "weight", "pool_size",
            "objective", "validation": {i_auroc, i_ap, p_auroc, p_ap} of the choice, "n_normal",
            "n_synthetic", "prompt_mode" (of the maps it was fitted on), "candidates":
            [{"ref_space", "weight", "pool_size", i_auroc, i_ap, p_auroc, p_ap, "objective", "se",
            "within_se"}]}
  (ref_mean / ref_std of the chosen `ref_space`).
A calibration stored before `ref_space` existed (no key) is in "probability" space for every w and
is applied as it was chosen.
"""
import math
from typing import Mapping, Optional, Sequence

import numpy as np

from onenip_jax.evaluation import scoring
from onenip_jax.evaluation.candidates import (FIGURE_KEYS, ClassMaps, candidate_vectors,
                                              class_figures)

METHOD = "zlogodds-1se5-v2"
OBJECTIVE_KEYS = FIGURE_KEYS
FOLDS = 5
_STD_FLOOR = 1e-12
_TIE = 1e-9
_SPACES = ("logodds", "probability")


class PromptModeError(ValueError):
  """A calibration applied with prompts other than those it was fitted with."""


def _moments(x: np.ndarray) -> tuple[int, float, float]:
  """(count, mean, sum of squared deviations) of `x` in float64."""
  x = np.asarray(x, np.float64).reshape(-1)
  mean = float(x.mean()) if x.size else 0.0
  return x.size, mean, float(np.square(x - mean).sum())


def _combine(parts: Sequence[tuple[int, float, float]]) -> tuple[int, float, float]:
  """`_moments` of the concatenation of the parts (Chan et al.'s pairwise update)."""
  n, mean, m2 = 0, 0.0, 0.0
  for nb, mb, m2b in parts:
    if nb:
      total = n + nb
      delta = mb - mean
      mean, m2, n = mean + delta * nb / total, m2 + m2b + delta * delta * n * nb / total, total
  return n, mean, m2


def ref_values(ref: np.ndarray, space: str) -> np.ndarray:
  """The refiner map (N, H, W) float32 in `space`: "logodds" (`scoring.logodds`) or
  "probability"."""
  if space == "logodds":
    return np.asarray(scoring.logodds(ref))
  if space == "probability":
    return np.asarray(ref, np.float32)
  raise ValueError(f"unknown calibration ref_space {space!r}")


def _class_moments(rec: np.ndarray, ref: np.ndarray) -> dict:
  """{"rec", "logodds", "probability": `_moments`} of a class's normal maps (n, H, W)."""
  return {"rec": _moments(rec), **{s: _moments(ref_values(ref, s)) for s in _SPACES}}


def _stats(moments: Mapping) -> dict:
  """{ref_space: `normal_stats`-like dict} from `_class_moments` (or their `_combine`)."""
  def mean_std(m):
    n, mean, m2 = m
    return mean, max(math.sqrt(m2 / n), _STD_FLOOR)
  rec_mean, rec_std = mean_std(moments["rec"])
  out = {}
  for space in _SPACES:
    ref_mean, ref_std = mean_std(moments[space])
    out[space] = {"rec_mean": rec_mean, "rec_std": rec_std, "ref_mean": ref_mean,
                  "ref_std": ref_std, "ref_space": space}
  return out


def normal_stats(rec: np.ndarray, ref: np.ndarray, ref_space: str = "logodds") -> dict:
  """Pixel mean and std (float64 accumulation) of the maps (N, H, W) of normal images, the
  refiner's in `ref_space` (`ref_values`)."""
  return _stats(_class_moments(rec, ref))[ref_space]


def _none(x: float) -> Optional[float]:
  return None if not np.isfinite(x) else float(x)


def _mean_figures(per_class: Sequence[np.ndarray]) -> np.ndarray:
  """The mean over classes of `class_figures` (the defined ones; NaN when none is)."""
  stack = np.stack(per_class)
  count = np.sum(np.isfinite(stack), axis=0)
  total = np.nansum(stack, axis=0)
  return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _objective(values: np.ndarray) -> np.ndarray:
  """The mean of the defined figures (last axis, OBJECTIVE_KEYS order); NaN when none is."""
  count = np.sum(np.isfinite(values), axis=-1)
  return np.where(count > 0, np.nansum(values, axis=-1) / np.maximum(count, 1), np.nan)


def _candidates(figures: np.ndarray, grid: Sequence[tuple[str, float]],
                pool_sizes: Sequence[int]) -> tuple[list, np.ndarray]:
  """(candidate rows in grid-major order, (C, folds) objectives on each fold) from (averaged)
  `class_figures`."""
  rows, folds = [], []
  for c, (space, w) in enumerate(grid):
    for j, p in enumerate(pool_sizes):
      row = {"ref_space": space, "weight": float(w), "pool_size": int(p)}
      row.update({k: _none(figures[c, j, 0, i]) for i, k in enumerate(OBJECTIVE_KEYS)})
      row["objective"] = float(_objective(figures[c, j, 0]))
      rows.append(row)
      folds.append(_objective(figures[c, j, 1:]))
  return rows, np.asarray(folds).reshape(len(rows), -1)


def select(candidates: Sequence[dict], fold_objectives: np.ndarray, default_pool_size: int) -> dict:
  """The chosen candidate (module doc, step 3); sets "se" (of its paired difference from the
  best) and "within_se" on every candidate.

  Args:
    candidates: rows as PARAMS' "candidates"; fold_objectives: (len(candidates), folds).
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


def _params(stats: Mapping, figures: np.ndarray, grid, pool_sizes, default_pool_size: int,
            n_normal: int, n_rows: int) -> dict:
  """PARAMS (module doc) from the (class-averaged) `class_figures`."""
  candidates, per_fold = _candidates(figures, grid, pool_sizes)
  best = select(candidates, per_fold, default_pool_size)
  return dict(stats[best["ref_space"]], weight=best["weight"], pool_size=best["pool_size"],
              objective=best["objective"], validation={k: best[k] for k in OBJECTIVE_KEYS},
              n_normal=n_normal, n_synthetic=n_rows - n_normal, candidates=candidates)


def _normal_part(g: Mapping) -> dict:
  """The held-out normal rows of a class's maps: {'rec', 'ref', 'source'}."""
  rows = np.flatnonzero(np.asarray(g["normal"]))
  return {k: np.asarray(g[k])[rows] for k in ("rec", "ref", "source")}


def calibrate(groups: Mapping[str, Mapping], calib_cfg, default_pool_size: int, *,
              global_groups: Optional[Mapping[str, Mapping]] = None,
              normals: Optional[Mapping[str, Mapping]] = None,
              global_normals: Optional[Mapping[str, Mapping]] = None,
              reference: Optional[tuple[float, float, int]] = None,
              prompt_mode: str = "class", global_prompt_mode: Optional[str] = None
              ) -> Optional[dict]:
  """Per-class and global calibration (module doc), reading one class at a time.

  Args:
    groups: {class: {'rec', 'ref' (N, H, W) float32, 'mask' (N, H, W) bool, 'label' (N,) int,
      'normal' (N,) bool: a held-out normal image (else synthetic), 'source' (N,) int: the
      class's held-out image the row is or was made from}}, possibly lazy: each class is read
      once by the scoring pass (and once by the statistics pass when `normals` is None).
    calib_cfg: config.calibration (weights, pool_sizes).
    global_groups: the maps the global parameters are fitted on (default `groups`), e.g. made
      with pool prompts; read once per class more when given.
    normals, global_normals: {class: {'rec', 'ref', 'source'}} of the normal rows only, to read
      for the statistics instead of `groups` / `global_groups`.
    reference: (c, alpha, pool_size): adds "reference_validation", the figures of
      (1 - alpha) rec + alpha c ref, to each PARAMS.
    prompt_mode, global_prompt_mode: the prompts of `groups` and of `global_groups` (default
      `prompt_mode`), recorded in the PARAMS.
  Returns:
    {"method", "per_class": {cls: PARAMS}, "global": PARAMS}, or None without any class with
    normal rows.
  """
  weights = tuple(float(w) for w in calib_cfg.weights)
  pools = tuple(int(p) for p in calib_cfg.pool_sizes)
  if not weights or not all(0.0 <= w <= 1.0 for w in weights):
    raise ValueError(f"calibration.weights={weights}: need values in [0, 1]")
  grid = [("logodds", w) for w in weights] + [("probability", 1.0)]
  separate = global_groups is not None
  global_groups = groups if global_groups is None else global_groups

  def read_normals(maps, given):
    out = {}
    for c in maps:
      part = given[c] if given is not None else _normal_part(maps[c])
      if len(part["rec"]):
        out[c] = {"moments": _class_moments(part["rec"], part["ref"]), "n": len(part["rec"]),
                  "images": int(np.max(part["source"])) + 1}
    return out

  own = read_normals(groups, normals)
  shared = read_normals(global_groups, global_normals) if separate or global_normals else own
  if not own or not shared:
    return None
  global_stats = _stats({k: _combine([v["moments"][k] for v in shared.values()])
                         for k in ("rec",) + _SPACES})
  global_folds = min(FOLDS, min(v["images"] for v in shared.values()))
  global_vectors = candidate_vectors(global_stats, grid)
  ref_vector, ref_pool = None, None
  if reference is not None:
    c, alpha, ref_pool = reference
    ref_vector = scoring.vector(scoring.scoring_params("reference", alpha=alpha, c=c))[None]
    ref_pool = (int(ref_pool),)

  def reference_figures(g):
    return class_figures(g, ref_vector, ref_pool, 0)

  per_class, global_figs, global_ref, global_rows = {}, [], [], 0
  for c in groups:
    if c not in own:
      continue
    g = ClassMaps(groups[c], c)  # the host maps are dropped here
    stats, n_rows = _stats(own[c]["moments"]), g.n
    figs = class_figures(g, candidate_vectors(stats, grid), pools, min(FOLDS, own[c]["images"]))
    per_class[c] = _params(stats, figs, grid, pools, default_pool_size, own[c]["n"], n_rows)
    per_class[c]["prompt_mode"] = prompt_mode
    if reference is not None:
      per_class[c]["reference_validation"] = _reference_row(reference_figures(g), alpha, ref_pool)
    if not separate and c in shared:
      global_figs.append(class_figures(g, global_vectors, pools, global_folds))
      global_rows += n_rows
      if reference is not None:
        global_ref.append(reference_figures(g))
    del g
  if separate:
    for c in global_groups:
      if c not in shared:
        continue
      g = ClassMaps(global_groups[c], c)
      global_figs.append(class_figures(g, global_vectors, pools, global_folds))
      global_rows += g.n
      if reference is not None:
        global_ref.append(reference_figures(g))
      del g
  n_normal = sum(v["n"] for v in shared.values())
  fitted = _params(global_stats, _mean_figures(global_figs), grid, pools, default_pool_size,
                   n_normal, global_rows)
  fitted["prompt_mode"] = global_prompt_mode or prompt_mode
  if reference is not None:
    fitted["reference_validation"] = _reference_row(_mean_figures(global_ref), alpha, ref_pool)
  return {"method": METHOD, "per_class": per_class, "global": fitted}


def _reference_row(figures: np.ndarray, alpha: float, pool_sizes) -> dict:
  """The candidate row of the reference fusion's (class-averaged) `class_figures`."""
  return _candidates(figures, [("probability", float(alpha))], pool_sizes)[0][0]


def fitted_prompt_mode(calibration: Mapping, params: Mapping) -> Optional[str]:
  """The prompts `params` (of `calibration`) were fitted with: its own "prompt_mode", else the
  calibration's (stored before each PARAMS recorded it), else None (unknown)."""
  return params.get("prompt_mode", calibration.get("prompt_mode"))


def _params_and_name(calibration: Mapping, cls: Optional[str]) -> tuple[dict, str]:
  if cls is not None and cls in calibration["per_class"]:
    return calibration["per_class"][cls], f"class {cls!r}"
  return calibration["global"], "global" if cls is None else f"global (class {cls!r} has none)"


def prompt_mode_error(calibration: Mapping, prompt_mode: str,
                      classes: Sequence[str] = ()) -> Optional[str]:
  """Why `calibration` cannot score `prompt_mode` prompts ("pool": its global parameters;
  "class": those of `classes`), or None if it can: parameters fitted with other prompts."""
  for cls in ([None] if prompt_mode == "pool" else list(classes)):
    params, name = _params_and_name(calibration, cls)
    fitted = fitted_prompt_mode(calibration, params)
    if fitted != prompt_mode:
      return (f"the {name} calibration was fitted with {fitted or 'unrecorded'} prompts, not "
              f"{prompt_mode} prompts: rerun `onenip-train` with the same --workdir and "
              f"--config.eval.prompt_mode={prompt_mode} to recalibrate it, or score with "
              f"--config.eval.fusion=reference")
  return None


def params_for(calibration: Mapping, cls: Optional[str]) -> dict:
  """PARAMS of class `cls` with class prompts (its own, else the global ones), or the global
  ones for pool prompts (cls None). Raises PromptModeError if they were fitted with other
  prompts (`prompt_mode_error`)."""
  why = prompt_mode_error(calibration, "pool" if cls is None else "class", [cls])
  if why:
    raise PromptModeError(why)
  return _params_and_name(calibration, cls)[0]


def summary(calibration: Optional[Mapping]) -> str:
  """One line per class (and 'global'): the chosen w, box size and validation objective."""
  if not calibration:
    return "no calibration"
  items = list(calibration["per_class"].items()) + [("global", calibration["global"])]
  return "\n".join(
      f"{c}: w={p['weight']:.1f} pool={p['pool_size']} validation mean "
      f"{100 * p['objective']:.2f} ({p['n_normal']} normal + {p['n_synthetic']} synthetic, "
      f"{p.get('prompt_mode', '?')} prompts)" for c, p in items)
