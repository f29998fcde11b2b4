r"""Time and memory of the calibration on a synthetic validation set of VisA's size.

  python -m launch.bench_calibration [--res 224 320] [--classes 12] [--normals 866] \
      [--per-image 8] [--impl new|old] [--old-rev 6a76fd3] [--check]

Makes, one class at a time on access, the validation maps `calibration.calibrate` reads:
`--normals` held-out normal images spread over `--classes` classes and `--per-image` synthetic
anomalies (a random rectangle seen by both maps) made from each, at each `--res`; the time
includes making them (once per class for old, the normals twice for new, as in training). Each
(impl, res) runs in a fresh process and prints one markdown row: the wall time of the
calibration (the first class's compilation included), the process's peak resident host memory
(ru_maxrss) and that above the process after imports, and the device's peak memory where it
reports one (`jax.devices()[0].memory_stats()`; on the CPU backend device arrays are host memory,
counted in ru_maxrss).

`--check` instead runs both on the same maps in one process and prints the largest difference of
any candidate's figures and whether every choice is the same.

`--impl old` runs the in-memory numpy calibration of commit `--old-rev` (its
onenip_jax/calibration.py read with `git show`, so the repository's history is needed) on the
same maps, all classes held at once as its `validation.validation_groups` held them; both add
the reference fusion's figures, as a run with a fusion constant does. Scale down with e.g.
`--classes 3 --normals 12 --per-image 2 --res 64`.
"""
import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
import types
from collections.abc import Mapping

import jax
import numpy as np

from onenip_jax.config import base as base_lib
from onenip_jax.evaluation import calibration, metrics

REFERENCE = (1.0, 0.5, 16)  # c, alpha, box of the reference fusion's figures


class SyntheticGroups(Mapping):
  """{class: validation maps} of `n` held-out normals per class and `k` synthetic copies each,
  made on access (deterministic per class); with `normals_only` just the normals' 'rec', 'ref'
  and 'source' (as `holdout.ValidationMaps`)."""

  def __init__(self, counts, k: int, res: int, normals_only: bool = False):
    self.counts, self.k, self.res, self.normals_only = dict(counts), k, res, normals_only

  def __iter__(self):
    return iter(self.counts)

  def __len__(self):
    return len(self.counts)

  def _maps(self, rec, ref, mask, seed, anomalous: bool) -> None:
    """Fills rec, ref (rows, res, res) float32 and mask (rows, res, res) bool in place."""
    res, rng = self.res, np.random.default_rng(seed)
    for r in range(len(mask) if anomalous else 0):
      h, w = rng.integers(res // 16, res // 3, 2)
      y, x = rng.integers(0, res - h), rng.integers(0, res - w)
      mask[r, y:y + h, x:x + w] = True
    rng.standard_normal(out=rec, dtype=np.float32)
    rec += mask * rng.uniform(0.0, 2.0, (len(mask), 1, 1)).astype(np.float32)
    rng.standard_normal(out=ref, dtype=np.float32)
    ref *= 3.0
    ref += 5.0 * mask - 8.0
    np.negative(ref, out=ref)
    np.exp(ref, out=ref)
    ref += 1.0
    np.reciprocal(ref, out=ref)  # sigmoid: nearly binary, as the refiner's

  def __getitem__(self, cls):
    n, k, i, res = self.counts[cls], self.k, int(cls[1:]), self.res
    rows = n if self.normals_only else n * (k + 1)
    rec, ref = (np.empty((rows, res, res), np.float32) for _ in range(2))
    mask = np.zeros((rows, res, res), bool)
    self._maps(rec[:n], ref[:n], mask[:n], (i, 0), False)
    if self.normals_only:
      return {"rec": rec, "ref": ref, "source": np.arange(n)}
    self._maps(rec[n:], ref[n:], mask[n:], (i, 1), True)  # written in place: one copy of the maps
    return {"rec": rec, "ref": ref, "mask": mask,
            "label": mask.reshape(rows, -1).any(axis=1).astype(np.int32),
            "normal": np.arange(rows) < n, "source": np.arange(rows) % n}


def class_counts(classes: int, normals: int) -> dict:
  """`normals` split over `classes` as evenly as possible: {"c0": n0, ...}."""
  return {f"c{i}": normals // classes + (i < normals % classes) for i in range(classes)}


def _module_at(rev: str, path: str, given: dict | None = None) -> types.ModuleType:
  """The file `path` (e.g. onenip_jax/scoring.py) of git revision `rev`, as a module. `given`
  ({name: module}) stands in for the file's `from onenip_jax import name, ...` lines: that
  revision's flat module names, which today's packages no longer have."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    src = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=root, capture_output=True,
                         text=True, check=True).stdout
  except (OSError, subprocess.CalledProcessError) as e:
    raise RuntimeError(f"--impl old needs the git history with {rev} in {root}: {e}") from e
  module = types.ModuleType(f"{os.path.basename(path)[:-3]}_{rev}")
  if given:
    module.__dict__.update(given)
    src = re.sub(r"^from onenip_jax import ([\w, ]+)$",
                 lambda m: "" if {n.strip() for n in m.group(1).split(",")} <= set(given)
                 else m.group(0), src, flags=re.M)
  exec(compile(src, f"{rev}:{path}", "exec"), module.__dict__)  # pylint: disable=exec-used
  return module


def old_module(rev: str) -> types.ModuleType:
  """onenip_jax/calibration.py of git revision `rev`, calling that revision's scoring.py and
  today's metrics."""
  return _module_at(rev, "onenip_jax/calibration.py",
                    {"metrics": metrics, "scoring": _module_at(rev, "onenip_jax/scoring.py")})


def _figures(result: dict) -> dict:
  """{(params name, ref_space, weight, pool_size, key): value} of every candidate's figures, the
  choices and the reference fusion's figures of a calibration."""
  out = {}
  for name, p in list(result["per_class"].items()) + [("global", result["global"])]:
    for c in p["candidates"]:
      for key in ("i_auroc", "i_ap", "p_auroc", "p_ap", "objective", "se"):
        out[(name, c["ref_space"], c["weight"], c["pool_size"], key)] = c[key]
    for key in ("weight", "pool_size", "rec_mean", "rec_std", "ref_mean", "ref_std"):
      out[(name, "chosen", key)] = p[key]
    out[(name, "chosen", "ref_space")] = p["ref_space"]
    for key, value in p.get("reference_validation", {}).items():
      out[(name, "reference", key)] = value
  return out


def check(args) -> None:
  """Both implementations on the same maps in this process: prints the largest difference of any
  figure and whether every choice is the same."""
  cfg = base_lib.get_base_config().calibration
  groups = dict(SyntheticGroups(class_counts(args.classes, args.normals), args.per_image,
                                args.res[0]))
  old = old_module(args.old_rev)
  want = old.calibrate(groups, cfg, 16)
  old.add_reference_figures(want, groups, *REFERENCE)
  got = _figures(json.loads(json.dumps(calibration.calibrate(groups, cfg, 16,
                                                             reference=REFERENCE))))
  want = _figures(json.loads(json.dumps(want)))
  assert set(got) == set(want), set(got) ^ set(want)
  diffs = {k: abs(got[k] - want[k]) for k in want if isinstance(want[k], float)}
  same = all(got[k] == want[k] for k in want if not isinstance(want[k], float))
  worst = max(diffs, key=diffs.get)
  print(f"{len(diffs)} figures: largest difference {diffs[worst]:.3g} at {worst}; "
        f"the same choices: {same}")


def _rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def run_one(args) -> dict:
  """One (impl, res) in this process: {impl, res, maps, seconds, host_gib, host_above_gib,
  device_gib, global}."""
  cfg = base_lib.get_base_config().calibration
  counts = class_counts(args.classes, args.normals)
  groups = SyntheticGroups(counts, args.per_image, args.res)
  jax.numpy.zeros(1).block_until_ready()
  base = _rss_gib()
  start = time.perf_counter()
  if args.impl == "old":
    try:
      old = old_module(args.old_rev)
    except RuntimeError as e:
      sys.exit(str(e))
    held = dict(groups)  # every class at once, as its validation_groups returned them
    result = old.calibrate(held, cfg, 16)
    old.add_reference_figures(result, held, *REFERENCE)
    del held
  else:
    result = calibration.calibrate(
        groups, cfg, 16, reference=REFERENCE,
        normals=SyntheticGroups(counts, args.per_image, args.res, normals_only=True))
  seconds = time.perf_counter() - start
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  g = result["global"]
  return {"impl": args.impl, "res": args.res, "maps": args.normals * (args.per_image + 1),
          "seconds": seconds, "host_gib": _rss_gib(), "host_above_gib": _rss_gib() - base,
          "device_gib": None if peak is None else peak / 2**30,
          "global": f"{g['ref_space']} w={g['weight']:g} box {g['pool_size']} "
                    f"obj {100 * g['objective']:.3f}"}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--res", type=int, nargs="+", default=[224, 320])
  parser.add_argument("--classes", type=int, default=12)
  parser.add_argument("--normals", type=int, default=866)
  parser.add_argument("--per-image", type=int, default=8)
  parser.add_argument("--impl", choices=("new", "old"), nargs="+", default=["new"])
  parser.add_argument("--old-rev", default="6a76fd3")
  parser.add_argument("--check", action="store_true",
                      help="compare every figure of new and old on the same maps (first --res)")
  parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.check:
    check(args)
    return
  if args.one:
    args.res, args.impl = args.res[0], args.impl[0]
    print(json.dumps(run_one(args)))
    return
  print(f"# {args.classes} classes, {args.normals} held-out normals, {args.per_image} synthetic "
        f"each; device {os.environ.get('JAX_PLATFORMS') or 'default'}")
  print("| impl | res | maps | time (s) | peak host (GiB) | above imports (GiB) | "
        "peak device (GiB) | global choice |")
  print("|---|---|---|---|---|---|---|---|")
  for res in args.res:
    for impl in args.impl:
      cmd = [sys.executable, "-m", "launch.bench_calibration", "--one", "--res", str(res),
             "--classes", str(args.classes), "--normals", str(args.normals), "--per-image",
             str(args.per_image), "--impl", impl, "--old-rev", args.old_rev]
      out = subprocess.run(cmd, capture_output=True, text=True, check=False,
                           cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
      if out.returncode:
        print(f"| {impl} | {res} | failed: {out.stderr.strip().splitlines()[-1:]} |||||||")
        continue
      r = json.loads(out.stdout.strip().splitlines()[-1])
      device = "n/a" if r["device_gib"] is None else f"{r['device_gib']:.2f}"
      print(f"| {impl} | {res} | {r['maps']} | {r['seconds']:.1f} | {r['host_gib']:.2f} | "
            f"{r['host_above_gib']:.2f} | {device} | {r['global']} |", flush=True)


if __name__ == "__main__":
  main()
