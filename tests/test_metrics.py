"""Metrics against sklearn, brute force and a straightforward per-region AUPRO reference."""
import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import auc, average_precision_score, roc_auc_score, roc_curve

from onenip_jax.evaluation import metrics as M


def _random_case(seed, n=400, levels=None, pos_rate=0.3):
  rng = np.random.default_rng(seed)
  labels = rng.random(n) < pos_rate
  scores = rng.normal(size=n) + 0.8 * labels
  if levels is not None:  # heavy ties
    scores = np.round(scores * levels) / levels
  return scores.astype(np.float32), labels


@pytest.mark.parametrize("seed,levels", [(0, None), (1, None), (2, 2), (3, 5), (4, 1)])
def test_auroc_ap_match_sklearn_random(seed, levels):
  scores, labels = _random_case(seed, levels=levels)
  assert M.auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-9)
  fpr, tpr, _ = roc_curve(labels, scores)
  assert M.auroc(scores, labels) == pytest.approx(auc(fpr, tpr), abs=1e-9)
  assert M.average_precision(scores, labels) == pytest.approx(
      average_precision_score(labels, scores), abs=1e-9)


@pytest.mark.parametrize("scores,labels", [
    ([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]),
    ([1, 1, 1, 1], [0, 1, 0, 1]),              # all tied
    ([3, 2, 2, 2, 1, 0], [1, 0, 1, 1, 0, 0]),  # ties straddling classes
    ([0.9, 0.8, 0.7, 0.1], [0, 0, 1, 1]),      # worse than random
    ([5, 4, 3, 2], [1, 1, 0, 0]),              # perfect
])
def test_auroc_ap_hand_made(scores, labels):
  s = np.asarray(scores, dtype=np.float64)
  y = np.asarray(labels)
  assert M.auroc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
  assert M.average_precision(s, y) == pytest.approx(average_precision_score(y, s), abs=1e-12)


def test_auroc_known_values_and_flip():
  assert M.auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
  assert M.auroc([0.9, 0.8, 0.7, 0.1], [0, 0, 1, 1]) == pytest.approx(0.0)
  assert M.auroc([0.9, 0.8, 0.7, 0.1], [0, 0, 1, 1], flip=True) == pytest.approx(1.0)
  assert M.auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1], flip=True) == pytest.approx(0.75)
  assert M.auroc([1, 1], [0, 1]) == pytest.approx(0.5)


def _f1_brute(scores, labels):
  best, best_t = 0.0, None
  for t in np.unique(scores):
    pred = scores >= t
    tp = np.sum(pred & labels)
    fp = np.sum(pred & ~labels)
    fn = np.sum(~pred & labels)
    f1 = 2 * tp / (2 * tp + fp + fn)
    if f1 > best:
      best, best_t = f1, t
  return best, best_t


@pytest.mark.parametrize("seed,levels", [(10, None), (11, 3), (12, 1)])
def test_f1_max_brute_force(seed, levels):
  scores, labels = _random_case(seed, n=300, levels=levels)
  f1, thr = M.f1_max(scores, labels)
  ref, ref_t = _f1_brute(scores, labels)
  assert f1 == pytest.approx(ref, abs=1e-12)
  pred = scores >= thr  # the returned threshold reproduces the F1
  tp = np.sum(pred & labels)
  assert 2 * tp / (pred.sum() + labels.sum()) == pytest.approx(f1, abs=1e-12)
  assert thr == pytest.approx(ref_t)


def test_single_class_gives_none():
  s = np.array([0.1, 0.5, 0.9])
  for y in (np.zeros(3), np.ones(3)):
    assert M.auroc(s, y) is None
    assert M.average_precision(s, y) is None
    assert M.f1_max(s, y) == (None, None)
  assert M.auroc([], []) is None


def test_rejects_bad_input():
  with pytest.raises(ValueError):
    M.auroc([0.1, np.nan], [0, 1])
  with pytest.raises(ValueError):
    M.auroc([0.1, 0.2, 0.3], [0, 1])


# ------------------------------------------------------------------------------------------------
# AUPRO.
# ------------------------------------------------------------------------------------------------

def _synthetic_maps(seed, n=10, size=32, levels=None):
  """Maps with several blobs per anomalous image (some touching diagonally) + normal images."""
  rng = np.random.default_rng(seed)
  masks = np.zeros((n, size, size), np.uint8)
  for i in range(n):
    if i % 3 == 2:
      continue  # normal image
    for _ in range(rng.integers(1, 4)):
      r, c = rng.integers(0, size - 6, 2)
      h, w = rng.integers(1, 7, 2)
      masks[i, r:r + h, c:c + w] = 1
  masks[0, 0, 0] = masks[0, 1, 1] = 1  # a diagonal pair: one 8-connected region
  maps = rng.random((n, size, size)) + 0.6 * masks * rng.random((n, 1, 1))
  maps = ndimage.uniform_filter(maps, size=(1, 3, 3))
  if levels is not None:
    maps = np.round(maps * levels) / levels
  return maps.astype(np.float32), masks


def _aupro_reference(maps, masks, thresholds, fpr_limit=0.3):
  """Straightforward PRO curve: loop over thresholds and over every region."""
  regions = []
  for i in range(len(masks)):
    lab, k = ndimage.label(masks[i], structure=np.ones((3, 3)))
    regions += [(i, lab == j) for j in range(1, k + 1)]
  normal = masks == 0
  fprs, pros = [0.0], [0.0]
  for t in sorted(thresholds, reverse=True):
    binary = maps >= t
    fprs.append(np.sum(binary & normal) / np.sum(normal))
    pros.append(np.mean([binary[i][r].mean() for i, r in regions]))
  fprs, pros = np.array(fprs), np.array(pros)
  keep = fprs <= fpr_limit
  x = np.append(fprs[keep], fpr_limit)
  y = np.append(pros[keep], np.interp(fpr_limit, fprs, pros))
  return np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2) / fpr_limit


def test_aupro_exact_on_quantised_maps():
  # With every distinct value as a threshold the reference is exact too: tight agreement.
  maps, masks = _synthetic_maps(0, levels=40)
  ref = _aupro_reference(maps, masks, np.unique(maps))
  assert M.aupro(maps, masks) == pytest.approx(ref, abs=1e-9)
  assert M.aupro(maps, masks, fpr_limit=0.05) == pytest.approx(
      _aupro_reference(maps, masks, np.unique(maps), 0.05), abs=1e-9)


def test_aupro_continuous_maps_vs_fine_grid():
  # The fine-grid reference lacks the in-between thresholds; its discretisation error is small.
  maps, masks = _synthetic_maps(1)
  grid = np.quantile(maps, np.linspace(0, 1, 2001))
  ref = _aupro_reference(maps, masks, grid)
  value = M.aupro(maps, masks)
  assert 0.05 < value < 0.95  # a non-trivial case
  assert value == pytest.approx(ref, abs=5e-4)


def test_aupro_perfect_and_none():
  masks = np.zeros((3, 16, 16), np.uint8)
  masks[0, 2:6, 2:6] = 1
  masks[1, 10:12, 3:9] = 1
  assert M.aupro(masks.astype(np.float32), masks) == pytest.approx(1.0)
  assert M.aupro(np.zeros((2, 8, 8)), np.zeros((2, 8, 8))) is None   # no anomalous pixel
  assert M.aupro(np.zeros((1, 8, 8)), np.ones((1, 8, 8))) is None    # no normal pixel


def test_aupro_regions_weighted_equally():
  # One big fully detected region and one small missed one: PRO = 0.5 in the FPR range.
  masks = np.zeros((1, 40, 40), np.uint8)
  masks[0, 0:20, 0:20] = 1
  masks[0, 30:32, 30:32] = 1
  maps = np.zeros((1, 40, 40), np.float32)
  maps[0, 0:20, 0:20] = 2.0
  maps[0, masks[0] == 0] = np.linspace(0, 1, int(np.sum(masks[0] == 0)))
  maps[0, 30:32, 30:32] = -1.0
  assert M.aupro(maps, masks) == pytest.approx(0.5, abs=1e-3)


# ------------------------------------------------------------------------------------------------
# class_metrics and summarize.
# ------------------------------------------------------------------------------------------------

def test_class_metrics_matches_single_metrics():
  maps, masks = _synthetic_maps(2, n=12)
  labels = M.image_labels_from_masks(masks)
  scores = maps.reshape(len(maps), -1).max(axis=1)
  out = M.class_metrics(scores, labels, maps, masks)
  assert list(out) == list(M.ALL_KEYS)
  assert out["n_images"] == 12
  assert out["i_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-9)
  assert out["i_ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-9)
  assert out["p_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-9)
  p_ap = average_precision_score(masks.ravel(), maps.ravel())
  assert out["p_ap"] == pytest.approx(p_ap, abs=1e-9)
  assert out["aupro"] == pytest.approx(M.aupro(maps, masks), abs=1e-12)
  assert out["i_f1max"] == pytest.approx(_f1_brute(scores, labels > 0)[0])
  assert out["p_f1max"] == pytest.approx(_f1_brute(maps.ravel(), masks.ravel() > 0)[0])
  for k in M.METRIC_KEYS:
    assert 0.0 <= out[k] <= 1.0


def test_class_metrics_none_cases_and_flip():
  out = M.class_metrics([0.3, 0.1, 0.2], [0, 0, 0])
  assert out == {**dict.fromkeys(M.METRIC_KEYS), "n_images": 3}
  maps = np.random.default_rng(0).random((2, 8, 8)).astype(np.float32)
  out = M.class_metrics([0.9, 0.1], [0, 1], maps, np.zeros((2, 8, 8)))
  assert out["i_auroc"] == 0.0 and out["p_auroc"] is None and out["aupro"] is None
  assert M.class_metrics([0.9, 0.1], [0, 1], flip_auroc=True)["i_auroc"] == 1.0


def test_summarize_means_ignore_none():
  a = {**dict.fromkeys(M.METRIC_KEYS, 0.5), "n_images": 10}
  b = {**dict.fromkeys(M.METRIC_KEYS, 1.0), "n_images": 5, "aupro": None}
  c = {**dict.fromkeys(M.METRIC_KEYS, 0.0), "n_images": 1, "aupro": None, "p_ap": None}
  s = M.summarize({"a": a, "b": b, "c": c})
  assert s["classes"]["b"] == b
  assert s["mean"]["i_auroc"] == pytest.approx(0.5)
  assert s["mean"]["p_ap"] == pytest.approx(0.75)
  assert s["mean"]["aupro"] == pytest.approx(0.5)
  assert s["mean"]["n_images"] == 16
  assert M.summarize({"c": c})["mean"]["aupro"] is None


def test_packed_sort_path_equals_argsort_path():
  """float32 maps take the packed-key sort; float64 the argsort: same metrics, incl. ties, negative
  scores and -0.0 (equal to +0.0)."""
  rng = np.random.default_rng(3)
  maps = rng.normal(size=(6, 20, 20)).astype(np.float32)
  maps[:, :5] = np.round(maps[:, :5], 1)          # many ties
  maps[0, 0, :4] = (-0.0, 0.0, -0.0, 0.0)
  masks = np.zeros(maps.shape, bool)
  masks[1, 3:9, 4:8] = masks[2, 10:12, 1:19] = masks[4, 0:3, 0:3] = True
  maps[masks] += 0.7
  scores, labels = maps.max(axis=(1, 2)), masks.any(axis=(1, 2))
  fast = M.class_metrics(scores, labels, maps, masks)
  slow = M.class_metrics(scores, labels, maps.astype(np.float64), masks)
  for key in M.METRIC_KEYS:
    assert fast[key] == pytest.approx(slow[key], abs=1e-12), key
  assert M.pixel_auroc_ap(maps, masks) == pytest.approx((slow["p_auroc"], slow["p_ap"]), abs=1e-12)
  keys, payload = M._sort_with_payload(maps.reshape(-1), np.arange(maps.size, dtype=np.uint32))  # pylint: disable=protected-access
  assert np.array_equal(M._keys_to_scores(keys), maps.reshape(-1)[payload] + np.float32(0))  # pylint: disable=protected-access
  assert np.all(np.diff(M._keys_to_scores(keys)) <= 0)  # pylint: disable=protected-access
