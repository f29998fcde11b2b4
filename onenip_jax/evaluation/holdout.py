"""The validation set of a checkpoint's calibration and the calibration itself.

Validation set: the held-out normal training images of `index.holdout` (label 0, empty masks) and
`calibration.synthetic_per_image` synthetic anomalies made from each by the training synthesis
(tf.data, `input_pipeline.make_eval_iterator(synthesis_seed=...)`) with the seed
`seed + calibration.seed_offset` (training synthesises with `seed`). Prompts are drawn as the
evaluation draws them: class prompts from `index.train`, or the pool built from `index.train`.
The per-class parameters are fitted on maps made with `eval.prompt_mode`'s prompts, the global
ones (pool-prompt evaluation, exports) always on pool-prompt maps. No test image is read. Maps are
made one class at a time (`ValidationMaps`), so host memory holds one class's; the selection
itself is `onenip_jax.evaluation.calibration`.
"""
import logging
from collections.abc import Mapping

import numpy as np

from data_pipelines import indexing
from onenip_jax.evaluation import calibration as calib
from onenip_jax.evaluation import maps as maps_lib

log = logging.getLogger("onenip")


def settings(cfg) -> dict:
  """The settings a calibration records and is made with, read from `cfg`."""
  return {"synthetic_per_image": int(cfg.calibration.synthetic_per_image),
          "synthesis_seed": int(cfg.seed) + int(cfg.calibration.seed_offset),
          "prompt_mode": cfg.eval.prompt_mode}


def out_of_date(stored: dict, cfg) -> str | None:
  """Why the calibration `stored` with a checkpoint does not answer `cfg`, or None if it does:
  another `calibration.METHOD` (older calibrations named it in a sentence), other `settings`
  (synthetic_per_image, synthesis seed, prompt_mode) or candidate grid (weights, pool_sizes,
  read from its candidates), or global parameters not fitted with pool prompts."""
  if stored.get("method") != calib.METHOD:
    return f"made by another method ({stored.get('method', 'before calibration.METHOD')})"
  cands = stored["global"]["candidates"]
  now = dict(settings(cfg), weights=sorted({float(w) for w in cfg.calibration.weights}),
             pool_sizes=sorted({int(p) for p in cfg.calibration.pool_sizes}),
             global_prompt_mode="pool")
  made = dict({key: stored.get(key) for key in settings(cfg)},
              weights=sorted({c["weight"] for c in cands if c["ref_space"] == "logodds"}),
              pool_sizes=sorted({c["pool_size"] for c in cands}),
              global_prompt_mode=calib.fitted_prompt_mode(stored, stored["global"]))
  changed = [f"{k} {made[k]} -> {now[k]}" for k in now if made[k] != now[k]]
  return "made with other settings: " + ", ".join(changed) if changed else None


def _image_ids(samples) -> np.ndarray:
  """(len(samples),) the index of each sample's path among the distinct paths, in order of first
  appearance: copies of one image share it (a fold)."""
  first = {}
  return np.asarray([first.setdefault(s.path, len(first)) for s in samples], np.int64)


class ValidationMaps(Mapping):
  """{class: validation maps} as `calibration.calibrate` reads them, made on access.

  A class's rows: its held-out normals, then synthetic copy 0 of each, copy 1, ... Copy j of
  held-out image r (its position in `index.holdout`, n images) is seeded by position j * n + r, the
  normal image r by r: the maps are those of one pass over the whole list, whichever class is
  read. Keys of a class: 'rec', 'ref', 'mask', 'label', 'normal', 'source' (the class-local index
  of the held-out image, by path); with `normals_only`, 'rec', 'ref' and 'source' of the normals.
  """

  def __init__(self, cfg, predictor, index, normals_only: bool = False):
    self.cfg, self.predictor, self.index, self.normals_only = cfg, predictor, index, normals_only
    self.rows = dict(indexing.class_rows(index.holdout, index.classes))

  def __iter__(self):
    return iter(self.rows)

  def __len__(self):
    return len(self.rows)

  def __getitem__(self, cls):
    made, holdout, rows = settings(self.cfg), self.index.holdout, self.rows[cls]
    k, n = (0 if self.normals_only else made["synthetic_per_image"]), len(holdout)
    samples = [holdout[r] for r in rows]
    passes = [(samples, rows, None)]
    if k:
      passes.append((samples * k, np.concatenate([j * n + rows for j in range(k)]),
                     made["synthesis_seed"]))
    shape = (len(rows) * (k + 1),) + (self.cfg.input_size,) * 2
    maps = {"rec": np.zeros(shape, np.float32), "ref": np.zeros(shape, np.float32),
            "mask": np.zeros(shape, bool)}
    offset = 0
    for pass_samples, positions, seed in passes:  # written in place: one copy of the maps
      end = offset + len(pass_samples)
      maps_lib.collect_maps(self.predictor, pass_samples, self.index, self.cfg,
                            seed_positions=positions, synthesis_seed=seed,
                            out={key: a[offset:end] for key, a in maps.items()})
      offset = end
    source = np.tile(_image_ids(samples), k + 1)
    if self.normals_only:
      return {"rec": maps["rec"], "ref": maps["ref"], "source": source}
    mask = maps["mask"]
    return dict(maps, label=mask.reshape(len(mask), -1).any(axis=1).astype(np.int32),
                normal=np.arange(len(mask)) < len(rows), source=source)


def validation_groups(cfg, predictor, index, normals_only: bool = False) -> ValidationMaps:
  """The validation maps of `index.holdout` with `predictor`'s prompts, one class at a time
  (`ValidationMaps`; `dict(...)` of it holds them all)."""
  return ValidationMaps(cfg, predictor, index, normals_only)


def calibrate(trained) -> dict | None:
  """The calibration (`onenip_jax.evaluation.calibration`) of a `inference.Trained` on
  `index.holdout`: per class on the validation maps of its `eval.prompt_mode` Predictor, global on
  those of its pool-prompt one (the same maps in pool mode); with a finite frozen fusion constant it
  also records the reference fusion's validation figures. None without held-out images or without a
  refiner. Reads no test image."""
  cfg, index = trained.cfg, trained.index
  if not index.holdout or not cfg.model.refiner:
    return None
  holdout, mode = index.holdout, cfg.eval.prompt_mode
  predictor, pool_predictor = trained.predictor_for(mode), trained.predictor_for("pool")
  separate = pool_predictor is not predictor
  frozen_c = trained.fusion_c
  reference = ((frozen_c, float(cfg.eval.alpha), int(cfg.eval.pool_size))
               if np.isfinite(frozen_c) else None)
  result = calib.calibrate(
      validation_groups(cfg, predictor, index), cfg.calibration, int(cfg.eval.pool_size),
      normals=validation_groups(cfg, predictor, index, normals_only=True),
      global_groups=validation_groups(cfg, pool_predictor, index) if separate else None,
      global_normals=(validation_groups(cfg, pool_predictor, index, normals_only=True)
                      if separate else None),
      reference=reference, prompt_mode=mode, global_prompt_mode="pool")
  if result is None:
    return None
  result.update(settings(cfg), holdout_fraction=float(cfg.calibration.holdout_fraction),
                holdout={c: [s.path for s in holdout if s.cls == c] for c in result["per_class"]})
  log.info("calibration on %d held-out normal images (+%d synthetic each):\n%s", len(holdout),
           result["synthetic_per_image"], calib.summary(result))
  return result
