"""The evaluation of an export: `onenip-eval --exported`.

  onenip-eval --exported EXPORT_DIR [--config configs/real.py] [--out DIR]

Runs the export's serialised predictor (`onenip_jax.serving.program`: jax, numpy and Pillow; no
flax, TensorFlow or Orbax is imported) with class-agnostic pool prompts and the export's scoring;
class prompts and the other scorings need the run (`onenip-eval --workdir`). Everything after the
network, and the reports it writes to `<exported>/eval/` unless --out says otherwise, is
`onenip_jax.evaluation.evaluate.evaluate_classes`, as for a checkpoint. This module imports no
flax, TensorFlow or Orbax, so that it runs on the plain install (`onenip_jax.cli` picks it by flag).
"""
import logging
import os

import ml_collections
import numpy as np

from data_pipelines import indexing
from data_pipelines.errors import UserError
from onenip_jax.config import checks
from onenip_jax.config.loading import load_config
from onenip_jax.evaluation import fusion
from onenip_jax.evaluation.evaluate import ScoredClass, evaluate_classes, table
from onenip_jax.serving import program

log = logging.getLogger("onenip")


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
