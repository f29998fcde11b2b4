"""The OneNIP refiner (docs/algorithm.md §8): a small conv head on the reconstruction error, with
BatchNorm statistics over fixed groups of maps. All tensors NHWC.
"""
from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from onenip_jax.models import mixed
from onenip_jax.models.transformer import Array, Dtype, xavier_uniform, zeros


def _bn_grouping(batch: int, paired_with: Optional[int], group_size: int) -> Tuple[int, int, int]:
  """(P, G, k) such that x.reshape(P, G, k, ...) puts BN group g at [:, g] (docs/algorithm.md §8.2).

  paired_with: the prompt batch Bp when batch == 2 * Bp (training layout [normal; synthetic]):
  group g = normal [g*k, (g+1)*k) + synthetic [g*k, (g+1)*k), k = group_size // 2.
  """
  if group_size <= 0:
    return 1, 1, batch
  if paired_with is not None:
    if group_size % 2:
      raise ValueError(f"model.bn_group_size={group_size} must be even for the training layout "
                       f"[normal; synthetic] (half normal, half synthetic maps per group)")
    k = group_size // 2
    if paired_with % k:
      raise ValueError(f"model.bn_group_size={group_size}: the {paired_with} normal + {paired_with} "
                       f"synthetic maps cannot be split into groups of {k} + {k}; use a batch "
                       f"divisible by {k} or change model.bn_group_size (0 = whole-batch stats)")
    return 2, paired_with // k, k
  if batch % group_size:
    raise ValueError(f"model.bn_group_size={group_size} does not divide the batch of {batch} maps; "
                     f"change the batch or model.bn_group_size (0 = whole-batch stats)")
  return 1, batch // group_size, group_size


class GroupedBatchNorm(nn.Module):
  """BatchNorm whose training statistics are computed over fixed groups of maps (mimicking the
  reference's per-GPU statistics independently of the device count).

  Running statistics ('batch_stats': 'mean', 'var') are updated with the mean over groups of the
  group mean and of the group's unbiased variance (PyTorch's convention), momentum in Flax form.
  """
  group_size: int = 16
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, use_running_average: bool,
               paired_with: Optional[int] = None) -> Array:
    """Normalises x: (B, H, W, C); returns (B, H, W, C) in `dtype`.

    Args:
      x: input maps.
      use_running_average: eval mode (running statistics).
      paired_with: prompt batch Bp when B == 2 * Bp (training layout), else None.
    """
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", zeros, (c,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
    xf = x.astype(jnp.float32)
    if use_running_average:
      y = (xf - ra_mean.value) * jax.lax.rsqrt(ra_var.value + self.epsilon) * scale + bias
      return y.astype(self.dtype)
    p, g, k = _bn_grouping(x.shape[0], paired_with, self.group_size)
    xg = xf.reshape((p, g, k) + x.shape[1:])
    axes = (0, 2, 3, 4)
    mean = jnp.mean(xg, axis=axes, keepdims=True)                     # (1, G, 1, 1, 1, C)
    var = jnp.mean(jnp.square(xg - mean), axis=axes, keepdims=True)  # biased, for normalising
    y = (xg - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
    if not self.is_initializing():
      n = p * k * x.shape[1] * x.shape[2]
      unbiased = var * (n / max(n - 1, 1))
      m = self.momentum
      ra_mean.value = m * ra_mean.value + (1 - m) * jnp.mean(mean, axis=axes + (1,))
      ra_var.value = m * ra_var.value + (1 - m) * jnp.mean(unbiased, axis=axes + (1,))
    return y.reshape(x.shape).astype(self.dtype)


class Deconv2x2(nn.Module):
  """ConvTranspose 2x2, stride 2 (no overlap), as one matmul and a depth-to-space reshuffle.

  out[2i + a, 2j + b, o] = sum_c x[i, j, c] kernel[a, b, c, o] + bias[o]: PyTorch's
  ConvTranspose2d with its weight (in, out, kh, kw) stored as kernel = w.transpose(2, 3, 0, 1).
  (XLA's lhs-dilated convolution computes the same but is slow on CPU, forward and backward.)
  xavier_uniform depends only on fan_in + fan_out, the same under PyTorch's ConvTranspose fan
  convention (fan_in = out*k^2, fan_out = in*k^2).
  """
  features: int
  dtype: Dtype = jnp.float32
  matmul_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: (B, h, w, C) -> (B, 2h, 2w, features)."""
    b, h, w, c = x.shape
    kernel = self.param("kernel", xavier_uniform, (2, 2, c, self.features), jnp.float32)
    bias = self.param("bias", zeros, (self.features,), jnp.float32)
    y = mixed.einsum("nhwc,abco->nhawbo", x, kernel.astype(self.dtype),
                     self.matmul_dtype).astype(self.dtype)
    return y.reshape(b, 2 * h, 2 * w, self.features) + bias.astype(self.dtype)


class Refiner(nn.Module):
  """MaskHead (docs/algorithm.md §8.1): 2 x (Conv3x3 no bias -> BN -> ReLU -> ConvTranspose 2x2/2) -> Conv1x1."""
  channels: int = 128
  bn_group_size: int = 16
  dtype: Dtype = jnp.float32
  matmul_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, e: Array, *, train: bool, paired_with: Optional[int] = None) -> Array:
    """e: (B, h, w, C) absolute error. Returns logits (B, 4h, 4w, 1) in `dtype` (not upsampled)."""
    x = e.astype(self.dtype)
    for i in (1, 2):
      x = nn.Conv(self.channels, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, dtype=self.dtype,
                  param_dtype=jnp.float32, kernel_init=xavier_uniform, name=f"conv{i}")(x)
      x = GroupedBatchNorm(self.bn_group_size, dtype=self.dtype, name=f"bn{i}")(
          x, use_running_average=not train, paired_with=paired_with)
      x = nn.relu(x)
      x = Deconv2x2(self.channels, self.dtype, self.matmul_dtype, name=f"deconv{i}")(x)
    return nn.Conv(1, (1, 1), dtype=self.dtype, param_dtype=jnp.float32, kernel_init=xavier_uniform,
                   bias_init=zeros, name="predictor")(x)
