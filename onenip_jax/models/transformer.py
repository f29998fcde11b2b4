"""Attention and transformer layers of the OneNIP reconstruction network (docs/algorithm.md §5).

Tokens are (batch, tokens, channels), row-major over the h x w feature grid. Parameters are float32;
`dtype` is the compute dtype. Initialisers follow PyTorch's (xavier_uniform, zero biases).
"""
import math
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from onenip_jax.models import dropout as dropout_lib
from onenip_jax.models import mixed

Dtype = Any
Array = jnp.ndarray

LN_EPS = 1e-5

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
  """Neighbour-masked-attention (NMA) mask over a row-major h x w token grid (docs/algorithm.md §5.2).

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


ATTENTION = ("head_major", "einsum", "fused")


class HeadProjection(nn.Module):
  """`nn.Dense(D)` (same 'kernel' (D, D) and 'bias' (D,)) whose output is split into heads.

  x (B, N, D) -> (B, heads, N, D // heads) with `head_major`, else (B, N, heads, D // heads).
  """
  embed_dim: int
  num_heads: int
  kernel_init: Callable[..., Array]
  head_major: bool = True
  dtype: Dtype = jnp.float32
  matmul_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    d, nh = self.embed_dim, self.num_heads
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], d), jnp.float32)
    bias = self.param("bias", zeros, (d,), jnp.float32)
    x, kernel, bias = x.astype(self.dtype), kernel.astype(self.dtype), bias.astype(self.dtype)
    kernel = kernel.reshape(x.shape[-1], nh, d // nh)
    if self.head_major:
      y = mixed.einsum("bnc,che->bhne", x, kernel, self.matmul_dtype)
      return y.astype(self.dtype) + bias.reshape(nh, 1, d // nh)
    y = mixed.einsum("bnc,che->bnhe", x, kernel, self.matmul_dtype)
    return y.astype(self.dtype) + bias.reshape(nh, d // nh)


class MultiheadAttention(nn.Module):
  """`torch.nn.MultiheadAttention` semantics (docs/algorithm.md §5.3), batch-first.

  Separate q/k/v projections with bias (init as PyTorch's packed in_proj), scaled dot product
  1/sqrt(head_dim), boolean mask shared by heads and batch, dropout on the attention
  probabilities, out projection (xavier_uniform, zero bias). Positions are added by the caller.

  `implementation` (same parameters and results to float32 round-off):
    'head_major': q/k/v projected straight into (B, heads, N, head_dim), so both attention
      matmuls are plain batched matmuls over (B, heads);
    'einsum': (B, N, heads, head_dim) operands, the heads transposed inside the einsums;
    'fused': `jax.nn.dot_product_attention` (the backend picks the kernel: cuDNN's fused
      attention on GPU where it applies, XLA elsewhere). It has no dropout: while attention
      dropout is active (training with dropout > 0) the 'head_major' path runs instead.
  `matmul_dtype` is the operand dtype of every matmul (`mixed.einsum`; results float32).
  """
  embed_dim: int = 256
  num_heads: int = 8
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  implementation: str = "einsum"
  matmul_dtype: Dtype = jnp.float32

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
    if self.implementation not in ATTENTION:
      raise ValueError(f"attention implementation must be one of {ATTENTION}, "
                       f"got {self.implementation!r}")
    hd = d // nh
    in_init = packed_in_proj_init(d)
    dropout_active = self.dropout > 0 and not deterministic
    impl = self.implementation
    if impl == "fused" and dropout_active:
      impl = "head_major"
    head_major = impl == "head_major"
    mm = self.matmul_dtype

    def proj(name, x):
      return HeadProjection(d, nh, in_init, head_major, self.dtype, mm, name=name)(x)

    q, k, v = proj("q_proj", query), proj("k_proj", key), proj("v_proj", value)
    b, nq = query.shape[0], query.shape[1]
    if impl == "fused":
      # (B, N, heads, hd) operands; mask True = may attend, as jax.nn.dot_product_attention's.
      if jnp.dtype(mm) != jnp.float32:
        q, k, v = q.astype(mm), k.astype(mm), v.astype(mm)
      if mask is not None:
        mask = jnp.broadcast_to(mask, (1, 1) + mask.shape[-2:]) if mask.ndim == 2 else mask
      out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=1.0 / math.sqrt(hd))
      out = out.astype(self.dtype).reshape(b, nq, d)
    else:
      spec_qk, spec_pv = (("bhqd,bhkd->bhqk", "bhqk,bhkd->bhqd") if head_major else
                          ("bqhd,bkhd->bhqk", "bhqk,bkhd->bqhd"))
      q = q * jnp.asarray(1.0 / math.sqrt(hd), self.dtype)
      logits = mixed.einsum(spec_qk, q, k, mm).astype(jnp.float32)
      if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
      probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
      probs = dropout_lib.Dropout(self.dropout)(probs, deterministic=deterministic)
      out = mixed.einsum(spec_pv, probs, v, mm).astype(self.dtype)
      if head_major:
        out = jnp.swapaxes(out, 1, 2)
      out = out.reshape(b, nq, d)
    return nn.Dense(d, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=xavier_uniform,
                    bias_init=zeros, dot_general=mixed.dot_general(mm), name="out_proj")(out)


def dense(features: int, dtype: Dtype, name: str, matmul_dtype: Dtype = jnp.float32) -> nn.Dense:
  return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, kernel_init=xavier_uniform,
                  bias_init=zeros, dot_general=mixed.dot_general(matmul_dtype), name=name)


def layer_norm(dtype: Dtype, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=LN_EPS, dtype=dtype, param_dtype=jnp.float32, name=name)


class PositionEmbedding(nn.Module):
  """Learned row/column position embedding (docs/algorithm.md §5.1), both tables U[0, 1)."""
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
  """Post-norm self-attention encoder layer (docs/algorithm.md §5.4)."""
  hidden_dim: int = 256
  num_heads: int = 8
  ffn_dim: int = 1024
  dropout: float = 0.1
  dtype: Dtype = jnp.float32
  attention: str = "einsum"
  matmul_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, pos: Array, mask: Optional[Array], *, deterministic: bool) -> Array:
    """x: (B, N, D); pos: (N, D) or (B, N, D); mask: (N, N) bool or None. Returns (B, N, D)."""
    drop = lambda y: dropout_lib.Dropout(self.dropout)(y, deterministic=deterministic)
    qk = x + pos
    a = MultiheadAttention(self.hidden_dim, self.num_heads, self.dropout, self.dtype,
                           self.attention, self.matmul_dtype, name="self_attn")(qk, qk, x, mask, deterministic=deterministic)
    x = layer_norm(self.dtype, "norm1")(x + drop(a))
    f = nn.relu(dense(self.ffn_dim, self.dtype, "linear1", self.matmul_dtype)(x))
    f = dense(self.hidden_dim, self.dtype, "linear2", self.matmul_dtype)(drop(f))
    return layer_norm(self.dtype, "norm2")(x + drop(f))


class PromptDecoderLayer(nn.Module):
  """OneNIP decoder layer (docs/algorithm.md §5.5): prompt stream P attends to target stream X, then (when
  `bidirectional`) X attends to the updated P. With `bidirectional=False` X is left unchanged."""
  hidden_dim: int = 256
  num_heads: int = 8
  ffn_dim: int = 1024
  dropout: float = 0.1
  bidirectional: bool = True
  dtype: Dtype = jnp.float32
  attention: str = "einsum"
  matmul_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, p: Array, x: Array, pos: Array, mask: Optional[Array], *,
               deterministic: bool) -> Tuple[Array, Array]:
    """p, x: (B, N, D); pos: (N, D) or (B, N, D); mask: (N, N) bool or None.

    Returns the updated (p, x)."""
    drop = lambda y: dropout_lib.Dropout(self.dropout)(y, deterministic=deterministic)
    mha = lambda name: MultiheadAttention(self.hidden_dim, self.num_heads, self.dropout, self.dtype,
                                          self.attention, self.matmul_dtype, name=name)
    a = mha("cross_attn_prompt_to_image")(p + pos, x + pos, x, mask, deterministic=deterministic)
    p = layer_norm(self.dtype, "norm1")(p + drop(a))
    m = nn.relu(dense(self.ffn_dim, self.dtype, "mlp_lin1", self.matmul_dtype)(p))
    m = dense(self.hidden_dim, self.dtype, "mlp_lin2", self.matmul_dtype)(m)        # no internal dropout
    p = layer_norm(self.dtype, "norm2")(p + drop(m))
    if self.bidirectional:
      b = mha("cross_attn_image_to_prompt")(x + pos, p + pos, p, mask, deterministic=deterministic)
      x = layer_norm(self.dtype, "norm3")(x + drop(b))
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
  attention: str = "einsum"
  matmul_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, out: Array, memory: Array, pos: Array, mask: Optional[Array], *,
               deterministic: bool) -> Array:
    """out, memory: (B, N, D); pos: (N, D) or (B, N, D); mask: (N, N) bool or None.

    Returns (B, N, D)."""
    drop = lambda y: dropout_lib.Dropout(self.dropout)(y, deterministic=deterministic)
    mha = lambda name: MultiheadAttention(self.hidden_dim, self.num_heads, self.dropout, self.dtype,
                                          self.attention, self.matmul_dtype, name=name)
    emb = self.param("learned_embed", xavier_uniform, (self.num_tokens, self.hidden_dim),
                     jnp.float32)
    tgt = jnp.broadcast_to(emb.astype(self.dtype)[None], memory.shape)
    t = mha("self_attn")(tgt + pos, memory + pos, memory, mask, deterministic=deterministic)
    tgt = layer_norm(self.dtype, "norm1")(tgt + drop(t))
    t = mha("multihead_attn")(tgt + pos, out + pos, out, mask, deterministic=deterministic)
    tgt = layer_norm(self.dtype, "norm2")(tgt + drop(t))
    t = nn.relu(dense(self.ffn_dim, self.dtype, "linear1", self.matmul_dtype)(tgt))
    t = dense(self.hidden_dim, self.dtype, "linear2", self.matmul_dtype)(drop(t))
    return layer_norm(self.dtype, "norm3")(tgt + drop(t))
