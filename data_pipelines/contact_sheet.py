"""Contact sheet of synthetic training anomalies: what the model actually trains on.

    python -m data_pipelines.contact_sheet --out sheet.png [--root ../shared/data/real/bottle]
        [--textures ../shared/data/textures] [--size 224] [--num 16] [--seed 0]

Each cell shows a normal training image (MVTec `train/good`), its synthetic anomaly (made by
`synthesis.synthesize_with_info`, the same TF ops as training) and the mask, labelled with the branch.
Without --root the built-in demo dataset is used (generated into the cache on first use).
"""
import argparse
import glob
import io
import os
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

from data_pipelines import demo_data, storage, synthesis, textures
from data_pipelines.input_pipeline import decode_resize as pipeline_decode_resize
from data_pipelines.tf_setup import import_tensorflow


def train_good_paths(root: str) -> list:
  """Sorted normal training images under an MVTec class folder or a root holding class folders."""
  root = os.path.abspath(os.path.expanduser(root))
  patterns = [os.path.join(root, "train", "good", "*"), os.path.join(root, "*", "train", "good", "*")]
  for pattern in patterns:
    paths = sorted(p for p in glob.glob(pattern) if storage.is_image_name(p))
    if paths:
      return paths
  raise ValueError(f"no train/good images under {root} (expected <root>/train/good/* or "
                   "<root>/<class>/train/good/*)")


def decode_resize(path, size: int):
  """Reads an image file as RGB uint8 (size, size, 3) with the training pipeline's ops
  (`input_pipeline.decode_resize`)."""
  tf = import_tensorflow()
  return tf.ensure_shape(pipeline_decode_resize(path, size), [size, size, 3])


def default_demo_root() -> str:
  root = os.path.join(storage.cache_dir(), "demo")
  return demo_data.make_demo_dataset(root)


def make_sheet(root: str, textures_dir: str = "", size: int = 224, num: int = 16, seed: int = 0,
               cols: int = 4, cfg=None) -> np.ndarray:
  """Synthesises `num` samples and lays them out; returns the sheet as uint8 (H, W, 3).

  `cfg` is `config.data.synthesis` (ConfigDict / mapping / `synthesis.SynthesisParams`); None takes
  the defaults of `synthesis.SynthesisParams`.
  """
  tf = import_tensorflow()
  paths = train_good_paths(root)
  rng = np.random.default_rng(seed)
  picks = rng.choice(len(paths), size=num, replace=len(paths) < num)
  tex = tf.constant(textures.texture_paths(textures_dir))

  @tf.autograph.experimental.do_not_convert
  def sample(i, path):
    image = decode_resize(path, size)
    out, mask, info = synthesis.synthesize_with_info(
        image, tf.stack([tf.constant(seed, tf.int64), i]), tex, cfg)
    return image, out, mask, info["branch"]

  ds = tf.data.Dataset.from_tensor_slices((tf.range(num, dtype=tf.int64), [paths[k] for k in picks]))
  ds = ds.map(sample, num_parallel_calls=tf.data.AUTOTUNE)
  gap, caption = 6, 18
  cell_w, cell_h = 3 * size + 2 * 2, size + caption
  rows = (num + cols - 1) // cols
  sheet = Image.new("RGB", (cols * cell_w + (cols - 1) * gap, rows * cell_h + (rows - 1) * gap), (40, 40, 40))
  draw = ImageDraw.Draw(sheet)
  for k, (image, out, mask, branch) in enumerate(ds.as_numpy_iterator()):
    x0 = (k % cols) * (cell_w + gap)
    y0 = (k // cols) * (cell_h + gap)
    m = np.repeat((mask * 255).astype(np.uint8), 3, axis=2)
    for j, tile in enumerate((image, out, m)):
      sheet.paste(Image.fromarray(tile), (x0 + j * (size + 2), y0 + caption))
    name = os.path.relpath(paths[picks[k]], root)
    label = f"{synthesis.BRANCH_NAMES[int(branch)]}  area {mask.mean() * 100:.1f}%  {name}"
    draw.text((x0 + 2, y0 + 3), label[:3 * size // 6], fill=(235, 235, 235))
  return np.asarray(sheet)


def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = argparse.ArgumentParser(description="Contact sheet of synthetic training anomalies.")
  parser.add_argument("--out", required=True, help="output PNG path")
  parser.add_argument("--root", default="", help="MVTec-layout class folder or dataset root; default: demo")
  parser.add_argument("--textures", default="", help="DTD-layout texture folder; default: scikit-image photos")
  parser.add_argument("--size", type=int, default=224, help="input size (square, divisible by 32)")
  parser.add_argument("--num", type=int, default=16)
  parser.add_argument("--cols", type=int, default=4)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  root = args.root or default_demo_root()
  sheet = make_sheet(root, args.textures, args.size, args.num, args.seed, args.cols)
  out = storage.abspath(args.out)
  buf = io.BytesIO()
  Image.fromarray(sheet).save(buf, format="PNG")
  storage.atomic_write(out, buf.getvalue())
  print(out)


if __name__ == "__main__":
  main()
