"""Loading a trained model for inference from a training checkpoint.

`load_checkpoint` rebuilds the Orbax template of the train state (`onenip_jax.training.state`) and
keeps only what inference needs, as a `inference.Trained`. An export is run by
`onenip_jax.serving.program`.
"""
import jax

from onenip_jax import sharding
from onenip_jax.config import checks
from onenip_jax.config.loading import load_config
from onenip_jax.evaluation import inference
from onenip_jax.training import checkpoints
from onenip_jax.training import state as state_lib


def load_checkpoint(workdir: str, mesh, step=None, *, config=None, overrides=(),
                    verify_cache: str | None = None) -> inference.Trained:
  """The `inference.Trained` of a training work directory's checkpoint `step` (default: the newest
  intact one): its network, frozen fusion constant, step and calibration, with the stored config
  (`config` / `overrides` applied) and its dataset, indexed on first use (`verify_cache`: the
  image verification cache, `indexing.index_config`)."""
  stored = checkpoints.restore_config(workdir, step)
  cfg = load_config(config, overrides, base=stored)
  checks.check_config(cfg)
  model, features = inference.make_model(stored)
  tx = state_lib.make_optimizer(stored, 1)
  template = jax.jit(lambda: state_lib.init_state(stored, model, tx, features),
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
  step = int(inference.host_scalar(state.step))
  predictor = inference.Predictor(model, features, variables, backbone_vars, mesh)
  return inference.Trained(cfg, predictor, fusion_c=inference.host_scalar(state.fusion_c),
                               step=step,
                               calibration=checkpoints.read_calibration(workdir, step),
                               verify_cache=verify_cache)
