"""launch/tpu_pod.py against a stand-in `gcloud` that copies to and runs on two fake workers (home
directories under tmp_path), with stand-in `pip` and `onenip-train` that record their arguments."""
import json
import os
import subprocess
import sys

from conftest import REPO

LAUNCHER = str(REPO / "launch" / "tpu_pod.py")
LIBTPU = "https://storage.googleapis.com/jax-releases/libtpu_releases.html"

FAKE_GCLOUD = r"""#!{python}
import json, os, shutil, subprocess, sys
args = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
  f.write(json.dumps(args) + "\n")
assert args[:3] == ["compute", "tpus", "tpu-vm"], args
homes = os.environ["FAKE_WORKERS"].split(os.pathsep)
if args[3] == "scp":
  src, dest = args[4], args[5]
  for home in homes:
    shutil.copy(src, os.path.join(home, dest.split(":", 1)[1]))
elif args[3] == "ssh":
  script = args[args.index("--command") + 1]
  sys.exit(max(subprocess.call(["bash", "-c", script], cwd=home, env=dict(os.environ, HOME=home))
               for home in homes))
"""

FAKE_TOOL = r"""#!{python}
import json, os, sys
with open(os.path.join(os.environ["HOME"], "calls.jsonl"), "a") as f:
  f.write(json.dumps({{"tool": os.path.basename(sys.argv[0]), "argv": sys.argv[1:],
                      "cwd": os.getcwd()}}) + "\n")
"""

# Quotes, parentheses, spaces, $, backslash and a newline: each must arrive as written.
OVERRIDES = ["--config.data.classes=('bottle','screw')", "--config.name=a run name"]
AFTER_DASHES = ["--config.note=it's $HOME \"x\" \\n `id`\nline 2"]


def _setup(tmp_path):
  """A small git repository (one uncommitted change), two worker homes and the stand-ins."""
  repo, bin_dir, tmp = tmp_path / "repo", tmp_path / "bin", tmp_path / "tmp"
  for d in (repo / "configs", bin_dir, tmp):
    d.mkdir(parents=True)
  (repo / "setup.py").write_text("# committed\n")
  (repo / "configs" / "x.py").write_text("# committed\n")
  git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@localhost"]
  subprocess.run(git[:3] + ["init", "-q"], check=True)
  subprocess.run(git + ["add", "."], check=True)
  subprocess.run(git + ["commit", "-q", "-m", "first"], check=True)
  (repo / "configs" / "x.py").write_text("# uncommitted\n")
  homes = [tmp_path / f"worker{i}" for i in range(2)]
  for h in homes:
    h.mkdir()
  for name, text in (("gcloud", FAKE_GCLOUD), ("pip", FAKE_TOOL), ("onenip-train", FAKE_TOOL)):
    (bin_dir / name).write_text(text.format(python=sys.executable))
    (bin_dir / name).chmod(0o755)
  env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", TMPDIR=str(tmp),
             FAKE_GCLOUD_LOG=str(tmp_path / "gcloud.jsonl"),
             FAKE_WORKERS=os.pathsep.join(map(str, homes)))
  return repo, homes, env


def _launch(env, *args):
  return subprocess.run([sys.executable, LAUNCHER, *args], env=env, capture_output=True, text=True,
                        timeout=120)


def _calls(home):
  with open(home / "calls.jsonl", encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def _check_workers(homes, run_name, shipped):
  train = ["--config=configs/x.py:a=1", "--workdir=gs://bucket/runs/my run",
           "--config.distributed=True", *OVERRIDES, *AFTER_DASHES]
  for home in homes:
    run_dir = str(home / "onenip-runs" / run_name)
    assert _calls(home) == [
        {"tool": "pip", "argv": ["install", "-q", "-e", ".", "jax[tpu]", "-f", LIBTPU], "cwd": run_dir},
        {"tool": "onenip-train", "argv": train, "cwd": run_dir}]
    assert (home / "onenip-runs" / run_name / "configs" / "x.py").read_text() == shipped
    assert sorted(p.name for p in home.iterdir()) == ["calls.jsonl", "onenip-runs"]  # archive gone


def test_overrides_arrive_unchanged_on_every_worker(tmp_path):
  repo, homes, env = _setup(tmp_path)
  (repo / "new.py").write_text("")
  r = _launch(env, "--tpu", "my-tpu", "--zone", "us-central2-b", "--project", "proj",
              "--config", "configs/x.py:a=1", "--workdir", "gs://bucket/runs/my run",
              "--repo", str(repo), "--run-name", "r1", *OVERRIDES, "--", *AFTER_DASHES)
  assert r.returncode == 0 and "not shipped (untracked): new.py\n" in r.stderr, r.stderr
  _check_workers(homes, "r1", "# uncommitted\n")  # the working tree, not only HEAD
  with open(tmp_path / "gcloud.jsonl", encoding="utf-8") as f:
    calls = [json.loads(line) for line in f]
  where = ["--zone", "us-central2-b", "--worker=all", "--project", "proj"]
  assert [c[3:] for c in calls] == [
      ["scp", str(tmp_path / "tmp" / "onenip-r1.tar.gz"), "my-tpu:onenip-r1.tar.gz", *where],
      ["ssh", "my-tpu", *where, "--command", calls[1][-1]]]
  assert os.listdir(tmp_path / "tmp") == []  # the local archive is removed


def test_dry_run_prints_the_commands_and_runs_nothing(tmp_path):
  repo, homes, env = _setup(tmp_path)
  r = _launch(env, "--tpu", "my-tpu", "--zone", "z", "--config", "configs/x.py:a=1",
              "--workdir", "gs://bucket/runs/my run", "--repo", str(repo), "--run-name", "r2",
              "--ref", "HEAD", "--dry-run", *OVERRIDES, "--", *AFTER_DASHES)
  assert r.returncode == 0, r.stderr
  assert not (tmp_path / "gcloud.jsonl").exists() and os.listdir(tmp_path / "tmp") == []
  assert all(not any(h.iterdir()) for h in homes)
  assert r.stdout.startswith(f"git -C {repo} archive --format=tar.gz ")
  assert "\ngcloud compute tpus tpu-vm scp " in r.stdout and "\ngcloud compute tpus tpu-vm ssh " in r.stdout
  # The printed commands, run as they are, do what the launcher does (here: ship HEAD).
  subprocess.run(["bash", "-ec", r.stdout], env=env, check=True, timeout=120)
  _check_workers(homes, "r2", "# committed\n")


def test_missing_or_unknown_options_are_one_line_errors(tmp_path):
  _, _, env = _setup(tmp_path)
  r = _launch(env, "--zone", "z", "--config", "c.py", "--dry-run")
  assert r.returncode == 2 and r.stderr == "tpu_pod: error: missing --tpu, --workdir\n"
  r = _launch(env, "--tpu", "t", "--zone", "z", "--config", "c.py", "--workdir", "w", "--zome", "y",
              "--dry-run")
  assert r.returncode == 2 and r.stderr.startswith("tpu_pod: error: unknown argument '--zome'")
  assert r.stderr.count("\n") == 1 and r.stdout == ""
  assert not (tmp_path / "gcloud.jsonl").exists()
