r"""Trains on every worker of a Cloud TPU pod slice from a local checkout; no setup on the workers.

  python launch/tpu_pod.py --tpu my-v4-32 --zone us-central2-b \
      --config configs/mvtec.py:res=224 --workdir gs://bucket/runs/mvtec \
      "--config.data.classes=('bottle','screw')" [--dry-run] [-- more overrides ...]

Packs the repository (committed files plus uncommitted changes to tracked files, `git stash
create`; --ref ships a given commit instead), copies the archive to every worker (`gcloud compute
tpus tpu-vm scp --worker=all`), and on every worker (`tpu-vm ssh --worker=all`) unpacks it into
~/onenip-runs/<run name>, installs it with `jax[tpu]` and runs
`onenip-train --config=CONFIG --workdir=WORKDIR --config.distributed=True OVERRIDES` there;
jax.distributed finds the slice by itself. Every argument reaches onenip-train exactly as given
here (each is quoted once for the remote shell). Overrides are `--config.KEY=VALUE` options, or any
arguments after `--`. A relative CONFIG is read from the shipped tree; WORKDIR should be shared by
the workers (gs://...), and the data must be at the same path on every worker. --dry-run prints the
commands, shell-quoted, and runs nothing.
"""
import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBTPU = "https://storage.googleapis.com/jax-releases/libtpu_releases.html"
RUNS_DIR = "onenip-runs"  # under each worker's home directory
REQUIRED = ("tpu", "zone", "config", "workdir")


def parse_args(argv):
  """Options and the overrides (unknown `--config.*` options, then everything after `--`)."""
  parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--tpu", help="TPU VM name (required)")
  parser.add_argument("--zone", help="its zone (required)")
  parser.add_argument("--project", help="Google Cloud project (default: gcloud's)")
  parser.add_argument("--config", help="onenip-train --config, e.g. configs/mvtec.py:res=224 (required)")
  parser.add_argument("--workdir", help="onenip-train --workdir, e.g. gs://bucket/runs/x (required)")
  parser.add_argument("--run-name", help="directory name on the workers (default: time and commit)")
  parser.add_argument("--ref", help="ship this commit instead of the working tree")
  parser.add_argument("--repo", default=REPO, help="repository to ship (default: this one)")
  parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
  argv = list(sys.argv[1:] if argv is None else argv)
  rest = []
  if "--" in argv:
    argv, rest = argv[:argv.index("--")], argv[argv.index("--") + 1:]
  a, unknown = parser.parse_known_args(argv)
  bad = [x for x in unknown if not x.startswith("--config.")]
  if bad:
    parser.exit(2, f"tpu_pod: error: unknown argument {bad[0]!r} (overrides are --config.KEY=VALUE "
                   "or follow --)\n")
  missing = [f"--{k.replace('_', '-')}" for k in REQUIRED if not getattr(a, k)]
  if missing:
    parser.exit(2, f"tpu_pod: error: missing {', '.join(missing)}\n")
  if a.run_name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", a.run_name):
    parser.exit(2, f"tpu_pod: error: --run-name {a.run_name!r} is not a plain directory name\n")
  a.overrides = unknown + rest
  return a


def git(repo, *args) -> str:
  return subprocess.run(["git", "-C", repo, *args], check=True, capture_output=True,
                        text=True).stdout.strip()


def source_commit(repo, ref=None) -> str:
  """The commit to ship: `ref`, else the working tree's tracked files as a (dangling) commit."""
  if ref:
    return git(repo, "rev-parse", "--verify", f"{ref}^{{commit}}")
  # Needs a committer identity; this commit is never stored in a branch.
  stash = git(repo, "-c", "user.name=tpu_pod", "-c", "user.email=tpu_pod@localhost", "stash", "create")
  return stash or git(repo, "rev-parse", "--verify", "HEAD")


def train_argv(a) -> list[str]:
  return ["onenip-train", f"--config={a.config}", f"--workdir={a.workdir}",
          "--config.distributed=True", *a.overrides]


def remote_script(archive_name: str, run_dir: str, train: list[str]) -> str:
  """Runs on every worker, in its home directory: unpack, install, train."""
  q = shlex.quote
  return "\n".join([
      "set -e",
      'export PATH="$HOME/.local/bin:$PATH"',  # pip's user installs (onenip-train)
      f"mkdir -p {q(run_dir)}",
      f"tar -xzf {q(archive_name)} -C {q(run_dir)}",
      f"rm -f {q(archive_name)}",
      f"cd {q(run_dir)}",
      shlex.join(["pip", "install", "-q", "-e", ".", "jax[tpu]", "-f", LIBTPU]),
      shlex.join(train),
  ])


def commands(a, commit: str, run_name: str) -> list[list[str]]:
  """git archive, gcloud scp and gcloud ssh, each an argv."""
  archive_name = f"onenip-{run_name}.tar.gz"
  local = os.path.join(tempfile.gettempdir(), archive_name)
  where = ["--zone", a.zone, "--worker=all"] + (["--project", a.project] if a.project else [])
  tpu = ["gcloud", "compute", "tpus", "tpu-vm"]
  script = remote_script(archive_name, f"{RUNS_DIR}/{run_name}", train_argv(a))
  return [["git", "-C", a.repo, "archive", "--format=tar.gz", "-o", local, commit],
          tpu + ["scp", local, f"{a.tpu}:{archive_name}", *where],
          tpu + ["ssh", a.tpu, *where, "--command", script]]


def main(argv=None) -> int:
  a = parse_args(argv)
  try:
    commit = source_commit(a.repo, a.ref)
  except subprocess.CalledProcessError as e:
    print(f"tpu_pod: error: {shlex.join(e.cmd)}: {e.stderr.strip()}", file=sys.stderr)
    return 1
  run_name = a.run_name or f"{time.strftime('%Y%m%d-%H%M%S')}-{commit[:8]}"
  untracked = [] if a.ref else git(a.repo, "ls-files", "--others", "--exclude-standard").split("\n")
  if any(untracked):
    print(f"tpu_pod: not shipped (untracked): {' '.join(untracked)}", file=sys.stderr)
  cmds = commands(a, commit, run_name)
  if a.dry_run:
    for cmd in cmds:
      print(shlex.join(cmd))
    return 0
  print(f"run {run_name}: commit {commit} to ~/{RUNS_DIR}/{run_name} on every worker of {a.tpu}",
        flush=True)
  local = cmds[0][cmds[0].index("-o") + 1]
  try:
    for cmd in cmds:
      rc = subprocess.call(cmd)
      if rc:
        print(f"tpu_pod: exit code {rc}: {shlex.join(cmd[:5])} ...", file=sys.stderr)
        return rc
  finally:
    if os.path.exists(local):
      os.remove(local)
  return 0


if __name__ == "__main__":
  sys.exit(main())
