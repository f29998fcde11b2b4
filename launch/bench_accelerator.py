r"""Accelerator benchmark of the train step: one command for a lent GPU or TPU.

  python -m launch.bench_accelerator [--backbone b4] [--batch 64] [--res 224] [--steps 20]

For float32 and bfloat16, feature cache off and on, at a global batch of `--batch` over every
device, prints: compile time, s/step, steps/s, images/s, peak device memory, FLOPs per step from
XLA's cost analysis, MFU against the device's peak, and the projected wall time of the paper's full
MVTec schedule (1000 epochs of 3,629 images, ceil(3629 / batch) steps each). Backbone weights and
data are random (speed does not depend on them), so B4 needs no checkpoint.

MFU = FLOPs per step / (s/step x devices x peak FLOP/s per device). The peak is the dense bfloat16
tensor-core/MXU rate for bfloat16 and the TF32 rate for float32 on GPUs (XLA's default precision
for float32 matmuls there); TPUs run float32 matmuls in bfloat16 passes, so both use the bfloat16
peak. Unknown devices (e.g. CPU) print '-' for MFU.
"""
import argparse
import math
import os
import platform
import statistics
import subprocess
import time

import jax

from onenip_jax.config import loading

# The sibling script, by path: launch/ is not an installed package (run by path or with -m).
bench_train = loading.load_python_file(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_train.py"))


MVTEC_TRAIN_IMAGES = 3629
PAPER_EPOCHS = 1000

# device_kind substring -> (bfloat16, float32) dense peak TFLOP/s per device (vendor data sheets).
PEAK_TFLOPS = (
    ("H200", (989.4, 494.7)),
    ("H100", (989.4, 494.7)),      # SXM
    ("A100", (312.0, 156.0)),
    ("TPU v5p", (459.0, 459.0)),
    ("TPU v5 lite", (197.0, 197.0)),
    ("TPU v5e", (197.0, 197.0)),
    ("TPU v4", (275.0, 275.0)),
)


def peak_tflops(device_kind: str, dtype: str):
  """Peak TFLOP/s of one device of `device_kind` for `dtype`, or None when unknown."""
  for key, (bf16, fp32) in PEAK_TFLOPS:
    if key.lower() in device_kind.lower():
      return bf16 if dtype == "bfloat16" else fp32
  return None


def peak_memory_bytes():
  """Peak bytes in use on the first local device, or None where the backend does not say (CPU)."""
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def measure(backbone: str, dtype: str, cached: bool, batch: int, res: int, steps: int) -> dict:
  """Compiles and times the step; returns the figures of one table row."""
  step, args = bench_train.build(backbone, dtype, cached, batch, res)
  t = time.perf_counter()
  compiled = step.lower(*args).compile()
  compile_s = time.perf_counter() - t
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", 0.0)) * jax.device_count()   # cost analysis is per device
  state, metrics = compiled(*args)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    state, metrics = compiled(state, *args[1:])
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t)
  s_step = statistics.median(times)
  peak = peak_tflops(jax.devices()[0].device_kind, dtype)
  steps_per_epoch = math.ceil(MVTEC_TRAIN_IMAGES / batch)
  return dict(compile_s=compile_s, s_step=s_step, steps_per_s=1 / s_step, images_per_s=batch / s_step,
              peak_mem=peak_memory_bytes(), flops=flops,
              mfu=flops / s_step / (jax.device_count() * peak * 1e12) if peak else None,
              schedule_h=PAPER_EPOCHS * steps_per_epoch * s_step / 3600)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--backbone", default="b4")
  p.add_argument("--batch", type=int, default=64, help="global batch")
  p.add_argument("--res", type=int, default=224)
  p.add_argument("--steps", type=int, default=20, help="timed steps (median) after the first")
  p.add_argument("--dtypes", default="float32,bfloat16")
  p.add_argument("--cache", default="off,on", help="feature cache settings to run: off, on or both")
  a = p.parse_args(argv)
  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
  dev = jax.devices()[0]
  print(f"# train step, {a.backbone}, global batch {a.batch} at {a.res}px on {jax.device_count()} x "
        f"{dev.device_kind} ({dev.platform}, {platform.machine()}), jax {jax.__version__}, commit {commit or '?'}")
  print(f"# full MVTec schedule: {PAPER_EPOCHS} epochs x {math.ceil(MVTEC_TRAIN_IMAGES / a.batch)} steps")
  print("| dtype | feature cache | compile s | s/step | steps/s | images/s | peak device memory GiB "
        "| GFLOP/step | MFU | full schedule h |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for dtype in a.dtypes.split(","):
    for cache in a.cache.split(","):
      if cache not in ("off", "on"):
        raise SystemExit(f"--cache takes off, on or off,on; got {cache!r}")
      r = measure(a.backbone, dtype, cache == "on", a.batch, a.res, a.steps)
      mem = f"{r['peak_mem'] / 2**30:.2f}" if r["peak_mem"] is not None else "-"
      mfu = f"{100 * r['mfu']:.1f} %" if r["mfu"] is not None else "-"
      print(f"| {dtype} | {cache} | {r['compile_s']:.1f} | {r['s_step']:.4f} | {r['steps_per_s']:.2f} | "
            f"{r['images_per_s']:.1f} | {mem} | {r['flops'] / 1e9:.1f} | {mfu} | {r['schedule_h']:.2f} |",
            flush=True)


if __name__ == "__main__":
  main()
