"""Calibration on held-out normals: the split, no test image read, determinism, choice, prompts."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from data_pipelines import indexing, input_pipeline
from onenip_jax import sharding
from onenip_jax.config import base as common
from onenip_jax.config import loading
from onenip_jax.evaluation import after_training, calibration, fusion, holdout, inference, scoring
from onenip_jax.training import state as state_lib
from onenip_jax.training.step import compute_feature_cache

RES = 64


def _write_dataset(root, classes=("a", "b"), n_train=10, seed=0):
  """A tiny MVTec-layout dataset: n_train good train images, 2 good + 2 defect test images."""
  rng = np.random.default_rng(seed)
  img = lambda: Image.fromarray(rng.integers(0, 255, (RES, RES, 3), dtype=np.uint8))
  for c in classes:
    for sub in ("train/good", "test/good", "test/cut", "ground_truth/cut"):
      os.makedirs(os.path.join(root, c, sub), exist_ok=True)
    for i in range(n_train):
      img().save(os.path.join(root, c, "train/good", f"{i:03d}.png"))
    for i in range(2):
      img().save(os.path.join(root, c, "test/good", f"{i:03d}.png"))
      img().save(os.path.join(root, c, "test/cut", f"{i:03d}.png"))
      m = np.zeros((RES, RES), np.uint8)
      m[8:24, 8 + 16 * i:24 + 16 * i] = 255
      Image.fromarray(m).save(os.path.join(root, c, "ground_truth/cut", f"{i:03d}_mask.png"))


def _cfg(root, **calib):
  cfg = common.get_base_config()
  common.set_backbone(cfg, "lite0")
  cfg.input_size, cfg.batch_size = RES, 8
  cfg.data.root = str(root)
  cfg.data.textures = ""
  cfg.eval.batch_size = 8
  cfg.model.update(hidden_dim=32, num_heads=2, ffn_dim=64, enc_layers=1, dec_layers=1,
                   refiner_channels=16)  # small and fast to compile
  cfg.calibration.update(calib)
  return cfg


def test_holdout_split_is_seeded_disjoint_and_excluded(tmp_path):
  _write_dataset(tmp_path)
  cfg = _cfg(tmp_path, holdout_fraction=0.3)
  index = indexing.index_config(cfg)
  full = indexing.index_dataset(cfg.data)
  assert len(index.holdout) == 6 and len(index.train) == 14  # round(0.3 * 10) per class
  assert {s.cls for s in index.holdout} == {"a", "b"}
  assert not {s.path for s in index.holdout} & {s.path for s in index.train}
  assert sorted(s.path for s in index.train + index.holdout) == sorted(s.path for s in full.train)
  assert indexing.index_config(cfg).holdout == index.holdout  # deterministic for the seed
  cfg.seed += 1
  assert indexing.index_config(cfg).holdout != index.holdout
  cfg.calibration.holdout_fraction = 0.0  # off: the reference protocol's full train set
  assert indexing.index_config(cfg).train == full.train
  with pytest.raises(ValueError, match="calibration.holdout_fraction"):
    indexing.split_holdout(full, 1.0, 0)


def test_holdout_split_of_a_list_without_repeats_is_by_position_as_before(tmp_path):
  _write_dataset(tmp_path, n_train=20)
  full = indexing.index_dataset(_cfg(tmp_path).data)
  index = indexing.split_holdout(full, 0.25, 7)
  for c_id, cls in enumerate(full.classes):
    rows = full.normal_train_indices(cls)
    perm = np.random.default_rng([7, c_id]).permutation(len(rows))
    assert [s for s in index.holdout if s.cls == cls] == [full.train[i] for i in sorted(
        rows[j] for j in perm[:5])]


def test_repeated_images_stay_on_one_side_of_the_split_and_in_one_fold(tmp_path):
  _write_dataset(tmp_path, n_train=12)
  rows = [{"filename": f"{c}/train/good/{i:03d}.png", "label": 0, "clsname": c}
          for c in ("a", "b") for i in range(12)]
  rows += [rows[0]] * 5 + [rows[3], rows[13]] * 3 + rows[5:8] * 2  # a meta file's repeats
  train = tmp_path / "train.json"
  train.write_text("".join(json.dumps(r) + "\n" for r in rows))
  test = tmp_path / "test.json"
  test.write_text(json.dumps({"filename": "a/test/good/000.png", "label": 0, "clsname": "a"}))
  cfg = _cfg(tmp_path, holdout_fraction=0.5)
  cfg.data.update(layout="meta", meta_train=str(train), meta_test=str(test))
  full = indexing.index_dataset(cfg.data)
  assert len(full.train) == len(rows)
  held_paths = set()
  for seed in range(6):
    cfg.seed = seed
    index = indexing.index_config(cfg)
    held = [s.path for s in index.holdout]
    assert not set(held) & {s.path for s in index.train}  # no copy trained on and held out
    assert len(held) == len(set(held)) == 12  # each held-out image once: half of 12 per class
    assert len(index.train) == sum(s.path not in held for s in full.train)  # every copy out
    assert sorted({s.path for s in index.train + index.holdout}) == sorted(
        {s.path for s in full.train})
    held_paths |= set(held)
  assert full.train[0].path in held_paths  # the repeated image was held out by some seed
  # Copies of one image in a sample list get one source (fold) in the validation set.
  samples = [full.train[i] for i in (0, 1, 0, 3, 1, 0)]
  np.testing.assert_array_equal(holdout._image_ids(samples), [0, 1, 0, 2, 1, 0])  # pylint: disable=protected-access


def test_training_stream_and_cache_never_read_held_out_images(tmp_path):
  _write_dataset(tmp_path)
  cfg = _cfg(tmp_path, holdout_fraction=0.3)
  index = indexing.index_config(cfg)
  for s in index.holdout:  # any read of a held-out image now fails
    os.remove(s.path)
  batches = input_pipeline.make_train_iterator(index, cfg)
  for _ in range(3):  # 24 samples > one epoch of 14: normal, prompt and synthetic sources
    b = next(batches)
    assert b["normal"].shape == (8, RES, RES, 3)
  features = _TinyFeatures()  # the feature cache decodes every image it is built from
  cache = compute_feature_cache(cfg, index, features, {}, sharding.make_mesh())
  assert cache.shape[0] == len(index.train)


class _TinyFeatures:
  """A stand-in frozen backbone: (B, H, W, 3) -> (B, H/16, W/16, 3) subsampled pixels."""
  channels, stride = 3, 16

  def grid(self, size: int) -> int:
    return size // self.stride

  def __call__(self, variables, images):
    del variables
    return images[:, ::self.stride, ::self.stride, :]


def _state_and_backbone(cfg, mesh):
  model, features = inference.make_model(cfg)
  bb = features.load_variables(cfg.backbone)  # the cached ImageNet Lite0 weights
  tx = state_lib.make_optimizer(cfg, 10)
  repl = sharding.replicated(mesh)
  state = jax.jit(lambda: state_lib.init_state(cfg, model, tx, features),
                  out_shardings=repl)()
  state = state.replace(fusion_c=jax.device_put(jnp.float32(0.5), repl))
  return state, features, jax.device_put(bb, repl)


def test_calibration_reads_no_test_image_is_deterministic_and_is_reported(tmp_path, monkeypatch):
  root = tmp_path / "data"
  _write_dataset(root)
  cfg = _cfg(root, holdout_fraction=0.2, synthetic_per_image=2, weights=(0.0, 0.5, 1.0),
             pool_sizes=(8, 16))
  index = indexing.index_config(cfg)
  mesh = sharding.make_mesh()
  state, features, bb = _state_and_backbone(cfg, mesh)
  test_files = [p for s in index.test for p in (s.path, s.mask_path) if p]
  saved = {p: open(p, "rb").read() for p in test_files}
  for p in test_files:  # calibration must not open any of them
    os.remove(p)
  trained = inference.Trained.from_state(cfg, state, index, features, bb, mesh)  # c = 0.5
  pools = []  # the prompt pool is built once for the calibration and every evaluation
  monkeypatch.setattr(inference, "build_prompt_pool",
                      lambda *a, f=inference.build_prompt_pool: pools.append(1) or f(*a))
  first = holdout.calibrate(trained)
  again = holdout.calibrate(trained)
  assert json.dumps(first, sort_keys=True) == json.dumps(again, sort_keys=True)
  g = first["global"]
  assert set(first["per_class"]) == {"a", "b"} and g["n_normal"] == 4 and g["n_synthetic"] == 8
  assert len(g["candidates"]) == 8 and g["weight"] in (0.0, 0.5, 1.0) and g["pool_size"] in (8, 16)
  assert "reference_validation" in g and first["holdout"]["a"] == [
      s.path for s in index.holdout if s.cls == "a"]
  assert g["prompt_mode"] == "pool" and first["per_class"]["a"]["prompt_mode"] == "class"

  for p, data in saved.items():  # the evaluation (after calibration) reads the test set
    with open(p, "wb") as f:
      f.write(data)
  out = tmp_path / "eval"
  with cfg.unlocked():
    cfg.eval.fusion = "calibrated"
  trained.calibration = first
  result = after_training.evaluate(trained, str(out))
  m = json.loads((out / "metrics.json").read_text())
  assert m["fusion"] == "calibrated" and m["calibration"]["global"]["weight"] == g["weight"]
  assert set(m["scorings"]) == {"calibrated", "reference", "refiner", "reconstruction"}
  assert m["scorings"]["calibrated"]["mean"] == m["mean"] == result["mean"]
  md = (out / "metrics.md").read_text()
  assert all(f"## {n}" in md for n in m["scorings"])
  trained.calibration = None
  fallback = after_training.evaluate(trained, str(tmp_path / "e2"))
  assert fallback["fusion"] == "reference" and "calibrated" not in fallback["scorings"]
  assert fallback["scorings"]["refiner"] == m["scorings"]["refiner"]
  trained.calibration = dict(first, **{"global": dict(g, prompt_mode="class")})  # stale
  with cfg.unlocked():
    cfg.eval.prompt_mode = "pool"
  with pytest.raises(calibration.PromptModeError, match="prompt_mode=pool"):
    after_training.evaluate(trained, str(tmp_path / "e3"))
  assert len(pools) == 1


def _groups(informative: str, n=12, seed=0):
  """Validation maps of one class where only `informative` ('rec' or 'ref') sees the defects:
  n // 3 normal images, then two synthetic ones made from each (`source`)."""
  rng = np.random.default_rng(seed)
  mask = np.zeros((n, 32, 32), bool)
  mask[n // 3:, 8:20, 8:20] = True  # the first third: normal images
  signal = rng.normal(size=mask.shape) * 0.5 + 2.0 * mask
  noise = rng.normal(size=mask.shape)
  sigmoid = lambda x: 1.0 / (1.0 + np.exp(-x))
  rec, ref = (signal * 30.0 + 100.0, sigmoid(noise - 12.0)) if informative == "rec" else (
      noise * 30.0 + 100.0, sigmoid(4.0 * signal - 12.0))  # nearly binary, as the real refiner
  return {"rec": rec.astype(np.float32), "ref": ref.astype(np.float32), "mask": mask,
          "label": mask.reshape(n, -1).any(1).astype(np.int32), "normal": np.arange(n) < n // 3,
          "source": np.arange(n) % (n // 3)}


@pytest.mark.parametrize("informative", ["ref", "rec"])
def test_the_informative_map_is_chosen_after_normalisation(informative):
  cfg = common.get_base_config().calibration
  cfg.pool_sizes = (4, 8)
  result = calibration.calibrate({"x": _groups(informative), "y": _groups(informative, seed=1)},
                                 cfg, 8)
  assert result["method"] == calibration.METHOD
  for params in (result["per_class"]["x"], result["global"]):
    cands = params["candidates"]
    best = max(cands, key=lambda c: c["objective"])
    assert best["weight"] == (1.0 if informative == "ref" else 0.0)
    key = lambda c: (c["ref_space"], c["weight"], c["pool_size"])  # pylint: disable=unnecessary-lambda-assignment
    chosen = [c for c in cands if key(c) == key(params)]
    assert chosen[0]["within_se"] and chosen[0]["objective"] >= best["objective"] - chosen[0]["se"]
    assert params["weight"] == 1.0 if informative == "ref" else params["weight"] < 0.5
  assert len(result["global"]["candidates"]) == 24  # 2 boxes x (11 log-odds weights + probability)


def test_ties_go_to_the_default_box_then_the_larger_weight():
  g = _groups("rec")
  # The refiner's log-odds are an affine change of rec: every weight ties.
  g["ref"] = (1.0 / (1.0 + np.exp(-(g["rec"].astype(np.float64) - 100.0) / 30.0))).astype(
      np.float32)
  cfg = common.get_base_config().calibration
  cfg.pool_sizes = (4, 8)
  best = calibration.calibrate({"x": g}, cfg, 8)["per_class"]["x"]
  objs = {(c["weight"], c["pool_size"]): c["objective"] for c in best["candidates"]}
  assert all(abs(objs[(w, 8)] - objs[(0.0, 8)]) < 1e-6 for w in cfg.weights)
  assert best["weight"] == 1.0 and best["pool_size"] == 8


def test_a_gain_within_one_standard_error_does_not_beat_the_refiner():
  cands = [{"ref_space": "logodds", "weight": 0.5, "pool_size": 16, "objective": 0.80},
           {"ref_space": "logodds", "weight": 1.0, "pool_size": 16, "objective": 0.79}]
  steady = np.full(5, 0.80)
  noisy = np.array([0.75, 0.83, 0.75, 0.83, 0.79])  # paired SE of the difference 0.018 > 0.01
  assert calibration.select(cands, np.stack([steady, noisy]), 16)["weight"] == 1.0
  assert [c["within_se"] for c in cands] == [True, True]
  assert cands[1]["se"] == pytest.approx(np.std(steady - noisy, ddof=1) / np.sqrt(5))
  consistent = np.full(5, 0.79)  # the same gain on every fold: SE 0
  assert calibration.select(cands, np.stack([steady, consistent]), 16)["weight"] == 0.5


def _calibrated_map(rec, ref, params):
  v = scoring.vector(scoring.scoring_params("calibrated", calibrated=params))
  return scoring.score_host(rec, ref, v, int(params["pool_size"]))[0]


def test_calibrations_stored_before_log_odds_are_applied_in_probability_space():
  rec = np.random.default_rng(0).normal(size=(2, 8, 8)).astype(np.float32)
  ref = np.random.default_rng(1).uniform(size=(2, 8, 8)).astype(np.float32)
  old = {"rec_mean": 0.0, "rec_std": 1.0, "ref_mean": 0.5, "ref_std": 0.25, "weight": 0.5,
         "pool_size": 4}
  np.testing.assert_allclose(_calibrated_map(rec, ref, old),
                             0.5 * rec + 0.5 * (ref - 0.5) / 0.25, rtol=1e-6)
  new = dict(old, ref_space="logodds")
  np.testing.assert_allclose(_calibrated_map(rec, ref, new),
                             0.5 * rec + 0.5 * (np.log(ref / (1 - ref)) - 0.5) / 0.25,
                             rtol=1e-4, atol=1e-5)


def test_a_calibration_made_with_other_settings_is_out_of_date():
  cfg = common.get_base_config()
  cfg.calibration.weights, cfg.calibration.pool_sizes = (0.0, 0.5, 1.0), (8,)
  stored = calibration.calibrate({"x": _groups("ref")}, cfg.calibration, 8,
                                 global_groups={"x": _groups("ref", seed=1)},
                                 global_prompt_mode="pool")
  stored.update(prompt_mode=cfg.eval.prompt_mode,
                synthetic_per_image=cfg.calibration.synthetic_per_image,
                synthesis_seed=cfg.seed + cfg.calibration.seed_offset)
  stored = json.loads(json.dumps(stored))  # as read back from the checkpoint
  assert holdout.out_of_date(stored, cfg) is None
  for key, value in [("calibration.synthetic_per_image", 3), ("calibration.seed_offset", 7),
                     ("calibration.weights", (0.0, 1.0)), ("calibration.pool_sizes", (8, 16)),
                     ("eval.prompt_mode", "pool")]:
    changed = cfg.copy_and_resolve_references()
    section, name = key.split(".")
    changed[section][name] = value
    assert name.split("_")[0] in holdout.out_of_date(stored, changed), key
  assert "another method" in holdout.out_of_date(dict(stored, method="old"), cfg)
  old_global = dict(stored, **{"global": dict(stored["global"], prompt_mode="class")})
  assert "global_prompt_mode class -> pool" in holdout.out_of_date(old_global, cfg)


def test_parameters_are_applied_only_with_the_prompts_they_were_fitted_with():
  cfg = common.get_base_config()
  cfg.calibration.weights, cfg.calibration.pool_sizes = (0.0, 1.0), (8,)
  made = calibration.calibrate({"x": _groups("ref")}, cfg.calibration, 8,
                               global_groups={"x": _groups("ref", seed=1)},
                               global_prompt_mode="pool")
  assert made["per_class"]["x"]["prompt_mode"] == "class"
  assert made["global"]["prompt_mode"] == "pool"
  assert calibration.params_for(made, "x") is made["per_class"]["x"]
  assert calibration.params_for(made, None) is made["global"]
  assert fusion.make_scoring(cfg, 1.0, made)["calibration_scope"] == "global"
  with pytest.raises(calibration.PromptModeError, match="class 'y'.*fitted with pool"):
    calibration.params_for(made, "y")  # no parameters of its own: the pool-fitted global ones
  # Before this check, the global parameters were fitted on the run's eval.prompt_mode maps.
  old = dict(made, method="z-scores ...", prompt_mode="class")
  old["global"] = {k: v for k, v in made["global"].items() if k != "prompt_mode"}
  old["per_class"] = {"x": {k: v for k, v in made["per_class"]["x"].items()
                            if k != "prompt_mode"}}
  assert calibration.params_for(old, "x") is old["per_class"]["x"]
  refit = r"rerun `onenip-train` with the same --workdir and --config.eval.prompt_mode=pool"
  with pytest.raises(calibration.PromptModeError, match=refit):
    calibration.params_for(old, None)
  with pytest.raises(calibration.PromptModeError, match=refit):
    fusion.make_scoring(cfg, 1.0, old)  # an export scores pool prompts
  old["prompt_mode"] = "pool"
  with pytest.raises(calibration.PromptModeError, match="prompt_mode=class"):
    calibration.params_for(old, "x")


def test_stability_script_keeps_the_normals_and_the_chosen_copies():
  stability = loading.load_python_file(
      os.path.join(os.path.dirname(__file__), "..", "launch", "calibration_stability.py"))
  n, k = 3, 4  # validation_groups' rows: n normals, then copy 0 of each, copy 1, ...
  g = {"label": np.r_[np.zeros(n), np.ones(n * k)].astype(np.int32),
       "normal": np.arange(n * (k + 1)) < n, "source": np.arange(n * (k + 1)) % n,
       "rec": np.arange(n * (k + 1), dtype=np.float32)}
  kept = stability.copies({"x": g}, [1, 3])["x"]
  np.testing.assert_array_equal(kept["rec"], [0, 1, 2, 6, 7, 8, 12, 13, 14])
  np.testing.assert_array_equal(kept["source"], [0, 1, 2] * 3)
  assert kept["normal"].sum() == n


@pytest.mark.parametrize("name", ["mvtec", "visa", "btad", "mvtec_btad_visa"])
def test_protocol_argument_of_the_paper_configs(name):
  path = os.path.join(os.path.dirname(__file__), "..", "configs", f"{name}.py")
  default = loading.load_config(path)
  assert (default.calibration.holdout_fraction, default.eval.fusion) == (0.1, "calibrated")
  paper = loading.load_config(f"{path}:protocol=paper,res=256")
  assert paper.input_size == 256 and paper.calibration.holdout_fraction == 0.0
  assert (paper.eval.fusion, paper.eval.fusion_constant) == ("reference", "test")
  frozen = loading.load_config(f"{path}:protocol=frozen_c")
  assert frozen.calibration.holdout_fraction == 0.0
  assert (frozen.eval.fusion, frozen.eval.fusion_constant) == ("reference", "frozen")
  with pytest.raises(ValueError, match="protocol='published'"):
    loading.load_config(f"{path}:protocol=published")
