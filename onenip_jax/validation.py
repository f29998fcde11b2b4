"""The validation set of a checkpoint's calibration and the calibration itself (issue 13).

Validation set: the held-out normal training images of `index.holdout` (label 0, empty masks) and
`calibration.synthetic_per_image` synthetic anomalies made from each by the training synthesis
(tf.data, `input_pipeline.make_eval_iterator(synthesis_seed=...)`) with the seed
`seed + calibration.seed_offset` (training synthesises with `seed`). Prompts are drawn as the
evaluation draws them: class prompts from `index.train`, or the pool built from `index.train`.
No test image is read. The selection itself is `onenip_jax.calibration` (numpy).
"""
import logging

import numpy as np

from onenip_jax import calibration as calib
from onenip_jax import eval_maps, inference

log = logging.getLogger("onenip")


def settings(cfg) -> dict:
  """The settings a calibration records and is made with, read from `cfg`."""
  return {"synthetic_per_image": int(cfg.calibration.synthetic_per_image),
          "synthesis_seed": int(cfg.seed) + int(cfg.calibration.seed_offset),
          "prompt_mode": cfg.eval.prompt_mode}


def out_of_date(stored: dict, cfg) -> str | None:
  """Why the calibration `stored` with a checkpoint does not answer `cfg`, or None if it does:
  another `calibration.METHOD`, or other `settings` (synthetic_per_image, synthesis seed,
  prompt_mode) or candidate grid (weights, pool_sizes, read from its candidates)."""
  if stored.get("method") != calib.METHOD:
    return f"made by another method ({stored.get('method', 'before calibration.METHOD')})"
  cands = stored["global"]["candidates"]
  now = dict(settings(cfg), weights=sorted({float(w) for w in cfg.calibration.weights}),
             pool_sizes=sorted({int(p) for p in cfg.calibration.pool_sizes}))
  made = dict({key: stored.get(key) for key in settings(cfg)},
              weights=sorted({c["weight"] for c in cands if c["ref_space"] == "logodds"}),
              pool_sizes=sorted({c["pool_size"] for c in cands}))
  changed = [f"{k} {made[k]} -> {now[k]}" for k in now if made[k] != now[k]]
  return "made with other settings: " + ", ".join(changed) if changed else None


def calibrate_state(cfg, state, index, features, backbone_vars, mesh) -> dict | None:
  """The calibration (`onenip_jax.calibration`) of a train state on `index.holdout`, with the
  prompts evaluation uses (`eval.prompt_mode`; the pool comes from `index.train`). None without
  held-out images or without a refiner. Reads no test image."""
  if not index.holdout or not cfg.model.refiner:
    return None
  model, _ = inference.make_model(cfg)
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  predictor = inference.make_predictor(cfg, model, features, variables, backbone_vars, mesh, index)
  return calibrate_predictor(cfg, predictor, index,
                             float(np.asarray(state.fusion_c.addressable_data(0))))


def validation_groups(cfg, predictor, index) -> dict:
  """The validation maps of `index.holdout` and `calibration.synthetic_per_image` synthetic
  anomalies made from each held-out image (seed `seed + calibration.seed_offset`), as
  `calibration.calibrate` takes them: {class: {'rec', 'ref', 'mask', 'label', 'normal',
  'source'}}. Rows: the class's held-out normals, then its synthetic copy 0 of each, copy 1, ..."""
  made = settings(cfg)
  k, syn_seed = made["synthetic_per_image"], made["synthesis_seed"]
  holdout, n = index.holdout, len(index.holdout)
  # Two passes over all classes (each tf.data pipeline traces the synthesis graph once). Prompt
  # and synthesis seeds come from the position in the list: j * n + r for copy j of image r.
  parts = [eval_maps.collect_maps(predictor, holdout, index, cfg)]
  if k:
    parts.append(eval_maps.collect_maps(predictor, holdout * k, index, cfg,
                                        synthesis_seed=syn_seed))
  maps = {key: np.concatenate([p[key] for p in parts]) for key in ("rec", "ref", "mask")}
  del parts
  cls = np.asarray([s.cls for s in holdout] * (k + 1))
  # The class-local index of the held-out image each row is, or was made from (the folds).
  local = np.zeros(n, np.int64)
  for c in set(cls[:n]):
    local[cls[:n] == c] = np.arange(np.sum(cls[:n] == c))
  groups = {}
  for c, _ in eval_maps.class_rows(holdout, index.classes):
    rows = np.flatnonzero(cls == c)
    mask = maps["mask"][rows]
    groups[c] = {"rec": maps["rec"][rows], "ref": maps["ref"][rows], "mask": mask,
                 "label": mask.reshape(len(mask), -1).any(axis=1).astype(np.int32),
                 "normal": rows < n, "source": local[rows % n]}
  return groups


def calibrate_predictor(cfg, predictor, index, frozen_c: float = float("nan")) -> dict | None:
  """Calibration on `validation_groups`; with a finite `frozen_c` it also records the reference
  fusion's validation figures."""
  holdout = index.holdout
  groups = validation_groups(cfg, predictor, index)
  result = calib.calibrate(groups, cfg.calibration, int(cfg.eval.pool_size))
  if result is None:
    return None
  if np.isfinite(frozen_c):
    calib.add_reference_figures(result, groups, frozen_c, float(cfg.eval.alpha),
                                int(cfg.eval.pool_size))
  result.update(settings(cfg), holdout_fraction=float(cfg.calibration.holdout_fraction),
                holdout={c: [s.path for s in holdout if s.cls == c] for c in groups})
  log.info("calibration on %d held-out normal images (+%d synthetic each):\n%s", len(holdout),
           result["synthetic_per_image"], calib.summary(result))
  return result
