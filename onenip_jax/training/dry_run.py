"""`onenip-train ... --dry_run`: checks what a training would start from, in seconds, and exits.

It prints the resolved config, this process's devices (after `jax.distributed` starts, so on a pod
every host reports its own), the data's classes and image counts, the steps and batch sizes, and
then checks:
  * config: the value checks of `config.checks` and that the batch splits over the devices;
  * data: indexed and every image decoded, as training does (`indexing.index_config`, without the
    verified-images cache), and the texture folder;
  * weights: the backbone weights exist and load (the packaged Lite weights are converted into
    the cache on first use, as training would);
  * workdir: it can be created or written (a probe file or folder, removed at once), no live
    training holds its lock, and its newest checkpoint (if any) can be resumed with this config
    (`run_control.check_resume`, reading only).

Nothing is compiled or trained and nothing is written in the work directory; the built-in demo data
(`data.layout='demo'`) is generated into a temporary folder to be counted. Every problem found is
listed (`problem: CHECK: MESSAGE`) followed by one summary line, with exit code 2; 0 when all is
well.
"""
import math
import os
import sys
import tempfile
import uuid

import jax
import ml_collections

from data_pipelines import demo_data, indexing, storage, textures
from data_pipelines.errors import UserError
from onenip_jax import sharding
from onenip_jax.config import checks as checks_lib
from onenip_jax.models.features import FrozenFeatures
from onenip_jax.training import checkpoints, finished, run_control, state, workdir_lock

_PROBE = ".onenip-dry-run-"  # name prefix of the probe file / folder of the write check


class _Report:
  """The printed report (stdout) and the problems found, printed last (stderr)."""

  def __init__(self, prog: str):
    self.prog = prog
    self.problems = []  # (check, message)

  @staticmethod
  def say(text: str = "") -> None:
    print(text, flush=True)

  def problem(self, check: str, error) -> None:
    self.problems.append((check, str(error)))

  def finish(self) -> int:
    """Prints the problems and the summary; the exit code (0, or 2 with problems)."""
    if not self.problems:
      self.say("dry run: no problem found")
      return 0
    sys.stdout.flush()
    for check, message in self.problems:
      first, *rest = message.splitlines() or [""]
      print(f"problem: {check}: {first}", file=sys.stderr)
      for line in rest:
        print(f"  {line}", file=sys.stderr)
    checks = ", ".join(dict.fromkeys(c for c, _ in self.problems))
    print(f"{self.prog}: error: dry run found {len(self.problems)} problem(s) ({checks}); fix "
          "them before training", file=sys.stderr, flush=True)
    return 2


def main(args) -> int:
  """The dry run of `onenip-train` with its flags parsed by `onenip_jax.cli` (config loaded)."""
  rep = _Report("onenip-train")
  cfg, workdir = args.config, args.workdir
  rep.say(f"onenip-train dry run: nothing is compiled, trained or written to {workdir}")
  try:
    checks_lib.check_config(cfg)
    config_ok = True
  except UserError as e:
    rep.problem("config", e)
    config_ok = False
  if cfg.data.layout == "demo" and not cfg.data.root:  # as training sets it, so that a stored run's config compares equal
    cfg.data.root = storage.join(storage.abspath(workdir), "demo_data")
  rep.say("config (resolved, as --config.KEY=VALUE would set it):")
  for key, value in _flat(cfg):
    rep.say(f"  {key}={value!r}")

  sharding.maybe_initialize_distributed(cfg.distributed)
  mesh = _devices(rep, cfg, config_ok)
  index = _data(rep, cfg)
  num_steps = _steps(rep, cfg, index, mesh, config_ok)
  _weights(rep, cfg)
  found = len(rep.problems)
  exists = _workdir(rep, workdir)
  if len(rep.problems) > found:
    rep.say(f"workdir: {workdir}: see the problems below")
  if exists:
    _lock(rep, workdir)
    _existing_run(rep, cfg, workdir, num_steps)
  if jax.process_count() > 1:
    jax.distributed.shutdown()
  return rep.finish()


def _flat(cfg, prefix: str = ""):
  """(dotted key, value) of every leaf of `cfg`, in key order."""
  for key, value in sorted(cfg.items()):
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      yield from _flat(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def _devices(rep: _Report, cfg, config_ok: bool):
  devices = jax.devices()
  local = jax.local_devices()
  rep.say(f"process {jax.process_index()} of {jax.process_count()}: {len(local)} local of "
          f"{len(devices)} devices ({jax.default_backend()}, {devices[0].device_kind}): "
          + ", ".join(str(d) for d in local))
  mesh = sharding.make_mesh()
  if config_ok:
    try:
      sharding.check_batch_size(cfg.batch_size, mesh)
    except ValueError as e:
      rep.problem("config", e)
  return mesh


def _data(rep: _Report, cfg) -> indexing.DatasetIndex | None:
  """The index of the data, every image decoded (None with a problem); prints the counts."""
  try:
    if cfg.data.layout == "demo":
      with tempfile.TemporaryDirectory(prefix="onenip-dry-run-") as tmp:
        counted = ml_collections.ConfigDict(cfg.to_dict())
        counted.data.root = demo_data.make_demo_dataset(os.path.join(tmp, "demo_data"))
        index = indexing.index_config(counted)
      rep.say(f"data: demo, generated into {cfg.data.root} when training starts (counted on a "
              "temporary copy)")
    else:
      index = indexing.index_config(cfg)
      rep.say(f"data: layout {cfg.data.layout}, root {cfg.data.root or '-'}: every image decoded")
  except (UserError, OSError) as e:
    rep.say("data: see the problems below")
    rep.problem("data", e)
    return None
  rows = []
  for c in index.classes:
    test = [s for s in index.test if s.cls == c]
    rows.append((c, sum(s.cls == c for s in index.train), sum(s.cls == c for s in index.holdout),
                 sum(s.label == 0 for s in test), sum(s.label == 1 for s in test)))
  rows.append(("total", *(sum(r[i] for r in rows) for i in range(1, 5))))
  width = max(len(r[0]) for r in rows)
  rep.say(f"  {len(index.classes)} class(es); images: train, holdout, test normal, "
          "test anomalous")
  for name, *counts in rows:
    rep.say(f"  {name:<{width}}  " + "  ".join(f"{n:>6}" for n in counts))
  for gap in indexing.test_set_gaps(index.classes, index.test):
    rep.say(f"  note: {gap}")
  if cfg.data.textures:
    try:
      rep.say(f"  textures: {len(textures.texture_paths(cfg.data.textures))} images in "
              f"{cfg.data.textures}")
    except (UserError, OSError) as e:
      rep.problem("data", e)
  else:
    rep.say("  textures: the scikit-image photos")
  return index


def _steps(rep: _Report, cfg, index, mesh, config_ok: bool) -> int | None:
  """The run's total steps (None when the data or the config is at fault); prints the batches."""
  if index is None or not config_ok:
    rep.say("steps: unknown (see the problems below)")
    return None
  batch, processes, devices = cfg.batch_size, jax.process_count(), mesh.devices.size
  spe = math.ceil(len(index.train) / batch)
  num_steps = state.total_steps(cfg, spe)
  rep.say(f"steps: {num_steps} ({spe} per epoch, {num_steps / spe:.4g} epochs); global batch "
          f"{batch}: {batch / processes:g} per process, {batch / devices:g} per device "
          f"({processes} process(es), {devices} device(s))")
  return num_steps


def _weights(rep: _Report, cfg) -> None:
  b = cfg.backbone
  source = b.weights or "the packaged ImageNet weights"
  try:
    FrozenFeatures.from_config(b).load_variables(b)
    rep.say(f"weights: EfficientNet-{b.name} from {source}: loaded")
  except (UserError, OSError) as e:
    rep.say(f"weights: EfficientNet-{b.name} from {source}: see the problems below")
    rep.problem("weights", e)


def _workdir(rep: _Report, workdir: str) -> bool:
  """Checks that `workdir` can be written, or created, by making a probe file in it (or a probe
  folder in its nearest existing parent) and removing it at once; whether `workdir` exists."""
  if not storage.is_local(workdir):
    probe = storage.join(workdir, _PROBE + uuid.uuid4().hex)
    exists = storage.isdir(workdir)
    try:
      storage.atomic_write(probe, b"")
      storage.remove(probe)
    except Exception as e:  # pylint: disable=broad-except  # OSError or the file system's errors
      rep.problem("workdir", f"cannot write to the work directory {workdir}: {e}")
      return exists
    rep.say(f"workdir: {workdir} {'exists' if exists else 'will be created'}: writable")
    return exists
  path = os.path.abspath(workdir)
  if os.path.isdir(path):
    try:
      fd, probe = tempfile.mkstemp(prefix=_PROBE, dir=path)
      os.close(fd)
      os.remove(probe)
    except OSError as e:
      rep.problem("workdir", f"cannot write to the work directory {workdir}: {e.strerror or e}")
      return True
    rep.say(f"workdir: {workdir} exists: writable")
    return True
  if os.path.lexists(path):
    rep.problem("workdir", f"the work directory {workdir} exists and is not a folder")
    return False
  parent = os.path.dirname(path)
  while not os.path.lexists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    rep.problem("workdir", f"cannot create the work directory {workdir}: {parent} is not a folder")
    return False
  try:
    os.rmdir(tempfile.mkdtemp(prefix=_PROBE, dir=parent))
  except OSError as e:
    rep.problem("workdir", f"cannot create the work directory {workdir} in {parent}: "
                f"{e.strerror or e}")
    return False
  rep.say(f"workdir: {workdir} will be created (in {parent})")
  return False


def _lock(rep: _Report, workdir: str) -> None:
  lock = workdir_lock.WorkdirLock(workdir)
  holder = lock.read()
  if holder is None:
    return
  why = lock.stale_reason(holder)
  if why is None:
    rep.problem("workdir", f"work directory {workdir} is in use by another training: "
                f"{workdir_lock.describe(holder)}; lock file {lock.path}")
  else:
    rep.say(f"  a stale lock of {workdir_lock.describe(holder)} ({why}) will be taken over")


def _existing_run(rep: _Report, cfg, workdir: str, num_steps: int | None) -> None:
  try:
    found = checkpoints.stored_config(workdir)
  except (UserError, OSError) as e:
    rep.problem("existing run", e)
    return
  if found is None:
    rep.say("  no checkpoint: a new run")
    return
  step, stored = found
  try:
    run_control.check_resume(stored, cfg, workdir, step)
  except run_control.ConfigMismatch as e:
    rep.problem("existing run", e)
    return
  changed = list(run_control.config_differences(stored, cfg))
  rep.say(f"  checkpoint step {step}: resumes with this config"
          + (f" (changed: {', '.join(changed)})" if changed else ""))
  if num_steps is None:
    return
  if step > num_steps:
    rep.problem("existing run", f"{workdir} holds a checkpoint at step {step}, beyond the "
                f"{num_steps} steps this config asks for (total_steps / num_epochs)")
  elif step == num_steps and finished.finished(workdir):
    rep.say(f"  the run finished at step {step}: training again only evaluates it again")
