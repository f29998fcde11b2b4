"""Evaluation (docs/algorithm.md §11, §12) and the `onenip-eval` command.

  onenip-eval --workdir DIR                              # latest checkpoint of a training run
  onenip-eval --exported EXPORT_DIR [--config configs/real.py] [--out DIR]
  onenip-eval --workdir DIR --config.eval.prompt_mode=pool   # the stored config, overridden

Writes metrics.json / metrics.md / metrics.csv, per-image scores.csv (and heatmaps with --heatmaps) to
`<workdir>/eval/` (or `<exported>/eval/`) unless --out says otherwise.

With --exported the evaluation runs the export's serialised predictor (`onenip_jax.exported`: jax,
numpy and Pillow; no flax, TensorFlow or Orbax is imported) with class-agnostic pool prompts and
the export's scoring; class prompts and the other scorings need the run (--workdir).

Protocol: maps are float32 from the network to the metrics. A mask pixel is a defect iff non-zero;
an image's label is that of its resized mask (its own label without a mask). Anomalous test images
without a mask are left out of the pixel metrics (`eval.maskless="skip"`, the default) or scored
against an all-ones mask as the official code does (`"full"`); metrics.json reports how many there
were. Memory: the test set is evaluated one class at a time, so host memory grows with the largest
class, not with the dataset.

The maps come from `onenip_jax.eval_maps`, the scorings from `onenip_jax.scoring_modes` (each a
vector for `scoring.score`), the per-class protocol and the report files from
`onenip_jax.report_builder`.
"""
import logging
import os

import numpy as np

from data_pipelines import indexing
from data_pipelines.errors import UserError
from onenip_jax import calibration as calib
from onenip_jax import (config_checks, eval_maps, exported, report_builder, reports, scoring,
                        scoring_modes)

log = logging.getLogger("onenip")


def _tf_image_loader(cfg):
  from data_pipelines import input_pipeline  # pylint: disable=g-import-not-at-top
  return lambda sample: input_pipeline.load_image(sample.read_image(), cfg.input_size, None, None)


def _table(result: dict) -> str:
  """The headline table of an evaluation and its notes (why a class has no row or '-' values)."""
  return reports.format_table(result) + "".join(f"\n- {n}" for n in result.get("notes", ()))


def fusion_constant(cfg, predictor, samples, index, frozen_c: float) -> tuple[float, str]:
  """c of the reference fusion and where it came from: the stored frozen one ('frozen'), or the
  test-set mid-range ('test': `eval.fusion_constant="test"` or no frozen one; one extra streamed
  pass over `samples`)."""
  mode = cfg.eval.get("fusion_constant", "frozen")
  if mode not in ("frozen", "test"):
    raise UserError(f"config.eval.fusion_constant={mode!r}: use 'frozen' or 'test'")
  if mode == "frozen" and not np.isnan(frozen_c):
    return float(frozen_c), "frozen"
  return float(scoring.mid_range(*eval_maps.rec_range(predictor, samples, index, cfg))), "test"


def evaluate_predictor(cfg, predictor, index, out_dir: str, frozen_c: float, *, step=None,
                       samples=None, calibration=None) -> dict:
  """Scores `samples` (default: the test set) one class at a time; writes the reports to `out_dir`.

  Every scoring of `scoring_modes.SCORINGS` that applies is reported side by side; its
  `default_scoring` picks the one of the headline table, scores.csv and heatmaps.
  `calibration`: the checkpoint's, or None.
  """
  import jax  # pylint: disable=g-import-not-at-top
  samples = index.test if samples is None else samples
  c, c_source = fusion_constant(cfg, predictor, samples, index, frozen_c)
  has_refiner = bool(cfg.model.refiner)
  pool = predictor.pool
  default = scoring_modes.default_scoring(cfg, calibration, has_refiner)
  usable = bool(calibration)
  if calibration and has_refiner:
    why = calib.prompt_mode_error(calibration, "class" if pool is None else "pool",
                                  [cl for cl, _ in eval_maps.class_rows(samples, index.classes)])
    if why and default == "calibrated":
      raise calib.PromptModeError(f"eval.fusion='calibrated': {why}")
    if why:
      log.warning("the calibrated scoring is left out: %s", why)
      usable = False
  names = [default] + [n for n in scoring_modes.SCORINGS
                       if n != default and (has_refiner or n == "reconstruction")
                       and (n != "calibrated" or usable)]
  builder = report_builder.ReportBuilder(cfg, out_dir)
  main_process = jax.process_index() == 0
  for cls, rows in eval_maps.class_rows(samples, index.classes):
    subset = [samples[i] for i in rows]
    maps = eval_maps.collect_maps(predictor, subset, index, cfg, seed_positions=rows)
    for name in names:
      s, scores = scoring_modes.scored_maps(name, maps["rec"], maps["ref"], c=c, cfg=cfg,
                                            calibration=calibration,
                                            cls=cls if pool is None else None)
      if name == default:
        builder.add_class(
            cls, subset, s, scores, maps["mask"], maps["has_mask"],
            pool_class_ids=None if pool is None else pool.class_ids[maps["pool_choice"]],
            class_ids=maps["class_id"], load_image=_tf_image_loader(cfg), write_files=main_process)
      else:
        builder.add_alternative(name, cls, subset, s, scores, maps["mask"], maps["has_mask"])
      del s
    del maps
  extra = {"fusion": default, "fusion_c": c, "fusion_c_source": c_source,
           "alpha": cfg.eval.alpha, "calibration": calibration,
           "prompt_mode": cfg.eval.prompt_mode, "backend": "flax"}
  result = builder.finish(step=step, extra=extra, write_files=main_process, default_name=default,
                          notes=indexing.test_set_gaps(index.classes, samples))
  log.info("eval step %s (%s scoring; reference c=%.4f from %s; %s prompts) -> %s\n%s", step,
           default, c, c_source, cfg.eval.prompt_mode, out_dir, _table(result))
  return result


def evaluate_exported(cfg, model, index, out_dir: str, *, samples=None) -> dict:
  """`evaluate_predictor` through the serialised predictor (`onenip_jax.exported.ExportedPredictor`):
  numpy/PIL preprocessing, pool prompts, the export's scoring (`model.scoring`) only."""
  samples = index.test if samples is None else samples
  if tuple(index.classes) != model.classes:
    raise UserError(f"the dataset's classes {index.classes} differ from the exported model's "
                    f"{model.classes}")
  size = model.input_size
  builder = report_builder.ReportBuilder(cfg, out_dir)
  for cls, rows in eval_maps.class_rows(samples, index.classes):
    subset = [samples[i] for i in rows]
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
        masks[j] = exported.load_mask(s.read_mask(), size)
    builder.add_class(cls, subset, maps, scores, masks, has_mask, pool_class_ids=picked,
                      class_ids=np.full(n, index.class_id(cls)),
                      load_image=lambda s: exported.load_image(s.read_image(), size))
    del maps, masks
  c, scoring_entry = float(model.meta["fusion_c"]), model.scoring
  extra = {"fusion": scoring_entry["fusion"], "scoring": scoring_entry, "fusion_c": c,
           "fusion_c_source": "frozen", "alpha": cfg.eval.alpha,
           "calibration": model.meta.get("calibration"), "prompt_mode": "pool",
           "backend": "exported"}
  result = builder.finish(step=model.meta.get("step"), extra=extra,
                          notes=indexing.test_set_gaps(index.classes, samples))
  log.info("eval of the serialised predictor (%s scoring, pool prompts) -> %s\n%s",
           scoring_entry["fusion"], out_dir, _table(result))
  return result


def evaluate_state(cfg, state, index, features, backbone_vars, mesh, out_dir: str,
                   calibration=None) -> dict:
  """Evaluation of a train state (periodic and final evaluation during training)."""
  from onenip_jax import inference  # pylint: disable=g-import-not-at-top
  model, _ = inference.make_model(cfg)
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  predictor = inference.make_predictor(cfg, model, features, variables, backbone_vars, mesh, index)
  frozen_c = float(np.asarray(state.fusion_c.addressable_data(0)))
  return evaluate_predictor(cfg, predictor, index, out_dir, frozen_c, step=int(
      np.asarray(state.step.addressable_data(0))), calibration=calibration)


def frozen_fusion_constant(cfg, state, index, features, backbone_vars, mesh) -> float:
  """Mid-range of the reconstruction map over (up to `eval.fusion_max_images`) normal TRAINING
  images with class-mode prompts: a fusion constant that uses no test-set statistics."""
  from onenip_jax import inference  # pylint: disable=g-import-not-at-top
  model, _ = inference.make_model(cfg)
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  predictor = inference.Predictor(model, features, variables, backbone_vars, mesh)
  n = len(index.train)
  rows = np.linspace(0, n - 1, min(n, cfg.eval.fusion_max_images)).round().astype(int)
  lo, hi = eval_maps.rec_range(predictor, [index.train[i] for i in np.unique(rows)], index, cfg)
  return float(scoring.mid_range(lo, hi))


def main(args) -> None:
  """`onenip-eval` with its flags parsed by `onenip_jax.cli`: a checkpoint (args.workdir) or an
  export (args.exported), the stored config with args.config / args.overrides applied."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from onenip_jax.config_loading import load_config  # pylint: disable=g-import-not-at-top
  if args.exported:
    model = exported.ExportedPredictor.load(args.exported, args.batch_size)
    cfg = load_config(args.config, args.overrides,
                      base=ml_collections.ConfigDict(model.meta["config"]))
    config_checks.check_config(cfg)
    cfg.eval.heatmaps = cfg.eval.heatmaps or args.heatmaps
    if cfg.eval.prompt_mode != "pool":
      log.info("the serialised predictor uses pool prompts (eval.prompt_mode=%r needs the run: "
               "onenip-eval --workdir RUN)", cfg.eval.prompt_mode)
      cfg.eval.prompt_mode = "pool"
    wanted = scoring_modes.default_scoring(cfg, model.meta.get("calibration"),
                                           bool(cfg.model.refiner))
    if wanted != model.scoring["fusion"]:
      log.warning("eval.fusion asks for the %r scoring; the serialised predictor computes the "
                  "export's %r (evaluate the run with --workdir, or re-export with "
                  "--config.eval.fusion=%s)", wanted, model.scoring["fusion"], wanted)
    out = args.out or os.path.join(args.exported, "eval")
    result = evaluate_exported(cfg, model, indexing.index_config(cfg), out)
    print(f"step {model.meta.get('step')}, pool prompts, serialised predictor -> {out}/metrics.json"
          f"\n{_table(result)}")
    return
  from onenip_jax import inference, restore, sharding  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh()
  cfg, predictor, frozen_c, step = restore.load_checkpoint(
      args.workdir, mesh, args.step, config=args.config, overrides=args.overrides)
  out = args.out or os.path.join(args.workdir, "eval")
  from onenip_jax import checkpoints  # pylint: disable=g-import-not-at-top
  calibration = checkpoints.read_calibration(args.workdir, step)
  cfg.unlock()
  cfg.eval.heatmaps = cfg.eval.heatmaps or args.heatmaps
  index = indexing.index_config(cfg)
  if cfg.eval.prompt_mode == "pool" and predictor.pool is None:
    predictor.pool = inference.build_prompt_pool(predictor, index, cfg)
  elif cfg.eval.prompt_mode == "class":
    predictor.pool = None
  result = evaluate_predictor(cfg, predictor, index, out, frozen_c, step=step,
                              calibration=calibration)
  print(f"step {step}, {cfg.eval.prompt_mode} prompts -> {out}/metrics.json\n"
        f"{_table(result)}")

