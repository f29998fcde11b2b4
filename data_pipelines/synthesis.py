"""Anomaly synthesis for training (docs/algorithm.md §7): CutPaste (rectangle, scar) and DRAEM Perlin + texture.

Everything here is pure TensorFlow with stateless randomness only, so `synthesize` can run inside
`tf.data.Dataset.map(..., num_parallel_calls=...)` without the GIL, and one seed always gives the same
sample. Images are uint8 HWC (one image, no batch axis); H = W, divisible by 32 (Perlin cells).

The branch is drawn per sample: with probability `p_cutpaste` CutPaste (a fair coin then picks the
rectangle or the scar variant), otherwise a DTD texture blended through a thresholded Perlin mask.
Every sample is anomalous; pixels outside the returned mask are never changed.

This module is the recipe only. Reference behaviours are emulated where they matter (docs/algorithm.md §7.2-7.4), in
the modules it builds on: `image_ops` (stateless draws, torchvision ColorJitter on PIL images, PIL
`rotate(expand=True)`), `imgaug_ops` (the imgaug 0.4 texture augmenters), `perlin` (DRAEM's
`rand_perlin_2d_np`) and `textures` (texture listing and cv2-like reading).
"""
import dataclasses
from typing import Any, Optional

from data_pipelines.image_ops import color_jitter, randint, rotate_expand_nearest, split_seed, to_u8, uniform
from data_pipelines.imgaug_ops import augment_texture
from data_pipelines.perlin import perlin_noise
from data_pipelines.textures import load_texture
from data_pipelines.tf_setup import import_tensorflow

tf = import_tensorflow()


BRANCH_CUTPASTE = 0   # CutPaste "normal": jittered rectangle pasted elsewhere
BRANCH_SCAR = 1       # CutPaste "scar": thin jittered patch, rotated, pasted elsewhere
BRANCH_PERLIN = 2     # DRAEM: augmented texture blended through a Perlin mask
BRANCH_NAMES = ("cutpaste", "scar", "perlin")


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
# CutPaste


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


def _cutpaste_normal(image: tf.Tensor, seed: tf.Tensor, p: SynthesisParams):
  size_h, size_w = image.shape[0], image.shape[1]
  seeds = split_seed(seed, 8)
  area = uniform(seeds[0], p.cutpaste_area[0], p.cutpaste_area[1], dtype=tf.float64) * (size_h * size_w)
  aspect_lo = uniform(seeds[1], 0.3, 1.0, dtype=tf.float64)
  aspect_hi = uniform(seeds[2], 1.0, 3.3, dtype=tf.float64)
  aspect = tf.where(uniform(seeds[3]) < 0.5, aspect_lo, aspect_hi)
  pw = tf.minimum(tf.cast(tf.sqrt(area * aspect), tf.int32), size_w)
  ph = tf.minimum(tf.cast(tf.sqrt(area / aspect), tf.int32), size_h)
  pw = tf.maximum(pw, 1)
  ph = tf.maximum(ph, 1)
  src_x = randint(seeds[4], 0, size_w - pw)
  src_y = randint(tf.random.experimental.stateless_fold_in(seeds[4], 1), 0, size_h - ph)
  patch = tf.slice(image, tf.stack([src_y, src_x, 0]), tf.stack([ph, pw, 3]))
  patch = color_jitter(patch, seeds[5], p.jitter)
  dst_x = randint(seeds[6], 0, size_w - pw)
  dst_y = randint(seeds[7], 0, size_h - ph)
  out, mask = _paste(image, patch, tf.ones([ph, pw], tf.bool), dst_y, dst_x)
  return out, mask, tf.stack([ph, pw])


def _cutpaste_scar(image: tf.Tensor, seed: tf.Tensor, p: SynthesisParams):
  size_h, size_w = image.shape[0], image.shape[1]
  seeds = split_seed(seed, 8)
  pw = tf.minimum(randint(seeds[0], p.scar_width[0], p.scar_width[1]), size_w)
  ph = tf.minimum(randint(seeds[1], p.scar_height[0], p.scar_height[1]), size_h)
  src_x = randint(seeds[2], 0, size_w - pw)
  src_y = randint(seeds[3], 0, size_h - ph)
  patch = tf.slice(image, tf.stack([src_y, src_x, 0]), tf.stack([ph, pw, 3]))
  patch = color_jitter(patch, seeds[4], p.jitter)
  angle = uniform(seeds[5], -p.scar_angle, p.scar_angle)
  rotated, alpha = rotate_expand_nearest(patch, angle)
  dst_x = randint(seeds[6], 0, size_w - pw)   # from the un-rotated size, as the reference
  dst_y = randint(seeds[7], 0, size_h - ph)
  out, mask = _paste(image, rotated, alpha, dst_y, dst_x)
  return out, mask, tf.stack([ph, pw])


# ----------------------------------------------------------------------------------------------
# Perlin + texture


def _perlin_paste(image: tf.Tensor, seed: tf.Tensor, textures: tf.Tensor, p: SynthesisParams):
  size = image.shape[0]
  seeds = split_seed(seed, 4)
  num = tf.shape(textures)[0]
  idx = randint(seeds[0], 0, num - 1)
  tex = load_texture(tf.gather(textures, idx), size, p.bgr_textures)
  tex, _ = augment_texture(tex, seeds[1])
  noise = perlin_noise(seeds[2], size, p.perlin_scale_exp, p.perlin_rotate)
  mask = noise > p.perlin_threshold
  beta = p.beta_max * uniform(seeds[3])
  img_f = tf.cast(image, tf.float32)
  blended = tf.floor((1.0 - beta) * tf.cast(tex, tf.float32) + beta * img_f)
  out = tf.where(mask[:, :, None], to_u8(blended), image)
  return out, mask, tf.zeros([2], tf.int32)


# ----------------------------------------------------------------------------------------------
# Entry points


def synthesize_with_info(image: tf.Tensor, seed: tf.Tensor, textures: tf.Tensor, cfg: Any,
                         force_branch: Optional[int] = None):
  """`synthesize` plus what it did.

  Args:
    image: (H, W, 3) uint8, static H = W divisible by 32.
    seed: (2,) int32/int64 stateless seed.
    textures: (T,) string texture paths (`textures.texture_paths`), T >= 1.
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
  seeds = split_seed(seed, 4)
  if force_branch is None:
    use_cutpaste = uniform(seeds[0]) < p.p_cutpaste
    scar = uniform(seeds[1]) < 0.5
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
  """One synthetic anomaly (docs/algorithm.md §7), pure TF, deterministic in `seed`.

  Args:
    image: (H, W, 3) uint8 resized query image (static H = W, divisible by 32).
    seed: (2,) int32/int64 stateless seed.
    textures: (T,) tf.string texture paths from `textures.texture_paths`.
    cfg: `config.data.synthesis`.

  Returns:
    (image (H, W, 3) uint8, mask (H, W, 1) float32 in {0, 1}); pixels where mask == 0 are unchanged.
  """
  out, mask, _ = synthesize_with_info(image, seed, textures, cfg)
  return out, mask
