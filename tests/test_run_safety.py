"""Errors the user fixes are one line with exit code 2; config values are checked before any work;
one training per work directory (its lock); a full disk stops the run at the failed save. The
training runs are real subprocesses on ../shared/data (bottle, 64 px, Lite0)."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest
from PIL import Image

from conftest import REPO
from data_pipelines import errors
from onenip_jax import cli
from onenip_jax.config import checks, loading
from onenip_jax.training import checkpoints, workdir_lock

TINY = ["--config.input_size=64", "--config.data.classes=('bottle',)", "--config.log_every_steps=1",
         "--config.eval.fusion_max_images=16", "--config.eval.heatmaps=False",
         "--config.eval.batch_size=32", "--config.calibration.holdout_fraction=0.0"]
TRAIN = ["--config=configs/real.py:steps=3,backbone=lite0", *TINY]
NOISE = ("WARNING: All log messages", "I0000 ", "rebuild TensorFlow", "Unable to initialize "
         "backend", "libtpu", "To enable the following instructions")


def _cli(*args, timeout=600) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "onenip_jax.cli", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=timeout)


def _lines(text: str) -> list:
  """The output's lines without TensorFlow's and XLA's start-up notices."""
  return [ln for ln in text.splitlines() if ln.strip() and not any(n in ln for n in NOISE)]


def _dead_pid() -> int:
  p = subprocess.Popen(["true"])
  p.wait()
  return p.pid


def _write_lock(workdir, **fields) -> dict:
  record = {"host": socket.gethostname(), "pid": os.getpid(), "started_unix": time.time(),
            "heartbeat_unix": time.time(), "token": "someone-else", **fields}
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, workdir_lock.LOCK_FILE), "w", encoding="utf-8") as f:
    json.dump(record, f)
  return record


# ------------------------------------------------------------------------------------------------
# Config values are checked before any work


@pytest.mark.parametrize("override,key", [
    ("--config.batch_size=0", "batch_size"), ("--config.batch_size=-8", "batch_size"),
    ("--config.eval.batch_size=-1", "eval.batch_size"), ("--config.total_steps=-1", "total_steps"),
    ("--config.calibration.holdout_fraction=1.0", "calibration.holdout_fraction"),
    ("--config.data.synthesis.p_cutpaste=1.5", "data.synthesis.p_cutpaste"),
    ("--config.input_size=0", "input_size"), ("--config.input_size=100", "input_size"),
    ("--config.optim.lr=0", "optim.lr"), ("--config.optim.lr=-1e-4", "optim.lr"),
    ("--config.ckpt.every_steps=0", "ckpt.every_steps"),
    ("--config.model.dropout=1.0", "model.dropout"),
])
def test_train_checks_config_values_before_any_work(override, key, tmp_path, capsys, monkeypatch):
  monkeypatch.chdir(REPO)
  workdir = tmp_path / "w"
  with pytest.raises(SystemExit) as e:
    cli.train([f"--workdir={workdir}", "--config=configs/demo.py", override])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith(f"onenip-train: error: config.{key}="), err
  assert not workdir.exists()


@pytest.mark.parametrize("command,extra", [(cli.evaluate, []), (cli.export, ["--out", "O"])])
def test_eval_and_export_check_override_values_first(command, extra, tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    command(["--workdir", str(tmp_path / "none"), *extra, "--config.eval.batch_size=-2"])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "config.eval.batch_size=-2: must be an integer >= 0" in err[0], err


def test_every_config_file_passes_the_checks():
  for path in sorted((REPO / "configs").glob("*.py")):
    checks.check_config(loading.load_config(str(path)))
  cfg = loading.load_config(str(REPO / "configs" / "demo.py"),
                            ["--config.total_steps=0", "--config.num_epochs=0"])
  with pytest.raises(checks.ConfigValueError, match="no steps"):
    checks.check_config(cfg)
  checks.check_config({"batch_size": 4})  # keys an older stored config lacks: unchecked


# ------------------------------------------------------------------------------------------------
# One line per expected error (exit code 2); --verbose shows the traceback


def test_missing_data_root_is_one_line_and_verbose_shows_the_traceback(shared_data, tmp_path):
  args = ["train", f"--workdir={tmp_path / 'w'}", *TRAIN, "--config.data.root=/no/such/root"]
  out = _cli(*args)
  assert out.returncode == 2, out.stderr[-3000:]
  assert "Traceback" not in out.stderr + out.stdout
  assert _lines(out.stderr) == [
      "onenip-train: error: data.root '/no/such/root' does not exist or is not a folder"]
  verbose = _cli(*args, "--verbose")
  assert verbose.returncode == 2 and "Traceback" in verbose.stderr
  assert _lines(verbose.stderr)[-1] == _lines(out.stderr)[-1]


def test_damaged_export_is_one_line(tmp_path):
  export_dir = tmp_path / "export"
  export_dir.mkdir()
  (export_dir / "export.json").write_text("{\"format_version\": ")
  image = tmp_path / "x.png"
  Image.new("RGB", (8, 8)).save(image)
  for args in (["eval", f"--exported={export_dir}"],
               ["predict", f"--exported={export_dir}", f"--out={tmp_path / 'p'}", str(image)]):
    out = _cli(*args)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    lines = _lines(out.stderr)
    assert len(lines) == 1 and "export.json is not valid JSON" in lines[0]
    assert "the export is damaged" in lines[0] and str(export_dir) in lines[0], lines
    verbose = _cli(*args, "--verbose")
    assert verbose.returncode == 2 and "Traceback" in verbose.stderr


def test_bad_config_value_is_one_line_in_a_subprocess(tmp_path):
  out = _cli("train", f"--workdir={tmp_path / 'w'}", "--config=configs/demo.py",
             "--config.batch_size=0")
  assert out.returncode == 2 and "Traceback" not in out.stderr
  assert _lines(out.stderr) == ["onenip-train: error: config.batch_size=0: must be an integer >= 1"]
  assert not (tmp_path / "w").exists()


def test_unexpected_errors_keep_their_traceback(monkeypatch, capsys):
  from onenip_jax.serving import predict  # pylint: disable=g-import-not-at-top

  def bug(args):
    raise ValueError("a bug, not a user error")

  monkeypatch.setattr(predict, "main", bug)
  with pytest.raises(ValueError, match="a bug"):
    cli.predict(["--exported", "E", "x.png"])


# ------------------------------------------------------------------------------------------------
# The work directory lock


def test_lock_refuses_a_live_holder_and_takes_over_a_stale_one(tmp_path, caplog):
  workdir = str(tmp_path / "w")
  first = workdir_lock.WorkdirLock(workdir, settle_s=0)
  first.acquire()
  second = workdir_lock.WorkdirLock(workdir, settle_s=0)
  with pytest.raises(workdir_lock.WorkdirBusy) as e:
    second.acquire()
  message = str(e.value)
  assert f"process {os.getpid()} on host {socket.gethostname()} (started " in message
  assert workdir in message and not second.held
  first.release()
  assert not os.path.exists(os.path.join(workdir, workdir_lock.LOCK_FILE))
  second.acquire()  # free again
  second.release()
  dead = _dead_pid()
  _write_lock(workdir, pid=dead)
  with caplog.at_level("WARNING", logger="onenip"):
    third = workdir_lock.WorkdirLock(workdir, settle_s=0)
    third.acquire()
  assert third.held and f"process {dead} is gone" in caplog.text
  assert third.read()["token"] == third.token
  third.release()


def test_lock_of_another_host_is_stale_only_without_a_heartbeat(tmp_path):
  workdir = str(tmp_path / "w")
  _write_lock(workdir, host="other-host", pid=1)
  lock = workdir_lock.WorkdirLock(workdir, settle_s=0, stale_after_s=60)
  with pytest.raises(workdir_lock.WorkdirBusy, match="process 1 on host other-host"):
    lock.acquire()
  _write_lock(workdir, host="other-host", pid=1, heartbeat_unix=time.time() - 120)
  lock.acquire()
  assert lock.held
  lock.release()


def test_lock_heartbeat_refreshes_the_record(tmp_path):
  lock = workdir_lock.WorkdirLock(str(tmp_path / "w"), settle_s=0, heartbeat_s=0.05)
  with lock:
    first = lock.read()["heartbeat_unix"]
    time.sleep(0.5)
    assert lock.read()["heartbeat_unix"] > first
  assert lock.read() is None


def test_lock_on_a_url_scheme(tmp_path):
  """ram:// stands for gs:// (no atomic create: written, then read back)."""
  workdir = f"ram://{tmp_path.name}/w"
  first = workdir_lock.WorkdirLock(workdir, settle_s=0.05)
  first.acquire()
  with pytest.raises(workdir_lock.WorkdirBusy):
    workdir_lock.WorkdirLock(workdir, settle_s=0.05).acquire()
  first.release()
  second = workdir_lock.WorkdirLock(workdir, settle_s=0.05)
  second.acquire()
  assert second.read()["token"] == second.token
  second.release()


def test_second_training_on_a_busy_workdir_refuses_at_once(shared_data, tmp_path):
  workdir = str(tmp_path / "w")
  holder = _write_lock(workdir)  # this (live) test process holds it
  t = time.time()
  out = _cli("train", f"--workdir={workdir}", *TRAIN)
  assert out.returncode == 2, out.stderr[-3000:]
  assert time.time() - t < 60
  lines = _lines(out.stderr)
  assert len(lines) == 1 and "Traceback" not in out.stderr, lines
  assert lines[0].startswith(f"onenip-train: error: work directory {workdir} is in use")
  assert f"process {os.getpid()} on host {socket.gethostname()} (started " in lines[0]
  assert sorted(os.listdir(workdir)) == [workdir_lock.LOCK_FILE]  # nothing else was made
  with open(os.path.join(workdir, workdir_lock.LOCK_FILE), encoding="utf-8") as f:
    assert json.load(f) == holder


def test_stale_lock_is_taken_over_with_a_warning_and_released(shared_data, tmp_path):
  workdir = str(tmp_path / "w")
  dead = _dead_pid()
  _write_lock(workdir, pid=dead)
  out = _cli("train", f"--workdir={workdir}", *TRAIN, "--config.data.root=/no/such/root")
  assert out.returncode == 2, out.stderr[-3000:]
  assert f"taking over the stale lock {os.path.join(workdir, workdir_lock.LOCK_FILE)}" in out.stderr
  assert f"process {dead} is gone" in out.stderr
  assert _lines(out.stderr)[-1].startswith("onenip-train: error: data.root '/no/such/root'")
  assert not os.path.exists(os.path.join(workdir, workdir_lock.LOCK_FILE))  # released


# ------------------------------------------------------------------------------------------------
# A failed checkpoint save stops the run in one line


class _FailedSaves:
  """What `check_saves` needs of a manager whose background save of `step` failed."""

  def __init__(self, directory, error):
    self.directory, self.error = directory, error

  def check_for_errors(self):
    raise self.error


def test_failed_background_save_is_one_line_naming_the_path(tmp_path):
  directory = tmp_path / "checkpoints"
  (directory / "2").mkdir(parents=True)
  (directory / "4.orbax-checkpoint-tmp").mkdir()
  tmp = f"{directory}/4.orbax-checkpoint-tmp/state.orbax-checkpoint-tmp/ocdbt.process_0/"
  error = ValueError(f'RESOURCE_EXHAUSTED: Error writing "params.x/0" in OCDBT database at local '
                     f'file "{tmp}": Failed writing: "{tmp}d/0f1c": Failed to write 39505920 bytes '
                     "to file 6: No space left on device [os_error_code='28']")
  with pytest.raises(checkpoints.CheckpointSaveError) as e:
    checkpoints.check_saves(_FailedSaves(directory, error))
  assert isinstance(e.value, errors.UserError)
  assert str(e.value) == (f"no space left on device: {directory}/4 (checkpoint step 4 not saved; "
                          "the newest intact checkpoint is step 2, a rerun resumes from it)")
  other = checkpoints.save_error(_FailedSaves(directory, None), 6, OSError(13, "Permission denied"))
  assert str(other).startswith(f"cannot save checkpoint step 6 to {directory}/6: [Errno 13]")


@pytest.fixture
def small_disk(tmp_path):
  """A 120 MiB tmpfs: room for one checkpoint of the tiny run (~90 MB), not two."""
  mount = tmp_path / "disk"
  mount.mkdir()
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=120m", "tmpfs", str(mount)],
                    capture_output=True).returncode:
    pytest.skip("cannot mount a tmpfs here (not root?)")
  yield mount
  subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_stops_at_the_failed_save_and_resumes_when_there_is_room(shared_data,
                                                                          small_disk):
  workdir = str(small_disk / "w")
  args = ["train", f"--workdir={workdir}", "--config=configs/real.py:steps=8,backbone=lite0", *TINY,
          "--config.ckpt.every_steps=2"]
  out = _cli(*args, timeout=900)
  text = out.stdout + out.stderr
  assert out.returncode == 2, text[-3000:]
  assert "Traceback" not in text and "Exception ignored" not in text, text[-3000:]
  last = _lines(out.stderr)[-1]
  assert last.startswith(f"onenip-train: error: no space left on device: {workdir}/checkpoints/"), last
  assert last == (f"onenip-train: error: no space left on device: {workdir}/checkpoints/4 "
                  "(checkpoint step 4 not saved; the newest intact checkpoint is step 2, a rerun "
                  "resumes from it)")
  with open(os.path.join(workdir, "train_log.jsonl"), encoding="utf-8") as f:
    logged = [json.loads(line)["step"] for line in f if '"total"' in line]
  # Stopped at the first step after Orbax reported the failure, at the latest at the next save.
  assert max(logged) <= 6 and "saved the final step" not in text
  assert not os.path.exists(os.path.join(workdir, workdir_lock.LOCK_FILE))
  kept = sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())
  assert kept == [2]
  # With room again the same command resumes from the newest intact step and finishes.
  subprocess.run(["mount", "-o", "remount,size=600m", str(small_disk)], check=True)
  again = _cli(*args, timeout=900)
  assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
  assert "resumed from step 2" in again.stderr
