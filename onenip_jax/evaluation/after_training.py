"""After training, one pipeline: a trained network -> fusion constant, calibration, evaluation.

  onenip-eval --workdir DIR                                  # latest checkpoint of a training run
  onenip-eval --workdir DIR --config.eval.prompt_mode=pool   # the stored config, overridden

  training:              inference.Trained.from_state(final state) -> frozen_fusion_constant
                         -> holdout.calibrate -> evaluate
  onenip-eval --workdir: restore.load_checkpoint -> evaluate                    (`main`)
  onenip-export:         restore.load_checkpoint -> thresholds.make_thresholds
                         -> export.write_export

Every step takes the one `inference.Trained`, whose Predictor and prompt pool are built once. The
evaluation's maps come from the Predictor (tf.data preprocessing, `maps`) and are scored with
every scoring of `fusion`; everything after that is `evaluate.evaluate_classes`, as for an
export (`onenip_jax.serving.eval_export.evaluate_exported`).
"""
import logging
import os

import jax
import numpy as np

from data_pipelines import indexing, input_pipeline
from data_pipelines.errors import UserError
from onenip_jax import sharding
from onenip_jax.evaluation import calibration as calib
from onenip_jax.evaluation import evaluate as evaluate_lib
from onenip_jax.evaluation import fusion, restore, scoring
from onenip_jax.evaluation import maps as maps_lib
from onenip_jax.evaluation import inference

log = logging.getLogger("onenip")


def fusion_constant(trained: inference.Trained, predictor: inference.Predictor,
                    samples) -> tuple[float, str]:
  """c of the reference fusion and where it came from: the stored frozen one ('frozen'), or the
  test-set mid-range ('test': `eval.fusion_constant="test"` or no frozen one; one extra streamed
  pass of `predictor` over `samples`)."""
  cfg = trained.cfg
  mode = cfg.eval.get("fusion_constant", "frozen")
  if mode not in ("frozen", "test"):
    raise UserError(f"config.eval.fusion_constant={mode!r}: use 'frozen' or 'test'")
  if mode == "frozen" and not np.isnan(trained.fusion_c):
    return float(trained.fusion_c), "frozen"
  lo, hi = maps_lib.rec_range(predictor, samples, trained.index, cfg)
  return float(scoring.mid_range(lo, hi)), "test"


def frozen_fusion_constant(trained: inference.Trained) -> float:
  """Mid-range of the reconstruction map over (up to `eval.fusion_max_images`) normal TRAINING
  images with class-mode prompts: a fusion constant that uses no test-set statistics."""
  cfg, index = trained.cfg, trained.index
  n = len(index.train)
  rows = np.linspace(0, n - 1, min(n, cfg.eval.fusion_max_images)).round().astype(int)
  lo, hi = maps_lib.rec_range(trained.predictor_for("class"),
                              [index.train[i] for i in np.unique(rows)], index, cfg)
  return float(scoring.mid_range(lo, hi))


def evaluate(trained: inference.Trained, out_dir: str, *, samples=None) -> dict:
  """Scores `samples` (default: the test set) with `eval.prompt_mode`'s prompts one class at a
  time; writes the reports to `out_dir` (`evaluate.evaluate_classes`).

  Every scoring of `fusion.SCORINGS` that applies is reported side by side; its
  `default_scoring` picks the one of the headline table, scores.csv and heatmaps. The calibrated
  scoring is `trained.calibration`'s.
  """
  cfg, index, calibration = trained.cfg, trained.index, trained.calibration
  samples = index.test if samples is None else samples
  predictor = trained.predictor_for(cfg.eval.prompt_mode)
  c, c_source = fusion_constant(trained, predictor, samples)
  has_refiner = bool(cfg.model.refiner)
  pool = predictor.pool
  default = fusion.default_scoring(cfg, calibration, has_refiner)
  usable = bool(calibration)
  if calibration and has_refiner:
    why = calib.prompt_mode_error(calibration, "class" if pool is None else "pool",
                                  [cl for cl, _ in indexing.class_rows(samples, index.classes)])
    if why and default == "calibrated":
      raise calib.PromptModeError(f"eval.fusion='calibrated': {why}")
    if why:
      log.warning("the calibrated scoring is left out: %s", why)
      usable = False
  names = [default] + [n for n in fusion.SCORINGS
                       if n != default and (has_refiner or n == "reconstruction")
                       and (n != "calibrated" or usable)]

  def load_image(sample):
    return input_pipeline.load_image(sample.read_image(), cfg.input_size, None, None)

  def scorings(cls, maps):
    for name in names:
      s, scores = fusion.scored_maps(name, maps["rec"], maps["ref"], c=c, cfg=cfg,
                                     calibration=calibration,
                                     cls=cls if pool is None else None)
      yield name, s, scores

  def score_class(cls, subset, rows):
    maps = maps_lib.collect_maps(predictor, subset, index, cfg, seed_positions=rows)
    return evaluate_lib.ScoredClass(
        maps["mask"], maps["has_mask"], maps["class_id"],
        None if pool is None else pool.class_ids[maps["pool_choice"]], scorings(cls, maps),
        load_image)

  extra = {"fusion": default, "fusion_c": c, "fusion_c_source": c_source,
           "alpha": cfg.eval.alpha, "calibration": calibration,
           "prompt_mode": cfg.eval.prompt_mode, "backend": "flax"}
  result = evaluate_lib.evaluate_classes(cfg, samples, index, out_dir, score_class,
                                         step=trained.step, extra=extra, default_name=default,
                                         write_files=jax.process_index() == 0)
  log.info("eval step %s (%s scoring; reference c=%.4f from %s; %s prompts) -> %s\n%s",
           trained.step, default, c, c_source, cfg.eval.prompt_mode, out_dir,
           evaluate_lib.table(result))
  return result


def main(args) -> None:
  """`onenip-eval --workdir` with its flags parsed by `onenip_jax.cli`: a checkpoint with its
  stored config, args.config / args.overrides applied (`onenip-eval --exported` is
  `onenip_jax.serving.eval_export.main`)."""
  trained = restore.load_checkpoint(args.workdir, sharding.make_mesh(), args.step,
                                    config=args.config, overrides=args.overrides)
  out = args.out or os.path.join(args.workdir, "eval")
  cfg = trained.cfg
  cfg.unlock()
  cfg.eval.heatmaps = cfg.eval.heatmaps or args.heatmaps
  result = evaluate(trained, out)
  print(f"step {trained.step}, {cfg.eval.prompt_mode} prompts -> {out}/metrics.json\n"
        f"{evaluate_lib.table(result)}")
