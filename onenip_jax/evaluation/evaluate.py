"""Evaluation (docs/algorithm.md §11, §12): everything after the network, for a checkpoint and an
export alike.

  onenip-eval --workdir DIR     # a checkpoint: `onenip_jax.evaluation.after_training.main`
  onenip-eval --exported DIR    # an export: `onenip_jax.serving.eval_export.main`

Writes metrics.json / metrics.md / metrics.csv, per-image scores.csv (and heatmaps with --heatmaps)
to `<workdir>/eval/` (or `<exported>/eval/`) unless --out says otherwise.

Protocol: maps are float32 from the network to the metrics. A mask pixel is a defect iff non-zero;
an image's label is that of its resized mask (its own label without a mask). Anomalous test images
without a mask are left out of the pixel metrics (`eval.maskless="skip"`, the default) or scored
against an all-ones mask as the official code does (`"full"`); metrics.json reports how many there
were. Memory: the test set is evaluated one class at a time, so host memory grows with the largest
class, not with the dataset.

`evaluate_classes` is everything after the network, shared by the evaluation of a checkpoint
(`after_training.evaluate`: the maps of `inference.Predictor`, every scoring of `fusion`) and of an
export (`onenip_jax.serving.eval_export.evaluate_exported`: the serialised predictor's map and
score): one class at a time, the source gives the masks and the scored maps, and `protocol`
applies the protocol and writes the reports. This module imports no flax, TensorFlow or Orbax, so
that `onenip-eval --exported` runs on the plain install.
"""
import dataclasses
from collections.abc import Callable, Iterable

import numpy as np

from data_pipelines import indexing
from onenip_jax.evaluation import protocol, reports


@dataclasses.dataclass
class ScoredClass:
  """The network side of one class's evaluation.

  Attributes:
    masks: (n, H, W) bool ground truth at the input size; has_mask: (n,) whether a mask file exists.
    class_ids: (n,) int class id of each image; pool_class_ids: (n,) int class of each image's
      pool prompt, or None (class prompts).
    scorings: (name, anomaly maps (n, H, W) float32, image scores (n,)) of each scoring, the
      default one first (a generator makes them one at a time).
    load_image: sample -> uint8 (H, W, 3) model input, for the heatmaps.
  """
  masks: np.ndarray
  has_mask: np.ndarray
  class_ids: np.ndarray
  pool_class_ids: np.ndarray | None
  scorings: Iterable
  load_image: Callable


def table(result: dict) -> str:
  """The headline table of an evaluation and its notes (why a class has no row or '-' values)."""
  return reports.format_table(result) + "".join(f"\n- {n}" for n in result.get("notes", ()))


def evaluate_classes(cfg, samples, index, out_dir: str, score_class, *, step=None, extra=None,
                     default_name=None, write_files: bool = True) -> dict:
  """Everything after the network: scores `samples` one class at a time and writes the reports.

  Args:
    score_class: (class, its samples, their positions in `samples`) -> `ScoredClass`.
    default_name: the default scoring's name, to report every scoring side by side (metrics.json
      "scorings"); None reports the one scoring alone.
    write_files: write scores.csv, heatmaps and reports (process 0 of a multi-process run).
  Returns:
    metrics.json's content.
  """
  builder = protocol.ReportBuilder(cfg, out_dir)
  for cls, rows in indexing.class_rows(samples, index.classes):
    subset = [samples[i] for i in rows]
    scored = score_class(cls, subset, rows)
    for i, (name, s, scores) in enumerate(scored.scorings):
      if i == 0:
        builder.add_class(cls, subset, s, scores, scored.masks, scored.has_mask,
                          pool_class_ids=scored.pool_class_ids, class_ids=scored.class_ids,
                          load_image=scored.load_image, write_files=write_files)
      else:
        builder.add_alternative(name, cls, subset, s, scores, scored.masks, scored.has_mask)
      del s
    del scored
  return builder.finish(step=step, extra=extra, write_files=write_files, default_name=default_name,
                        notes=indexing.test_set_gaps(index.classes, samples))
