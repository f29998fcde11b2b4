"""Losses (docs/algorithm.md §9) and scoring (docs/algorithm.md §11) against hand-computed numpy values."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from onenip_jax.evaluation import scoring
from onenip_jax.evaluation.scoring import image_scores, mid_range
from onenip_jax.training.losses import dice_loss, feature_mse, onenip_loss


def _loss_cfg(**kw):
  c = ml_collections.ConfigDict({"dice_weight": 0.5, "dice_form": "code", "mse_form": "code"})
  c.update(kw)
  return c


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


# ------------------------------------------------------------------------------------- Dice


def test_dice_by_hand():
  p = np.array([[[0.5, 1.0], [0.0, 0.25]],
                [[0.2, 0.2], [0.2, 0.2]]], np.float32)[..., None]     # (2, 2, 2, 1)
  t = np.array([[[1.0, 1.0], [0.0, 0.0]],
                [[0.0, 0.0], [0.0, 0.0]]], np.float32)[..., None]
  # sample 0: sum pt = 1.5, sum p^2 = 0.25 + 1 + 0.0625 = 1.3125, sum t^2 = 2
  # sample 1: sum pt = 0, sum p^2 = 4 * 0.04 = 0.16, sum t^2 = 0
  code = np.mean([1 - (1.5 + 1) / (1.3125 + 2 + 1), 1 - 1 / (0.16 + 1)])
  paper = np.mean([1 - 2 * 1.5 / (1.3125 + 2), 1.0])
  np.testing.assert_allclose(dice_loss(jnp.asarray(p), jnp.asarray(t), "code"), code, rtol=1e-6)
  np.testing.assert_allclose(dice_loss(jnp.asarray(p), jnp.asarray(t), "paper"), paper, rtol=1e-6)
  # no mask shape given per channel: (B, H, W) works the same
  np.testing.assert_allclose(dice_loss(p[..., 0], t[..., 0]), code, rtol=1e-6)


def test_dice_random_vs_numpy_and_limits():
  rng = np.random.default_rng(0)
  p = rng.uniform(size=(3, 8, 8, 1)).astype(np.float32)
  t = (rng.uniform(size=(3, 8, 8, 1)) > 0.7).astype(np.float32)
  pf, tf = p.reshape(3, -1), t.reshape(3, -1)
  inter, den = (pf * tf).sum(1), (pf ** 2).sum(1) + (tf ** 2).sum(1)
  np.testing.assert_allclose(dice_loss(p, t, "code"), np.mean(1 - (inter + 1) / (den + 1)),
                             rtol=1e-5)
  np.testing.assert_allclose(dice_loss(p, t, "paper"), np.mean(1 - 2 * inter / den), rtol=1e-5)
  # perfect prediction: paper form 0, code form 1 - (S + 1) / (2S + 1) > 0 (no factor 2)
  assert float(dice_loss(t, t, "paper")) == pytest.approx(0.0, abs=1e-6)
  s = tf.sum(1)
  np.testing.assert_allclose(dice_loss(t, t, "code"), np.mean(1 - (s + 1) / (2 * s + 1)), rtol=1e-5)
  # all-zero prediction and mask: both finite
  z = np.zeros((1, 4, 4, 1), np.float32)
  assert float(dice_loss(z, z, "code")) == pytest.approx(0.0)
  assert float(dice_loss(z, z, "paper")) == pytest.approx(1.0)
  with pytest.raises(ValueError):
    dice_loss(p, t, "other")


# -------------------------------------------------------------------------------------- MSE


def _halves(seed=0, b=2):
  rng = np.random.default_rng(seed)
  fn = rng.normal(size=(b, 3, 3, 5)).astype(np.float32)
  fa = rng.normal(size=(b, 3, 3, 5)).astype(np.float32)
  recon = rng.normal(size=(2 * b, 3, 3, 5)).astype(np.float32)
  return fn, fa, recon


def test_mse_forms():
  fn, fa, recon = _halves()
  q = np.concatenate([fn, fa])
  l_rec = np.mean((recon[:2] - fn) ** 2)
  l_res = np.mean((recon[2:] - fn) ** 2)       # target of the synthetic half: its normal source
  out = {"recon": jnp.asarray(recon)}
  masks = np.zeros((2, 6, 6, 1), np.float32)
  total, terms = onenip_loss(out, q, masks, loss_cfg=_loss_cfg(mse_form="code"))
  np.testing.assert_allclose(total, 0.5 * (l_rec + l_res), rtol=1e-6)
  np.testing.assert_allclose(terms["mse"], np.mean((recon - np.concatenate([fn, fn])) ** 2),
                             rtol=1e-6)
  assert set(terms) == {"mse", "total"}                    # no refiner -> no Dice term
  total, _ = onenip_loss(out, q, masks, loss_cfg=_loss_cfg(mse_form="paper"))
  np.testing.assert_allclose(total, l_rec + l_res, rtol=1e-6)
  for form in ("code", "paper"):
    total, _ = onenip_loss(out, q, masks, loss_cfg=_loss_cfg(mse_form=form), restoration=False)
    np.testing.assert_allclose(total, l_rec, rtol=1e-6)
  np.testing.assert_allclose(feature_mse(recon[:2], fn), l_rec, rtol=1e-6)
  with pytest.raises(ValueError):
    onenip_loss(out, q, masks, loss_cfg=_loss_cfg(mse_form="nope"))


def test_onenip_loss_total_with_refiner():
  fn, fa, recon = _halves(1)
  rng = np.random.default_rng(2)
  logit = rng.normal(size=(4, 6, 6, 1)).astype(np.float32)
  m_a = (rng.uniform(size=(2, 6, 6)) > 0.5).astype(np.float32)
  target = np.concatenate([np.zeros((2, 6, 6, 1), np.float32), m_a[..., None]])
  prob = _sigmoid(logit).reshape(4, -1)
  tf = target.reshape(4, -1)
  dice_code = np.mean(1 - ((prob * tf).sum(1) + 1) / ((prob ** 2).sum(1) + (tf ** 2).sum(1) + 1))
  mse = np.mean((recon - np.concatenate([fn, fn])) ** 2)
  out = {"recon": jnp.asarray(recon), "ref_logit": jnp.asarray(logit), "rec": None}
  q = np.concatenate([fn, fa])
  for masks in (m_a, m_a[..., None], target):     # (B, H, W), (B, H, W, 1), full (2B, H, W, 1)
    total, terms = onenip_loss(out, q, masks, loss_cfg=_loss_cfg(dice_weight=0.5))
    np.testing.assert_allclose(terms["dice"], dice_code, rtol=1e-5)
    np.testing.assert_allclose(terms["mse"], mse, rtol=1e-6)
    np.testing.assert_allclose(total, mse + 0.5 * dice_code, rtol=1e-5)
    assert terms["total"] is total
    assert all(v.dtype == jnp.float32 and v.shape == () for v in terms.values())
  total, terms = onenip_loss(out, q, m_a, loss_cfg=_loss_cfg(dice_weight=2.0, dice_form="paper"))
  dice_paper = np.mean(1 - 2 * (prob * tf).sum(1) / ((prob ** 2).sum(1) + (tf ** 2).sum(1)))
  np.testing.assert_allclose(total, mse + 2.0 * dice_paper, rtol=1e-5)
  # a dict loss config works too; the function is jit-able
  jitted = jax.jit(lambda o, q, m: onenip_loss(o, q, m, loss_cfg={"dice_weight": 0.5})[0])
  np.testing.assert_allclose(jitted({"recon": recon, "ref_logit": logit}, q, m_a),
                             mse + 0.5 * dice_code, rtol=1e-5)


# ------------------------------------------------------------------------------------ scoring


def _box_max_bruteforce(s, k):
  b, h, w = s.shape
  out = np.empty(b)
  for n in range(b):
    best = -np.inf
    for y in range(h - k + 1):
      for x in range(w - k + 1):
        best = max(best, s[n, y:y + k, x:x + k].mean())
    out[n] = best
  return out


@pytest.mark.parametrize("hw,k", [((40, 40), 16), ((33, 21), 5), ((16, 16), 16)])
def test_image_scores_vs_bruteforce(hw, k):
  s = np.random.default_rng(0).uniform(size=(3,) + hw).astype(np.float32)
  s[1, 3, 4] = 50.0                                    # a spike: the max box contains it
  got = np.asarray(image_scores(jnp.asarray(s), pool_size=k))
  want = _box_max_bruteforce(s, k)
  assert got.shape == (3,)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # differs from the plain max
  assert not np.allclose(got, s.reshape(3, -1).max(1))


def test_every_scoring_is_one_vector_of_the_one_score_function():
  rng = np.random.default_rng(1)
  rec = rng.uniform(0, 3, size=(2, 8, 8)).astype(np.float32)
  ref = rng.uniform(size=(2, 8, 8)).astype(np.float32)
  c = mid_range(rec.min(), rec.max())
  np.testing.assert_allclose(c, 0.5 * (rec.min() + rec.max()), rtol=1e-6)

  def score(name, ref=ref, **kw):
    v = scoring.vector(scoring.scoring_params(name, **kw))
    s, img = jax.jit(scoring.score, static_argnums=3)(rec, ref, v, 4)
    np.testing.assert_allclose(img, _box_max_bruteforce(np.asarray(s), 4), rtol=1e-5)
    return np.asarray(s)

  np.testing.assert_allclose(score("reference", c=float(c)), 0.5 * rec + 0.5 * float(c) * ref,
                             rtol=1e-6)
  np.testing.assert_allclose(score("reference", alpha=0.25, c=float(c)),
                             0.75 * rec + 0.25 * float(c) * ref, rtol=1e-6)
  np.testing.assert_array_equal(score("refiner"), ref)
  np.testing.assert_array_equal(score("reconstruction"), rec)
  np.testing.assert_array_equal(score("reconstruction", ref=None), rec)  # no refiner
  cal = {"rec_mean": 1.0, "rec_std": 2.0, "ref_mean": -3.0, "ref_std": 4.0, "weight": 0.3,
         "ref_space": "logodds"}
  logodds = np.log(ref.astype(np.float64) / (1 - ref))
  np.testing.assert_allclose(score("calibrated", calibrated=cal),
                             0.7 * (rec - 1.0) / 2.0 + 0.3 * (logodds + 3.0) / 4.0, rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_array_equal(score("calibrated", calibrated=dict(cal, weight=0.0)),
                                (rec - np.float32(1.0)) / np.float32(2.0))
  np.testing.assert_allclose(score("calibrated", calibrated=dict(cal, ref_space="probability")),
                             0.7 * (rec - 1.0) / 2.0 + 0.3 * (ref + 3.0) / 4.0, rtol=1e-5)
