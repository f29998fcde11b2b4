"""The streamed, on-device calibration makes the choices and figures of the in-memory numpy one it
replaced (commit 6a76fd3), on a small fixture: from a stored golden file, and from that commit's
module when git history is available. Regenerate the golden file with
`PYTHONPATH=. python3 tests/test_calibration_streaming.py` (it needs the history)."""
import json
import pathlib
import re
import subprocess
import sys
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO
from launch import bench_calibration
from onenip_jax.config import base
from onenip_jax.evaluation import calibration, candidates, metrics

OLD_COMMIT = "6a76fd3"
GOLDEN = pathlib.Path(__file__).parent / "data" / "calibration_6a76fd3.json"
REFERENCE = (0.8, 0.5, 8)  # c, alpha, box of the reference fusion's figures
PARAM_KEYS = ("rec_mean", "rec_std", "ref_mean", "ref_std", "ref_space", "weight", "pool_size",
              "objective", "n_normal", "n_synthetic")


def fixture_groups() -> dict:
  """Validation maps of 3 classes of different sizes where both maps see part of each defect:
  n normals, then k synthetic copies of each (rows as `holdout.validation_groups`)."""
  sigmoid = lambda x: 1.0 / (1.0 + np.exp(-x))  # pylint: disable=unnecessary-lambda-assignment
  groups = {}
  for i, (cls, n, k) in enumerate([("a", 6, 3), ("b", 4, 4), ("c", 9, 2)]):
    rng = np.random.default_rng(10 + i)
    rows, size = n * (k + 1), 24
    mask = np.zeros((rows, size, size), bool)
    for r in range(n, rows):
      y, x = rng.integers(0, size - 8, 2)
      h, w = rng.integers(3, 9, 2)
      mask[r, y:y + h, x:x + w] = True
    rec = rng.normal(size=mask.shape) + (1.0 + 0.5 * i) * mask * rng.uniform(0, 2, mask.shape)
    ref = sigmoid(3.0 * rng.normal(size=mask.shape) + 4.0 * mask - 8.0 + i)
    groups[cls] = {"rec": (rec * 20.0 + 50.0).astype(np.float32), "ref": ref.astype(np.float32),
                   "mask": mask, "label": mask.reshape(rows, -1).any(1).astype(np.int32),
                   "normal": np.arange(rows) < n, "source": np.arange(rows) % n}
  return groups


def _cfg():
  cfg = base.get_base_config().calibration
  cfg.pool_sizes = (4, 8)
  return cfg


def _old_module():
  """calibration.py of OLD_COMMIT (with its scoring.py) as a module, or None without the history."""
  try:
    return bench_calibration.old_module(OLD_COMMIT)
  except RuntimeError:
    return None


def _old_output(old) -> dict:
  groups = fixture_groups()
  result = old.calibrate(groups, _cfg(), 8)
  old.add_reference_figures(result, groups, *REFERENCE)
  return json.loads(json.dumps(result))


class _Lazy(Mapping):
  """The fixture made one class at a time on access, counting the reads."""

  def __init__(self):
    self.reads = []

  def __getitem__(self, cls):
    self.reads.append(cls)
    return fixture_groups()[cls]

  def __iter__(self):
    return iter(("a", "b", "c"))

  def __len__(self):
    return 3


def _new_output(groups=None) -> dict:
  result = calibration.calibrate(fixture_groups() if groups is None else groups, _cfg(), 8,
                                 reference=REFERENCE)
  return json.loads(json.dumps(result))


def _assert_same(new: dict, old: dict) -> None:
  items = [(c, new["per_class"][c], old["per_class"][c]) for c in old["per_class"]]
  assert set(new["per_class"]) == set(old["per_class"])
  for name, n, o in items + [("global", new["global"], old["global"])]:
    for key in PARAM_KEYS:
      assert n[key] == pytest.approx(o[key], rel=1e-6, abs=1e-6), (name, key)
    for key in calibration.OBJECTIVE_KEYS:
      assert n["validation"][key] == pytest.approx(o["validation"][key], abs=2e-6), (name, key)
    assert len(n["candidates"]) == len(o["candidates"])
    for a, b in zip(n["candidates"], o["candidates"]):
      where = (name, b["ref_space"], b["weight"], b["pool_size"])
      assert (a["ref_space"], a["weight"], a["pool_size"], a["within_se"]) == (
          b["ref_space"], b["weight"], b["pool_size"], b["within_se"]), where
      for key in calibration.OBJECTIVE_KEYS + ("objective", "se"):
        assert a[key] == pytest.approx(b[key], abs=2e-6), where + (key,)
    ref_n, ref_o = n["reference_validation"], o["reference_validation"]
    for key in calibration.OBJECTIVE_KEYS + ("objective",):
      assert ref_n[key] == pytest.approx(ref_o[key], abs=2e-6), (name, "reference", key)


def test_the_fixture_is_not_trivial():
  old = json.loads(GOLDEN.read_text())
  weights = {p["weight"] for p in list(old["per_class"].values()) + [old["global"]]}
  assert len(weights) > 1 or any(0.0 < w < 1.0 for w in weights)
  objs = [c["objective"] for c in old["global"]["candidates"]]
  assert max(objs) - min(objs) > 0.01


@pytest.mark.parametrize("accelerator, budget", [(False, None), (False, 1), (True, None)])
def test_streamed_calibration_equals_the_golden_file(accelerator, budget, monkeypatch):
  monkeypatch.setattr(candidates, "on_accelerator", lambda: accelerator)  # jnp or numpy
  if budget:  # one thread scores every candidate in the same buffers
    monkeypatch.setattr(candidates, "_HOST_BUDGET", budget)
  _assert_same(_new_output(), json.loads(GOLDEN.read_text()))


def test_streamed_calibration_equals_the_old_module():
  old = _old_module()
  if old is None:
    pytest.skip(f"no git history with commit {OLD_COMMIT}")
  _assert_same(_new_output(), _old_output(old))


def test_a_lazy_mapping_is_read_one_class_at_a_time():
  lazy = _Lazy()
  _assert_same(_new_output(lazy), json.loads(GOLDEN.read_text()))
  assert lazy.reads == ["a", "b", "c"] * 2  # statistics, then scoring


def test_non_finite_maps_name_the_class():
  groups = fixture_groups()
  groups["b"]["rec"][5, 3, 3] = np.nan
  with pytest.raises(ValueError, match="rec maps of class 'b' hold NaN"):
    calibration.calibrate(groups, _cfg(), 8)


def test_benchmark_runs_both_implementations_and_they_choose_alike():
  """launch/bench_calibration.py at a toy scale: the old calibration (read from git) and the new
  one score the same maps and make the same global choice."""
  if _old_module() is None:
    pytest.skip(f"needs the git history with commit {OLD_COMMIT}")
  out = subprocess.run([sys.executable, "-m", "launch.bench_calibration", "--classes", "2",
                        "--normals", "12", "--per-image", "1", "--res", "32", "--impl", "new",
                        "old", "--old-rev", OLD_COMMIT], cwd=REPO, capture_output=True, text=True,
                       timeout=600, check=False)
  rows = [[c.strip() for c in ln.split("|")[1:-1]] for ln in out.stdout.splitlines()
          if ln.startswith(("| new ", "| old "))]
  assert [r[0] for r in rows] == ["new", "old"], out.stdout + out.stderr[-2000:]
  assert rows[0][2] == rows[1][2] == str(12 * (1 + 1)), rows   # maps
  assert rows[0][-1] == rows[1][-1], rows                            # the global choice


def test_benchmark_check_finds_every_figure_equal():
  """`--check`: both calibrations on the same maps of 64 px in one process (many pixels per
  class, saturated refiner probabilities with ties) make the same choices and figures."""
  if _old_module() is None:
    pytest.skip(f"needs the git history with commit {OLD_COMMIT}")
  out = subprocess.run([sys.executable, "-m", "launch.bench_calibration", "--check", "--classes",
                        "2", "--normals", "10", "--per-image", "2", "--res", "64", "--old-rev",
                        OLD_COMMIT], cwd=REPO, capture_output=True, text=True, timeout=600,
                       check=False)
  found = re.search(r"(\d+) figures: largest difference (\S+) at .*; the same choices: (\w+)",
                    out.stdout)
  assert found, out.stdout + out.stderr[-2000:]
  assert int(found[1]) > 100 and float(found[2]) < 2e-6 and found[3] == "True", found[0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_device_and_host_pixel_metrics_equal_the_metrics_module(seed):
  rng = np.random.default_rng(seed)
  n = 3000
  scores = np.round(rng.normal(size=n), 1).astype(np.float32)  # many ties
  labels = rng.uniform(size=n) < 0.2 + 0.3 * (scores > 0.5)
  fold = rng.integers(0, 3, n)
  order = np.argsort(-scores, kind="stable")
  for member in [np.ones(n, bool)] + [fold == k for k in range(3)]:
    got = candidates._sorted_auroc_ap(  # pylint: disable=protected-access
        jnp.asarray(scores[order]), jnp.asarray(labels[order]), jnp.asarray(member[order]))
    want = metrics.pixel_auroc_ap(scores[member], labels[member])
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-6, atol=1e-7)
    host = candidates.sorted_auroc_ap(np.sort(scores[member & ~labels]),
                                      np.sort(scores[member & labels]))
    np.testing.assert_allclose(host, want, rtol=1e-12)
  assert np.all(np.isnan(candidates.sorted_auroc_ap(np.sort(scores), scores[:0])))
  got = candidates._sorted_auroc_ap(  # pylint: disable=protected-access
      jnp.asarray(scores[order]), jnp.zeros(n, bool), jnp.ones(n, bool))
  assert np.all(np.isnan(np.asarray(got)))


if __name__ == "__main__":
  module = _old_module()
  if module is None:
    sys.exit(f"needs the git history with commit {OLD_COMMIT}")
  GOLDEN.write_text(json.dumps(_old_output(module), indent=1, sort_keys=True) + "\n")
  print(f"wrote {GOLDEN}")
