"""Orbax checkpoints of the train state (params, batch stats, optimiser state, step, RNG) + config.

Saves are atomic (Orbax writes to a temporary directory and renames), so a run killed at any time
restarts from the last complete checkpoint. They are asynchronous: `save` returns once the state
is copied off the devices and Orbax writes it in a background thread; `save(..., wait=True)`,
`replace` and the manager's `close()` wait until it is on storage. A checkpoint that cannot be read is reported in one
line naming its step and file, and the newest intact one is used instead (`restore_latest`).

A save that fails (a full disk, a refused write) raises `CheckpointSaveError`, one line naming the
step's folder and the cause: at once for a save that waits, else from `check_saves`, which the
training loop calls after every step, or at the latest from the next save, which waits for the
previous one. The failed step leaves only Orbax's temporary folder: the older steps stay intact
and a rerun resumes from the newest of them.

Storage: Orbax (TensorStore for the arrays, `etils.epath` for the folders) writes local and
`gs://` work directories itself. It cannot write other schemes: `epath` raises KeyError for
TensorFlow's `ram://` and TensorStore has no driver for it. For such a work directory the manager
is a `_StagedManager`: Orbax works on a local temporary copy of `<workdir>/checkpoints`, filled
from the work directory when the manager is made; each finished step is copied there through
`data_pipelines.storage` whenever the manager waits for its saves (Orbax's `save` does so before
each save, `checkpoints.save` after it, `close` at the end) or reloads, and steps Orbax deleted are
deleted there. A copied step gets the marker file `UPLOADED` last; a step without it (a copy cut
short) is not restored and is removed at the next copy. Staging supports one process only: with
several, each would hold a different part of the arrays.
"""
import errno
import json
import logging
import os
import re
import shutil
import tempfile

import jax
import ml_collections
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from data_pipelines import storage
from data_pipelines.errors import UserError, UserFileNotFoundError
from onenip_jax.config import loading

log = logging.getLogger("onenip")

_REPLACED = ".replaced"   # `<step>.replaced`: a step being rewritten by `replace` (see there)
DAMAGED = ".damaged"      # `<step>.damaged`: a step moved aside by `restore_latest`


ORBAX_SCHEMES = ("", "gs")   # schemes Orbax writes itself ('' = local); others are staged
UPLOADED = "UPLOADED"        # marker file, written last into a step copied by `_StagedManager`
_STEP = re.compile(r"^\d+$")


class CheckpointError(UserError):
  """No checkpoint of a work directory can be read (the message names each step and file)."""


class CheckpointSaveError(UserError):
  """A checkpoint could not be written (the message names the step's folder and the cause)."""


class _StagedManager(ocp.CheckpointManager):
  """An Orbax manager on a local copy of `remote` (a folder of a scheme Orbax lacks; module doc)."""

  def __init__(self, remote: str, options: ocp.CheckpointManagerOptions):
    if jax.process_count() > 1:
      raise UserError(f"{remote}: checkpoints on {storage.scheme(remote)}:// need a single "
                      f"process (they are staged locally); use a local or gs:// workdir")
    self._remote, self._read_only = remote, options.read_only
    self._stage = tempfile.mkdtemp(prefix="onenip-ckpt-")
    self._copied = {}   # step folder name -> (inode, mtime) of the local folder last copied
    if storage.isdir(remote):
      for name in storage.listdir(remote):
        src = storage.join(remote, name)
        if _STEP.match(name) and storage.exists(storage.join(src, UPLOADED)):
          storage.copytree(src, os.path.join(self._stage, name))
          os.remove(os.path.join(self._stage, name, UPLOADED))
          self._copied[name] = self._stamp(name)
    _recover_replaced(self._stage)
    super().__init__(self._stage, options=options)

  def _stamp(self, name: str) -> tuple:
    st = os.stat(os.path.join(self._stage, name))
    return st.st_ino, st.st_mtime_ns

  def _mirror(self) -> None:
    """Copies the finished local steps not yet copied, deletes the remote ones gone locally."""
    if self._read_only:
      return
    local = {n for n in os.listdir(self._stage) if _STEP.match(n) or n.endswith(DAMAGED)}
    storage.makedirs(self._remote)
    for name in sorted(local):
      if self._copied.get(name) != self._stamp(name):
        dst = storage.join(self._remote, name)
        storage.rmtree(dst)
        storage.copytree(os.path.join(self._stage, name), dst)
        storage.atomic_write(storage.join(dst, UPLOADED), "")
        self._copied[name] = self._stamp(name)
    for name in storage.listdir(self._remote):
      if _STEP.match(name) and name not in local:
        storage.rmtree(storage.join(self._remote, name))
        self._copied.pop(name, None)

  def wait_until_finished(self):
    super().wait_until_finished()
    self._mirror()

  def reload(self):
    super().reload()
    self._mirror()

  def close(self):
    super().close()   # waits for the saves
    self._mirror()
    shutil.rmtree(self._stage, ignore_errors=True)


def _manager(workdir: str, options: ocp.CheckpointManagerOptions) -> ocp.CheckpointManager:
  directory = storage.join(workdir, "checkpoints")
  if storage.scheme(directory) in ORBAX_SCHEMES:
    _recover_replaced(directory)
    return ocp.CheckpointManager(directory, options=options)
  return _StagedManager(directory, options)


def make_manager(workdir: str, cfg: ml_collections.ConfigDict) -> ocp.CheckpointManager:
  """`<workdir>/checkpoints`, keeping the last `ckpt.keep`; saves are asynchronous (see `save`)."""
  options = ocp.CheckpointManagerOptions(max_to_keep=cfg.ckpt.keep, create=True,
                                         enable_async_checkpointing=True)
  return _manager(workdir, options)


def save(manager: ocp.CheckpointManager, step: int, state, cfg: ml_collections.ConfigDict,
         calibration: dict | None = None, *, wait: bool = True) -> None:
  """Saves `state`, `cfg` (and the JSON-able `calibration` of the final step) as `step`; with
  `wait=False` returns while Orbax writes them.

  The device arrays are copied to the host before it returns, so `state` may be donated to the
  next step at once. A save first waits for the previous one to finish.
  """
  items = {"state": ocp.args.StandardSave(state),
           "config": ocp.args.JsonSave(json.loads(cfg.to_json_best_effort()))}
  if calibration is not None:
    items["calibration"] = ocp.args.JsonSave(calibration)
  try:
    manager.save(step, args=ocp.args.Composite(**items), force=True)
    if wait:
      manager.wait_until_finished()
  except Exception as e:  # Orbax / TensorStore / OS errors of many types
    raise save_error(manager, step, e) from e


def check_saves(manager: ocp.CheckpointManager) -> None:
  """Raises `CheckpointSaveError` if a background save has failed (does not wait for one)."""
  try:
    manager.check_for_errors()
  except Exception as e:  # pylint: disable=broad-except
    raise save_error(manager, None, e) from e


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def is_no_space(error: BaseException) -> bool:
  """True when `error` or one of its causes is a full disk or quota (also TensorStore's text)."""
  e, seen = error, 0
  while e is not None and seen < 10:
    if isinstance(e, OSError) and e.errno in _NO_SPACE:
      return True
    text = str(e)
    if ("No space left on device" in text or "Disk quota exceeded" in text
        or any(f"os_error_code='{n}'" in text for n in _NO_SPACE)):
      return True
    e, seen = e.__cause__ or e.__context__, seen + 1
  return False


def save_error(manager: ocp.CheckpointManager, step: int | None,
               error: BaseException) -> CheckpointSaveError:
  """One line naming the step's folder and the cause of a failed save, and the newest step left.

  The step is read from the error's paths where they name one (a save first waits for the
  previous one, whose error it raises), else it is `step`.
  """
  if isinstance(error, CheckpointSaveError):
    return error
  directory = str(manager.directory)
  messages, e = [], error
  while e is not None and len(messages) < 10:
    messages.append(str(e))
    e = e.__cause__ or e.__context__
  found = re.search(re.escape(directory.rstrip("/")) + r"/(\d+)", "\n".join(messages))
  step = int(found.group(1)) if found else step
  path = storage.join(directory, str(step)) if step is not None else directory
  intact = sorted(int(n) for n in (storage.listdir(directory) if storage.isdir(directory) else ())
                  if _STEP.match(n) and int(n) != step)
  left = (f"; the newest intact checkpoint is step {intact[-1]}, a rerun resumes from it"
          if intact else "")
  if is_no_space(error):
    return CheckpointSaveError(f"no space left on device: {path} (checkpoint step {step} not "
                               f"saved{left})")
  reason = next((m.strip().splitlines()[0] for m in reversed(messages) if m.strip()),
                type(error).__name__)
  return CheckpointSaveError(f"cannot save checkpoint step {step} to {path}: {reason[:300]}{left}")


def close(manager: ocp.CheckpointManager, *, after_error: bool = False) -> None:
  """Closes `manager` (waiting for its saves). After another error (`after_error`), a failure
  here is logged in one line, not raised, so that the first error is the one reported."""
  try:
    manager.close()
  except Exception as e:  # pylint: disable=broad-except
    error = save_error(manager, None, e)
    if not after_error:
      raise error from e
    log.warning("%s", error)


def restore_calibration(manager: ocp.CheckpointManager, step: int) -> dict | None:
  """The calibration stored with `step` (see `onenip_jax.evaluation.calibration`), None if it has
  none."""
  if not storage.isdir(storage.join(str(manager.directory), str(step), "calibration")):
    return None
  restored = manager.restore(step, args=ocp.args.Composite(calibration=ocp.args.JsonRestore()))
  return dict(restored.calibration)


def read_calibration(workdir: str, step: int) -> dict | None:
  """`restore_calibration` of `<workdir>/checkpoints` (read-only), e.g. for `onenip-eval`."""
  options = ocp.CheckpointManagerOptions(read_only=True, create=False)
  manager = _manager(workdir, options)
  try:
    return restore_calibration(manager, step)
  finally:
    manager.close()


def replace(manager: ocp.CheckpointManager, step: int, state, cfg: ml_collections.ConfigDict,
            calibration: dict | None = None) -> None:
  """Saves `state` as `step` when that step exists already (e.g. adding the fusion constant).

  The old step is renamed `<step>.replaced` first and deleted only after the new one is
  complete; a run killed in between gets the old one back from `make_manager`.
  """
  manager.wait_until_finished()  # no background save may still write into the directory
  path = storage.join(str(manager.directory), str(step))
  if jax.process_index() == 0 and storage.isdir(path):   # one process renames (shared storage)
    storage.move_dir(path, path + _REPLACED)
  _sync_processes("onenip_replace_moved")                 # ... and every process then sees it
  manager.reload()
  save(manager, step, state, cfg, calibration, wait=True)
  _sync_processes("onenip_replace_saved")
  if jax.process_index() == 0:
    storage.rmtree(path + _REPLACED)


def _sync_processes(name: str) -> None:
  """A barrier over all processes (nothing with one)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _recover_replaced(directory: str) -> None:
  """Finishes or undoes a `replace` that was killed half-way."""
  if not storage.isdir(directory):
    return
  for name in storage.listdir(directory):
    if name.endswith(_REPLACED) and name[:-len(_REPLACED)].isdigit():
      old, new = storage.join(directory, name), storage.join(directory, name[:-len(_REPLACED)])
      if storage.isdir(new):
        storage.rmtree(old)
      else:
        storage.move_dir(old, new)


def restore(manager: ocp.CheckpointManager, template, step: int | None = None):
  """Restores the state at `step` (default: latest) into the structure/shardings of `template`."""
  step = manager.latest_step() if step is None else step
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(template)))
  return restored.state


def restore_latest(manager: ocp.CheckpointManager, template, *, move_damaged: bool = False):
  """(state, stored config dict, step) of the newest checkpoint that reads back, or None if none.

  A damaged checkpoint is logged in one line (step and file) and the next older one is tried.
  With `move_damaged`, the damaged steps newer than the one restored are renamed
  `<step>.damaged` (kept for inspection), so that later saves and resumes skip them.

  Raises:
    CheckpointError when checkpoints exist but none can be read (nothing is moved then: a
    template that matches no checkpoint is more likely a changed model than damage).
  """
  failures, damaged = [], []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      restored = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(template), config=ocp.args.JsonRestore()))
    except Exception as e:  # Orbax / TensorStore / JSON errors of many types
      failures.append(describe_damage(manager, step, e))
      damaged.append(step)
      log.warning("%s; trying the previous checkpoint", failures[-1])
      continue
    if damaged:
      log.warning("resuming from step %d, the newest intact checkpoint", step)
      if move_damaged:
        for d in damaged:
          path = storage.join(str(manager.directory), str(d))
          storage.move_dir(path, path + DAMAGED)
          log.warning("moved the damaged checkpoint aside to %s", path + DAMAGED)
        manager.reload()
    return restored.state, loading.upgrade_stored_config(dict(restored.config)), step
  if failures:
    raise CheckpointError("no checkpoint can be read: " + "; ".join(failures))
  return None


def latest_config(manager: ocp.CheckpointManager):
  """(step, config dict) stored with the newest checkpoint whose config reads back, or None."""
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      restored = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
      return step, loading.upgrade_stored_config(dict(restored.config))
    except Exception as e:  # pylint: disable=broad-except
      log.warning("%s; trying the previous checkpoint", describe_damage(manager, step, e))
  return None


def describe_damage(manager: ocp.CheckpointManager, step: int, error: BaseException) -> str:
  """One line naming the step, the file and the reason of a failed restore (no TensorStore dump)."""
  step_dir = storage.join(str(manager.directory), str(step))
  messages = []
  e = error
  while e is not None and len(messages) < 10:
    messages.append(str(e))
    e = e.__cause__ or e.__context__
  text = "\n".join(messages)
  file = re.search(r'(?:local file|path|file)\W+(' + re.escape(step_dir) + r'[^"\'\s,)]*)', text)
  file = file.group(1) if file else step_dir
  item = re.search(r'Error reading "([^"]+)"', text)
  reason = next((m.strip().splitlines()[0] for m in reversed(messages) if m.strip()),
                type(error).__name__)
  reason = re.sub(r"\s+See full TensorStore details.*", "", reason)
  reason = re.sub(r'Error reading "[^"]*" in OCDBT database at local file "[^"]*":\s*', "",
                  reason)[:200]
  return (f"checkpoint step {step} is damaged: cannot read {file}"
          + (f" (array {item.group(1)})" if item else "") + f": {reason}")


def restore_config(workdir: str, step: int | None = None) -> ml_collections.ConfigDict:
  """The config stored with a checkpoint, e.g. for `onenip-eval --workdir`."""
  options = ocp.CheckpointManagerOptions(read_only=True, create=False)
  with _manager(workdir, options) as manager:
    if step is None:  # the newest config that reads back
      found = latest_config(manager)
      if found is None:
        raise UserFileNotFoundError(f"no readable checkpoint under {workdir}/checkpoints")
      return ml_collections.ConfigDict(found[1])
    restored = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
  return ml_collections.ConfigDict(loading.upgrade_stored_config(dict(restored.config)))


def stored_config(workdir: str):
  """(step, config dict) of `<workdir>/checkpoints`' newest readable config, None if it has none.

  Read-only: nothing in `workdir` is created, moved or written (a step half-way through `replace`
  is not recovered, so its older copy is not seen).
  """
  directory = storage.join(workdir, "checkpoints")
  if not storage.isdir(directory):
    return None
  options = ocp.CheckpointManagerOptions(read_only=True, create=False)
  if storage.scheme(directory) in ORBAX_SCHEMES:
    manager = ocp.CheckpointManager(directory, options=options)
  else:
    manager = _StagedManager(directory, options)
  with manager:
    return latest_config(manager)
