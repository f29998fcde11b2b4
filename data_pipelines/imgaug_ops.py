"""TF port of the imgaug 0.4 texture augmenters of DRAEM's Perlin branch (LUT semantics, OpenCV HSV).

Each augmenter core takes uint8 (H, W, 3) and returns uint8 (H, W, 3); `augment_texture` draws three
distinct ones and their parameters from a stateless seed, as the reference's `iaa.SomeOf(3, ...)`.
"""
from typing import Callable

import numpy as np

from data_pipelines.image_ops import randint, split_seed, to_u8, trunc_u8, uniform
from data_pipelines.tf_setup import import_tensorflow

tf = import_tensorflow()

AUGMENTER_NAMES = (
    "gamma_contrast", "multiply_add_brightness", "enhance_sharpness", "add_hue_saturation",
    "solarize", "posterize", "fliplr", "invert", "autocontrast", "equalize")


# ----------------------------------------------------------------------------------------------
# LUT helpers


def _apply_lut(image_u8: tf.Tensor, lut: tf.Tensor) -> tf.Tensor:
  """Per-channel LUT. image (H, W, 3) uint8, lut (3, 256) int -> (H, W, 3) uint8."""
  idx = tf.cast(image_u8, tf.int32) + tf.constant([0, 256, 512], tf.int32)
  lut = tf.clip_by_value(tf.cast(lut, tf.int32), 0, 255)
  return tf.cast(tf.gather(tf.reshape(lut, [-1]), idx), tf.uint8)


def _histograms(image_u8: tf.Tensor) -> tf.Tensor:
  """Per-channel 256-bin histograms. (H, W, 3) uint8 -> (3, 256) int32."""
  idx = tf.cast(image_u8, tf.int32) + tf.constant([0, 256, 512], tf.int32)
  counts = tf.math.bincount(tf.reshape(idx, [-1]), minlength=768, maxlength=768, dtype=tf.int32)
  return tf.reshape(counts, [3, 256])


# ----------------------------------------------------------------------------------------------
# imgaug-0.4-style texture augmenters. Each core takes uint8 (H, W, 3) and returns uint8 (H, W, 3).


def gamma_contrast(image: tf.Tensor, gammas: tf.Tensor) -> tf.Tensor:
  """iaa.GammaContrast per channel: LUT floor(255 * (v/255)**gamma). gammas (3,) float."""
  values = tf.linspace(0.0, 1.0, 256)
  lut = tf.floor(tf.clip_by_value(values[None, :] ** tf.cast(gammas, tf.float32)[:, None] * 255.0, 0.0, 255.0))
  return _apply_lut(image, tf.cast(lut, tf.int32))


def _rgb_to_lab_l(rgb01: tf.Tensor):
  """OpenCV-style (D65, sRGB gamma) RGB in [0, 1] -> (L* in [0, 100], a*, b*), float32."""
  lin = tf.where(rgb01 <= 0.04045, rgb01 / 12.92, ((rgb01 + 0.055) / 1.055) ** 2.4)
  m = tf.constant([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169],
                   [0.019334, 0.119193, 0.950227]], tf.float32)
  xyz = tf.einsum("...c,dc->...d", lin, m) / tf.constant([0.950456, 1.0, 1.088754])

  def f(t):
    return tf.where(t > 0.008856, tf.pow(tf.maximum(t, 1e-12), 1.0 / 3.0), 7.787 * t + 16.0 / 116.0)

  fx, fy, fz = f(xyz[..., 0]), f(xyz[..., 1]), f(xyz[..., 2])
  l = tf.where(xyz[..., 1] > 0.008856, 116.0 * fy - 16.0, 903.3 * xyz[..., 1])
  return l, 500.0 * (fx - fy), 200.0 * (fy - fz)


def _lab_to_rgb(l, a, b) -> tf.Tensor:
  """Inverse of `_rgb_to_lab_l`: returns RGB in [0, 1] (clipped), float32."""
  fy = (l + 16.0) / 116.0
  y = tf.where(l > 7.9996, fy ** 3, l / 903.3)
  fy = tf.where(l > 7.9996, fy, 7.787 * y + 16.0 / 116.0)
  fx = fy + a / 500.0
  fz = fy - b / 200.0

  def finv(t):
    return tf.where(t ** 3 > 0.008856, t ** 3, (t - 16.0 / 116.0) / 7.787)

  xyz = tf.stack([finv(fx) * 0.950456, y, finv(fz) * 1.088754], -1)
  m = tf.constant([[3.240479, -1.53715, -0.498535], [-0.969256, 1.875991, 0.041556],
                   [0.055648, -0.204043, 1.057311]], tf.float32)
  lin = tf.clip_by_value(tf.einsum("...c,dc->...d", xyz, m), 0.0, 1.0)
  return tf.where(lin <= 0.0031308, 12.92 * lin, 1.055 * tf.pow(tf.maximum(lin, 1e-12), 1.0 / 2.4) - 0.055)


def multiply_add_brightness(image: tf.Tensor, space: tf.Tensor, mul: tf.Tensor, add: tf.Tensor,
                            add_first: tf.Tensor) -> tf.Tensor:
  """iaa.MultiplyAndAddToBrightness on the brightness channel of a colourspace.

  Args:
    image: (H, W, 3) uint8.
    space: int index into (YCrCb, HSV, HLS, Lab, Luv, YUV) -> channel Y, V, L, L*, L* (as Lab), Y.
    mul: float multiplier (uint8 LUT, truncated); add: integer offset; add_first: bool order.

  The brightness channel is quantised to uint8 as imgaug does; the other channels are kept in
  float (the reference round-trips them through uint8, a difference of at most ~1 level).
  """
  x = tf.cast(image, tf.float32)
  family = tf.gather(tf.constant([0, 1, 2, 3, 3, 0]), space)

  def new_level(chan):
    """Quantised channel -> (level, level after mul/add), as imgaug's uint8 Multiply and Add."""
    q = tf.round(chan)
    mul_f = tf.cast(mul, tf.float32)
    add_f = tf.cast(add, tf.float32)

    def do_mul(v):
      return tf.floor(tf.clip_by_value(v * mul_f, 0.0, 255.0))

    def do_add(v):
      return tf.clip_by_value(v + add_f, 0.0, 255.0)

    return q, tf.cond(add_first, lambda: do_mul(do_add(q)), lambda: do_add(do_mul(q)))

  def from_luma():   # YCrCb / YUV: chroma fixed, so every channel moves with Y
    q, q2 = new_level(x[..., 0] * 0.299 + x[..., 1] * 0.587 + x[..., 2] * 0.114)
    return x + (q2 - q)[..., None]

  def from_v():      # HSV: hue and saturation fixed, so RGB scales with V
    mx = tf.reduce_max(x, -1)
    q, q2 = new_level(mx)
    new_v = mx + (q2 - q)
    scale = new_v / tf.maximum(mx, 1e-6)
    return tf.where((mx > 0)[..., None], x * scale[..., None], new_v[..., None] * tf.ones_like(x))

  def from_hls():    # HLS: hue and saturation fixed, chroma follows L
    mx = tf.reduce_max(x, -1)
    mn = tf.reduce_min(x, -1)
    hls_l = (mx + mn) / 2.0
    q, q2 = new_level(hls_l)
    l0 = hls_l / 255.0
    l1 = tf.clip_by_value((hls_l + q2 - q) / 255.0, 0.0, 1.0)
    c0 = (mx - mn) / 255.0
    sat = tf.where(c0 > 0, c0 / tf.maximum(1.0 - tf.abs(2.0 * l0 - 1.0), 1e-6), 0.0)
    c1 = tf.minimum(sat, 1.0) * (1.0 - tf.abs(2.0 * l1 - 1.0))
    ratio = tf.where(c0 > 0, c1 / tf.maximum(c0, 1e-6), 0.0)
    return 255.0 * (l1[..., None] + (x / 255.0 - l0[..., None]) * ratio[..., None])

  def from_lab():    # Lab (and Luv, approximated by Lab): a*, b* fixed
    lab_l, lab_a, lab_b = _rgb_to_lab_l(x / 255.0)
    q, q2 = new_level(lab_l * (255.0 / 100.0))
    l1 = tf.clip_by_value(lab_l + (q2 - q) * (100.0 / 255.0), 0.0, 100.0)
    return 255.0 * _lab_to_rgb(l1, lab_a, lab_b)

  out = tf.switch_case(family, [from_luma, from_v, from_hls, from_lab])
  return to_u8(tf.round(tf.clip_by_value(out, 0.0, 255.0)))


def enhance_sharpness(image: tf.Tensor, factor) -> tf.Tensor:
  """PIL ImageEnhance.Sharpness: blend with the SMOOTH-filtered image (3x3 [1 1 1; 1 5 1; 1 1 1]/13,
  rounded, border pixels unfiltered), truncated."""
  x = tf.cast(image, tf.float32)
  k = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  kernel = tf.tile(k[:, :, None, None], [1, 1, 3, 1])
  smooth = tf.nn.depthwise_conv2d(x[None], kernel, [1, 1, 1, 1], "VALID")[0]
  smooth = tf.floor(tf.clip_by_value(smooth, 0.0, 255.0) + 0.5)
  degenerate = tf.pad(smooth, [[1, 1], [1, 1], [0, 0]])
  h, w = tf.shape(x)[0], tf.shape(x)[1]
  inner = tf.pad(tf.ones([h - 2, w - 2], tf.bool), [[1, 1], [1, 1]])
  degenerate = tf.where(inner[:, :, None], degenerate, x)
  return to_u8(trunc_u8(degenerate + tf.cast(factor, tf.float32) * (x - degenerate)))


def _cv2_rgb_to_hsv(x: tf.Tensor):
  """OpenCV COLOR_RGB2HSV for uint8 (H in [0, 180)), integer arithmetic as cv2. x (..., 3) int32."""
  r, g, b = x[..., 0], x[..., 1], x[..., 2]
  v = tf.maximum(r, tf.maximum(g, b))
  vmin = tf.minimum(r, tf.minimum(g, b))
  diff = v - vmin
  i = np.arange(256, dtype=np.float64)
  sdiv = np.concatenate([[0], np.round((255 << 12) / i[1:])]).astype(np.int32)
  hdiv = np.concatenate([[0], np.round((180 << 12) / (6.0 * i[1:]))]).astype(np.int32)
  s = (diff * tf.gather(sdiv, v) + 2048) // 4096
  h = tf.where(tf.equal(v, r), g - b, tf.where(tf.equal(v, g), b - r + 2 * diff, r - g + 4 * diff))
  h = (h * tf.gather(hdiv, diff) + 2048) // 4096
  h = tf.where(h < 0, h + 180, h)
  return h, s, v


def _cv2_hsv_to_rgb(h, s, v) -> tf.Tensor:
  """OpenCV COLOR_HSV2RGB for uint8 (float path, rounded). h, s, v int32 -> (..., 3) float32."""
  hf = tf.cast(h, tf.float32) * (6.0 / 180.0)
  sf = tf.cast(s, tf.float32) * (1.0 / 255.0)
  vf = tf.cast(v, tf.float32) * (1.0 / 255.0)
  hf = tf.math.floormod(hf, 6.0)
  sector = tf.cast(tf.floor(hf), tf.int32)
  frac = hf - tf.cast(sector, tf.float32)
  sector = tf.where((sector < 0) | (sector >= 6), 0, sector)
  tab0 = vf
  tab1 = vf * (1.0 - sf)
  tab2 = vf * (1.0 - sf * frac)
  tab3 = vf * (1.0 - sf * (1.0 - frac))
  tab = tf.stack([tab0, tab1, tab2, tab3], -1)
  # OpenCV's sector table, as (r, g, b) indices into tab = (v, p, q, t)
  sector_rgb = tf.constant([[0, 3, 1], [2, 0, 1], [1, 0, 3], [1, 2, 0], [3, 1, 0], [0, 1, 2]], tf.int32)
  rgb = tf.gather(tab, tf.gather(sector_rgb, sector), batch_dims=sector.shape.rank)
  rgb = tf.where(tf.equal(s, 0)[..., None], vf[..., None] * tf.ones_like(rgb), rgb)
  return tf.clip_by_value(tf.round(rgb * 255.0), 0.0, 255.0)


def add_hue_saturation(image: tf.Tensor, hue: tf.Tensor, saturation: tf.Tensor) -> tf.Tensor:
  """iaa.AddToHueAndSaturation with given int values in [-255, 255] (hue mapped to OpenCV's 0-180)."""
  h, s, v = _cv2_rgb_to_hsv(tf.cast(image, tf.int32))
  hue_cv = tf.cast(tf.cast(hue, tf.float32) / 255.0 * 180.0, tf.int32)   # astype(int32): toward zero
  h = tf.math.floormod(h + hue_cv, 180)
  s = tf.clip_by_value(s + tf.cast(saturation, tf.int32), 0, 255)
  return to_u8(_cv2_hsv_to_rgb(h, s, v))


def solarize(image: tf.Tensor, threshold) -> tf.Tensor:
  """iaa.Solarize core: invert values >= int(threshold)."""
  t = tf.cast(tf.floor(tf.cast(threshold, tf.float32)), tf.int32)
  x = tf.cast(image, tf.int32)
  return tf.cast(tf.where(x >= t, 255 - x, x), tf.uint8)


def posterize(image: tf.Tensor, bits) -> tf.Tensor:
  """iaa.Posterize / PIL ImageOps.posterize: keep the `bits` (1-8) most significant bits."""
  shift = 8 - tf.cast(bits, tf.int32)
  mask = 256 - tf.bitwise.left_shift(1, shift)
  return tf.cast(tf.bitwise.bitwise_and(tf.cast(image, tf.int32), mask), tf.uint8)


def invert(image: tf.Tensor) -> tf.Tensor:
  """iaa.Invert(p=1): 255 - v."""
  return 255 - image


def autocontrast(image: tf.Tensor, cutoff) -> tf.Tensor:
  """PIL ImageOps.autocontrast(cutoff%) per channel (what iaa.pillike.Autocontrast computes)."""
  hist = _histograms(image)
  n = tf.reduce_sum(hist[0])
  cut = n * tf.cast(cutoff, tf.int32) // 100
  cs = tf.cumsum(hist, axis=1)
  rs = tf.cumsum(hist, axis=1, reverse=True)
  idx = tf.range(256)
  lo = tf.reduce_min(tf.where(cs > cut, idx[None, :], 256), axis=1)
  hi = tf.reduce_max(tf.where(rs > cut, idx[None, :], -1), axis=1)
  hi = tf.maximum(hi, lo)
  lo_f = tf.cast(lo, tf.float64)[:, None]
  span = tf.cast(tf.maximum(hi - lo, 1), tf.float64)[:, None]
  scale = 255.0 / span
  ix = tf.cast(idx, tf.float64)[None, :] * scale + (-lo_f * scale)
  lut = tf.cast(tf.clip_by_value(ix, 0.0, 255.0), tf.int32)   # int() then clip
  lut = tf.where((hi <= lo)[:, None], idx[None, :], lut)
  return _apply_lut(image, lut)


def equalize(image: tf.Tensor) -> tf.Tensor:
  """iaa.pillike.Equalize as imgaug 0.4 computes it for images of >= 64*64 px (`_equalize_no_pil_`):
  step = sum(hist[:255]) // 255, lut[i] = (step // 2 + cumsum[i-1]) // step, clipped to 255.

  (PIL's own equalize uses (n - hist[last nonzero]) // 256 as step; imgaug calls PIL only for
  images smaller than 64*64 px, which never happens here.)
  """
  hist = _histograms(image)
  nonzero = tf.reduce_sum(tf.cast(hist > 0, tf.int32), axis=1)
  step = tf.reduce_sum(hist[:, :255], axis=1) // 255
  safe = tf.maximum(step, 1)[:, None]
  excl = tf.cumsum(hist, axis=1, exclusive=True)
  lut = tf.minimum((step[:, None] // 2 + excl) // safe, 255)
  identity = tf.range(256)[None, :]
  lut = tf.where(((nonzero <= 1) | (step == 0))[:, None], identity, lut)
  return _apply_lut(image, lut)


def _random_augmenter(index: int) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
  """Augmenter `index` of AUGMENTER_NAMES with its random parameters drawn from the seed."""

  def gamma(img, seed):
    return gamma_contrast(img, uniform(seed, 0.5, 2.0, shape=(3,)))

  def brightness(img, seed):
    s = split_seed(seed, 4)
    return multiply_add_brightness(img, randint(s[0], 0, 5), uniform(s[1], 0.8, 1.2),
                                   tf.round(uniform(s[2], -30.0, 30.0)), uniform(s[3]) < 0.5)

  def sharpness(img, seed):
    return enhance_sharpness(img, uniform(seed, 0.0, 2.0))

  def hue_sat(img, seed):
    v = randint(seed, -50, 50, shape=(2,))
    return add_hue_saturation(img, v[0], v[1])

  def solar(img, seed):
    s = split_seed(seed, 2)
    return tf.cond(uniform(s[0]) < 0.5, lambda: solarize(img, uniform(s[1], 32.0, 128.0)), lambda: img)

  def poster(img, seed):
    return posterize(img, randint(seed, 1, 8))

  def flip(img, seed):
    return tf.cond(uniform(seed) < 0.5, lambda: img[:, ::-1], lambda: img)

  def inv(img, seed):
    del seed
    return invert(img)

  def autoc(img, seed):
    return autocontrast(img, randint(seed, 0, 20))

  def equal(img, seed):
    del seed
    return equalize(img)

  return (gamma, brightness, sharpness, hue_sat, solar, poster, flip, inv, autoc, equal)[index]


def apply_augmenter(index: tf.Tensor, image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """Runs texture augmenter `index` (0-9, see AUGMENTER_NAMES) with random parameters from `seed`.

  Args:
    index: int32 scalar tensor.
    image: (H, W, 3) uint8 with static shape.
    seed: (2,) stateless seed.

  Returns:
    (H, W, 3) uint8.
  """
  shape = image.shape
  branches = [lambda k=k: tf.ensure_shape(_random_augmenter(k)(image, seed), shape)
              for k in range(len(AUGMENTER_NAMES))]
  return tf.switch_case(index, branches)


def augment_texture(texture: tf.Tensor, seed: tf.Tensor, num: int = 3):
  """`num` distinct augmenters drawn without replacement, applied in the drawn order.

  Returns (augmented (H, W, 3) uint8, indices (num,) int32).
  """
  seeds = split_seed(seed, num + 1)
  chosen = tf.argsort(uniform(seeds[0], shape=(len(AUGMENTER_NAMES),)))[:num]
  x = texture
  for k in range(num):
    x = apply_augmenter(chosen[k], x, seeds[k + 1])
  return x, tf.cast(chosen, tf.int32)
