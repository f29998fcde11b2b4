"""EfficientNet B0-B7 and EfficientNet-Lite0-Lite4 in Flax Linen (frozen feature extractor).

One parameterised definition mirrors the two PyTorch ports the project converts weights from:

- B0-B7: lukemelas `efficientnet_pytorch` (docs/algorithm.md §3.1): swish, squeeze-and-excitation with
  ratio 0.25 of the block's input channels, stem and head widths scaled with the width multiplier.
- Lite0-Lite4: the `efficientnet_lite_pytorch` package (TF `efficientnet/lite` recipe): ReLU6, no
  SE, stem (32) and head (1280) not scaled, and the first and last stages not repeated with the
  depth multiplier. As in that package, the first block always takes the 32 stem channels.

BatchNorm always uses its running averages (epsilon 1e-3) and drop-connect is off: the module is
meant to be frozen. It does not apply `stop_gradient`; the caller does.

Padding follows TF "SAME", either computed once for the variant's nominal resolution as
`Conv2dStaticSamePadding` does (`padding='static'`, the reference) or for the actual input
(`padding='same'`). For B4 (nominal 380) static padding gives (2, 2) for the stride-2 k5 conv of
stage 3 where dynamic SAME at 224 gives (1, 2).

All tensors are NHWC.
"""
import dataclasses
import functools
import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

BN_EPSILON = 1e-3
BN_MOMENTUM = 0.99   # unused at inference; kept equal to the reference for completeness
NUM_CLASSES = 1000

# (repeats, kernel, stride, expand ratio, input filters, output filters) of the B0 / Lite0 stages.
_BASE_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
_SE_RATIO = 0.25
_DIVISOR = 8

# variant -> (width multiplier, depth multiplier, nominal resolution)
_COEFFICIENTS = {
    "b0": (1.0, 1.0, 224),
    "b1": (1.0, 1.1, 240),
    "b2": (1.1, 1.2, 260),
    "b3": (1.2, 1.4, 300),
    "b4": (1.4, 1.8, 380),
    "b5": (1.6, 2.2, 456),
    "b6": (1.8, 2.6, 528),
    "b7": (2.0, 3.1, 600),
    "lite0": (1.0, 1.0, 224),
    "lite1": (1.0, 1.1, 240),
    "lite2": (1.1, 1.2, 260),
    "lite3": (1.2, 1.4, 280),
    "lite4": (1.4, 1.8, 300),
}
VARIANTS = tuple(_COEFFICIENTS)
PADDINGS = ("static", "same")

# Stages (0-based) whose last block is a default tap: cumulative strides 2, 4, 8 and 16.
_DEFAULT_TAP_STAGES = (0, 1, 2, 4)

# The input normalisation of each backbone family: (mean, std) per RGB channel for inputs in [0, 1].
# The one table of these constants; `normalisation(variant)` picks the row, configs read it there.
NORMALISATION = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),   # B0-B7: ImageNet statistics
    "lite": ((127.0 / 255.0,) * 3, (128.0 / 255.0,) * 3),        # TF Lite: (x - 127) / 128 on 0..255
}


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  """One MBConv block.

  Attributes:
    index: block index over the whole network (0-based).
    stage: stage index (0-based, 0..6).
    kernel: depthwise kernel size.
    stride: depthwise stride.
    expand_ratio: expansion ratio (1 = no expand conv).
    in_channels: input channels.
    out_channels: output channels.
    se_channels: squeezed channels of the SE unit; 0 = no SE.
    residual: whether the input is added to the output.
  """
  index: int
  stage: int
  kernel: int
  stride: int
  expand_ratio: int
  in_channels: int
  out_channels: int
  se_channels: int
  residual: bool

  @property
  def mid_channels(self) -> int:
    return self.in_channels * self.expand_ratio


@dataclasses.dataclass(frozen=True)
class Architecture:
  """Static description of one variant.

  Attributes:
    variant: 'b0'..'b7' or 'lite0'..'lite4'.
    width: width multiplier.
    depth: depth multiplier.
    resolution: nominal input resolution (static padding is computed for it).
    lite: Lite recipe (ReLU6, no SE, fixed stem/head, first/last stage not repeated).
    stem_channels: stem output channels.
    head_channels: 1x1 head conv channels.
    blocks: the MBConv blocks in order.
    stage_ends: index of the last block of each stage.
  """
  variant: str
  width: float
  depth: float
  resolution: int
  lite: bool
  stem_channels: int
  head_channels: int
  blocks: tuple
  stage_ends: tuple


def _round_filters(filters: int, width: float) -> int:
  """Channel rounding of the TF / lukemelas code (multiple of 8, at most 10% below)."""
  scaled = filters * width
  new = max(_DIVISOR, int(scaled + _DIVISOR / 2) // _DIVISOR * _DIVISOR)
  if new < 0.9 * scaled:
    new += _DIVISOR
  return int(new)


def _round_repeats(repeats: int, depth: float) -> int:
  return int(math.ceil(depth * repeats))


def _check_variant(variant: str) -> str:
  if variant not in _COEFFICIENTS:
    raise ValueError(f"unknown EfficientNet variant {variant!r}; expected one of {', '.join(VARIANTS)}")
  return variant


@functools.lru_cache(maxsize=None)
def architecture(variant: str) -> Architecture:
  """The block layout of `variant` ('b0'..'b7', 'lite0'..'lite4')."""
  _check_variant(variant)
  width, depth, resolution = _COEFFICIENTS[variant]
  lite = variant.startswith("lite")
  stem = 32 if lite else _round_filters(32, width)
  head = 1280 if lite else _round_filters(1280, width)
  blocks = []
  stage_ends = []
  last_stage = len(_BASE_STAGES) - 1
  for stage, (repeats, kernel, stride, expand, c_in, c_out) in enumerate(_BASE_STAGES):
    c_in = _round_filters(c_in, width)
    c_out = _round_filters(c_out, width)
    if lite and stage in (0, last_stage):
      n = repeats
      if stage == 0:
        c_in = 32   # the Lite package feeds the fixed 32-channel stem into the first block
    else:
      n = _round_repeats(repeats, depth)
    for r in range(n):
      block_in = c_in if r == 0 else c_out
      block_stride = stride if r == 0 else 1
      se = 0 if lite else max(1, int(block_in * _SE_RATIO))
      blocks.append(BlockSpec(
          index=len(blocks), stage=stage, kernel=kernel, stride=block_stride, expand_ratio=expand,
          in_channels=block_in, out_channels=c_out, se_channels=se,
          residual=(block_stride == 1 and block_in == c_out)))
    stage_ends.append(len(blocks) - 1)
  return Architecture(variant=variant, width=width, depth=depth, resolution=resolution, lite=lite,
                      stem_channels=stem, head_channels=head, blocks=tuple(blocks),
                      stage_ends=tuple(stage_ends))


def nominal_resolution(variant: str) -> int:
  """Nominal input resolution of `variant` (what static padding is computed for), e.g. 380 for B4."""
  return architecture(variant).resolution


def default_taps(variant: str) -> tuple:
  """Block indices of the last blocks of stages 1, 2, 3 and 5 (strides 2, 4, 8, 16).

  B4 -> (1, 5, 9, 21); Lite2 -> (0, 3, 6, 14).
  """
  ends = architecture(variant).stage_ends
  return tuple(ends[s] for s in _DEFAULT_TAP_STAGES)


def _check_taps(variant: str, taps: Optional[Sequence[int]]) -> tuple:
  arch = architecture(variant)
  if taps is None:
    return default_taps(variant)
  taps = tuple(int(t) for t in taps)
  if not taps:
    raise ValueError("taps must name at least one block")
  if any(b <= a for a, b in zip(taps, taps[1:])):
    raise ValueError(f"taps must be strictly increasing, got {taps}")
  if taps[0] < 0 or taps[-1] >= len(arch.blocks):
    raise ValueError(f"taps {taps} out of range for EfficientNet-{variant} ({len(arch.blocks)} blocks)")
  return taps


def tap_channels(variant: str, taps: Optional[Sequence[int]] = None) -> tuple:
  """Channels of each tap map, e.g. (24, 32, 56, 160) for B4 and (16, 24, 48, 120) for Lite2."""
  blocks = architecture(variant).blocks
  return tuple(blocks[t].out_channels for t in _check_taps(variant, taps))


def tap_strides(variant: str, taps: Optional[Sequence[int]] = None) -> tuple:
  """Cumulative stride of each tap map relative to the input (e.g. (2, 4, 8, 16) by default)."""
  blocks = architecture(variant).blocks
  out = []
  for t in _check_taps(variant, taps):
    stride = 2   # stem
    for b in blocks[:t + 1]:
      stride *= b.stride
    out.append(stride)
  return tuple(out)


def normalisation(variant: str) -> tuple:
  """(mean, std) per RGB channel for inputs in [0, 1].

  ImageNet statistics for B0-B7; for Lite the TF Lite recipe's (x - 127) / 128 on 0-255 pixels,
  i.e. mean 127/255 = 0.498 and std 128/255 = 0.502 on every channel.
  """
  return NORMALISATION["lite" if architecture(variant).lite else "imagenet"]


def same_padding(size: int, kernel: int, stride: int) -> tuple:
  """TF 'SAME' (low, high) padding of one spatial dimension of `size` pixels."""
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


def static_paddings(variant: str) -> dict:
  """The paddings `Conv2dStaticSamePadding` uses for the nominal resolution.

  Returns:
    {'stem': (lo, hi), 0: (lo, hi), 1: ...}: the stem conv and each block's depthwise conv
    (1x1 convs are never padded). B4: stem (0, 1), block 6 (2, 2), block 10 (0, 1).
  """
  arch = architecture(variant)
  size = arch.resolution
  pads = {"stem": same_padding(size, 3, 2)}
  size = -(-size // 2)
  for b in arch.blocks:
    pads[b.index] = same_padding(size, b.kernel, b.stride)
    size = -(-size // b.stride)
  return pads


def _activation(lite: bool):
  return jax.nn.relu6 if lite else jax.nn.silu   # silu(x) = x * sigmoid(x) = swish


class DepthwiseConv(nn.Module):
  """Depthwise k x k convolution (no bias) as a sum of k^2 shifted, strided products.

  Same parameter as `nn.Conv(C, (k, k), feature_group_count=C)` (kernel (k, k, 1, C)) and the same
  result, but XLA fuses it into one elementwise loop: 10-30x faster than XLA:CPU's grouped
  convolution, and as fast on GPU/TPU.

  Attributes:
    kernel_size: k.
    stride: s.
    pad: ((top, bottom), (left, right)) explicit padding.
    dtype: compute dtype.
  """
  kernel_size: int
  stride: int
  pad: tuple
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x (B, H, W, C) -> (B, H', W', C) with H' = (H + top + bottom - k) // s + 1."""
    k, s = self.kernel_size, self.stride
    c = x.shape[-1]
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, 1, c), jnp.float32)
    kernel = kernel.astype(self.dtype)
    x = jnp.pad(x.astype(self.dtype), ((0, 0), tuple(self.pad[0]), tuple(self.pad[1]), (0, 0)))
    h_out = (x.shape[1] - k) // s + 1
    w_out = (x.shape[2] - k) // s + 1
    out = None
    for i in range(k):
      for j in range(k):
        tap = x[:, i:i + s * (h_out - 1) + 1:s, j:j + s * (w_out - 1) + 1:s, :] * kernel[i, j, 0]
        out = tap if out is None else out + tap
    return out


class MBConv(nn.Module):
  """Mobile inverted bottleneck block (expand, depthwise, SE, project, residual).

  Attributes:
    spec: the block's static description.
    lite: Lite recipe (ReLU6) instead of swish.
    pad: ((top, bottom), (left, right)) of the depthwise conv.
    dtype: compute dtype.
    precision: lax precision of the convolutions.
  """
  spec: BlockSpec
  lite: bool
  pad: tuple
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x (B, H, W, C_in) -> (B, H/s, W/s, C_out)."""
    s = self.spec
    act = _activation(self.lite)
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
                             precision=self.precision)
    bn = functools.partial(nn.BatchNorm, use_running_average=True, momentum=BN_MOMENTUM,
                           epsilon=BN_EPSILON, dtype=self.dtype, param_dtype=jnp.float32)
    y = x
    if s.expand_ratio != 1:
      y = conv(s.mid_channels, (1, 1), padding="VALID", name="expand_conv")(y)
      y = act(bn(name="expand_bn")(y))
    y = DepthwiseConv(s.kernel, s.stride, self.pad, self.dtype, name="dw_conv")(y)
    y = act(bn(name="dw_bn")(y))
    if s.se_channels:
      dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=jnp.float32,
                                precision=self.precision)
      z = jnp.mean(y, axis=(1, 2), keepdims=True)
      z = act(dense(s.se_channels, name="se_reduce")(z))
      z = dense(s.mid_channels, name="se_expand")(z)
      y = y * jax.nn.sigmoid(z)
    y = conv(s.out_channels, (1, 1), padding="VALID", name="project_conv")(y)
    y = bn(name="project_bn")(y)
    if s.residual:
      y = y + x
    return y


class EfficientNet(nn.Module):
  """Frozen EfficientNet feature extractor / classifier.

  Parameters: `stem_conv`, `stem_bn`, `blocks_{i}` (`expand_conv`, `expand_bn`, `dw_conv`,
  `dw_bn`, `se_reduce`, `se_expand`, `project_conv`, `project_bn`), and with the head
  `head_conv`, `head_bn`, `classifier`. BatchNorm statistics live in `batch_stats`.

  Attributes:
    variant: 'b0'..'b7' or 'lite0'..'lite4'.
    padding: 'static' = TF-SAME computed for `static_resolution` (default: the variant's nominal
      resolution), as the reference's `Conv2dStaticSamePadding`; 'same' = TF-SAME for the actual
      input size.
    taps: block indices whose outputs are returned; None = `default_taps(variant)`.
    include_head: return ImageNet logits instead of the tap maps.
    dtype: compute dtype (parameters stay float32).
    static_resolution: resolution the static padding is computed for; None = nominal. E.g. 224
      reproduces an `efficientnet_lite_pytorch` model built with `image_size=224`.
    precision: lax precision of the convolutions and dense layers (None = backend default).
  """
  variant: str = "b4"
  padding: str = "static"
  taps: Optional[tuple] = None
  include_head: bool = False
  dtype: Any = jnp.float32
  static_resolution: Optional[int] = None
  precision: Any = None

  def _pads(self, height: int, width: int) -> tuple:
    """((top, bottom), (left, right)) for the stem and for every block's depthwise conv."""
    arch = architecture(self.variant)
    if self.padding == "static":
      size = self.static_resolution or arch.resolution
      hs = ws = size
    elif self.padding == "same":
      hs, ws = height, width
    else:
      raise ValueError(f"padding must be one of {PADDINGS}, got {self.padding!r}")
    stem = (same_padding(hs, 3, 2), same_padding(ws, 3, 2))
    hs, ws = -(-hs // 2), -(-ws // 2)
    blocks = []
    for b in arch.blocks:
      blocks.append((same_padding(hs, b.kernel, b.stride), same_padding(ws, b.kernel, b.stride)))
      hs, ws = -(-hs // b.stride), -(-ws // b.stride)
    return stem, tuple(blocks)

  @nn.compact
  def __call__(self, x: jax.Array):
    """Runs the network.

    Args:
      x: (B, H, W, 3) images normalised with `normalisation(variant)`.

    Returns:
      include_head=False: tuple of tap maps, the i-th (B, H/s_i, W/s_i, C_i) with
        s_i = `tap_strides(variant, taps)[i]` and C_i = `tap_channels(variant, taps)[i]`; only the
        blocks up to the last tap are computed.
      include_head=True: (B, 1000) ImageNet logits.
    """
    arch = architecture(self.variant)
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"EfficientNet expects (B, H, W, 3) images, got shape {x.shape}")
    taps = _check_taps(self.variant, self.taps)
    last = len(arch.blocks) - 1 if self.include_head else taps[-1]
    stem_pad, block_pads = self._pads(x.shape[1], x.shape[2])
    act = _activation(arch.lite)
    bn = functools.partial(nn.BatchNorm, use_running_average=True, momentum=BN_MOMENTUM,
                           epsilon=BN_EPSILON, dtype=self.dtype, param_dtype=jnp.float32)

    y = x.astype(self.dtype)
    y = nn.Conv(arch.stem_channels, (3, 3), strides=(2, 2), padding=stem_pad, use_bias=False,
                dtype=self.dtype, param_dtype=jnp.float32, precision=self.precision,
                name="stem_conv")(y)
    y = act(bn(name="stem_bn")(y))
    outputs = []
    for spec in arch.blocks[:last + 1]:
      y = MBConv(spec=spec, lite=arch.lite, pad=block_pads[spec.index], dtype=self.dtype,
                 precision=self.precision, name=f"blocks_{spec.index}")(y)
      if spec.index in taps:
        outputs.append(y)
    if not self.include_head:
      return tuple(outputs)

    y = nn.Conv(arch.head_channels, (1, 1), padding="VALID", use_bias=False, dtype=self.dtype,
                param_dtype=jnp.float32, precision=self.precision, name="head_conv")(y)
    y = act(bn(name="head_bn")(y))
    y = jnp.mean(y, axis=(1, 2))
    return nn.Dense(NUM_CLASSES, dtype=self.dtype, param_dtype=jnp.float32, precision=self.precision,
                    name="classifier")(y)
