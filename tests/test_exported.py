"""The serialised predictor and its flax/TF-free consumer (issue 12): preprocessing parity with
tf.data, `onenip-predict` and `onenip-eval` on an export in a subprocess that cannot import flax,
TensorFlow or Orbax, VisA-style masks, maskless anomalies, and thresholds from normal images.

Tiny: an untrained Lite0 network at 64 px on a generated 2-class dataset (the scores need not be
good, only equal between the paths)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO

SIZE = 64
CLASSES = ("alpha", "beta")
BLOCKER = """
import importlib.abc, runpy, sys
BLOCKED = ("flax", "tensorflow", "orbax", "tensorflow_datasets", "onenip_jax.models")
class Blocker(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if any(name == b or name.startswith(b + ".") for b in BLOCKED):
      raise ImportError(f"{name} is blocked in this test")
    return None
sys.meta_path.insert(0, Blocker())
from onenip_jax.cli import COMMANDS  # the console scripts' functions (see test_cli.py)
sys.argv = sys.argv[1:]
try:
  COMMANDS[sys.argv[0]](sys.argv[1:])
finally:
  loaded = [m for m in sys.modules if any(m == b or m.startswith(b + ".") for b in BLOCKED)]
  assert not loaded, loaded
"""


def _image(rng, h, w, cls):
  base = np.full((h, w, 3), (60, 120, 180) if cls == "alpha" else (200, 90, 40), np.float64)
  return np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)


def _write_dataset(root, rng):
  """mvtec layout; masks VisA-style (defect pixels 1..k); one anomaly per class without a mask."""
  for ci, cls in enumerate(CLASSES):
    for split, defect, n in (("train", "good", 6), ("test", "good", 3), ("test", "crack", 4)):
      d = root / cls / split / defect
      d.mkdir(parents=True, exist_ok=True)
      for i in range(n):
        h, w = (80 + 7 * i, 72) if ci == 0 else (48, 50 + 3 * i)
        img = _image(rng, h, w, cls)
        ext = ".png" if (i + ci) % 2 == 0 else ".jpg"
        if defect == "crack":
          m = np.zeros((h, w), np.uint8)
          m[h // 4: h // 2, w // 4: w // 2 + i] = 1 + i % 3   # class ids, not 255
          m[h // 2 + 2: h // 2 + 6, 2:8] = 2
          img[m > 0] = 255 - img[m > 0]
          if i < n - 1:  # the last anomaly has no mask
            g = root / cls / "ground_truth" / defect
            g.mkdir(parents=True, exist_ok=True)
            Image.fromarray(m).save(g / f"{i:03d}_mask.png")
        Image.fromarray(img).save(d / f"{i:03d}{ext}", quality=90)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(cfg, index, flax predictor with pool, export dir) of an untrained Lite0 at 64 px."""
  import jax  # pylint: disable=g-import-not-at-top
  from data_pipelines import indexing  # pylint: disable=g-import-not-at-top
  from onenip_jax import export, inference, sharding, train  # pylint: disable=g-import-not-at-top
  from onenip_jax.config_loading import load_config  # pylint: disable=g-import-not-at-top
  base = tmp_path_factory.mktemp("exported")
  _write_dataset(base / "data", np.random.default_rng(0))
  cfg = load_config(str(REPO / "configs" / "real.py") + ":steps=6,backbone=lite0",
                    [f"input_size={SIZE}", f"data.root={base / 'data'}", f"data.classes={CLASSES}",
                     "eval.batch_size=8", "eval.prompt_mode=pool", "eval.heatmaps=False",
                     "eval.pool_k=2"])
  index = indexing.index_dataset(cfg.data)
  mesh = sharding.make_mesh()
  model, features = inference.make_model(cfg)
  state = jax.jit(lambda: train.init_state(cfg, model, train.make_optimizer(cfg, 1),
                                           features.channels),
                  out_shardings=sharding.replicated(mesh))()
  backbone = jax.device_put(features.load_variables(cfg.model), sharding.replicated(mesh))
  predictor = inference.Predictor(model, features, {"params": state.params,
                                                    "batch_stats": state.batch_stats},
                                  backbone, mesh)
  predictor.pool = inference.build_prompt_pool(predictor, index, cfg)
  fusion_c = 0.37
  samples = export.threshold_normals(index, predictor.pool, 0.5, cfg.seed)
  thresholds = export.make_thresholds(predictor, samples, index, cfg, fusion_c, "train-normals",
                                      0.25, "test")
  out = str(base / "export")
  export.write_export(out, cfg, predictor, index.classes, fusion_c, 0, thresholds)
  return cfg, index, predictor, out


def _run_blocked(cmd, tmp_path):
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run([sys.executable, "-c", BLOCKER, *cmd], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  return proc


def test_export_layout_and_metadata(tiny):
  _, _, _, out = tiny
  assert {"export.json", "predictor.jaxexport", "predictor_weights.npz", "prompt_pool.npz",
          "model.msgpack", "backbone.msgpack"} <= set(os.listdir(out))
  with open(os.path.join(out, "export.json"), encoding="utf-8") as f:
    meta = json.load(f)
  assert meta["format_version"] == 2 and meta["package_version"]
  assert meta["preprocessing"]["resize"] == "tf-bilinear-antialias"
  assert meta["preprocessing"]["mean"] == list(tiny[0].data.mean)
  assert "cpu" in meta["program"]["platforms"]
  th = meta["thresholds"]
  assert set(th["per_class"]) == set(CLASSES)
  for entry in [th["global"], *th["per_class"].values()]:
    assert entry["source"] == "train-normals" and entry["method"] == "normal-quantile"
    assert entry["n_normal"] >= 1 and entry["fpr_on_source"] <= 0.25


def test_preprocessing_matches_tf_pipeline(tmp_path):
  from data_pipelines import input_pipeline as ip  # pylint: disable=g-import-not-at-top
  from onenip_jax import exported  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(3)
  mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
  files = []
  for k, (h, w) in enumerate([(64, 64), (300, 211), (37, 90), (480, 640)]):
    img = _image(rng, h, w, "alpha")
    for name, im in (("rgb.png", Image.fromarray(img)), ("q.jpg", Image.fromarray(img)),
                     ("gray.png", Image.fromarray(img[..., 0])),
                     ("rgba.png", Image.fromarray(np.dstack([img, img[..., :1]]))),
                     ("b.bmp", Image.fromarray(img)), ("t.tiff", Image.fromarray(img)),
                     ("16.png", Image.fromarray(img[..., 1].astype(np.uint16) * 257))):
      path = str(tmp_path / f"{k}_{name}")
      im.save(path)
      files.append(path)
  for path in files:
    for size in (SIZE, 224):
      want = ip.load_image(path, size, mean, std)
      got = exported.normalize(exported.load_image(path, size), mean, std)
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=path)
  for h, w in ((50, 61), (300, 300)):
    m = (rng.integers(0, 4, (h, w)) * (rng.random((h, w)) > 0.6)).astype(np.uint8)  # VisA: 1..3
    path = str(tmp_path / f"m{h}.png")
    Image.fromarray(m).save(path)
    for size in (SIZE, 224):
      tf_mask = ip.load_mask(path, size)[..., 0]
      want = np.asarray(Image.fromarray(m).resize((size, size), Image.NEAREST)) > 0
      np.testing.assert_array_equal(tf_mask, want)
      np.testing.assert_array_equal(exported.load_mask(path, size), want)
      assert tf_mask.any()


def test_predict_without_flax_tf_orbax_matches_flax(tiny, tmp_path):
  from onenip_jax import cli  # pylint: disable=g-import-not-at-top
  _, index, _, out = tiny
  folder = os.path.dirname([s for s in index.test if s.defect == "crack"][-1].path)
  _run_blocked(["onenip-predict", "--exported", out, "--out", str(tmp_path / "exp"),
                "--save-maps", "--batch-size", "3", folder], tmp_path)
  cli.predict(["--exported", out, "--out", str(tmp_path / "flax"), "--flax", "--save-maps", folder])
  exp, ref = ({r["path"]: r for r in json.load(open(tmp_path / d / "predictions.json"))["predictions"]}
              for d in ("exp", "flax"))
  doc = json.load(open(tmp_path / "exp" / "predictions.json"))
  assert doc["backend"] == "exported" and len(exp) == 4 and exp.keys() == ref.keys()
  meta = json.load(open(os.path.join(out, "export.json")))
  for p, r in exp.items():
    assert r["score"] == pytest.approx(ref[p]["score"], rel=1e-5), p
    assert r["matched_class"] == ref[p]["matched_class"]
    assert r["threshold"] == meta["thresholds"]["per_class"][r["matched_class"]]["value"]
    assert r["anomalous"] == (r["score"] > r["threshold"])
    np.testing.assert_allclose(np.load(r["map"]), np.load(ref[p]["map"]), rtol=1e-5, atol=1e-6)
  rows = open(tmp_path / "exp" / "predictions.csv").read().splitlines()
  assert len(rows) == 5 and rows[0].startswith("path,score,anomalous,matched_class,threshold")


def test_eval_without_flax_tf_orbax_matches_flax_eval(tiny, tmp_path):
  from onenip_jax import evaluate, reports  # pylint: disable=g-import-not-at-top
  cfg, index, predictor, out = tiny
  theirs = evaluate.evaluate_predictor(cfg, predictor, index, str(tmp_path / "flax"), 0.37)
  _run_blocked(["onenip-eval", "--exported", out, "--out", str(tmp_path / "exp")], tmp_path)
  mine = reports.read_metrics(tmp_path / "exp")
  flax_doc = reports.read_metrics(tmp_path / "flax")
  assert mine["backend"] == "exported" and flax_doc["backend"] == "flax"
  assert mine["maskless_anomalies"] == {"policy": "skip", "count": 2,
                                        "per_class": {c: 1 for c in CLASSES}}
  assert mine["maskless_anomalies"] == theirs["maskless_anomalies"]
  assert mine["pool_class_accuracy"] == pytest.approx(theirs["pool_class_accuracy"])
  for cls in CLASSES:
    assert mine["classes"][cls]["p_auroc"] is not None  # VisA-style masks have positives
    for k, v in theirs["classes"][cls].items():
      if v is None:
        assert mine["classes"][cls][k] is None, (cls, k)
      else:
        assert mine["classes"][cls][k] == pytest.approx(v, rel=1e-5, abs=1e-6), (cls, k)


def test_maskless_protocol_and_float32_maps(tiny, tmp_path):
  from onenip_jax import evaluate  # pylint: disable=g-import-not-at-top
  cfg, index, predictor, _ = tiny
  samples = [s for s in index.test if s.cls == "alpha"]
  maps = evaluate.collect_maps(predictor, samples, index, cfg)
  assert maps["rec"].dtype == np.float32 and maps["ref"].dtype == np.float32
  s = evaluate.fused_maps(maps, np.arange(len(samples)), 0.37, cfg.eval.alpha)
  scores = evaluate.image_scores(s, cfg.eval.pool_size)
  labels = [x.label for x in samples]
  skip, lab, n = evaluate.class_protocol(scores, s, maps["mask"], maps["has_mask"], labels, "skip")
  full, lab2, n2 = evaluate.class_protocol(scores, s, maps["mask"], maps["has_mask"], labels, "full")
  assert n == n2 == 1 and lab.tolist() == lab2.tolist() and sorted(lab) == [0, 0, 0, 1, 1, 1, 1]
  assert skip["i_auroc"] == full["i_auroc"] and skip["p_auroc"] != full["p_auroc"]
  ones = maps["mask"].copy()
  ones[~maps["has_mask"] & (lab > 0)] = True
  from onenip_jax import metrics  # pylint: disable=g-import-not-at-top
  assert full == metrics.class_metrics(scores, lab, s, ones)
  keep = maps["has_mask"] | (lab == 0)
  assert skip == metrics.class_metrics(scores, lab, s[keep], maps["mask"][keep])
  with pytest.raises(ValueError, match="eval.maskless"):
    evaluate.class_protocol(scores, s, maps["mask"], maps["has_mask"], labels, "ones")


def test_threshold_rules():
  from onenip_jax import cli, export  # pylint: disable=g-import-not-at-top
  s = np.arange(1.0, 11.0)  # 10 normal scores
  assert export.normal_quantile(s, 0.0) == 10.0      # nothing above
  assert export.normal_quantile(s, 0.1) == 9.0       # one of ten above
  assert export.normal_quantile(s, 0.25) == 8.0      # floor(2.5) = 2 above
  e = export._threshold_entry([1, 2, 3, 8, 9], [0, 0, 0, 1, 1], "val", 0.01)
  assert e["method"] == "f1-max" and 3 <= e["value"] < 8 and e["fpr_on_source"] == 0.0
  with pytest.raises(SystemExit):
    cli.export(["--workdir", "x", "--out", "y", "--calibrate"])
