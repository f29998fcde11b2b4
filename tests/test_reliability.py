"""Never lose a run: signals at any moment, extended runs, config-checked resume,
damaged checkpoints, safe export, no silent wrong answers. Training runs are real subprocesses
on ../shared/data (bottle, 64 px, Lite0), as in test_end_to_end.py."""
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO

ARGS = ["--config=configs/real.py:steps=3,backbone=lite0", "--config.input_size=64",
        "--config.data.classes=('bottle',)", "--config.log_every_steps=1",
        "--config.ckpt.every_steps=100", "--config.eval.fusion_max_images=32",
        "--config.eval.heatmaps=False", "--config.eval.batch_size=32"]


def _start(workdir, *extra):
  """Popen of `onenip-train` on `workdir`; output appended to `<workdir>.log`."""
  cmd = [sys.executable, "-m", "onenip_jax.cli", "train", f"--workdir={workdir}", *ARGS, *extra]
  log = open(str(workdir) + ".log", "ab")
  return subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def _log(workdir) -> str:
  with open(str(workdir) + ".log", encoding="utf-8", errors="replace") as f:
    return f.read()


def _wait_for(proc, workdir, text, timeout=600):
  """Waits until `text` appears in the log (counted from now); fails if the run ends first."""
  skip, t = len(_log(workdir)), time.time()
  while text not in _log(workdir)[skip:]:
    assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before logging {text!r}"
    assert time.time() - t < timeout, f"no {text!r} after {timeout} s"
    time.sleep(0.1)


def _run(workdir, *extra, timeout=900) -> tuple:
  """(exit code, this run's log text)."""
  skip = len(_log(workdir)) if os.path.exists(str(workdir) + ".log") else 0
  rc = _start(workdir, *extra).wait(timeout=timeout)
  return rc, _log(workdir)[skip:]


def _checkpoints(workdir) -> list:
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _stored_state(workdir, step=None):
  """(step, fusion constant) of a checkpoint, read back as onenip-eval / -export do."""
  from onenip_jax import sharding  # pylint: disable=g-import-not-at-top
  from onenip_jax.evaluation import restore  # pylint: disable=g-import-not-at-top
  trained = restore.load_checkpoint(str(workdir), sharding.make_mesh(), step)
  return trained.step, trained.fusion_c


# ------------------------------------------------------------------------------------------------
# 1. SIGTERM at the end of training (fusion-constant pass), then a restart


@pytest.fixture(scope="module")
def finished(shared_data, tmp_path_factory):
  """A 3-step run stopped by SIGTERM in the fusion-constant pass, then restarted to the end."""
  workdir = str(tmp_path_factory.mktemp("reliability") / "run")
  proc = _start(workdir)
  _wait_for(proc, workdir, "3/3 [")  # the progress bar's last step ...
  time.sleep(3)  # ... then the fusion-constant pass (its compile alone takes longer than this)
  proc.send_signal(signal.SIGTERM)
  stopped = {"rc": proc.wait(timeout=300), "checkpoints": _checkpoints(workdir),
             "locked": os.path.exists(os.path.join(workdir, "train.lock"))}
  stopped["restart_rc"], stopped["restart_log"] = _run(workdir)
  return workdir, stopped


def test_sigterm_in_the_fusion_pass_keeps_the_trained_steps(finished):
  workdir, stopped = finished
  assert stopped["rc"] == 128 + signal.SIGTERM
  assert stopped["checkpoints"] == [3]  # ckpt.every_steps=100: only the stop saved it
  assert not stopped["locked"]  # the work directory's lock is released on a signal
  assert stopped["restart_rc"] == 0, stopped["restart_log"][-3000:]
  assert "resumed from step 3" in stopped["restart_log"]
  with open(os.path.join(workdir, "eval", "step_3", "metrics.json"), encoding="utf-8") as f:
    assert json.load(f)["step"] == 3
  step, c = _stored_state(workdir)
  assert step == 3 and np.isfinite(c)


# ------------------------------------------------------------------------------------------------
# 2. Extending a finished run; 3. the config check at resume


@pytest.fixture(scope="module")
def extended(finished):
  """The finished 3-step run extended to 5 steps (and a harmless change of log_every_steps)."""
  workdir, _ = finished
  rc, log = _run(workdir, "--config.total_steps=5", "--config.log_every_steps=2")
  return workdir, rc, log


def test_extending_a_finished_run_saves_refits_and_evaluates(extended):
  workdir, rc, log = extended
  assert rc == 0, log[-3000:]
  assert _checkpoints(workdir) == [3, 5]
  step, c = _stored_state(workdir)  # the latest checkpoint is the latest trained state ...
  assert step == 5 and np.isfinite(c)
  assert "computing the frozen fusion constant of step 5" in log  # ... with its own constant
  with open(os.path.join(workdir, "eval", "step_5", "metrics.json"), encoding="utf-8") as f:
    metrics = json.load(f)
  assert metrics["step"] == 5 and metrics["fusion_c"] == pytest.approx(c)
  assert "changed settings" in log and "total_steps: 3 -> 5" in log and "log_every_steps: 1 -> 2" in log


def test_resume_with_another_model_fails_at_once(extended):
  workdir, _, _ = extended
  before = _checkpoints(workdir)
  t = time.time()
  rc, log = _run(workdir, "--config.total_steps=5", "--config.backbone.name=lite1",
                 "--config.batch_size=16", timeout=300)
  assert rc == 2, log[-3000:]
  assert time.time() - t < 120
  assert "backbone.name: 'lite0' (stored) -> 'lite1' (now)" in log
  assert "batch_size: 8 (stored) -> 16 (now)" in log and "another --workdir" in log
  assert "Traceback" not in log
  assert _checkpoints(workdir) == before


def test_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(extended, tmp_path, caplog):
  from onenip_jax import sharding  # pylint: disable=g-import-not-at-top
  from onenip_jax.evaluation import inference, restore  # pylint: disable=g-import-not-at-top
  from onenip_jax.training import checkpoints, state  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "copy")
  shutil.copytree(extended[0], workdir)
  data_dir = os.path.join(workdir, "checkpoints", "5", "state", "ocdbt.process_0", "d")
  biggest = max((os.path.join(data_dir, n) for n in os.listdir(data_dir)), key=os.path.getsize)
  with open(biggest, "r+b") as f:
    f.truncate(os.path.getsize(biggest) // 2)
  with caplog.at_level(logging.WARNING, logger="onenip"):
    step = restore.load_checkpoint(workdir, sharding.make_mesh()).step
  assert step == 3
  damaged = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
  assert len(damaged) == 1 and "\n" not in damaged[0] and len(damaged[0]) < 600
  assert "checkpoint step 5" in damaged[0] and os.path.join(workdir, "checkpoints", "5") in damaged[0]
  # Training moves it aside, so that later saves and resumes do not meet it again.
  cfg = checkpoints.restore_config(workdir, 3)
  model, features = inference.make_model(cfg)
  template = state.init_state(cfg, model, state.make_optimizer(cfg, 1),
                              features)
  manager = checkpoints.make_manager(workdir, cfg)
  _, _, step = checkpoints.restore_latest(manager, template, move_damaged=True)
  assert step == 3 and manager.latest_step() == 3
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "5" + checkpoints.DAMAGED))
  manager.close()


# ------------------------------------------------------------------------------------------------
# 4. Safe export


def test_export_checks_out_first_and_overwrites_only_exports(extended, tmp_path, monkeypatch):
  from onenip_jax import cli  # pylint: disable=g-import-not-at-top
  from onenip_jax.evaluation import restore  # pylint: disable=g-import-not-at-top
  from onenip_jax.serving import export  # pylint: disable=g-import-not-at-top
  workdir = extended[0]
  monkeypatch.setattr(restore, "load_checkpoint", lambda *a, **k: pytest.fail("worked before --out"))
  for out in (workdir, os.path.dirname(workdir)):
    with pytest.raises(SystemExit):
      cli.export(["--workdir", workdir, "--out", out, "--overwrite"])
  other = tmp_path / "not_an_export"
  other.mkdir()
  (other / "keep.txt").write_text("x")
  with pytest.raises(SystemExit):
    cli.export(["--workdir", workdir, "--out", str(other), "--overwrite"])
  with pytest.raises(SystemExit):
    cli.export(["--workdir", workdir, "--out", str(other)])
  assert (other / "keep.txt").exists() and _checkpoints(workdir) == [3, 5]
  old = tmp_path / "old_export"
  old.mkdir()
  (old / "export.json").write_text("{}")
  export.check_out_dir(str(old), overwrite=True, workdir=workdir)  # an export may be replaced
  with pytest.raises(FileExistsError):
    export.check_out_dir(str(old), overwrite=False, workdir=workdir)


# ------------------------------------------------------------------------------------------------
# 6. SIGINT saves, exits at once after saving; a second Ctrl-C aborts


def test_sigint_saves_and_exits_promptly(shared_data, tmp_path):
  workdir = str(tmp_path / "sigint")
  proc = _start(workdir)
  _wait_for(proc, workdir, "1/3 [")
  proc.send_signal(signal.SIGINT)
  _wait_for(proc, workdir, "saved step", timeout=300)
  t = time.time()
  assert proc.wait(timeout=300) == 128 + signal.SIGINT
  assert time.time() - t < 10  # no 30 s teardown after the save
  assert _checkpoints(workdir) and "Traceback" not in _log(workdir)
  assert not os.path.exists(os.path.join(workdir, "train.lock"))


def test_second_sigint_aborts_at_once(shared_data, tmp_path):
  workdir = str(tmp_path / "twice")
  proc = _start(workdir)
  _wait_for(proc, workdir, "0/3 [")  # the progress bar starts: the first step compiles for long
  proc.send_signal(signal.SIGINT)
  time.sleep(0.5)
  t = time.time()
  proc.send_signal(signal.SIGINT)
  assert proc.wait(timeout=60) == 128 + signal.SIGINT
  assert time.time() - t < 10
  assert "aborting at once" in _log(workdir)


# ------------------------------------------------------------------------------------------------
# 7. No silent wrong answers


def test_unknown_config_key_is_one_line(tmp_path):
  out = subprocess.run([sys.executable, "-m", "onenip_jax.cli", "train",
                        f"--workdir={tmp_path / 'w'}",
                        "--config=configs/demo.py", "--config.model.x=1"], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 2
  assert "Traceback" not in out.stderr
  assert out.stderr.strip().splitlines()[-1] == (
      "onenip-train: error: unknown config key 'model.x' (from --config.model.x=1)")


def test_eval_and_export_overrides_of_a_stored_run(extended, capsys):
  """Unknown keys and keys the stored weights fix fail in one line naming the key."""
  from onenip_jax import cli  # pylint: disable=g-import-not-at-top
  for command, extra in ((cli.evaluate, []), (cli.export, ["--out", str(extended[0]) + "-x"])):
    for flag, want in (("--config.eval.x=1", "unknown config key 'eval.x'"),
                       ("--config.backbone.name=lite2", "config key 'backbone.name' cannot be"),
                       ("--config.input_size=96", "config key 'input_size' cannot be")):
      with pytest.raises(SystemExit) as e:
        command(["--workdir", extended[0], *extra, flag])
      assert e.value.code == 2
      last = capsys.readouterr().err.strip().splitlines()[-1]
      assert last.startswith("onenip-") and want in last and flag in last, last
  assert not os.path.exists(str(extended[0]) + "-x")


def test_predict_exits_nonzero_when_nothing_is_scored(tmp_path, monkeypatch, capsys):
  from onenip_jax import cli  # pylint: disable=g-import-not-at-top
  from onenip_jax.serving import predict  # pylint: disable=g-import-not-at-top
  bad = tmp_path / "bad.png"
  bad.write_bytes(b"not an image")

  class FakeScorer:  # what predict needs of a scorer when every image fails to decode
    thresholds, fusion_c, step, backend = None, 1.0, 1, "fake"

    def __init__(self, *_):
      pass

    def load(self, path):
      raise ValueError(f"{path}: cannot decode")

  monkeypatch.setattr(predict, "ExportedScorer", FakeScorer)
  with pytest.raises(SystemExit) as e:
    cli.predict(["--exported", str(tmp_path), "--out", str(tmp_path / "p"), "--skip-bad",
                 str(bad)])
  assert e.value.code == 1
  assert "nothing was scored" in capsys.readouterr().err


def test_empty_mask_of_a_defect_image_is_warned_and_counted(tmp_path, caplog):
  from onenip_jax.config import base as common  # pylint: disable=g-import-not-at-top
  from data_pipelines import indexing  # pylint: disable=g-import-not-at-top
  from onenip_jax.evaluation import protocol  # pylint: disable=g-import-not-at-top
  cfg = common.get_base_config()
  cfg.input_size, cfg.eval.pool_size = 32, 4
  samples = [indexing.Sample(f"/d/{i}.png", "a", int(i > 1), f"/d/{i}_mask.png" if i > 1 else None,
                             "crack" if i > 1 else "good") for i in range(4)]
  rng = np.random.default_rng(0)
  mask = np.zeros((4, 32, 32), bool)
  mask[3, 5:9, 5:9] = True  # image 2 is a defect whose mask is empty
  maps = rng.random((4, 32, 32)).astype(np.float32)
  builder = protocol.ReportBuilder(cfg, str(tmp_path))
  with caplog.at_level(logging.WARNING, logger="onenip"):
    builder.add_class("a", samples, maps, maps.max(axis=(1, 2)), mask,
                      np.array([False, False, True, True]))
    builder.finish(step=1)
  warned = [r.getMessage() for r in caplog.records if "all zero" in r.getMessage()]
  assert len(warned) == 1 and "/d/2.png" in warned[0]
  with open(tmp_path / "metrics.json", encoding="utf-8") as f:
    m = json.load(f)
  assert m["n_empty_defect_masks"] == 1 and m["empty_defect_masks"] == ["/d/2.png"]