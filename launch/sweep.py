r"""Expands a grid over config keys into runs, each with its own work directory.

  python -m launch.sweep --config configs/ablation.py --workdir runs/abl \
      --grid 'arg.variant=uniad,full' --grid 'seed=133,134' [--print] [--config.KEY=VALUE ...]
  python -m launch.sweep ... --grid "data.classes=('bottle',),('bottle','magnetic_tile')" \
      --slurm --sbatch-args='--nodes=1 --partition=gpu' [--wait]

`--grid KEY=V1,V2,...` may repeat; the runs are the Cartesian product. Values are split at the
commas outside brackets and quotes, so a value may be a tuple or a quoted string with commas.
`arg.NAME` sets the config file's argument (`configs/X.py:NAME=V`, no commas), any other KEY is
a config override (`--config.KEY=V`); further flags go to every run. Each run's work directory is
`<workdir>/<key>=<value>,...` (quotes and spaces of the values left out).

A run is finished when training wrote its marker (`onenip_jax/training/finished.py`, after the final
evaluation) and the config of that evaluation is the one this sweep would run; finished runs are
skipped, so rerunning the sweep resumes it (a run extended with more steps runs again). The runs
execute one after another (`--train-cmd`, default `onenip-train`); a failed run is reported and the
sweep goes on. At the end a table gives every run's status and mean metrics; the exit code is 1 if
a run failed. With --print, one command line per unfinished run goes to stdout (for a cluster
scheduler) and nothing runs.

With --slurm, each unfinished run is one Slurm job instead: `sbatch [--sbatch-args]
launch/slurm.sbatch CONFIG RUN_WORKDIR OVERRIDES` (`--sbatch-script` replaces the script), its
output in `<run>/slurm-<job>.out` and its job id in `<run>/slurm_job`. A run whose job is still
pending or running is not submitted again. The table then shows the jobs submitted; --wait
polls Slurm until they end and shows their results, and rerunning the sweep (or --status, which
submits and runs nothing) shows the table of the finished runs. The exit code is 1 if a
submission failed or, with --wait, if a run did not finish.
"""
import argparse
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import time

from onenip_jax.config import loading
from onenip_jax.training import finished

METRICS = (("i_auroc", "I-AUROC"), ("i_ap", "I-AP"), ("p_auroc", "P-AUROC"), ("p_ap", "P-AP"),
           ("aupro", "AUPRO"))
INTERRUPTED = (128 + 2, 128 + 15)  # a run stopped by SIGINT / SIGTERM (saved): the sweep stops too
SBATCH_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "slurm.sbatch")
JOB_FILE = "slurm_job"  # in a run's workdir: the id of the Slurm job last submitted for it
_CLOSE = {"(": ")", "[": "]", "{": "}"}
LAUNCH_KEYS = ("distributed",)  # how a run was started (launch/slurm.sbatch sets it), not compared
_UNNAMED = re.compile(r"[\s'\"]")  # characters of values left out of run names
_ENDED = ("BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL",
          "OUT_OF_MEMORY", "PREEMPTED", "TIMEOUT")


def split_values(values: str, grid: str = "") -> list[str]:
  """"1,(2,3),'a,b'" -> ['1', '(2,3)', "'a,b'"]: only commas outside brackets and quotes split."""
  out, start, stack, quote = [], 0, [], None
  for i, ch in enumerate(values):
    if quote:
      quote = None if ch == quote else quote
    elif ch in "'\"":
      quote = ch
    elif ch in _CLOSE:
      stack.append(ch)
    elif ch in _CLOSE.values():
      if not stack or _CLOSE[stack.pop()] != ch:
        raise ValueError(f"--grid {grid!r}: unmatched {ch!r} at position {i} of {values!r}")
    elif ch == "," and not stack:
      out.append(values[start:i])
      start = i + 1
  if quote or stack:
    raise ValueError(f"--grid {grid!r}: unclosed {quote or stack[-1]!r} in {values!r}")
  out.append(values[start:])
  if not all(v.strip() for v in out):
    raise ValueError(f"--grid {grid!r}: an empty value in {values!r}")
  return out


def expand(grids: list[str]) -> list[list[tuple[str, str]]]:
  """['a=1,2', 'b=x'] -> [[('a','1'),('b','x')], [('a','2'),('b','x')]]."""
  axes = []
  for g in grids:
    key, sep, values = g.partition("=")
    if not sep or not values:
      raise ValueError(f"--grid {g!r} is not KEY=V1,V2,...")
    axis = [(key, v) for v in split_values(values, g)]
    if key.startswith("arg.") and any("," in v for _, v in axis):
      raise ValueError(f"--grid {g!r}: a config file argument cannot contain ',' "
                       f"(configs/X.py:NAME=V,...); sweep the config key instead")
    axes.append(axis)
  return [list(combo) for combo in itertools.product(*axes)]


def run_spec(config: str, run: list[tuple[str, str]]) -> str:
  """The run's `configs/X.py[:args]`: the sweep's config argument plus the run's `arg.*` values."""
  path, _, base_arg = config.partition(":")
  args = ",".join(filter(None, [base_arg] + [f"{k[4:]}={v}" for k, v in run if k.startswith("arg.")]))
  return path + (":" + args if args else "")


def run_name(run: list[tuple[str, str]]) -> str:
  """'seed=1,data.classes=(bottle,)': keys and values, without quotes and spaces."""
  return ",".join(f"{k}={_UNNAMED.sub('', v)}" for k, v in run) or "default"


def command(config: str, workdir: str, run: list[tuple[str, str]], extra: list[str],
            train_cmd: str = "onenip-train") -> list[str]:
  cmd = shlex.split(train_cmd) + [f"--config={run_spec(config, run)}",
                                  f"--workdir={os.path.join(workdir, run_name(run))}"]
  return cmd + overrides(run) + extra


def overrides(run: list[tuple[str, str]]) -> list[str]:
  return [f"--config.{k}={v}" for k, v in run if not k.startswith("arg.")]


def sbatch_command(config: str, workdir: str, run: list[tuple[str, str]], extra: list[str],
                   sbatch_args: list[str], script: str = SBATCH_SCRIPT) -> list[str]:
  """`sbatch ... SCRIPT CONFIG RUN_WORKDIR OVERRIDES` of one run; the job's output in its folder."""
  run_dir = os.path.join(workdir, run_name(run))
  return (["sbatch", "--parsable", f"--output={os.path.join(run_dir, 'slurm-%j.out')}",
           *sbatch_args, script, run_spec(config, run), run_dir] + overrides(run) + extra)


def job_state(job_id: str) -> tuple[str, str] | None:
  """(state, exit code) of a Slurm job, e.g. ('RUNNING', '0:0'); None if Slurm does not know it."""
  try:
    p = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True,
                       timeout=60, check=False)
  except (OSError, subprocess.TimeoutExpired):
    return None
  fields = dict(f.split("=", 1) for f in p.stdout.split() if "=" in f)
  if p.returncode or "JobState" not in fields:
    return None
  return fields["JobState"], fields.get("ExitCode", "")


def _last_job(workdir: str) -> str | None:
  try:
    with open(os.path.join(workdir, JOB_FILE), encoding="utf-8") as f:
      return f.read().strip() or None
  except OSError:
    return None


def _job_status(job_id: str) -> tuple[bool, str]:
  """(still pending or running, status for the table) of a run's Slurm job."""
  got = job_state(job_id)
  if got is None:
    return False, f"ended without marker (job {job_id})"
  state, code = got
  if state not in _ENDED:
    return True, f"{state.lower()} (job {job_id})"
  return False, f"{state.lower()} (job {job_id}, exit {code})"


def submit(row: dict) -> None:
  """Submits a run's sbatch command; records the job id in the run's folder and the row."""
  os.makedirs(row["workdir"], exist_ok=True)  # Slurm writes the job's output there
  print(f"[sweep] {' '.join(shlex.quote(c) for c in row['cmd'])}", flush=True)
  try:
    p = subprocess.run(row["cmd"], capture_output=True, text=True, timeout=300, check=False)
  except (OSError, subprocess.TimeoutExpired) as e:
    print(f"[sweep] cannot submit {row['workdir']}: {e}", file=sys.stderr, flush=True)
    row["status"] = "not submitted"
    return
  job_id = p.stdout.strip().split(";")[0]
  if p.returncode or not job_id.isdigit():
    print(f"[sweep] sbatch failed with exit code {p.returncode} for {row['workdir']}: "
          f"{(p.stderr or p.stdout).strip()}", file=sys.stderr, flush=True)
    row["status"] = f"sbatch failed ({p.returncode})"
    return
  with open(os.path.join(row["workdir"], JOB_FILE), "w", encoding="utf-8") as f:
    f.write(job_id + "\n")
  print(f"[sweep] submitted job {job_id}: {row['workdir']}", flush=True)
  row.update(job=job_id, active=True, status=f"submitted (job {job_id})")


def wait_for_jobs(rows: list[dict], poll: float) -> None:
  """Polls Slurm until no row's job is pending or running; the rows get the runs' results."""
  while True:
    for r in rows:
      if r.get("active"):
        r["active"], r["status"] = _job_status(r["job"])
        if not r["active"]:
          r["done"] = finished.finished(r["workdir"])
          r["status"] = "finished" if r["done"] else r["status"]
          print(f"[sweep] job {r['job']} ended: {r['status']}: {r['workdir']}", flush=True)
    if not any(r.get("active") for r in rows):
      return
    time.sleep(poll)


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
  sweep leaves empty ("", e.g. the demo's data root, which training fills in) and
  `LAUNCH_KEYS` are not compared.
  """
  tokens = overrides(run) + [a for a in extra if loading.is_override(a)]
  try:
    cfg = loading.load_config(run_spec(config, run), tokens)
  except Exception:  # pylint: disable=broad-except
    return None
  want = _flat(json.loads(cfg.to_json_best_effort()))
  have = _flat(done["metrics"].get("config") or {})
  return sorted(k for k, v in want.items()
                if v not in ("", None) and k not in LAUNCH_KEYS and have.get(k) != v)


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
  parser.add_argument("--grid", action="append", default=[],
                      help="KEY=V1,V2,... (repeatable; commas in brackets or quotes do not split)")
  parser.add_argument("--print", action="store_true", help="print the commands instead of running")
  parser.add_argument("--train-cmd", default="onenip-train",
                      help="the training command (e.g. 'python -m onenip_jax.cli train')")
  parser.add_argument("--slurm", action="store_true",
                      help="submit each unfinished run as a Slurm job instead of running it")
  parser.add_argument("--sbatch-args", action="append", default=[],
                      help="with --slurm: sbatch options, one string, e.g. "
                      "--sbatch-args='--nodes=2 --partition=gpu' (repeatable)")
  parser.add_argument("--sbatch-script", default=SBATCH_SCRIPT,
                      help="with --slurm: the batch script, called with CONFIG WORKDIR OVERRIDES")
  parser.add_argument("--wait", action="store_true",
                      help="with --slurm: wait until the submitted jobs end, then show the table")
  parser.add_argument("--poll", type=float, default=30, help="with --wait: seconds between polls")
  parser.add_argument("--status", action="store_true",
                      help="only show the table of the runs (finished, or their Slurm job's state)")
  args, extra = parser.parse_known_args(argv)
  if (args.sbatch_args or args.wait) and not args.slurm:
    parser.error("--sbatch-args and --wait go with --slurm")
  sbatch_args = [a for s in args.sbatch_args for a in shlex.split(s)]
  rows = []
  for run in expand(args.grid):
    if args.slurm:
      cmd = sbatch_command(args.config, args.workdir, run, extra, sbatch_args, args.sbatch_script)
    else:
      cmd = command(args.config, args.workdir, run, extra, args.train_cmd)
    workdir = os.path.join(args.workdir, run_name(run))
    done = finished.finished(workdir)
    changes = config_changes(args.config, run, extra, done) if done else None
    if changes:
      print(f"[sweep] {workdir} finished with another config ({', '.join(changes)}): running it "
            "again", file=sys.stderr)
      done = None
    row = {"name": run_name(run), "workdir": workdir, "cmd": cmd, "done": done,
           "status": "finished before" if done else "not run"}
    job = None if done else _last_job(workdir)
    if job:
      row["job"] = job
      row["active"], row["status"] = _job_status(job)
    rows.append(row)
  names = [r["name"] for r in rows]
  if len(set(names)) < len(names):
    raise ValueError(f"two runs of the grid share a work directory name: {names}")
  if args.status:
    print(summary_table(rows))
    return 0
  if args.print:
    for r in rows:
      if r["done"] or r.get("active"):
        print(f"[sweep] {r['status']}: {r['workdir']}", file=sys.stderr)
      else:
        print(" ".join(shlex.quote(c) for c in r["cmd"]))
    return 0
  if args.slurm:
    return _submit_all(rows, args.wait, args.poll)
  for r in rows:
    if r["done"] or r.get("active"):
      print(f"[sweep] {r['status']}: {r['workdir']}", flush=True)
      continue
    print(f"[sweep] {' '.join(shlex.quote(c) for c in r['cmd'])}", flush=True)
    try:
      rc = subprocess.call(r["cmd"])
    except (OSError, KeyboardInterrupt) as e:
      rc = 128 + 2 if isinstance(e, KeyboardInterrupt) else 127
      if rc == 127:
        print(f"[sweep] cannot start {r['cmd'][0]!r}: {e}", file=sys.stderr)
    r["done"] = finished.finished(r["workdir"]) if rc == 0 else None
    r["status"] = ("finished" if r["done"] else "exit 0, no marker") if rc == 0 else (
        f"interrupted ({rc})" if rc in INTERRUPTED else f"failed ({rc})")
    if rc:
      print(f"[sweep] run failed with exit code {rc}: {r['workdir']}", file=sys.stderr, flush=True)
    if rc in INTERRUPTED:
      break
  print("\n" + summary_table(rows))
  return 0 if all(r["done"] for r in rows) else 1


def _submit_all(rows: list[dict], wait: bool, poll: float) -> int:
  """--slurm: submits every run neither finished nor pending/running; with `wait`, waits."""
  for r in rows:
    if r["done"] or r.get("active"):
      print(f"[sweep] {r['status']}: {r['workdir']}", flush=True)
    else:
      submit(r)
  submitted = all(r["done"] or r.get("active") for r in rows)
  if wait:
    try:
      wait_for_jobs(rows, poll)
    except KeyboardInterrupt:
      print("[sweep] stopped waiting; the jobs go on", flush=True)
      print("\n" + summary_table(rows))
      return 128 + 2
  print("\n" + summary_table(rows))
  return 0 if (all(r["done"] for r in rows) if wait else submitted) else 1


if __name__ == "__main__":
  sys.exit(main())
