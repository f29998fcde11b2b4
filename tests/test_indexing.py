"""Tests of data_pipelines.indexing: layouts, merging and validation errors/warnings."""
import collections
import json
import logging
import os
import pathlib

import numpy as np
import pytest
from PIL import Image

from onenip_jax.config import base as common
from data_pipelines import image_checks, indexing

LOGGER = "data_pipelines.indexing"


def _img(path: pathlib.Path, size=(24, 20), mode="RGB", seed=0) -> pathlib.Path:
  """Writes a small random image (format from the extension)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  a = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
  Image.fromarray(a).convert(mode).save(path)
  return path


def _mask(path: pathlib.Path, size=(24, 20)) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  m = np.zeros((size[1], size[0]), np.uint8)
  m[5:10, 5:12] = 255
  Image.fromarray(m).save(path)
  return path


def _mvtec_tree(root: pathlib.Path, classes=("a", "b"), n_train=3) -> pathlib.Path:
  """<root>/<cls>/{train/good, test/good, test/crack, ground_truth/crack} with 2 defects."""
  for c in classes:
    for i in range(n_train):
      _img(root / c / "train" / "good" / f"{i:03d}.png", seed=i)
    _img(root / c / "test" / "good" / "000.png")
    for i in range(2):
      _img(root / c / "test" / "crack" / f"{i:03d}.png", seed=10 + i)
      _mask(root / c / "ground_truth" / "crack" / f"{i:03d}_mask.png")
  return root


def _cfg(**kw):
  d = common.get_base_config().data
  for k, v in kw.items():
    d[k] = v
  return d


def _warnings(caplog, text):
  return [r for r in caplog.records if r.levelno == logging.WARNING and text in r.getMessage()]


# ------------------------------------------------------------------------------------------------
# Real data


def test_real_data_counts(shared_data):
  idx = indexing.index_dataset(_cfg(root=str(shared_data / "real")))
  assert idx.classes == ("bottle", "magnetic_tile")
  train = collections.Counter(s.cls for s in idx.train)
  assert train == {"bottle": 209, "magnetic_tile": 752}
  assert all(s.label == 0 and s.defect == "good" and s.mask_path is None for s in idx.train)
  test = collections.Counter((s.cls, s.defect) for s in idx.test)
  assert test == {
      ("bottle", "good"): 20, ("bottle", "broken_large"): 20, ("bottle", "broken_small"): 22,
      ("bottle", "contamination"): 21, ("magnetic_tile", "good"): 200,
      ("magnetic_tile", "blowhole"): 115, ("magnetic_tile", "break"): 85,
      ("magnetic_tile", "crack"): 57, ("magnetic_tile", "fray"): 32,
      ("magnetic_tile", "uneven"): 103}
  masks = collections.Counter(s.cls for s in idx.test if s.mask_path)
  assert masks == {"bottle": 63, "magnetic_tile": 392}
  for s in idx.test:
    assert s.label == (s.defect != "good")
    assert (s.mask_path is not None) == bool(s.label)
    if s.mask_path:  # the mask is the one of this very image
      assert os.path.basename(s.mask_path) == pathlib.Path(s.path).stem + "_mask.png"
      assert pathlib.Path(s.mask_path).parent.name == s.defect
  assert idx.class_id("magnetic_tile") == 1
  with pytest.raises(ValueError, match="bottle"):
    idx.class_id("cable")


def test_classes_filter(shared_data):
  idx = indexing.index_dataset(_cfg(root=str(shared_data / "real"), classes=("magnetic_tile",)))
  assert idx.classes == ("magnetic_tile",)
  assert {s.cls for s in idx.train + idx.test} == {"magnetic_tile"}
  with pytest.raises(ValueError, match=r"carpet.*available.*bottle.*magnetic_tile"):
    indexing.index_dataset(_cfg(root=str(shared_data / "real"), classes=("carpet",)))


# ------------------------------------------------------------------------------------------------
# Folder layouts


def test_mvtec_extensions_and_btad(tmp_path):
  root = tmp_path / "data"
  # MVTec-like class with mixed, upper-case extensions.
  _img(root / "x" / "train" / "good" / "0.PNG")
  _img(root / "x" / "train" / "good" / "1.jpg")
  _img(root / "x" / "train" / "good" / "2.JPEG", mode="L")
  _img(root / "x" / "train" / "good" / "3.tif")
  _img(root / "x" / "train" / "good" / "4.tiff")
  (root / "x" / "train" / "good" / "notes.txt").write_text("not an image")
  _img(root / "x" / "test" / "hole" / "7.bmp")
  _mask(root / "x" / "ground_truth" / "hole" / "7_mask.bmp")
  # BTAD-like class: ok/ko folders, masks named <stem>.png.
  for i in range(2):
    _img(root / "01" / "train" / "ok" / f"{i:04d}.bmp")
  _img(root / "01" / "test" / "ok" / "0000.bmp")
  _img(root / "01" / "test" / "ko" / "0005.bmp")
  _mask(root / "01" / "ground_truth" / "ko" / "0005.png")
  idx = indexing.index_dataset(_cfg(root=str(root)))
  assert idx.classes == ("01", "x")
  assert sorted(os.path.basename(s.path) for s in idx.train if s.cls == "x") == [
      "0.PNG", "1.jpg", "2.JPEG", "3.tif", "4.tiff"]
  assert sum(s.cls == "01" for s in idx.train) == 2
  by = {(s.cls, s.defect): s for s in idx.test}
  assert by[("01", "good")].label == 0 and by[("01", "good")].mask_path is None
  assert by[("01", "ko")].label == 1
  assert by[("01", "ko")].mask_path.endswith(os.path.join("ground_truth", "ko", "0005.png"))
  assert by[("x", "hole")].mask_path.endswith("7_mask.bmp")


def test_single_class_root(tmp_path):
  root = _mvtec_tree(tmp_path / "ds", classes=("screw",))
  idx = indexing.index_dataset(_cfg(root=str(root / "screw")))
  assert idx.classes == ("screw",)
  assert len(idx.train) == 3 and len(idx.test) == 3


# ------------------------------------------------------------------------------------------------
# Meta and VisA csv


def _meta_setup(tmp_path):
  root = tmp_path / "imgs"
  for c in ("a", "b"):
    for i in range(2):
      _img(root / c / "train" / "good" / f"{i}.png", seed=i)
  _img(root / "a" / "test" / "cut" / "0.png")
  _mask(root / "a" / "ground_truth" / "cut" / "0_mask.png")
  _img(root / "a" / "test" / "good" / "1.png")
  return root


def _write_lines(path, rows):
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
  return path


def test_meta_layout(tmp_path):
  root = _meta_setup(tmp_path)
  train = _write_lines(tmp_path / "train.json", [
      {"filename": "a/train/good/0.png", "label": 0, "label_name": "good", "clsname": "a"},
      {"filename": "a/train/good/1.png", "label": 0, "label_name": "good", "clsname": "a"},
      {"filename": "a/train/good/1.png", "label": 0, "label_name": "good", "clsname": "a"},
      {"filename": "b/train/good/0.png", "label": 0, "label_name": "good"},  # no clsname
      "",  # blank lines are ignored
      {"filename": "b/train/good/1.png", "label": 0, "clsname": "b"}])
  test = _write_lines(tmp_path / "test.json", [
      {"filename": "a/test/cut/0.png", "label": 1, "label_name": "defective",
       "maskname": "a/ground_truth/cut/0_mask.png", "clsname": "a"},
      {"filename": "a/test/good/1.png", "label": 0, "label_name": "good", "maskname": "",
       "clsname": "a"}])
  idx = indexing.index_dataset(
      _cfg(layout="meta", root=str(root), meta_train=str(train), meta_test=str(test)))
  assert idx.classes == ("a", "b")
  assert [s.cls for s in idx.train] == ["a", "a", "a", "b", "b"]  # duplicate kept
  assert idx.train[1] == idx.train[2]
  assert idx.test[0].label == 1 and idx.test[0].defect == "cut"
  assert idx.test[0].mask_path == os.path.join(str(root), "a/ground_truth/cut/0_mask.png")
  assert idx.test[1].mask_path is None and idx.test[1].defect == "good"


@pytest.mark.parametrize("bad, match", [
    ("{not json", r"line 2 of .*train\.json is not JSON"),
    ('{"label": 0, "clsname": "a"}', r"line 2 of .*train\.json has no 'filename'"),
    ('{"filename": "a/train/good/9.png", "label": 0}', r"file not found: .*9\.png.*line 2 of"),
    ('{"filename": "x.png", "label": 0}', r"line 2 of .*no 'clsname'"),
])
def test_meta_errors(tmp_path, bad, match):
  root = _meta_setup(tmp_path)
  train = _write_lines(tmp_path / "train.json", [
      {"filename": "a/train/good/0.png", "label": 0, "clsname": "a"}, bad])
  with pytest.raises(ValueError, match=match):
    indexing.index_dataset(_cfg(layout="meta", root=str(root), meta_train=str(train)))


def test_visa_csv(tmp_path):
  root = tmp_path / "visa"
  rows = ["object,split,label,image,mask"]
  for c in ("candle", "pcb1"):
    for i in range(2):
      _img(root / c / "Data" / "Images" / "Normal" / f"{i:04d}.JPG", seed=i)
      rows.append(f"{c},train,normal,{c}/Data/Images/Normal/{i:04d}.JPG,")
    _img(root / c / "Data" / "Images" / "Normal" / "0100.JPG")
    rows.append(f"{c},test,normal,{c}/Data/Images/Normal/0100.JPG,")
    _img(root / c / "Data" / "Images" / "Anomaly" / "000.JPG")
    _mask(root / c / "Data" / "Masks" / "Anomaly" / "000.png")
    rows.append(f"{c},test,anomaly,{c}/Data/Images/Anomaly/000.JPG,"
                f"{c}/Data/Masks/Anomaly/000.png")
  csv_path = tmp_path / "1cls.csv"
  csv_path.write_text("\n".join(rows) + "\n")
  idx = indexing.index_dataset(_cfg(layout="visa_csv", root=str(root), visa_csv=str(csv_path)))
  assert idx.classes == ("candle", "pcb1")
  assert len(idx.train) == 4 and all(s.label == 0 for s in idx.train)
  assert [(s.cls, s.label, s.mask_path is not None) for s in idx.test] == [
      ("candle", 0, False), ("candle", 1, True), ("pcb1", 0, False), ("pcb1", 1, True)]
  csv_path.write_text(rows[0] + "\ncandle,train,weird,candle/Data/Images/Normal/0000.JPG,\n")
  with pytest.raises(ValueError, match=r"line 2 of .*1cls\.csv.*weird"):
    indexing.index_dataset(_cfg(layout="visa_csv", root=str(root), visa_csv=str(csv_path)))


# ------------------------------------------------------------------------------------------------
# Merging


def test_merge_colliding_classes(tmp_path):
  mv = _mvtec_tree(tmp_path / "mvtec", classes=("bottle", "cable"))
  other = _mvtec_tree(tmp_path / "custom", classes=("bottle", "gear"), n_train=2)
  cfg = _cfg(root=str(mv), extra=({"layout": "mvtec", "root": str(other)},))
  idx = indexing.index_dataset(cfg)
  assert idx.classes == ("mvtec_bottle", "cable", "custom_bottle", "gear")
  n = collections.Counter(s.cls for s in idx.train)
  assert n == {"mvtec_bottle": 3, "cable": 3, "custom_bottle": 2, "gear": 2}
  assert all(s.path.startswith(str(other)) for s in idx.train if s.cls == "custom_bottle")
  assert idx.class_id("gear") == 3
  assert {s.cls for s in idx.test} == set(idx.classes)
  # An explicit tag wins over the folder name.
  cfg = _cfg(root=str(mv), extra=({"root": str(other), "tag": "c2", "classes": ("bottle",)},))
  assert indexing.index_dataset(cfg).classes == ("mvtec_bottle", "cable", "c2_bottle")


# ------------------------------------------------------------------------------------------------
# Bad input


def test_unknown_layout_and_missing_root(tmp_path):
  with pytest.raises(ValueError, match=r"data\.layout 'folders'"):
    indexing.index_dataset(_cfg(layout="folders", root=str(tmp_path)))
  with pytest.raises(ValueError, match=r"data\.root .*nowhere"):
    indexing.index_dataset(_cfg(root=str(tmp_path / "nowhere")))


def test_empty_class_folder(tmp_path):
  root = _mvtec_tree(tmp_path / "d", classes=("a",))
  (root / "empty_cls").mkdir()
  with pytest.raises(ValueError, match=r"'empty_cls'.*no normal training image.*empty_cls"):
    indexing.index_dataset(_cfg(root=str(root)))
  (root / "empty_cls" / "train" / "good").mkdir(parents=True)
  with pytest.raises(ValueError, match=r"empty_cls.*train"):
    indexing.index_dataset(_cfg(root=str(root)))


def _truncate(path: pathlib.Path, keep: float = 0.5):
  data = path.read_bytes()
  path.write_bytes(data[:int(len(data) * keep)])


@pytest.mark.parametrize("name, corrupt", [
    ("002.png", _truncate),
    ("002.jpg", _truncate),
    ("002.png", lambda p: p.write_bytes(b"")),
    ("002.bmp", lambda p: _truncate(p, 0.8)),
    ("002.tif", lambda p: _truncate(p, 0.8)),
    ("002.png", lambda p: p.write_bytes(b"this is not an image at all")),
])
def test_unreadable_image(tmp_path, caplog, name, corrupt):
  root = _mvtec_tree(tmp_path / "d", classes=("a",), n_train=2)
  bad = _img(root / "a" / "train" / "good" / name, size=(64, 64), seed=5)
  corrupt(bad)
  with pytest.raises(ValueError, match=str(bad)):
    indexing.index_dataset(_cfg(root=str(root)))
  with caplog.at_level(logging.WARNING, logger=LOGGER):
    idx = indexing.index_dataset(_cfg(root=str(root), skip_bad=True))
  assert str(bad) not in [s.path for s in idx.train]
  assert len(idx.train) == 2
  assert len(_warnings(caplog, str(bad))) == 1


def test_skip_bad_can_empty_a_class(tmp_path):
  root = _mvtec_tree(tmp_path / "d", classes=("a", "b"), n_train=1)
  (root / "b" / "train" / "good" / "000.png").write_bytes(b"")
  with pytest.raises(ValueError, match=r"class 'b'.*no normal training image"):
    indexing.index_dataset(_cfg(root=str(root), skip_bad=True))


def test_mask_size_mismatch_warns_once(tmp_path, caplog):
  root = _mvtec_tree(tmp_path / "d", classes=("a",))
  for i in range(2):
    _mask(root / "a" / "ground_truth" / "crack" / f"{i:03d}_mask.png", size=(12, 10))
  with caplog.at_level(logging.WARNING, logger=LOGGER):
    idx = indexing.index_dataset(_cfg(root=str(root)))
  found = _warnings(caplog, "differ in size")
  assert len(found) == 1
  assert "000_mask.png" in found[0].getMessage() and "2 mask(s)" in found[0].getMessage()
  assert sum(s.mask_path is not None for s in idx.test) == 2


def test_anomaly_without_mask_warns_once_per_class(tmp_path, caplog):
  root = _mvtec_tree(tmp_path / "d", classes=("a", "b", "c"))
  for c in ("a", "b"):
    for m in (root / c / "ground_truth" / "crack").iterdir():
      m.unlink()
  with caplog.at_level(logging.WARNING, logger=LOGGER):
    idx = indexing.index_dataset(_cfg(root=str(root)))
  found = _warnings(caplog, "without a ground-truth mask")
  assert len(found) == 2
  assert "'a'" in found[0].getMessage() and "'b'" in found[1].getMessage()
  assert str(root / "a" / "test" / "crack" / "000.png") in found[0].getMessage()
  anomalous = [s for s in idx.test if s.label == 1]
  assert [s.mask_path is None for s in anomalous] == [True] * 4 + [False] * 2


def test_unreadable_mask(tmp_path, caplog):
  root = _mvtec_tree(tmp_path / "d", classes=("a",))
  bad = root / "a" / "ground_truth" / "crack" / "001_mask.png"
  _truncate(bad)
  with pytest.raises(ValueError, match=str(bad)):
    indexing.index_dataset(_cfg(root=str(root)))
  with caplog.at_level(logging.WARNING, logger=LOGGER):
    idx = indexing.index_dataset(_cfg(root=str(root), skip_bad=True))
  assert len(_warnings(caplog, str(bad))) == 1
  assert [s.mask_path is None for s in idx.test if s.label == 1] == [False, True]


# ------------------------------------------------------------------------------------------------
# Full decode, every damaged file named, verification cache


def _damage_middle(path: pathlib.Path, n: int = 48, seed: int = 1):
  """Overwrites `n` bytes in the middle of the file with noise: header and end marker intact."""
  data = bytearray(path.read_bytes())
  m = len(data) // 2
  data[m:m + n] = np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()
  path.write_bytes(bytes(data))


def _png_bad_crc(path: pathlib.Path):
  """Flips the checksum of the first IDAT chunk: the pixels decode, libpng (TF) refuses it."""
  data = bytearray(path.read_bytes())
  i = data.index(b"IDAT")
  length = int.from_bytes(data[i - 4:i], "big")
  data[i + 4 + length] ^= 0xFF
  path.write_bytes(bytes(data))


@pytest.mark.parametrize("name, corrupt", [
    ("002.png", _damage_middle),
    ("002.jpg", _damage_middle),
    ("002.png", _png_bad_crc),
])
def test_image_damaged_in_the_middle_fails_at_indexing(tmp_path, name, corrupt):
  root = _mvtec_tree(tmp_path / "d", classes=("a",), n_train=2)
  bad = _img(root / "a" / "train" / "good" / name, size=(96, 96), seed=5)
  corrupt(bad)
  with pytest.raises(ValueError, match=str(bad)):
    indexing.index_dataset(_cfg(root=str(root)))
  idx = indexing.index_dataset(_cfg(root=str(root), skip_bad=True))
  assert str(bad) not in [s.path for s in idx.train] and len(idx.train) == 2


def test_every_damaged_file_is_named(tmp_path):
  root = _mvtec_tree(tmp_path / "d", classes=("a",), n_train=3)
  bad = [root / "a" / "train" / "good" / "000.png", root / "a" / "test" / "crack" / "001.png",
         root / "a" / "ground_truth" / "crack" / "000_mask.png"]
  for p in bad:
    _truncate(p)
  with pytest.raises(ValueError) as e:
    indexing.index_dataset(_cfg(root=str(root)))
  assert "3 unreadable file(s)" in str(e.value)
  for p in bad:
    assert str(p) in str(e.value)


def test_verification_is_cached_by_size_and_mtime(tmp_path, monkeypatch):
  root = _mvtec_tree(tmp_path / "d", classes=("a",), n_train=3)
  cache = tmp_path / "work" / "verified_images.json"
  first = indexing.index_dataset(_cfg(root=str(root)), verify_cache=str(cache))
  assert len(json.loads(cache.read_text())["files"]) == 3 + 3 + 2   # train, test, masks
  decoded = []
  real_probe = image_checks.probe
  monkeypatch.setattr(image_checks, "probe",
                      lambda p, *a: decoded.append(p) or real_probe(p, *a))
  again = indexing.index_dataset(_cfg(root=str(root)), verify_cache=str(cache))
  assert decoded == [] and again == first
  changed = root / "a" / "train" / "good" / "001.png"
  _damage_middle(changed)  # new content and mtime: decoded again, and found damaged
  os.utime(changed, ns=(1, 1))
  with pytest.raises(ValueError, match=str(changed)):
    indexing.index_dataset(_cfg(root=str(root)), verify_cache=str(cache))
  assert decoded == [str(changed)]


def test_real_data_verifies_in_seconds(shared_data, tmp_path):
  import time  # pylint: disable=g-import-not-at-top
  t = time.perf_counter()
  indexing.index_dataset(_cfg(root=str(shared_data / "real")), verify_cache=str(tmp_path / "v.json"))
  full = time.perf_counter() - t
  t = time.perf_counter()
  indexing.index_dataset(_cfg(root=str(shared_data / "real")), verify_cache=str(tmp_path / "v.json"))
  cached = time.perf_counter() - t
  assert full < 30 and cached < full, (full, cached)
