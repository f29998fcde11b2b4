"""Evaluation (docs/algorithm.md §11, §12) and the `onenip-eval` command.

  onenip-eval --workdir DIR                              # latest checkpoint of a training run
  onenip-eval --exported EXPORT_DIR [--config configs/real.py] [--out DIR]
  onenip-eval --workdir DIR --config.eval.prompt_mode=pool   # the stored config, overridden

Writes metrics.json / metrics.md / metrics.csv, per-image scores.csv (and heatmaps with --heatmaps) to
`<workdir>/eval/` (or `<exported>/eval/`) unless --out says otherwise.

With --exported the evaluation runs the export's serialised predictor (`onenip_jax.serving.program`: jax,
numpy and Pillow; no flax, TensorFlow or Orbax is imported) with class-agnostic pool prompts and
the export's scoring; class prompts and the other scorings need the run (--workdir).

Protocol: maps are float32 from the network to the metrics. A mask pixel is a defect iff non-zero;
an image's label is that of its resized mask (its own label without a mask). Anomalous test images
without a mask are left out of the pixel metrics (`eval.maskless="skip"`, the default) or scored
against an all-ones mask as the official code does (`"full"`); metrics.json reports how many there
were. Memory: the test set is evaluated one class at a time, so host memory grows with the largest
class, not with the dataset.

`evaluate_classes` is everything after the network, shared by the evaluation of a checkpoint
(`onenip_jax.evaluation.after_training.evaluate`: the maps of `predictor.Predictor`, every scoring of
`fusion`) and of an export (`evaluate_exported`: the serialised predictor's map and score):
one class at a time, the source gives the masks and the scored maps, and `protocol` applies
the protocol and writes the reports. This module imports no flax, TensorFlow or Orbax, so that
`onenip-eval --exported` runs on the plain install (`onenip_jax.cli` picks the module by flag).
"""
import dataclasses
import logging
import os
from collections.abc import Callable, Iterable

import ml_collections
import numpy as np

from data_pipelines import indexing
from data_pipelines.errors import UserError
from onenip_jax.config import checks
from onenip_jax.config.loading import load_config
from onenip_jax.evaluation import fusion, protocol, reports
from onenip_jax.serving import program

log = logging.getLogger("onenip")


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


def evaluate_exported(cfg, model, index, out_dir: str, *, samples=None) -> dict:
  """`evaluate_classes` through the serialised predictor (`program.ExportedPredictor`):
  numpy/PIL preprocessing, pool prompts, the export's scoring (`model.scoring`) only."""
  samples = index.test if samples is None else samples
  if tuple(index.classes) != model.classes:
    raise UserError(f"the dataset's classes {index.classes} differ from the exported model's "
                    f"{model.classes}")
  size = model.input_size
  c, scoring_entry = float(model.meta["fusion_c"]), model.scoring

  def score_class(cls, subset, rows):
    del rows
    n = len(subset)
    maps = np.zeros((n, size, size), np.float32)
    scores = np.zeros(n, np.float32)
    picked = np.zeros(n, np.int32)
    for i in range(0, n, model.batch_size):
      chunk = subset[i:i + model.batch_size]
      out = model(np.stack([model.preprocess(s.read_image()) for s in chunk]))
      maps[i:i + len(chunk)], scores[i:i + len(chunk)] = out["map"], out["score"]
      picked[i:i + len(chunk)] = out["class_id"]
    masks = np.zeros((n, size, size), bool)
    has_mask = np.asarray([bool(s.mask_path) for s in subset])
    for j, s in enumerate(subset):
      if s.mask_path:
        masks[j] = program.load_mask(s.read_mask(), size)
    return ScoredClass(masks, has_mask, np.full(n, index.class_id(cls)), picked,
                       [(scoring_entry["fusion"], maps, scores)],
                       lambda s: program.load_image(s.read_image(), size))

  extra = {"fusion": scoring_entry["fusion"], "scoring": scoring_entry, "fusion_c": c,
           "fusion_c_source": "frozen", "alpha": cfg.eval.alpha,
           "calibration": model.meta.get("calibration"), "prompt_mode": "pool",
           "backend": "exported"}
  result = evaluate_classes(cfg, samples, index, out_dir, score_class,
                            step=model.meta.get("step"), extra=extra)
  log.info("eval of the serialised predictor (%s scoring, pool prompts) -> %s\n%s",
           scoring_entry["fusion"], out_dir, table(result))
  return result


def main(args) -> None:
  """`onenip-eval --exported` with its flags parsed by `onenip_jax.cli`: the export's stored
  config with args.config / args.overrides applied (`onenip-eval --workdir` is
  `onenip_jax.evaluation.after_training.main`)."""
  model = program.ExportedPredictor.load(args.exported, args.batch_size)
  cfg = load_config(args.config, args.overrides,
                    base=ml_collections.ConfigDict(model.meta["config"]))
  checks.check_config(cfg)
  cfg.eval.heatmaps = cfg.eval.heatmaps or args.heatmaps
  if cfg.eval.prompt_mode != "pool":
    log.info("the serialised predictor uses pool prompts (eval.prompt_mode=%r needs the run: "
             "onenip-eval --workdir RUN)", cfg.eval.prompt_mode)
    cfg.eval.prompt_mode = "pool"
  wanted = fusion.default_scoring(cfg, model.meta.get("calibration"),
                                  bool(cfg.model.refiner))
  if wanted != model.scoring["fusion"]:
    log.warning("eval.fusion asks for the %r scoring; the serialised predictor computes the "
                "export's %r (evaluate the run with --workdir, or re-export with "
                "--config.eval.fusion=%s)", wanted, model.scoring["fusion"], wanted)
  out = args.out or os.path.join(args.exported, "eval")
  result = evaluate_exported(cfg, model, indexing.index_config(cfg), out)
  print(f"step {model.meta.get('step')}, pool prompts, serialised predictor -> {out}/metrics.json"
        f"\n{table(result)}")
