"""Loss and gradients of the training objective of a tiny OneNIP, summarised for a golden file.

`tests/test_speed.py` compares the current code with `tests/data/train_step_golden.json`, written
by this script from the code before the train-step speed changes (only APIs that code has):

  git archive REV | tar -x -C /tmp/old && PYTHONPATH=/tmp/old python3 tests/golden_train_step.py
"""
import json
import os
import sys
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from onenip_jax.config.base import get_base_config
from onenip_jax.models.onenip import OneNIP
from onenip_jax.training import losses

TINY = dict(hidden_dim=32, num_heads=4, ffn_dim=64, enc_layers=1, dec_layers=1,
            refiner_channels=8, bn_group_size=4)
B, H, C = 2, 4, 24     # prompt batch, feature grid side, feature channels
GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "train_step_golden.json")


def inputs():
  """(query (2B, H, H, C) [normal; synthetic], prompt (B, H, H, C), masks (B, 16H, 16H, 1))."""
  rng = np.random.default_rng(0)
  q = rng.normal(size=(2 * B, H, H, C)).astype(np.float32)
  p = rng.normal(size=(B, H, H, C)).astype(np.float32)
  m = (rng.random((B, 16 * H, 16 * H, 1)) > 0.8).astype(np.float32)
  return q, p, m


def loss_and_grads(model: OneNIP, compiler_options: Optional[dict] = None):
  """(loss terms, gradients) of the train step's objective (docs/algorithm.md §9) at the model's
  initial parameters, with fixed dropout and jitter keys, compiled with `compiler_options`."""
  q, p, m = inputs()
  variables = model.init({"params": jax.random.key(0)}, q[:B], p, train=False)
  rngs = {"dropout": jax.random.key(1), "jitter": jax.random.key(2)}
  loss_cfg = get_base_config().loss

  def loss_fn(params):
    out, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, q, p,
                         train=True, mutable=["batch_stats"], rngs=rngs)
    total, parts = losses.onenip_loss(out, q, m, loss_cfg=loss_cfg)
    return total, parts

  step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True), compiler_options=compiler_options)
  (_, parts), grads = step(variables["params"])
  return {k: float(v) for k, v in parts.items()}, grads


def summary(parts: dict, grads) -> dict:
  """{'loss': terms, 'grads': {leaf path: [sum, sum |g|, <g, r>, max |g|]}}, r a fixed N(0, 1)."""
  out = {}
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    g = np.asarray(g, np.float64).ravel()
    r = np.random.default_rng(g.size).normal(size=g.size)
    out[jax.tree_util.keystr(path)] = [g.sum(), np.abs(g).sum(), g @ r, np.abs(g).max()]
  return {"loss": parts, "grads": out}


def main() -> None:
  os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
  with open(GOLDEN, "w", encoding="utf-8") as f:
    json.dump(summary(*loss_and_grads(OneNIP(**TINY))), f, indent=1, sort_keys=True)
  print(f"wrote {GOLDEN}", file=sys.stderr)


if __name__ == "__main__":
  main()
