"""A small built-in anomaly-detection dataset, generated offline in seconds from CC0 photos.

`make_demo_dataset(root)` writes the MVTec AD layout::

    root/<cls>/train/good/NNN.png
    root/<cls>/test/good/NNN.png
    root/<cls>/test/<defect>/NNN.png
    root/<cls>/ground_truth/<defect>/NNN_mask.png   (0 / 255)
    root/demo_meta.json                             (parameters; written last)

Classes are the brick, grass and gravel photos bundled with scikit-image (CC0), using only their
BOTTOM halves: the texture fallback of `textures.texture_paths("")` uses the top halves, so training
textures never contain the test images. Normal images are jittered crops of that half: train crops from
the left part, test crops from a held-out right part. Defects come from generators unrelated to the
training synthesis (no cut-paste, no textures): thin scratches, smooth colour stains and dark
shaded holes, each with its exact mask.

Run `python -m data_pipelines.demo_data --out DIR` to write it from the command line.
"""
import argparse
import json
import math
import os
import shutil
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

from data_pipelines import storage

DEMO_CLASSES = ("brick", "grass", "gravel")
DEFECT_TYPES = ("scratch", "stain", "hole")
META_FILE = "demo_meta.json"
_VERSION = 1
_CROP = 160              # source pixels per crop (upsampled to `size`)
_TRAIN_COLS = (0, 320)   # columns of the bottom half used for training crops
_TEST_COLS = (320, 512)  # held-out columns for test crops


def _source_half(cls: str) -> np.ndarray:
  """Bottom half of a scikit-image photo as float32 (256, 512, 3) in [0, 255]."""
  # scikit-image: the `train` extra only, not the plain install that indexes export data
  from skimage import data as skdata  # pylint: disable=import-outside-toplevel
  a = np.asarray(getattr(skdata, cls)())
  if a.ndim == 2:
    a = np.repeat(a[:, :, None], 3, axis=2)
  a = a[a.shape[0] // 2:, :, :3]
  return a.astype(np.float32)


def _crop(src: np.ndarray, cols: Sequence[int], size: int, rng: np.random.Generator) -> np.ndarray:
  """A jittered crop of src[:, cols[0]:cols[1]] resized to (size, size): float32 (size, size, 3)."""
  h = src.shape[0]
  x = int(rng.integers(cols[0], cols[1] - _CROP + 1))
  y = int(rng.integers(0, h - _CROP + 1))
  patch = src[y:y + _CROP, x:x + _CROP]
  gain = rng.uniform(0.95, 1.05)            # small exposure jitter
  patch = np.clip(patch * gain, 0, 255).astype(np.uint8)
  img = Image.fromarray(patch).resize((size, size), Image.BICUBIC)
  return np.asarray(img).astype(np.float32)


def _smooth_curve(rng: np.random.Generator, size: int) -> list:
  """Points of a random smooth open curve (slowly turning random walk) inside the image."""
  margin = 0.1 * size
  for _ in range(100):
    length = rng.uniform(0.3, 0.65) * size
    steps = 24
    angle = rng.uniform(0, 2 * math.pi)
    turn = rng.normal(0, 0.08)
    x, y = rng.uniform(margin, size - margin, 2)
    pts = [(x, y)]
    for _ in range(steps):
      turn += rng.normal(0, 0.03)
      angle += turn
      x += math.cos(angle) * length / steps
      y += math.sin(angle) * length / steps
      pts.append((x, y))
    arr = np.array(pts)
    if arr.min() >= 2 and arr.max() <= size - 3:
      return pts
  return pts


def _scratch(img: np.ndarray, rng: np.random.Generator):
  """A thin bright or dark curved scratch."""
  size = img.shape[0]
  canvas = Image.new("L", (size, size), 0)
  width = int(rng.integers(2, 4)) * max(1, size // 256) + (1 if size >= 384 else 0)
  ImageDraw.Draw(canvas).line(_smooth_curve(rng, size), fill=255, width=width, joint="curve")
  mask = np.asarray(canvas) > 0
  value = rng.choice([rng.uniform(215, 250), rng.uniform(5, 40)])
  strength = rng.uniform(0.7, 0.9)
  out = img.copy()
  out[mask] = img[mask] * (1 - strength) + value * strength
  return out, mask


def _blob_field(rng: np.random.Generator, size: int, radius: float, cy: float, cx: float) -> np.ndarray:
  """Smooth positive field: a few Gaussian bumps around (cy, cx)."""
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
  field = np.zeros((size, size), np.float32)
  for _ in range(int(rng.integers(4, 9))):
    oy, ox = rng.normal(0, 0.9 * radius, 2)
    s = radius * rng.uniform(0.35, 0.7)
    field += np.exp(-(((yy - cy - oy) ** 2 + (xx - cx - ox) ** 2) / (2 * s * s)))
  return field / field.max()


def _stain(img: np.ndarray, rng: np.random.Generator):
  """A smooth irregular blob with a colour shift, strongest in its centre."""
  size = img.shape[0]
  radius = rng.uniform(0.05, 0.11) * size
  margin = 3.0 * radius
  cy, cx = rng.uniform(margin, size - margin, 2)
  field = _blob_field(rng, size, radius, cy, cx)
  mask = field > 0.35
  tint = np.array(rng.choice([(150, 90, 30), (60, 90, 170), (40, 110, 50), (170, 60, 60)]), np.float32)
  tint = tint * rng.uniform(0.8, 1.2)
  k = (0.35 + 0.4 * (field - 0.35) / 0.65)[..., None]     # 0.35 at the rim .. 0.75 in the centre
  out = img.copy()
  mixed = img * (1 - k) + tint * k
  out[mask] = mixed[mask]
  return out, mask


def _hole(img: np.ndarray, rng: np.random.Generator):
  """A dark, shaded elliptical hole / dent with a lit rim on one side."""
  size = img.shape[0]
  a = rng.uniform(0.05, 0.11) * size
  b = a * rng.uniform(0.5, 1.0)
  theta = rng.uniform(0, math.pi)
  margin = a + 4
  cy, cx = rng.uniform(margin, size - margin, 2)
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
  dy, dx = yy - cy, xx - cx
  u = (dx * math.cos(theta) + dy * math.sin(theta)) / a
  v = (-dx * math.sin(theta) + dy * math.cos(theta)) / b
  r2 = u * u + v * v
  mask = r2 <= 1.0
  light = rng.uniform(0, 2 * math.pi)
  rim = np.clip(u * math.cos(light) + v * math.sin(light), 0, 1) * np.sqrt(np.clip(r2, 0, 1))
  shade = 0.12 + 0.45 * r2 + 0.6 * rim            # dark pit, brighter towards the lit rim
  out = img.copy()
  shaded = img * shade[..., None] * 0.8 + 10.0 * rim[..., None]
  out[mask] = shaded[mask]
  return out, mask


DEFECT_GENERATORS = {"scratch": _scratch, "stain": _stain, "hole": _hole}


def add_defect(image: np.ndarray, defect: str, rng: np.random.Generator):
  """Draws one defect of type `defect` (see DEFECT_TYPES) on a normal image.

  Args:
    image: (H, W, 3) uint8 normal image.
    defect: "scratch" | "stain" | "hole".
    rng: numpy Generator.

  Returns:
    (defective image (H, W, 3) uint8, mask (H, W) bool). Pixels outside the mask are unchanged and
    at least half of the masked pixels are changed.
  """
  img = image.astype(np.float32)
  for _ in range(20):   # retry the (rare) defect that changes too few pixels
    out, mask = DEFECT_GENERATORS[defect](img, rng)
    out = np.clip(np.round(out), 0, 255).astype(np.uint8)
    out[~mask] = image[~mask]
    changed = (out != image).any(-1) & mask
    if mask.sum() >= 16 and changed.sum() >= 0.5 * mask.sum():
      break
  return out, mask


def _defect_counts(num_test_bad: int) -> dict:
  base, extra = divmod(num_test_bad, len(DEFECT_TYPES))
  return {d: base + (1 if i < extra else 0) for i, d in enumerate(DEFECT_TYPES)}


def _expected_files(num_train: int, num_test_good: int, num_test_bad: int) -> list:
  files = []
  for cls in DEMO_CLASSES:
    files += [f"{cls}/train/good/{i:03d}.png" for i in range(num_train)]
    files += [f"{cls}/test/good/{i:03d}.png" for i in range(num_test_good)]
    for d, n in _defect_counts(num_test_bad).items():
      files += [f"{cls}/test/{d}/{i:03d}.png" for i in range(n)]
      files += [f"{cls}/ground_truth/{d}/{i:03d}_mask.png" for i in range(n)]
  return files


def _params(size, num_train, num_test_good, num_test_bad, seed) -> dict:
  return {"version": _VERSION, "size": size, "num_train": num_train, "num_test_good": num_test_good,
          "num_test_bad": num_test_bad, "seed": seed, "classes": list(DEMO_CLASSES),
          "defects": list(DEFECT_TYPES)}


def _is_complete(root: str, params: dict) -> bool:
  path = storage.join(root, META_FILE)
  try:
    meta = json.loads(storage.read_text(path)) if storage.isfile(path) else None
  except (OSError, ValueError):
    return False
  if not isinstance(meta, dict):
    return False
  if {k: meta.get(k) for k in params} != params:
    return False
  files = _expected_files(params["num_train"], params["num_test_good"], params["num_test_bad"])
  return all(storage.isfile(storage.join(root, p)) for p in files)


def _save_png(path: str, array: np.ndarray) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path, format="PNG", compress_level=1)


def _write(tmp: str, params: dict) -> None:
  size, seed = params["size"], params["seed"]
  for ci, cls in enumerate(DEMO_CLASSES):
    src = _source_half(cls)
    rng = np.random.default_rng([seed, ci])
    for i in range(params["num_train"]):
      img = _crop(src, _TRAIN_COLS, size, rng)
      _save_png(os.path.join(tmp, cls, "train", "good", f"{i:03d}.png"), img.astype(np.uint8))
    for i in range(params["num_test_good"]):
      img = _crop(src, _TEST_COLS, size, rng)
      _save_png(os.path.join(tmp, cls, "test", "good", f"{i:03d}.png"), img.astype(np.uint8))
    for d, n in _defect_counts(params["num_test_bad"]).items():
      for i in range(n):
        img = _crop(src, _TEST_COLS, size, rng).astype(np.uint8)
        out, mask = add_defect(img, d, rng)
        _save_png(os.path.join(tmp, cls, "test", d, f"{i:03d}.png"), out)
        _save_png(os.path.join(tmp, cls, "ground_truth", d, f"{i:03d}_mask.png"),
                  (mask * 255).astype(np.uint8))
  with open(os.path.join(tmp, META_FILE), "w", encoding="utf-8") as f:
    json.dump(params, f, indent=1)


def make_demo_dataset(root: str, *, size: int = 256, num_train: int = 32, num_test_good: int = 10,
                      num_test_bad: int = 12, seed: int = 0) -> str:
  """Writes (or reuses) the demo dataset in MVTec layout.

  Args:
    root: output folder; created if missing. If it already holds a complete demo dataset made with
      the same parameters it is reused as is; an older demo dataset there is replaced; a non-empty
      folder that is not a demo dataset raises ValueError (nothing is deleted).
    size: side of the square PNGs on disk.
    num_train: normal training images per class.
    num_test_good: normal test images per class.
    num_test_bad: defective test images per class, split evenly over DEFECT_TYPES.
    seed: generation seed.

  Returns:
    root (absolute when local; a `gs://` or `ram://` root is kept as given).
  """
  if size < 64 or min(num_train, num_test_good, num_test_bad) < 0:
    raise ValueError(f"make_demo_dataset: need size >= 64 and non-negative counts, got size={size}, "
                     f"num_train={num_train}, num_test_good={num_test_good}, num_test_bad={num_test_bad}")
  root = storage.abspath(root)
  params = _params(int(size), int(num_train), int(num_test_good), int(num_test_bad), int(seed))
  if _is_complete(root, params):
    return root
  if (storage.isdir(root) and storage.listdir(root)
      and not storage.isfile(storage.join(root, META_FILE))):
    raise ValueError(f"make_demo_dataset: {root} is not empty and holds no {META_FILE}; refusing to "
                     "overwrite it, choose another folder")
  tmp = storage.staging_dir(root)   # local; beside `root` when that is local
  try:
    _write(tmp, params)
    if storage.isdir(root) and _is_complete(root, params):   # another process finished first
      return root
    try:
      storage.move_dir(tmp, root)
    except OSError:
      if not _is_complete(root, params):
        raise
  finally:
    if os.path.isdir(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
  return root


def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True, help="output folder")
  parser.add_argument("--size", type=int, default=256)
  parser.add_argument("--num-train", type=int, default=32)
  parser.add_argument("--num-test-good", type=int, default=10)
  parser.add_argument("--num-test-bad", type=int, default=12)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  root = make_demo_dataset(args.out, size=args.size, num_train=args.num_train,
                           num_test_good=args.num_test_good, num_test_bad=args.num_test_bad, seed=args.seed)
  print(root)


if __name__ == "__main__":
  main()
