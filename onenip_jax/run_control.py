"""Keeping a training run safe: signals (SIGTERM / SIGINT) and the config check at resume.

Signals. `SignalGuard` turns the first SIGTERM or SIGINT into a request to stop: the training loop
checks `guard.requested` after each step, saves and raises `Interrupted`; phases whose work can be
dropped and redone (start-up, feature cache, fusion constant, evaluation) run inside
`guard.interruptible()`, where the signal raises `Interrupted` at once. The caller saves what is
not saved yet and exits with 128 + signum (`exit_now`). A second SIGINT aborts at once.

Config check. A resumed run must train the same model on the same data stream: `check_resume`
compares the config stored with the checkpoint with the new one, key by key. Differences in
`HARMLESS_KEYS` (run length, logging, evaluation, checkpointing) are logged; any other difference
raises `ConfigMismatch` listing the keys.
"""
import contextlib
import json
import logging
import os
import signal
import sys
import threading
from typing import Any

import ml_collections

log = logging.getLogger("onenip")

# Keys (or key prefixes ending in ".") that may change when a run is resumed or extended.
HARMLESS_KEYS = ("total_steps", "num_epochs", "log_every_steps", "distributed", "cache_features",
                 "eval.", "ckpt.", "data.num_parallel_calls", "data.skip_bad",
                 "calibration.synthetic_per_image", "calibration.seed_offset", "calibration.weights",
                 "calibration.pool_sizes")


class Interrupted(BaseException):
  """Raised when a SIGTERM / SIGINT stops the run (a BaseException, like KeyboardInterrupt, so
  that no `except Exception` on the way swallows it)."""

  def __init__(self, signum: int):
    super().__init__(f"interrupted by {signal.Signals(signum).name}")
    self.signum = signum


class ConfigMismatch(ValueError):
  """The new config differs from the stored one in keys that shape the model or the data."""


class SignalGuard:
  """Context manager catching SIGTERM and SIGINT for the duration of a run (main thread only).

  Attributes:
    signum: the first signal received, None until then.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signum = None
    self._raise_at_once = False
    self._previous = {}

  def __enter__(self) -> "SignalGuard":
    if threading.current_thread() is not threading.main_thread():
      return self  # Python delivers signals to the main thread only: nothing to catch here
    for s in self.SIGNALS:
      self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous = {}

  @property
  def requested(self) -> bool:
    return self.signum is not None

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

  def check(self) -> None:
    """Raises `Interrupted` if a signal was received."""
    if self.signum is not None:
      raise Interrupted(self.signum)

  @contextlib.contextmanager
  def interruptible(self):
    """A phase that a signal stops at once (its work is redone by the restarted run)."""
    self.check()
    self._raise_at_once = True
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
