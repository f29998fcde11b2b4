r"""Expands a grid over config keys into runs, each with its own work directory.

  python -m launch.sweep --config configs/ablation.py --workdir runs/abl \
      --grid 'arg.variant=uniad,full' --grid 'seed=133,134' [--print]

`--grid KEY=V1,V2,...` may repeat; the runs are the Cartesian product. `arg.NAME` sets the config
file's argument (`configs/X.py:NAME=V`), any other KEY is a config override (`--config.KEY=V`).
Without --print the runs execute locally one after another (`onenip-train`); with --print the
command lines are printed, e.g. to paste into a cluster scheduler. Each run's work directory is
`<workdir>/<key>=<value>,...`; a run whose directory already holds a finished evaluation is skipped.
"""
import argparse
import itertools
import os
import shlex
import subprocess
import sys


def expand(grids: list[str]) -> list[list[tuple[str, str]]]:
  """['a=1,2', 'b=x'] -> [[('a','1'),('b','x')], [('a','2'),('b','x')]]."""
  axes = []
  for g in grids:
    key, sep, values = g.partition("=")
    if not sep or not values:
      raise ValueError(f"--grid {g!r} is not KEY=V1,V2,...")
    axes.append([(key, v) for v in values.split(",")])
  return [list(combo) for combo in itertools.product(*axes)]


def command(config: str, workdir: str, run: list[tuple[str, str]], extra: list[str]) -> list[str]:
  args = ",".join(f"{k[4:]}={v}" for k, v in run if k.startswith("arg."))
  base_cfg = config.partition(":")[2]
  spec = config.partition(":")[0] + (":" + ",".join(filter(None, [base_cfg, args])) if args or base_cfg else "")
  name = ",".join(f"{k}={v}" for k, v in run) or "default"
  cmd = ["onenip-train", f"--config={spec}", f"--workdir={os.path.join(workdir, name)}"]
  cmd += [f"--config.{k}={v}" for k, v in run if not k.startswith("arg.")]
  return cmd + extra


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--grid", action="append", default=[])
  parser.add_argument("--print", action="store_true", help="print the commands instead of running")
  args, extra = parser.parse_known_args(argv)
  runs = [command(args.config, args.workdir, run, extra) for run in expand(args.grid)]
  for cmd in runs:
    line = " ".join(shlex.quote(c) for c in cmd)
    workdir = cmd[2].partition("=")[2]
    if args.print:
      print(line)
      continue
    if os.path.isfile(os.path.join(workdir, "eval", "metrics.json")):
      print(f"[sweep] done already: {workdir}")
      continue
    print(f"[sweep] {line}", flush=True)
    rc = subprocess.call(cmd)
    if rc:
      print(f"[sweep] run failed with exit code {rc}: {workdir}", file=sys.stderr)
      return rc
  return 0


if __name__ == "__main__":
  sys.exit(main())
