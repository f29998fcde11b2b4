"""Frozen backbone + neck: images (B, H, W, 3) -> features (B, H/16, W/16, C), no gradient."""
import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections

from onenip_jax.models import convert, mixed
from onenip_jax.models.efficientnet import EfficientNet, tap_channels
from onenip_jax.models.resize import resize_align_corners


def neck(taps: Sequence[jax.Array], out_hw: Sequence[int]) -> jax.Array:
  """MFCN neck: align-corners bilinear resize of every tap to out_hw, concatenated on channels.

  Args:
    taps: backbone feature maps, each (B, h_i, w_i, C_i).
    out_hw: (h, w) target grid (H/stride, W/stride).

  Returns:
    (B, h, w, sum C_i), channels in tap order.
  """
  return jnp.concatenate([resize_align_corners(t, out_hw) for t in taps], axis=-1)


@dataclasses.dataclass(frozen=True)
class FrozenFeatures:
  """The frozen feature extractor: an EfficientNet's stride-2/4/8/16 taps, resized and concatenated.

  Attributes:
    backbone: the EfficientNet module (BatchNorm on running statistics).
    channels: C, the number of concatenated channels (272 for B4, 208 for Lite2).
    stride: input pixels per feature cell (the last tap's stride, 16).
  """
  backbone: EfficientNet
  channels: int
  stride: int = 16

  def grid(self, size: int) -> int:
    """Feature-map side h for an input side `size` (h = size // stride)."""
    return size // self.stride

  @classmethod
  def from_config(cls, backbone_cfg: ml_collections.ConfigDict) -> "FrozenFeatures":
    """From `config.backbone` (name, padding, dtype; 'auto' is bfloat16 on GPU/TPU)."""
    backbone = EfficientNet(variant=backbone_cfg.name, padding=backbone_cfg.padding,
                            dtype=mixed.resolve_dtype(backbone_cfg.dtype))
    return cls(backbone, sum(tap_channels(backbone_cfg.name)))

  def load_variables(self, backbone_cfg: ml_collections.ConfigDict) -> dict:
    """Backbone variables up to the last tap, from `config.backbone.weights` or the cached
    ImageNet weights (lite0-2)."""
    full = convert.load_backbone_variables(backbone_cfg.name, backbone_cfg.weights)
    return convert.feature_variables(full, backbone_cfg.name)

  def __call__(self, variables: dict, images: jax.Array) -> jax.Array:
    """images (B, H, W, 3) normalised -> (B, H/stride, W/stride, C) float32, outside the gradient."""
    taps = self.backbone.apply(variables, images)
    h, w = self.grid(images.shape[1]), self.grid(images.shape[2])
    with jax.named_scope("neck"):
      return jax.lax.stop_gradient(neck(taps, (h, w)).astype(jnp.float32))
