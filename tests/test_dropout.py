"""The unrolled threefry stream (XLA:CPU) equals jax.random's (every other backend): the same bits,
dropout masks and jitter noise on either path."""
import collections
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from onenip_jax.config import loading
from onenip_jax.models import dropout

from conftest import REPO

PROFILE = loading.load_python_file(str(REPO / "launch" / "profile_step.py"))

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


def _computations_with_hash(hlo: str) -> tuple:
  """(computations with threefry's ~20 xors, computations run inside a conditional's branches) of
  compiled HLO text, parsed by `launch/profile_step.py`."""
  instrs, comps = PROFILE.parse_hlo(hlo)
  xors = collections.Counter(i["computation"] for i in instrs.values() if i["opcode"] == "xor")
  hashed = {c for c, k in xors.items() if k >= 20}
  in_branches = set()
  for ins in instrs.values():
    if ins["opcode"] == "conditional":
      branches = re.search(r"branch_computations=\{([^}]*)\}", ins["attrs"])[1]
      for c in re.findall(r"%([\w.\-]+)", branches):
        in_branches.add(c)
        in_branches |= {instrs[n]["computation"] for b in comps[c]  # pylint: disable=protected-access
                        for n in PROFILE._called(instrs[b], comps, instrs)}
  return hashed, in_branches


def test_a_differentiated_mask_is_hashed_once():
  """The mask is drawn into a buffer (a conditional) that the forward product and both backward
  fusions read, instead of XLA hashing it again in each of them; the gradient is flax's."""
  x = jnp.linspace(-1.0, 1.0, 4 * 16 * 32, dtype=jnp.float32).reshape(4, 16, 32)
  w = jnp.linspace(-0.5, 0.5, 32 * 32, dtype=jnp.float32).reshape(32, 32)

  def loss(module, x, w, key):
    y = module.apply({}, x, deterministic=False, rngs={"dropout": key})
    return jnp.sum(jnp.tanh(y @ w) * y)

  grad = jax.jit(jax.grad(lambda x, w, k: loss(dropout.Dropout(0.3, unrolled=True), x, w, k),
                          argnums=(0, 1)))
  want = jax.grad(lambda x, w, k: loss(nn.Dropout(0.3), x, w, k), argnums=(0, 1))(x, w, KEYS[0])
  for g, r in zip(grad(x, w, KEYS[0]), want):
    np.testing.assert_allclose(g, r, rtol=1e-6, atol=1e-6)
  hashed, in_branches = _computations_with_hash(grad.lower(x, w, KEYS[0]).compile().as_text())
  assert hashed, "no threefry found in the compiled gradient"
  assert hashed <= in_branches, f"the mask is hashed outside the conditional: {hashed - in_branches}"
