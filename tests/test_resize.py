"""resize_align_corners vs torch.nn.functional.interpolate(bilinear, align_corners=True)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from onenip_jax.models.resize import resize_align_corners

torch = pytest.importorskip("torch")


def _torch_resize(x_nhwc: np.ndarray, out_hw) -> np.ndarray:
  t = torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))
  y = torch.nn.functional.interpolate(t, size=tuple(out_hw), mode="bilinear", align_corners=True)
  return y.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("in_hw,out_hw", [
    ((112, 112), (14, 14)),
    ((56, 56), (14, 14)),
    ((28, 28), (14, 14)),
    ((14, 14), (224, 224)),
    ((56, 56), (224, 224)),
    ((40, 20), (10, 80)),   # non-square, mixed down/up
    ((7, 5), (1, 1)),       # out size 1 samples index 0
    ((1, 3), (4, 3)),       # in size 1 broadcasts
])
def test_matches_torch(in_hw, out_hw):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2,) + in_hw + (3,)).astype(np.float32)
  got = np.asarray(resize_align_corners(jnp.asarray(x), out_hw))
  want = _torch_resize(x, out_hw)
  assert got.shape == want.shape == (2,) + out_hw + (3,)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_corners_and_identity():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 14, 14, 2)), jnp.float32)
  y = resize_align_corners(x, (224, 224))
  for (i, j), (k, l) in [((0, 0), (0, 0)), ((-1, -1), (-1, -1)), ((0, -1), (0, -1))]:
    np.testing.assert_allclose(y[0, i, j], x[0, k, l], atol=1e-6)
  np.testing.assert_array_equal(resize_align_corners(x, (14, 14)), x)


def test_not_jax_image_resize():
  """The half-pixel / antialiased jax.image.resize would give different values (docs/algorithm.md §3.3)."""
  x = jnp.asarray(np.random.default_rng(2).normal(size=(1, 56, 56, 1)), jnp.float32)
  ours = resize_align_corners(x, (14, 14))
  theirs = jax.image.resize(x, (1, 14, 14, 1), "bilinear")
  assert float(jnp.max(jnp.abs(ours - theirs))) > 1e-2


def test_dtypes_and_jit():
  x = np.random.default_rng(3).normal(size=(2, 28, 28, 4)).astype(np.float32)
  y_bf16 = resize_align_corners(jnp.asarray(x, jnp.bfloat16), (14, 14))
  assert y_bf16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y_bf16, np.float32), _torch_resize(x, (14, 14)),
                             atol=5e-2)
  y_int = resize_align_corners(jnp.ones((1, 4, 4, 1), jnp.int32), (8, 8))
  assert y_int.dtype == jnp.float32
  np.testing.assert_allclose(y_int, 1.0)
  y_jit = jax.jit(resize_align_corners, static_argnums=1)(jnp.asarray(x), (56, 56))
  np.testing.assert_allclose(y_jit, _torch_resize(x, (56, 56)), atol=1e-5)
