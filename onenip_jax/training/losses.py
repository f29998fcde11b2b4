"""Training losses (docs/algorithm.md §9): feature MSE plus Dice on the refiner output.

All results are float32 scalars. Maps are NHWC.
"""
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp

Array = jnp.ndarray

PAPER_DICE_EPS = 1e-6


def feature_mse(recon: Array, target: Array) -> Array:
  """Plain mean of (recon - target)^2 over every element; float32 scalar."""
  diff = recon.astype(jnp.float32) - target.astype(jnp.float32)
  return jnp.mean(jnp.square(diff))


def dice_loss(prob: Array, mask: Array, form: str = "code") -> Array:
  """Dice loss per sample over all of its pixels, then the batch mean.

  Args:
    prob: (B, H, W[, 1]) probabilities (sigmoid already applied).
    mask: (B, H, W[, 1]) targets in [0, 1], same shape as `prob`.
    form: 'code' = 1 - (sum pt + 1) / (sum p^2 + sum t^2 + 1) (reference);
      'paper' = 1 - 2 sum pt / (sum p^2 + sum t^2 + 1e-6) (Eq. 7).

  Returns:
    float32 scalar.
  """
  if prob.shape != mask.shape:
    raise ValueError(f"prob {prob.shape} and mask {mask.shape} must have the same shape")
  b = prob.shape[0]
  p = prob.astype(jnp.float32).reshape(b, -1)
  t = mask.astype(jnp.float32).reshape(b, -1)
  inter = jnp.sum(p * t, axis=1)
  denom = jnp.sum(p * p, axis=1) + jnp.sum(t * t, axis=1)
  if form == "code":
    per_sample = 1.0 - (inter + 1.0) / (denom + 1.0)
  elif form == "paper":
    per_sample = 1.0 - 2.0 * inter / (denom + PAPER_DICE_EPS)
  else:
    raise ValueError(f"loss.dice_form must be 'code' or 'paper', got {form!r}")
  return jnp.mean(per_sample)


def onenip_loss(outputs: Mapping[str, Optional[Array]], query_clean: Array, masks: Array, *,
                loss_cfg: Any, restoration: bool = True) -> Tuple[Array, Dict[str, Array]]:
  """OneNIP training loss for the training layout [normal; synthetic].

  Args:
    outputs: model outputs with 'recon' (2B, h, w, C) and optionally 'ref_logit' (2B, H, W, 1)
      (absent or None when the refiner is off: no Dice term).
    query_clean: (2B, h, w, C) clean features [F^n; F^a]; the MSE target is [F^n; F^n].
    masks: synthetic-anomaly masks M^a, (B, H, W[, 1]); the refiner target is [zeros; M^a].
      Full (2B, H, W[, 1]) targets are also accepted and used as they are.
    loss_cfg: `config.loss` (dice_weight, dice_form, mse_form; read with `.get`: a ConfigDict or a
      dict).
    restoration: False -> the MSE covers the normal half only.

  Returns:
    (total, {'mse', 'dice' (only with the refiner), 'total'}), float32 scalars.
  """
  recon = outputs["recon"]
  bq = recon.shape[0]
  if bq % 2 or query_clean.shape[0] != bq:
    raise ValueError(f"expected the training layout [normal; synthetic]: recon {recon.shape}, "
                     f"query_clean {query_clean.shape}")
  b = bq // 2
  normal = query_clean[:b]
  mse_form = loss_cfg.get("mse_form", "code")
  l_rec = feature_mse(recon[:b], normal)
  if not restoration:
    mse = l_rec
  else:
    l_res = feature_mse(recon[b:], normal)
    if mse_form == "code":
      mse = 0.5 * (l_rec + l_res)        # = mean over both halves (equal sizes)
    elif mse_form == "paper":
      mse = l_rec + l_res
    else:
      raise ValueError(f"loss.mse_form must be 'code' or 'paper', got {mse_form!r}")
  terms = {"mse": mse}
  total = mse
  logit = outputs.get("ref_logit")
  if logit is not None:
    m = masks.astype(jnp.float32)
    if m.ndim == 3:
      m = m[..., None]
    if m.shape[0] == b:
      m = jnp.concatenate([jnp.zeros_like(m), m])
    if m.shape != logit.shape:
      raise ValueError(f"masks {masks.shape} do not match ref_logit {logit.shape}")
    dice = dice_loss(jax.nn.sigmoid(logit.astype(jnp.float32)), m,
                     loss_cfg.get("dice_form", "code"))
    terms["dice"] = dice
    total = total + jnp.float32(loss_cfg.get("dice_weight", 0.5)) * dice
  terms["total"] = total
  return total, terms
