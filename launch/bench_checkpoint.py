r"""The step-time stall of a checkpoint save, synchronous against asynchronous (Orbax).

  python -m launch.bench_checkpoint [--backbone lite0] [--res 64] [--batch 8] [--steps 12] \
      [--every 4] [--dir /tmp/bench_ckpt]

Runs `training/step.py`'s jitted step on random batches (as launch/bench_train.py) and saves the
train state every `--every` steps, as the training loop does, into `--dir` (any path Orbax serves).
  * sync: a CheckpointManager with `enable_async_checkpointing=False` (what every save was before);
  * async: `checkpoints.make_manager` with `checkpoints.save(..., wait=False)` (periodic saves now).
The stall is the time of a step that saves plus the step after it (the background write shares
the machine with it), less two median steps without a save.
"""
import argparse
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from onenip_jax.config import base, loading
from onenip_jax.training import checkpoints

# The sibling script, by path: launch/ is not an installed package (run by path or with -m).
bench_train = loading.load_python_file(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_train.py"))


def run(mode: str, directory: str, backbone: str, res: int, batch: int, steps: int,
        every: int) -> dict:
  """{'step_s': median plain step, 'stall_s': [stall of each save], 'state_mb': size}."""
  step, (state, batch_arrays, bb, cache) = bench_train.build(backbone, "float32", False, batch, res)
  cfg = base.get_base_config()
  shutil.rmtree(directory, ignore_errors=True)
  if mode == "sync":
    manager = ocp.CheckpointManager(os.path.join(directory, "checkpoints"), options=(
        ocp.CheckpointManagerOptions(max_to_keep=cfg.ckpt.keep, create=True,
                                     enable_async_checkpointing=False)))
  else:
    manager = checkpoints.make_manager(directory, cfg)
  state, m = step(state, batch_arrays, bb, cache)  # compiles
  jax.block_until_ready(m)
  checkpoints.save(manager, 0, state, cfg, wait=True)  # Orbax's first-save set-up, not timed
  times, saved = [], []
  for i in range(1, steps + 1):
    t = time.perf_counter()
    state, m = step(state, batch_arrays, bb, cache)
    jax.block_until_ready(m)
    if i % every == 0 and i < steps:
      checkpoints.save(manager, i, state, cfg, wait=mode == "sync")
      saved.append(i - 1)
    times.append(time.perf_counter() - t)
  manager.wait_until_finished()
  manager.close()
  plain = statistics.median(t for i, t in enumerate(times) if i not in saved and i - 1 not in saved)
  stall = [times[i] + times[i + 1] - 2 * plain for i in saved]
  size = sum(x.nbytes for x in jax.tree.leaves(state)) / 2**20
  shutil.rmtree(directory, ignore_errors=True)
  return {"step_s": plain, "stall_s": stall, "state_mb": size}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--backbone", default="lite0")
  p.add_argument("--res", type=int, default=64)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--steps", type=int, default=12)
  p.add_argument("--every", type=int, default=4)
  p.add_argument("--dir", default=None, help="checkpoint directory (default: a temporary one)")
  a = p.parse_args()
  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
  directory = a.dir or tempfile.mkdtemp(prefix="bench_ckpt_")
  print(f"# checkpoint stall, {a.backbone} batch {a.batch} at {a.res}px, save every {a.every} steps,"
        f" {jax.device_count()} x {jax.devices()[0].device_kind}"
        f" ({platform.processor() or platform.machine()}, {os.cpu_count()} cores),"
        f" jax {jax.__version__}, orbax {ocp.__version__}, commit {commit or '?'}, dir {directory}")
  print("| saves | state MB | step s | stall per save s (mean) | stall per save s (max) |")
  print("|---|---|---|---|---|")
  for mode in ("sync", "async"):
    r = run(mode, directory, a.backbone, a.res, a.batch, a.steps, a.every)
    print(f"| {mode} | {r['state_mb']:.1f} | {r['step_s']:.3f} | {np.mean(r['stall_s']):.3f} |"
          f" {np.max(r['stall_s']):.3f} |", flush=True)


if __name__ == "__main__":
  main()
