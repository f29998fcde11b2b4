"""The train state and what builds it: the optimiser, its schedule, the initial state.

Training (`onenip_jax.train`) and checkpoint restoring (`onenip_jax.evaluation.restore`, whose Orbax
templates are `init_state`) share it; it imports nothing above `onenip_jax.models`.
"""
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from onenip_jax.models.features import FrozenFeatures
from onenip_jax.models.onenip import OneNIP


@flax.struct.dataclass
class TrainState:
  """Everything a checkpoint holds besides the config (all replicated).

  Attributes:
    step: () int32, number of optimiser steps taken.
    params, batch_stats: the trainable network's variables.
    opt_state: optax state.
    rng: () PRNG key data (uint32 (2,)); the key of step s is fold_in(rng, s).
    fusion_c: () float32, the frozen fusion constant (NaN until the end of training).
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array
  fusion_c: jax.Array


def total_steps(cfg: ml_collections.ConfigDict, spe: int) -> int:
  """`total_steps` when > 0, else `num_epochs` epochs of `spe` steps."""
  return int(cfg.total_steps) if cfg.total_steps > 0 else int(cfg.num_epochs * spe)


def lr_schedule(cfg: ml_collections.ConfigDict, spe: int) -> optax.Schedule:
  """The reference's StepLR in steps: lr x `lr_drop_factor` from each of `lr_drop_epochs` on."""
  o = cfg.optim
  lr = o.lr * (cfg.batch_size / o.reference_batch_size if o.scale_lr_with_batch else 1.0)
  return optax.piecewise_constant_schedule(lr, {int(e) * spe: o.lr_drop_factor
                                                for e in o.lr_drop_epochs})


def make_optimizer(cfg: ml_collections.ConfigDict, spe: int) -> optax.GradientTransformation:
  """clip_by_global_norm -> AdamW (docs/algorithm.md §10.1); weight decay on every parameter, as the reference."""
  o = cfg.optim
  return optax.chain(optax.clip_by_global_norm(o.grad_clip),
                     optax.adamw(lr_schedule(cfg, spe), b1=o.b1, b2=o.b2, eps=o.eps,
                                 weight_decay=o.weight_decay))


def init_state(cfg, model: OneNIP, tx, features: FrozenFeatures) -> TrainState:
  """Initial state from `cfg.seed` (deterministic on every process), for features (1, h, h, C)
  with h = features.grid(cfg.input_size) and C = features.channels."""
  h, channels = features.grid(cfg.input_size), features.channels
  key = jax.random.PRNGKey(cfg.seed)
  init_key, jitter_key, dropout_key, train_key = jax.random.split(key, 4)
  feats = jnp.zeros((1, h, h, channels), jnp.float32)
  variables = model.init({"params": init_key, "jitter": jitter_key, "dropout": dropout_key},
                         feats, feats, train=False)
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                    rng=jax.random.key_data(train_key), fusion_c=jnp.full((), jnp.nan, jnp.float32))
