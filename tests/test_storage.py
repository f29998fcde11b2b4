"""The path layer (`data_pipelines.storage`): local, TensorFlow's `ram://` and an emulated `gs://`.

The pipeline test runs train -> eval -> export -> predict with the data root, work directory,
export and predictions all on `ram://` and checks every metric and score equals a local run's.
"""
import io
import json
import os
import subprocess
import sys
import uuid

import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from data_pipelines import storage

CLASSES = ("alpha", "beta")


def test_local_paths_never_import_tensorflow(tmp_path):
  code = ("import sys; from data_pipelines import storage as s; p = sys.argv[1] + '/a/b.txt'; "
          "s.atomic_write(p, 'hi'); assert s.read_text(p) == 'hi' and s.listdir(sys.argv[1]) == ['a']; "
          "s.move_dir(sys.argv[1] + '/a', sys.argv[1] + '/c'); assert s.isfile(sys.argv[1] + '/c/b.txt'); "
          "assert 'tensorflow' not in sys.modules, 'tensorflow imported'")
  env = dict(os.environ, PYTHONPATH=str(REPO))
  proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("root", ["local", "ram"])
def test_atomic_write_move_dir_and_listing(root, tmp_path):
  base = str(tmp_path) if root == "local" else f"ram://storage-{uuid.uuid4().hex}"
  storage.atomic_write(storage.join(base, "a", "x.bin"), b"\x00\x01")
  storage.atomic_write(storage.join(base, "a", "x.bin"), b"\x02")      # replaces
  storage.atomic_write(storage.join(base, "a", "sub", "y.txt"), "é")
  assert storage.read_bytes(storage.join(base, "a", "x.bin")) == b"\x02"
  assert sorted(storage.listdir(storage.join(base, "a"))) == ["sub", "x.bin"]   # no temporary left
  assert storage.isdir(storage.join(base, "a", "sub")) and not storage.isdir(storage.join(base, "a", "x.bin"))
  assert storage.isfile(storage.join(base, "a", "x.bin")) and not storage.isfile(storage.join(base, "a"))
  assert storage.stat(storage.join(base, "a", "x.bin"))[0] == 1
  storage.atomic_write(storage.join(base, "b", "old.txt"), "old")
  storage.move_dir(storage.join(base, "a"), storage.join(base, "b"))           # replaces b
  assert not storage.exists(storage.join(base, "a"))
  assert sorted(f for _, _, files in storage.walk(storage.join(base, "b")) for f in files) == ["x.bin", "y.txt"]
  assert storage.read_text(storage.join(base, "b", "sub", "y.txt")) == "é"
  storage.rmtree(base)
  assert not storage.exists(base)


def test_normpath_and_abspath_keep_urls():
  assert storage.normpath("gs://bucket/a/../b/") == "gs://bucket/b"
  assert storage.abspath("ram://x/y") == "ram://x/y"
  assert storage.scheme("gs://b/x") == "gs" and storage.scheme("/tmp/x") == ""


# ------------------------------------------------------------------------------------------------
# train -> eval -> export -> predict on ram:// equals local


def _write_dataset(root: str, rng) -> None:
  """A tiny mvtec-layout dataset (2 classes, 8 train / 2 good / 2 defect test images each)."""
  for ci, cls in enumerate(CLASSES):
    for split, defect, n in (("train", "good", 8), ("test", "good", 2), ("test", "crack", 2)):
      for i in range(n):
        base = np.full((72, 72, 3), (60, 120, 180) if ci == 0 else (200, 90, 40), np.float64)
        img = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
        if defect == "crack":
          m = np.zeros((72, 72), np.uint8)
          m[20:40, 20:30 + 5 * i] = 255
          img[m > 0] = 255 - img[m > 0]
          _save(storage.join(root, cls, "ground_truth", defect, f"{i:03d}_mask.png"), m)
        _save(storage.join(root, cls, split, defect, f"{i:03d}.png"), img)


def _save(path: str, array: np.ndarray) -> None:
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format="PNG")
  storage.atomic_write(path, buf.getvalue())


def _cfg(data_root: str):
  from onenip_jax.config import base as common  # pylint: disable=g-import-not-at-top
  c = common.get_base_config()
  common.set_backbone(c, "lite0")
  c.input_size, c.batch_size, c.total_steps = 64, 8, 3
  c.data.layout, c.data.root, c.data.classes, c.data.textures = "mvtec", data_root, CLASSES, ""
  c.eval.every_epochs, c.eval.batch_size, c.eval.fusion_max_images = 0, 8, 16
  c.eval.heatmaps, c.eval.max_heatmaps_per_class = True, 2
  c.ckpt.every_steps, c.log_every_steps = 2, 1   # a periodic save, the final one, its replace
  c.calibration.holdout_fraction = 0.0   # (calibration storage: tests/test_calibration.py)
  return c


def _pipeline(base: str, data_root: str) -> dict:
  """train (+ its final eval) -> export -> predict under `base`; returns what they wrote."""
  from onenip_jax import cli, train  # pylint: disable=g-import-not-at-top
  workdir, exp, preds = (storage.join(base, n) for n in ("work", "export", "preds"))
  train.train_and_evaluate(_cfg(data_root), workdir)
  cli.export(["--workdir", workdir, "--out", exp])
  cli.predict(["--exported", exp, "--out", preds, "--heatmaps", "--save-maps",
                storage.join(data_root, "alpha", "test")])
  read = lambda *p: json.loads(storage.read_text(storage.join(*p)))
  predictions = read(preds, "predictions.json")["predictions"]
  name = lambda r: "/".join(r["path"].split("/")[-2:])   # <defect>/<file>, the same in both runs
  return {"metrics": read(workdir, "eval", "step_3", "metrics.json"),
          "steps": sorted(storage.listdir(storage.join(workdir, "checkpoints"))),
          "heatmaps": sorted(storage.listdir(storage.join(workdir, "eval", "step_3", "heatmaps",
                                                          "alpha"))),
          "thresholds": read(exp, "export.json")["thresholds"],
          "scores": {name(r): r["score"] for r in predictions},
          "maps": {name(r): np.load(io.BytesIO(storage.read_bytes(r["map"]))) for r in predictions}}


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
  """(local data root, the pipeline's results on local paths)."""
  base = tmp_path_factory.mktemp("storage")
  _write_dataset(str(base / "data"), np.random.default_rng(0))
  return str(base / "data"), _pipeline(str(base / "run"), str(base / "data"))


def _check_equal(remote: dict, local: dict) -> None:
  assert remote["steps"] == local["steps"] == ["2", "3"]
  assert remote["heatmaps"] == local["heatmaps"] and "contact_sheet.png" in local["heatmaps"]
  for part in ("classes", "mean", "fusion_c"):
    assert remote["metrics"][part] == local["metrics"][part], part
  assert remote["thresholds"] == local["thresholds"]
  assert remote["scores"] == local["scores"] and len(local["scores"]) == 4
  for name, m in local["maps"].items():
    np.testing.assert_array_equal(remote["maps"][name], m)


def test_ram_workdir_equals_local(local_run, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)     # a stray local write to "ram:/..." would land here
  ram = f"ram://onenip-{uuid.uuid4().hex}"
  storage.copytree(local_run[0], storage.join(ram, "data"))
  _check_equal(_pipeline(ram, storage.join(ram, "data")), local_run[1])
  assert not os.path.exists(tmp_path / "ram:"), "something wrote ram:// paths to the local disk"
  storage.rmtree(ram)


@pytest.mark.skipif(not os.environ.get("ONENIP_TEST_GCS_DIR"),
                    reason="opt-in: ONENIP_TEST_GCS_DIR=gs://bucket/prefix with credentials (no "
                           "emulator: TensorFlow's GCS file system has a fixed endpoint)")
def test_gcs_workdir_equals_local(local_run):
  base = storage.join(os.environ["ONENIP_TEST_GCS_DIR"], f"onenip-test-{uuid.uuid4().hex}")
  storage.copytree(local_run[0], storage.join(base, "data"))
  try:
    _check_equal(_pipeline(base, storage.join(base, "data")), local_run[1])
  finally:
    storage.rmtree(base)
