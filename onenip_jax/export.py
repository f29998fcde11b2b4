"""Self-contained export of a trained model, and loading it back: `onenip-export`.

  onenip-export --workdir DIR --out EXPORT_DIR [--step N] [--threshold-fraction F] [--target-fpr P]
                [--threshold-dir DIR | --calibrate-on-test] [--config FILE] [--config.KEY=VALUE]

EXPORT_DIR holds everything inference needs and nothing of training (no optimiser state):
  export.json              format and package version, classes, input size, preprocessing (resize
                           method, mean, std), fusion constant, `scoring` (the map the predictors
                           compute), `calibration` (the run's, or null), thresholds (each with how
                           it was made), checkpoint step, the serialised program's platforms, the
                           config
  predictor.jaxexport      `jax.export` serialisation of the whole pool-mode predictor and
  predictor_weights.npz    its weights (see `onenip_jax.exported`, which runs them with jax,
                           numpy and Pillow only)
  model.msgpack            the network's params and batch statistics (Flax path)
  backbone.msgpack         the frozen backbone's variables (Flax path)
  prompt_pool.npz          per-class prompt features for class-agnostic (pool) prompts
The directory is written under a temporary name and renamed, so it is complete or absent.

Scoring: `eval.fusion` of the (overridable) config, as `onenip-eval` scores: "reference" (the
default) or, with `--config.eval.fusion=calibrated`, the calibration stored with the checkpoint
(`onenip_jax.calibration`, made at the end of training on held-out normals), falling back to
"reference" with a note in export.json when the run has none. Both export
predictors (Flax, `load_export`, and serialised) score with pool prompts, so they use the GLOBAL
calibration, which is what it was fitted for (one set of statistics and weight over all classes,
chosen on the mean objective of the classes): an image's map and score then do not depend on which
class its prompt matched (a wrong match changes the prompt, not the normalisation), pool-mode
`onenip-eval --workdir` reports the same numbers, and the program has one box size. export.json
keeps the whole calibration (per class and global: the choice, its validation figures, every
candidate, the held-out images, the synthesis seed).

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
export.json records the scoring, source, method, image counts and target of each threshold.
"""
import dataclasses
import importlib.metadata
import io
import json
import logging
import os
import shutil

import flax.serialization
import jax
import ml_collections
import numpy as np
from absl import app

from data_pipelines import storage
from onenip_jax import checkpoints, exported, inference, sharding
from onenip_jax.config_loading import load_config, upgrade_stored_config

FORMAT_VERSION = exported.FORMAT_VERSION
log = logging.getLogger("onenip")


@dataclasses.dataclass
class LoadedModel:
  predictor: inference.Predictor
  config: ml_collections.ConfigDict
  classes: tuple[str, ...]
  fusion_c: float
  step: int
  thresholds: dict | None
  scoring: dict | None = None      # export.json's `scoring` (`exported.scoring_entry`)
  calibration: dict | None = None  # the run's calibration, or None

  @property
  def threshold(self) -> float | None:
    """The global threshold (None without one)."""
    return exported.threshold_value(self.thresholds, None)

  def score(self, rec: np.ndarray, ref: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(N, H, W) maps of pool prompts -> (anomaly maps (N, H, W) f32, image scores (N,)) of the
    export's scoring."""
    return score_maps(self.scoring, rec, ref, self.config, self.fusion_c, self.calibration)


def load_checkpoint(workdir: str, mesh, step=None, *, config=None, overrides=()):
  """(cfg, predictor without pool, frozen fusion constant, step) from a training work directory."""
  from onenip_jax import train  # pylint: disable=g-import-not-at-top
  stored = checkpoints.restore_config(workdir, step)
  cfg = load_config(config, overrides, base=stored)
  model, features = inference.make_model(stored)
  tx = train.make_optimizer(stored, 1)
  template = jax.jit(lambda: train.init_state(stored, model, tx, features.channels),
                     out_shardings=sharding.replicated(mesh))()
  manager = checkpoints.make_manager(workdir, stored)
  if step is None:  # the newest intact checkpoint (a damaged one is reported and skipped)
    state, _, _ = checkpoints.restore_latest(manager, template)
  else:
    state = checkpoints.restore(manager, template, step)
  manager.close()
  backbone_vars = jax.device_put(features.load_variables(stored.backbone), sharding.replicated(mesh))
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  predictor = inference.Predictor(model, features, variables, backbone_vars, mesh)
  fusion_c = float(np.asarray(state.fusion_c.addressable_data(0)))
  return cfg, predictor, fusion_c, int(np.asarray(state.step.addressable_data(0)))


def check_classes(predictor: inference.Predictor, index) -> None:
  """Pool prompts carry class ids: the evaluated dataset must list the same classes."""
  if predictor.pool is not None and predictor.classes not in (None, tuple(index.classes)):
    raise ValueError(f"the dataset's classes {index.classes} differ from the exported model's "
                     f"{predictor.classes}")


def _npz_bytes(**arrays) -> bytes:
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  return buf.getvalue()


def _canonical(path: str) -> str:
  return os.path.realpath(path) if storage.is_local(path) else storage.normpath(path)


def _host_tree(tree):
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array)
                      else np.asarray(x), tree)


def serialize_predictor(predictor: inference.Predictor, cfg, scoring: dict,
                        platforms=("cpu", "cuda", "tpu")) -> tuple[bytes, list, tuple]:
  """`jax.export` of `Predictor.fused` (pool prompts, scoring, image score) with symbolic B and K.

  The weights are the program's first argument (a flat list) and the six `scoring` numbers its
  last, not embedded constants: see `onenip_jax.exported` for why. Only `scoring["pool_size"]` is
  compiled in. Platforms the installed jax cannot lower for are left out.

  Returns:
    (serialised program, weight leaves in the program's order, platforms lowered for).
  """
  leaves, treedef = jax.tree.flatten({"model": _host_tree(predictor.variables),
                                      "backbone": _host_tree(predictor.backbone_vars)})
  pool_size = int(scoring["pool_size"])

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
           jax.ShapeDtypeStruct((len(exported.SCORING_KEYS),), np.float32))

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


# ------------------------------------------------------------------------------------------------
# Scoring


def make_scoring(cfg, fusion_c: float, calibration: dict | None) -> dict:
  """export.json's `scoring`: the `eval.fusion` scoring (`evaluate.default_scoring`, with its
  fallbacks) as {"fusion", "params": {exported.SCORING_KEYS}, "pool_size", "calibration_scope",
  "requested", "note"}; calibrated uses the GLOBAL calibration (pool prompts, module doc)."""
  from onenip_jax import evaluate  # pylint: disable=g-import-not-at-top
  requested = {"frozen": "reference"}.get(cfg.eval.fusion, cfg.eval.fusion)
  name = evaluate.default_scoring(cfg, calibration, bool(cfg.model.refiner))
  alpha, pool_size, scope, note = float(cfg.eval.alpha), int(cfg.eval.pool_size), None, ""
  values = {"reference": (0.0, 1.0, 0.0, 1.0, float(np.float32(1.0 - alpha)),
                          float(np.float32(alpha) * np.float32(fusion_c)), 0.0),
            "refiner": (0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0),
            "reconstruction": (0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0)}
  if name == "calibrated":
    g, scope = calibration["global"], "global"
    values["calibrated"] = (g["rec_mean"], g["rec_std"], g["ref_mean"], g["ref_std"],
                            float(np.float32(1.0 - g["weight"])), float(g["weight"]),
                            float(g.get("ref_space", "probability") == "logodds"))
    pool_size = int(g["pool_size"])
    note = (f"global calibration: w={g['weight']:g}, box {pool_size}, validation "
            f"mean {100 * g['objective']:.2f} ({g['n_normal']} held-out normal + "
            f"{g['n_synthetic']} synthetic images, {calibration.get('prompt_mode', '?')} prompts)")
  elif requested == "calibrated" and name == "reference":
    note = ("eval.fusion='calibrated' but the run has no calibration (calibration."
            "holdout_fraction=0 or an older run): the reference fusion")
  elif name != requested:
    note = f"eval.fusion={requested!r} needs a refiner; this model has none"
  return {"fusion": name, "params": dict(zip(exported.SCORING_KEYS, map(float, values[name]))),
          "pool_size": pool_size, "calibration_scope": scope, "requested": requested,
          "note": note}


def score_maps(scoring: dict, rec: np.ndarray, ref: np.ndarray | None, cfg, fusion_c: float,
               calibration: dict | None) -> tuple[np.ndarray, np.ndarray]:
  """(N, H, W) pool-prompt maps -> (anomaly maps (N, H, W) f32, image scores (N,)) of `scoring`
  (`make_scoring`), computed as `onenip-eval` does (`evaluate.scored_maps`)."""
  from onenip_jax import evaluate  # pylint: disable=g-import-not-at-top
  return evaluate.scored_maps(scoring["fusion"], rec, ref, c=fusion_c, cfg=cfg,
                              calibration=calibration, cls=None)


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


def write_export(out_dir: str, cfg, predictor: inference.Predictor, classes, fusion_c: float,
                 step: int, thresholds: dict | None = None, overwrite: bool = False,
                 workdir: str | None = None, *, calibration: dict | None = None,
                 scoring: dict | None = None) -> None:
  """Writes the export directory: built in a local staging folder, then `storage.move_dir`d (a
  rename beside a local `out_dir`; a copy to `gs://` or `ram://`, see `data_pipelines.storage`).

  `scoring` defaults to `make_scoring(cfg, fusion_c, calibration)`; `thresholds` must have been
  made on it (`make_thresholds`)."""
  check_out_dir(out_dir, overwrite, workdir)
  scoring = scoring or make_scoring(cfg, fusion_c, calibration)
  tmp = storage.staging_dir(out_dir)
  try:
    write = lambda name, data: storage.atomic_write(os.path.join(tmp, name), data)
    write("model.msgpack", flax.serialization.msgpack_serialize(_host_tree(predictor.variables)))
    write("backbone.msgpack",
          flax.serialization.msgpack_serialize(_host_tree(predictor.backbone_vars)))
    pool = predictor.pool
    write(exported.POOL_FILE, _npz_bytes(features=pool.features, class_ids=pool.class_ids,
                                         descriptors=pool.descriptors))
    program, leaves, platforms = serialize_predictor(predictor, cfg, scoring)
    write(exported.PROGRAM_FILE, program)
    write(exported.WEIGHTS_FILE, _npz_bytes(**{f"w{i:05d}": x for i, x in enumerate(leaves)}))
    meta = {"format_version": FORMAT_VERSION, "package_version": package_version(),
            "classes": list(classes), "step": step, "input_size": cfg.input_size,
            "preprocessing": {"resize": exported.RESIZE_METHOD, "resize_masks": "pil-nearest",
                              "mask_defect": "non-zero", "scale": 1 / 255,
                              "mean": list(cfg.data.mean), "std": list(cfg.data.std)},
            "mean": list(cfg.data.mean), "std": list(cfg.data.std),
            "fusion_c": fusion_c, "alpha": cfg.eval.alpha, "pool_size": cfg.eval.pool_size,
            "scoring": scoring, "calibration": calibration,
            "thresholds": thresholds, "backbone": cfg.backbone.name,
            "program": {"file": exported.PROGRAM_FILE, "weights": exported.WEIGHTS_FILE,
                        "n_weights": len(leaves), "platforms": list(platforms),
                        "arguments": ["weights", "images", "pool_features", "pool_descriptors",
                                      "pool_class_ids", "scoring"],
                        "scoring_layout": list(exported.SCORING_KEYS),
                        "jax_version": jax.__version__, "prompts": "pool"},
            "config": json.loads(cfg.to_json_best_effort())}
    write("export.json", json.dumps(meta, indent=1))
    storage.move_dir(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


# ------------------------------------------------------------------------------------------------
# Thresholds


def normal_quantile(scores: np.ndarray, target_fpr: float) -> float:
  """The lowest threshold t among the scores with #(normal score > t) <= target_fpr * n."""
  s = np.sort(np.asarray(scores, np.float64))[::-1]
  k = int(np.floor(target_fpr * len(s) + 1e-9))
  return float(s[min(k, len(s) - 1)])


def _threshold_entry(scores, labels, source: str, target_fpr: float, note: str = "") -> dict:
  scores, labels = np.asarray(scores, np.float64), np.asarray(labels) > 0
  normal = scores[~labels]
  if labels.any() and normal.size:
    from onenip_jax import metrics  # pylint: disable=g-import-not-at-top
    f1, t = metrics.f1_max(scores, labels)
    # f1_max predicts anomalous iff score >= t; the export's rule is score > threshold.
    entry = {"value": float(np.nextafter(t, -np.inf)), "method": "f1-max", "f1": f1}
  elif normal.size:
    entry = {"value": normal_quantile(normal, target_fpr), "method": "normal-quantile",
             "target_fpr": target_fpr}
  else:
    raise ValueError(f"no normal image to set a threshold from ({source})")
  value = entry["value"]
  entry.update({"source": source, "n_normal": int(normal.size), "n_anomalous": int(labels.sum()),
                "fpr_on_source": float(np.mean(normal > value)) if normal.size else None})
  if note:
    entry["note"] = note
  return entry


def _class_scores(model: LoadedModel, samples, index) -> dict:
  """{class: (pool-mode image scores of the export's scoring (n,), labels (n,))}, one class at a
  time."""
  from onenip_jax import evaluate  # pylint: disable=g-import-not-at-top
  out = {}
  for cls, rows in evaluate.class_rows(samples, index.classes):
    subset = [samples[i] for i in rows]
    maps = evaluate.collect_maps(model.predictor, subset, index, model.config)
    _, scores = model.score(maps["rec"], maps["ref"])
    labels = np.where(maps["has_mask"], maps["mask"].any(axis=(1, 2)), maps["label"] > 0)
    out[cls] = (scores, labels.astype(np.int32))
  return out


def make_thresholds(model: LoadedModel, samples, index, source: str, target_fpr: float,
                    note: str = "", class_sources: dict | None = None) -> dict:
  """{'global': entry, 'per_class': {class: entry}, 'scoring': name} from `samples` (module doc),
  on `model`'s scoring. `class_sources`: {class: (source, note)} for classes whose samples come
  from elsewhere than `source`."""
  class_sources = class_sources or {}
  by_class = _class_scores(model, samples, index)
  per_class = {}
  for c, (s, l) in by_class.items():
    src, why = class_sources.get(c, (source, note))
    per_class[c] = _threshold_entry(s, l, src, target_fpr, why)
  used = sorted({e["source"] for e in per_class.values()})
  scores = np.concatenate([s for s, _ in by_class.values()])
  labels = np.concatenate([l for _, l in by_class.values()])
  glob = _threshold_entry(scores, labels, "+".join(used), target_fpr,
                          note if used == [source] else "pooled over the per-class sources")
  return {"global": glob, "per_class": per_class, "scoring": model.scoring["fusion"]}


def threshold_normals(index, pool: inference.PromptPool, fraction: float, seed: int,
                      classes=None) -> list:
  """A `fraction` (at least 1) of each class's normal training images, prompt images excluded."""
  rng = np.random.default_rng(seed + 1)
  taken = set(pool.paths)
  chosen = []
  for cls in index.classes if classes is None else classes:
    cand = [s for s in index.train if s.cls == cls and s.label == 0 and s.path not in taken]
    if not cand:
      raise ValueError(f"class {cls!r} has no normal training image outside the prompt pool to "
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
  from data_pipelines import indexing, layouts  # pylint: disable=g-import-not-at-top
  samples = []
  for cls in classes:
    d = storage.join(folder, cls)
    if not storage.isdir(d):
      raise FileNotFoundError(f"validation folder {folder} has no folder for class {cls!r} ({d})")
    for sub in sorted(storage.listdir(d)):
      files = sorted(f for f in storage.listdir(storage.join(d, sub))
                     if f.lower().endswith(storage.IMAGE_EXTENSIONS)) \
          if storage.isdir(storage.join(d, sub)) else []
      label = 0 if sub in layouts.NORMAL_FOLDERS else 1
      samples += [indexing.Sample(storage.join(d, sub, f), cls, label, None, sub) for f in files]
    if not any(s.cls == cls and s.label == 0 for s in samples):
      raise ValueError(f"validation folder {d} has no normal images (expected {d}/good/)")
  return samples


def _read(path: str, what: str) -> bytes:
  if not storage.isfile(path):
    raise FileNotFoundError(f"export is incomplete: {what} missing ({path})")
  return storage.read_bytes(path)


def load_export(export_dir: str, mesh=None) -> LoadedModel:
  """Loads an export with no training state; clear errors for missing, truncated or foreign files."""
  mesh = mesh or sharding.make_mesh()
  meta = exported.read_meta(export_dir)
  cfg = ml_collections.ConfigDict(upgrade_stored_config(meta["config"]))
  model, features = inference.make_model(cfg)
  variables = _restore_msgpack(storage.join(export_dir, "model.msgpack"))
  backbone_vars = _restore_msgpack(storage.join(export_dir, "backbone.msgpack"))
  pool_path = storage.join(export_dir, "prompt_pool.npz")
  data = _read(pool_path, "prompt_pool.npz")
  try:
    with np.load(io.BytesIO(data)) as z:
      pool = inference.PromptPool(z["features"], z["class_ids"], z["descriptors"])
  except Exception as e:  # zipfile / pickle errors of a damaged file
    raise ValueError(f"{pool_path} cannot be read ({e}); the export is damaged") from e
  repl = sharding.replicated(mesh)
  predictor = inference.Predictor(model, features, jax.device_put(variables, repl),
                                  jax.device_put(backbone_vars, repl), mesh, pool,
                                  tuple(meta["classes"]))
  thresholds = meta.get("thresholds")
  if thresholds is None and meta.get("threshold") is not None:  # format 1: one test-set threshold
    thresholds = {"global": {"value": meta["threshold"], "method": "f1-max", "source": "test-set"},
                  "per_class": {}}
  return LoadedModel(predictor, cfg, tuple(meta["classes"]), float(meta["fusion_c"]),
                     int(meta["step"]), thresholds, exported.scoring_entry(meta),
                     meta.get("calibration"))


def _restore_msgpack(path: str) -> dict:
  try:
    return flax.serialization.msgpack_restore(_read(path, os.path.basename(path)))
  except (ValueError, TypeError, Exception) as e:  # msgpack raises several exception types
    if isinstance(e, FileNotFoundError):
      raise
    raise ValueError(f"{path} cannot be decoded ({type(e).__name__}: {e}); the export is damaged "
                     "or truncated") from e


def main(args) -> None:
  """`onenip-export` with its flags parsed by `onenip_jax.cli`: checkpoint -> export directory."""
  try:  # before any work: a wrong --out should not cost the time of loading and calibrating
    check_out_dir(args.out, args.overwrite, args.workdir)
  except (FileExistsError, ValueError) as e:
    raise app.UsageError(str(e)) from e
  from data_pipelines import indexing  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh()
  cfg, predictor, fusion_c, step = load_checkpoint(args.workdir, mesh, args.step,
                                                   config=args.config, overrides=args.overrides)
  if np.isnan(fusion_c):
    raise ValueError(f"{args.workdir}: the checkpoint at step {step} has no frozen fusion constant "
                     "(training did not finish); finish training or pass --step of a final checkpoint")
  index = indexing.index_config(cfg, verify_cache=os.path.join(args.workdir,
                                                               "verified_images.json"))
  predictor.pool = inference.build_prompt_pool(predictor, index, cfg)
  calibration = checkpoints.read_calibration(args.workdir, step)
  scoring = make_scoring(cfg, fusion_c, calibration)
  log.info("export scoring: %s %s", scoring["fusion"], scoring["note"])
  model = LoadedModel(predictor, cfg, tuple(index.classes), fusion_c, step, None, scoring,
                      calibration)
  thresholds = None
  if args.calibrate_on_test:
    thresholds = make_thresholds(model, index.test, index, "test-set", args.target_fpr,
                                 "fitted on the test set: optimistic")
  elif args.threshold_dir:
    samples = validation_samples(args.threshold_dir, index.classes)
    thresholds = make_thresholds(model, samples, index, f"validation-folder:{args.threshold_dir}",
                                 args.target_fpr)
  elif args.threshold_fraction > 0:
    samples, sources = default_threshold_samples(index, predictor.pool, args.threshold_fraction,
                                                 cfg.seed)
    thresholds = make_thresholds(model, samples, index, "holdout-normals", args.target_fpr,
                                 class_sources=sources)
  if thresholds:
    log.info("thresholds (%s): global %.5f; %s", thresholds["global"]["source"],
             thresholds["global"]["value"],
             ", ".join(f"{c} {e['value']:.5f}" for c, e in thresholds["per_class"].items()))
  write_export(args.out, cfg, predictor, index.classes, fusion_c, step, thresholds,
               args.overwrite, args.workdir, calibration=calibration, scoring=scoring)
  log.info("exported step %d to %s", step, args.out)


if __name__ == "__main__":  # `python -m onenip_jax.export ...`: the command line lives in the CLI
  from onenip_jax import cli  # pylint: disable=g-import-not-at-top
  cli.export()
