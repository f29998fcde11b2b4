r"""How stable the calibration's choice is across independent synthetic draws (validation data only).

  python -m launch.calibration_stability --workdir runs/real638 [--per-image 8] [--draw 2] \
      [--config.KEY=VALUE ...]

Collects the validation maps of the run's newest checkpoint with `--per-image` synthetic anomalies
per held-out image (`holdout.validation_groups`: copy j of image r is seeded by its position,
so copies 0..draw-1 are exactly the validation set of `calibration.synthetic_per_image=draw`, and
every further block of `draw` copies is an independent one), then runs `calibration.calibrate`
on each block (with the same held-out normals) and on all copies, and prints each choice (the
global one on these maps too). Reads no test image. Overrides (e.g.
`--config.eval.prompt_mode=pool`) apply to the stored config.
"""
import argparse
import time

import numpy as np

from onenip_jax import sharding
from onenip_jax.evaluation import calibration, holdout, restore


def copies(groups: dict, keep) -> dict:
  """`groups` with the held-out normals and only the synthetic copies in `keep`."""
  out = {}
  for c, g in groups.items():
    n = int(g["normal"].sum())
    j = np.full(len(g["label"]), -1)
    j[n:] = np.arange(len(g["label"]) - n) // n
    rows = (j == -1) | np.isin(j, list(keep))
    out[c] = {key: v[rows] for key, v in g.items()}
  return out


def describe(params: dict) -> str:
  if params["ref_space"] == "probability":
    return f"probability map (obj {100 * params['objective']:.2f})"
  return f"w = {params['weight']:.1f}, log-odds (obj {100 * params['objective']:.2f})"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--per-image", type=int, default=8)
  parser.add_argument("--draw", type=int, default=2)
  args, overrides = parser.parse_known_args()
  if args.per_image % args.draw:
    parser.error(f"--per-image {args.per_image} is not a multiple of --draw {args.draw}")
  start = time.time()
  mesh = sharding.make_mesh()
  trained = restore.load_checkpoint(args.workdir, mesh, overrides=overrides)
  cfg, index, step = trained.cfg, trained.index, trained.step
  with cfg.unlocked():
    cfg.calibration.synthetic_per_image = args.per_image
  predictor = trained.predictor_for(cfg.eval.prompt_mode)
  groups = dict(holdout.validation_groups(cfg, predictor, index))  # all classes, reused
  print(f"step {step}, {cfg.eval.prompt_mode} prompts, maps collected in {time.time() - start:.0f} s")
  sets = [(f"copies {i}-{i + args.draw - 1}", range(i, i + args.draw))
          for i in range(0, args.per_image, args.draw)]
  sets.append((f"all {args.per_image}", range(args.per_image)))
  print("| validation set | " + " | ".join(list(groups) + ["global"]) + " |")
  print("|---" * (len(groups) + 2) + "|")
  for name, keep in sets:
    res = calibration.calibrate(copies(groups, keep), cfg.calibration, int(cfg.eval.pool_size),
                                prompt_mode=cfg.eval.prompt_mode)
    cells = [describe(res["per_class"][c]) for c in groups] + [describe(res["global"])]
    print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
  main()
