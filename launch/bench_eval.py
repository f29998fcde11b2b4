r"""Evaluation throughput (images/s, decode to metrics) and peak host memory.

  python -m launch.bench_eval [--config configs/real.py] [--workdir RUN] [--batch 16]
  python -m launch.bench_eval --synthetic-visa [--config configs/real.py]

--synthetic-visa replaces the config's data by a generated VisA-sized test set (12 classes, 2,162
test images of 224 x 224 px, half of them anomalous with VisA-style masks of small class ids, 4
normal training images per class for the prompts), written to a temporary folder.

With --workdir the trained checkpoint is used; without, a freshly initialised network (speed does
not depend on the weights) with a stand-in fusion constant. Runs the same path as `onenip-eval`
(tf.data decode + resize, frozen backbone, network, fusion, box-filter scores, per-class metrics,
one class at a time) over the config's test set.
"""
import argparse
import os
import platform
import resource
import subprocess
import tempfile
import time

import jax
import numpy as np
from PIL import Image

from data_pipelines import indexing
from onenip_jax import sharding
from onenip_jax.config.loading import load_config
from onenip_jax.evaluation import after_training, maps, restore
from onenip_jax.evaluation import inference
from onenip_jax.training import state as state_lib


VISA_CLASSES = ("candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2",
                "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum")
VISA_TEST_IMAGES = 2162


def write_synthetic_visa(root: str, size: int = 224, seed: int = 0) -> None:
  """mvtec-layout folders of VISA_CLASSES with VISA_TEST_IMAGES test images in all (see the doc)."""
  rng = np.random.default_rng(seed)
  per_class = np.full(len(VISA_CLASSES), VISA_TEST_IMAGES // len(VISA_CLASSES))
  per_class[:VISA_TEST_IMAGES % len(VISA_CLASSES)] += 1
  for cls, n_test in zip(VISA_CLASSES, per_class):
    colour = rng.integers(40, 215, 3)
    def image():
      noise = rng.normal(0, 20, (size, size, 3))
      return np.clip(colour + noise, 0, 255).astype(np.uint8)
    for split, defect, n in (("train", "good", 4), ("test", "good", n_test - n_test // 2),
                             ("test", "anomaly", n_test // 2)):
      d = os.path.join(root, cls, split, defect)
      os.makedirs(d, exist_ok=True)
      for i in range(n):
        img = image()
        if defect == "anomaly":
          m = np.zeros((size, size), np.uint8)
          y, x = rng.integers(0, size - 40, 2)
          m[y:y + rng.integers(4, 40), x:x + rng.integers(4, 40)] = 1 + i % 3
          img[m > 0] = 255 - img[m > 0]
          g = os.path.join(root, cls, "ground_truth", defect)
          os.makedirs(g, exist_ok=True)
          Image.fromarray(m).save(os.path.join(g, f"{i:04d}.png"))
        Image.fromarray(img).save(os.path.join(d, f"{i:04d}.png"), compress_level=1)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="configs/real.py")
  p.add_argument("--workdir")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--out", default="/tmp/onenip-bench-eval")
  p.add_argument("--synthetic-visa", action="store_true",
                 help="evaluate a generated VisA-sized test set instead of the config's data")
  a = p.parse_args()
  tmp = tempfile.TemporaryDirectory(prefix="onenip-visa-") if a.synthetic_visa else None
  mesh = sharding.make_mesh()
  if a.workdir:
    loaded = restore.load_checkpoint(a.workdir, mesh, config=a.config)
    cfg, predictor, frozen_c = loaded.cfg, loaded.predictor, loaded.fusion_c
  else:
    cfg = load_config(a.config)
    model, features = inference.make_model(cfg)
    tx = state_lib.make_optimizer(cfg, 1)
    state = jax.jit(lambda: state_lib.init_state(cfg, model, tx, features),
                    out_shardings=sharding.replicated(mesh))()
    bb = jax.device_put(features.load_variables(cfg.backbone), sharding.replicated(mesh))
    predictor = inference.Predictor(
        model, features, {"params": state.params, "batch_stats": state.batch_stats}, bb, mesh)
    frozen_c = 1.0  # a stand-in frozen fusion constant (the default "frozen" path)
  cfg.unlock()
  cfg.eval.batch_size, cfg.eval.heatmaps, cfg.eval.prompt_mode = a.batch, False, "class"
  if tmp is not None:
    write_synthetic_visa(tmp.name, cfg.input_size)
    cfg.data.layout, cfg.data.root, cfg.data.classes = "mvtec", tmp.name, VISA_CLASSES
  index = indexing.index_dataset(cfg.data)
  warm = index.test[:a.batch]
  maps.collect_maps(predictor, warm, index, cfg)  # compile
  trained = inference.Trained(cfg, predictor, index=index, fusion_c=frozen_c)  # no calibration
  t = time.perf_counter()
  after_training.evaluate(trained, a.out)
  dt = time.perf_counter() - t
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
  print(f"# evaluation{' (synthetic VisA-sized)' if tmp else ''}, {len(index.classes)} classes, "
        f"{cfg.backbone.name} at {cfg.input_size}px, batch {a.batch}, "
        f"{jax.device_count()} x {jax.devices()[0].device_kind} ({platform.machine()}), commit {commit or '?'}")
  print("| test images | seconds | images/s | peak host memory (MiB) |")
  print("|---|---|---|---|")
  print(f"| {len(index.test)} | {dt:.1f} | {len(index.test) / dt:.1f} | {rss:.0f} |")


if __name__ == "__main__":
  main()
