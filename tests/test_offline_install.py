"""The offline install: `pip install onenip-jax` without extras runs `onenip-predict --exported` and
`onenip-eval --exported` with the scores of the full install, imports neither flax, TensorFlow nor
Orbax, and every command that needs the training stack ends in one line naming the `train` extra.

The venv test builds a fresh virtual environment (no system site packages) and installs a copy of
the sources into it from the package index (about a minute with pip's cache); it is skipped when
the venv or the index cannot be reached. The export is test_exported.py's `tiny` one."""
import csv
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import time
import venv

import pytest

from conftest import REPO
from onenip_jax import cli
from test_exported import tiny  # noqa: F401  pylint: disable=unused-import

# Installed in the venv at the full install's versions, so that both compute the same numbers.
SAME_AS_FULL = ("jax", "jaxlib", "flatbuffers", "numpy", "scipy", "pillow", "ml-dtypes", "simplejpeg",
                "ml-collections", "absl-py")
# pip's words when the package index cannot be reached.
NO_INDEX = re.compile(r"NewConnectionError|Failed to establish a new connection|Temporary failure "
                      r"in name resolution|Network is unreachable|ProxyError|ConnectTimeout|"
                      r"No matching distribution found|Could not find a version")
HIDE_TRAIN_STACK = f"""
import sys
for m in {cli.TRAIN_MODULES!r}:
  sys.modules[m] = None  # as if not installed: find_spec gives None, import raises
from onenip_jax.cli import COMMANDS
COMMANDS[sys.argv[1]](sys.argv[2:])
"""


def _training_commands(tmp_path):
  return [
      ["onenip-train", "--config", str(REPO / "configs" / "real.py"), "--workdir", str(tmp_path)],
      ["onenip-eval", "--workdir", str(tmp_path)],
      ["onenip-export", "--workdir", str(tmp_path), "--out", str(tmp_path / "x")],
      ["onenip-convert-weights", "--variant", "b4", "--input", "a.pth", "--output", "a.msgpack"],
  ]


def _assert_one_line_train_stack_error(proc, cmd):
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2 and len(lines) == 1, (cmd, proc.stdout, proc.stderr[-3000:])
  assert lines[0].startswith(f"{cmd[0]}: error: ") and cli.TRAIN_INSTALL in lines[0]


def test_training_commands_fail_in_one_line_without_the_training_stack(tmp_path):
  """Simulated offline install: before any work; an export of an older format names the command
  that re-exports it, also in one line."""
  old_export = tmp_path / "old_export"
  old_export.mkdir()
  (old_export / "export.json").write_text('{"format_version": 4}')
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  for cmd in _training_commands(tmp_path):
    proc = subprocess.run([sys.executable, "-c", HIDE_TRAIN_STACK, *cmd], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    _assert_one_line_train_stack_error(proc, cmd)
  for cmd in (["onenip-predict", "--exported", str(old_export), str(old_export / "export.json")],
              ["onenip-eval", "--exported", str(old_export)]):
    proc = subprocess.run([sys.executable, "-c", HIDE_TRAIN_STACK, *cmd], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, (cmd, proc.stdout, proc.stderr[-3000:])
    assert lines[0].startswith(f"{cmd[0]}: error: ") and "format 4" in lines[0]
    assert "onenip-export --workdir RUN --out DIR" in lines[0]


def _offline_venv(root):
  """A venv holding only `pip install <copy of the sources>`; skips when it cannot be made."""
  try:
    venv.EnvBuilder(with_pip=True, system_site_packages=False).create(root / "venv")
  except (OSError, subprocess.CalledProcessError) as e:
    pytest.skip(f"cannot create a virtual environment: {e}")
  src = root / "src"
  ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
  for d in ("onenip_jax", "data_pipelines"):
    shutil.copytree(REPO / d, src / d, ignore=ignore)
  for f in ("setup.py", "LICENSE"):
    shutil.copy(REPO / f, src / f)
  (root / "same.txt").write_text("".join(f"{n}=={importlib.metadata.version(n)}\n"
                                         for n in SAME_AS_FULL))
  python = str(root / "venv" / "bin" / "python")
  proc = subprocess.run([python, "-m", "pip", "install", "--quiet", "-c", str(root / "same.txt"),
                         str(src)], capture_output=True, text=True, timeout=900)
  if proc.returncode and NO_INDEX.search(proc.stdout + proc.stderr):
    pytest.skip(f"pip cannot install from the package index: {proc.stderr.strip()[-300:]}")
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  return root / "venv" / "bin"


def _run(argv, cwd, env):
  proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def _scores(path) -> dict:
  with open(path, newline="", encoding="utf-8") as f:
    return {os.path.basename(r["path"]): (float(r["score"]), r["matched_class"], r["anomalous"])
            for r in csv.DictReader(f)}


def test_offline_install_matches_the_full_install(tiny, tmp_path):  # noqa: F811
  _, index, _, export_dir, _, _ = tiny
  start = time.monotonic()
  bin_dir = _offline_venv(tmp_path)
  print(f"venv and offline install: {time.monotonic() - start:.0f} s")
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
  env["JAX_PLATFORMS"] = "cpu"
  probe = ("import importlib.util as u; print([m for m in ('tensorflow', 'flax', 'orbax', "
           "'optax', 'clu', 'onenip_jax') if u.find_spec(m)])")
  found = subprocess.run([str(bin_dir / "python"), "-c", probe], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
  assert found.stdout.strip() == "['onenip_jax']", found.stdout + found.stderr

  folder = os.path.dirname([s for s in index.test if s.defect == "crack"][-1].path)
  commands = {"offline": (lambda c: [str(bin_dir / f"onenip-{c}")], env),
              "full": (lambda c: [sys.executable, "-m", "onenip_jax.cli", c],
                       dict(env, PYTHONPATH=str(REPO)))}
  for name, (cmd, run_env) in commands.items():
    _run(cmd("predict") + ["--exported", export_dir, "--out", str(tmp_path / name / "pred"),
                           folder], tmp_path, run_env)
    _run(cmd("eval") + ["--exported", export_dir, "--out", str(tmp_path / name / "eval")],
         tmp_path, run_env)
  mine, theirs = (_scores(tmp_path / n / "pred" / "predictions.csv") for n in ("offline", "full"))
  assert len(mine) == 4 and mine == theirs
  mine, theirs = (json.loads((tmp_path / n / "eval" / "metrics.json").read_text())
                  for n in ("offline", "full"))
  assert mine["backend"] == theirs["backend"] == "exported"
  assert mine["classes"] == theirs["classes"] and set(mine["classes"]) == {"alpha", "beta"}

  for cmd in _training_commands(tmp_path):
    proc = subprocess.run([str(bin_dir / cmd[0]), *cmd[1:]], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    _assert_one_line_train_stack_error(proc, cmd)
  print(f"whole test: {time.monotonic() - start:.0f} s")
