"""The evaluation protocol of one class and the reports of a whole evaluation.

`class_protocol` turns a class's maps and scores into its metrics (the protocol of
`onenip_jax.evaluation.evaluate`'s module doc: labels from the resized masks, the `eval.maskless`
policy); `ReportBuilder` accumulates the classes one at a time and writes metrics.json / .md / .csv
(`onenip_jax.evaluation.reports`), scores.csv and the heatmaps.
"""
import csv
import io
import logging
import os

import numpy as np

from data_pipelines import storage
from onenip_jax.evaluation import heatmaps, metrics, reports

log = logging.getLogger("onenip")
MASKLESS_POLICIES = ("skip", "full")


def class_protocol(scores, anomaly_maps, masks, has_mask, sample_labels, maskless: str,
                   flip_auroc: bool = False) -> tuple[dict, np.ndarray, int]:
  """Metrics of one class under the evaluation protocol (module doc).

  Args:
    scores: (N,) image scores; anomaly_maps: (N, H, W) float32; masks: (N, H, W) bool.
    has_mask, sample_labels: (N,) whether the image has a mask file; its label (> 0 anomalous).
    maskless: "skip" (anomalies without mask left out of pixel metrics) or "full" (all-ones masks).
  Returns:
    (class_metrics dict, (N,) int32 image labels, number of anomalies without mask).
  """
  if maskless not in MASKLESS_POLICIES:
    raise ValueError(f"config.eval.maskless={maskless!r}: use one of {MASKLESS_POLICIES}")
  has_mask = np.asarray(has_mask, bool)
  labels = np.where(has_mask, masks.reshape(len(masks), -1).any(axis=1),
                    np.asarray(sample_labels) > 0).astype(np.int32)
  maskless_anomalies = ~has_mask & (labels > 0)
  if maskless == "full":
    masks = masks.copy()
    masks[maskless_anomalies] = True
    pix = np.ones(len(labels), bool)
  else:
    pix = ~maskless_anomalies
  pix_all = bool(pix.all())
  result = metrics.class_metrics(
      scores, labels, (anomaly_maps if pix_all else anomaly_maps[pix]) if pix.any() else None,
      (masks if pix_all else masks[pix]) if pix.any() else None, flip_auroc=flip_auroc)
  return result, labels, int(maskless_anomalies.sum())


class ReportBuilder:
  """Accumulates per-class results (one class at a time) and writes the reports."""

  def __init__(self, cfg, out_dir: str):
    self.cfg, self.out_dir = cfg, out_dir
    self.per_class, self.maskless, self.empty_masks = {}, {}, []
    self.alternatives = {}   # scoring name -> {class: metrics}
    self.score_rows = [("path", "class", "defect", "label", "score")]
    self.pool_hits = self.pool_total = 0

  def add_class(self, cls, samples, anomaly_maps, scores, masks, has_mask, *, pool_class_ids=None,
                class_ids=None, load_image=None, write_files=True) -> None:
    """Scores one class; `pool_class_ids`/`class_ids` (N,) count the pool's class accuracy."""
    e = self.cfg.eval
    result, labels, n_maskless = class_protocol(
        scores, anomaly_maps, masks, has_mask, [s.label for s in samples],
        e.get("maskless", "skip"), e.flip_auroc)
    self.per_class[cls] = result
    self.maskless[cls] = n_maskless
    self.empty_masks += empty_defect_masks(samples, masks, has_mask, self.cfg.input_size)
    self.score_rows += [(s.path, cls, s.defect, int(l), f"{v:.7g}")
                        for s, l, v in zip(samples, labels, scores)]
    if pool_class_ids is not None:
      self.pool_hits += int(np.sum(np.asarray(pool_class_ids) == np.asarray(class_ids)))
      self.pool_total += len(samples)
    if e.heatmaps and write_files and load_image is not None:
      _write_heatmaps(storage.join_inside(self.out_dir, "heatmaps", cls, what="class name"),
                      samples, anomaly_maps, masks, scores, self.cfg, load_image)

  def add_alternative(self, name, cls, samples, anomaly_maps, scores, masks, has_mask) -> None:
    """Metrics of one class under another scoring `name` (no scores.csv rows, no heatmaps)."""
    e = self.cfg.eval
    self.alternatives.setdefault(name, {})[cls] = class_protocol(
        scores, anomaly_maps, masks, has_mask, [s.label for s in samples],
        e.get("maskless", "skip"), e.flip_auroc)[0]

  def finish(self, *, step=None, extra=None, write_files=True, default_name=None,
             notes=()) -> dict:
    """Writes the reports; with `default_name`, metrics.json's "scorings" and metrics.md hold
    every scoring side by side (the default one is the headline `classes` / `mean`). `notes`
    (e.g. `indexing.test_set_gaps`: why a class has no row or '-' values) go under metrics.md's
    table and into metrics.json's "notes"."""
    result = metrics.summarize(self.per_class)
    extra = dict(extra or {})
    extra["notes"] = list(notes)
    sections = {}
    if default_name is not None:
      sections = {default_name: result}
      sections.update({n: metrics.summarize(v) for n, v in self.alternatives.items()})
      extra["scorings"] = sections
    extra["maskless_anomalies"] = {"policy": self.cfg.eval.get("maskless", "skip"),
                                   "count": int(sum(self.maskless.values())),
                                   "per_class": dict(self.maskless)}
    extra.update(n_empty_defect_masks=len(self.empty_masks), empty_defect_masks=list(self.empty_masks))
    if self.pool_total:
      extra["pool_class_accuracy"] = self.pool_hits / self.pool_total
    if write_files:
      reports.write_reports(self.out_dir, result, config=self.cfg, step=step, extra=extra,
                            sections=sections, notes=notes)
      text = io.StringIO()
      csv.writer(text, lineterminator="\n").writerows(self.score_rows)
      storage.atomic_write(storage.join(self.out_dir, "scores.csv"), text.getvalue())
    result.update(extra)
    return result


def empty_defect_masks(samples, masks, has_mask, size: int) -> list:
  """Paths of defect images whose mask is all zero at `size` px, each warned about by name.

  Such an image is scored as normal (its label comes from the resized mask): an empty mask file,
  or a defect too small to survive the resize. masks: (N, H, W) bool; has_mask: (N,) bool.
  """
  empty = np.asarray(has_mask, bool) & ~np.asarray(masks).reshape(len(masks), -1).any(axis=1)
  paths = []
  for s, e in zip(samples, empty):
    if e and s.label > 0:
      log.warning("the mask of defect image %s (%s) is all zero at %d px: the image counts as "
                  "normal in the metrics", s.path, s.mask_path, size)
      paths.append(s.path)
  return paths


def _write_heatmaps(out_dir, samples, anomaly_maps, masks, scores, cfg, load_image) -> None:
  """Up to `eval.max_heatmaps_per_class` PNGs (defective images first, then normal ones) and a
  contact sheet of them; `load_image(sample)` gives the uint8 (H, W, 3) model input."""
  vmax = float(np.percentile(anomaly_maps, 99.9)) if anomaly_maps.size else 1.0
  n = cfg.eval.max_heatmaps_per_class
  bad = [i for i, s in enumerate(samples) if s.label]
  good = [i for i, s in enumerate(samples) if not s.label]
  chosen = sorted(bad[:n - min(len(good), n // 2)] + good[:max(n // 2, n - len(bad))])
  paths = []
  for i in chosen:
    sample = samples[i]
    stem = os.path.splitext(os.path.basename(sample.path))[0]
    name = f"{sample.defect}_{stem}"
    if storage.join(out_dir, name + ".png") in paths:  # x.png and x.jpg, say
      name += f"_{i}"
    path = storage.join_inside(out_dir, name + ".png", what=f"heatmap name (from {sample.path})")
    heatmaps.save_heatmap(path, load_image(sample), anomaly_maps[i],
                          masks[i] if masks[i].any() else None, float(scores[i]),
                          vmin=float(anomaly_maps.min()), vmax=vmax,
                          title=f"{sample.cls}/{sample.defect}")
    paths.append(path)
  if paths:
    heatmaps.contact_sheet(paths, storage.join(out_dir, "contact_sheet.png"))
