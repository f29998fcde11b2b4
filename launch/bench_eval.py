r"""Evaluation throughput (images/s, decode to metrics) and peak host memory.

  python -m launch.bench_eval [--config configs/real.py] [--workdir RUN] [--batch 16]

With --workdir the trained checkpoint is used; without, a freshly initialised network (speed does
not depend on the weights). Runs the same path as `onenip-eval` (tf.data decode + resize, frozen
backbone, network, fusion, box-filter scores, per-class metrics) over the config's test set.
"""
import argparse
import platform
import resource
import subprocess
import time

import jax

from data_pipelines import indexing
from onenip_jax import evaluate, export, inference, sharding, train
from onenip_jax.config_loading import load_config


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="configs/real.py")
  p.add_argument("--workdir")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--out", default="/tmp/onenip-bench-eval")
  a = p.parse_args()
  mesh = sharding.make_mesh()
  if a.workdir:
    cfg, predictor, frozen_c, _ = export.load_checkpoint(a.workdir, mesh, config=a.config)
  else:
    cfg = load_config(a.config)
    model, features = inference.make_model(cfg)
    tx = train.make_optimizer(cfg, 1)
    state = jax.jit(lambda: train.init_state(cfg, model, tx, features.channels),
                    out_shardings=sharding.replicated(mesh))()
    bb = jax.device_put(features.load_variables(cfg.model), sharding.replicated(mesh))
    predictor = inference.Predictor(model, features, {"params": state.params,
                                                      "batch_stats": state.batch_stats}, bb, mesh)
    frozen_c = float("nan")
  cfg.unlock()
  cfg.eval.batch_size, cfg.eval.heatmaps = a.batch, False
  index = indexing.index_dataset(cfg.data)
  warm = index.test[:a.batch]
  evaluate.collect_maps(predictor, warm, index, cfg)  # compile
  t = time.perf_counter()
  evaluate.evaluate_predictor(cfg, predictor, index, a.out, frozen_c)
  dt = time.perf_counter() - t
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
  print(f"# evaluation, {cfg.model.backbone} at {cfg.input_size}px, batch {a.batch}, "
        f"{jax.device_count()} x {jax.devices()[0].device_kind} ({platform.machine()}), commit {commit or '?'}")
  print("| test images | seconds | images/s | peak host memory (MiB) |")
  print("|---|---|---|---|")
  print(f"| {len(index.test)} | {dt:.1f} | {len(index.test) / dt:.1f} | {rss:.0f} |")


if __name__ == "__main__":
  main()
