"""Self-contained export of a trained model: `onenip-export` (run by `onenip_jax.serving.program`).

  onenip-export --workdir DIR --out EXPORT_DIR [--step N] [--threshold-fraction F] [--target-fpr P]
                [--threshold-dir DIR | --calibrate-on-test] [--config FILE] [--config.KEY=VALUE]

EXPORT_DIR holds everything inference needs and nothing of training (no optimiser state):
  export.json              format and package version, classes, input size, preprocessing (resize
                           method, mean, std), fusion constant, `scoring` (the map the program
                           computes), `calibration` (the run's, or null), thresholds (each with how
                           it was made), checkpoint step, the serialised program's platforms, the
                           config
  predictor.jaxexport      `jax.export` serialisation of the whole pool-mode predictor and
  predictor_weights.npz    its weights (see `onenip_jax.serving.program`, which runs them with jax,
                           numpy and Pillow only)
  prompt_pool.npz          per-class prompt features for class-agnostic (pool) prompts
The directory is written under a temporary name and renamed, so it is complete or absent.

Scoring: `eval.fusion` of the (overridable) config, as `onenip-eval` scores: "calibrated" (the
default: the calibration stored with the checkpoint, `onenip_jax.evaluation.calibration`, made at
the end of training on held-out normals), falling back to "reference" with a note in export.json
when the run has none; `--config.eval.fusion=reference` for the published protocol's fusion. The
serialised predictor scores with pool prompts, so it uses the GLOBAL calibration, which is what it
was fitted for (on pool-prompt maps; one fitted with other prompts is an error naming the refit; one
set of statistics and weight over all classes, chosen on the mean objective of the classes): an
image's map and score then do not depend on which class its prompt matched (a wrong match changes
the prompt, not the normalisation), pool-mode `onenip-eval --workdir` reports the same numbers, and
the program has one box size. export.json keeps the whole calibration (per class and global: the
choice, its validation figures, every candidate, the held-out images, the synthesis seed).

Thresholds on the image score of that scoring (an image is anomalous iff score > threshold), one
per class and a global one, never from the test set by default:
  default            the `--target-fpr` quantile of the pool-mode scores of the class's held-out
                     normal training images (`index.holdout`, `calibration.holdout_fraction`):
                     never trained on, but also the calibration's normals (its statistics and
                     weight were chosen on them), so the FPR on new normals may be a little
                     higher. A class without held-out images (or a run without a holdout) uses a
                     `--threshold-fraction` of its normal training images (not the prompt-pool
                     images), seen in training, so somewhat optimistic (low).
                     `--threshold-fraction 0`: no thresholds.
  --threshold-dir    a labelled validation folder `DIR/<class>/good/*` (normal) and
                     `DIR/<class>/<defect>/*` (anomalous): F1-optimal where a class has both, else
                     the normal-score quantile.
  --calibrate-on-test  F1-optimal on the config's TEST set (optimistic; for comparisons only).
export.json records the scoring, source, method, image counts and target of each threshold
(`onenip_jax.serving.thresholds`).
"""
import importlib.metadata
import io
import json
import logging
import os
import shutil

import jax
import numpy as np
from absl import app

from data_pipelines import storage
from data_pipelines.errors import UserError
from onenip_jax import sharding
from onenip_jax.evaluation import fusion, restore, scoring
from onenip_jax.evaluation import inference
from onenip_jax.serving import program as program_lib
from onenip_jax.serving import thresholds as thresholds_lib

FORMAT_VERSION = program_lib.FORMAT_VERSION
log = logging.getLogger("onenip")


def _npz_bytes(**arrays) -> bytes:
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  return buf.getvalue()


def _canonical(path: str) -> str:
  return os.path.realpath(path) if storage.is_local(path) else storage.normpath(path)


def _host_tree(tree):
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array)
                      else np.asarray(x), tree)


def serialize_predictor(predictor: inference.Predictor, cfg, entry: dict,
                        platforms=("cpu", "cuda", "tpu")) -> tuple[bytes, list, tuple]:
  """`jax.export` of `Predictor.fused` (pool prompts, scoring, image score) with symbolic B and K.

  The weights are the program's first argument (a flat list) and the scoring vector
  (`scoring.SCORING_KEYS`) its last, not embedded constants: see `onenip_jax.serving.program` for
  why. Only the box size of the scoring `entry` (`fusion.make_scoring`) is compiled in. Platforms
  the installed jax cannot lower for are left out.

  Returns:
    (serialised program, weight leaves in the program's order, platforms lowered for).
  """
  leaves, treedef = jax.tree.flatten({"model": _host_tree(predictor.variables),
                                      "backbone": _host_tree(predictor.backbone_vars)})
  pool_size = int(entry["pool_size"])

  def predict(weights, images, pool_feats, pool_desc, pool_class_ids, scoring_params):
    w = jax.tree.unflatten(treedef, weights)
    return predictor.fused(w["model"], w["backbone"], images, pool_feats, pool_desc,
                           pool_class_ids, scoring_params, pool_size=pool_size)

  b, k = jax.export.symbolic_shape("b, k")
  size, pool = cfg.input_size, predictor.pool
  specs = ([jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves],
           jax.ShapeDtypeStruct((b, size, size, 3), np.float32),
           jax.ShapeDtypeStruct((k,) + pool.features.shape[1:], np.float32),
           jax.ShapeDtypeStruct((k, pool.descriptors.shape[1]), np.float32),
           jax.ShapeDtypeStruct((k,), np.int32),
           jax.ShapeDtypeStruct((len(scoring.SCORING_KEYS),), np.float32))

  def lower(plats):
    return jax.export.export(jax.jit(predict), platforms=plats)(*specs)

  try:
    program = lower(tuple(platforms))
  except Exception as e:  # a platform's lowering rules are missing from this jax
    log.warning("lowering for %s failed (%s); trying each platform alone", platforms, e)
    ok = []
    for p in platforms:
      try:
        lower((p,))
        ok.append(p)
      except Exception as e2:  # pylint: disable=broad-except
        log.warning("cannot lower the predictor for %s: %s", p, e2)
    if not ok:
      raise
    program = lower(tuple(ok))
  return bytes(program.serialize()), leaves, tuple(program.platforms)


def package_version() -> str:
  try:
    return importlib.metadata.version("onenip-jax")
  except importlib.metadata.PackageNotFoundError:
    return "unknown"


def check_out_dir(out_dir: str, overwrite: bool, workdir: str | None = None) -> None:
  """Refuses an export destination that exists (unless `overwrite`) or that is not an export.

  `overwrite` replaces only a folder holding an `export.json`, and never `workdir` or a folder
  containing it.

  Raises:
    FileExistsError / ValueError naming the folder.
  """
  out = _canonical(out_dir)
  if workdir is not None:
    work = _canonical(workdir)
    if out == work or work.startswith(out.rstrip(os.sep) + os.sep):
      raise ValueError(f"--out {out_dir} is the training workdir {workdir} or a folder holding "
                       "it; export to another folder")
  if not (os.path.lexists(out_dir) if storage.is_local(out_dir) else storage.exists(out_dir)):
    return
  if not overwrite:
    raise FileExistsError(f"{out_dir} exists; pass --overwrite to replace an earlier export")
  if not storage.isdir(out_dir) or not storage.isfile(storage.join(out_dir, "export.json")):
    raise ValueError(f"--overwrite replaces only an earlier export, and {out_dir} holds no "
                     "export.json; choose another --out or remove it yourself")


def write_export(out_dir: str, trained: inference.Trained, thresholds: dict | None = None,
                 overwrite: bool = False, workdir: str | None = None, *,
                 scoring_entry: dict | None = None) -> None:
  """Writes the export directory of `trained` (its pool-prompt Predictor, fusion constant, step,
  calibration and classes): built in a local staging folder, then `storage.move_dir`d (a rename
  beside a local `out_dir`; a copy to `gs://` or `ram://`, see `data_pipelines.storage`).

  `scoring_entry` defaults to `fusion.make_scoring(cfg, fusion_c, calibration)`;
  `thresholds` must have been made on it (`thresholds.make_thresholds`)."""
  check_out_dir(out_dir, overwrite, workdir)
  cfg, fusion_c, step, calibration = (trained.cfg, trained.fusion_c, trained.step,
                                      trained.calibration)
  classes, predictor = trained.index.classes, trained.predictor_for("pool")
  entry = scoring_entry or fusion.make_scoring(cfg, fusion_c, calibration)
  tmp = storage.staging_dir(out_dir)
  try:
    write = lambda name, data: storage.atomic_write(os.path.join(tmp, name), data)
    pool = predictor.pool
    write(program_lib.POOL_FILE, _npz_bytes(features=pool.features, class_ids=pool.class_ids,
                                            descriptors=pool.descriptors))
    program, leaves, platforms = serialize_predictor(predictor, cfg, entry)
    write(program_lib.PROGRAM_FILE, program)
    write(program_lib.WEIGHTS_FILE, _npz_bytes(**{f"w{i:05d}": x for i, x in enumerate(leaves)}))
    meta = {"format_version": FORMAT_VERSION, "package_version": package_version(),
            "classes": list(classes), "step": step, "input_size": cfg.input_size,
            "preprocessing": {"resize": program_lib.RESIZE_METHOD, "resize_masks": "pil-nearest",
                              "mask_defect": "non-zero", "scale": 1 / 255,
                              "mean": list(cfg.data.mean), "std": list(cfg.data.std)},
            "mean": list(cfg.data.mean), "std": list(cfg.data.std),
            "fusion_c": fusion_c, "alpha": cfg.eval.alpha, "pool_size": cfg.eval.pool_size,
            "scoring": entry, "calibration": calibration,
            "thresholds": thresholds, "backbone": cfg.backbone.name,
            "program": {"file": program_lib.PROGRAM_FILE, "weights": program_lib.WEIGHTS_FILE,
                        "n_weights": len(leaves), "platforms": list(platforms),
                        "arguments": ["weights", "images", "pool_features", "pool_descriptors",
                                      "pool_class_ids", "scoring"],
                        "scoring_layout": list(scoring.SCORING_KEYS),
                        "jax_version": jax.__version__, "prompts": "pool"},
            "config": json.loads(cfg.to_json_best_effort())}
    write("export.json", json.dumps(meta, indent=1))
    storage.move_dir(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def main(args) -> None:
  """`onenip-export` with its flags parsed by `onenip_jax.cli`: checkpoint -> export directory."""
  try:  # before any work: a wrong --out should not cost the time of loading and calibrating
    check_out_dir(args.out, args.overwrite, args.workdir)
  except (FileExistsError, ValueError) as e:
    raise app.UsageError(str(e)) from e
  trained = restore.load_checkpoint(
      args.workdir, sharding.make_mesh(), args.step, config=args.config, overrides=args.overrides,
      verify_cache=os.path.join(args.workdir, "verified_images.json"))
  cfg, index, step = trained.cfg, trained.index, trained.step
  if np.isnan(trained.fusion_c):
    raise UserError(f"{args.workdir}: the checkpoint at step {step} has no frozen fusion constant "
                    "(training did not finish); finish training or pass --step of a final checkpoint")
  entry = fusion.make_scoring(cfg, trained.fusion_c, trained.calibration)
  log.info("export scoring: %s %s", entry["fusion"], entry["note"])
  thresholds, make = None, thresholds_lib.make_thresholds
  if args.calibrate_on_test:
    thresholds = make(trained, entry, index.test, "test-set", args.target_fpr,
                      "fitted on the test set: optimistic")
  elif args.threshold_dir:
    samples = thresholds_lib.validation_samples(args.threshold_dir, index.classes)
    thresholds = make(trained, entry, samples, f"validation-folder:{args.threshold_dir}",
                      args.target_fpr)
  elif args.threshold_fraction > 0:
    samples, sources = thresholds_lib.default_threshold_samples(
        index, trained.pool, args.threshold_fraction, cfg.seed)
    thresholds = make(trained, entry, samples, "holdout-normals", args.target_fpr,
                      class_sources=sources)
  if thresholds:
    log.info("thresholds (%s): global %.5f; %s", thresholds["global"]["source"],
             thresholds["global"]["value"],
             ", ".join(f"{c} {e['value']:.5f}" for c, e in thresholds["per_class"].items()))
  write_export(args.out, trained, thresholds, args.overwrite, args.workdir, scoring_entry=entry)
  log.info("exported step %d to %s", step, args.out)

