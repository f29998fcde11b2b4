"""The serialised predictor and its flax/TF-free consumer: preprocessing parity
with tf.data, `onenip-predict` and `onenip-eval` on a calibrated export in a subprocess that cannot
import flax, TensorFlow or Orbax (against the checkpoint's Predictor and scorings), VisA-style
masks, maskless anomalies, thresholds from held-out normals, the reference fallback without
calibration, and the one-line refusal of older export formats.

Tiny: an untrained Lite0 network at 64 px on a generated 2-class dataset (the scores need not be
good, only equal between the paths). The calibration is made by hand (real normal statistics of the
held-out images, a fixed weight and box): `onenip_jax.evaluation.calibration` is tested on its
own."""
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


def _calibration(cfg, index, predictor):
  """A calibration (`onenip_jax.evaluation.calibration` layout) with the pool-mode normal statistics
  of the held-out images, w = 0.3 and a box of 8 (not eval.pool_size, so the program's box is
  checked)."""
  from onenip_jax.evaluation import calibration as calib  # pylint: disable=g-import-not-at-top
  from onenip_jax.evaluation import maps as maps_lib  # pylint: disable=g-import-not-at-top
  maps = maps_lib.collect_maps(predictor, index.holdout, index, cfg)
  params = dict(calib.normal_stats(maps["rec"], maps["ref"]), weight=0.3, pool_size=8,
                objective=0.5, validation={k: 0.5 for k in calib.OBJECTIVE_KEYS},
                n_normal=len(index.holdout), n_synthetic=0, candidates=[])
  return {"per_class": {c: dict(params) for c in CLASSES}, "global": params,
          "prompt_mode": "pool", "synthesis_seed": 1000, "synthetic_per_image": 0,
          "holdout_fraction": 0.2, "holdout": {c: [s.path for s in index.holdout if s.cls == c]
                                                for c in CLASSES}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(cfg, index, flax predictor with pool, calibrated export dir, calibration, its
  `inference.Trained`) of an untrained Lite0 at 64 px; the index holds out 1 of the 6 training
  normals of each class."""
  import jax  # pylint: disable=g-import-not-at-top
  from data_pipelines import indexing  # pylint: disable=g-import-not-at-top
  from onenip_jax import sharding  # pylint: disable=g-import-not-at-top
  from onenip_jax.config.loading import load_config  # pylint: disable=g-import-not-at-top
  from onenip_jax.evaluation import fusion  # pylint: disable=g-import-not-at-top
  from onenip_jax.evaluation import inference  # pylint: disable=g-import-not-at-top
  from onenip_jax.serving import export  # pylint: disable=g-import-not-at-top
  from onenip_jax.serving import thresholds as thresholds_lib  # pylint: disable=g-import-not-at-top
  from onenip_jax.training import state as state_lib  # pylint: disable=g-import-not-at-top
  base = tmp_path_factory.mktemp("exported")
  _write_dataset(base / "data", np.random.default_rng(0))
  cfg = load_config(str(REPO / "configs" / "real.py") + ":steps=6,backbone=lite0",
                    [f"input_size={SIZE}", f"data.root={base / 'data'}", f"data.classes={CLASSES}",
                     "eval.batch_size=8", "eval.prompt_mode=pool", "eval.heatmaps=False",
                     "eval.pool_k=2", "calibration.holdout_fraction=0.2",
                     "eval.fusion=calibrated"])
  index = indexing.index_config(cfg)
  assert len(index.holdout) == 2
  mesh = sharding.make_mesh()
  model, features = inference.make_model(cfg)
  state = jax.jit(lambda: state_lib.init_state(cfg, model, state_lib.make_optimizer(cfg, 1),
                                               features),
                  out_shardings=sharding.replicated(mesh))()
  backbone = jax.device_put(features.load_variables(cfg.backbone), sharding.replicated(mesh))
  trained = inference.Trained.from_state(cfg, state, index, features, backbone, mesh)
  trained.fusion_c = 0.37
  predictor = trained.predictor_for("pool")
  trained.calibration = cal = _calibration(cfg, index, predictor)
  entry = fusion.make_scoring(cfg, trained.fusion_c, cal)
  samples, sources = thresholds_lib.default_threshold_samples(index, trained.pool, 0.5,
                                                              cfg.seed)
  thresholds = thresholds_lib.make_thresholds(trained, entry, samples, "holdout-normals", 0.25,
                                              class_sources=sources)
  out = str(base / "export")
  export.write_export(out, trained, thresholds, scoring_entry=entry)
  return cfg, index, predictor, out, cal, trained


def _run_blocked(cmd, tmp_path):
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run([sys.executable, "-c", BLOCKER, *cmd], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  return proc


def test_export_layout_and_metadata(tiny):
  _, index, _, out, cal, _ = tiny
  assert sorted(os.listdir(out)) == ["export.json", "predictor.jaxexport",
                                     "predictor_weights.npz", "prompt_pool.npz"]
  with open(os.path.join(out, "export.json"), encoding="utf-8") as f:
    meta = json.load(f)
  assert meta["format_version"] == 5 and meta["package_version"]
  assert meta["preprocessing"]["resize"] == "tf-bilinear-antialias"
  assert meta["preprocessing"]["mean"] == list(tiny[0].data.mean)
  assert "cpu" in meta["program"]["platforms"]
  assert meta["calibration"] == cal
  sc = meta["scoring"]
  assert sc["fusion"] == "calibrated" and sc["calibration_scope"] == "global"
  assert sc["pool_size"] == 8 and "w=0.3" in sc["note"]
  g = cal["global"]
  assert sc["params"] == {"rec_mean": g["rec_mean"], "rec_std": g["rec_std"],
                          "ref_mean": g["ref_mean"], "ref_std": g["ref_std"],
                          "rec_weight": pytest.approx(0.7), "ref_weight": 0.3,
                          "ref_logodds": 1.0}
  assert meta["program"]["scoring_layout"] == list(sc["params"])
  th = meta["thresholds"]
  assert set(th["per_class"]) == set(CLASSES) and th["scoring"] == "calibrated"
  assert th["global"]["source"] == "holdout-normals"
  for cls, entry in th["per_class"].items():
    assert entry["source"] == "holdout-normals" and entry["method"] == "normal-quantile"
    assert entry["n_normal"] == 1 and "never trained on" in entry["note"]
  held = {s.path for s in index.holdout}
  assert held == {p for c in CLASSES for p in cal["holdout"][c]}
  assert not held & {s.path for s in index.train}  # export indexes as training did


def test_preprocessing_matches_tf_pipeline(tmp_path):
  from data_pipelines import input_pipeline as ip  # pylint: disable=g-import-not-at-top
  from onenip_jax.serving import program  # pylint: disable=g-import-not-at-top
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
      got = program.normalize(program.load_image(path, size), mean, std)
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=path)
  for h, w in ((50, 61), (300, 300)):
    m = (rng.integers(0, 4, (h, w)) * (rng.random((h, w)) > 0.6)).astype(np.uint8)  # VisA: 1..3
    path = str(tmp_path / f"m{h}.png")
    Image.fromarray(m).save(path)
    for size in (SIZE, 224):
      tf_mask = ip.load_mask(path, size)[..., 0]
      want = np.asarray(Image.fromarray(m).resize((size, size), Image.NEAREST)) > 0
      np.testing.assert_array_equal(tf_mask, want)
      np.testing.assert_array_equal(program.load_mask(path, size), want)
      assert tf_mask.any()


def test_predict_without_flax_tf_orbax_matches_the_checkpoint_predictor(tiny, tmp_path):
  from onenip_jax.evaluation import fusion  # pylint: disable=g-import-not-at-top
  from onenip_jax.evaluation import maps as maps_lib  # pylint: disable=g-import-not-at-top
  cfg, index, predictor, out, cal, _ = tiny
  samples = [s for s in index.test if s.cls == "alpha" and s.defect == "crack"]
  folder = os.path.dirname(samples[-1].path)
  _run_blocked(["onenip-predict", "--exported", out, "--out", str(tmp_path / "exp"),
                "--save-maps", "--batch-size", "3", folder], tmp_path)
  maps = maps_lib.collect_maps(predictor, samples, index, cfg)  # tf.data and the Predictor
  want_maps, want_scores = fusion.scored_maps("calibrated", maps["rec"], maps["ref"],
                                              c=0.37, cfg=cfg, calibration=cal)
  want_class = [CLASSES[predictor.pool.class_ids[k]] for k in maps["pool_choice"]]
  exp = {r["path"]: r for r in json.load(open(tmp_path / "exp" / "predictions.json"))["predictions"]}
  doc = json.load(open(tmp_path / "exp" / "predictions.json"))
  assert doc["backend"] == "exported" and len(exp) == 4
  assert doc["scoring"]["fusion"] == "calibrated"
  meta = json.load(open(os.path.join(out, "export.json")))
  for i, sample in enumerate(samples):
    r = exp[sample.path]
    assert r["score"] == pytest.approx(float(want_scores[i]), rel=1e-5), sample.path
    assert r["matched_class"] == want_class[i]
    assert r["threshold"] == meta["thresholds"]["per_class"][r["matched_class"]]["value"]
    assert r["anomalous"] == (r["score"] > r["threshold"])
    want = want_maps[i]  # calibrated maps are z-scores: near-zero pixels need an atol
    np.testing.assert_allclose(np.load(r["map"]), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  rows = open(tmp_path / "exp" / "predictions.csv").read().splitlines()
  assert len(rows) == 5 and rows[0].startswith("path,score,anomalous,matched_class,threshold")


def test_eval_without_flax_tf_orbax_matches_the_checkpoint_eval(tiny, tmp_path):
  from onenip_jax.evaluation import after_training, reports  # pylint: disable=g-import-not-at-top
  out, cal, trained = tiny[3:]
  # pool prompts (eval.prompt_mode): the global calibration
  theirs = after_training.evaluate(trained, str(tmp_path / "ckpt"))
  _run_blocked(["onenip-eval", "--exported", out, "--out", str(tmp_path / "exp")], tmp_path)
  mine = reports.read_metrics(tmp_path / "exp")
  assert mine["backend"] == "exported"
  assert reports.read_metrics(tmp_path / "ckpt")["backend"] == "flax"
  assert mine["fusion"] == theirs["fusion"] == "calibrated" and mine["calibration"] == cal
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
        # abs 3e-5: the numpy/PIL and tf.data pixels differ by up to 1e-5, which reorders a few
        # near-tied pixels of the calibrated map in the pixel metrics.
        assert mine["classes"][cls][k] == pytest.approx(v, rel=1e-5, abs=3e-5), (cls, k)


def test_reference_fallback_without_calibration(tiny, tmp_path):
  import copy  # pylint: disable=g-import-not-at-top
  from onenip_jax.evaluation import fusion  # pylint: disable=g-import-not-at-top
  from onenip_jax.evaluation import maps as maps_lib  # pylint: disable=g-import-not-at-top
  from onenip_jax.serving import export, program  # pylint: disable=g-import-not-at-top
  cfg, index, predictor, calibrated_out, _, trained = tiny
  out = str(tmp_path / "reference")
  uncalibrated = copy.copy(trained)  # the same network and pool, a run without calibration
  uncalibrated.calibration = None
  export.write_export(out, uncalibrated)
  meta = program.read_meta(out)
  sc = meta["scoring"]
  assert sc["fusion"] == "reference" and meta["calibration"] is None
  assert "no calibration" in sc["note"] and sc["pool_size"] == cfg.eval.pool_size
  samples = [s for s in index.test if s.cls == "beta"][:3]
  maps = maps_lib.collect_maps(predictor, samples, index, cfg)
  _, want = fusion.scored_maps("reference", maps["rec"], maps["ref"], c=0.37, cfg=cfg)
  model = program.ExportedPredictor.load(out)
  x = np.stack([model.preprocess(s.path) for s in samples])
  got = model(x)["score"]
  np.testing.assert_allclose(got, want, rtol=1e-5)
  calibrated = program.ExportedPredictor.load(calibrated_out)(x)["score"]
  assert np.abs(calibrated - got).min() > 1e-3  # the scoring argument is used


@pytest.mark.parametrize("version", [1, 2, 3, 4])
def test_an_older_export_format_fails_in_one_line_naming_the_re_export(tiny, tmp_path, capsys,
                                                                       version):
  from onenip_jax import cli  # pylint: disable=g-import-not-at-top
  from onenip_jax.serving import program  # pylint: disable=g-import-not-at-top
  out = str(tmp_path / "old")
  os.makedirs(out)
  meta = program.read_meta(tiny[3])
  meta["format_version"] = version
  with open(os.path.join(out, program.META_FILE), "w", encoding="utf-8") as f:
    json.dump(meta, f)
  with pytest.raises(SystemExit) as e:
    cli.predict(["--exported", out, "--out", str(tmp_path / "p"), tiny[1].test[0].path])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("onenip-predict: error: ")
  assert f"format {version}" in err[0] and "onenip-export --workdir RUN --out DIR" in err[0]


def test_maskless_protocol_and_float32_maps(tiny, tmp_path):
  from onenip_jax.evaluation import fusion  # pylint: disable=g-import-not-at-top
  from onenip_jax.evaluation import maps as maps_lib  # pylint: disable=g-import-not-at-top
  from onenip_jax.evaluation import protocol as protocol_lib  # pylint: disable=g-import-not-at-top
  cfg, index, predictor = tiny[:3]
  samples = [s for s in index.test if s.cls == "alpha"]
  maps = maps_lib.collect_maps(predictor, samples, index, cfg)
  assert maps["rec"].dtype == np.float32 and maps["ref"].dtype == np.float32
  s, scores = fusion.scored_maps("reference", maps["rec"], maps["ref"], c=0.37, cfg=cfg)
  assert s.dtype == np.float32
  labels = [x.label for x in samples]
  protocol = protocol_lib.class_protocol
  skip, lab, n = protocol(scores, s, maps["mask"], maps["has_mask"], labels, "skip")
  full, lab2, n2 = protocol(scores, s, maps["mask"], maps["has_mask"], labels, "full")
  assert n == n2 == 1 and lab.tolist() == lab2.tolist() and sorted(lab) == [0, 0, 0, 1, 1, 1, 1]
  assert skip["i_auroc"] == full["i_auroc"] and skip["p_auroc"] != full["p_auroc"]
  ones = maps["mask"].copy()
  ones[~maps["has_mask"] & (lab > 0)] = True
  from onenip_jax.evaluation import metrics  # pylint: disable=g-import-not-at-top
  assert full == metrics.class_metrics(scores, lab, s, ones)
  keep = maps["has_mask"] | (lab == 0)
  assert skip == metrics.class_metrics(scores, lab, s[keep], maps["mask"][keep])
  with pytest.raises(ValueError, match="eval.maskless"):
    protocol(scores, s, maps["mask"], maps["has_mask"], labels, "ones")


def test_threshold_rules():
  from onenip_jax import cli  # pylint: disable=g-import-not-at-top
  from onenip_jax.serving import thresholds as thresholds_lib  # pylint: disable=g-import-not-at-top
  s = np.arange(1.0, 11.0)  # 10 normal scores
  assert thresholds_lib.normal_quantile(s, 0.0) == 10.0      # nothing above
  assert thresholds_lib.normal_quantile(s, 0.1) == 9.0       # one of ten above
  assert thresholds_lib.normal_quantile(s, 0.25) == 8.0      # floor(2.5) = 2 above
  e = thresholds_lib._threshold_entry([1, 2, 3, 8, 9], [0, 0, 0, 1, 1], "val", 0.01)
  assert e["method"] == "f1-max" and 3 <= e["value"] < 8 and e["fpr_on_source"] == 0.0
  with pytest.raises(SystemExit):
    cli.export(["--workdir", "x", "--out", "y", "--calibrate"])
