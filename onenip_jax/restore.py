"""Loading a trained model for inference: from a training checkpoint or from an export.

`load_checkpoint` rebuilds the Orbax template of the train state (`onenip_jax.train_state`) and
keeps only what inference needs; `load_export` reads an export directory (`onenip_jax.export`)
with no training state. Both give an `inference.Predictor`.
"""
import dataclasses
import io
import os

import flax.serialization
import jax
import ml_collections
import numpy as np

from data_pipelines import storage
from data_pipelines.errors import UserError, UserFileNotFoundError
from onenip_jax import (checkpoints, config_checks, exported, inference, scoring_modes, sharding,
                        train_state)
from onenip_jax.config_loading import load_config, upgrade_stored_config


@dataclasses.dataclass
class LoadedModel:
  """A model ready for inference with what its export (or checkpoint) says about scoring it."""
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
    return scoring_modes.score_maps(self.scoring, rec, ref, self.config, self.fusion_c,
                                    self.calibration)


def load_checkpoint(workdir: str, mesh, step=None, *, config=None, overrides=()):
  """(cfg, predictor without pool, frozen fusion constant, step) from a training work directory."""
  stored = checkpoints.restore_config(workdir, step)
  cfg = load_config(config, overrides, base=stored)
  config_checks.check_config(cfg)
  model, features = inference.make_model(stored)
  tx = train_state.make_optimizer(stored, 1)
  template = jax.jit(lambda: train_state.init_state(stored, model, tx, features),
                     out_shardings=sharding.replicated(mesh))()
  manager = checkpoints.make_manager(workdir, stored)
  if step is None:  # the newest intact checkpoint (a damaged one is reported and skipped)
    state, _, _ = checkpoints.restore_latest(manager, template)
  else:
    state = checkpoints.restore(manager, template, step)
  manager.close()
  backbone_vars = jax.device_put(features.load_variables(stored.backbone),
                                 sharding.replicated(mesh))
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  predictor = inference.Predictor(model, features, variables, backbone_vars, mesh)
  fusion_c = float(np.asarray(state.fusion_c.addressable_data(0)))
  return cfg, predictor, fusion_c, int(np.asarray(state.step.addressable_data(0)))


def check_classes(predictor: inference.Predictor, index) -> None:
  """Pool prompts carry class ids: the evaluated dataset must list the same classes."""
  if predictor.pool is not None and predictor.classes not in (None, tuple(index.classes)):
    raise UserError(f"the dataset's classes {index.classes} differ from the exported model's "
                    f"{predictor.classes}")


def _read(path: str, what: str) -> bytes:
  if not storage.isfile(path):
    raise UserFileNotFoundError(f"export is incomplete: {what} missing ({path})")
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
    raise UserError(f"{pool_path} cannot be read ({e}); the export is damaged") from e
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
    raise UserError(f"{path} cannot be decoded ({type(e).__name__}: {e}); the export is damaged "
                    "or truncated") from e
