r"""Train-step throughput (images/s) of the jitted, sharded step on this machine's devices.

  python -m launch.bench_train [--backbones lite2,b4] [--batch 8] [--res 224] [--steps 5] \
      [--model attention=einsum,matmul_dtype=bfloat16] [--xla xla_cpu_enable_fast_min_max=true]

Times the full step (backbone, network, losses, AdamW update) on random batches, for each backbone,
with and without the frozen-feature cache, in float32 and bfloat16; prints the median over
`--steps` timed steps after one compiling step. Backbone weights are random (speed does not depend
on them), so B4 needs no checkpoint. An image counts once per training sample (its synthetic twin and
its prompt are part of the step's work). `--model KEY=VALUE,...` overrides `config.model` keys
(e.g. `attention`, `matmul_dtype`) to time the switches of the step against each other, and
`--xla KEY=VALUE,...` adds XLA:CPU options to the project's own (`onenip_jax.compile_options`);
`+` separates the items of a list value, e.g. `xla_cpu_experimental_ynn_fusion_type=` (XLA's own
reductions) or `...=LIBRARY_FUSION_TYPE_REDUCE+LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION`.
"""
import argparse
import platform
import statistics
import subprocess
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from onenip_jax import compile_options, sharding
from onenip_jax.config import base
from onenip_jax.models.features import FrozenFeatures
from onenip_jax.models.onenip import OneNIP
from onenip_jax.training import state as state_lib
from onenip_jax.training.step import jit_train_step


def parse_overrides(text: str) -> dict:
  """'attention=einsum,matmul_dtype=bfloat16' -> {'attention': 'einsum', ...}; values are typed
  like the base config's; unknown keys raise."""
  model = base.get_base_config().model
  out = {}
  for item in filter(None, text.split(",")):
    key, sep, value = item.partition("=")
    if not sep or key not in model:
      raise ValueError(f"--model {item!r}: expected KEY=VALUE with KEY one of {sorted(model)}")
    kind = type(model[key])
    out[key] = value.lower() in ("1", "true") if kind is bool else kind(value)
  return out


def parse_xla_options(text: str) -> dict:
  """'xla_cpu_a=true,xla_cpu_b=4,xla_cpu_c=X+Y' -> {'xla_cpu_a': True, 'xla_cpu_b': 4,
  'xla_cpu_c': 'X,Y'} ('+' joins the items of a list value)."""
  out = {}
  for item in filter(None, text.split(",")):
    key, sep, value = item.partition("=")
    if not sep or not key.startswith("xla_"):
      raise ValueError(f"--xla {item!r}: expected xla_...=VALUE")
    out[key] = (value.lower() == "true" if value.lower() in ("true", "false")
                else int(value) if value.lstrip("-").isdigit() else value.replace("+", ","))
  return out


def build(backbone: str, dtype: str, cached: bool, batch: int, res: int,
          overrides: Optional[dict] = None):
  """The jitted train step of `training/step.py` and its arguments, on random data and random
  weights; `dtype` sets the backbone's and the network's dtype and matmul_dtype (no 'auto': the same
  on every backend), then `overrides` set `config.model` keys.

  Returns (step, (state, batch, backbone_vars, cache)); `step(*args)` -> (state, metrics).
  """
  cfg = base.get_base_config()
  base.set_backbone(cfg, backbone)
  cfg.model.dtype = cfg.model.matmul_dtype = cfg.backbone.dtype = dtype
  for key, value in (overrides or {}).items():
    cfg.model[key] = value
  cfg.input_size, cfg.batch_size, cfg.cache_features = res, batch, cached
  mesh = sharding.make_mesh()
  features = FrozenFeatures.from_config(cfg.backbone)
  bb = features.backbone.init(jax.random.PRNGKey(0), jnp.zeros((1, res, res, 3)))
  bb = jax.device_put(bb, sharding.replicated(mesh))
  model = OneNIP.from_config(cfg.model)
  tx = state_lib.make_optimizer(cfg, 100)
  repl = sharding.replicated(mesh)
  state = jax.jit(lambda: state_lib.init_state(cfg, model, tx, features),
                  out_shardings=repl)()
  rng = np.random.default_rng(0)
  img = lambda: rng.normal(size=(batch, res, res, 3)).astype(np.float32)
  mask = (rng.random((batch, res, res, 1)) > 0.9).astype(np.float32)
  if cached:
    n, h = 64, res // 16
    cache = jax.device_put(jnp.asarray(rng.normal(size=(n, h, h, features.channels)), jnp.float32), repl)
    host = {"synthetic": img(), "mask": mask, "normal_index": np.arange(batch, dtype=np.int32),
            "prompt_index": np.arange(batch, dtype=np.int32)[::-1].copy()}
  else:
    cache = None
    host = {"normal": img(), "synthetic": img(), "prompt": img(), "mask": mask}
  step = jit_train_step(cfg, model, features, tx, mesh)
  return step, (state, sharding.to_global(host, mesh), bb, cache)


def bench(backbone: str, dtype: str, cached: bool, batch: int, res: int, steps: int,
          overrides: Optional[dict] = None) -> float:
  """Images/s: `batch` over the median time of `steps` steps after one compiling step."""
  step, (state, batch_arrays, bb, cache) = build(backbone, dtype, cached, batch, res, overrides)
  state, m = step(state, batch_arrays, bb, cache)
  jax.block_until_ready(m)
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    state, m = step(state, batch_arrays, bb, cache)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
  return batch / statistics.median(times)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--backbones", default="lite2,b4")
  p.add_argument("--dtypes", default="float32,bfloat16")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--res", type=int, default=224)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--model", default="", help="config.model overrides KEY=VALUE,...")
  p.add_argument("--cache", default="off,on", help="feature cache settings timed: off,on")
  p.add_argument("--xla", default="", help="XLA:CPU options KEY=VALUE,... added to the project's")
  a = p.parse_args()
  overrides = parse_overrides(a.model)
  compile_options._CPU_OPTIONS.update(parse_xla_options(a.xla))  # pylint: disable=protected-access
  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
  print(f"# train step, batch {a.batch} at {a.res}px, {jax.device_count()} x {jax.devices()[0].device_kind}"
        f" ({platform.processor() or platform.machine()}), jax {jax.__version__}, commit {commit or '?'}"
        + (f", model {a.model}" if a.model else "") + (f", XLA {a.xla}" if a.xla else ""))
  print("| backbone | feature cache | dtype | images/s | s/step |")
  print("|---|---|---|---|---|")
  for backbone in a.backbones.split(","):
    for cached in [c == "on" for c in a.cache.split(",")]:
      for dtype in a.dtypes.split(","):
        ips = bench(backbone, dtype, cached, a.batch, a.res, a.steps, overrides)
        print(f"| {backbone} | {'on' if cached else 'off'} | {dtype} | {ips:.1f} | {a.batch / ips:.2f} |",
              flush=True)


if __name__ == "__main__":
  main()
