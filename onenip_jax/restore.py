"""Loading a trained model for inference from a training checkpoint.

`load_checkpoint` rebuilds the Orbax template of the train state (`onenip_jax.train_state`) and
keeps only what inference needs, as an `inference.Predictor`. An export is run by
`onenip_jax.exported`.
"""
import dataclasses

import jax
import ml_collections
import numpy as np

from onenip_jax import (checkpoints, config_checks, exported, inference, scoring_modes, sharding,
                        train_state)
from onenip_jax.config_loading import load_config


@dataclasses.dataclass
class LoadedModel:
  """A checkpoint's model ready for inference with the scoring of its export."""
  predictor: inference.Predictor
  config: ml_collections.ConfigDict
  classes: tuple[str, ...]
  fusion_c: float
  step: int
  thresholds: dict | None
  scoring: dict | None = None      # export.json's `scoring` (`scoring_modes.make_scoring`)
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
