"""launch/sweep.py with a fake `onenip-train` (--train-cmd): finished runs are skipped, a failed run
does not stop the sweep, the summary table, --print. Fast: nothing trains."""
import json
import os
import re
import shlex
import sys

import pytest

from conftest import REPO
from launch import sweep
from onenip_jax.training import finished

FAKE_TRAIN = r"""
import json, os, sys
sys.path.insert(0, {repo!r})
from onenip_jax.config import loading
from onenip_jax.training import finished
args = dict(a.split("=", 1) for a in sys.argv[1:3])
cfg = loading.load_config(args["--config"], sys.argv[3:])
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
finished.mark_finished(workdir, step, out)
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
  assert finished.finished(str(tmp_path / "runs" / "seed=1"))["step"] == 5

  rc, ran = _sweep(tmp_path)  # again: only the failed run runs
  assert rc == 1 and ran == ["seed=666"]
  assert "| seed=1 | finished before | 5 |" in capsys.readouterr().out

  rc, ran = _sweep(tmp_path, "--print")  # one command per unfinished run, nothing runs
  out = capsys.readouterr().out.strip().splitlines()
  assert rc == 0 and ran == [] and len(out) == 1
  assert shlex.split(out[0])[-3:] == [f"--workdir={tmp_path / 'runs' / 'seed=666'}",
                                      "--config.seed=666", "--config.total_steps=5"]

  rc, ran = _sweep(tmp_path, "--config.distributed=True")  # launched otherwise: still finished
  assert ran == ["seed=666"]

  rc, ran = _sweep(tmp_path, "--config.total_steps=7")  # longer runs: finished ones run again
  assert ran == ["seed=1", "seed=666", "seed=2"]


def test_evaluation_without_marker_is_not_finished(tmp_path):
  """A periodic or interrupted evaluation's metrics.json alone does not mark a run finished."""
  workdir = tmp_path / "run"
  (workdir / "eval" / "step_4").mkdir(parents=True)
  (workdir / "eval" / "step_4" / "metrics.json").write_text(json.dumps({"mean": {}}))
  assert finished.finished(str(workdir)) is None
  finished.mark_finished(str(workdir), 4, str(workdir / "eval" / "step_4"))
  assert finished.finished(str(workdir)) == {"step": 4, "metrics": {"mean": {}}}
  os.remove(workdir / "eval" / "step_4" / "metrics.json")  # the metrics it names must exist
  assert finished.finished(str(workdir)) is None


def test_grid_values_split_at_top_level_commas_only():
  runs = sweep.expand(["data.classes=('bottle','magnetic_tile'),('bottle',)", "seed=1,2"])
  assert [dict(r)["data.classes"] for r in runs] == (["('bottle','magnetic_tile')"] * 2
                                                     + ["('bottle',)"] * 2)
  assert [sweep.run_name(r) for r in runs[::2]] == ["data.classes=(bottle,magnetic_tile),seed=1",
                                                    "data.classes=(bottle,),seed=1"]
  assert sweep.split_values("""'a,b',"c,d",[1,(2,3)],{'k': 1}""") == [
      "'a,b'", '"c,d"', "[1,(2,3)]", "{'k': 1}"]
  assert sweep.command("configs/demo.py", "runs", runs[0], [])[-2:] == [
      "--config.data.classes=('bottle','magnetic_tile')", "--config.seed=1"]
  for bad, why in (("k=(1,2", "unclosed '('"), ("k=1),2", "unmatched ')'"),
                   ("k=[1,2)", "unmatched ')'"), ("k='a,b", "unclosed \"'\""),
                   ("k=1,,2", "empty value"),
                   ("arg.variant=(a,b)", "config file argument")):
    with pytest.raises(ValueError, match=re.escape(why)):
      sweep.expand([bad])


def test_a_tuple_value_reaches_the_run_config(tmp_path, capsys):
  """The demo config's classes swept as tuples: each run's stored config has its tuple."""
  fake = tmp_path / "fake_train.py"
  fake.write_text(FAKE_TRAIN.format(repo=str(REPO), calls=str(tmp_path / "calls.txt")))
  argv = ["--config", str(REPO / "configs" / "demo.py"), "--workdir", str(tmp_path / "runs"),
          "--grid", "data.classes=('a','b'),('c',)", "--train-cmd",
          f"{shlex.quote(sys.executable)} {fake}", "--config.total_steps=5"]
  assert sweep.main(argv) == 0
  for name, classes in (("data.classes=(a,b)", ["a", "b"]), ("data.classes=(c,)", ["c"])):
    assert finished.finished(str(tmp_path / "runs" / name))["metrics"]["config"]["data"][
        "classes"] == classes
  assert sweep.main(argv + ["--status"]) == 0
  assert capsys.readouterr().out.count("| finished before | 5 |") == 2
