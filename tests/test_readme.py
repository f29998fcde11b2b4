"""Every command in the README's ```bash blocks, run as a user would, in README order.

The built-in demo runs exactly as written, and its figures must be the README's. The other commands
run on the demo's data and run: `runs/real` (the real-data run of the Training section) is the
demo's work directory, other output paths go to a temporary folder, training commands get small
settings appended (`SMALL`), and `pip install` runs with `--dry-run`, so that it resolves the
extras and their requirements without changing this environment (`.ci/run` does the real install
of `.[dev]`, `tests/test_offline_install.py` that of `.`). A command whose comment starts with
`# needs` needs what tests cannot have (a GPU, a TPU, a full dataset, B4 weights): it is skipped,
and the skip names it (`-rs` lists the skips). A command this file does not know fails its test.
"""
import dataclasses
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

from conftest import REPO

README = REPO / "README.md"
DEMO = ["onenip-train", "--config", "configs/demo.py", "--workdir", "/tmp/onenip-demo"]
DEMO_STEP = 150
# Small settings for the training commands other than the demo (the demo's data, 64 px, 2 steps).
SMALL = ["--config.total_steps=2", "--config.input_size=64", "--config.data.classes=('brick',)",
         "--config.eval.heatmaps=False", "--config.eval.fusion_max_images=16",
         "--config.calibration.holdout_fraction=0.0"]
PROGRAMS = ("onenip-train", "onenip-eval", "onenip-export", "onenip-predict", "onenip-build-tfds",
            "onenip-convert-weights", "python", "python3", "pip", "sbatch", "scancel")
METRICS = ("i_auroc", "i_ap", "p_auroc", "p_ap", "aupro")
TOLERANCE = 1.0  # points, per figure of the demo's table (see the demo figures' test)


@dataclasses.dataclass
class Command:
  line: int      # of README.md, where the command starts
  text: str      # as written, continuation lines joined
  argv: list
  comment: str   # the text after an unquoted `#`, or ""

  def __str__(self):
    return f"README.md:{self.line}: {self.text}"


def _split_comment(text: str) -> tuple[str, str]:
  """`cmd 'a # b'  # note` -> ("cmd 'a # b'", "note"): the first `#` outside quotes after a blank."""
  quote = None
  for i, ch in enumerate(text):
    if quote:
      quote = None if ch == quote else quote
    elif ch in "'\"":
      quote = ch
    elif ch == "#" and (i == 0 or text[i - 1].isspace()):
      return text[:i].rstrip(), text[i + 1:].strip()
  return text.rstrip(), ""


def readme_commands(text: str) -> list[Command]:
  """The commands of every ```bash block, a continued (`\\`) line joined to the next."""
  out, block, pending, start = [], False, "", 0
  for number, raw in enumerate(text.splitlines(), 1):
    if raw.startswith("```"):
      block = raw.strip() == "```bash"
      continue
    if not block or not (pending or raw.strip()):
      continue
    start = start if pending else number
    if raw.rstrip().endswith("\\"):
      pending += raw.rstrip()[:-1] + " "
      continue
    body, comment = _split_comment(pending + raw)
    pending = ""
    out.append(Command(start, " ".join(body.split()), shlex.split(body), comment))
  return out


COMMANDS = readme_commands(README.read_text(encoding="utf-8"))


def test_the_readme_blocks_parse():
  assert COMMANDS[0].argv == ["pip", "install", "-e", ".[dev]"], COMMANDS[0]
  assert COMMANDS[1].argv == DEMO, COMMANDS[1]
  assert COMMANDS[2].argv == ["python3", "-m", "pytest", "-q", "tests"], COMMANDS[2]
  unknown = [str(c) for c in COMMANDS if c.argv[0] not in PROGRAMS]
  assert not unknown, f"README commands this test does not know how to run: {unknown}"
  assert _split_comment("a 'b # c' \"#d\" # e # f") == ("a 'b # c' \"#d\"", "e # f")


def user_env() -> dict:
  """This environment without the 8 fake CPU devices of tests/conftest.py: a user's shell has one
  CPU device, and the demo's figures depend on how its batches are split over devices."""
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags)
  return env


class Workspace:
  """The README's commands run in order; `through(i)` runs the runnable ones up to command i."""

  def __init__(self, root: pathlib.Path):
    self.root = root
    self.demo = root / "onenip-demo"
    self.results = {}   # index -> CompletedProcess
    self.demo_metrics = None

  def path(self, value: str) -> str:
    """A README path, where the test writes it: runs/real is the demo run, outputs go to root."""
    if value == "runs/real":
      return str(self.demo)
    if value == "path/to/images_or_folders":
      return str(self.demo / "demo_data" / "brick" / "test")
    if value.startswith("/tmp/"):
      return str(self.root / value[len("/tmp/"):])
    if value.startswith(("runs/", "exports/")) or value == "preds":
      return str(self.root / value)
    return value

  def argv(self, cmd: Command) -> list[str]:
    """The command as the test runs it (or a skip reason)."""
    args = []
    for a in cmd.argv:
      flag, eq, value = a.partition("=")
      args.append(f"{flag}={self.path(value)}" if eq and flag.startswith("-") else self.path(a))
    prog = args[0]
    if prog in ("python", "python3"):
      args[0] = sys.executable
    if prog == "pip":
      return [sys.executable, "-m", "pip", "install", "--dry-run", *args[2:]]
    if cmd.argv == DEMO:
      return args
    if prog == "onenip-train" or (args[1:3] == ["-m", "launch.sweep"] and "--print" not in args):
      return args + SMALL
    if prog == "onenip-eval" and "--workdir" in args:
      return args + ["--config.eval.heatmaps=False"]
    return args

  def skip_reason(self, cmd: Command):
    if cmd.comment.startswith("needs"):
      return f"{cmd.comment}: {cmd}"
    if cmd.argv[:3] == ["python3", "-m", "pytest"]:
      return f"the test suite itself: {cmd}"
    return None

  def through(self, index: int) -> subprocess.CompletedProcess:
    for i in range(index + 1):
      if i in self.results or self.skip_reason(COMMANDS[i]):
        continue
      argv = self.argv(COMMANDS[i])
      self.results[i] = subprocess.run(argv, cwd=REPO, env=user_env(), capture_output=True,
                                       text=True, timeout=2400)
      if COMMANDS[i].argv == DEMO and self.results[i].returncode == 0:
        path = self.demo / "eval" / f"step_{DEMO_STEP}" / "metrics.json"
        self.demo_metrics = json.loads(path.read_text())
    return self.results[index]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
  return Workspace(tmp_path_factory.mktemp("readme"))


@pytest.mark.parametrize("index", range(len(COMMANDS)),
                         ids=[f"line{c.line}-{c.argv[0]}" for c in COMMANDS])
def test_readme_command_runs(workspace, index):
  cmd = COMMANDS[index]
  reason = workspace.skip_reason(cmd)
  if reason:
    pytest.skip(reason)
  out = workspace.through(index)
  assert out.returncode == 0, (f"{cmd}\nran as: {shlex.join(workspace.argv(cmd))}\n"
                               f"exit {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
  if cmd.argv[0] == "pip":
    assert "Would install onenip-jax" in out.stdout, out.stdout[-2000:]


def readme_demo_table(text: str) -> dict:
  """The Three-commands section's table: {class: {metric: 'xx.xx'}} (the mean row as 'mean')."""
  section = text.split("## Three commands", 1)[1].split("\n## ", 1)[0]
  rows = [ln for ln in section.splitlines() if ln.startswith("|")]
  head = [h.strip() for h in rows[0].strip("|").split("|")]
  assert head == ["class", "I-AUROC", "I-AP", "P-AUROC", "P-AP", "AUPRO"], head
  table = {}
  for row in rows[2:]:
    cells = [c.strip().strip("*") for c in row.strip("|").split("|")]
    table[cells[0]] = dict(zip(METRICS, cells[1:]))
  return table


def test_readme_demo_figures_are_the_demos(workspace):
  """The README's demo figures are those of a run of it, within `TOLERANCE` points: the run is
  deterministic on one machine, and another CPU kind may swap a ranking (on the README's machine,
  AVX2-only code moved grass's I-AUROC by 0.84 and the mean P-AP by 0.05)."""
  index = next(i for i, c in enumerate(COMMANDS) if c.argv == DEMO)
  out = workspace.through(index)
  assert out.returncode == 0, out.stderr[-3000:]
  got = workspace.demo_metrics
  ran = {name: {m: f"{100 * v[m]:.2f}" for m in METRICS} for name, v in got["classes"].items()}
  ran["mean"] = {m: f"{100 * got['mean'][m]:.2f}" for m in METRICS}
  readme = readme_demo_table(README.read_text(encoding="utf-8"))
  assert sorted(readme) == sorted(ran), (readme, ran)
  off = {(name, m): (readme[name][m], ran[name][m]) for name in ran for m in METRICS
         if abs(float(readme[name][m]) - float(ran[name][m])) > TOLERANCE}
  assert not off, f"README figure -> this run's, beyond {TOLERANCE} points: {off}"
  assert got["fusion"] == "calibrated" and got["step"] == DEMO_STEP


def test_every_readme_path_exists():
  """Files the README names (configs, launchers, docs) are in the repository."""
  text = README.read_text(encoding="utf-8")
  named = set(re.findall(r"(?<![\w/.])((?:configs|launch|docs|onenip_jax|tests)/[\w./-]+\.\w+)",
                         text))
  assert named, "no repository paths found in the README"
  missing = sorted(p for p in named if not (REPO / p).exists())
  assert not missing, missing
  assert os.path.exists(REPO / "LICENSE")
