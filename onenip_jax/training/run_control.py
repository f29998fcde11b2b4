"""Keeping a training run safe: signals (SIGTERM / SIGINT) and the config check at resume.

Signals. `SignalGuard` turns the first SIGTERM or SIGINT into a request to stop: the training loop
checks `guard.agreed()` after each step, saves and raises `Interrupted`; phases whose work can be
dropped and redone (start-up, feature cache, fusion constant, evaluation) run inside
`guard.interruptible()`, where the signal raises `Interrupted` at once. The caller saves what is
not saved yet and exits with 128 + signum (`exit_now`). A second SIGINT aborts at once.

Several processes (`make_collective`). A signal may reach only one of them, and one process that
stops alone leaves the others waiting in its collectives. So the decision is collective: every
`agreed()` / `check()` is a reduction over all processes (each calls it at the same point of the
program), an interruptible phase runs to its end, and all processes stop at the same point, save
the same step and exit with the same code.

Config check. A resumed run must train the same model on the same data stream: `check_resume`
compares the config stored with the checkpoint with the new one, key by key. Differences in
`HARMLESS_KEYS` (run length, logging, evaluation, checkpointing, compute precision and
attention implementation: the parameters stay float32) are logged; any other difference
raises `ConfigMismatch` listing the keys.
"""
import contextlib
import json
import logging
import os
import signal
import sys
import threading
from typing import Any, Callable

import ml_collections

from data_pipelines.errors import UserError

log = logging.getLogger("onenip")

# Keys (or key prefixes ending in ".") that may change when a run is resumed or extended.
HARMLESS_KEYS = ("total_steps", "num_epochs", "log_every_steps", "distributed", "cache_features",
                 "eval.", "ckpt.", "data.num_parallel_calls", "data.skip_bad",
                 "data.max_pixels",
                 "calibration.synthetic_per_image", "calibration.seed_offset", "calibration.weights",
                 "calibration.pool_sizes", "model.dtype", "model.matmul_dtype", "model.attention",
                 "backbone.dtype")


class Interrupted(BaseException):
  """Raised when a SIGTERM / SIGINT stops the run (a BaseException, like KeyboardInterrupt, so
  that no `except Exception` on the way swallows it)."""

  def __init__(self, signum: int):
    super().__init__(f"interrupted by {signal.Signals(signum).name}")
    self.signum = signum


class ConfigMismatch(UserError):
  """The new config differs from the stored one in keys that shape the model or the data."""


class SignalGuard:
  """Context manager catching SIGTERM and SIGINT for the duration of a run (main thread only).

  Attributes:
    signum: the first signal this process received, None until then.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signum = None
    self._agreed = None        # the signal the processes agreed to stop for (collective runs)
    self._max_over_processes = None
    self._raise_at_once = False
    self._previous = {}

  def __enter__(self) -> "SignalGuard":
    self._install()
    return self

  def __exit__(self, *exc) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous = {}

  def _install(self) -> None:
    if threading.current_thread() is not threading.main_thread():
      return  # Python delivers signals to the main thread only: nothing to catch here
    for s in self.SIGNALS:
      previous = signal.signal(s, self._handle)
      self._previous.setdefault(s, previous)

  def make_collective(self, max_over_processes: Callable[[int], int]) -> None:
    """Makes every later decision to stop collective (a run over several processes).

    Args:
      max_over_processes: int -> the largest of that int over all processes (a collective).

    Also installs the handlers again: `jax.distributed.initialize` replaces the one of SIGTERM
    by its own preemption notifier, which Python never hears of.
    """
    self._max_over_processes = max_over_processes
    self._install()

  @property
  def collective(self) -> bool:
    return self._max_over_processes is not None

  @property
  def requested(self) -> bool:
    """A signal reached this process."""
    return self.signum is not None

  def agreed(self) -> bool:
    """True when a signal reached this process or, in a collective run, any process.

    A collective call in a collective run: every process must make it at the same point.
    """
    if self._agreed is None:
      signum = (self._max_over_processes(self.signum or 0) if self.collective
                else self.signum or 0)
      self._agreed = signum or None
    return self._agreed is not None

  def check(self) -> None:
    """Raises `Interrupted` if `agreed()` (a collective call in a collective run)."""
    if self.agreed():
      raise Interrupted(self._agreed)

  def _handle(self, signum, frame) -> None:
    del frame
    name = signal.Signals(signum).name
    if self.signum is not None:
      if signum == signal.SIGINT:
        log.warning("second %s: aborting at once, without saving", name)
        exit_now(128 + signum)
      log.warning("%s again: already stopping", name)
      return
    self.signum = signum
    log.warning("received %s: stopping after saving what is done (Ctrl-C again aborts at once)",
                name)
    if self._raise_at_once:
      raise Interrupted(signum)

  @contextlib.contextmanager
  def interruptible(self):
    """A phase whose work the restarted run redoes (`check()` first).

    On one process a signal stops it at once. In a collective run it runs to its end, since a
    process that stopped alone would leave the others in its collectives: call `check()` after
    it to stop there together.
    """
    self.check()
    self._raise_at_once = not self.collective
    try:
      yield
    finally:
      self._raise_at_once = False


def exit_now(code: int) -> None:
  """Flushes the logs and standard streams, then ends the process without the interpreter's
  teardown (tf.data iterators and the JAX runtime can take tens of seconds to shut down)."""
  logging.shutdown()
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except (OSError, ValueError):
      pass
  os._exit(code)  # pylint: disable=protected-access


def _flatten(tree: Any, prefix: str = "") -> dict:
  """Nested dicts -> {'a.b.c': leaf}."""
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: tree}


def config_differences(stored: dict, cfg: ml_collections.ConfigDict) -> dict:
  """{dotted key: (stored value, new value)} for every key that differs (absent: '<absent>')."""
  a = _flatten(stored)
  b = _flatten(json.loads(cfg.to_json_best_effort()))
  return {k: (a.get(k, "<absent>"), b.get(k, "<absent>")) for k in sorted(set(a) | set(b))
          if a.get(k, "<absent>") != b.get(k, "<absent>")}


def is_harmless(key: str) -> bool:
  return any(key == h or (h.endswith(".") and key.startswith(h)) for h in HARMLESS_KEYS)


def check_resume(stored: dict, cfg: ml_collections.ConfigDict, workdir: str, step: int) -> None:
  """Logs the harmless differences of `cfg` from the `stored` config of step `step`.

  Raises:
    ConfigMismatch listing every other differing key and how to start a new run.
  """
  diff = config_differences(stored, cfg)
  bad = {k: v for k, v in diff.items() if not is_harmless(k)}
  if bad:
    lines = "\n".join(f"  {k}: {old!r} (stored) -> {new!r} (now)" for k, (old, new) in bad.items())
    raise ConfigMismatch(
        f"cannot resume {workdir} from step {step}: the config differs from the one stored with "
        f"the checkpoint in {len(bad)} key(s) that shape the model or the data stream:\n{lines}\n"
        "Start a new run with another --workdir, or set these keys back to continue this one.")
  if diff:
    log.info("resuming step %d with changed settings: %s", step,
             ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in diff.items()))
