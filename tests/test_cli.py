"""The one command-line grammar (onenip_jax/cli.py, config/loading.py): flags, --help without
JAX or TensorFlow, `--config.KEY=VALUE` on config files and stored runs. No training here."""
import json
import re
import subprocess
import sys

import ml_collections
import pytest

from conftest import REPO
from onenip_jax import cli
from onenip_jax.config import loading

HELP_PROBE = """
import sys
from onenip_jax.cli import COMMANDS
try:
  COMMANDS[sys.argv[1]](["--help"])
except SystemExit as e:
  assert e.code == 0, e.code
heavy = [m for m in ("jax", "tensorflow", "flax", "orbax", "torch") if m in sys.modules]
print("HEAVY", heavy)
"""

FLAGS = {
    "onenip-train": ["--config", "--workdir", "--[no]dry_run", "--[no]verbose"],
    "onenip-eval": ["--workdir", "--exported", "--config", "--out", "--step", "--[no]heatmaps",
                    "--batch-size", "--[no]verbose"],
    "onenip-export": ["--workdir", "--out", "--config", "--step", "--[no]overwrite",
                      "--threshold-fraction", "--target-fpr", "--threshold-dir",
                      "--[no]calibrate-on-test", "--[no]verbose"],
    "onenip-predict": ["--exported", "--out", "--threshold", "--[no]heatmaps", "--[no]save-maps",
                       "--[no]skip-bad", "--batch-size", "--[no]verbose"],
    "onenip-convert-weights": ["--variant", "--input", "--output", "--[no]verbose"],
    "onenip-build-tfds": ["--config", "--data-dir", "--name", "--[no]verbose"],
}


@pytest.mark.parametrize("name", sorted(FLAGS))
def test_help_lists_flags_without_importing_jax_or_tf(name):
  out = subprocess.run([sys.executable, "-c", HELP_PROBE, name], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  assert out.stdout.startswith(f"usage: {name} ")
  listed = re.findall(r"^  (--[^:\s]+):", out.stdout, re.M)
  assert sorted(listed) == sorted(FLAGS[name])
  assert out.stdout.strip().splitlines()[-1] == "HEAVY []"


def test_setup_py_entry_points_are_the_cli_functions():
  text = (REPO / "setup.py").read_text()
  scripts = dict(re.findall(r'"(onenip-[a-z-]+)=onenip_jax\.cli:(\w+)"', text))
  assert {k: getattr(cli, v) for k, v in scripts.items()} == cli.COMMANDS


def _args(monkeypatch, module, command, argv):
  """The namespace `command(argv)` hands to `module.main`."""
  got = []
  monkeypatch.setattr(module, "main", got.append)
  command(argv)
  return got[0]


def test_flags_keep_their_meaning(monkeypatch):
  from onenip_jax.evaluation import after_training  # pylint: disable=g-import-not-at-top
  from onenip_jax.serving import eval_export, export, predict  # pylint: disable=g-import-not-at-top
  a = _args(monkeypatch, predict, cli.predict,
            ["img1", "--exported", "E", "--heatmaps", "dir2", "--batch-size", "3", "--save-maps",
             "--threshold=0.5"])
  assert (a.inputs, a.exported, a.out, a.heatmaps, a.batch_size, a.save_maps, a.skip_bad,
          a.threshold) == (["img1", "dir2"], "E", "predictions", True, 3, True, False, 0.5)
  a = _args(monkeypatch, after_training, cli.evaluate,  # a checkpoint: the Flax evaluation
            ["--workdir", "W", "--config.eval.prompt_mode", "pool", "--step=4",
             "--config.eval.batch_size=4", "--noconfig.eval.heatmaps"])
  assert (a.workdir, a.exported, a.step, a.config, a.batch_size, a.heatmaps) == (
      "W", None, 4, None, 8, False)
  assert a.overrides == ["--config.eval.prompt_mode", "pool", "--config.eval.batch_size=4",
                         "--noconfig.eval.heatmaps"]
  a = _args(monkeypatch, eval_export, cli.evaluate, ["--exported", "E", "--batch-size", "2"])
  assert (a.workdir, a.exported, a.batch_size) == (None, "E", 2)  # an export: flax-free
  a = _args(monkeypatch, export, cli.export, ["--workdir", "W", "--out", "O",
                                              "--threshold-fraction", "0.2", "--calibrate-on-test"])
  assert (a.threshold_fraction, a.target_fpr, a.calibrate_on_test, a.threshold_dir,
          a.overwrite, a.overrides) == (0.2, 0.01, True, None, False, [])


@pytest.mark.parametrize("command,argv,want", [
    (cli.evaluate, ["--out", "x"], "Exactly one of (workdir, exported)"),
    (cli.evaluate, ["--workdir", "W", "--bogus=1"], "Unknown command line flag 'bogus'"),
    (cli.evaluate, ["--workdir", "W", "stray"], "unexpected argument 'stray'"),
    (cli.evaluate, ["--workdir", "W", "--noconfig.eval.heatmaps", "stray"],
     "unexpected argument 'stray'"),
    (cli.evaluate, ["--workdir", "W", "--config", "configs/nope.py:x"],
     "config file not found: configs/nope.py"),
    (cli.evaluate, ["--workdir", "W", "--config.model.hidden_dim=8"],
     "config key 'model.hidden_dim' cannot be overridden for a stored run"),
    (cli.export, ["--workdir", "W", "--out", "O", "--threshold-dir", "D", "--calibrate-on-test"],
     "exclude each other"),
    (cli.export, ["--workdir", "W", "--out", "O", "--threshold-fraction", "2"],
     "--threshold-fraction"),
    (cli.export, ["--workdir", "W", "--out", "O", "--calibrate"], "--calibrate-on-test"),
    (cli.predict, ["--exported", "E"], "no IMAGE_OR_FOLDER"),
    (cli.train, ["--workdir", "W"], "--config"),
    (cli.train, ["--workdir=W", "--config=configs/demo.py", "--config.model.x=1"],
     "unknown config key 'model.x' (from --config.model.x=1)"),
    (cli.train, ["--workdir=W", "--config=configs/nope.py"], "config file not found: configs/nope.py"),
    (cli.train, ["--workdir=W", "--config=configs/demo.py", "--config.batch_size=x"],
     "--config.batch_size=x"),
    (cli.train, ["--workdir=W", "--config=configs/demo.py", "--config.eval.heatmaps", "stray"],
     "unexpected argument 'stray'"),
])
def test_usage_errors_are_one_line(command, argv, want, capsys, monkeypatch):
  monkeypatch.chdir(REPO)
  with pytest.raises(SystemExit) as e:
    command(argv)
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert "Traceback" not in err and err.startswith("onenip-") and want in err.splitlines()[0], err


def test_overrides_parse_by_type():
  cfg = loading.load_config(
      str(REPO / "configs" / "demo.py"),
      ["--config.eval.batch_size=4", "--config.data.classes=('a', 'b')", "--config.data.root",
       "/x", "--config.eval.heatmaps", "--noconfig.cache_features", "--config.optim.lr=1",
       "seed=7"])
  assert (cfg.eval.batch_size, cfg.data.classes, cfg.data.root, cfg.eval.heatmaps,
          cfg.cache_features, cfg.seed) == (4, ("a", "b"), "/x", True, False, 7)
  assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == 1.0


def test_stored_run_config_is_overridable_but_not_its_model():
  demo = str(REPO / "configs" / "demo.py")
  trained = loading.load_config(demo, ["--config.input_size=64",
                                       "--config.backbone.name=lite0"])
  stored = ml_collections.ConfigDict(json.loads(trained.to_json_best_effort()))  # lists, as stored
  cfg = loading.load_config(None, ["--config.eval.batch_size=4",
                                   "--config.data.classes=('z',)"], base=stored)
  assert cfg.eval.batch_size == 4 and cfg.data.classes == ("z",)
  assert cfg.data.synthesis.jitter == trained.data.synthesis.jitter  # a tuple again
  assert stored.eval.batch_size == trained.eval.batch_size  # the stored config is not changed
  with pytest.raises(loading.ConfigKeyError, match="'model.dropout' cannot be overridden"):
    loading.load_config(None, ["--config.model.dropout=0.5"], base=stored)
  with pytest.raises(loading.ConfigKeyError, match="unknown config key 'eval.nope'"):
    loading.load_config(None, ["--config.eval.nope=1"], base=stored)
  # A config file for another dataset keeps the stored model and input size.
  other = loading.load_config(demo + ":", ["--config.data.root=/d"], base=stored)
  assert (other.input_size, other.backbone.name, other.data.root) == (64, "lite0", "/d")
  with pytest.raises(loading.ConfigKeyError, match="'backbone.weights' cannot be overridden"):
    loading.load_config(None, ["--config.backbone.weights=/w.msgpack"], base=stored)
