"""Tests of data_pipelines.input_pipeline: decoding, resizing, train stream and eval batches."""
import importlib.util
import math
import pathlib
import types

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from onenip_jax.config import base as common
from data_pipelines import indexing
from data_pipelines import input_pipeline as ip
from data_pipelines import textures

S = 32  # input size of the synthetic-data tests


def _fake_synthesize(image, seed, texture_list, cfg):
  """Stand-in for synthesis.synthesize: inverts a seed-dependent 8x8 square (mask = square)."""
  del texture_list, cfg
  seed = tf.ensure_shape(seed, [2])
  yx = tf.random.stateless_uniform([2], seed=seed, minval=0, maxval=tf.shape(image)[0] - 8,
                                   dtype=tf.int32)
  rows = tf.range(tf.shape(image)[0])[:, None]
  cols = tf.range(tf.shape(image)[1])[None, :]
  m = (rows >= yx[0]) & (rows < yx[0] + 8) & (cols >= yx[1]) & (cols < yx[1] + 8)
  m = tf.cast(m, tf.uint8)[..., None]
  out = image * (1 - m) + (255 - image) * m
  return out, tf.cast(m, tf.float32)


@pytest.fixture
def fake_synthesis(monkeypatch):
  fake = types.ModuleType("data_pipelines.synthesis")
  fake.synthesize = _fake_synthesize
  monkeypatch.setattr(ip, "synthesis", fake)  # the module input_pipeline synthesises with
  monkeypatch.setattr(textures, "texture_paths", lambda d: ["unused.jpg"])
  return fake


def _img(path: pathlib.Path, size, seed, mode="RGB"):
  path.parent.mkdir(parents=True, exist_ok=True)
  a = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
  Image.fromarray(a).convert(mode).save(path)
  return path


@pytest.fixture(scope="module")
def small(tmp_path_factory):
  """An mvtec-layout dataset: classes a/b/c with 5/4/3 train images, test sets, one mask missing."""
  root = tmp_path_factory.mktemp("small")
  seed = 0
  for c, n in (("a", 5), ("b", 4), ("c", 3)):
    for i in range(n):
      seed += 1
      _img(root / c / "train" / "good" / f"{i:03d}.png", (40 + seed, 30 + seed), seed)
    for i in range(2):
      seed += 1
      _img(root / c / "test" / "good" / f"{i:03d}.jpg", (36, 36), seed)
    for i in range(2):
      seed += 1
      _img(root / c / "test" / "hole" / f"{i:03d}.png", (36, 36), seed)
      if not (c == "c" and i == 1):
        m = np.zeros((36, 36), np.uint8)
        m[4 + i:20, 8:30 - i] = 255
        (root / c / "ground_truth" / "hole").mkdir(parents=True, exist_ok=True)
        Image.fromarray(m).save(root / c / "ground_truth" / "hole" / f"{i:03d}_mask.png")
  return root


def _cfg(root, batch_size=8, seed=133):
  cfg = common.get_base_config()
  cfg.seed = seed
  cfg.input_size = S
  cfg.batch_size = batch_size
  cfg.data.root = str(root)
  cfg.data.num_parallel_calls = 2
  return cfg


def _take(it, n):
  return [next(it) for _ in range(n)]


def _unnorm(x, cfg):
  return (x * np.asarray(cfg.data.std) + np.asarray(cfg.data.mean)) * 255.0


# ------------------------------------------------------------------------------------------------
# Decoding and resizing


@pytest.mark.parametrize("ext, mode", [
    ("png", "L"), ("png", "RGB"), ("png", "RGBA"), ("png", "P"), ("png", "LA"),
    ("jpg", "RGB"), ("jpg", "L"), ("bmp", "1"), ("bmp", "L"), ("bmp", "P"), ("bmp", "RGB"),
    ("bmp", "RGBA"), ("tif", "RGB"), ("tiff", "L"), ("tif", "RGBA"), ("gif", "P")])
def test_decode_formats(tmp_path, ext, mode):
  a = np.random.default_rng(3).integers(0, 256, (21, 34, 3), dtype=np.uint8)
  a[::2] //= 4  # some smooth structure so JPEG is not pure noise
  path = tmp_path / f"x.{ext}"
  Image.fromarray(a).convert(mode).save(path)
  want = np.asarray(Image.open(path).convert("RGB"))
  got = ip.decode(tf.io.read_file(str(path)), 3).numpy()
  assert got.shape == (21, 34, 3) and got.dtype == np.uint8
  np.testing.assert_array_equal(got, want)
  gray = ip.decode(tf.io.read_file(str(path)), 1).numpy()
  assert gray.shape == (21, 34, 1)


@pytest.mark.parametrize("ext", ["png", "tif"])
def test_decode_16bit(tmp_path, ext):
  a = np.random.default_rng(4).integers(0, 65536, (12, 15), dtype=np.uint16)
  path = tmp_path / f"x16.{ext}"
  Image.fromarray(a).save(path)
  got = ip.decode(tf.io.read_file(str(path)), 3).numpy()
  np.testing.assert_array_equal(got, np.repeat((a >> 8).astype(np.uint8)[..., None], 3, -1))


def test_decode_by_content_not_extension(tmp_path):
  a = np.random.default_rng(5).integers(0, 256, (10, 11, 3), dtype=np.uint8)
  path = tmp_path / "really_a_png.jpg"
  Image.fromarray(a).save(path, format="PNG")
  np.testing.assert_array_equal(ip.decode(tf.io.read_file(str(path)), 3).numpy(), a)


def test_real_batch_matches_pil(shared_data):
  """Decoded + resized eval batches vs PIL resize((S, S), BILINEAR): <= 1/255 mean abs."""
  cfg = _cfg(shared_data / "real", batch_size=8)
  cfg.input_size = 224
  index = indexing.index_dataset(cfg.data)
  samples = [s for s in index.test if s.label == 1]
  samples = samples[:10] + samples[-14:]  # bottle PNGs and magnetic-tile JPEGs of several sizes
  assert {s.cls for s in samples} == {"bottle", "magnetic_tile"}
  batches = list(ip.make_eval_iterator(samples, index, cfg, batch_size=8, with_prompt=False))
  assert len(batches) == 3
  images = np.concatenate([b["image"] for b in batches])
  masks = np.concatenate([b["mask"] for b in batches])
  assert images.shape == (24, 224, 224, 3) and images.dtype == np.float32
  assert set(np.unique(masks)) == {0.0, 1.0}
  for k, s in enumerate(samples):
    want = np.asarray(Image.open(s.path).convert("RGB").resize((224, 224), Image.BILINEAR),
                      np.float64)
    diff = np.abs(_unnorm(images[k], cfg) - want).mean()
    assert diff <= 1.0, (s.path, diff)
    want_m = np.asarray(Image.open(s.mask_path).convert("L").resize((224, 224), Image.NEAREST))
    np.testing.assert_array_equal(masks[k, ..., 0], want_m > 0, err_msg=s.mask_path)
    assert masks[k].sum() > 0
  # Single-image helpers use the same ops: identical pixels.
  np.testing.assert_array_equal(
      ip.load_image(samples[3].path, 224, cfg.data.mean, cfg.data.std), images[3])
  np.testing.assert_array_equal(ip.load_mask(samples[3].mask_path, 224), masks[3])
  raw = ip.load_image(samples[3].path, 224)
  assert raw.dtype == np.uint8
  np.testing.assert_allclose(raw, _unnorm(images[3], cfg), atol=1e-3)


# ------------------------------------------------------------------------------------------------
# Training stream


def test_train_batch_contents(small, fake_synthesis):
  cfg = _cfg(small)
  index = indexing.index_dataset(cfg.data)
  batches = _take(ip.make_train_iterator(index, cfg), 4)
  b = batches[0]
  assert set(b) == {"normal", "synthetic", "prompt", "mask", "class_id", "normal_index",
                    "prompt_index"}
  for k in ("normal", "synthetic", "prompt"):
    assert b[k].shape == (8, S, S, 3) and b[k].dtype == np.float32
  assert b["mask"].shape == (8, S, S, 1) and b["mask"].dtype == np.float32
  for k in ("class_id", "normal_index", "prompt_index"):
    assert b[k].shape == (8,) and b[k].dtype == np.int32
  for b in batches:
    assert set(np.unique(b["mask"])) <= {0.0, 1.0}
    assert np.all(b["mask"].sum(axis=(1, 2, 3)) == 64)
    for j in range(8):
      normal, prompt = index.train[b["normal_index"][j]], index.train[b["prompt_index"][j]]
      assert index.class_id(normal.cls) == b["class_id"][j]
      assert prompt.cls == normal.cls and prompt.label == 0
      np.testing.assert_array_equal(
          b["normal"][j], ip.load_image(normal.path, S, cfg.data.mean, cfg.data.std))
      np.testing.assert_array_equal(
          b["prompt"][j], ip.load_image(prompt.path, S, cfg.data.mean, cfg.data.std))
      # The synthetic image is the decoded normal image passed through `synthesize`.
      m = b["mask"][j].astype(bool)[..., 0]
      np.testing.assert_allclose(b["synthetic"][j][~m], b["normal"][j][~m])
      assert not np.allclose(b["synthetic"][j][m], b["normal"][j][m])


def test_epochs_are_permutations(small, fake_synthesis):
  cfg = _cfg(small, batch_size=4)  # 12 train images: 3 steps per epoch
  index = indexing.index_dataset(cfg.data)
  assert ip.steps_per_epoch(index, 4) == 3 and ip.steps_per_epoch(index, 5) == 3
  order = np.concatenate([b["normal_index"] for b in _take(ip.make_train_iterator(index, cfg), 9)])
  epochs = order.reshape(3, 12)
  for e in epochs:
    assert sorted(e) == list(range(12))
  assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
  assert not np.array_equal(epochs[0], np.arange(12))


def test_train_determinism_and_resume(small, fake_synthesis):
  cfg = _cfg(small)  # B = 8, N = 12: steps cross epoch boundaries
  index = indexing.index_dataset(cfg.data)
  run1 = _take(ip.make_train_iterator(index, cfg), 5)
  run2 = _take(ip.make_train_iterator(index, cfg), 5)
  resumed = _take(ip.make_train_iterator(index, cfg, start_step=2), 3)  # starts mid-epoch 1
  for a, b in zip(run1, run2):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  for a, b in zip(run1[2:], resumed):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  other = _take(ip.make_train_iterator(index, _cfg(small, seed=7)), 2)
  assert not np.array_equal(other[0]["normal_index"], run1[0]["normal_index"])
  # Prompts and synthetic masks are redrawn per stream position, not fixed per image.
  by_image = {}
  for b in run1:
    for n, p, m in zip(b["normal_index"], b["prompt_index"], b["mask"]):
      by_image.setdefault(int(n), []).append((int(p), m.tobytes()))
  repeated = [v for v in by_image.values() if len(v) > 1]
  assert repeated
  assert any(len({p for p, _ in v}) > 1 for v in repeated)
  assert all(len({m for _, m in v}) == len(v) for v in repeated)


@pytest.mark.parametrize("count", [2, 4])
def test_process_slices_concatenate_to_global_batch(small, fake_synthesis, count):
  cfg = _cfg(small)
  index = indexing.index_dataset(cfg.data)
  whole = _take(ip.make_train_iterator(index, cfg, start_step=1), 3)
  parts = [_take(ip.make_train_iterator(index, cfg, process_index=p, process_count=count,
                                        start_step=1), 3) for p in range(count)]
  for step in range(3):
    for k in whole[step]:
      got = np.concatenate([parts[p][step][k] for p in range(count)])
      np.testing.assert_array_equal(got, whole[step][k])
  assert parts[0][0]["normal"].shape[0] == 8 // count


def test_decode_clean_false(small, fake_synthesis):
  cfg = _cfg(small)
  index = indexing.index_dataset(cfg.data)
  full = next(ip.make_train_iterator(index, cfg))
  lean = next(ip.make_train_iterator(index, cfg, decode_clean=False))
  assert set(lean) == {"synthetic", "mask", "class_id", "normal_index", "prompt_index"}
  for k in lean:
    np.testing.assert_array_equal(lean[k], full[k])


def test_batch_not_divisible(small, fake_synthesis):
  cfg = _cfg(small, batch_size=6)
  index = indexing.index_dataset(cfg.data)
  with pytest.raises(ValueError, match="batch_size=6"):
    ip.make_train_iterator(index, cfg, process_count=4)
  with pytest.raises(ValueError, match="batch_size=6"):
    ip.make_eval_iterator(index.test, index, cfg, batch_size=6, process_count=4)


# ------------------------------------------------------------------------------------------------
# Evaluation batches


@pytest.mark.parametrize("n, batch, count", [
    (1, 8, 1), (7, 8, 2), (8, 8, 4), (9, 8, 2), (17, 4, 4), (100, 16, 8), (33, 6, 3)])
def test_eval_positions_cover_once(n, batch, count):
  per = [ip.eval_positions(n, batch, p, count) for p in range(count)]
  steps = math.ceil(n / batch)
  assert all(len(x) == steps * batch // count for x in per)
  flat = np.concatenate(per)
  assert sorted(flat[flat >= 0]) == list(range(n))
  assert (flat < 0).sum() == steps * batch - n
  # Global batch s is the concatenation of every process's s-th slice, in order.
  b = batch // count
  glob = np.concatenate([x.reshape(steps, b) for x in per], axis=1).reshape(-1)
  np.testing.assert_array_equal(glob[glob >= 0], np.arange(n))


@pytest.mark.parametrize("batch, count", [(4, 1), (4, 2), (8, 4)])
def test_eval_iterator(small, batch, count):
  cfg = _cfg(small)
  index = indexing.index_dataset(cfg.data)
  samples = index.test  # 12 samples; class c's second anomaly has no mask
  per_proc = [list(ip.make_eval_iterator(samples, index, cfg, batch_size=batch, process_index=p,
                                         process_count=count)) for p in range(count)]
  seen = {}
  for batches in per_proc:
    assert len(batches) == math.ceil(len(samples) / batch)
    for b in batches:
      assert b["image"].shape == (batch // count, S, S, 3)
      assert b["prompt"].shape == (batch // count, S, S, 3)
      assert b["mask"].shape == (batch // count, S, S, 1)
      for j in np.nonzero(b["valid"])[0]:
        i = int(b["index"][j])
        assert i not in seen
        seen[i] = {k: v[j] for k, v in b.items()}
      assert np.all(b["index"][~b["valid"]] == -1)
  assert sorted(seen) == list(range(len(samples)))
  for i, s in enumerate(samples):
    row = seen[i]
    assert row["label"] == s.label and row["class_id"] == index.class_id(s.cls)
    assert row["has_mask"] == (s.mask_path is not None)
    if s.mask_path:
      np.testing.assert_array_equal(row["mask"], ip.load_mask(s.mask_path, S))
      assert row["mask"].sum() > 0
    else:
      assert not row["mask"].any()
    np.testing.assert_array_equal(row["image"], ip.load_image(s.path, S, cfg.data.mean,
                                                              cfg.data.std))
    prompt = index.train[row["prompt_index"]]
    assert prompt.cls == s.cls and prompt.label == 0
    np.testing.assert_array_equal(row["prompt"], ip.load_image(prompt.path, S, cfg.data.mean,
                                                               cfg.data.std))
  # Prompts depend on (seed, sample position) only: the same on any batch/process count.
  ref = np.concatenate([b["prompt_index"][b["valid"]] for b in ip.make_eval_iterator(
      samples, index, cfg, batch_size=12)])
  np.testing.assert_array_equal(ref, [seen[i]["prompt_index"] for i in range(len(samples))])


def test_eval_prompts_vary_with_seed_and_sample(small):
  index = indexing.index_dataset(_cfg(small).data)
  samples = [s for s in index.test if s.cls == "a"] * 6  # 24 samples of class a (5 normals)

  def prompts(seed):
    it = ip.make_eval_iterator(samples, index, _cfg(small, seed=seed), batch_size=8)
    return np.concatenate([b["prompt_index"] for b in it])

  p1, p2 = prompts(1), prompts(2)
  assert len(set(p1.tolist())) > 1 and not np.array_equal(p1, p2)
  np.testing.assert_array_equal(p1, prompts(1))


def test_eval_without_prompt(small):
  cfg = _cfg(small)
  index = indexing.index_dataset(cfg.data)
  batches = list(ip.make_eval_iterator(index.train, index, cfg, batch_size=8, with_prompt=False))
  assert "prompt" not in batches[0] and "prompt_index" not in batches[0]
  idx = np.concatenate([b["index"][b["valid"]] for b in batches])
  np.testing.assert_array_equal(idx, np.arange(len(index.train)))
  assert list(ip.make_eval_iterator([], index, cfg, batch_size=8)) == []


# ------------------------------------------------------------------------------------------------
# With the real synthesis module


@pytest.mark.skipif(importlib.util.find_spec("data_pipelines.synthesis") is None,
                    reason="data_pipelines/synthesis.py not present")
def test_real_synthesis(small, shared_data):
  cfg = _cfg(small, batch_size=4)
  cfg.input_size = 64
  cfg.data.textures = str(shared_data / "textures")
  index = indexing.index_dataset(cfg.data)
  a = next(ip.make_train_iterator(index, cfg, start_step=1))
  assert a["synthetic"].shape == (4, 64, 64, 3) and a["mask"].shape == (4, 64, 64, 1)
  assert set(np.unique(a["mask"])) <= {0.0, 1.0}
  outside = a["mask"][..., 0] == 0
  np.testing.assert_array_equal(a["synthetic"][outside], a["normal"][outside])


@pytest.mark.parametrize("hw", [(17, 40), (320, 320), (233, 97), (224, 224), (5, 3)])
def test_mask_nearest_matches_pil(tmp_path, hw):
  m = (np.random.default_rng(hw[0]).random(hw) > 0.5).astype(np.uint8) * 255
  path = tmp_path / "m.png"
  Image.fromarray(m).save(path)
  for size in (32, 224):
    want = np.asarray(Image.fromarray(m).resize((size, size), Image.NEAREST)) > 0
    np.testing.assert_array_equal(ip.load_mask(str(path), size)[..., 0], want)
