"""Tests for data_pipelines/synthesis.py (branch statistics, exactness outside the mask, determinism),
textures.py, and the building blocks (image_ops.py, imgaug_ops.py, perlin.py) against PIL / NumPy
transcriptions of the reference libraries."""
import math
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageEnhance, ImageOps

from onenip_jax.config.base import get_base_config
from data_pipelines import image_ops, imgaug_ops, perlin, synthesis, textures

SIZE = 64      # smallest size docs/algorithm.md §7 allows (divisible by 32; scars are <= 25 px)
NUM_DRAWS = 1000


@pytest.fixture(scope="module")
def cfg():
  return get_base_config().data.synthesis


@pytest.fixture(scope="module")
def texture_list(tmp_path_factory):
  """The offline fallback textures, written into a fresh cache folder."""
  cache = tmp_path_factory.mktemp("cache")
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("ONENIP_CACHE_DIR", str(cache))
    paths = textures.texture_paths("")
    assert all(p.startswith(str(cache / "textures")) for p in paths)
    assert textures.texture_paths("") == paths     # second call reuses the files
  return paths


def _photo(size, seed=0):
  """A natural-looking uint8 (size, size, 3) image from scikit-image's astronaut, randomly cropped."""
  from skimage import data
  a = data.astronaut()
  rng = np.random.default_rng(seed)
  y, x = rng.integers(0, 512 - 256, 2)
  return np.asarray(Image.fromarray(a[y:y + 256, x:x + 256]).resize((size, size), Image.BILINEAR))


@pytest.fixture(scope="module")
def draws(cfg, texture_list):
  """NUM_DRAWS samples through tf.data map with parallel calls, as the training pipeline runs it."""
  image = tf.constant(_photo(SIZE))
  tex = tf.constant(texture_list)

  @tf.autograph.experimental.do_not_convert
  def fn(i):
    seed = tf.stack([i, tf.constant(12345, tf.int64)])
    out, mask, info = synthesis.synthesize_with_info(image, seed, tex, cfg)
    return out, mask, info["branch"], info["patch_hw"]

  ds = tf.data.Dataset.range(NUM_DRAWS).map(fn, num_parallel_calls=tf.data.AUTOTUNE).batch(250)
  parts = [[t.numpy() for t in batch] for batch in ds]
  out, mask, branch, hw = [np.concatenate([p[k] for p in parts]) for k in range(4)]
  return dict(image=image.numpy(), out=out, mask=mask, branch=branch, hw=hw)


# ----------------------------------------------------------------------------------------------
# Whole-sample properties


def test_masks_binary_and_nonempty(draws):
  mask = draws["mask"]
  assert mask.shape == (NUM_DRAWS, SIZE, SIZE, 1) and mask.dtype == np.float32
  assert set(np.unique(mask)) <= {0.0, 1.0}
  nonempty = (mask.reshape(NUM_DRAWS, -1).sum(1) > 0).mean()
  assert nonempty >= 0.99, nonempty
  # CutPaste masks are never empty.
  assert (mask[draws["branch"] != synthesis.BRANCH_PERLIN].reshape(-1, SIZE * SIZE).sum(1) > 0).all()


def test_pixels_outside_mask_unchanged(draws):
  out, image, mask = draws["out"], draws["image"], draws["mask"][..., 0]
  assert out.dtype == np.uint8 and out.shape == (NUM_DRAWS, SIZE, SIZE, 3)
  changed = (out != image[None]).any(-1)
  assert not (changed & (mask == 0)).any()
  # ... and the synthesis really changes something inside the masks.
  assert changed.sum() > 0.5 * (mask == 1).sum()


def test_branch_proportions(draws):
  branch = draws["branch"]
  cut = np.isin(branch, [synthesis.BRANCH_CUTPASTE, synthesis.BRANCH_SCAR])
  # binomial sd at n=1000 is 0.016; the bounds are about 4 sd.
  assert abs(cut.mean() - 0.5) < 0.065, np.bincount(branch)
  scar_share = (branch[cut] == synthesis.BRANCH_SCAR).mean()
  assert abs(scar_share - 0.5) < 0.09, np.bincount(branch)


def test_branch_probability_follows_config(texture_list):
  c = get_base_config().data.synthesis
  c.p_cutpaste = 1.0
  image = tf.constant(_photo(SIZE))
  tex = tf.constant(texture_list)
  branches = [int(synthesis.synthesize_with_info(image, tf.constant([s, 3]), tex, c)[2]["branch"])
              for s in range(20)]
  assert set(branches) <= {synthesis.BRANCH_CUTPASTE, synthesis.BRANCH_SCAR}


def test_rectangle_sizes(draws):
  sel = draws["branch"] == synthesis.BRANCH_CUTPASTE
  hw = draws["hw"][sel]
  mask = draws["mask"][sel, :, :, 0]
  hw_area = SIZE * SIZE
  area = hw[:, 0] * hw[:, 1]
  # int(sqrt(area*aspect)) * int(sqrt(area/aspect)) <= area, and each side lost < 1 px to int().
  assert (area <= 0.15 * hw_area + 1e-6).all()
  assert ((hw[:, 0] + 1) * (hw[:, 1] + 1) >= 0.02 * hw_area).all()
  aspect = hw[:, 1] / hw[:, 0]   # pw / ph ~ aspect in [0.3, 3.3], widened for the int rounding
  assert (aspect > 0.2).all() and (aspect < 4.5).all()
  assert (aspect < 1).any() and (aspect > 1).any()
  # the mask is exactly the pasted ph x pw rectangle
  for m, (ph, pw) in zip(mask, hw):
    rows, cols = np.nonzero(m.any(1))[0], np.nonzero(m.any(0))[0]
    assert (rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1) == (ph, pw)
    assert m.sum() == ph * pw


def test_scar_sizes(draws):
  sel = draws["branch"] == synthesis.BRANCH_SCAR
  hw = draws["hw"][sel]
  mask = draws["mask"][sel, :, :, 0]
  assert hw[:, 1].min() >= 2 and hw[:, 1].max() <= 16      # pw before rotation
  assert hw[:, 0].min() >= 10 and hw[:, 0].max() <= 25     # ph before rotation
  assert len(np.unique(hw[:, 1])) > 8 and len(np.unique(hw[:, 0])) > 8
  rotated = 0
  for m, (ph, pw) in zip(mask, hw):
    rows, cols = np.nonzero(m.any(1))[0], np.nonzero(m.any(0))[0]
    bh, bw = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
    # a rectangle rotated by <= 45 degrees fits in ((pw + ph) / sqrt 2) + 2 px
    bound = math.ceil((pw + ph) / math.sqrt(2)) + 2
    assert bh <= max(bound, ph + 2) and bw <= max(bound, pw + 2)
    assert m.sum() <= 1.15 * ph * pw + 4    # nearest rotation keeps the area (up to border clipping)
    rotated += int(bw > pw + 1)
  assert rotated > 0.5 * len(hw)   # most scars are visibly rotated


def test_same_seed_same_output_different_seeds_differ(cfg, texture_list):
  image = tf.constant(_photo(SIZE, seed=1))
  tex = tf.constant(texture_list)
  outs = {}
  for branch in (None, synthesis.BRANCH_CUTPASTE, synthesis.BRANCH_SCAR, synthesis.BRANCH_PERLIN):
    for s in (0, 1):
      seed = tf.constant([s, 99], tf.int64)
      a = synthesis.synthesize_with_info(image, seed, tex, cfg, force_branch=branch)
      b = synthesis.synthesize_with_info(image, tf.constant([s, 99], tf.int32), tex, cfg, force_branch=branch)
      np.testing.assert_array_equal(a[0].numpy(), b[0].numpy())
      np.testing.assert_array_equal(a[1].numpy(), b[1].numpy())
      outs[(branch, s)] = (a[0].numpy(), a[1].numpy())
    assert not np.array_equal(outs[(branch, 0)][1], outs[(branch, 1)][1])
    assert not np.array_equal(outs[(branch, 0)][0], outs[(branch, 1)][0])


def test_graph_matches_eager(cfg, texture_list):
  image = tf.constant(_photo(SIZE, seed=2))
  tex = tf.constant(texture_list)
  for branch in (synthesis.BRANCH_CUTPASTE, synthesis.BRANCH_SCAR, synthesis.BRANCH_PERLIN):
    fn = tf.function(lambda s, b=branch: synthesis.synthesize_with_info(image, s, tex, cfg, force_branch=b))
    seed = tf.constant([branch, 5], tf.int64)
    g, e = fn(seed), synthesis.synthesize_with_info(image, seed, tex, cfg, force_branch=branch)
    np.testing.assert_array_equal(g[0].numpy(), e[0].numpy())
    np.testing.assert_array_equal(g[1].numpy(), e[1].numpy())


def test_synthesize_rejects_bad_shapes(cfg, texture_list):
  tex = tf.constant(texture_list)
  with pytest.raises(ValueError, match="divisible by 32"):
    synthesis.synthesize(tf.zeros([48, 48, 3], tf.uint8), tf.constant([0, 0]), tex, cfg)
  with pytest.raises(ValueError, match="square"):
    synthesis.synthesize(tf.zeros([64, 96, 3], tf.uint8), tf.constant([0, 0]), tex, cfg)
  with pytest.raises(ValueError, match="uint8"):
    synthesis.synthesize(tf.zeros([64, 64, 3], tf.float32), tf.constant([0, 0]), tex, cfg)
  bad = get_base_config().data.synthesis
  del bad["beta_max"]
  with pytest.raises(ValueError, match="data.synthesis.beta_max"):
    synthesis.synthesize(tf.zeros([64, 64, 3], tf.uint8), tf.constant([0, 0]), tex, bad)


# ----------------------------------------------------------------------------------------------
# Texture files


def test_texture_paths_offline_fallback(texture_list):
  assert len(texture_list) >= 10
  assert texture_list == sorted(texture_list)
  for p in texture_list:
    a = np.asarray(Image.open(p))
    assert a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3 and min(a.shape[:2]) >= 128


def test_texture_paths_layouts(tmp_path):
  for layout in ("dtd/images/banded", "dtd/images/zigzag", "flat/banded", "flat/zigzag"):
    d = tmp_path / layout
    d.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(d / "b_1.jpg")
    Image.new("RGB", (8, 8)).save(d / "a_2.PNG")
    (d / "notes.txt").write_text("x")
  (tmp_path / "dtd" / "labels").mkdir()
  (tmp_path / "dtd" / "labels" / "skip.jpg").write_bytes(b"")
  paths = textures.texture_paths(str(tmp_path / "dtd"))
  assert [os.path.relpath(p, tmp_path) for p in paths] == [
      "dtd/images/banded/a_2.PNG", "dtd/images/banded/b_1.jpg",
      "dtd/images/zigzag/a_2.PNG", "dtd/images/zigzag/b_1.jpg"]
  assert len(textures.texture_paths(str(tmp_path / "flat"))) == 4
  assert textures.texture_paths(str(tmp_path / "dtd" / "images")) == paths


def test_texture_paths_errors_name_the_folder(tmp_path):
  empty = tmp_path / "no_textures_here"
  (empty / "cls").mkdir(parents=True)
  with pytest.raises(ValueError, match="no_textures_here"):
    textures.texture_paths(str(empty))
  with pytest.raises(ValueError, match="does_not_exist"):
    textures.texture_paths(str(tmp_path / "does_not_exist"))


def test_load_texture_jpeg_and_bgr(tmp_path):
  rgb = _photo(96, seed=3)
  Image.fromarray(rgb).save(tmp_path / "t.png")
  out = textures.load_texture(tf.constant(str(tmp_path / "t.png")), 96, bgr=True).numpy()
  np.testing.assert_array_equal(out, rgb[:, :, ::-1])    # same size: no resampling change
  Image.fromarray(rgb).save(tmp_path / "t.jpg", quality=95)
  jpg = textures.load_texture(tf.constant(str(tmp_path / "t.jpg")), 64, bgr=False).numpy()
  assert jpg.shape == (64, 64, 3) and jpg.dtype == np.uint8


# ----------------------------------------------------------------------------------------------
# Building blocks against PIL / NumPy references


def _rand_image(seed, shape=(64, 64, 3), low_contrast=False):
  rng = np.random.default_rng(seed)
  a = _photo(shape[0], seed=seed).astype(np.int32)
  a = a + rng.integers(-20, 21, a.shape)
  if low_contrast:
    a = 60 + a // 3
  return np.clip(a, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("index", range(10))
def test_augmenters_keep_range_and_shape(index):
  image = tf.constant(_rand_image(index))
  changed = 0
  for s in range(4):
    out = imgaug_ops.apply_augmenter(tf.constant(index), image, tf.constant([s, index]))
    assert out.dtype == tf.uint8 and out.shape == (64, 64, 3)
    changed += int(not np.array_equal(out.numpy(), image.numpy()))
  assert changed >= 1, imgaug_ops.AUGMENTER_NAMES[index]


def test_augment_texture_draws_three_distinct():
  image = tf.constant(_rand_image(0))
  seen = set()
  for s in range(30):
    _, idx = imgaug_ops.augment_texture(image, tf.constant([s, 1]))
    idx = idx.numpy()
    assert len(set(idx.tolist())) == 3 and idx.min() >= 0 and idx.max() <= 9
    seen |= set(idx.tolist())
  assert seen == set(range(10))


def test_invert_posterize_solarize_match_pil():
  a = _rand_image(1)
  np.testing.assert_array_equal(imgaug_ops.invert(tf.constant(a)).numpy(),
                                np.asarray(ImageOps.invert(Image.fromarray(a))))
  for bits in range(1, 9):
    np.testing.assert_array_equal(imgaug_ops.posterize(tf.constant(a), bits).numpy(),
                                  np.asarray(ImageOps.posterize(Image.fromarray(a), bits)))
  for thr in (32.0, 77.6, 127.9):
    np.testing.assert_array_equal(imgaug_ops.solarize(tf.constant(a), thr).numpy(),
                                  np.asarray(ImageOps.solarize(Image.fromarray(a), int(thr))))


def test_autocontrast_matches_pil():
  for seed, low in ((2, True), (3, False)):
    a = _rand_image(seed, low_contrast=low)
    for cutoff in (0, 1, 7, 20):
      ref = np.asarray(ImageOps.autocontrast(Image.fromarray(a), cutoff=cutoff))
      np.testing.assert_array_equal(imgaug_ops.autocontrast(tf.constant(a), cutoff).numpy(), ref)


def _equalize_imgaug_ref(image):
  """NumPy transcription of imgaug 0.4 pillike._equalize_no_pil_ (images >= 64*64 px)."""
  out = np.empty_like(image)
  for c in range(image.shape[2]):
    h = np.bincount(image[:, :, c].ravel(), minlength=256)
    step = h[:-1].sum() // 255
    if (h > 0).sum() <= 1 or not step:
      lut = np.arange(256)
    else:
      cs = np.cumsum(h)
      lut = np.concatenate([[step // 2], step // 2 + cs[:-1]]) // step
    out[:, :, c] = np.clip(lut, None, 255).astype(np.uint8)[image[:, :, c]]
  return out


def test_equalize_matches_reference():
  for seed, low in ((4, True), (5, False)):
    a = _rand_image(seed, low_contrast=low)
    np.testing.assert_array_equal(imgaug_ops.equalize(tf.constant(a)).numpy(), _equalize_imgaug_ref(a))
  flat = np.full((64, 64, 3), 77, np.uint8)
  np.testing.assert_array_equal(imgaug_ops.equalize(tf.constant(flat)).numpy(), flat)


def test_sharpness_matches_pil():
  a = _rand_image(6)
  for factor in (0.0, 0.37, 1.0, 1.8):
    ref = np.asarray(ImageEnhance.Sharpness(Image.fromarray(a)).enhance(factor))
    np.testing.assert_array_equal(imgaug_ops.enhance_sharpness(tf.constant(a), factor).numpy(), ref)


def test_gamma_matches_lut_reference():
  a = _rand_image(7)
  gammas = np.array([0.5, 1.3, 2.0], np.float32)
  values = np.linspace(0, 1.0, 256, dtype=np.float32)
  ref = np.stack([np.clip(values ** g * 255, 0, 255).astype(np.uint8)[a[:, :, c]]
                  for c, g in enumerate(gammas)], -1)
  np.testing.assert_array_equal(imgaug_ops.gamma_contrast(tf.constant(a), gammas).numpy(), ref)


def test_hue_saturation_shift_close_to_colorsys():
  import colorsys
  a = _rand_image(8, shape=(32, 32, 3))
  ident = imgaug_ops.add_hue_saturation(tf.constant(a), 0, 0).numpy().astype(int)
  assert np.abs(ident - a).max() <= 3     # OpenCV's uint8 HSV round trip is not exact
  out = imgaug_ops.add_hue_saturation(tf.constant(a), 40, -30).numpy().astype(int)
  hue = int(40 / 255 * 180) * 2 / 360     # OpenCV hue units (degrees / 2)
  ref = np.zeros_like(out)
  for y in range(32):
    for x in range(32):
      h, s, v = colorsys.rgb_to_hsv(*(a[y, x] / 255.0))
      s = min(max(s - 30 / 255, 0), 1)
      ref[y, x] = np.round(np.array(colorsys.hsv_to_rgb((h + hue) % 1.0, s, v)) * 255)
  assert np.abs(out - ref).max() <= 6
  assert np.abs(out - ref).mean() < 1.0


def test_brightness_identity_and_direction():
  a = _rand_image(9)
  for space in range(6):
    same = imgaug_ops.multiply_add_brightness(tf.constant(a), space, 1.0, 0.0, False).numpy().astype(int)
    assert np.abs(same - a).max() <= 2, space
    up = imgaug_ops.multiply_add_brightness(tf.constant(a), space, 1.2, 20.0, False).numpy().astype(float)
    down = imgaug_ops.multiply_add_brightness(tf.constant(a), space, 0.8, -20.0, True).numpy().astype(float)
    assert up.mean() > a.mean() + 10 > a.mean() - 10 > down.mean(), space


@pytest.mark.parametrize("op,pil_cls,factor", [
    (image_ops.adjust_brightness, ImageEnhance.Brightness, 1.37),
    (image_ops.adjust_brightness, ImageEnhance.Brightness, 0.61),
    (image_ops.adjust_contrast, ImageEnhance.Contrast, 1.3),
    (image_ops.adjust_contrast, ImageEnhance.Contrast, 0.65),
    (image_ops.adjust_saturation, ImageEnhance.Color, 1.39),
    (image_ops.adjust_saturation, ImageEnhance.Color, 0.6),
])
def test_color_jitter_ops_match_pil(op, pil_cls, factor):
  a = _rand_image(10, shape=(24, 17, 3))
  ref = np.asarray(pil_cls(Image.fromarray(a)).enhance(factor))
  out = op(tf.constant(a, tf.float32), factor).numpy().astype(np.uint8)
  np.testing.assert_array_equal(out, ref)


@pytest.mark.parametrize("hue", [0.07, -0.1, 0.0312])
def test_adjust_hue_matches_torchvision_pil(hue):
  a = _rand_image(11, shape=(24, 17, 3))
  h, s, v = Image.fromarray(a).convert("HSV").split()
  np_h = np.array(h, np.uint8)
  np_h = (np_h.astype(np.int64) + int(hue * 255)) % 256   # np.uint8(hue * 255) wraps like this
  ref = np.asarray(Image.merge("HSV", (Image.fromarray(np_h.astype(np.uint8), "L"), s, v)).convert("RGB"))
  out = image_ops.adjust_hue(tf.constant(a, tf.float32), hue).numpy().astype(np.uint8)
  np.testing.assert_array_equal(out, ref)


def test_color_jitter_changes_patch_and_keeps_shape():
  a = _rand_image(12, shape=(13, 7, 3))
  outs = [image_ops.color_jitter(tf.constant(a), tf.constant([s, 0])).numpy() for s in range(5)]
  assert all(o.shape == a.shape and o.dtype == np.uint8 for o in outs)
  assert sum(not np.array_equal(o, a) for o in outs) >= 4


@pytest.mark.parametrize("angle", [-45.0, -44.3, -12.0, 7.5, 30.0, 45.0])
@pytest.mark.parametrize("hw", [(10, 2), (25, 16), (17, 9)])
def test_rotate_expand_matches_pil(angle, hw):
  """Bit-exact, including Pillow's 16.16 fixed-point sampling."""
  rng = np.random.default_rng(0)
  patch = rng.integers(1, 256, hw + (3,), dtype=np.uint8)
  rgba = Image.fromarray(patch).convert("RGBA").rotate(angle, expand=True)
  ref = np.asarray(rgba)
  out, alpha = image_ops.rotate_expand_nearest(tf.constant(patch), tf.constant(angle, tf.float32))
  assert out.shape[:2] == ref.shape[:2]
  np.testing.assert_array_equal(alpha.numpy(), ref[:, :, 3] > 0)
  np.testing.assert_array_equal(out.numpy(), ref[:, :, :3])


# ----------------------------------------------------------------------------------------------
# Perlin


def _draem_perlin_ref(shape, res, angles):
  """NumPy transcription of DRAEM's rand_perlin_2d_np with the lattice angles given."""
  delta = (res[0] / shape[0], res[1] / shape[1])
  d = (shape[0] // res[0], shape[1] // res[1])
  grid = np.mgrid[0:res[0]:delta[0], 0:res[1]:delta[1]].transpose(1, 2, 0) % 1
  grads = np.stack((np.cos(angles), np.sin(angles)), axis=-1)

  def tile(s1, s2):
    return np.repeat(np.repeat(grads[s1[0]:s1[1], s2[0]:s2[1]], d[0], axis=0), d[1], axis=1)

  def dot(grad, shift):
    g = np.stack((grid[:shape[0], :shape[1], 0] + shift[0], grid[:shape[0], :shape[1], 1] + shift[1]), -1)
    return (g * grad[:shape[0], :shape[1]]).sum(-1)

  n00 = dot(tile([0, -1], [0, -1]), [0, 0])
  n10 = dot(tile([1, None], [0, -1]), [-1, 0])
  n01 = dot(tile([0, -1], [1, None]), [0, -1])
  n11 = dot(tile([1, None], [1, None]), [-1, -1])
  t = 6 * grid ** 5 - 15 * grid ** 4 + 10 * grid ** 3

  def lerp(x, y, w):
    return (y - x) * w + x

  t = t[:shape[0], :shape[1]]
  return math.sqrt(2) * lerp(lerp(n00, n10, t[..., 0]), lerp(n01, n11, t[..., 0]), t[..., 1])


@pytest.mark.parametrize("res", [(2, 2), (4, 32), (16, 8), (32, 32)])
def test_perlin_matches_draem(res):
  rng = np.random.default_rng(1)
  angles = 2 * np.pi * rng.random((res[0] + 1, res[1] + 1))
  ref = _draem_perlin_ref((64, 64), res, angles)
  out = perlin.perlin_from_angles(tf.constant(angles, tf.float32), tf.constant(res), 64).numpy()
  np.testing.assert_allclose(out, ref, atol=2e-5)


def test_perlin_noise_statistics():
  fractions, lo, hi, seen_res = [], 0.0, 0.0, set()
  for s in range(150):
    n = perlin.perlin_noise(tf.constant([s, 11]), SIZE, (1, 5), 5.0).numpy()
    lo, hi = min(lo, n.min()), max(hi, n.max())
    fractions.append((n > 0.5).mean())
  assert -1.5 <= lo < -0.5 and 0.5 < hi <= 1.5
  fractions = np.array(fractions)
  assert 0.02 < fractions.mean() < 0.3, fractions.mean()
  assert (fractions > 0).mean() > 0.95


def test_rotate_bilinear_small_angle_and_fill():
  x = np.ones((64, 64), np.float32)
  out = perlin.rotate_bilinear(tf.constant(x), tf.constant(5.0)).numpy()
  assert out[32, 32] == pytest.approx(1.0)
  assert out[0, 0] == 0.0 and out[0, 63] == 0.0     # corners rotate out: filled with 0
  same = perlin.rotate_bilinear(tf.constant(x * 0.5), tf.constant(0.0)).numpy()
  np.testing.assert_allclose(same, 0.5)
