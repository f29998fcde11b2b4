"""The sharded train step: device-count independence, no retracing, the feature cache."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from onenip_jax import sharding
from onenip_jax.config import base as common
from onenip_jax.models.features import FrozenFeatures
from onenip_jax.models.onenip import OneNIP
from onenip_jax.training import state as state_lib
from onenip_jax.training.step import jit_train_step, make_train_step

RES, BATCH = 64, 8


def _cfg(**kw):
  cfg = common.get_base_config()
  common.set_backbone(cfg, "lite0")
  cfg.input_size, cfg.batch_size = RES, BATCH
  cfg.update(kw)
  return cfg


def _setup(cfg, mesh):
  features = FrozenFeatures.from_config(cfg.backbone)
  bb = features.backbone.init(jax.random.PRNGKey(1), jnp.zeros((1, RES, RES, 3)))
  model = OneNIP.from_config(cfg.model)
  tx = state_lib.make_optimizer(cfg, 10)
  repl = sharding.replicated(mesh)
  state = jax.jit(lambda: state_lib.init_state(cfg, model, tx, features),
                  out_shardings=repl)()
  step = jit_train_step(cfg, model, features, tx, mesh)
  return state, step, jax.device_put(bb, repl), features


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  img = lambda: rng.normal(size=(BATCH, RES, RES, 3)).astype(np.float32)
  return {"normal": img(), "synthetic": img(), "prompt": img(),
          "mask": (rng.random((BATCH, RES, RES, 1)) > 0.8).astype(np.float32)}


def _rel(a, b):
  a, b = np.concatenate([np.ravel(x) for x in jax.tree.leaves(a)]), np.concatenate(
      [np.ravel(x) for x in jax.tree.leaves(b)])
  return np.abs(a - b).max() / np.abs(b).max()


def test_sharded_step_equals_single_device_and_compiles_once():
  assert jax.device_count() == 8
  cfg = _cfg()
  results = {}
  for n in (1, 8):
    mesh = Mesh(np.asarray(jax.devices()[:n]), (sharding.DATA_AXIS,))
    state, step, bb, _ = _setup(cfg, mesh)
    for i in range(5 if n == 8 else 1):
      state, metrics = step(state, sharding.to_global(_batch(i % 2), mesh), bb, None)
      if i == 0:  # one step from the same state on the same global batch
        results[n] = jax.device_get((state.params, state.batch_stats, metrics))
    if n == 8:
      assert step._cache_size() == 1  # pylint: disable=protected-access
      assert len(state.params["input_proj"]["kernel"].sharding.device_set) == 8
  p1, s1, m1 = results[1]
  p8, s8, m8 = results[8]
  for k in ("total", "mse", "dice", "grad_norm"):
    np.testing.assert_allclose(m8[k], m1[k], rtol=1e-5)
  assert _rel(s8, s1) <= 1e-5
  # Params: Adam's first step is ~lr * g / (|g| + eps), so gradients that are zero in exact
  # arithmetic (e.g. attention key biases) but differ in round-off (another summation order on 8
  # devices) move by different tiny amounts. Bound that against the step size itself.
  mesh = Mesh(np.asarray(jax.devices()[:1]), (sharding.DATA_AXIS,))
  init, _, _, _ = _setup(cfg, mesh)
  flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])
  d, update = flat(p8) - flat(p1), flat(p1) - flat(jax.device_get(init.params))
  # Key biases get exactly zero gradient (softmax is shift invariant) and a few other elements
  # nearly zero: Adam's first step turns their round-off into steps of up to ~3 lr either way.
  # So: the norms without the key biases within 1 % (a wrong gradient, e.g. one device's share
  # only, differs by O(1)), and all but a handful of elements within lr / 2.
  zero_grad = flat(jax.tree_util.tree_map_with_path(
      lambda path, x: np.full(x.shape, "k_proj" in jax.tree_util.keystr(path)
                              and "bias" in jax.tree_util.keystr(path)), p1))
  assert zero_grad.sum() > 0
  assert np.linalg.norm(d[~zero_grad]) <= 1e-2 * np.linalg.norm(update[~zero_grad])
  assert np.mean(np.abs(d) > 0.5 * cfg.optim.lr) <= 1e-5
  assert np.abs(update).max() > 0.5 * cfg.optim.lr  # the step really trained


def test_feature_cache_gives_the_same_losses():
  cfg = _cfg()
  mesh = sharding.make_mesh()
  state, step, bb, features = _setup(cfg, mesh)
  batch = _batch(3)
  # Cache rows 0..7 hold the normal images, rows 8..15 the prompts.
  feats = jax.jit(features)(bb, jnp.concatenate([batch["normal"], batch["prompt"]]))
  cache = jax.device_put(feats, sharding.replicated(mesh))
  cached = {"synthetic": batch["synthetic"], "mask": batch["mask"],
            "normal_index": np.arange(BATCH, dtype=np.int32),
            "prompt_index": np.arange(BATCH, 2 * BATCH, dtype=np.int32)}
  state_b = jax.tree.map(jnp.copy, state)
  _, m_plain = step(state, sharding.to_global(batch, mesh), bb, None)
  step_cached = jax.jit(make_train_step(cfg, OneNIP.from_config(cfg.model), features,
                                        state_lib.make_optimizer(cfg, 10)))
  _, m_cached = step_cached(state_b, sharding.to_global(cached, mesh), bb, cache)
  for k in ("total", "mse", "dice"):
    np.testing.assert_allclose(m_cached[k], m_plain[k], rtol=2e-5, atol=1e-7)


def test_lr_schedule_follows_epochs():
  cfg = _cfg()
  cfg.optim.lr_drop_epochs = (3,)
  lr = state_lib.lr_schedule(cfg, spe=10)
  assert float(lr(0)) == pytest.approx(1e-4) and float(lr(29)) == pytest.approx(1e-4)
  assert float(lr(30)) == pytest.approx(1e-5) and float(lr(1000)) == pytest.approx(1e-5)
  cfg.total_steps, cfg.num_epochs = 0, 2
  assert state_lib.total_steps(cfg, 121) == 2 * 121
  cfg.total_steps = 7
  assert state_lib.total_steps(cfg, 121) == 7
  cfg.batch_size, cfg.optim.scale_lr_with_batch = 128, True
  assert float(state_lib.lr_schedule(cfg, 10)(0)) == pytest.approx(2e-4)


def test_bad_batch_size_is_named():
  mesh = sharding.make_mesh()
  with pytest.raises(ValueError, match="batch_size=6"):
    sharding.check_batch_size(6, mesh)
