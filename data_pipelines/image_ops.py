"""Stateless random draws and bit-exact TF emulations of the PIL/torchvision ops CutPaste uses.

Pure TensorFlow, so everything runs inside `tf.data` maps. Images are uint8 HWC (one image, no batch
axis); "float holding uint8 values" means float32 (H, W, 3) with integer values in [0, 255].

Emulated: torchvision `ColorJitter` on PIL images (uint8 rounding of each step, PIL's HSV) and PIL
`rotate(expand=True)` with nearest resampling.
"""
import math
from typing import Sequence

from data_pipelines.tf_setup import import_tensorflow

tf = import_tensorflow()


# ----------------------------------------------------------------------------------------------
# Stateless draws and uint8 helpers


def split_seed(seed: tf.Tensor, n: int) -> list:
  """`n` independent (2,) stateless seeds derived from `seed` (2,)."""
  s = tf.random.experimental.stateless_split(seed, n)
  return [s[i] for i in range(n)]


def uniform(seed, minval=0.0, maxval=1.0, shape=(), dtype=tf.float32) -> tf.Tensor:
  """Stateless uniform in [minval, maxval) of `shape` and `dtype`."""
  return tf.random.stateless_uniform(shape, seed, minval=minval, maxval=maxval, dtype=dtype)


def randint(seed, lo, hi, shape=()) -> tf.Tensor:
  """Integers uniform in [lo, hi] (inclusive), int32."""
  return tf.random.stateless_uniform(shape, seed, minval=lo, maxval=tf.cast(hi, tf.int32) + 1,
                                     dtype=tf.int32)


def to_u8(x: tf.Tensor) -> tf.Tensor:
  """Float holding integers (already in [0, 255]) -> uint8."""
  return tf.cast(tf.clip_by_value(x, 0.0, 255.0), tf.uint8)


def trunc_u8(x: tf.Tensor) -> tf.Tensor:
  """C-style `(UINT8)CLIP(x)`: clip to [0, 255] then truncate."""
  return tf.floor(tf.clip_by_value(x, 0.0, 255.0))


def _pil_gray(x: tf.Tensor) -> tf.Tensor:
  """PIL RGB->L: (R*19595 + G*38470 + B*7471 + 0x8000) >> 16. x (..., 3) float ints -> (...) float."""
  xi = tf.cast(x, tf.int32)
  l = (xi[..., 0] * 19595 + xi[..., 1] * 38470 + xi[..., 2] * 7471 + 32768) // 65536
  return tf.cast(l, tf.float32)


# ----------------------------------------------------------------------------------------------
# torchvision ColorJitter on a PIL image (each step rounds to uint8 like PIL)


def adjust_brightness(x: tf.Tensor, factor) -> tf.Tensor:
  """PIL ImageEnhance.Brightness. x (..., 3) float holding uint8 values -> same."""
  return trunc_u8(x * tf.cast(factor, tf.float32))


def adjust_contrast(x: tf.Tensor, factor) -> tf.Tensor:
  """PIL ImageEnhance.Contrast: blend with the image's rounded gray (L) mean."""
  mean = tf.floor(tf.reduce_mean(tf.cast(_pil_gray(x), tf.float64)) + 0.5)
  mean = tf.cast(mean, tf.float32)
  return trunc_u8(mean + tf.cast(factor, tf.float32) * (x - mean))


def adjust_saturation(x: tf.Tensor, factor) -> tf.Tensor:
  """PIL ImageEnhance.Color: blend with the gray (L) image."""
  gray = _pil_gray(x)[..., None]
  return trunc_u8(gray + tf.cast(factor, tf.float32) * (x - gray))


def adjust_hue(x: tf.Tensor, hue_factor) -> tf.Tensor:
  """torchvision F_pil.adjust_hue: PIL RGB->HSV, H += uint8(hue*255) (wrapping), HSV->RGB."""
  x = tf.cast(x, tf.int32)
  r, g, b = x[..., 0], x[..., 1], x[..., 2]
  maxc = tf.maximum(r, tf.maximum(g, b))
  minc = tf.minimum(r, tf.minimum(g, b))
  gray = tf.equal(maxc, minc)
  cr = tf.cast(tf.where(gray, 1, maxc - minc), tf.float32)
  maxf = tf.cast(tf.maximum(maxc, 1), tf.float32)
  s = cr / maxf
  rc = tf.cast(maxc - r, tf.float32) / cr
  gc = tf.cast(maxc - g, tf.float32) / cr
  bc = tf.cast(maxc - b, tf.float32) / cr
  rc64, gc64, bc64 = [tf.cast(z, tf.float64) for z in (rc, gc, bc)]   # C: `2.0 + rc` is double
  h = tf.where(tf.equal(r, maxc), tf.cast(bc - gc, tf.float64),
               tf.where(tf.equal(g, maxc), 2.0 + rc64 - bc64, 4.0 + gc64 - rc64))
  h = tf.cast(h, tf.float32)   # stored in a C float
  h = tf.cast(tf.math.floormod(tf.cast(h, tf.float64) / 6.0 + 1.0, 1.0), tf.float32)
  uh = tf.clip_by_value(tf.cast(tf.cast(h, tf.float64) * 255.0, tf.int32), 0, 255)
  us = tf.clip_by_value(tf.cast(tf.cast(s, tf.float64) * 255.0, tf.int32), 0, 255)
  uh = tf.where(gray, 0, uh)
  us = tf.where(gray, 0, us)
  shift = tf.cast(tf.cast(hue_factor, tf.float64) * 255.0, tf.int32)   # C cast: toward zero
  uh = tf.math.floormod(uh + shift, 256)
  # PIL hsv2rgb
  hf = tf.cast(uh, tf.float64) * 6.0 / 255.0
  i = tf.cast(tf.floor(hf), tf.int32)
  f = tf.cast(hf - tf.cast(i, tf.float64), tf.float32)
  fs = tf.cast(tf.cast(us, tf.float64) / 255.0, tf.float32)
  v = tf.cast(maxc, tf.float64)
  p = tf.floor(v * (1.0 - tf.cast(fs, tf.float64)) + 0.5)
  q = tf.floor(v * (1.0 - tf.cast(fs * f, tf.float64)) + 0.5)
  t = tf.floor(v * (1.0 - tf.cast(fs, tf.float64) * (1.0 - tf.cast(f, tf.float64))) + 0.5)
  p, q, t = [tf.clip_by_value(z, 0.0, 255.0) for z in (p, q, t)]
  sector = tf.math.floormod(i, 6)
  choices_r = tf.stack([v, q, p, p, t, v], -1)
  choices_g = tf.stack([t, v, v, q, p, p], -1)
  choices_b = tf.stack([p, p, t, v, v, q], -1)
  onehot = tf.one_hot(sector, 6, dtype=tf.float64)
  rgb = tf.stack([tf.reduce_sum(c * onehot, -1) for c in (choices_r, choices_g, choices_b)], -1)
  rgb = tf.where(tf.equal(us, 0)[..., None], v[..., None] * tf.ones_like(rgb), rgb)
  return tf.cast(rgb, tf.float32)


def color_jitter(patch: tf.Tensor, seed: tf.Tensor, strength: Sequence[float] = (0.4, 0.4, 0.4, 0.1)):
  """torchvision ColorJitter(b, c, s, h) on a PIL-like uint8 patch, the 4 ops in random order.

  Args:
    patch: (h, w, 3) uint8, any size.
    seed: (2,) stateless seed.
    strength: (brightness, contrast, saturation, hue); factors U[max(0, 1-x), 1+x], hue U[-x, x].

  Returns:
    (h, w, 3) uint8.
  """
  b, c, s, h = [float(v) for v in strength]
  seeds = split_seed(seed, 5)
  order = tf.argsort(uniform(seeds[0], shape=(4,)))
  fb = uniform(seeds[1], max(0.0, 1 - b), 1 + b)
  fc = uniform(seeds[2], max(0.0, 1 - c), 1 + c)
  fs = uniform(seeds[3], max(0.0, 1 - s), 1 + s)
  fh = uniform(seeds[4], -h, h, dtype=tf.float64)
  ops = [
      (lambda x: adjust_brightness(x, fb)) if b > 0 else (lambda x: x),
      (lambda x: adjust_contrast(x, fc)) if c > 0 else (lambda x: x),
      (lambda x: adjust_saturation(x, fs)) if s > 0 else (lambda x: x),
      (lambda x: adjust_hue(x, fh)) if h > 0 else (lambda x: x),
  ]
  x = tf.cast(patch, tf.float32)
  for k in range(4):
    x = tf.switch_case(order[k], [lambda op=op, x=x: op(x) for op in ops])
  return to_u8(x)


# ----------------------------------------------------------------------------------------------
# PIL rotate


def rotate_expand_nearest(patch: tf.Tensor, angle_deg: tf.Tensor):
  """PIL `patch.convert("RGBA").rotate(angle, NEAREST, expand=True)` (counter-clockwise positive).

  Args:
    patch: (h, w, 3) uint8.
    angle_deg: scalar degrees.

  Returns:
    (rotated (nh, nw, 3) uint8, alpha (nh, nw) bool: True where a source pixel landed).
  """
  h = tf.shape(patch)[0]
  w = tf.shape(patch)[1]
  hf = tf.cast(h, tf.float64)
  wf = tf.cast(w, tf.float64)
  a = -tf.cast(angle_deg, tf.float64) * (math.pi / 180.0)
  cos = tf.round(tf.cos(a) * 1e15) / 1e15   # PIL: round(math.cos(angle), 15)
  sin = tf.round(tf.sin(a) * 1e15) / 1e15
  cx, cy = wf / 2.0, hf / 2.0
  # matrix = [cos, sin, c, -sin, cos, f]: input = M @ (output + 0.5)
  c0 = cos * -cx + sin * -cy + cx
  f0 = -sin * -cx + cos * -cy + cy
  xs = tf.stack([0.0, wf, wf, 0.0])
  ys = tf.stack([0.0, 0.0, hf, hf])
  cx_ = cos * xs + sin * ys + c0
  cy_ = -sin * xs + cos * ys + f0
  nw = tf.cast(tf.math.ceil(tf.reduce_max(cx_)) - tf.floor(tf.reduce_min(cx_)), tf.int32)
  nh = tf.cast(tf.math.ceil(tf.reduce_max(cy_)) - tf.floor(tf.reduce_min(cy_)), tf.int32)
  tx = -(tf.cast(nw, tf.float64) - wf) / 2.0
  ty = -(tf.cast(nh, tf.float64) - hf) / 2.0
  c1 = cos * tx + sin * ty + c0
  f1 = -sin * tx + cos * ty + f0
  # Pillow's affine_fixed(): 16.16 fixed point, pixel centres folded into the offsets.

  def fix(v):
    return tf.cast(tf.floor(v * 65536.0 + 0.5), tf.int64)

  a0, a1, a3, a4 = fix(cos), fix(sin), fix(-sin), fix(cos)
  a2 = fix(c1 + cos * 0.5 + sin * 0.5)
  a5 = fix(f1 + -sin * 0.5 + cos * 0.5)
  gx, gy = tf.meshgrid(tf.range(nw, dtype=tf.int64), tf.range(nh, dtype=tf.int64))   # (nh, nw)
  xi = tf.cast(tf.math.floordiv(a2 + gy * a1 + gx * a0, 65536), tf.int32)   # `>> 16`
  yi = tf.cast(tf.math.floordiv(a5 + gy * a4 + gx * a3, 65536), tf.int32)
  alpha = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
  idx = tf.stack([tf.clip_by_value(yi, 0, h - 1), tf.clip_by_value(xi, 0, w - 1)], -1)
  rotated = tf.gather_nd(patch, idx)
  rotated = tf.where(alpha[:, :, None], rotated, tf.zeros_like(rotated))
  return rotated, alpha
