"""The unrolled threefry stream (XLA:CPU) equals jax.random's (every other backend): the same bits,
dropout masks and jitter noise on either path."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from onenip_jax.models import dropout

KEYS = [jax.random.key(3), jax.random.PRNGKey(7), jax.random.fold_in(jax.random.key(1), 5)]
SHAPES = [(), (5,), (3, 7), (2, 3, 33, 17)]


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("shape", SHAPES)
def test_bits_uniform_bernoulli_normal_equal_jax_random(key, shape):
  np.testing.assert_array_equal(jax.jit(dropout.random_bits, static_argnums=1)(key, shape),
                                jax.random.bits(key, shape, jnp.uint32))
  np.testing.assert_array_equal(dropout.uniform(key, shape), jax.random.uniform(key, shape))
  np.testing.assert_array_equal(dropout.bernoulli(key, 0.9, shape), jax.random.bernoulli(key, 0.9, shape))
  np.testing.assert_array_equal(jax.jit(dropout.normal, static_argnums=1)(key, shape),
                                jax.random.normal(key, shape))


def test_dropout_module_equals_flax_dropout():
  x = jnp.arange(2 * 3 * 50 * 7, dtype=jnp.float32).reshape(2, 3, 50, 7) + 1.0
  for key in KEYS[:2]:
    for rate in (0.1, 0.5):
      want = nn.Dropout(rate).apply({}, x, deterministic=False, rngs={"dropout": key})
      got = dropout.Dropout(rate).apply({}, x, deterministic=False, rngs={"dropout": key})
      np.testing.assert_array_equal(got, want)
      assert 0 < float(jnp.mean(got == 0)) < 1
  np.testing.assert_array_equal(dropout.Dropout(0.1).apply({}, x, deterministic=True), x)


def test_other_prng_impls_fall_back_to_jax_random():
  key = jax.random.key(0, impl="rbg")
  np.testing.assert_array_equal(dropout.random_bits(key, (4, 3)), jax.random.bits(key, (4, 3), jnp.uint32))
  np.testing.assert_array_equal(dropout.normal(key, (4,)), jax.random.normal(key, (4,)))


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("shape", [(5,), (3, 7), (2, 3, 33, 17)])
def test_unrolled_and_library_paths_draw_the_same(key, shape):
  for fn in (dropout.random_bits, dropout.uniform, dropout.normal):
    f = jax.jit(lambda k, u, fn=fn: fn(k, shape, unrolled=u), static_argnums=1)
    np.testing.assert_array_equal(f(key, True), f(key, False))
  np.testing.assert_array_equal(dropout.bernoulli(key, 0.9, shape, unrolled=True),
                                dropout.bernoulli(key, 0.9, shape, unrolled=False))
  x = jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape) + 1.0
  masks = [dropout.Dropout(0.3, unrolled=u).apply({}, x, deterministic=False,
                                                  rngs={"dropout": key}) for u in (True, False)]
  np.testing.assert_array_equal(masks[0], masks[1])


def test_the_unrolled_path_is_the_cpu_default(monkeypatch):
  key, shape = jax.random.key(0), (64, 64)
  hlo = lambda: jax.jit(lambda k: dropout.bernoulli(k, 0.9, shape)).lower(key).as_text()
  assert dropout.unrolled_by_default() == (jax.default_backend() == "cpu")
  monkeypatch.setattr(dropout, "unrolled_by_default", lambda: False)  # as on GPU and TPU
  assert "while" in hlo()   # jax.random's threefry (a rolled loop when lowered for CPU)
  monkeypatch.setattr(dropout, "unrolled_by_default", lambda: True)
  assert "while" not in hlo()


def test_mask_is_fused_not_a_rolled_loop():
  """The reason for the module: XLA:CPU gets straight-line uint32 code, no while loop."""
  hlo = jax.jit(lambda k: dropout.bernoulli(k, 0.9, (64, 64))).lower(jax.random.key(0)).as_text()
  assert "while" not in hlo
  ref = jax.jit(lambda k: jax.random.bernoulli(k, 0.9, (64, 64))).lower(jax.random.key(0)).as_text()
  assert "while" in ref   # jax's CPU lowering of threefry (if this fails, the module may be moot)
