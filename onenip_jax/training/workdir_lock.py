"""One training per work directory: the lock file `<workdir>/train.lock`.

The lock is a small JSON file naming its holder (host, pid, start time, command) with a random
token and a heartbeat time, refreshed every `HEARTBEAT_S` by a daemon thread. Over several
processes of one run (`jax.distributed`) only process 0 takes it; the others trust it
(`train._lock_workdir` shares process 0's answer). A second training on a busy work directory
fails at once with `WorkdirBusy` naming the holder. A stale lock is taken over with a warning:
one of a process of this host that is gone, or one whose heartbeat is older than `STALE_AFTER_S`
(another host's process cannot be probed). The lock is released when the run ends, also when a
signal stops it (`train.train_and_evaluate`); a run killed outright leaves a stale lock.

Creating the lock. Locally it is atomic: the file is written under a temporary name and
hard-linked to `train.lock`, which fails if that exists (`O_CREAT | O_EXCL` where the file system
has no hard links). Other schemes (`gs://`, `ram://`, through `data_pipelines.storage`) have no
create-if-absent: `tf.io.gfile` / `etils.epath` offer no generation precondition. There the lock
is written only if absent, read back after `SETTLE_S`, and held only if it still holds this
process's token; two trainings starting within that window may both see their own token, which
is the remaining race. Taking over a stale lock replaces it the same way, on every scheme.
"""
import datetime
import json
import logging
import os
import socket
import sys
import tempfile
import threading
import time
import uuid

from data_pipelines import storage
from data_pipelines.errors import UserError

log = logging.getLogger("onenip")

LOCK_FILE = "train.lock"
HEARTBEAT_S = 60.0        # the holder rewrites its heartbeat this often
STALE_AFTER_S = 600.0     # a lock without a heartbeat for this long is stale (other hosts)
SETTLE_S = 1.0            # wait before reading back a lock written without an atomic create


class WorkdirBusy(UserError):
  """Another training holds the work directory (the message names it)."""


def describe(holder: dict) -> str:
  """'process 123 on host h (started 2026-01-01 12:00:00 UTC)'."""
  started = holder.get("started_unix")
  when = (datetime.datetime.fromtimestamp(started, datetime.timezone.utc)
          .strftime("%Y-%m-%d %H:%M:%S UTC") if isinstance(started, (int, float)) else "?")
  return f"process {holder.get('pid', '?')} on host {holder.get('host', '?')} (started {when})"


def _pid_alive(pid) -> bool:
  if not isinstance(pid, int) or pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process
    return True
  return True


class WorkdirLock:
  """The lock of `workdir`; `acquire()` it, `release()` it (idempotent), or use `with`."""

  def __init__(self, workdir: str, *, heartbeat_s: float = HEARTBEAT_S,
               stale_after_s: float = STALE_AFTER_S, settle_s: float = SETTLE_S):
    self.workdir = workdir
    self.path = storage.join(workdir, LOCK_FILE)
    self.heartbeat_s, self.stale_after_s, self.settle_s = heartbeat_s, stale_after_s, settle_s
    self.token = uuid.uuid4().hex
    self._held = False
    self._stop = threading.Event()
    self._thread = None
    now = time.time()
    self._record = {"host": socket.gethostname(), "pid": os.getpid(), "started_unix": now,
                    "heartbeat_unix": now, "token": self.token,
                    "command": " ".join(sys.argv)[:500]}

  def __enter__(self) -> "WorkdirLock":
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()

  @property
  def held(self) -> bool:
    return self._held

  def read(self) -> dict | None:
    """The lock's record, None if there is none; {} if it cannot be parsed."""
    try:
      text = storage.read_text(self.path)
    except Exception:  # pylint: disable=broad-except  # OSError, tf.errors.NotFoundError on URLs
      return {} if storage.exists(self.path) else None
    try:
      record = json.loads(text)
    except ValueError:
      return {}
    return record if isinstance(record, dict) else {}

  def stale_reason(self, holder: dict) -> str | None:
    """Why `holder`'s lock is stale, or None if its process may still run."""
    if not holder:
      return "the lock file cannot be read"
    if holder.get("host") == socket.gethostname():
      if not _pid_alive(holder.get("pid")):
        return f"process {holder.get('pid')} is gone"
      return None
    beat = holder.get("heartbeat_unix")
    age = time.time() - beat if isinstance(beat, (int, float)) else float("inf")
    if age > self.stale_after_s:
      return f"no heartbeat for {age:.0f} s"
    return None

  def acquire(self) -> None:
    """Takes the lock; takes over a stale one with a warning.

    Raises:
      WorkdirBusy naming the holder when another live training holds it.
    """
    if self._held:
      return
    storage.makedirs(self.workdir)
    for _ in range(5):
      if self._create():
        break
      holder = self.read()
      if holder is None:  # released meanwhile: try again
        continue
      if holder.get("token") == self.token:
        break
      why = self.stale_reason(holder)
      if why is None:
        raise WorkdirBusy(
            f"work directory {self.workdir} is in use by another training: {describe(holder)}; "
            f"lock file {self.path}. Wait for it to end, or use another --workdir")
      log.warning("taking over the stale lock %s of %s: %s", self.path, describe(holder), why)
      if self._write_and_confirm(replace=True):
        break
    else:
      raise WorkdirBusy(f"work directory {self.workdir}: cannot take the lock {self.path} "
                        "(other trainings keep taking it)")
    self._held = True
    self._stop.clear()
    self._thread = threading.Thread(target=self._heartbeat, name="onenip-workdir-lock",
                                    daemon=True)
    self._thread.start()

  def _create(self) -> bool:
    """Writes the lock if there is none; True if this process holds it then."""
    if not storage.is_local(self.path):
      return not storage.exists(self.path) and self._write_and_confirm(replace=False)
    data = json.dumps(self._record).encode("utf-8")
    folder = os.path.dirname(self.path) or "."
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{LOCK_FILE}.", suffix=".tmp")
    try:
      with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
      try:
        os.link(tmp, self.path)
        return True
      except FileExistsError:
        return False
      except OSError:  # no hard links on this file system
        try:
          fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
          return False
        with os.fdopen(fd, "wb") as f:
          f.write(data)
        return True
    finally:
      os.remove(tmp)

  def _write_and_confirm(self, replace: bool) -> bool:
    """Writes the lock (over a stale one if `replace`), then reads it back after `settle_s`."""
    if not replace and storage.exists(self.path):
      return False
    storage.atomic_write(self.path, json.dumps(self._record))
    time.sleep(self.settle_s)
    holder = self.read()
    return bool(holder) and holder.get("token") == self.token

  def _heartbeat(self) -> None:
    warned = False
    while not self._stop.wait(self.heartbeat_s):
      try:
        holder = self.read()
        if not holder or holder.get("token") != self.token:
          log.warning("the lock %s was taken over by %s; this training no longer holds it",
                      self.path, describe(holder or {}))
          return
        self._record["heartbeat_unix"] = time.time()
        storage.atomic_write(self.path, json.dumps(self._record))
      except Exception as e:  # pylint: disable=broad-except  # e.g. a full disk: retried
        if not warned:
          log.warning("cannot refresh the lock %s: %s", self.path, e)
          warned = True

  def release(self) -> None:
    """Removes the lock if this process still holds it (no error if it is gone)."""
    if not self._held:
      return
    self._held = False
    self._stop.set()
    if self._thread is not None and self._thread is not threading.current_thread():
      self._thread.join(timeout=10)
    try:
      holder = self.read()
      if holder and holder.get("token") == self.token:
        storage.remove(self.path)
    except Exception as e:  # pylint: disable=broad-except
      log.warning("cannot remove the lock %s: %s", self.path, e)
