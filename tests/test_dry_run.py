"""`onenip-train --dry_run`: prints the run, names every problem found in one line each (exit code
2), and trains and writes nothing. Subprocesses on a tiny generated MVTec-layout folder."""
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from conftest import REPO
from onenip_jax.config import loading
from onenip_jax.training import checkpoints, workdir_lock

CONFIG = "configs/demo.py"


def _img(path: pathlib.Path, seed: int) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  a = np.random.default_rng(seed).integers(0, 256, (20, 24, 3), dtype=np.uint8)
  Image.fromarray(a).save(path)


@pytest.fixture(name="data")
def _data(tmp_path) -> pathlib.Path:
  """Classes a (3 normal training images) and b (2), each with one good and one bad test image."""
  root = tmp_path / "data"
  for c, n in (("a", 3), ("b", 2)):
    for i in range(n):
      _img(root / c / "train" / "good" / f"{i:03d}.png", seed=i)
    _img(root / c / "test" / "good" / "000.png", seed=7)
    _img(root / c / "test" / "crack" / "000.png", seed=8)
  return root


def _overrides(data) -> list:
  return ["--config.data.layout=mvtec", f"--config.data.root={data}", "--config.total_steps=5"]


def _dry_run(workdir, data, *extra) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "onenip_jax.cli", "train", f"--config={CONFIG}",
                         f"--workdir={workdir}", "--dry_run", *_overrides(data), *extra],
                        cwd=REPO, capture_output=True, text=True, timeout=300, check=False)


def _problems(out: subprocess.CompletedProcess) -> list:
  """The `problem:` lines; asserts exit code 2 and the one summary line last."""
  assert out.returncode == 2, out.stdout[-3000:] + out.stderr[-3000:]
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  lines = out.stderr.strip().splitlines()
  problems = [ln for ln in lines if ln.startswith("problem: ")]
  assert lines[-1] == (f"onenip-train: error: dry run found {len(problems)} problem(s) ("
                       + ", ".join(dict.fromkeys(p.split(":")[1].strip() for p in problems))
                       + "); fix them before training"), lines[-3:]
  return problems


def _files(folder) -> set:
  return {os.path.join(d, f) for d, _, files in os.walk(folder) for f in files}


def test_all_well_prints_the_run_and_creates_nothing(data, tmp_path):
  workdir = tmp_path / "runs" / "w"
  before = _files(tmp_path)
  out = _dry_run(workdir, data)
  assert out.returncode == 0, out.stderr[-3000:]
  stdout = out.stdout.splitlines()
  assert f"  data.root={str(data)!r}" in stdout and "  batch_size=8" in stdout
  assert "process 0 of 1: 8 local of 8 devices" in out.stdout
  assert "  2 class(es); images: train, holdout, test normal, test anomalous" in stdout
  rows = {ln.split()[0]: [int(n) for n in ln.split()[1:]] for ln in stdout
          if ln.split() and ln.split()[0] in ("a", "b", "total")}
  assert rows == {"a": [2, 1, 1, 1], "b": [1, 1, 1, 1], "total": [3, 2, 2, 2]}, stdout
  assert ("steps: 5 (1 per epoch, 5 epochs); global batch 8: 8 per process, 1 per device "
          "(1 process(es), 8 device(s))") in stdout
  assert "weights: EfficientNet-lite0 from the packaged ImageNet weights: loaded" in stdout
  assert f"workdir: {workdir} will be created (in {tmp_path})" in stdout
  assert stdout[-1] == "dry run: no problem found"
  assert not (tmp_path / "runs").exists() and _files(tmp_path) == before


def test_missing_data_root(data, tmp_path):
  problems = _problems(_dry_run(tmp_path / "w", data, "--config.data.root=/no/such/root"))
  assert problems == ["problem: data: data.root '/no/such/root' does not exist or is not a folder"]


def test_damaged_image(data, tmp_path):
  damaged = data / "b" / "test" / "crack" / "000.png"
  damaged.write_bytes(damaged.read_bytes()[:60])
  out = _dry_run(tmp_path / "w", data)
  problems = _problems(out)
  assert len(problems) == 1 and problems[0].startswith(
      f"problem: data: mvtec dataset {data}: 1 unreadable file(s)"), problems
  assert any(ln.startswith(f"    unreadable image file {damaged}: ")
             for ln in out.stderr.splitlines()), out.stderr


def test_missing_weights(data, tmp_path):
  problems = _problems(_dry_run(tmp_path / "w", data, "--config.backbone.name=b4",
                                "--config.backbone.weights=/no/such.msgpack"))
  assert problems == ["problem: weights: backbone weights not found: /no/such.msgpack "
                      "(backbone.weights)"]


def test_workdir_that_cannot_be_created_and_every_problem_is_named(data, tmp_path):
  afile = tmp_path / "afile"
  afile.write_text("")
  workdir = afile / "sub"
  problems = _problems(_dry_run(workdir, data))
  assert problems == [f"problem: workdir: cannot create the work directory {workdir}: {afile} "
                      "is not a folder"]
  problems = _problems(_dry_run(workdir, data, "--config.data.root=/no/such/root",
                                "--config.backbone.weights=/no/such.msgpack",
                                "--config.batch_size=0"))
  assert [p.split(":")[1].strip() for p in problems] == ["config", "data", "weights", "workdir"]
  assert problems[0] == "problem: config: config.batch_size=0: must be an integer >= 1"


def _checkpoint(workdir, data, *extra) -> None:
  """A checkpoint of step 1 of the config with `extra` overrides (a stand-in state)."""
  cfg = loading.load_config(str(REPO / CONFIG), [*_overrides(data), *extra])
  cfg.data.root = str(data)
  manager = checkpoints.make_manager(str(workdir), cfg)
  manager.save(1, args=ocp.args.Composite(
      state=ocp.args.StandardSave({"w": np.zeros(3, np.float32)}),
      config=ocp.args.JsonSave(json.loads(cfg.to_json_best_effort()))))
  manager.wait_until_finished()
  manager.close()


def test_incompatible_existing_run(data, tmp_path):
  workdir = tmp_path / "w"
  _checkpoint(workdir, data, "--config.model.hidden_dim=128")
  before = {p: os.stat(p).st_mtime_ns for p in _files(workdir)}
  out = _dry_run(workdir, data)
  problems = _problems(out)
  assert problems == [f"problem: existing run: cannot resume {workdir} from step 1: the config "
                      "differs from the one stored with the checkpoint in 1 key(s) that shape the "
                      "model or the data stream:"], problems
  assert "    model.hidden_dim: 128 (stored) -> 256 (now)" in out.stderr.splitlines()
  assert {p: os.stat(p).st_mtime_ns for p in _files(workdir)} == before


def test_compatible_existing_run_of_a_busy_workdir(data, tmp_path):
  workdir = tmp_path / "w"
  _checkpoint(workdir, data, "--config.total_steps=3")
  record = {"host": socket.gethostname(), "pid": os.getpid(), "started_unix": time.time(),
            "heartbeat_unix": time.time(), "token": "someone-else"}
  lock = workdir / workdir_lock.LOCK_FILE
  lock.write_text(json.dumps(record))
  before = {p: os.stat(p).st_mtime_ns for p in _files(workdir)}
  out = _dry_run(workdir, data)
  problems = _problems(out)
  assert problems == [f"problem: workdir: work directory {workdir} is in use by another training: "
                      f"{workdir_lock.describe(record)}; lock file {lock}"]
  assert "  checkpoint step 1: resumes with this config (changed: total_steps)" in out.stdout
  assert {p: os.stat(p).st_mtime_ns for p in _files(workdir)} == before
