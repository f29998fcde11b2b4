"""What the data can make the code do: output paths made from data stay in their folder, a JPEG
damaged mid-file fails indexing, onenip-predict's outputs never collide and survive a failed run,
one pixel limit, an unmeasurable test set said before training, an unselected empty class folder."""
import io
import json
import logging
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, SHARED_DATA
from data_pipelines import image_checks, indexing, pil_decode, storage
from onenip_jax.config import base
from onenip_jax.evaluation import protocol

LOGGER = "data_pipelines.indexing"
TINY = ["--config=configs/real.py:steps=2,backbone=lite0", "--config.input_size=64",
        "--config.batch_size=8", "--config.log_every_steps=1", "--config.ckpt.every_steps=100",
        "--config.eval.fusion_max_images=8", "--config.eval.heatmaps=False",
        "--config.eval.batch_size=8", "--config.calibration.holdout_fraction=0.0"]


def _img(path: pathlib.Path, size=(24, 20), seed=0) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  a = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
  Image.fromarray(a).save(path)
  return path


def _mvtec(root: pathlib.Path, classes=("a",), anomalies=True) -> pathlib.Path:
  for c in classes:
    for i in range(2):
      _img(root / c / "train" / "good" / f"{i:03d}.png", seed=i)
    _img(root / c / "test" / "good" / "000.png", seed=7)
    if anomalies:
      _img(root / c / "test" / "crack" / "000.png", seed=8)
  return root


def _cfg(**kw):
  d = base.get_base_config().data
  for k, v in kw.items():
    d[k] = v
  return d


def _files_under(folder) -> set:
  return {os.path.join(d, f) for d, _, files in os.walk(folder) for f in files}


# ------------------------------------------------------------------------------------------------
# Paths made from data stay inside their output folder


def _meta_dataset(tmp_path, cls: str) -> tuple:
  root = tmp_path / "data"
  for name in ("good/000.png", "good/001.png"):
    _img(root / "img" / name)
  _img(root / "img" / "bad" / "000.png", seed=3)
  lines = [{"filename": "img/good/000.png", "label": 0, "clsname": cls},
           {"filename": "img/good/001.png", "label": 0, "clsname": cls}]
  test = [{"filename": "img/good/001.png", "label": 0, "clsname": cls},
          {"filename": "img/bad/000.png", "label": 1, "clsname": cls}]
  meta_train, meta_test = tmp_path / "train.json", tmp_path / "test.json"
  meta_train.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
  meta_test.write_text("\n".join(json.dumps(x) for x in test) + "\n")
  return root, meta_train, meta_test


@pytest.mark.parametrize("cls", ["../../../../x", "/abs/x", "..", "a\\b"])
def test_class_names_that_leave_the_output_folder_fail_at_indexing(tmp_path, cls):
  root, meta_train, meta_test = _meta_dataset(tmp_path, cls)
  with pytest.raises(ValueError) as e:
    indexing.index_dataset(_cfg(layout="meta", root=str(root), meta_train=str(meta_train),
                                meta_test=str(meta_test)))
  assert f"line 1 of {meta_train}" in str(e.value) and repr(cls) in str(e.value)


def test_visa_object_that_leaves_the_output_folder_fails_at_indexing(tmp_path):
  root = tmp_path / "visa"
  _img(root / "a" / "0.png")
  _img(root / "a" / "1.png", seed=1)
  csv_file = root / "1cls.csv"
  csv_file.write_text("object,split,label,image,mask\n../up,train,normal,a/0.png,\n"
                      "../up,test,anomaly,a/1.png,\n")
  with pytest.raises(ValueError, match=rf"line 2 of {csv_file}.*'\.\./up'"):
    indexing.index_dataset(_cfg(layout="visa_csv", root=str(root), visa_csv=str(csv_file)))


def test_training_on_an_escaping_class_name_writes_nothing_outside_the_workdir(tmp_path):
  root, meta_train, meta_test = _meta_dataset(tmp_path / "in", "../../../../x")
  before = _files_under(tmp_path)
  workdir = tmp_path / "a" / "b" / "run"
  out = subprocess.run(
      [sys.executable, "-m", "onenip_jax.cli", "train", f"--workdir={workdir}", *TINY,
       "--config.data.layout=meta", f"--config.data.root={root}", "--config.data.classes=()",
       f"--config.data.meta_train={meta_train}", f"--config.data.meta_test={meta_test}",
       "--config.eval.heatmaps=True"],
      cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
  assert out.returncode != 0
  assert "'../../../../x'" in out.stderr and str(meta_train) in out.stderr, out.stderr[-2000:]
  assert {p for p in _files_under(tmp_path) - before if not p.startswith(str(workdir))} == set()


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "/abs/x", "a/b", "a\\b"])
def test_join_inside_refuses_names_that_leave_the_folder(name):
  with pytest.raises(ValueError, match="class name .* cannot be a file or folder name"):
    storage.join_inside("/out", "heatmaps", name, what="class name")
  assert storage.join_inside("/out", "heatmaps", "a..b", "x.png") == "/out/heatmaps/a..b/x.png"


def test_report_heatmaps_refuse_a_class_name_that_leaves_the_folder(tmp_path):
  cfg = base.get_base_config()
  cfg.input_size, cfg.eval.heatmaps = 16, True
  samples = [indexing.Sample(f"/d/{i}.png", "../../x", i % 2, None, "crack" if i % 2 else "good")
             for i in range(2)]
  maps = np.random.default_rng(0).random((2, 16, 16)).astype(np.float32)
  builder = protocol.ReportBuilder(cfg, str(tmp_path / "eval"))
  with pytest.raises(ValueError, match=r"class name '\.\./\.\./x'"):
    builder.add_class("../../x", samples, maps, maps.max(axis=(1, 2)), np.zeros_like(maps, bool),
                      np.zeros(2, bool), load_image=lambda p: np.zeros((16, 16, 3), np.uint8))
  assert _files_under(tmp_path) == set()


def test_heatmaps_of_one_stem_in_two_formats_do_not_overwrite_each_other(tmp_path):
  cfg = base.get_base_config()
  cfg.input_size, cfg.eval.heatmaps = 16, True
  samples = [indexing.Sample(p, "a", 1, None, "crack") for p in ("/d/x.png", "/d/x.jpg")]
  maps = np.random.default_rng(0).random((2, 16, 16)).astype(np.float32)
  builder = protocol.ReportBuilder(cfg, str(tmp_path))
  builder.add_class("a", samples, maps, maps.max(axis=(1, 2)), np.zeros_like(maps, bool),
                    np.zeros(2, bool), load_image=lambda p: np.zeros((16, 16, 3), np.uint8))
  names = sorted(os.listdir(tmp_path / "heatmaps" / "a"))
  assert len([n for n in names if n.startswith("crack_x")]) == 2, names


# ------------------------------------------------------------------------------------------------
# A JPEG damaged in the middle


def _gradient_jpeg(path: pathlib.Path) -> pathlib.Path:
  """A smooth 256 px JPEG: 64 noise bytes in its middle garble rows but no TF/PIL decode fails."""
  path.parent.mkdir(parents=True, exist_ok=True)
  y, x = np.mgrid[0:256, 0:256]
  noise = np.random.default_rng(0).normal(0, 20, (256, 256, 3))
  a = (np.stack([x, y, (x + y) // 2], -1) + noise).clip(0, 255).astype(np.uint8)
  Image.fromarray(a).save(path, "JPEG", quality=90)
  return path


def _noise_in_the_middle(path: pathlib.Path, seed: int = 0) -> None:
  data = bytearray(path.read_bytes())
  m = len(data) // 2
  data[m:m + 64] = np.random.default_rng(seed).integers(0, 256, 64, dtype=np.uint8).tobytes()
  path.write_bytes(bytes(data))


@pytest.mark.parametrize("source", ["generated", "magnetic_tile"])
def test_jpeg_with_64_noise_bytes_in_the_middle_fails_indexing(tmp_path, caplog, source):
  root = _mvtec(tmp_path / "d")
  bad = root / "a" / "train" / "good" / "002.jpg"
  if source == "generated":
    _gradient_jpeg(bad)
  else:
    real = SHARED_DATA / "real" / "magnetic_tile" / "test" / "uneven" / "060.jpg"
    if not real.is_file():
      pytest.skip(f"real data not found at {real}")
    bad.write_bytes(real.read_bytes())
  _noise_in_the_middle(bad)
  from data_pipelines.tf_setup import import_tensorflow  # pylint: disable=g-import-not-at-top
  assert import_tensorflow().io.decode_jpeg(bad.read_bytes()).shape[0] > 0  # TF decodes it
  with pytest.raises(ValueError, match=rf"{bad}: Corrupt JPEG data"):
    indexing.index_dataset(_cfg(root=str(root)))
  with caplog.at_level(logging.WARNING, logger=LOGGER):
    idx = indexing.index_dataset(_cfg(root=str(root), skip_bad=True))
  assert str(bad) not in [s.path for s in idx.train] and len(idx.train) == 2
  assert any("skipped 1 unreadable file(s)" in r.getMessage() for r in caplog.records)


def test_a_cache_of_the_lenient_check_does_not_hide_a_damaged_jpeg(tmp_path):
  root = _mvtec(tmp_path / "d")
  bad = _gradient_jpeg(root / "a" / "train" / "good" / "002.jpg")
  _noise_in_the_middle(bad)
  cache = tmp_path / "verified_images.json"
  size, mtime = storage.stat(str(bad))
  cache.write_text(json.dumps({"version": 1, "files": {str(bad): [size, mtime, [256, 256]]}}))
  with pytest.raises(ValueError, match=str(bad)):
    indexing.index_dataset(_cfg(root=str(root)), verify_cache=str(cache))


def test_intact_real_jpegs_pass_the_strict_check(shared_data):
  jpegs = sorted((shared_data / "real" / "magnetic_tile").rglob("*.jpg"))[:200]
  assert jpegs and all(isinstance(image_checks.probe(str(p)), tuple) for p in jpegs)


# ------------------------------------------------------------------------------------------------
# onenip-predict: distinct outputs, and a failed run changes nothing


class _FakeScorer:
  """The scorer interface of `predict`: every map is filled with the image's score, the mean of
  its pixels; `fail_on` (a file name) raises while scoring it."""
  thresholds, fusion_c, step, backend, scoring, fail_on = None, 1.0, 1, "fake", {}, None

  def __init__(self, *_):
    pass

  def load(self, path):
    if os.path.basename(path) == self.fail_on:
      raise RuntimeError(f"scoring {path} failed")
    return np.asarray(Image.open(path).convert("RGB").resize((8, 8)))

  def __call__(self, raw):
    scores = raw.reshape(len(raw), -1).mean(axis=1).astype(np.float32)
    return np.broadcast_to(scores[:, None, None], (len(raw), 8, 8)).copy(), scores, ["a"] * len(raw)


def _predict(monkeypatch, out, *inputs):
  from onenip_jax import cli  # pylint: disable=g-import-not-at-top
  from onenip_jax.serving import predict  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(predict, "ExportedScorer", _FakeScorer)
  cli.predict(["--exported", "E", "--out", str(out), "--save-maps", "--heatmaps",
               "--batch-size=1", *map(str, inputs)])


def test_predict_outputs_of_colliding_names_are_distinct(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  for i, name in enumerate(["in/img1.png", "in/img1.jpg", "in/sub/x.png", "in/sub_x.png"]):
    _img(tmp_path / name, seed=i)
  _predict(monkeypatch, "out", "in", "./in/img1.png")  # a file given twice is scored once
  preds = json.loads((tmp_path / "out" / "predictions.json").read_text())["predictions"]
  assert len(preds) == 4
  assert len({p["map"] for p in preds}) == 4 and len({p["heatmap"] for p in preds}) == 4
  for p in preds:
    assert float(np.load(p["map"])[0, 0]) == pytest.approx(p["score"]) and os.path.isfile(
        p["heatmap"])
  assert sorted(os.listdir(tmp_path / "out" / "maps")) == [
      "in%2Fimg1.jpg.npy", "in%2Fimg1.png.npy", "in%2Fsub%2Fx.png.npy", "in%2Fsub_x.png.npy"]


def test_a_failed_predict_run_leaves_the_previous_outputs_as_they_were(tmp_path, monkeypatch,
                                                                       capsys):
  monkeypatch.chdir(tmp_path)
  for i in range(3):
    _img(tmp_path / "in" / f"{i}.png", seed=i)
  _predict(monkeypatch, "out", "in")
  before = {p: pathlib.Path(p).read_bytes() for p in _files_under(tmp_path / "out")}
  for i in range(3):  # new pixels, so new scores and maps
    _img(tmp_path / "in" / f"{i}.png", seed=10 + i)
  monkeypatch.setattr(_FakeScorer, "fail_on", "2.png")
  with pytest.raises(SystemExit) as stop:  # an error naming the file: one line, exit code 2
    _predict(monkeypatch, "out", "in")
  assert stop.value.code == 2 and "2.png" in capsys.readouterr().err
  after = {p: pathlib.Path(p).read_bytes() for p in _files_under(tmp_path / "out")}
  assert after == before and len(before) == 2 + 3 + 3
  assert not [n for n in os.listdir(tmp_path / "out") if n.startswith(".")]


# ------------------------------------------------------------------------------------------------
# One pixel limit


def test_pixel_limit_has_one_home_and_a_config_setting(tmp_path):
  assert base.get_base_config().data.max_pixels == pil_decode.MAX_PIXELS
  root = _mvtec(tmp_path / "d")
  big = _img(root / "a" / "train" / "good" / "002.png", size=(30, 20))
  cache = tmp_path / "v.json"
  assert len(indexing.index_dataset(_cfg(root=str(root)), verify_cache=str(cache)).train) == 3
  for verify_cache in (None, str(cache)):  # decoded, and remembered from the cache
    with pytest.raises(ValueError, match=rf"{big}: image of 30x20 = 600 pixels is over the limit "
                       r"of 599 pixels \(data\.max_pixels\)"):
      indexing.index_dataset(_cfg(root=str(root), max_pixels=599), verify_cache=verify_cache)
  idx = indexing.index_dataset(_cfg(root=str(root), max_pixels=599, skip_bad=True))
  assert str(big) not in [s.path for s in idx.train]


def test_predict_decoder_applies_the_same_limit(monkeypatch):
  buf = io.BytesIO()
  Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(buf, "PNG")
  monkeypatch.setattr(pil_decode, "MAX_PIXELS", 599)
  with pytest.raises(ValueError, match="30x20 = 600 pixels is over the limit of 599"):
    pil_decode.check_pixels(pil_decode.image_size(buf.getvalue()), pil_decode.MAX_PIXELS)
  with pytest.raises(ValueError, match="over the limit of 599"):
    pil_decode.pil_decode(buf.getvalue(), 3, 599)
  assert pil_decode.pil_decode(buf.getvalue(), 3, None).shape == (20, 30, 3)


# ------------------------------------------------------------------------------------------------
# A test set that cannot measure a class; an empty folder of an unselected class


def test_test_set_gaps_name_each_class(tmp_path):
  root = _mvtec(tmp_path / "d", classes=("a",))
  _mvtec(root, classes=("b",), anomalies=False)
  (root / "c" / "train" / "good").mkdir(parents=True)
  _img(root / "c" / "train" / "good" / "000.png")
  idx = indexing.index_dataset(_cfg(root=str(root)))
  assert indexing.test_set_gaps(idx.classes, idx.test) == [
      "class 'b' has no anomalous test images (1 normal): its AUROC, AP and F1 are undefined ('-')",
      "class 'c' has no test images: it gets no metrics"]


def test_training_without_anomalous_test_images_says_so_first_and_in_the_table(shared_data,
                                                                               tmp_path):
  root = tmp_path / "data" / "bottle"
  for sub in ("train/good", "test/good"):
    (root / sub).mkdir(parents=True)
    for p in sorted((shared_data / "real" / "bottle" / sub).iterdir())[:8]:
      (root / sub / p.name).symlink_to(p)
  workdir = tmp_path / "run"
  out = subprocess.run(
      [sys.executable, "-m", "onenip_jax.cli", "train", f"--workdir={workdir}", *TINY,
       f"--config.data.root={root.parent}", "--config.data.classes=('bottle',)"],
      cwd=REPO, capture_output=True, text=True, timeout=900, check=False)
  log = out.stdout + out.stderr
  assert out.returncode == 0, log[-3000:]
  warned = log.find("the test set cannot measure 1 of 1 class(es)")
  assert 0 <= warned < log.find("/2 ["), log[-3000:]
  md = (workdir / "eval" / "step_2" / "metrics.md").read_text()
  assert "class 'bottle' has no anomalous test images (8 normal)" in md
  assert json.loads((workdir / "eval" / "step_2" / "metrics.json").read_text())["notes"]


def test_an_empty_folder_of_an_unselected_class_does_not_block_the_run(tmp_path):
  root = _mvtec(tmp_path / "d", classes=("a",))
  (root / "empty").mkdir()
  idx = indexing.index_dataset(_cfg(root=str(root), classes=("a",)))
  assert idx.classes == ("a",)
  with pytest.raises(ValueError, match=r"'empty'.*no normal training image"):
    indexing.index_dataset(_cfg(root=str(root)))
  with pytest.raises(ValueError, match=r"data\.classes \['nope'\] not found .*available: \['a', "
                     r"'empty'\]"):
    indexing.index_dataset(_cfg(root=str(root), classes=("nope",)))
