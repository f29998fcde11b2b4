"""Orbax checkpoints of the train state (params, batch stats, optimiser state, step, RNG) + config.

Saves are atomic (Orbax writes to a temporary directory and renames), so a run killed at any time
restarts from the last complete checkpoint.
"""
import json

import ml_collections
import orbax.checkpoint as ocp


def make_manager(workdir: str, cfg: ml_collections.ConfigDict) -> ocp.CheckpointManager:
  """`<workdir>/checkpoints`, keeping the last `ckpt.keep`; saves are synchronous (safe on SIGTERM)."""
  options = ocp.CheckpointManagerOptions(max_to_keep=cfg.ckpt.keep, create=True,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(f"{workdir}/checkpoints", options=options)


def save(manager: ocp.CheckpointManager, step: int, state, cfg: ml_collections.ConfigDict) -> None:
  config = json.loads(cfg.to_json_best_effort())
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            config=ocp.args.JsonSave(config)), force=True)
  manager.wait_until_finished()


def restore(manager: ocp.CheckpointManager, template, step: int | None = None):
  """Restores the state at `step` (default: latest) into the structure/shardings of `template`."""
  step = manager.latest_step() if step is None else step
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(template)))
  return restored.state


def restore_config(workdir: str, step: int | None = None) -> ml_collections.ConfigDict:
  """The config stored with a checkpoint, e.g. for `onenip-eval --workdir`."""
  options = ocp.CheckpointManagerOptions(read_only=True, create=False)
  with ocp.CheckpointManager(f"{workdir}/checkpoints", options=options) as manager:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint under {workdir}/checkpoints")
    restored = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
  return ml_collections.ConfigDict(restored.config)
