"""OneNIP training: `onenip-train --config configs/X.py[:args] --workdir DIR [--config.key=value]`
(the command line is `onenip_jax.cli`).

One loop, big_vision style. Placement:
  * the mesh has one axis, `data`, over every device of every process (`sharding.make_mesh`);
  * the train state is replicated, batches are split along `data`;
  * `train_step` is one `jax.jit` with explicit in/out shardings and the state donated
    (`onenip_jax.training.step`, which also says what one step computes, and the optional cache
    of frozen features it reads).

The state, optimiser and initial state are `onenip_jax.training.state`; after the last step the
fusion constant, the calibration and the evaluation are `onenip_jax.evaluation`'s.
"""
import dataclasses
import errno
import functools
import logging
import math
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from data_pipelines import indexing, input_pipeline, storage
from data_pipelines.errors import UserError
from onenip_jax import sharding
from onenip_jax.config import checks
from onenip_jax.evaluation import after_training, holdout, inference, reports
from onenip_jax.models.features import FrozenFeatures
from onenip_jax.models.onenip import OneNIP
from onenip_jax.training import checkpoints, finished, metric_logging, run_control, workdir_lock
from onenip_jax.training import state as state_lib
from onenip_jax.training.state import TrainState
from onenip_jax.training.step import compute_feature_cache, jit_train_step

log = logging.getLogger("onenip")


def train_and_evaluate(cfg: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains (resuming from the latest checkpoint in `workdir`), then evaluates; returns the state.

  A SIGTERM or SIGINT at any moment saves what is done and ends the process with 128 + signum
  (`run_control`); running the same command again goes on from there. A workdir trained to
  fewer steps than `cfg` asks for is extended: the new final step is saved with a new fusion
  constant and evaluated.

  Over several processes the decision to stop is collective (`run_control`): a signal that
  reaches any process stops all of them at the same point, with the same step saved and the
  same exit code.

  The work directory is locked for the run (`workdir_lock`): a second training on it fails at
  once with `WorkdirBusy`, naming the holder. A failed checkpoint save stops the run with
  `checkpoints.CheckpointSaveError`.
  """
  checks.check_config(cfg)
  with run_control.SignalGuard() as guard:
    lock = None
    try:
      sharding.maybe_initialize_distributed(cfg.distributed)  # a signal here stops at the check
      if jax.process_count() > 1:
        guard.make_collective(_max_over_processes)
      lock = _lock_workdir(workdir)
      return _train_and_evaluate(cfg, workdir, guard)
    except run_control.Interrupted as e:
      log.warning("stopped by %s; run the same command again to continue",
                  signal.Signals(e.signum).name)
      if lock is not None:
        lock.release()
      if guard.collective:  # leave together: the coordinator (process 0) must outlive the others
        jax.distributed.shutdown()
      run_control.exit_now(128 + e.signum)
    finally:
      if lock is not None:
        lock.release()


def _lock_workdir(workdir: str):
  """The lock of `workdir`, taken by process 0 only (the others trust it); None on the others.

  Over several processes the answer is shared, so that a refused run stops on every process.

  Raises:
    workdir_lock.WorkdirBusy when another training holds the work directory.
  """
  lock, busy = None, None
  if jax.process_index() == 0:
    lock = workdir_lock.WorkdirLock(workdir)
    try:
      lock.acquire()
    except workdir_lock.WorkdirBusy as e:
      lock, busy = None, e
  if jax.process_count() > 1 and _max_over_processes(int(busy is not None)):
    busy = busy or workdir_lock.WorkdirBusy(
        f"work directory {workdir} is in use by another training (see process 0's log)")
  if busy is not None:
    if lock is not None:
      lock.release()
    raise busy
  return lock


def _train_and_evaluate(cfg, workdir: str, guard: run_control.SignalGuard) -> TrainState:
  with guard.interruptible():  # start-up: nothing to save, a restart redoes it
    storage.makedirs(workdir)
    mesh = sharding.make_mesh()
    try:
      sharding.check_batch_size(cfg.batch_size, mesh)
    except ValueError as e:  # names config.batch_size and the device and process counts
      raise UserError(str(e)) from e
    if cfg.data.layout == "demo" and not cfg.data.root:
      cfg.data.root = storage.join(storage.abspath(workdir), "demo_data")
    manager = checkpoints.make_manager(workdir, cfg)
    stored = checkpoints.latest_config(manager)  # (step, config) of the newest checkpoint
    if stored is not None:  # before any work: a resume with another model or data fails at once
      run_control.check_resume(stored[1], cfg, workdir, stored[0])
    index = indexing.index_config(cfg, verify_cache=storage.join(workdir, "verified_images.json"))
    spe = input_pipeline.steps_per_epoch(index, cfg.batch_size)
    num_steps = state_lib.total_steps(cfg, spe)
    log.info("%d classes, %d train / %d test images; %d steps (%d per epoch) on %d devices",
             len(index.classes), len(index.train), len(index.test), num_steps, spe,
             mesh.devices.size)
    gaps = indexing.test_set_gaps(index.classes, index.test)
    if gaps:  # said before the first step, and again under the final table
      log.warning("the test set cannot measure %d of %d class(es); training goes on:\n  %s",
                  len(gaps), len(index.classes), "\n  ".join(gaps))

    features = FrozenFeatures.from_config(cfg.backbone)
    backbone_vars = jax.device_put(features.load_variables(cfg.backbone), sharding.replicated(mesh))
    model = OneNIP.from_config(cfg.model)
    tx = state_lib.make_optimizer(cfg, spe)

    repl = sharding.replicated(mesh)
    state = jax.jit(functools.partial(state_lib.init_state, cfg, model, tx, features),
                    out_shardings=repl)()
    state = _resume(manager, state, cfg, workdir, num_steps, repl, stored)
    start = int(_scalar(state.step))
    run = _Run(cfg, workdir, guard, index, features, backbone_vars, mesh, manager, repl)

    cache = (compute_feature_cache(cfg, index, features, backbone_vars, mesh)
             if cfg.cache_features and start < num_steps else None)
    train_step = jit_train_step(cfg, model, features, tx, mesh)
  guard.check()

  logger = metric_logging.MetricLogger(workdir)
  failed = True
  try:
    logger.hparams(cfg)
    state = _train_loop(run, logger, state, start, num_steps, spe, train_step, cache)
    # One Trained: the fusion constant, calibration and evaluation share its Predictor and pool.
    trained = inference.Trained.from_state(cfg, state, index, features, backbone_vars, mesh)
    if start < num_steps or math.isnan(trained.fusion_c):
      state = _add_fusion_constant(run, state, trained, num_steps)
    trained.calibration = _add_calibration(run, state, trained, num_steps, redo=start < num_steps)
    with guard.interruptible():  # the final state is saved: a restart only evaluates again
      log.info("final evaluation of step %d", num_steps)
      eval_dir = os.path.join(workdir, "eval", f"step_{num_steps}")
      result = after_training.evaluate(trained, eval_dir)
      logger.evaluation(num_steps, result, eval_dir)
      # The run is finished: the marker launch/sweep.py skips finished runs by.
      if jax.process_index() == 0:
        finished.mark_finished(workdir, num_steps, eval_dir)
    guard.check()
    log.info("process %d: final params digest %s", jax.process_index(), _digest(state.params))
    failed = False
  finally:
    try:
      logger.close()
    except OSError as e:
      if not failed:
        raise
      log.warning("closing the training log failed: %s", e)
    checkpoints.close(manager, after_error=failed)
  return state


def _resume(manager, state: TrainState, cfg, workdir: str, num_steps: int, repl,
            stored) -> TrainState:
  """The newest intact checkpoint of `workdir` or `state` if there is none.

  `stored` is the (step, config) already checked against `cfg`. A state trained further than
  it was (an extended run) drops its fusion constant, which belongs to the old final step.
  """
  restored = checkpoints.restore_latest(manager, state, move_damaged=jax.process_index() == 0)
  if restored is None:
    return state
  state, stored_cfg, step = restored
  if stored is None or step != stored[0]:  # fell back to an older one: check its config too
    run_control.check_resume(stored_cfg, cfg, workdir, step)
  if step > num_steps:
    raise run_control.ConfigMismatch(
        f"{workdir} holds a checkpoint at step {step}, beyond the {num_steps} steps this config "
        "asks for (total_steps / num_epochs): ask for more steps to extend the run, evaluate it "
        "with `onenip-eval --workdir`, or start a new run with another --workdir")
  log.info("resumed from step %d", step)
  if step < num_steps and not math.isnan(_scalar(state.fusion_c)):
    log.info("extending the finished run from step %d to %d", step, num_steps)
    state = jax.jit(lambda s: s.replace(fusion_c=jnp.full((), jnp.nan, jnp.float32)),
                    out_shardings=repl)(state)
  return state


@dataclasses.dataclass(frozen=True)
class _Run:
  """What the phases of `train_and_evaluate` share."""
  cfg: ml_collections.ConfigDict
  workdir: str
  guard: run_control.SignalGuard
  index: indexing.DatasetIndex
  features: FrozenFeatures
  backbone_vars: Any
  mesh: jax.sharding.Mesh
  manager: Any
  repl: jax.sharding.Sharding


def _train_loop(run: _Run, logger, state, start, num_steps, spe, train_step, cache) -> TrainState:
  """Steps start+1 .. num_steps; checkpoints every `ckpt.every_steps` and when a signal came."""
  if start >= num_steps:
    return state
  cfg, guard, index, manager = run.cfg, run.guard, run.index, run.manager
  eval_every = cfg.eval.every_epochs * spe
  batches = input_pipeline.make_train_iterator(index, cfg, process_index=jax.process_index(),
                                               process_count=jax.process_count(), start_step=start,
                                               decode_clean=cache is None)
  log.info("training steps %d to %d", start + 1, num_steps)
  progress = _progress(start, num_steps)
  lr = state_lib.lr_schedule(cfg, spe)   # logged: the rate of the update of step s is lr(s - 1)
  keys = (("synthetic", "mask", "normal_index", "prompt_index") if cache is not None
          else ("normal", "synthetic", "prompt", "mask"))
  t0, n0, done, saved, wait, in_flight = time.perf_counter(), start, start, start, 0.0, None
  try:
    for step in range(start + 1, num_steps + 1):
      # The device runs step - 1 while the host fetches and places this step's batch; `wait` is
      # the time the host spent on that, which stalls the device only where it exceeds the step.
      t_fetch = time.perf_counter()
      batch = sharding.to_global({k: v for k, v in next(batches).items() if k in keys}, run.mesh)
      wait += time.perf_counter() - t_fetch
      if in_flight is not None:   # at most two steps in flight: the loop never races ahead
        jax.block_until_ready(in_flight)
      state, metrics = train_step(state, batch, run.backbone_vars, cache)
      in_flight, done = metrics, step
      checkpoints.check_saves(manager)  # a failed background save stops the run here
      progress.update(1)
      if step % cfg.log_every_steps == 0 or step == num_steps:
        scalars = {k: _scalar(v) for k, v in metrics.items()}
        dt = time.perf_counter() - t0
        scalars.update(epoch=step / spe, images_per_s=(step - n0) * cfg.batch_size / dt,
                       data_wait_s=wait / (step - n0), lr=float(lr(step - 1)))
        t0, n0, wait = time.perf_counter(), step, 0.0
        logger.scalars(step, scalars)
        progress.set_postfix(loss=f"{scalars['total']:.4f}", img_s=f"{scalars['images_per_s']:.1f}",
                             wait=f"{scalars['data_wait_s']:.2f}s")
      stop = guard.agreed()  # the same answer on every process
      if (step % cfg.ckpt.every_steps == 0 and step < num_steps) or stop:
        checkpoints.save(manager, step, state, cfg, wait=stop)  # periodic saves run in the background
        saved = step
      if stop:
        log.warning("saved step %d", step)
        guard.check()
      if eval_every and step % eval_every == 0 and step < num_steps:
        with guard.interruptible():
          eval_dir = os.path.join(run.workdir, "eval", f"step_{step}")
          trained = inference.Trained.from_state(cfg, state, index, run.features,
                                                 run.backbone_vars, run.mesh)
          result = after_training.evaluate(trained, eval_dir)
          logger.evaluation(step, result, eval_dir)
        guard.check()
  except run_control.Interrupted:
    if saved < done:  # stopped during a periodic evaluation
      checkpoints.save(manager, done, state, cfg, wait=True)
      log.warning("saved step %d", done)
    raise
  finally:
    progress.close()
  return state


def _add_fusion_constant(run: _Run, state: TrainState, trained: inference.Trained,
                         num_steps: int) -> TrainState:
  """Computes the frozen fusion constant of `trained` (the final state's), saves the final state
  with it (step num_steps) and sets `trained.fusion_c` (float32, as stored).

  Stopped by a signal, the final state is saved without it; the restart computes it.
  """
  cfg, manager = run.cfg, run.manager
  try:
    with run.guard.interruptible():
      log.info("computing the frozen fusion constant of step %d", num_steps)
      c = after_training.frozen_fusion_constant(trained)
  except run_control.Interrupted:
    if manager.latest_step() != num_steps:
      checkpoints.save(manager, num_steps, state, cfg, wait=True)
      log.warning("saved step %d (without its fusion constant)", num_steps)
    raise
  state = jax.jit(lambda s: s.replace(fusion_c=jnp.float32(c)), out_shardings=run.repl)(state)
  trained.fusion_c = _scalar(state.fusion_c)
  log.info("frozen fusion constant c = %.5f", c)
  if manager.latest_step() == num_steps:  # saved without c by a signal in the previous run
    checkpoints.replace(manager, num_steps, state, cfg)
  else:
    checkpoints.save(manager, num_steps, state, cfg, wait=True)
  log.info("saved the final step %d", num_steps)
  run.guard.check()
  return state


def _add_calibration(run: _Run, state: TrainState, trained: inference.Trained, num_steps: int,
                     redo: bool) -> dict | None:
  """The calibration of `trained`, the final `state`'s (`onenip_jax.evaluation.holdout`), saved with
  step num_steps.

  Computed when the final step was trained by this process (`redo`: a new or extended run), when
  its checkpoint lacks it (a signal stopped the previous run during it) or when it was made by
  another `calibration.METHOD` or with other calibration settings (`holdout.out_of_date`:
  rerunning a finished run brings it up to date); else read back. None when calibration is off
  (`calibration.holdout_fraction=0`) or the model has no refiner.
  """
  cfg, manager = run.cfg, run.manager
  if not run.index.holdout or not cfg.model.refiner:
    return None
  stored = None if redo else checkpoints.restore_calibration(manager, num_steps)
  if stored is not None:
    why = holdout.out_of_date(stored, cfg)
    if why is None:
      return stored
    log.info("the calibration stored with step %d was %s: calibrating again", num_steps, why)
  with run.guard.interruptible():  # the final state is saved: a restart calibrates again
    log.info("calibrating the scoring of step %d on %d held-out normal images", num_steps,
             len(run.index.holdout))
    calibration = reports.json_safe(holdout.calibrate(trained))
  checkpoints.replace(manager, num_steps, state, cfg, calibration)
  log.info("saved the calibration with step %d", num_steps)
  run.guard.check()
  return calibration


def _max_over_processes(x: int) -> int:
  """The largest of `x` over all processes, on every process (a collective)."""
  if jax.process_count() == 1:
    return x
  return int(np.max(multihost_utils.process_allgather(np.int32(x))))


def _scalar(x: jax.Array) -> float:
  """A replicated scalar as a Python float (works when the array spans several processes)."""
  return float(np.asarray(x.addressable_data(0)))


def _digest(tree) -> str:
  """A short fingerprint of this process's copy of a replicated tree (to compare processes)."""
  leaves = [np.asarray(x.addressable_data(0), np.float64) for x in jax.tree.leaves(tree)]
  return f"{sum(float(np.abs(x).sum()) for x in leaves):.12e}/{sum(float(x.sum()) for x in leaves):.12e}"


def _progress(start: int, total: int):
  return tqdm(total=total, initial=start, unit="step", disable=jax.process_index() != 0,
              dynamic_ncols=True, mininterval=2.0)


def main(args) -> None:
  """`onenip-train` with its flags parsed by `onenip_jax.cli`: args.config (the loaded, locked
  ConfigDict) and args.workdir.

  Errors the user fixes (a changed config, unreadable checkpoints, a busy work directory, a full
  disk, bad data) raise `UserError`, which the CLI prints in one line (exit code 2).
  """
  try:
    train_and_evaluate(args.config, args.workdir)
  except OSError as e:
    if e.errno not in (errno.ENOSPC, errno.EDQUOT):
      raise
    raise UserError(f"no space left on device: {e.filename or args.workdir}") from e

