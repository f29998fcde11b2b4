"""Anomaly synthesis for training (spec section 2): CutPaste (rectangle, scar) and DRAEM Perlin + texture.

Everything here is pure TensorFlow with stateless randomness only, so `synthesize` can run inside
`tf.data.Dataset.map(..., num_parallel_calls=...)` without the GIL, and one seed always gives the same
sample. Images are uint8 HWC (one image, no batch axis); H = W, divisible by 32 (Perlin cells).

The branch is drawn per sample: with probability `p_cutpaste` CutPaste (a fair coin then picks the
rectangle or the scar variant), otherwise a DTD texture blended through a thresholded Perlin mask.
Every sample is anomalous; pixels outside the returned mask are never changed.

Reference behaviours are emulated where they matter (spec 2.1-2.3): torchvision `ColorJitter` on PIL
images (uint8 rounding of each step, PIL's HSV), PIL `rotate(expand=True)` with nearest resampling,
imgaug 0.4 texture augmenters (LUT semantics, OpenCV HSV) and DRAEM's `rand_perlin_2d_np`.
"""
import dataclasses
import io
import math
import os
from typing import Any, Callable, Optional, Sequence

import numpy as np
import tensorflow as tf

from data_pipelines import storage

BRANCH_CUTPASTE = 0   # CutPaste "normal": jittered rectangle pasted elsewhere
BRANCH_SCAR = 1       # CutPaste "scar": thin jittered patch, rotated, pasted elsewhere
BRANCH_PERLIN = 2     # DRAEM: augmented texture blended through a Perlin mask
BRANCH_NAMES = ("cutpaste", "scar", "perlin")

AUGMENTER_NAMES = (
    "gamma_contrast", "multiply_add_brightness", "enhance_sharpness", "add_hue_saturation",
    "solarize", "posterize", "fliplr", "invert", "autocontrast", "equalize")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


# ----------------------------------------------------------------------------------------------
# Parameters


@dataclasses.dataclass(frozen=True)
class SynthesisParams:
  """Python-side copy of `config.data.synthesis` (read once, at trace time)."""
  p_cutpaste: float = 0.5
  cutpaste_area: tuple = (0.02, 0.15)   # fraction of H*W
  scar_width: tuple = (2, 16)           # pixels, inclusive
  scar_height: tuple = (10, 25)         # pixels, inclusive
  scar_angle: float = 45.0              # degrees, U(-a, a)
  jitter: tuple = (0.4, 0.4, 0.4, 0.1)  # ColorJitter brightness, contrast, saturation, hue
  perlin_scale_exp: tuple = (1, 5)      # scale = 2**randint[lo, hi] per axis
  perlin_threshold: float = 0.5
  perlin_rotate: float = 5.0            # degrees, U(-a, a)
  beta_max: float = 0.8                 # beta = beta_max * U[0, 1)
  bgr_textures: bool = True             # reverse texture channels (the reference blends BGR)

  @classmethod
  def from_config(cls, cfg: Any) -> "SynthesisParams":
    """Reads `config.data.synthesis` (ConfigDict or mapping); None gives the reference defaults."""
    if cfg is None:
      return cls()
    if isinstance(cfg, cls):
      return cfg
    values = {}
    for field in dataclasses.fields(cls):
      try:
        value = cfg[field.name]
      except (KeyError, AttributeError, TypeError) as e:
        raise ValueError(f"config key data.synthesis.{field.name} is missing") from e
      if isinstance(field.default, tuple):
        value = tuple(value)
      values[field.name] = value
    p = cls(**values)
    if not 0.0 <= p.p_cutpaste <= 1.0:
      raise ValueError(f"data.synthesis.p_cutpaste must be in [0, 1], got {p.p_cutpaste}")
    if not 0 < p.cutpaste_area[0] <= p.cutpaste_area[1] < 1:
      raise ValueError(f"data.synthesis.cutpaste_area must satisfy 0 < lo <= hi < 1, got {p.cutpaste_area}")
    if not 1 <= p.scar_width[0] <= p.scar_width[1] or not 1 <= p.scar_height[0] <= p.scar_height[1]:
      raise ValueError("data.synthesis.scar_width / scar_height must be (lo, hi) with 1 <= lo <= hi")
    if not 0 <= p.perlin_scale_exp[0] <= p.perlin_scale_exp[1]:
      raise ValueError(f"data.synthesis.perlin_scale_exp must be (lo, hi), got {p.perlin_scale_exp}")
    if len(p.jitter) != 4:
      raise ValueError(f"data.synthesis.jitter must have 4 values, got {p.jitter}")
    return p


# ----------------------------------------------------------------------------------------------
# Texture files


def _cache_root() -> str:
  return os.environ.get("ONENIP_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "onenip_jax")


def _listdir_images(folder: str) -> list:
  return [storage.join(folder, f) for f in storage.listdir(folder)
          if f.lower().endswith(IMAGE_EXTENSIONS) and storage.isfile(storage.join(folder, f))]


def _skimage_texture_arrays() -> dict:
  """Texture-like CC0 photos bundled with scikit-image: name -> uint8 (h, w, 3).

  Brick, grass and gravel contribute only their TOP halves (the demo dataset uses the bottom halves);
  moon and immunohistochemistry contribute four quadrants each.
  """
  from skimage import data as skdata  # pylint: disable=import-outside-toplevel
  out = {}
  for name in ("brick", "grass", "gravel"):
    a = getattr(skdata, name)()
    h, w = a.shape[:2]
    for j, (x0, x1) in enumerate(((0, w // 2), (w // 2, w))):
      out[f"{name}_top{j}"] = a[: h // 2, x0:x1]
  for name in ("moon", "immunohistochemistry"):
    a = getattr(skdata, name)()
    h, w = a.shape[:2]
    for i in range(2):
      for j in range(2):
        out[f"{name}_q{2 * i + j}"] = a[i * h // 2:(i + 1) * h // 2, j * w // 2:(j + 1) * w // 2]
  for k, a in out.items():
    a = np.asarray(a)
    if a.ndim == 2:
      a = np.repeat(a[:, :, None], 3, axis=2)
    out[k] = np.ascontiguousarray(a[:, :, :3]).astype(np.uint8)
  return out


def _skimage_textures() -> list:
  """Writes the scikit-image texture crops once as PNG into the cache and returns their paths."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  folder = os.path.join(_cache_root(), "textures")
  names = ["brick_top0", "brick_top1", "grass_top0", "grass_top1", "gravel_top0", "gravel_top1"]
  names += [f"{n}_q{q}" for n in ("moon", "immunohistochemistry") for q in range(4)]
  paths = [os.path.join(folder, f"skimage_{n}.png") for n in names]
  if all(os.path.isfile(p) for p in paths):
    return sorted(paths)
  arrays = _skimage_texture_arrays()
  for n, p in zip(names, paths):
    if not os.path.isfile(p):
      buf = io.BytesIO()
      Image.fromarray(arrays[n]).save(buf, format="PNG")
      storage.atomic_write(p, buf.getvalue())   # concurrent readers never see a half-written file
  return sorted(paths)


def texture_paths(textures_dir: str) -> list:
  """Sorted texture image paths for the Perlin branch.

  Args:
    textures_dir: a DTD-layout folder (`images/<class>/*.jpg` or `<class>/*.jpg`; jpg, jpeg or png),
      or "" for the texture-like CC0 photos bundled with scikit-image, written once as PNG into
      `$ONENIP_CACHE_DIR/textures` (default `~/.cache/onenip_jax/textures`).

  Returns:
    Sorted list of file paths.

  Raises:
    ValueError: the folder does not exist or holds no texture image.
  """
  if not textures_dir:
    return _skimage_textures()
  root = storage.abspath(textures_dir)
  if not storage.isdir(root):
    raise ValueError(f"data.textures: texture folder {root} does not exist")
  paths = []
  for base in (storage.join(root, "images"), root):
    if not storage.isdir(base):
      continue
    for cls in sorted(storage.listdir(base)):
      if storage.isdir(storage.join(base, cls)):
        paths += _listdir_images(storage.join(base, cls))
    if paths:
      break
  if not paths:
    paths = _listdir_images(root)
  if not paths:
    raise ValueError(f"data.textures: no texture image (*.jpg, *.jpeg, *.png) found in {root}; expected "
                     "the DTD layout images/<class>/*.jpg or <class>/*.jpg")
  return sorted(paths)


# ----------------------------------------------------------------------------------------------
# Small helpers


def _split(seed: tf.Tensor, n: int) -> list:
  s = tf.random.experimental.stateless_split(seed, n)
  return [s[i] for i in range(n)]


def _uniform(seed, minval=0.0, maxval=1.0, shape=(), dtype=tf.float32) -> tf.Tensor:
  return tf.random.stateless_uniform(shape, seed, minval=minval, maxval=maxval, dtype=dtype)


def _randint(seed, lo, hi, shape=()) -> tf.Tensor:
  """Integers uniform in [lo, hi] (inclusive), int32."""
  return tf.random.stateless_uniform(shape, seed, minval=lo, maxval=tf.cast(hi, tf.int32) + 1,
                                     dtype=tf.int32)


def _to_u8(x: tf.Tensor) -> tf.Tensor:
  """Float holding integers (already in [0, 255]) -> uint8."""
  return tf.cast(tf.clip_by_value(x, 0.0, 255.0), tf.uint8)


def _trunc_u8(x: tf.Tensor) -> tf.Tensor:
  """C-style `(UINT8)CLIP(x)`: clip to [0, 255] then truncate."""
  return tf.floor(tf.clip_by_value(x, 0.0, 255.0))


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


def _pil_gray(x: tf.Tensor) -> tf.Tensor:
  """PIL RGB->L: (R*19595 + G*38470 + B*7471 + 0x8000) >> 16. x (..., 3) float ints -> (...) float."""
  xi = tf.cast(x, tf.int32)
  l = (xi[..., 0] * 19595 + xi[..., 1] * 38470 + xi[..., 2] * 7471 + 32768) // 65536
  return tf.cast(l, tf.float32)


def _paste(image: tf.Tensor, patch: tf.Tensor, mask: tf.Tensor, y: tf.Tensor, x: tf.Tensor):
  """Pastes patch (h, w, 3) where mask (h, w) at top-left (y, x), clipped at the bottom/right border.

  Returns (image (H, W, 3) uint8, mask (H, W) bool).
  """
  size_h, size_w = image.shape[0], image.shape[1]
  ph = tf.minimum(tf.shape(patch)[0], size_h - y)
  pw = tf.minimum(tf.shape(patch)[1], size_w - x)
  patch = patch[:ph, :pw]
  mask = mask[:ph, :pw]
  pads = [[y, size_h - y - ph], [x, size_w - x - pw]]
  canvas = tf.pad(patch, pads + [[0, 0]])
  full_mask = tf.pad(mask, pads)
  canvas = tf.ensure_shape(canvas, [size_h, size_w, 3])
  full_mask = tf.ensure_shape(full_mask, [size_h, size_w])
  return tf.where(full_mask[:, :, None], canvas, image), full_mask


# ----------------------------------------------------------------------------------------------
# torchvision ColorJitter on a PIL image (each step rounds to uint8 like PIL)


def adjust_brightness(x: tf.Tensor, factor) -> tf.Tensor:
  """PIL ImageEnhance.Brightness. x (..., 3) float holding uint8 values -> same."""
  return _trunc_u8(x * tf.cast(factor, tf.float32))


def adjust_contrast(x: tf.Tensor, factor) -> tf.Tensor:
  """PIL ImageEnhance.Contrast: blend with the image's rounded gray (L) mean."""
  mean = tf.floor(tf.reduce_mean(tf.cast(_pil_gray(x), tf.float64)) + 0.5)
  mean = tf.cast(mean, tf.float32)
  return _trunc_u8(mean + tf.cast(factor, tf.float32) * (x - mean))


def adjust_saturation(x: tf.Tensor, factor) -> tf.Tensor:
  """PIL ImageEnhance.Color: blend with the gray (L) image."""
  gray = _pil_gray(x)[..., None]
  return _trunc_u8(gray + tf.cast(factor, tf.float32) * (x - gray))


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
  seeds = _split(seed, 5)
  order = tf.argsort(_uniform(seeds[0], shape=(4,)))
  fb = _uniform(seeds[1], max(0.0, 1 - b), 1 + b)
  fc = _uniform(seeds[2], max(0.0, 1 - c), 1 + c)
  fs = _uniform(seeds[3], max(0.0, 1 - s), 1 + s)
  fh = _uniform(seeds[4], -h, h, dtype=tf.float64)
  ops = [
      (lambda x: adjust_brightness(x, fb)) if b > 0 else (lambda x: x),
      (lambda x: adjust_contrast(x, fc)) if c > 0 else (lambda x: x),
      (lambda x: adjust_saturation(x, fs)) if s > 0 else (lambda x: x),
      (lambda x: adjust_hue(x, fh)) if h > 0 else (lambda x: x),
  ]
  x = tf.cast(patch, tf.float32)
  for k in range(4):
    x = tf.switch_case(order[k], [lambda op=op, x=x: op(x) for op in ops])
  return _to_u8(x)


# ----------------------------------------------------------------------------------------------
# CutPaste


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


def _cutpaste_normal(image: tf.Tensor, seed: tf.Tensor, p: SynthesisParams):
  size_h, size_w = image.shape[0], image.shape[1]
  seeds = _split(seed, 8)
  area = _uniform(seeds[0], p.cutpaste_area[0], p.cutpaste_area[1], dtype=tf.float64) * (size_h * size_w)
  aspect_lo = _uniform(seeds[1], 0.3, 1.0, dtype=tf.float64)
  aspect_hi = _uniform(seeds[2], 1.0, 3.3, dtype=tf.float64)
  aspect = tf.where(_uniform(seeds[3]) < 0.5, aspect_lo, aspect_hi)
  pw = tf.minimum(tf.cast(tf.sqrt(area * aspect), tf.int32), size_w)
  ph = tf.minimum(tf.cast(tf.sqrt(area / aspect), tf.int32), size_h)
  pw = tf.maximum(pw, 1)
  ph = tf.maximum(ph, 1)
  src_x = _randint(seeds[4], 0, size_w - pw)
  src_y = _randint(tf.random.experimental.stateless_fold_in(seeds[4], 1), 0, size_h - ph)
  patch = tf.slice(image, tf.stack([src_y, src_x, 0]), tf.stack([ph, pw, 3]))
  patch = color_jitter(patch, seeds[5], p.jitter)
  dst_x = _randint(seeds[6], 0, size_w - pw)
  dst_y = _randint(seeds[7], 0, size_h - ph)
  out, mask = _paste(image, patch, tf.ones([ph, pw], tf.bool), dst_y, dst_x)
  return out, mask, tf.stack([ph, pw])


def _cutpaste_scar(image: tf.Tensor, seed: tf.Tensor, p: SynthesisParams):
  size_h, size_w = image.shape[0], image.shape[1]
  seeds = _split(seed, 8)
  pw = tf.minimum(_randint(seeds[0], p.scar_width[0], p.scar_width[1]), size_w)
  ph = tf.minimum(_randint(seeds[1], p.scar_height[0], p.scar_height[1]), size_h)
  src_x = _randint(seeds[2], 0, size_w - pw)
  src_y = _randint(seeds[3], 0, size_h - ph)
  patch = tf.slice(image, tf.stack([src_y, src_x, 0]), tf.stack([ph, pw, 3]))
  patch = color_jitter(patch, seeds[4], p.jitter)
  angle = _uniform(seeds[5], -p.scar_angle, p.scar_angle)
  rotated, alpha = rotate_expand_nearest(patch, angle)
  dst_x = _randint(seeds[6], 0, size_w - pw)   # from the un-rotated size, as the reference
  dst_y = _randint(seeds[7], 0, size_h - ph)
  out, mask = _paste(image, rotated, alpha, dst_y, dst_x)
  return out, mask, tf.stack([ph, pw])


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
  return _to_u8(tf.round(tf.clip_by_value(out, 0.0, 255.0)))


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
  return _to_u8(_trunc_u8(degenerate + tf.cast(factor, tf.float32) * (x - degenerate)))


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
  return _to_u8(_cv2_hsv_to_rgb(h, s, v))


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
    return gamma_contrast(img, _uniform(seed, 0.5, 2.0, shape=(3,)))

  def brightness(img, seed):
    s = _split(seed, 4)
    return multiply_add_brightness(img, _randint(s[0], 0, 5), _uniform(s[1], 0.8, 1.2),
                                   tf.round(_uniform(s[2], -30.0, 30.0)), _uniform(s[3]) < 0.5)

  def sharpness(img, seed):
    return enhance_sharpness(img, _uniform(seed, 0.0, 2.0))

  def hue_sat(img, seed):
    v = _randint(seed, -50, 50, shape=(2,))
    return add_hue_saturation(img, v[0], v[1])

  def solar(img, seed):
    s = _split(seed, 2)
    return tf.cond(_uniform(s[0]) < 0.5, lambda: solarize(img, _uniform(s[1], 32.0, 128.0)), lambda: img)

  def poster(img, seed):
    return posterize(img, _randint(seed, 1, 8))

  def flip(img, seed):
    return tf.cond(_uniform(seed) < 0.5, lambda: img[:, ::-1], lambda: img)

  def inv(img, seed):
    del seed
    return invert(img)

  def autoc(img, seed):
    return autocontrast(img, _randint(seed, 0, 20))

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
  seeds = _split(seed, num + 1)
  chosen = tf.argsort(_uniform(seeds[0], shape=(len(AUGMENTER_NAMES),)))[:num]
  x = texture
  for k in range(num):
    x = apply_augmenter(chosen[k], x, seeds[k + 1])
  return x, tf.cast(chosen, tf.int32)


# ----------------------------------------------------------------------------------------------
# Perlin


def perlin_from_angles(angles: tf.Tensor, res: tf.Tensor, size: int) -> tf.Tensor:
  """DRAEM `rand_perlin_2d_np` with given lattice angles.

  Args:
    angles: (>= res[0] + 1, >= res[1] + 1) gradient angles in radians (extra rows/cols unused).
    res: (2,) int32 cells along (rows, cols); each must divide `size`.
    size: H = W.

  Returns:
    (size, size) float32 noise (sqrt(2) * gradient noise, roughly in [-1, 1]).
  """
  res = tf.cast(res, tf.int32)
  d = size // res   # cell size in pixels per axis
  k = tf.range(size)
  cell_r = k // d[0]
  cell_c = k // d[1]
  fr = tf.cast(k % d[0], tf.float32) / tf.cast(d[0], tf.float32)
  fc = tf.cast(k % d[1], tf.float32) / tf.cast(d[1], tf.float32)
  gx = tf.cos(angles)
  gy = tf.sin(angles)

  def grad(dr, dc):
    def pick(g):
      return tf.gather(tf.gather(g, cell_r + dr, axis=0), cell_c + dc, axis=1)
    return pick(gx), pick(gy)

  rr = fr[:, None]
  cc = fc[None, :]
  g00, g10, g01, g11 = grad(0, 0), grad(1, 0), grad(0, 1), grad(1, 1)
  n00 = rr * g00[0] + cc * g00[1]
  n10 = (rr - 1.0) * g10[0] + cc * g10[1]
  n01 = rr * g01[0] + (cc - 1.0) * g01[1]
  n11 = (rr - 1.0) * g11[0] + (cc - 1.0) * g11[1]

  def fade(t):
    return 6 * t ** 5 - 15 * t ** 4 + 10 * t ** 3

  tr = fade(rr)
  tc = fade(cc)
  n0 = n00 + tr * (n10 - n00)
  n1 = n01 + tr * (n11 - n01)
  return math.sqrt(2.0) * (n0 + tc * (n1 - n0))


def rotate_bilinear(x: tf.Tensor, angle_deg: tf.Tensor) -> tf.Tensor:
  """imgaug Affine(rotate) about the centre ((W-1)/2, (H-1)/2), bilinear, constant 0 fill. x (H, W)."""
  size_h, size_w = x.shape[0], x.shape[1]
  a = tf.cast(angle_deg, tf.float32) * (math.pi / 180.0)
  cos, sin = tf.cos(a), tf.sin(a)
  cx, cy = (size_w - 1) / 2.0, (size_h - 1) / 2.0
  # output -> input: R(-a) (p - c) + c
  transform = tf.stack([cos, sin, cx - cos * cx - sin * cy,
                        -sin, cos, cy + sin * cx - cos * cy, 0.0, 0.0])[None]
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=x[None, :, :, None], transforms=transform, output_shape=tf.constant([size_h, size_w]),
      fill_value=tf.constant(0.0), interpolation="BILINEAR", fill_mode="CONSTANT")
  return out[0, :, :, 0]


def perlin_noise(seed: tf.Tensor, size: int, scale_exp: Sequence[int] = (1, 5),
                 rotate: float = 5.0) -> tf.Tensor:
  """Random rotated Perlin noise: scales 2**randint[lo, hi] per axis, rotation U(-rotate, rotate).

  Returns (size, size) float32.
  """
  lo, hi = int(scale_exp[0]), int(scale_exp[1])
  if size % (2 ** hi):
    raise ValueError(f"input size {size} must be divisible by 2**data.synthesis.perlin_scale_exp[1] = {2 ** hi}")
  seeds = _split(seed, 3)
  res = tf.bitwise.left_shift(1, _randint(seeds[0], lo, hi, shape=(2,)))
  angles = 2.0 * math.pi * _uniform(seeds[1], shape=(2 ** hi + 1, 2 ** hi + 1))
  noise = perlin_from_angles(angles, res, size)
  if rotate:
    noise = rotate_bilinear(noise, _uniform(seeds[2], -rotate, rotate))
  return noise


def load_texture(path: tf.Tensor, size: int, bgr: bool = True) -> tf.Tensor:
  """Reads a texture file, as cv2.imread + cv2.resize(INTER_LINEAR) would. Returns (size, size, 3) uint8.

  JPEGs use the accurate integer IDCT (libjpeg's default, as OpenCV); channels are reversed when
  `bgr` so the array is in the BGR order the reference blends.
  """
  data = tf.io.read_file(path)
  is_jpeg = tf.equal(tf.strings.substr(data, 0, 2), b"\xff\xd8")
  tex = tf.cond(is_jpeg,
                lambda: tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE"),
                lambda: tf.io.decode_image(data, channels=3, expand_animations=False, dtype=tf.uint8))
  tex = tf.image.resize(tex, [size, size], method="bilinear", antialias=False)
  tex = _to_u8(tf.round(tf.clip_by_value(tex, 0.0, 255.0)))
  if bgr:
    tex = tex[:, :, ::-1]
  return tf.ensure_shape(tex, [size, size, 3])


def _perlin_paste(image: tf.Tensor, seed: tf.Tensor, textures: tf.Tensor, p: SynthesisParams):
  size = image.shape[0]
  seeds = _split(seed, 4)
  num = tf.shape(textures)[0]
  idx = _randint(seeds[0], 0, num - 1)
  tex = load_texture(tf.gather(textures, idx), size, p.bgr_textures)
  tex, _ = augment_texture(tex, seeds[1])
  noise = perlin_noise(seeds[2], size, p.perlin_scale_exp, p.perlin_rotate)
  mask = noise > p.perlin_threshold
  beta = p.beta_max * _uniform(seeds[3])
  img_f = tf.cast(image, tf.float32)
  blended = tf.floor((1.0 - beta) * tf.cast(tex, tf.float32) + beta * img_f)
  out = tf.where(mask[:, :, None], _to_u8(blended), image)
  return out, mask, tf.zeros([2], tf.int32)


# ----------------------------------------------------------------------------------------------
# Entry points


def synthesize_with_info(image: tf.Tensor, seed: tf.Tensor, textures: tf.Tensor, cfg: Any,
                         force_branch: Optional[int] = None):
  """`synthesize` plus what it did.

  Args:
    image: (H, W, 3) uint8, static H = W divisible by 32.
    seed: (2,) int32/int64 stateless seed.
    textures: (T,) string texture paths (`texture_paths`), T >= 1.
    cfg: `config.data.synthesis` (ConfigDict/mapping), a SynthesisParams, or None for defaults.
    force_branch: None (random, as training) or BRANCH_* to always take that branch (tests, tools).

  Returns:
    (image (H, W, 3) uint8, mask (H, W, 1) float32 in {0, 1}, info) with info a dict of
    "branch" int32 scalar (BRANCH_*) and "patch_hw" int32 (2,): CutPaste (ph, pw) before rotation,
    (0, 0) for Perlin.
  """
  p = SynthesisParams.from_config(cfg)
  image = tf.convert_to_tensor(image)
  if image.dtype != tf.uint8 or image.shape.rank != 3 or image.shape[-1] != 3:
    raise ValueError(f"synthesize expects a uint8 (H, W, 3) image, got {image.dtype.name} {image.shape}")
  size_h, size_w = image.shape[0], image.shape[1]
  if size_h is None or size_w is None:
    raise ValueError("synthesize needs a static image size; resize (and set_shape) before calling it")
  if size_h != size_w or size_h % 32:
    raise ValueError(f"synthesize needs a square image with a side divisible by 32 (input_size), got "
                     f"{size_h}x{size_w}")
  if size_h < p.scar_height[1] or size_w < p.scar_width[1]:
    raise ValueError(f"image {size_h}x{size_w} is smaller than the scar size {p.scar_width}x{p.scar_height}")
  textures = tf.convert_to_tensor(textures, tf.string)
  if textures.shape.rank != 1:
    raise ValueError(f"textures must be a 1-D string tensor of paths, got shape {textures.shape}")
  if textures.shape[0] == 0 and p.p_cutpaste < 1.0:
    raise ValueError("textures is empty but data.synthesis.p_cutpaste < 1 needs texture images")
  seed = tf.cast(tf.convert_to_tensor(seed), tf.int64)
  seeds = _split(seed, 4)
  if force_branch is None:
    use_cutpaste = _uniform(seeds[0]) < p.p_cutpaste
    scar = _uniform(seeds[1]) < 0.5
    branch = tf.where(use_cutpaste, tf.where(scar, BRANCH_SCAR, BRANCH_CUTPASTE), BRANCH_PERLIN)
  else:
    if force_branch not in (BRANCH_CUTPASTE, BRANCH_SCAR, BRANCH_PERLIN):
      raise ValueError(f"force_branch must be None or one of 0, 1, 2, got {force_branch}")
    branch = tf.constant(force_branch, tf.int32)

  def run(fn, s):
    def f():
      out, mask, hw = fn(s)
      return (tf.ensure_shape(out, [size_h, size_w, 3]), tf.ensure_shape(mask, [size_h, size_w]),
              tf.ensure_shape(tf.cast(hw, tf.int32), [2]))
    return f

  branches = [run(lambda s: _cutpaste_normal(image, s, p), seeds[2]),
              run(lambda s: _cutpaste_scar(image, s, p), seeds[2]),
              run(lambda s: _perlin_paste(image, s, textures, p), seeds[3])]
  if force_branch is None:
    out, mask, hw = tf.switch_case(branch, branches)
  else:
    out, mask, hw = branches[force_branch]()   # no Case op: cheaper to trace and to run eagerly
  mask = tf.cast(mask, tf.float32)[:, :, None]
  return out, mask, {"branch": tf.cast(branch, tf.int32), "patch_hw": hw}


def synthesize(image: tf.Tensor, seed: tf.Tensor, textures: tf.Tensor, cfg: Any):
  """One synthetic anomaly (spec section 2), pure TF, deterministic in `seed`.

  Args:
    image: (H, W, 3) uint8 resized query image (static H = W, divisible by 32).
    seed: (2,) int32/int64 stateless seed.
    textures: (T,) tf.string texture paths from `texture_paths`.
    cfg: `config.data.synthesis`.

  Returns:
    (image (H, W, 3) uint8, mask (H, W, 1) float32 in {0, 1}); pixels where mask == 0 are unchanged.
  """
  out, mask, _ = synthesize_with_info(image, seed, textures, cfg)
  return out, mask
