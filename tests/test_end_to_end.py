"""End to end on ../shared/data (bottle, 64 px, Lite0): train as a user would (subprocesses),
kill and resume, SIGTERM, two processes through jax.distributed, export, eval and predict."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, train_losses as _losses

STEPS = 6
ARGS = ["--config=configs/real.py:steps=6,backbone=lite0", "--config.input_size=64",
        "--config.data.classes=('bottle',)", "--config.log_every_steps=1",
        "--config.ckpt.every_steps=2", "--config.eval.fusion_max_images=32",
        "--config.eval.heatmaps=False", "--config.eval.batch_size=32"]


def _train(workdir, *extra, wait=True):
  cmd = [sys.executable, "-m", "onenip_jax.cli", "train", f"--workdir={workdir}", *ARGS, *extra]
  log = open(os.path.join(os.path.dirname(workdir), os.path.basename(workdir) + ".log"), "ab")
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
  if wait:
    assert proc.wait(timeout=900) == 0, f"training failed, see {log.name}"
  return proc


def _wait_for_step(proc, workdir, step, timeout=600):
  t = time.time()
  while max(_losses(workdir), default=0) < step:
    assert proc.poll() is None, "training ended before it could be interrupted"
    assert time.time() - t < timeout
    time.sleep(0.2)


def _checkpoints(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit())


@pytest.fixture(scope="module")
def trained(shared_data, tmp_path_factory):
  """An uninterrupted 6-step run (the reference trajectory)."""
  workdir = str(tmp_path_factory.mktemp("e2e") / "full")
  _train(workdir)
  return workdir


def test_losses_are_logged_and_eval_written(trained):
  losses = _losses(trained)
  assert sorted(losses) == list(range(1, STEPS + 1))
  assert all(np.isfinite(v) for v in losses.values())
  with open(os.path.join(trained, "eval", f"step_{STEPS}", "metrics.json"), encoding="utf-8") as f:
    m = json.load(f)
  assert set(m["classes"]) == {"bottle"} and m["step"] == STEPS
  assert m["classes"]["bottle"]["n_images"] == 83
  assert m["fusion"] == "calibrated" and m["fusion_c"] > 0 and m["fusion_c_source"] == "frozen"
  assert set(m["scorings"]) == {"calibrated", "reference", "refiner", "reconstruction"}
  assert os.path.isdir(os.path.join(trained, "tb"))


def test_sigterm_saves_and_sigkill_resumes_the_same_trajectory(trained, tmp_path):
  workdir = str(tmp_path / "interrupted")
  proc = _train(workdir, wait=False)
  _wait_for_step(proc, workdir, 1)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=300) == 128 + signal.SIGTERM
  stopped = max(_losses(workdir))
  assert _checkpoints(workdir)[-1] >= stopped  # saved at the step it was stopped at
  proc = _train(workdir, wait=False)
  _wait_for_step(proc, workdir, 4)
  proc.kill()
  proc.wait()
  _train(workdir)
  resumed, reference = _losses(workdir), _losses(trained)
  assert sorted(resumed) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([resumed[s] for s in range(1, STEPS + 1)],
                             [reference[s] for s in range(1, STEPS + 1)], rtol=1e-6)


def test_two_processes_match_one(trained, tmp_path):
  """2 CPU processes (jax.distributed on 127.0.0.1) reach the single-process params at step 4."""
  workdir = str(tmp_path / "two")
  cmd = [sys.executable, "-m", "launch.local_multiprocess", "--num-processes", "2", "--",
         f"--workdir={workdir}", *ARGS, "--config.total_steps=4"]
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  logs = [open(os.path.join(workdir, f"process_{i}.log"), encoding="utf-8").read() for i in (0, 1)]
  assert out.returncode == 0, out.stdout + out.stderr + logs[0][-3000:] + logs[1][-3000:]
  digests = [[line.split("params digest ")[1] for line in log.splitlines() if "params digest" in line]
             for log in logs]
  assert digests[0] and digests[0] == digests[1]
  # Same batches, same init: the losses agree to float round-off at every step ...
  two_losses, one_losses = _losses(workdir), _losses(trained)
  np.testing.assert_allclose([two_losses[s] for s in range(1, 5)], [one_losses[s] for s in range(1, 5)],
                             rtol=1e-5)
  # ... and so do the params. The collectives sum in another order than one device does, and
  # Adam turns round-off in near-zero gradients (e.g. of the key biases, whose true gradient is 0)
  # into updates of size ~lr, so the params are compared against the size of the update.
  from onenip_jax import sharding  # pylint: disable=g-import-not-at-top
  from onenip_jax.evaluation import inference, restore  # pylint: disable=g-import-not-at-top
  from onenip_jax.training import state  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh()
  two, one = restore.load_checkpoint(workdir, mesh, 4), restore.load_checkpoint(trained, mesh, 4)
  assert two.step == one.step == 4
  cfg, two, one = two.cfg, two.predictor, one.predictor
  model, features = inference.make_model(cfg)
  init = state.init_state(cfg, model, state.make_optimizer(cfg, 1), features)
  p2, p1, p0 = (np.concatenate([np.ravel(x) for x in _leaves(t)])
                for t in (two.variables["params"], one.variables["params"], init.params))
  # After 4 Adam steps that is a few per cent of the update's norm (1.1 % here with XLA:CPU's
  # YNNPACK fusions off); a wrong sharding of the gradient would be O(1).
  assert np.linalg.norm(p2 - p1) <= 3e-2 * np.linalg.norm(p1 - p0)
  assert np.abs(p2 - p1).max() <= 1e-3 * np.abs(p1).max()


def _leaves(tree):
  import jax  # pylint: disable=g-import-not-at-top
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_export_eval_and_predict_agree_with_training(trained, tmp_path, shared_data):
  from onenip_jax import cli  # pylint: disable=g-import-not-at-top
  from onenip_jax.evaluation import reports  # pylint: disable=g-import-not-at-top
  out = str(tmp_path / "export")
  cli.export(["--workdir", trained, "--out", out])
  assert sorted(os.listdir(out)) == ["export.json", "predictor.jaxexport",
                                     "predictor_weights.npz", "prompt_pool.npz"]
  with pytest.raises(SystemExit):  # --out exists (checked before any work)
    cli.export(["--workdir", trained, "--out", out])
  # Evaluation of the checkpoint == in-training evaluation (class-mode prompts, frozen constant).
  cli.evaluate(["--workdir", trained, "--out", str(tmp_path / "eval")])
  mine = reports.read_metrics(str(tmp_path / "eval"))
  theirs = reports.read_metrics(os.path.join(trained, "eval", f"step_{STEPS}"))
  for k, v in theirs["classes"]["bottle"].items():
    assert mine["classes"]["bottle"][k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
  # Pool mode (class-agnostic) evaluation through the serialised predictor, then predict on a
  # folder: same per-image scores.
  cli.evaluate(["--exported", out, "--out", str(tmp_path / "pool"), "--config.eval.prompt_mode=pool"])
  pool = reports.read_metrics(str(tmp_path / "pool"))
  assert pool["pool_class_accuracy"] == 1.0  # one class: the pool can only pick it
  folder = shared_data / "real" / "bottle" / "test" / "broken_large"
  pred_dir = tmp_path / "pred"
  cli.predict(["--exported", out, "--out", str(pred_dir), "--heatmaps", str(folder)])
  with open(pred_dir / "predictions.json", encoding="utf-8") as f:
    preds = json.load(f)
  assert len(preds["predictions"]) == 20 and preds["threshold"] is not None
  assert all(os.path.isfile(p["heatmap"]) for p in preds["predictions"])
  with open(tmp_path / "pool" / "scores.csv", encoding="utf-8") as f:
    rows = [line.rstrip("\n").split(",") for line in f][1:]
  eval_scores = {os.path.basename(r[0]): float(r[4]) for r in rows if r[2] == "broken_large"}
  for p in preds["predictions"]:
    assert p["score"] == pytest.approx(eval_scores[os.path.basename(p["path"])], rel=1e-4)


def test_bad_exports_and_inputs_fail_clearly(trained, tmp_path):
  from onenip_jax import cli  # pylint: disable=g-import-not-at-top
  from onenip_jax.serving import predict, program  # pylint: disable=g-import-not-at-top
  out = str(tmp_path / "export")
  cli.export(["--workdir", trained, "--out", out])
  weights = os.path.join(out, program.WEIGHTS_FILE)
  data = open(weights, "rb").read()
  with open(weights, "wb") as f:
    f.write(data[: len(data) // 2])
  with pytest.raises(ValueError, match="predictor_weights.npz"):
    program.ExportedPredictor.load(out)
  meta_path = os.path.join(out, "export.json")
  meta = json.load(open(meta_path, encoding="utf-8"))
  meta["format_version"] = 99
  json.dump(meta, open(meta_path, "w", encoding="utf-8"))
  with pytest.raises(ValueError, match="format version 99"):
    program.read_meta(out)
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(ValueError, match="no images"):
    predict.find_images([str(empty)])
  with pytest.raises(FileNotFoundError, match="nope.png"):
    predict.find_images([str(tmp_path / "nope.png")])
