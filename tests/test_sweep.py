"""launch/sweep.py with a fake `onenip-train` (--train-cmd): finished runs are skipped, a failed run
does not stop the sweep, the summary table, --print. Fast: nothing trains."""
import json
import os
import shlex
import sys

from conftest import REPO
from launch import sweep
from onenip_jax import run_status

FAKE_TRAIN = r"""
import json, os, sys
sys.path.insert(0, {repo!r})
from onenip_jax import config_loading, run_status
args = dict(a.split("=", 1) for a in sys.argv[1:3])
cfg = config_loading.load_config(args["--config"], sys.argv[3:])
workdir = args["--workdir"]
with open({calls!r}, "a") as f:
  f.write(os.path.basename(workdir) + "\n")
if cfg.seed == 666:
  sys.exit(3)
step = cfg.total_steps
out = os.path.join(workdir, "eval", f"step_{{step}}")
os.makedirs(out, exist_ok=True)
mean = {{"i_auroc": cfg.seed / 1000, "i_ap": 0.5, "p_auroc": 0.25, "p_ap": None, "aupro": 0.125}}
with open(os.path.join(out, "metrics.json"), "w") as f:
  json.dump({{"classes": {{}}, "mean": mean, "step": step,
             "config": json.loads(cfg.to_json_best_effort())}}, f)
run_status.mark_finished(workdir, step, out)
"""


def _sweep(tmp_path, *extra):
  fake = tmp_path / "fake_train.py"
  calls = tmp_path / "calls.txt"
  fake.write_text(FAKE_TRAIN.format(repo=str(REPO), calls=str(calls)))
  argv = ["--config", str(REPO / "configs" / "demo.py"), "--workdir", str(tmp_path / "runs"),
          "--grid", "seed=1,666,2", "--train-cmd", f"{shlex.quote(sys.executable)} {fake}",
          "--config.total_steps=5", *extra]
  before = calls.read_text().split() if calls.exists() else []
  rc = sweep.main(argv)
  after = calls.read_text().split() if calls.exists() else []
  return rc, after[len(before):]


def test_sweep_skips_finished_runs_and_goes_on_after_a_failure(tmp_path, capsys):
  rc, ran = _sweep(tmp_path)
  assert rc == 1 and ran == ["seed=1", "seed=666", "seed=2"]  # went on after the failed run
  table = capsys.readouterr().out.split("\n| run |")[1].splitlines()
  assert table[2:] == ["| seed=1 | finished | 5 | 0.10 | 50.00 | 25.00 | - | 12.50 |",
                       "| seed=666 | failed (3) | - | - | - | - | - | - |",
                       "| seed=2 | finished | 5 | 0.20 | 50.00 | 25.00 | - | 12.50 |"]
  assert run_status.finished(str(tmp_path / "runs" / "seed=1"))["step"] == 5

  rc, ran = _sweep(tmp_path)  # again: only the failed run runs
  assert rc == 1 and ran == ["seed=666"]
  assert "| seed=1 | finished before | 5 |" in capsys.readouterr().out

  rc, ran = _sweep(tmp_path, "--print")  # one command per unfinished run, nothing runs
  out = capsys.readouterr().out.strip().splitlines()
  assert rc == 0 and ran == [] and len(out) == 1
  assert shlex.split(out[0])[-3:] == [f"--workdir={tmp_path / 'runs' / 'seed=666'}",
                                      "--config.seed=666", "--config.total_steps=5"]

  rc, ran = _sweep(tmp_path, "--config.total_steps=7")  # longer runs: finished ones run again
  assert ran == ["seed=1", "seed=666", "seed=2"]


def test_evaluation_without_marker_is_not_finished(tmp_path):
  """A periodic or interrupted evaluation's metrics.json alone does not mark a run finished."""
  workdir = tmp_path / "run"
  (workdir / "eval" / "step_4").mkdir(parents=True)
  (workdir / "eval" / "step_4" / "metrics.json").write_text(json.dumps({"mean": {}}))
  assert run_status.finished(str(workdir)) is None
  run_status.mark_finished(str(workdir), 4, str(workdir / "eval" / "step_4"))
  assert run_status.finished(str(workdir)) == {"step": 4, "metrics": {"mean": {}}}
  os.remove(workdir / "eval" / "step_4" / "metrics.json")  # the metrics it names must exist
  assert run_status.finished(str(workdir)) is None
