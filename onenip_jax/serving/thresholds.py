"""The image-score thresholds of an export (one per class and a global one).

Where their images come from (held-out normals by default, a labelled validation folder, or the test
set) is the module doc of `onenip_jax.serving.export`. A threshold is set on the export's scoring
(`fusion.make_scoring`, computed by `scoring.score` as the exported program does) with pool prompts;
an image is anomalous iff score > threshold.
"""
import numpy as np

from data_pipelines import indexing, layouts, storage
from data_pipelines.errors import UserError, UserFileNotFoundError
from onenip_jax.evaluation import maps as maps_lib
from onenip_jax.evaluation import metrics, scoring
from onenip_jax.evaluation import inference


def normal_quantile(scores: np.ndarray, target_fpr: float) -> float:
  """The lowest threshold t among the scores with #(normal score > t) <= target_fpr * n."""
  s = np.sort(np.asarray(scores, np.float64))[::-1]
  k = int(np.floor(target_fpr * len(s) + 1e-9))
  return float(s[min(k, len(s) - 1)])


def _threshold_entry(scores, labels, source: str, target_fpr: float, note: str = "") -> dict:
  scores, labels = np.asarray(scores, np.float64), np.asarray(labels) > 0
  normal = scores[~labels]
  if labels.any() and normal.size:
    f1, t = metrics.f1_max(scores, labels)
    # f1_max predicts anomalous iff score >= t; the export's rule is score > threshold.
    entry = {"value": float(np.nextafter(t, -np.inf)), "method": "f1-max", "f1": f1}
  elif normal.size:
    entry = {"value": normal_quantile(normal, target_fpr), "method": "normal-quantile",
             "target_fpr": target_fpr}
  else:
    raise UserError(f"no normal image to set a threshold from ({source})")
  value = entry["value"]
  entry.update({"source": source, "n_normal": int(normal.size), "n_anomalous": int(labels.sum()),
                "fpr_on_source": float(np.mean(normal > value)) if normal.size else None})
  if note:
    entry["note"] = note
  return entry


def _class_scores(trained: inference.Trained, entry: dict, samples) -> dict:
  """{class: (pool-mode image scores of the scoring `entry` (n,), labels (n,))}, one class at a
  time."""
  cfg, index, predictor = trained.cfg, trained.index, trained.predictor_for("pool")
  out = {}
  for cls, rows in indexing.class_rows(samples, index.classes):
    subset = [samples[i] for i in rows]
    maps = maps_lib.collect_maps(predictor, subset, index, cfg)
    _, scores = scoring.score_host(maps["rec"], maps["ref"], scoring.vector(entry["params"]),
                                   entry["pool_size"])
    labels = np.where(maps["has_mask"], maps["mask"].any(axis=(1, 2)), maps["label"] > 0)
    out[cls] = (scores, labels.astype(np.int32))
  return out


def make_thresholds(trained: inference.Trained, entry: dict, samples, source: str,
                    target_fpr: float, note: str = "", class_sources: dict | None = None) -> dict:
  """{'global': entry, 'per_class': {class: entry}, 'scoring': name} from `samples` (module doc),
  on the export's scoring `entry` (`fusion.make_scoring`) with `trained`'s pool prompts.
  `class_sources`: {class: (source, note)} for classes whose samples come from elsewhere than
  `source`."""
  class_sources = class_sources or {}
  by_class = _class_scores(trained, entry, samples)
  per_class = {}
  for c, (s, l) in by_class.items():
    src, why = class_sources.get(c, (source, note))
    per_class[c] = _threshold_entry(s, l, src, target_fpr, why)
  used = sorted({e["source"] for e in per_class.values()})
  scores = np.concatenate([s for s, _ in by_class.values()])
  labels = np.concatenate([l for _, l in by_class.values()])
  glob = _threshold_entry(scores, labels, "+".join(used), target_fpr,
                          note if used == [source] else "pooled over the per-class sources")
  return {"global": glob, "per_class": per_class, "scoring": entry["fusion"]}


def threshold_normals(index, pool: inference.PromptPool, fraction: float, seed: int,
                      classes=None) -> list:
  """A `fraction` (at least 1) of each class's normal training images, prompt images excluded."""
  rng = np.random.default_rng(seed + 1)
  taken = set(pool.paths)
  chosen = []
  for cls in index.classes if classes is None else classes:
    cand = [s for s in index.train if s.cls == cls and s.label == 0 and s.path not in taken]
    if not cand:
      raise UserError(f"class {cls!r} has no normal training image outside the prompt pool to "
                      "set a threshold from; pass --threshold-dir or --threshold-fraction 0")
    n = max(1, int(round(fraction * len(cand))))
    chosen += [cand[i] for i in sorted(rng.choice(len(cand), size=n, replace=False))]
  return chosen


def default_threshold_samples(index, pool: inference.PromptPool, fraction: float,
                              seed: int) -> tuple[list, dict]:
  """(samples, {class: (source, note)}) of the default thresholds (module doc): each class's
  held-out normals, else `threshold_normals` of its training images."""
  held = {s.cls for s in index.holdout}
  rest = [c for c in index.classes if c not in held]
  sources = {c: ("holdout-normals", "held-out normal training images (calibration."
                 "holdout_fraction): never trained on; also the calibration's normal set")
             for c in held}
  sources.update({c: ("train-normals", f"{fraction:g} of the class's normal training images "
                      "(prompt images excluded); they were seen in training") for c in rest})
  samples = [s for s in index.holdout if s.label == 0]
  if rest:
    samples += threshold_normals(index, pool, fraction, seed, rest)
  return samples, sources


def validation_samples(folder: str, classes) -> list:
  """Samples of a labelled validation folder `<folder>/<class>/good/*`, `<folder>/<class>/<defect>/*`."""
  samples = []
  for cls in classes:
    d = storage.join_inside(folder, cls, what="class name")
    if not storage.isdir(d):
      raise UserFileNotFoundError(f"validation folder {folder} has no folder for class {cls!r} ({d})")
    for sub in sorted(storage.listdir(d)):
      files = sorted(f for f in storage.listdir(storage.join(d, sub))
                     if f.lower().endswith(storage.IMAGE_EXTENSIONS)) \
          if storage.isdir(storage.join(d, sub)) else []
      label = 0 if sub in layouts.NORMAL_FOLDERS else 1
      samples += [indexing.Sample(storage.join(d, sub, f), cls, label, None, sub) for f in files]
    if not any(s.cls == cls and s.label == 0 for s in samples):
      raise UserError(f"validation folder {d} has no normal images (expected {d}/good/)")
  return samples
