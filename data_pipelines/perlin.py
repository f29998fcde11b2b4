"""DRAEM's Perlin noise (`rand_perlin_2d_np`) and the imgaug rotation of its mask, in pure TF."""
import math
from typing import Sequence

from data_pipelines.image_ops import randint, split_seed, uniform
from data_pipelines.tf_setup import import_tensorflow

tf = import_tensorflow()


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
  seeds = split_seed(seed, 3)
  res = tf.bitwise.left_shift(1, randint(seeds[0], lo, hi, shape=(2,)))
  angles = 2.0 * math.pi * uniform(seeds[1], shape=(2 ** hi + 1, 2 ** hi + 1))
  noise = perlin_from_angles(angles, res, size)
  if rotate:
    noise = rotate_bilinear(noise, uniform(seeds[2], -rotate, rotate))
  return noise
