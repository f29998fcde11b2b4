"""Report files (json/md/csv round trip, atomicity, malformed files) and heat-map pictures."""
import csv
import json

import ml_collections
import numpy as np
import pytest
from PIL import Image

from onenip_jax.evaluation import heatmaps, reports
from onenip_jax.evaluation.metrics import ALL_KEYS, summarize


def _metrics():
  bottle = {"i_auroc": 1.0, "i_ap": 0.999, "p_auroc": 0.98514, "p_ap": 0.81372, "aupro": 0.9,
            "i_f1max": 0.95, "p_f1max": 0.7, "n_images": 83}
  cable = {"i_auroc": 0.991942, "i_ap": 0.995517, "p_auroc": 0.983534, "p_ap": 0.687589,
           "aupro": None, "i_f1max": 0.9, "p_f1max": None, "n_images": 150}
  return summarize({"bottle": bottle, "cable": cable})


def _config():
  c = ml_collections.ConfigDict()
  c.seed = 133
  c.data = ml_collections.ConfigDict()
  c.data.mean = (0.485, 0.456, 0.406)
  c.data.classes = ()
  c.lr = float("nan")
  return c


def test_write_reports_round_trip(tmp_path):
  m = _metrics()
  out = tmp_path / "eval"
  reports.write_reports(out, m, config=_config(), step=1200, extra={"dataset": "mvtec"})
  assert sorted(p.name for p in out.iterdir()) == ["metrics.csv", "metrics.json", "metrics.md"]

  doc = json.loads((out / "metrics.json").read_text())
  assert list(doc) == ["classes", "mean", "step", "config", "dataset"]
  assert list(doc["classes"]) == ["bottle", "cable"]
  for row in list(doc["classes"].values()) + [doc["mean"]]:
    assert list(row) == list(ALL_KEYS)
    assert isinstance(row["n_images"], int)
  assert doc["classes"]["bottle"] == m["classes"]["bottle"]
  assert doc["classes"]["cable"]["aupro"] is None
  assert doc["mean"]["aupro"] == pytest.approx(0.9)
  assert doc["mean"]["i_auroc"] == pytest.approx((1.0 + 0.991942) / 2)
  assert doc["mean"]["n_images"] == 233
  assert doc["step"] == 1200 and doc["dataset"] == "mvtec"
  assert doc["config"] == {"seed": 133, "data": {"mean": [0.485, 0.456, 0.406], "classes": []},
                           "lr": None}
  assert reports.read_metrics(out) == doc
  assert reports.read_metrics(out / "metrics.json") == doc

  md = (out / "metrics.md").read_text()
  assert md == f"# Metrics (step 1200)\n\n{reports.format_table(m)}\n"
  lines = reports.format_table(m).splitlines()
  assert len(lines) == 5  # header, rule, 2 classes, mean
  assert [c.strip() for c in lines[0].strip("|").split("|")] == [
      "class", "I-AUROC", "I-AP", "P-AUROC", "P-AP", "AUPRO", "I-F1", "P-F1"]
  cable = [c.strip() for c in lines[3].strip("|").split("|")]
  assert cable == ["cable", "99.19", "99.55", "98.35", "68.76", "-", "90.00", "-"]
  assert lines[4].split("|")[1].strip() == "**mean**"
  assert lines[4].split("|")[5].strip() == "75.07"  # (81.372 + 68.7589) / 2 = 75.065

  with open(out / "metrics.csv", newline="") as f:
    rows = list(csv.reader(f))
  assert rows[0] == ["class", *ALL_KEYS]
  assert [r[0] for r in rows[1:]] == ["bottle", "cable", "mean"]
  assert float(rows[1][4]) == 0.81372 and rows[2][5] == "" and rows[3][-1] == "233"


def test_write_reports_defaults_and_validation(tmp_path):
  doc = reports.write_reports(tmp_path, _metrics())
  assert doc["step"] is None and doc["config"] == {}
  assert json.loads((tmp_path / "metrics.json").read_text())["step"] is None
  assert (tmp_path / "metrics.md").read_text().startswith("# Metrics\n")
  bad = _metrics()
  bad["classes"]["bottle"]["i_auroc"] = 1.5
  with pytest.raises(ValueError, match="outside"):
    reports.write_reports(tmp_path / "x", bad)
  with pytest.raises(ValueError, match="clash"):
    reports.write_reports(tmp_path / "y", _metrics(), extra={"mean": 1})
  assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())


def test_writes_are_atomic(tmp_path, monkeypatch):
  reports.write_reports(tmp_path, _metrics(), step=1)
  before = (tmp_path / "metrics.json").read_bytes()

  def broken_fsync(fd):
    raise OSError("disk full")

  monkeypatch.setattr(reports.os, "fsync", broken_fsync)
  with pytest.raises(OSError, match="disk full"):
    reports.write_reports(tmp_path, _metrics(), step=2)
  monkeypatch.undo()
  # The old file is intact and no temporary file is left behind.
  assert (tmp_path / "metrics.json").read_bytes() == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv", "metrics.json", "metrics.md"]


def test_read_metrics_malformed_names_file(tmp_path):
  reports.write_reports(tmp_path, _metrics())
  path = tmp_path / "metrics.json"
  text = path.read_text()
  path.write_text(text[: len(text) // 2])  # truncated
  with pytest.raises(ValueError, match="metrics.json") as e:
    reports.read_metrics(path)
  assert str(path) in str(e.value)
  path.write_text(json.dumps({"classes": {}, "mean": {"i_auroc": 0.5}}))  # wrong layout
  with pytest.raises(ValueError, match="metrics.json"):
    reports.read_metrics(tmp_path)
  with pytest.raises(FileNotFoundError):
    reports.read_metrics(tmp_path / "missing.json")


# ------------------------------------------------------------------------------------------------
# Heat maps.
# ------------------------------------------------------------------------------------------------

def test_overlay_colours():
  image = np.full((4, 6, 3), 100, np.uint8)
  amap = np.zeros((4, 6), np.float32)
  amap[:, 3:] = 10.0
  out = heatmaps.overlay(image, amap, vmin=0.0, vmax=10.0)
  assert out.shape == (4, 6, 3) and out.dtype == np.uint8
  # low end -> dark blue (0, 0, 0.5); high end -> dark red (0.5, 0, 0), blended 50/50.
  np.testing.assert_array_equal(out[0, 0], [50, 50, 114])
  np.testing.assert_array_equal(out[0, 5], [114, 50, 50])
  mid = heatmaps.jet(np.array([0.5]))[0]
  np.testing.assert_allclose(mid, [0.5, 1.0, 0.5])
  with pytest.raises(ValueError):
    heatmaps.overlay(image, amap[:3], vmin=0.0, vmax=1.0)


def test_mask_contour():
  mask = np.zeros((7, 7), np.uint8)
  mask[1:6, 1:6] = 1
  contour = heatmaps.mask_contour(mask)
  expected = mask.astype(bool)
  expected[2:5, 2:5] = False
  np.testing.assert_array_equal(contour, expected)
  assert heatmaps.mask_contour(np.ones((3, 3))).sum() == 8  # image edge counts as boundary


def test_save_heatmap_and_contact_sheet(tmp_path):
  rng = np.random.default_rng(0)
  h, w = 40, 56
  image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
  amap = rng.random((h, w)).astype(np.float32)
  mask = np.zeros((h, w), np.uint8)
  mask[10:20, 15:30] = 1
  paths = []
  for i in range(5):
    p = heatmaps.save_heatmap(tmp_path / "bottle" / f"{i:03d}.png", image, amap,
                              mask if i % 2 == 0 else None, score=0.1 * i, vmin=0.0, vmax=1.0,
                              title=f"bottle {i}")
    paths.append(p)
  with Image.open(paths[0]) as im:
    assert im.size == (2 * w + heatmaps.GAP, h + heatmaps.TEXT_BAND)
    pixels = np.asarray(im.convert("RGB"))
  np.testing.assert_array_equal(pixels[:h, :w], image)
  right = pixels[:h, w + heatmaps.GAP:]
  white = np.all(right == heatmaps.CONTOUR_COLOR, axis=-1)
  np.testing.assert_array_equal(white, heatmaps.mask_contour(mask))
  with Image.open(paths[1]) as im:  # no mask: no contour
    right = np.asarray(im.convert("RGB"))[:h, w + heatmaps.GAP:]
    assert not np.all(right == heatmaps.CONTOUR_COLOR, axis=-1).any()

  sheet = heatmaps.contact_sheet(paths, tmp_path / "bottle_sheet.png", cols=2)
  with Image.open(sheet) as im:
    assert im.size == (2 * (2 * w + heatmaps.GAP), 3 * (h + heatmaps.TEXT_BAND))
  leftovers = [p.name for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
  assert leftovers == []
