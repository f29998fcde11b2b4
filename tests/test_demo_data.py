"""Tests for data_pipelines/demo_data.py: MVTec layout, counts, exact binary masks, reuse."""
import json
import os
import time

import numpy as np
import pytest
from PIL import Image

from data_pipelines import demo_data as D

SMALL = dict(size=128, num_train=5, num_test_good=3, num_test_bad=7, seed=3)


def _files(root):
  out = []
  for dirpath, _, names in os.walk(root):
    out += [os.path.relpath(os.path.join(dirpath, n), root) for n in names]
  return sorted(out)


@pytest.fixture(scope="module")
def default_root(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("demo") / "default")
  start = time.time()
  assert D.make_demo_dataset(root) == root
  return root, time.time() - start


def test_default_layout_and_counts(default_root):
  root, seconds = default_root
  assert seconds < 60, seconds       # generation takes seconds (a few s on 2 busy CPU cores)
  assert sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))) == list(D.DEMO_CLASSES)
  for cls in D.DEMO_CLASSES:
    c = os.path.join(root, cls)
    assert sorted(os.listdir(c)) == ["ground_truth", "test", "train"]
    assert len(os.listdir(os.path.join(c, "train", "good"))) == 32
    assert sorted(os.listdir(os.path.join(c, "test"))) == sorted(["good", *D.DEFECT_TYPES])
    assert len(os.listdir(os.path.join(c, "test", "good"))) == 10
    assert sum(len(os.listdir(os.path.join(c, "test", d))) for d in D.DEFECT_TYPES) == 12
    assert sorted(os.listdir(os.path.join(c, "ground_truth"))) == sorted(D.DEFECT_TYPES)
    for d in D.DEFECT_TYPES:
      stems = sorted(os.path.splitext(f)[0] for f in os.listdir(os.path.join(c, "test", d)))
      masks = sorted(os.listdir(os.path.join(c, "ground_truth", d)))
      assert masks == [s + "_mask.png" for s in stems]
  meta = json.load(open(os.path.join(root, D.META_FILE), encoding="utf-8"))
  assert meta["size"] == 256 and meta["classes"] == list(D.DEMO_CLASSES)


def test_images_and_masks(default_root):
  root, _ = default_root
  for cls in D.DEMO_CLASSES:
    for split in ("train/good", "test/good"):
      for f in os.listdir(os.path.join(root, cls, split)):
        a = np.asarray(Image.open(os.path.join(root, cls, split, f)))
        assert a.shape == (256, 256, 3) and a.dtype == np.uint8 and a.std() > 10
    for d in D.DEFECT_TYPES:
      for f in os.listdir(os.path.join(root, cls, "test", d)):
        img = np.asarray(Image.open(os.path.join(root, cls, "test", d, f)))
        m = np.asarray(Image.open(os.path.join(root, cls, "ground_truth", d, f[:-4] + "_mask.png")))
        assert img.shape == (256, 256, 3) and m.shape == (256, 256) and m.dtype == np.uint8
        assert set(np.unique(m)) == {0, 255}, (cls, d, f)
        area = (m > 0).mean()
        assert 16 / 256 ** 2 <= area < 0.2, (cls, d, f, area)


@pytest.mark.parametrize("defect", D.DEFECT_TYPES)
def test_defects_change_exactly_the_masked_pixels(default_root, defect):
  root, _ = default_root
  for cls in D.DEMO_CLASSES:
    good = np.asarray(Image.open(os.path.join(root, cls, "test", "good", "000.png")))
    for s in range(8):
      out, mask = D.add_defect(good, defect, np.random.default_rng(s))
      assert out.dtype == np.uint8 and out.shape == good.shape and mask.shape == good.shape[:2]
      np.testing.assert_array_equal(out[~mask], good[~mask])
      diff = np.abs(out.astype(int) - good.astype(int)).max(-1)[mask]
      assert (diff > 0).mean() > 0.8, (cls, defect, s)
      assert diff.mean() > 20, (cls, defect, s, diff.mean())   # clearly visible, not a faint change
      assert 16 <= mask.sum() < 0.2 * mask.size


def test_reuse_and_regenerate(tmp_path):
  root = str(tmp_path / "ds")
  D.make_demo_dataset(root, **SMALL)
  files = _files(root)
  assert len(files) == 3 * (5 + 3 + 2 * 7) + 1
  stamps = {f: os.stat(os.path.join(root, f)).st_mtime_ns for f in files}
  start = time.time()
  assert D.make_demo_dataset(root, **SMALL) == root
  assert time.time() - start < 2.0
  assert {f: os.stat(os.path.join(root, f)).st_mtime_ns for f in _files(root)} == stamps
  # different parameters: regenerated, no stale files left behind
  D.make_demo_dataset(root, **{**SMALL, "num_train": 2})
  assert len(os.listdir(os.path.join(root, "brick", "train", "good"))) == 2
  assert json.load(open(os.path.join(root, D.META_FILE), encoding="utf-8"))["num_train"] == 2
  # an incomplete dataset (file deleted) is rebuilt
  os.remove(os.path.join(root, "grass", "test", "good", "000.png"))
  D.make_demo_dataset(root, **{**SMALL, "num_train": 2})
  assert os.path.isfile(os.path.join(root, "grass", "test", "good", "000.png"))
  assert not [n for n in os.listdir(tmp_path) if n != "ds"]   # no temporary folders left


def test_deterministic(tmp_path):
  a = D.make_demo_dataset(str(tmp_path / "a"), **SMALL)
  b = D.make_demo_dataset(str(tmp_path / "b"), **SMALL)
  c = D.make_demo_dataset(str(tmp_path / "c"), **{**SMALL, "seed": 4})
  rel = os.path.join("gravel", "test", "stain", "000.png")
  pa, pb, pc = [np.asarray(Image.open(os.path.join(r, rel))) for r in (a, b, c)]
  np.testing.assert_array_equal(pa, pb)
  assert not np.array_equal(pa, pc)


def test_refuses_foreign_folder(tmp_path):
  (tmp_path / "mine.txt").write_text("keep me")
  with pytest.raises(ValueError, match=str(tmp_path)):
    D.make_demo_dataset(str(tmp_path), **SMALL)
  assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_cli(tmp_path, capsys):
  D.main(["--out", str(tmp_path / "cli"), "--size", "96", "--num-train", "2", "--num-test-good", "1",
          "--num-test-bad", "3"])
  assert capsys.readouterr().out.strip() == str(tmp_path / "cli")
  assert len(os.listdir(tmp_path / "cli" / "brick" / "test" / "hole")) == 1
  assert np.asarray(Image.open(tmp_path / "cli" / "brick" / "test" / "hole" / "000.png")).shape == (96, 96, 3)


def test_contact_sheet_on_demo(tmp_path):
  """The contact sheet reads an MVTec root's train/good images and lays out image | synthetic | mask."""
  from data_pipelines import contact_sheet
  root = D.make_demo_dataset(str(tmp_path / "ds"), **SMALL)
  assert len(contact_sheet.train_good_paths(root)) == 3 * SMALL["num_train"]
  assert len(contact_sheet.train_good_paths(os.path.join(root, "brick"))) == SMALL["num_train"]
  sheet = contact_sheet.make_sheet(root, size=64, num=4, cols=2, seed=1)
  assert sheet.dtype == np.uint8 and sheet.shape == (2 * (64 + 18) + 6, 2 * (3 * 64 + 4) + 6, 3)
  with pytest.raises(ValueError, match="train/good"):
    contact_sheet.train_good_paths(str(tmp_path))
