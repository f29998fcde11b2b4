"""Texture images of the Perlin branch: listing a DTD-layout folder (or the scikit-image fallback)
and reading one file as the reference's cv2.imread + cv2.resize would.
"""
import io
import os

import numpy as np
from PIL import Image

from data_pipelines import storage
from data_pipelines.errors import UserError
from data_pipelines.image_ops import to_u8
from data_pipelines.tf_setup import import_tensorflow

tf = import_tensorflow()

# The texture files read: the JPEG and PNG of `storage.IMAGE_EXTENSIONS` only, as the reference
# reads DTD (JPEG) and `load_texture` decodes with TF, which reads no TIFF.
TEXTURE_EXTENSIONS = tuple(e for e in storage.IMAGE_EXTENSIONS if e in (".jpg", ".jpeg", ".png"))


# ----------------------------------------------------------------------------------------------
# Texture files


def _listdir_images(folder: str) -> list:
  return [storage.join(folder, f) for f in storage.listdir(folder)
          if f.lower().endswith(TEXTURE_EXTENSIONS) and storage.isfile(storage.join(folder, f))]


def _skimage_texture_arrays() -> dict:
  """Texture-like CC0 photos bundled with scikit-image: name -> uint8 (h, w, 3).

  Brick, grass and gravel contribute only their TOP halves (the demo dataset uses the bottom halves);
  moon and immunohistochemistry contribute four quadrants each.
  """
  # scikit-image: the `train` extra only, not the plain install that indexes export data
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
  folder = os.path.join(storage.cache_dir(), "textures")
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
    raise UserError(f"data.textures: texture folder {root} does not exist")
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
    patterns = ", ".join("*" + e for e in TEXTURE_EXTENSIONS)
    raise UserError(f"data.textures: no texture image ({patterns}) found in {root}; expected "
                    "the DTD layout images/<class>/*.jpg or <class>/*.jpg")
  return sorted(paths)


# ----------------------------------------------------------------------------------------------
# Reading one texture


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
  tex = to_u8(tf.round(tf.clip_by_value(tex, 0.0, 255.0)))
  if bgr:
    tex = tex[:, :, ::-1]
  return tf.ensure_shape(tex, [size, size, 3])
