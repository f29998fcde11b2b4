"""Collective preemption: a signal that reaches one process stops every process at the
same point. Two CPU processes through launch/local_multiprocess.py on ../shared/data (bottle,
64 px, Lite0), and the collective rules of run_control.SignalGuard with a fake reduction."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, train_losses as _losses
from onenip_jax.training import run_control

STEPS = 5
ARGS = [f"--config=configs/real.py:steps={STEPS},backbone=lite0", "--config.input_size=64",
        "--config.data.classes=('bottle',)", "--config.log_every_steps=1",
        "--config.ckpt.every_steps=100", "--config.eval.fusion_max_images=16",
        "--config.eval.heatmaps=False", "--config.eval.batch_size=32",
        "--config.calibration.holdout_fraction=0.0"]  # no calibration phase: preemption only


def _launch(workdir):
  """Popen of 2 training processes; returns (launcher, [pid of process 0, pid of process 1])."""
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  cmd = [sys.executable, "-m", "launch.local_multiprocess", "--num-processes", "2", "--",
         f"--workdir={workdir}", *ARGS]
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
  pids = [int(proc.stdout.readline().split("pid ")[1]) for _ in range(2)]
  return proc, pids


def _finish(proc, timeout=900) -> tuple:
  """(launcher exit code, {process: exit code}) from the launcher's report."""
  out, _ = proc.communicate(timeout=timeout)
  rcs = {int(line.split()[1].rstrip(":")): int(line.split("exit code ")[1].split()[0])
         for line in out.splitlines() if "exit code" in line}
  return proc.returncode, rcs


def _log(workdir, i) -> str:
  with open(os.path.join(workdir, f"process_{i}.log"), encoding="utf-8", errors="replace") as f:
    return f.read()


def _checkpoints(workdir) -> list:
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


@pytest.fixture(scope="module")
def runs(shared_data, tmp_path_factory):
  """An uninterrupted 2-process run; one stopped by SIGTERM to process 1 only, then resumed."""
  root = tmp_path_factory.mktemp("preemption")
  reference = str(root / "reference")
  rc, _ = _finish(_launch(reference)[0])
  assert rc == 0, _log(reference, 0)[-3000:] + _log(reference, 1)[-3000:]
  stopped = str(root / "stopped")
  proc, pids = _launch(stopped)
  t = time.time()
  while not _losses(stopped):  # process 0 logs step 1: the loop runs on both
    assert proc.poll() is None, _log(stopped, 0)[-3000:] + _log(stopped, 1)[-3000:]
    assert time.time() - t < 600
    time.sleep(0.05)
  logged = max(_losses(stopped))
  os.kill(pids[1], signal.SIGTERM)  # not the coordinator, not the writer of the logs
  rc, rcs = _finish(proc, timeout=300)
  result = {"rc": rc, "rcs": rcs, "logged": logged, "checkpoints": _checkpoints(stopped),
            "logs": [_log(stopped, i) for i in (0, 1)]}
  result["resume_rc"], _ = _finish(_launch(stopped)[0])
  result["resume_logs"] = [_log(stopped, i) for i in (0, 1)]
  return reference, stopped, result


def test_sigterm_to_one_process_stops_both_at_the_same_step(runs):
  _, _, r = runs
  assert r["rcs"] == {0: 143, 1: 143} and r["rc"] == 143, r["logs"][0][-3000:] + r["logs"][1][-3000:]
  assert "received SIGTERM" in r["logs"][1] and "received SIGTERM" not in r["logs"][0]
  saved = [[int(line.split("saved step ")[1].split()[0]) for line in log.splitlines()
            if "saved step " in line] for log in r["logs"]]
  assert saved[0] == saved[1] and len(saved[0]) == 1  # the same step, saved once, on both
  assert r["checkpoints"] == saved[0]  # ckpt.every_steps=100: only the stop saved
  # Within one step of the signal: process 0 had logged `logged` when process 1 got it, and
  # its log line can trail the step it ran by one.
  assert r["logged"] <= saved[0][0] <= r["logged"] + 2 < STEPS
  assert all("Traceback" not in log for log in r["logs"])


def test_the_resumed_run_reaches_the_uninterrupted_losses(runs):
  reference, stopped, r = runs
  assert r["resume_rc"] == 0, r["resume_logs"][0][-3000:] + r["resume_logs"][1][-3000:]
  assert f"resumed from step {r['checkpoints'][-1]}" in r["resume_logs"][0]
  resumed, uninterrupted = _losses(stopped), _losses(reference)
  assert sorted(resumed) == sorted(uninterrupted) == list(range(1, STEPS + 1))
  np.testing.assert_array_equal([resumed[s] for s in range(1, STEPS + 1)],
                                [uninterrupted[s] for s in range(1, STEPS + 1)])
  assert _checkpoints(stopped)[-1] == STEPS


# ------------------------------------------------------------------------------------------------
# The collective rules, with a fake reduction standing for the other processes


class FakeProcesses:
  """max_over_processes for a run whose other processes report `others` (0: no signal)."""

  def __init__(self, others: int = 0):
    self.others, self.calls = others, 0

  def __call__(self, mine: int) -> int:
    self.calls += 1
    return max(mine, self.others)


def test_a_collective_phase_runs_to_its_end_and_all_stop_after_it():
  with run_control.SignalGuard() as guard:
    guard.make_collective(FakeProcesses())
    with guard.interruptible():
      os.kill(os.getpid(), signal.SIGTERM)  # handled at once, but must not raise here
      time.sleep(0.01)
      finished = True
    assert finished and guard.requested
    with pytest.raises(run_control.Interrupted) as e:
      guard.check()
    assert e.value.signum == signal.SIGTERM


def test_a_signal_on_another_process_stops_this_one_with_its_code():
  others = FakeProcesses(others=int(signal.SIGTERM))
  with run_control.SignalGuard() as guard:
    guard.make_collective(others)
    assert not guard.requested and guard.agreed()
    with pytest.raises(run_control.Interrupted) as e:
      with guard.interruptible():  # checks first: a phase is not started once all must stop
        pytest.fail("the phase started")
    assert e.value.signum == signal.SIGTERM
    calls = others.calls
    assert guard.agreed() and others.calls == calls  # decided once: no more collectives


def test_no_signal_anywhere_lets_the_run_go_on():
  others = FakeProcesses()
  with run_control.SignalGuard() as guard:
    guard.make_collective(others)
    with guard.interruptible():
      pass
    guard.check()
    assert not guard.agreed() and others.calls == 3  # each check is one reduction


def test_one_process_still_stops_an_interruptible_phase_at_once():
  with run_control.SignalGuard() as guard:
    with pytest.raises(run_control.Interrupted):
      with guard.interruptible():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)
        pytest.fail("not interrupted")
