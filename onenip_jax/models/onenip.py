"""OneNIP reconstruction network, neck and refiner (spec sections 4-6, 8.3, 13).

All tensors are NHWC / (batch, tokens, channels). Parameters are always float32; `dtype` is the
compute dtype of the trainable network and every output is returned as float32.

RNG collections: 'dropout' (attention-probability and residual dropout) and 'jitter' (feature
jitter), both used only when `train=True`. Variable collections: 'params' and, with the refiner,
'batch_stats' (refiner BatchNorm running statistics; pass `mutable=['batch_stats']` in training).
"""
import math
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from onenip_jax.models import dropout as dropout_lib
from onenip_jax.models.resize import resize_align_corners

Dtype = Any
Array = jnp.ndarray

LN_EPS = 1e-5
DECODERS = ("bidirectional", "unidirectional", "uniad")

xavier_uniform = nn.initializers.xavier_uniform()
zeros = nn.initializers.zeros


def packed_in_proj_init(embed_dim: int) -> Callable[..., Array]:
  """PyTorch's default q/k/v init: xavier_uniform over the packed (3D, D) in_proj matrix.

  Every one of the separate (D, D) q/k/v kernels gets U(-b, b) with b = sqrt(6 / (D + 3D)).
  """
  bound = math.sqrt(6.0 / (embed_dim + 3 * embed_dim))

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def neighbor_mask(h: int, w: int, n: Union[int, Sequence[int]]) -> np.ndarray:
  """Neighbour-masked-attention (NMA) mask over a row-major h x w token grid (spec 5.4).

  Key (y2, x2) is blocked for query (y1, x1) when |y2 - y1| <= ny // 2 and |x2 - x1| <= nx // 2,
  i.e. a (2 * (n // 2) + 1)-wide window clipped at the borders.

  Args:
    h: grid height.
    w: grid width.
    n: neighbourhood size, an int (both dimensions) or (ny, nx). The reference uses h // 2.

  Returns:
    (N, N) bool array, N = h * w, True where the query (row) MAY attend to the key (column).
  """
  ny, nx = (n, n) if np.isscalar(n) else (int(n[0]), int(n[1]))
  ys, xs = np.divmod(np.arange(h * w), w)
  dy = np.abs(ys[:, None] - ys[None, :])
  dx = np.abs(xs[:, None] - xs[None, :])
  blocked = (dy <= ny // 2) & (dx <= nx // 2)
  return ~blocked


class MultiheadAttention(nn.Module):
  """`torch.nn.MultiheadAttention` semantics (spec 5.9), batch-first.

  Separate q/k/v projections with bias (init as PyTorch's packed in_proj), scaled dot product
  1/sqrt(head_dim), boolean mask shared by heads and batch, dropout on the attention
  probabilities, out projection (xavier_uniform, zero bias). Positions are added by the caller.
  """
  embed_dim: int = 256
  num_heads: int = 8
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, query: Array, key: Array, value: Array, mask: Optional[Array] = None, *,
               deterministic: bool = True) -> Array:
    """Attends `query` to `key`/`value`.

    Args:
      query: (B, Nq, D).
      key: (B, Nk, D).
      value: (B, Nk, D).
      mask: optional bool (Nq, Nk) (or broadcastable to (B, heads, Nq, Nk)); True = may attend.
      deterministic: disables attention dropout.

    Returns:
      (B, Nq, D) in `dtype`.
    """
    d, nh = self.embed_dim, self.num_heads
    if d % nh:
      raise ValueError(f"embed_dim {d} is not divisible by num_heads {nh}")
    hd = d // nh
    in_init = packed_in_proj_init(d)

    def proj(name, x, kernel_init):
      return nn.Dense(d, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=kernel_init,
                      bias_init=zeros, name=name)(x)

    q = proj("q_proj", query, in_init)
    k = proj("k_proj", key, in_init)
    v = proj("v_proj", value, in_init)
    b, nq, nk = q.shape[0], q.shape[1], k.shape[1]
    q = q.reshape(b, nq, nh, hd) * jnp.asarray(1.0 / math.sqrt(hd), self.dtype)
    k = k.reshape(b, nk, nh, hd)
    v = v.reshape(b, nk, nh, hd)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
    if mask is not None:
      logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    probs = dropout_lib.Dropout(self.dropout)(probs, deterministic=deterministic)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, nq, d)
    return proj("out_proj", out, xavier_uniform)


def _dense(features: int, dtype: Dtype, name: str) -> nn.Dense:
  return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, kernel_init=xavier_uniform,
                  bias_init=zeros, name=name)


def _layer_norm(dtype: Dtype, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=LN_EPS, dtype=dtype, param_dtype=jnp.float32, name=name)


class PositionEmbedding(nn.Module):
  """Learned row/column position embedding (spec 5.3), both tables U[0, 1)."""
  h: int
  w: int
  hidden_dim: int = 256

  @nn.compact
  def __call__(self) -> Array:
    """Returns (N, D) with pos[y * w + x] = concat(col_embed[x], row_embed[y])."""
    half = self.hidden_dim // 2
    init = nn.initializers.uniform(1.0)
    row = self.param("row_embed", init, (self.h, half), jnp.float32)
    col = self.param("col_embed", init, (self.w, self.hidden_dim - half), jnp.float32)
    pos = jnp.concatenate([
        jnp.broadcast_to(col[None, :, :], (self.h, self.w, col.shape[-1])),
        jnp.broadcast_to(row[:, None, :], (self.h, self.w, half)),
    ], axis=-1)
    return pos.reshape(self.h * self.w, self.hidden_dim)


class EncoderLayer(nn.Module):
  """Post-norm self-attention encoder layer (spec 5.5)."""
  hidden_dim: int = 256
  num_heads: int = 8
  ffn_dim: int = 1024
  dropout: float = 0.1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, pos: Array, mask: Optional[Array], *, deterministic: bool) -> Array:
    """x: (B, N, D); pos: (N, D); mask: (N, N) bool or None. Returns (B, N, D)."""
    drop = lambda y: dropout_lib.Dropout(self.dropout)(y, deterministic=deterministic)
    qk = x + pos
    a = MultiheadAttention(self.hidden_dim, self.num_heads, self.dropout, self.dtype,
                           name="self_attn")(qk, qk, x, mask, deterministic=deterministic)
    x = _layer_norm(self.dtype, "norm1")(x + drop(a))
    f = nn.relu(_dense(self.ffn_dim, self.dtype, "linear1")(x))
    f = _dense(self.hidden_dim, self.dtype, "linear2")(drop(f))
    return _layer_norm(self.dtype, "norm2")(x + drop(f))


class PromptDecoderLayer(nn.Module):
  """OneNIP decoder layer (spec 5.7): prompt stream P attends to target stream X, then (when
  `bidirectional`) X attends to the updated P. With `bidirectional=False` X is left unchanged."""
  hidden_dim: int = 256
  num_heads: int = 8
  ffn_dim: int = 1024
  dropout: float = 0.1
  bidirectional: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, p: Array, x: Array, pos: Array, mask: Optional[Array], *,
               deterministic: bool) -> Tuple[Array, Array]:
    """p, x: (B, N, D); pos: (N, D); mask: (N, N) bool or None. Returns the updated (p, x)."""
    drop = lambda y: dropout_lib.Dropout(self.dropout)(y, deterministic=deterministic)
    mha = lambda name: MultiheadAttention(self.hidden_dim, self.num_heads, self.dropout, self.dtype,
                                          name=name)
    a = mha("cross_attn_prompt_to_image")(p + pos, x + pos, x, mask, deterministic=deterministic)
    p = _layer_norm(self.dtype, "norm1")(p + drop(a))
    m = nn.relu(_dense(self.ffn_dim, self.dtype, "mlp_lin1")(p))
    m = _dense(self.hidden_dim, self.dtype, "mlp_lin2")(m)        # no internal dropout
    p = _layer_norm(self.dtype, "norm2")(p + drop(m))
    if self.bidirectional:
      b = mha("cross_attn_image_to_prompt")(x + pos, p + pos, p, mask, deterministic=deterministic)
      x = _layer_norm(self.dtype, "norm3")(x + drop(b))
    return p, x


class UniADDecoderLayer(nn.Module):
  """UniAD decoder layer: layer-wise learned queries (N, D) attend to the encoder memory, then to
  the previous layer's output, then an FFN; all post-norm. The learned queries get xavier_uniform
  (UniAD's initialiser for every matrix)."""
  num_tokens: int
  hidden_dim: int = 256
  num_heads: int = 8
  ffn_dim: int = 1024
  dropout: float = 0.1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, out: Array, memory: Array, pos: Array, mask: Optional[Array], *,
               deterministic: bool) -> Array:
    """out, memory: (B, N, D); pos: (N, D); mask: (N, N) bool or None. Returns (B, N, D)."""
    drop = lambda y: dropout_lib.Dropout(self.dropout)(y, deterministic=deterministic)
    mha = lambda name: MultiheadAttention(self.hidden_dim, self.num_heads, self.dropout, self.dtype,
                                          name=name)
    emb = self.param("learned_embed", xavier_uniform, (self.num_tokens, self.hidden_dim),
                     jnp.float32)
    tgt = jnp.broadcast_to(emb.astype(self.dtype)[None], memory.shape)
    t = mha("self_attn")(tgt + pos, memory + pos, memory, mask, deterministic=deterministic)
    tgt = _layer_norm(self.dtype, "norm1")(tgt + drop(t))
    t = mha("multihead_attn")(tgt + pos, out + pos, out, mask, deterministic=deterministic)
    tgt = _layer_norm(self.dtype, "norm2")(tgt + drop(t))
    t = nn.relu(_dense(self.ffn_dim, self.dtype, "linear1")(tgt))
    t = _dense(self.hidden_dim, self.dtype, "linear2")(drop(t))
    return _layer_norm(self.dtype, "norm3")(tgt + drop(t))


def _bn_grouping(batch: int, paired_with: Optional[int], group_size: int) -> Tuple[int, int, int]:
  """(P, G, k) such that x.reshape(P, G, k, ...) puts BN group g at [:, g] (spec 6, brief).

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

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: (B, h, w, C) -> (B, 2h, 2w, features)."""
    b, h, w, c = x.shape
    kernel = self.param("kernel", xavier_uniform, (2, 2, c, self.features), jnp.float32)
    bias = self.param("bias", zeros, (self.features,), jnp.float32)
    y = jnp.einsum("nhwc,abco->nhawbo", x, kernel.astype(self.dtype))
    return y.reshape(b, 2 * h, 2 * w, self.features) + bias.astype(self.dtype)


class Refiner(nn.Module):
  """MaskHead (spec 6): 2 x (Conv3x3 no bias -> BN -> ReLU -> ConvTranspose 2x2/2) -> Conv1x1."""
  channels: int = 128
  bn_group_size: int = 16
  dtype: Dtype = jnp.float32

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
      x = Deconv2x2(self.channels, self.dtype, name=f"deconv{i}")(x)
    return nn.Conv(1, (1, 1), dtype=self.dtype, param_dtype=jnp.float32, kernel_init=xavier_uniform,
                   bias_init=zeros, name="predictor")(x)


class OneNIP(nn.Module):
  """OneNIP: prompt-guided feature reconstruction plus a supervised refiner (spec 5-6).

  Fields mirror `config.model`. `neighbor_size` 0 means (h // 2, w // 2) as in the reference.
  """
  hidden_dim: int = 256
  num_heads: int = 8
  ffn_dim: int = 1024
  dropout: float = 0.1
  enc_layers: int = 4
  dec_layers: int = 4
  jitter_scale: float = 20.0
  jitter_prob: float = 1.0
  neighbor_mask: bool = True
  neighbor_size: Union[int, Tuple[int, int]] = 0
  decoder: str = "bidirectional"
  refiner: bool = True
  refiner_channels: int = 128
  bn_group_size: int = 16
  dtype: Dtype = jnp.float32

  @classmethod
  def from_config(cls, model_cfg: Any, **overrides: Any) -> "OneNIP":
    """Builds the module from `config.model` (every key a field; the same as `OneNIP(**model_cfg)`
    with the dtype name and a JSON list `neighbor_size` normalised)."""
    kwargs = {k: model_cfg[k] for k in model_cfg.keys()}
    kwargs.update(overrides)
    fields = set(cls.__dataclass_fields__) - {"parent", "name"}
    if set(kwargs) - fields:
      raise ValueError(f"config.model has keys that are no OneNIP field: {sorted(set(kwargs) - fields)}"
                       f" (fields: {sorted(fields)})")
    if isinstance(kwargs.get("dtype"), str):
      kwargs["dtype"] = jnp.dtype(kwargs["dtype"])
    if isinstance(kwargs.get("neighbor_size"), (list, tuple)):
      kwargs["neighbor_size"] = tuple(int(v) for v in kwargs["neighbor_size"])
    return cls(**kwargs)

  def _jitter(self, x: Array) -> Array:
    """Feature jitter (spec 5.2): f += eps * ||f|| / C * scale per token, with prob `jitter_prob`
    (one draw per call, as UniAD's add_jitter). x: (B, N, C) float32."""
    if self.jitter_scale == 0 or self.jitter_prob <= 0:
      return x
    k_apply, k_noise = jax.random.split(self.make_rng("jitter"))
    norms = jnp.linalg.norm(x, axis=-1, keepdims=True) / x.shape[-1]
    noise = dropout_lib.normal(k_noise, x.shape) * norms * self.jitter_scale
    if self.jitter_prob < 1:
      noise = jnp.where(jax.random.uniform(k_apply) < self.jitter_prob, noise, 0.0)
    return x + noise

  @nn.compact
  def __call__(self, query: Array, prompt: Array, *, train: bool) -> Dict[str, Optional[Array]]:
    """Reconstructs the target features from the prompt and scores the error.

    Args:
      query: (Bq, h, w, C) clean target features; training layout [F^n; F^a] with Bq = 2 * Bp.
      prompt: (Bp, h, w, C) prompt features, Bq == Bp or Bq == 2 * Bp (then duplicated).
        Ignored (but required) by the 'uniad' decoder.
      train: enables jitter, dropout and batch statistics in the refiner BatchNorm.

    Returns:
      dict of float32 arrays: 'recon' (Bq, h, w, C); 'rec' (Bq, 16h, 16w, 1) = ||recon - query||_2
      over channels upsampled x16 (align corners); 'ref_logit' (Bq, 16h, 16w, 1) refiner logits
      upsampled x4 (align corners), or None when `refiner=False`.
    """
    if self.decoder not in DECODERS:
      raise ValueError(f"model.decoder must be one of {DECODERS}, got {self.decoder!r}")
    bq, h, w, c = query.shape
    bp = prompt.shape[0]
    if prompt.shape[1:] != query.shape[1:]:
      raise ValueError(f"prompt {prompt.shape} and query {query.shape} must share (h, w, C)")
    if bq not in (bp, 2 * bp):
      raise ValueError(f"query batch {bq} must equal the prompt batch {bp} or twice it")
    paired_with = bp if bq == 2 * bp else None
    d, n_tok, det = self.hidden_dim, h * w, not train
    dt = self.dtype

    mask = None
    if self.neighbor_mask:
      ns = self.neighbor_size
      if not isinstance(ns, tuple) and not ns:
        ns = (h // 2, w // 2)
      mask = jnp.asarray(neighbor_mask(h, w, ns))

    use_prompt = self.decoder != "uniad"
    query = query.astype(jnp.float32)
    x = jnp.concatenate([query, prompt.astype(jnp.float32)]) if use_prompt else query
    x = x.reshape(x.shape[0], n_tok, c)
    if train:
      with jax.named_scope("jitter"):
        x = self._jitter(x)
    x = _dense(d, dt, "input_proj")(x.astype(dt))
    pos = PositionEmbedding(h, w, d, name="pos_embed")().astype(dt)

    for i in range(self.enc_layers):
      x = EncoderLayer(d, self.num_heads, self.ffn_dim, self.dropout, dt, name=f"encoder_layer{i}")(
          x, pos, mask, deterministic=det)
    tgt = x[:bq]

    if use_prompt:
      p = x[bq:]
      if paired_with is not None:
        p = jnp.concatenate([p, p])
      for i in range(self.dec_layers):
        p, tgt = PromptDecoderLayer(d, self.num_heads, self.ffn_dim, self.dropout,
                                    self.decoder == "bidirectional", dt, name=f"decoder_layer{i}")(
            p, tgt, pos, mask, deterministic=det)
    else:
      p = tgt
      for i in range(self.dec_layers):
        p = UniADDecoderLayer(n_tok, d, self.num_heads, self.ffn_dim, self.dropout, dt,
                              name=f"decoder_layer{i}")(p, tgt, pos, mask, deterministic=det)

    f = MultiheadAttention(d, self.num_heads, self.dropout, dt, name="final_attn")(
        p + pos, tgt + pos, tgt, None, deterministic=det)
    p = p + dropout_lib.Dropout(self.dropout)(f, deterministic=det)
    p = _layer_norm(dt, "decoder_norm")(p)
    recon = _dense(c, dt, "output_proj")(p).astype(jnp.float32).reshape(bq, h, w, c)

    diff = recon - query
    out_hw = (16 * h, 16 * w)
    rec = jnp.sqrt(jnp.sum(jnp.square(diff), axis=-1, keepdims=True))
    outputs = {"recon": recon, "rec": resize_align_corners(rec, out_hw), "ref_logit": None}
    if self.refiner:
      logit = Refiner(self.refiner_channels, self.bn_group_size, dt, name="refiner")(
          jnp.abs(diff), train=train, paired_with=paired_with)
      outputs["ref_logit"] = resize_align_corners(logit.astype(jnp.float32), out_hw)
    return outputs
