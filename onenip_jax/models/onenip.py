"""The OneNIP model (docs/algorithm.md §5, §6, §8): prompt-guided feature reconstruction from the
layers of `transformer.py`, scored by the refiner of `refiner.py`.

All tensors are NHWC / (batch, tokens, channels). Parameters are always float32; `dtype` is the
compute dtype of the trainable network and every output is returned as float32.

RNG collections: 'dropout' (attention-probability and residual dropout) and 'jitter' (feature
jitter), both used only when `train=True`. Variable collections: 'params' and, with the refiner,
'batch_stats' (refiner BatchNorm running statistics; pass `mutable=['batch_stats']` in training).
"""
from typing import Any, Dict, Optional, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from onenip_jax.models import dropout as dropout_lib
from onenip_jax.models import mixed
from onenip_jax.models.refiner import Refiner
from onenip_jax.models.resize import resize_align_corners
from onenip_jax.models.transformer import (Array, Dtype, EncoderLayer, MultiheadAttention,
                                           PositionEmbedding, PromptDecoderLayer,
                                           UniADDecoderLayer, dense, layer_norm, neighbor_mask)

DECODERS = ("bidirectional", "unidirectional", "uniad")


class OneNIP(nn.Module):
  """OneNIP: prompt-guided feature reconstruction plus a supervised refiner (docs/algorithm.md §5, §8).

  Fields mirror `config.model`. `neighbor_size` 0 means (h // 2, w // 2) as in the reference.
  `dtype` is the compute dtype of activations; `matmul_dtype` the operand dtype of the
  transformer's matmuls and the refiner's transposed convolutions (float32 results, `mixed.py`);
  `attention` the attention implementation (`transformer.MultiheadAttention`).
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
  matmul_dtype: Dtype = jnp.float32
  attention: str = "einsum"

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
    for key in ("dtype", "matmul_dtype"):
      if isinstance(kwargs.get(key), str):
        kwargs[key] = mixed.resolve_dtype(kwargs[key])   # 'auto': bfloat16 on GPU/TPU
    if isinstance(kwargs.get("neighbor_size"), (list, tuple)):
      kwargs["neighbor_size"] = tuple(int(v) for v in kwargs["neighbor_size"])
    return cls(**kwargs)

  def _jitter(self, x: Array) -> Array:
    """Feature jitter (docs/algorithm.md §5.1): f += eps * ||f|| / C * scale per token, with prob `jitter_prob`
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
    dt, mm, att = mixed.resolve_dtype(self.dtype), mixed.resolve_dtype(self.matmul_dtype), self.attention

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
    x = dense(d, dt, "input_proj", mm)(x.astype(dt))
    pos = PositionEmbedding(h, w, d, name="pos_embed")().astype(dt)
    # Broadcast over the batch once, not at each of its ~20 uses: the gradient then adds the uses
    # elementwise and sums over the batch once, instead of once per use.
    pos_x = jnp.broadcast_to(pos, (x.shape[0], n_tok, d))
    for i in range(self.enc_layers):
      x = EncoderLayer(d, self.num_heads, self.ffn_dim, self.dropout, dt, att, mm,
                       name=f"encoder_layer{i}")(x, pos_x, mask, deterministic=det)
    tgt = x[:bq]
    pos = jnp.broadcast_to(pos, (bq, n_tok, d))

    if use_prompt:
      p = x[bq:]
      if paired_with is not None:
        p = jnp.concatenate([p, p])
      for i in range(self.dec_layers):
        p, tgt = PromptDecoderLayer(d, self.num_heads, self.ffn_dim, self.dropout,
                                    self.decoder == "bidirectional", dt, att, mm,
                                    name=f"decoder_layer{i}")(
            p, tgt, pos, mask, deterministic=det)
    else:
      p = tgt
      for i in range(self.dec_layers):
        p = UniADDecoderLayer(n_tok, d, self.num_heads, self.ffn_dim, self.dropout, dt, att, mm,
                              name=f"decoder_layer{i}")(p, tgt, pos, mask, deterministic=det)

    f = MultiheadAttention(d, self.num_heads, self.dropout, dt, att, mm, name="final_attn")(
        p + pos, tgt + pos, tgt, None, deterministic=det)
    p = p + dropout_lib.Dropout(self.dropout)(f, deterministic=det)
    p = layer_norm(dt, "decoder_norm")(p)
    recon = dense(c, dt, "output_proj", mm)(p).astype(jnp.float32).reshape(bq, h, w, c)

    diff = recon - query
    out_hw = (16 * h, 16 * w)
    rec = jnp.sqrt(jnp.sum(jnp.square(diff), axis=-1, keepdims=True))
    outputs = {"recon": recon, "rec": resize_align_corners(rec, out_hw), "ref_logit": None}
    if self.refiner:
      logit = Refiner(self.refiner_channels, self.bn_group_size, dt, mm, name="refiner")(
          jnp.abs(diff), train=train, paired_with=paired_with)
      outputs["ref_logit"] = resize_align_corners(logit.astype(jnp.float32), out_hw)
    return outputs
