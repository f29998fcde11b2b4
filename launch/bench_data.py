"""Throughput of the training input path on this machine: decode + resize + anomaly synthesis.

    python -m launch.bench_data [--root ../shared/data/real/bottle] [--textures ../shared/data/textures]
        [--size 224] [--batch 32] [--batches 20] [--warmup 3] [--threads 0]

Runs tf.data with a parallel map (AUTOTUNE) over the root's train/good images, after `--warmup`
batches, and prints images/s for: decode+resize only, + synthesis with the random branch mix of
training, and + each branch forced (CutPaste, scar, Perlin). Without --root it uses
../shared/data/real/bottle when present, else the built-in demo dataset.
"""
import argparse
import os
import time
from typing import Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _default_root() -> str:
  bottle = os.path.join(os.path.dirname(REPO), "shared", "data", "real", "bottle")
  if os.path.isdir(bottle):
    return bottle
  # TensorFlow (under contact_sheet) is imported after `main` sets TF_CPP_MIN_LOG_LEVEL
  from data_pipelines.contact_sheet import default_demo_root  # pylint: disable=import-outside-toplevel
  return default_demo_root()


def _default_textures() -> str:
  shared = os.path.join(os.path.dirname(REPO), "shared", "data", "textures")
  return shared if os.path.isdir(shared) else ""


def measure(paths, textures, size: int, batch: int, batches: int, warmup: int, mode: Optional[str],
            cfg, threads: int = 0) -> float:
  """Images per second of one pipeline variant. mode: None (decode+resize), "mix" or a branch name."""
  # TensorFlow is imported after `main` sets TF_CPP_MIN_LOG_LEVEL
  from data_pipelines.tf_setup import import_tensorflow  # pylint: disable=import-outside-toplevel
  tf = import_tensorflow()
  from data_pipelines import synthesis  # pylint: disable=import-outside-toplevel
  from data_pipelines.contact_sheet import decode_resize  # pylint: disable=import-outside-toplevel
  tex = tf.constant(textures)
  force = None if mode in (None, "mix") else synthesis.BRANCH_NAMES.index(mode)

  @tf.autograph.experimental.do_not_convert
  def fn(i, path):
    image = decode_resize(path, size)
    if mode is None:
      return image, tf.zeros([size, size, 1], tf.float32)
    seed = tf.stack([tf.constant(0, tf.int64), i])
    out, mask, _ = synthesis.synthesize_with_info(image, seed, tex, cfg, force_branch=force)
    return out, mask

  n = len(paths)
  ds = tf.data.Dataset.range(10 ** 9)
  paths_t = tf.constant(paths)
  ds = ds.map(tf.autograph.experimental.do_not_convert(lambda i: (i, tf.gather(paths_t, i % n))))
  ds = ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
  ds = ds.batch(batch, drop_remainder=True).prefetch(2)
  if threads:
    options = tf.data.Options()
    options.threading.private_threadpool_size = threads
    ds = ds.with_options(options)
  it = iter(ds)
  for _ in range(warmup):
    next(it)[0].numpy()
  start = time.perf_counter()
  for _ in range(batches):
    next(it)[0].numpy()
  return batches * batch / (time.perf_counter() - start)


def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = argparse.ArgumentParser(description="tf.data throughput of decode + resize + synthesis.")
  parser.add_argument("--root", default="", help="MVTec class folder or root (train/good images)")
  parser.add_argument("--textures", default=None, help="DTD-layout folder; '' = scikit-image photos")
  parser.add_argument("--size", type=int, default=224)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--batches", type=int, default=20, help="timed batches per row")
  parser.add_argument("--warmup", type=int, default=3, help="untimed batches per row (tracing, autotune)")
  parser.add_argument("--threads", type=int, default=0, help="tf.data private thread pool (0 = default)")
  parser.add_argument("--modes", default="decode,mix,cutpaste,scar,perlin",
                      help="comma list of rows: decode, mix, cutpaste, scar, perlin")
  args = parser.parse_args(argv)

  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported, here:
  from data_pipelines.tf_setup import import_tensorflow  # pylint: disable=import-outside-toplevel
  tf = import_tensorflow()
  from onenip_jax.config.base import get_base_config  # pylint: disable=import-outside-toplevel
  from data_pipelines import textures as textures_lib  # pylint: disable=import-outside-toplevel
  from data_pipelines.contact_sheet import train_good_paths  # pylint: disable=import-outside-toplevel
  tf.config.set_visible_devices([], "GPU")

  root = args.root or _default_root()
  textures_dir = _default_textures() if args.textures is None else args.textures
  paths = train_good_paths(root)
  textures = textures_lib.texture_paths(textures_dir)
  cfg = get_base_config().data.synthesis
  print(f"root: {root} ({len(paths)} images)   textures: {textures_dir or 'scikit-image'} ({len(textures)})")
  print(f"size {args.size}, batch {args.batch}, {args.batches} timed batches after {args.warmup} warm-up, "
        f"{os.cpu_count()} CPUs, tf {tf.__version__}")
  print(f"{'pipeline':<38}{'images/s':>10}")
  for mode in args.modes.split(","):
    mode = mode.strip()
    label = {"decode": "decode+resize", "mix": "decode+resize+synthesis (train mix)"}.get(
        mode, f"decode+resize+{mode} only")
    ips = measure(paths, textures, args.size, args.batch, args.batches, args.warmup,
                  None if mode == "decode" else mode, cfg, args.threads)
    print(f"{label:<38}{ips:>10.1f}", flush=True)


if __name__ == "__main__":
  main()
