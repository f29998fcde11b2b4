r"""Expands a grid over config keys into runs, each with its own work directory.

  python -m launch.sweep --config configs/ablation.py --workdir runs/abl \
      --grid 'arg.variant=uniad,full' --grid 'seed=133,134' [--print] [--config.KEY=VALUE ...]

`--grid KEY=V1,V2,...` may repeat; the runs are the Cartesian product. `arg.NAME` sets the config
file's argument (`configs/X.py:NAME=V`), any other KEY is a config override (`--config.KEY=V`);
further flags go to every run. Each run's work directory is `<workdir>/<key>=<value>,...`.

A run is finished when training wrote its marker (`onenip_jax/run_status.py`, after the final
evaluation) and the config of that evaluation is the one this sweep would run; finished runs are
skipped, so rerunning the sweep resumes it (a run extended with more steps runs again). The runs
execute one after another (`--train-cmd`, default `onenip-train`); a failed run is reported and the
sweep goes on. At the end a table gives every run's status and mean metrics; the exit code is 1 if
a run failed. With --print, one command line per unfinished run goes to stdout (for a cluster
scheduler) and nothing runs.
"""
import argparse
import itertools
import json
import os
import shlex
import subprocess
import sys

from onenip_jax import config_loading, run_status

METRICS = (("i_auroc", "I-AUROC"), ("i_ap", "I-AP"), ("p_auroc", "P-AUROC"), ("p_ap", "P-AP"),
           ("aupro", "AUPRO"))
INTERRUPTED = (128 + 2, 128 + 15)  # a run stopped by SIGINT / SIGTERM (saved): the sweep stops too


def expand(grids: list[str]) -> list[list[tuple[str, str]]]:
  """['a=1,2', 'b=x'] -> [[('a','1'),('b','x')], [('a','2'),('b','x')]]."""
  axes = []
  for g in grids:
    key, sep, values = g.partition("=")
    if not sep or not values:
      raise ValueError(f"--grid {g!r} is not KEY=V1,V2,...")
    axes.append([(key, v) for v in values.split(",")])
  return [list(combo) for combo in itertools.product(*axes)]


def run_spec(config: str, run: list[tuple[str, str]]) -> str:
  """The run's `configs/X.py[:args]`: the sweep's config argument plus the run's `arg.*` values."""
  path, _, base_arg = config.partition(":")
  args = ",".join(filter(None, [base_arg] + [f"{k[4:]}={v}" for k, v in run if k.startswith("arg.")]))
  return path + (":" + args if args else "")


def run_name(run: list[tuple[str, str]]) -> str:
  return ",".join(f"{k}={v}" for k, v in run) or "default"


def command(config: str, workdir: str, run: list[tuple[str, str]], extra: list[str],
            train_cmd: str = "onenip-train") -> list[str]:
  cmd = shlex.split(train_cmd) + [f"--config={run_spec(config, run)}",
                                  f"--workdir={os.path.join(workdir, run_name(run))}"]
  cmd += [f"--config.{k}={v}" for k, v in run if not k.startswith("arg.")]
  return cmd + extra


def _flat(tree, prefix=""):
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flat(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: tree}


def config_changes(config: str, run, extra: list[str], done: dict) -> list[str] | None:
  """Keys whose value in the finished run's config differs from what this sweep asks for.

  None when the requested config cannot be loaded here (then the marker alone decides). Keys the
  sweep leaves empty ("", e.g. the demo's data root, which training fills in) are not compared.
  """
  overrides = [f"--config.{k}={v}" for k, v in run if not k.startswith("arg.")]
  overrides += [a for a in extra if config_loading.is_override(a)]
  try:
    cfg = config_loading.load_config(run_spec(config, run), overrides)
  except Exception:  # pylint: disable=broad-except
    return None
  want = _flat(json.loads(cfg.to_json_best_effort()))
  have = _flat(done["metrics"].get("config") or {})
  return sorted(k for k, v in want.items() if v not in ("", None) and have.get(k) != v)


def _pct(v) -> str:
  return "-" if v is None else f"{100 * v:.2f}"


def summary_table(rows: list[dict]) -> str:
  """Markdown table: run, status, final step and mean metrics (percent) of every run."""
  lines = ["| run | status | step | " + " | ".join(t for _, t in METRICS) + " |",
           "|---|---|---|" + "---|" * len(METRICS)]
  for r in rows:
    mean = (r["done"] or {}).get("metrics", {}).get("mean", {}) if r["done"] else {}
    step = r["done"]["step"] if r["done"] else "-"
    lines.append(f"| {r['name']} | {r['status']} | {step} | "
                 + " | ".join(_pct(mean.get(k)) for k, _ in METRICS) + " |")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True, help="configs/X.py[:args] of every run")
  parser.add_argument("--workdir", required=True, help="parent of the runs' work directories")
  parser.add_argument("--grid", action="append", default=[], help="KEY=V1,V2,... (repeatable)")
  parser.add_argument("--print", action="store_true", help="print the commands instead of running")
  parser.add_argument("--train-cmd", default="onenip-train",
                      help="the training command (e.g. 'python -m onenip_jax.cli train')")
  args, extra = parser.parse_known_args(argv)
  rows = []
  for run in expand(args.grid):
    cmd = command(args.config, args.workdir, run, extra, args.train_cmd)
    workdir = os.path.join(args.workdir, run_name(run))
    done = run_status.finished(workdir)
    changes = config_changes(args.config, run, extra, done) if done else None
    if changes:
      print(f"[sweep] {workdir} finished with another config ({', '.join(changes)}): running it "
            "again", file=sys.stderr)
      done = None
    rows.append({"name": run_name(run), "workdir": workdir, "cmd": cmd, "done": done,
                 "status": "finished before" if done else "not run"})
  if args.print:
    for r in rows:
      if r["done"]:
        print(f"[sweep] finished already: {r['workdir']}", file=sys.stderr)
      else:
        print(" ".join(shlex.quote(c) for c in r["cmd"]))
    return 0
  for r in rows:
    if r["done"]:
      print(f"[sweep] finished already: {r['workdir']}", flush=True)
      continue
    print(f"[sweep] {' '.join(shlex.quote(c) for c in r['cmd'])}", flush=True)
    try:
      rc = subprocess.call(r["cmd"])
    except (OSError, KeyboardInterrupt) as e:
      rc = 128 + 2 if isinstance(e, KeyboardInterrupt) else 127
      if rc == 127:
        print(f"[sweep] cannot start {r['cmd'][0]!r}: {e}", file=sys.stderr)
    r["done"] = run_status.finished(r["workdir"]) if rc == 0 else None
    r["status"] = ("finished" if r["done"] else "exit 0, no marker") if rc == 0 else (
        f"interrupted ({rc})" if rc in INTERRUPTED else f"failed ({rc})")
    if rc:
      print(f"[sweep] run failed with exit code {rc}: {r['workdir']}", file=sys.stderr, flush=True)
    if rc in INTERRUPTED:
      break
  print("\n" + summary_table(rows))
  return 0 if all(r["done"] for r in rows) else 1


if __name__ == "__main__":
  sys.exit(main())
