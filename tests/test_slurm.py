"""launch/slurm.sbatch and `launch/sweep.py --slurm` under a real one-node Slurm on localhost
(tests/slurm_cluster.py), on CPU: one JAX process with one CPU device per task.

The real batch script with 2 tasks is one run of 2 processes with the losses of one process;
`scancel --signal=TERM` stops both tasks at the same saved step, and submitting again resumes to
those losses. A 2-point sweep (tuple values) becomes 2 jobs and 2 finished runs; rerun, it submits
nothing. Skipped, saying why, where Slurm cannot start (.ci/run installs it)."""
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

from conftest import REPO, train_losses as _losses
from onenip_jax import sharding
from onenip_jax.training import finished
from slurm_cluster import SlurmCluster, Unavailable

STEPS = 6
CONFIG = f"configs/real.py:steps={STEPS},backbone=lite0"
TINY = ["--config.input_size=64", "--config.log_every_steps=1", "--config.ckpt.every_steps=100",
        "--config.eval.fusion_max_images=16", "--config.eval.heatmaps=False",
        "--config.eval.batch_size=32", "--config.calibration.holdout_fraction=0.0"]
ARGS = ["--config.data.classes=('bottle',)", *TINY]
CPU_TASKS = ["--gpus-per-node=0", "--cpus-per-task=1"]  # the script asks for 8 GPUs
SCRIPT = str(REPO / "launch" / "slurm.sbatch")


@pytest.fixture(scope="module")
def cluster():
  """One Slurm cluster for the module, in a folder outside pytest's (munged wants the folders of
  its socket open to all, and pytest's base folder is private)."""
  root = tempfile.mkdtemp(prefix="onenip-slurm-")
  c = SlurmCluster(root, cpus=2)
  try:
    c.start()
  except Unavailable as e:
    c.stop()
    shutil.rmtree(root, ignore_errors=True)
    pytest.skip(f"Slurm cannot run here: {e}")
  yield c
  c.stop()
  shutil.rmtree(root, ignore_errors=True)


def _job_env(cluster) -> dict:
  """CPU jobs: the job gets the submitter's environment (sbatch --export=ALL)."""
  env = cluster.env(JAX_PLATFORMS="cpu", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
                    CUDA_VISIBLE_DEVICES="")
  env.pop("XLA_FLAGS", None)  # one CPU device per process
  return env


def _sbatch(cluster, workdir: str, name: str) -> subprocess.Popen:
  """`sbatch --wait` of the real script with 2 tasks; the job's output in the workdir."""
  os.makedirs(workdir, exist_ok=True)
  cmd = ["sbatch", "--wait", f"--job-name={name}", "--ntasks-per-node=2", *CPU_TASKS,
         f"--output={workdir}/slurm-%j.out", SCRIPT, CONFIG, workdir, *ARGS]
  return subprocess.Popen(cmd, cwd=REPO, env=_job_env(cluster), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _output(workdir: str) -> str:
  """The newest job's output (job ids grow)."""
  paths = sorted(glob.glob(f"{workdir}/slurm-*.out"), key=lambda p: int(re.findall(r"\d+", p)[-1]))
  with open(paths[-1], encoding="utf-8", errors="replace") as f:
    return f.read()


def _task_lines(out: str, task: int) -> list:
  """The lines of one task (srun --label prefixes them with 'N: '; a progress bar's carriage
  returns do not end a line)."""
  return [line.split(": ", 1)[1] for line in out.split("\n")
          if re.match(rf"^\s*{task}: ", line)]


def _saved(lines) -> list:
  return [int(line.split("saved step ")[1].split()[0]) for line in lines if "saved step " in line]


def _checkpoints(workdir) -> list:
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _squeue(cluster, *args) -> str:
  return subprocess.run(["squeue", "-h", *args], env=cluster.env(), capture_output=True,
                        text=True, check=True).stdout.strip()


@pytest.fixture(scope="module")
def runs(cluster, shared_data, tmp_path_factory):
  """One process with 2 CPU devices; the 2-task job stopped by scancel, then submitted again."""
  root = tmp_path_factory.mktemp("slurm")
  reference = str(root / "reference")
  env = dict(_job_env(cluster), XLA_FLAGS="--xla_force_host_platform_device_count=2")
  p = subprocess.run([sys.executable, "-m", "onenip_jax.cli", "train", f"--config={CONFIG}",
                      f"--workdir={reference}", *ARGS], cwd=REPO, env=env, capture_output=True,
                     text=True, timeout=900, check=False)
  assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]

  stopped = str(root / "stopped")
  proc = _sbatch(cluster, stopped, "onenip-stopped")
  t = time.time()
  while not _losses(stopped):  # step 1 logged: both tasks are in the training loop
    assert proc.poll() is None, proc.communicate()[0] + _output(stopped)[-5000:]
    assert time.time() - t < 600, _output(stopped)[-5000:]
    time.sleep(0.05)
  logged = max(_losses(stopped))
  job = _squeue(cluster, "--name=onenip-stopped", "-o", "%i")
  subprocess.run(["scancel", "--signal=TERM", job], env=cluster.env(), check=True)
  proc.communicate(timeout=300)
  result = {"rc": proc.returncode, "logged": logged, "out": _output(stopped),
            "checkpoints": _checkpoints(stopped), "queue": _squeue(cluster)}
  resume = _sbatch(cluster, stopped, "onenip-resumed")
  resume.communicate(timeout=900)
  result.update(resume_rc=resume.returncode, resume_out=_output(stopped))
  return reference, stopped, result


def test_two_tasks_are_one_run_of_two_processes_stopped_together_by_scancel(runs):
  _, _, r = runs
  out = r["out"]
  assert r["rc"] == 143, out[-5000:]  # sbatch --wait: the job's exit code
  exits = re.findall(r"srun: error: localhost: tasks? ([\d,-]+): Exited with exit code (\d+)", out)
  assert sorted(exits) in ([("0", "143"), ("1", "143")], [("0-1", "143")]), out[-5000:]
  for task in (0, 1):
    assert any(f"process {task} of 2: local devices" in line for line in _task_lines(out, task))
  # Process 0's lines after its progress bar lose their label (srun ends a line at the bar's
  # carriage return): the same step saved twice in all, once by task 1.
  saved = _saved(out.split("\n"))
  assert len(saved) == 2 and saved[0] == saved[1] and _saved(_task_lines(out, 1)) == saved[:1], (
      out[-5000:])
  assert r["checkpoints"] == saved[:1]  # ckpt.every_steps=100: only the stop saved
  assert r["logged"] <= saved[0] < STEPS
  assert "Traceback" not in out and r["queue"] == ""  # the job ended


def test_the_resubmitted_job_resumes_to_the_losses_of_one_process(runs):
  reference, stopped, r = runs
  out = r["resume_out"]
  assert r["resume_rc"] == 0, out[-5000:]
  for task in (0, 1):
    assert any(f"process {task} of 2:" in line for line in _task_lines(out, task))
  assert any(f"resumed from step {r['checkpoints'][-1]}" in line for line in _task_lines(out, 0))
  resumed, uninterrupted = _losses(stopped), _losses(reference)
  assert sorted(resumed) == sorted(uninterrupted) == list(range(1, STEPS + 1))
  np.testing.assert_array_equal([resumed[s] for s in range(1, STEPS + 1)],
                                [uninterrupted[s] for s in range(1, STEPS + 1)])
  assert finished.finished(stopped)["step"] == STEPS


def test_a_sweep_runs_as_slurm_jobs_and_a_rerun_submits_nothing(cluster, shared_data, tmp_path):
  workdir = tmp_path / "sweep"
  cmd = [sys.executable, "-m", "launch.sweep", "--config", "configs/real.py:steps=1,backbone=lite0",
         "--workdir", str(workdir), "--grid", "data.classes=('bottle',),('magnetic_tile',)",
         "--slurm", f"--sbatch-args=--ntasks-per-node=1 {' '.join(CPU_TASKS)}", "--wait",
         "--poll=1", *TINY]
  first = subprocess.run(cmd, cwd=REPO, env=_job_env(cluster), capture_output=True, text=True,
                         timeout=900, check=False)
  assert first.returncode == 0, first.stdout[-5000:] + first.stderr[-5000:]
  assert first.stdout.count("[sweep] submitted job") == 2
  for name, cls in (("data.classes=(bottle,)", "bottle"), ("data.classes=(magnetic_tile,)",
                                                           "magnetic_tile")):
    done = finished.finished(str(workdir / name))
    assert done["step"] == 1 and done["metrics"]["config"]["data"]["classes"] == [cls]
    assert f"| {name} | finished | 1 |" in first.stdout
    assert glob.glob(str(workdir / name / "slurm-*.out"))

  again = subprocess.run(cmd, cwd=REPO, env=_job_env(cluster), capture_output=True, text=True,
                         timeout=300, check=False)
  assert again.returncode == 0, again.stdout[-5000:] + again.stderr[-5000:]
  assert "submitted" not in again.stdout and _squeue(cluster) == ""
  assert again.stdout.count("| finished before | 1 |") == 2


def test_each_slurm_task_trains_on_its_own_gpu():
  """sharding.slurm_local_device_ids on the environment Slurm gives a task (no Slurm needed)."""
  task = {"SLURM_STEP_NODELIST": "gpu[01-02]", "SLURM_NODEID": "1", "SLURM_LOCALID": "3",
          "SLURM_PROCID": "11", "SLURM_STEP_TASKS_PER_NODE": "8(x2)",
          "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}
  ids = sharding.slurm_local_device_ids
  assert ids(task) == [3]  # the node's 8 GPUs shared by its 8 tasks (launch/slurm.sbatch)
  assert ids(dict(task, CUDA_VISIBLE_DEVICES="5")) == [0]  # --gpus-per-task=1: its one GPU
  assert ids(dict(task, SLURM_STEP_TASKS_PER_NODE="4,2", CUDA_VISIBLE_DEVICES="0,1")) == [3]
  assert ids(dict(task, CUDA_VISIBLE_DEVICES="")) is None  # CPU: jax decides
  assert ids(dict(task, JAX_PLATFORMS="cpu")) is None
  assert ids({k: v for k, v in task.items() if k != "SLURM_STEP_NODELIST"}) is None  # no step
  with pytest.raises(ValueError, match="sees 8 GPUs .* running 1 tasks.*--ntasks-per-node"):
    ids(dict(task, SLURM_STEP_TASKS_PER_NODE="1(x2)"))  # one process per node: 1 GPU of 8
