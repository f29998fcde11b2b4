"""The train step (docs/algorithm.md §9): one `jax.jit` with explicit in/out shardings and the
state donated.

Per step the frozen backbone sees [normal (B); synthetic (B); prompt (B)] (or only the synthetic
images when `cache_features=True`), the network reconstructs [normal; synthetic] from the prompt,
and the loss fuses feature MSE (reconstruction + restoration) and the refiner's Dice loss. With
`cache_features=True` the frozen features of every training image are computed once before the
first step (`compute_feature_cache`).
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from data_pipelines import input_pipeline
from onenip_jax import sharding
from onenip_jax.compile_options import compiler_options
from onenip_jax.models import mixed
from onenip_jax.models.features import FrozenFeatures
from onenip_jax.models.onenip import OneNIP
from onenip_jax.training import losses
from onenip_jax.training.state import TrainState


def make_train_step(cfg, model: OneNIP, features: FrozenFeatures, tx):
  """Returns train_step(state, batch, backbone_vars, cache) -> (state, metrics).

  batch (global, split over `data`): `synthetic` (B,H,W,3), `mask` (B,H,W,1), and either `normal`
  and `prompt` (B,H,W,3) images or `normal_index`/`prompt_index` (B,) rows of `cache`
  (N_train, h, w, C), the cached frozen features of every training image.
  """

  def train_step(state: TrainState, batch: dict, backbone_vars: dict, cache):
    if cache is None:
      b = batch["synthetic"].shape[0]
      f = features(backbone_vars, jnp.concatenate([batch["normal"], batch["synthetic"],
                                                   batch["prompt"]]))
      f_normal, f_synthetic, f_prompt = f[:b], f[b:2 * b], f[2 * b:]
    else:
      f_synthetic = features(backbone_vars, batch["synthetic"])
      f_normal = cache[batch["normal_index"]].astype(jnp.float32)
      f_prompt = cache[batch["prompt_index"]].astype(jnp.float32)
    query = jnp.concatenate([f_normal, f_synthetic])
    masks = jnp.concatenate([jnp.zeros_like(batch["mask"]), batch["mask"]])
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    jitter_key, dropout_key = jax.random.split(key)

    def loss_fn(params):
      out, updates = model.apply({"params": params, "batch_stats": state.batch_stats}, query,
                                 f_prompt, train=True, mutable=["batch_stats"],
                                 rngs={"jitter": jitter_key, "dropout": dropout_key})
      with jax.named_scope("loss"):
        total, parts = losses.onenip_loss(out, query, masks, loss_cfg=cfg.loss,
                                          restoration=cfg.loss.restoration)
      return total, (parts, updates.get("batch_stats", {}))

    (_, (parts, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    with jax.named_scope("optimizer"):
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
    metrics = dict(parts, grad_norm=optax.global_norm(grads))
    return state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                         opt_state=opt_state), metrics

  return train_step


def jit_train_step(cfg, model: OneNIP, features: FrozenFeatures, tx, mesh):
  """The jitted, sharded train step: state, backbone variables and cache replicated, the batch
  split over `data`, the state donated (updated in place), XLA options from `compiler_options`
  (library dots with bfloat16 matmul operands)."""
  repl, split = sharding.replicated(mesh), sharding.data_sharded(mesh)
  bf16_dots = mixed.resolve_dtype(cfg.model.matmul_dtype) == jnp.bfloat16
  return jax.jit(make_train_step(cfg, model, features, tx),
                 in_shardings=(repl, split, repl, repl), out_shardings=(repl, repl),
                 donate_argnums=(0,), compiler_options=compiler_options(library_dots=bf16_dots))


def compute_feature_cache(cfg, index, features, backbone_vars, mesh) -> jax.Array:
  """Frozen features of every training image, (N_train, h, w, C) in `cache_dtype`, replicated.

  Each process decodes only its share of the images; the result is gathered on every device.
  """
  fn = jax.jit(features, in_shardings=(sharding.replicated(mesh), sharding.data_sharded(mesh)),
               out_shardings=sharding.data_sharded(mesh), compiler_options=compiler_options())
  h = features.grid(cfg.input_size)
  cache = np.zeros((len(index.train), h, h, features.channels), np.float32)
  for batch in input_pipeline.make_eval_iterator(index.train, index, cfg, batch_size=cfg.batch_size,
                                                 process_index=jax.process_index(),
                                                 process_count=jax.process_count(),
                                                 with_prompt=False):
    batch = sharding.to_global({k: batch[k] for k in ("image", "index", "valid")}, mesh)
    f = sharding.to_host(fn(backbone_vars, batch["image"]))
    idx, valid = sharding.to_host(batch["index"]), sharding.to_host(batch["valid"])
    cache[idx[valid]] = f[valid]
  return jax.device_put(jnp.asarray(cache, jnp.dtype(cfg.cache_dtype)), sharding.replicated(mesh))
