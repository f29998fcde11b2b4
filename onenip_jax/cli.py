r"""The six commands' one grammar: absl flags, `--config FILE[:args]`, `--config.KEY=VALUE`.

  onenip-train   --config configs/X.py[:args] --workdir DIR [--dry_run] [--config.KEY=VALUE ...]
  onenip-eval    --workdir DIR | --exported DIR  [--config FILE[:args]] [--config.KEY=VALUE ...]
  onenip-export  --workdir DIR --out DIR         [--config FILE[:args]] [--config.KEY=VALUE ...]
  onenip-predict --exported DIR [--out DIR] IMAGE_OR_FOLDER ...
  onenip-convert-weights --variant b4 --input X.pth --output X.msgpack
  onenip-build-tfds --config configs/X.py[:args] --data-dir DIR --name NAME [--config.KEY=VALUE ...]

(also `python -m onenip_jax.cli COMMAND ...`, e.g. `python -m onenip_jax.cli eval --help`).
Evaluating or exporting a stored run uses the config stored with it (in the checkpoint or
export); `--config FILE` replaces it except for the model and input size, and `--config.KEY=VALUE`
overrides either (keys of the model and input size excepted: they fail, naming the key).

Exit codes: 0 done; 2 an error the user fixes, printed in one line `PROG: error: MESSAGE` naming
the file or setting at fault (usage, config keys and values, missing or bad data, a damaged
export, a busy work directory, a full disk: `data_pipelines.errors.UserError`; `--verbose` adds
its traceback); 128 + signal number for a run stopped by SIGTERM / SIGINT (143 / 130); 1 an
unexpected error, with its traceback.

This module imports only absl, ml_collections, the standard library and the project's modules built
on them; each command imports its implementation (JAX, TensorFlow, ...) after its flags are parsed:
the plain install has no flax, TensorFlow or Orbax, and `onenip-train --help` takes 0.17 s (5.5 s
with every command imported at the top, 2 CPU cores). Path flags (`_PATH_FLAGS`), predict's inputs
and the --config file have `~` and `$VAR` expanded like the config's paths (`config.loading`).

The plain install (`pip install onenip-jax`) runs `onenip-predict --exported` and `onenip-eval
--exported` only; a command that needs the training stack (flax, TensorFlow, Orbax, ...) then ends
in one line naming `TRAIN_INSTALL`.
"""
import importlib.util
import logging
import os
import sys
import traceback
import types

from absl import app, flags

from data_pipelines import errors
from onenip_jax.config import checks, loading
from onenip_jax.training import run_control

_HELP = ("-h", "-?", "--help", "--helpshort", "--helpfull")
# Flags (of any command) naming a file or folder: `~` and `$VAR` expanded (`loading.expand_path`).
_PATH_FLAGS = ("workdir", "exported", "out", "threshold-dir", "input", "output")
_CONFIG_HELP = ("config file and its argument, configs/X.py[:args]; any key of it is overridden "
                "with --config.KEY=VALUE (or --config.KEY VALUE; --config.KEY / --noconfig.KEY "
                "for booleans)")
# The top-level modules of setup.py's `train` extra, which the plain install lacks.
TRAIN_MODULES = ("flax", "optax", "orbax", "tensorflow", "clu", "skimage")
TRAIN_INSTALL = 'pip install "onenip-jax[train]"'


def _train_flags(fv):
  flags.DEFINE_string("config", None, _CONFIG_HELP, flag_values=fv, required=True)
  flags.DEFINE_string("workdir", None, "work directory (checkpoints, logs, evaluations)",
                      flag_values=fv, required=True)
  flags.DEFINE_boolean("dry_run", False, "check the config, data, weights, devices and work "
                       "directory, print what the run would be, and exit (nothing is trained or "
                       "written; exit code 2 lists every problem found)", flag_values=fv)


def _eval_flags(fv):
  flags.DEFINE_string("workdir", None, "training work directory (uses its latest checkpoint)",
                      flag_values=fv)
  flags.DEFINE_string("exported", None, "directory written by onenip-export", flag_values=fv)
  flags.mark_flags_as_mutual_exclusive(["workdir", "exported"], required=True, flag_values=fv)
  flags.DEFINE_string("config", None, "config for the data and evaluation (default: the stored "
                      "run's); " + _CONFIG_HELP, flag_values=fv)
  flags.DEFINE_string("out", None, "output directory for the reports (default: <workdir or "
                      "exported>/eval)", flag_values=fv)
  flags.DEFINE_integer("step", None, "checkpoint step (default: latest)", flag_values=fv)
  flags.DEFINE_boolean("heatmaps", False, "write heatmap PNGs per class", flag_values=fv)
  flags.DEFINE_integer("batch-size", 8, "images per call of the serialised predictor",
                       flag_values=fv)


def _export_flags(fv):
  flags.DEFINE_string("workdir", None, "training work directory", flag_values=fv, required=True)
  flags.DEFINE_string("out", None, "export directory to create", flag_values=fv, required=True)
  flags.DEFINE_string("config", None, "config for the data the thresholds come from (default: "
                      "the stored run's); " + _CONFIG_HELP, flag_values=fv)
  flags.DEFINE_integer("step", None, "checkpoint step (default: latest)", flag_values=fv)
  flags.DEFINE_boolean("overwrite", False, "replace an existing export", flag_values=fv)
  flags.DEFINE_float("threshold-fraction", 0.1, "thresholds from the held-out normals; for a class "
                     "without any, from this fraction of its normal training images (0 = no "
                     "thresholds)", lower_bound=0.0, upper_bound=1.0, flag_values=fv)
  flags.DEFINE_float("target-fpr", 0.01, "false-positive rate the normal-image thresholds aim at, "
                     "in [0, 1)", lower_bound=0.0, flag_values=fv)
  flags.DEFINE_string("threshold-dir", None, "labelled validation folder <DIR>/<class>/good|"
                      "<defect>/", flag_values=fv)
  flags.DEFINE_boolean("calibrate-on-test", False, "F1-optimal thresholds on the config's TEST "
                       "set (optimistic)", flag_values=fv)
  flags.register_multi_flags_validator(
      ["threshold-dir", "calibrate-on-test"], lambda f: not (f["threshold-dir"] and f["calibrate-on-test"]),
      "--threshold-dir and --calibrate-on-test exclude each other", flag_values=fv)


def _predict_flags(fv):
  flags.DEFINE_string("exported", None, "directory written by onenip-export", flag_values=fv,
                      required=True)
  flags.DEFINE_string("out", "predictions", "output directory", flag_values=fv)
  flags.DEFINE_float("threshold", None, "decision threshold on the image score (default: the "
                     "export's, per matched class)", flag_values=fv)
  flags.DEFINE_boolean("heatmaps", False, "write a heatmap PNG per image", flag_values=fv)
  flags.DEFINE_boolean("save-maps", False, "write each raw float32 (H, W) anomaly map as "
                       "maps/<name>.npy", flag_values=fv)
  flags.DEFINE_boolean("skip-bad", False, "skip unreadable images (warned)", flag_values=fv)
  flags.DEFINE_integer("batch-size", 8, "images per call", lower_bound=1, flag_values=fv)


def _convert_flags(fv):
  flags.DEFINE_string("variant", None, "architecture of the checkpoint, e.g. b4 (backbone.name)",
                      flag_values=fv, required=True)
  flags.DEFINE_string("input", None, "the .pth file, e.g. efficientnet-b4-6ed6700e.pth",
                      flag_values=fv, required=True)
  flags.DEFINE_string("output", None, "the .msgpack to write (backbone.weights)",
                      flag_values=fv, required=True)


def _build_tfds_flags(fv):
  flags.DEFINE_string("config", None, "config of the source dataset (its data.* keys); "
                      + _CONFIG_HELP, flag_values=fv, required=True)
  flags.DEFINE_string("data-dir", None, "TFDS data folder to write to, local or gs:// (the "
                      "training config's data.tfds_data_dir)", flag_values=fv, required=True)
  flags.DEFINE_string("name", None, "the data set's name (data.tfds_name)", flag_values=fv,
                      required=True)


def _usage(prog: str, summary: str, fv, positional: str = "") -> str:
  lines = [ln for ln in fv.get_help(include_special_flags=False).splitlines()
           if ln.startswith(" ")]
  return f"usage: {prog} [flags]{positional}\n\n{summary}\n\nflags:\n" + "\n".join(lines)


def _parse(prog: str, summary: str, define, argv, *, overrides: bool = False,
           positional: str = ""):
  """Parses `argv` (without the program name) into a namespace; exits 0 on --help, 2 on errors.

  The namespace holds each flag under its name with '-' -> '_', `overrides` (the
  `--config.KEY=VALUE` tokens) when the command takes a config, and `inputs` (positional
  arguments) when it takes them.
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  fv = flags.FlagValues()
  define(fv)
  flags.DEFINE_boolean("verbose", False, "show the traceback of an error that names the file or "
                       "setting at fault (printed in one line without it)", flag_values=fv)
  head = argv[:argv.index("--")] if "--" in argv else argv
  if any(a in _HELP for a in head):
    print(_usage(prog, summary, fv, positional))
    sys.exit(0)
  try:
    rest = fv([prog, *argv], known_only=overrides)[1:]
    if overrides:
      for i, token in enumerate(rest):
        if token.startswith("-") and not loading.is_override(token):
          raise flags.UnrecognizedFlagError(token.lstrip("-").split("=")[0])
        if not token.startswith("-") and (i == 0 or not loading.takes_value(rest[i - 1])):
          raise flags.Error(f"unexpected argument {token!r}")
    elif rest and not positional:
      raise flags.Error(f"unexpected argument {rest[0]!r}")
  except flags.Error as e:
    _fail(prog, f"{e}\nPass --help to see the flags.")
  args = types.SimpleNamespace(**{name.replace("-", "_"): fv[name].value for name in fv
                                  if name not in ("flagfile", "undefok")})
  if overrides:
    args.overrides = rest
  if positional:
    if not rest:
      _fail(prog, f"no{positional} given\nPass --help to see the flags.")
    args.inputs = rest
  _expand_path_flags(prog, args)
  return args


def _expand_path_flags(prog: str, args) -> None:
  """`args`' path flags and inputs with `~` and `$VAR` expanded; an unset variable fails."""
  try:
    for name in _PATH_FLAGS:
      value = getattr(args, name.replace("-", "_"), None)
      if isinstance(value, str):
        setattr(args, name.replace("-", "_"), loading.expand_path(value, f"--{name}"))
    if hasattr(args, "inputs"):
      args.inputs = [loading.expand_path(p, "input") for p in args.inputs]
  except loading.PathError as e:
    _fail(prog, str(e))


def _fail(prog: str, message: str):
  print(f"{prog}: error: {message}", file=sys.stderr)
  sys.exit(2)


def _train_stack_error(prog: str, missing) -> None:
  _fail(prog, f"this needs the training stack ({', '.join(missing)} not installed): "
        f"{TRAIN_INSTALL}")


def _need_train_stack(prog: str) -> None:
  """Fails in one line, before any work, when a module of the `train` extra is not installed."""
  missing = [m for m in TRAIN_MODULES if importlib.util.find_spec(m) is None]
  if missing:
    _train_stack_error(prog, missing)


def _run(prog: str, fn, args, *, hard_exit: bool = False):
  """fn(args); a usage, config or other user error (`data_pipelines.errors.UserError`: bad data, a
  missing file, a damaged export, a full disk, ...) ends the process in one line with exit code 2
  (after its traceback with --verbose). Any other exception keeps its traceback.

  With `hard_exit` the process ends without the interpreter's teardown (`run_control.exit_now`),
  where background threads (Orbax, tf.data) of a failed run would print pages of noise.
  """
  try:
    return fn(args)
  except ModuleNotFoundError as e:  # e.g. an export without a serialised predictor, offline
    top = (e.name or "").split(".")[0]
    if top not in TRAIN_MODULES:
      raise
    _train_stack_error(prog, [top])
  except (app.UsageError, loading.ConfigKeyError, errors.UserError) as e:
    if getattr(args, "verbose", False):
      traceback.print_exc()
    if not hard_exit:
      _fail(prog, str(e))
    print(f"{prog}: error: {e}", file=sys.stderr)
    run_control.exit_now(errors.EXIT_CODE)


class _DropOrbaxErrors(logging.Filter):
  """Drops the error records (with tracebacks) Orbax's background threads log for a failed save;
  the training reports the failure itself in one line (`checkpoints.CheckpointSaveError`)."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname)


def _quiet_unraisable(hook):
  """sys.unraisablehook without the 'Event loop is closed' errors of TensorStore's callbacks
  after a failed checkpoint write (one per array)."""

  if getattr(hook, "quiet", False):
    return hook

  def quiet(unraisable):
    e = unraisable.exc_value
    if not (isinstance(e, RuntimeError) and str(e) == "Event loop is closed"):
      hook(unraisable)

  quiet.quiet = True
  return quiet


def _logging(verbose: bool = False):
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True)
  absl_logger = logging.getLogger("absl")
  absl_logger.setLevel(logging.WARNING)  # Orbax's per-save chatter
  if not verbose:
    if not any(isinstance(f, _DropOrbaxErrors) for f in absl_logger.filters):
      absl_logger.addFilter(_DropOrbaxErrors())
    sys.unraisablehook = _quiet_unraisable(sys.unraisablehook)


def train(argv=None) -> None:
  """`onenip-train`: train on a config, resuming from the work directory, then evaluate."""
  prog = "onenip-train"
  args = _parse(prog, "Trains (resuming from the latest checkpoint in --workdir), then evaluates.",
                _train_flags, argv, overrides=True)
  _need_train_stack(prog)  # the config files import the model definitions (flax)
  try:
    args.config = loading.load_config(args.config, args.overrides)
    if not args.dry_run:  # the dry run lists this with its other problems
      checks.check_config(args.config)
  except (FileNotFoundError, loading.ConfigKeyError, errors.UserError) as e:
    _fail(prog, str(e))
  args.config.lock()
  _logging(args.verbose)
  if args.dry_run:
    from onenip_jax.training import dry_run  # pylint: disable=g-import-not-at-top
    run_control.exit_now(_run(prog, dry_run.main, args, hard_exit=True))
  from onenip_jax import train as impl  # pylint: disable=g-import-not-at-top
  return _run(prog, impl.main, args, hard_exit=True)


def evaluate(argv=None) -> None:
  """`onenip-eval`: evaluate a checkpoint (--workdir) or an export (--exported)."""
  prog = "onenip-eval"
  args = _parse(prog, "Evaluates a training run's checkpoint or an export; writes metrics.json, "
                "metrics.md, metrics.csv, scores.csv (and heatmaps).", _eval_flags, argv,
                overrides=True)
  if args.workdir:
    _need_train_stack(prog)
  _check_stored(prog, args)
  _logging(args.verbose)
  if args.workdir:  # a checkpoint (flax); an export runs without flax, TensorFlow or Orbax
    from onenip_jax.evaluation import after_training as impl  # pylint: disable=g-import-not-at-top
  else:
    from onenip_jax.serving import eval_export as impl  # pylint: disable=g-import-not-at-top
  return _run(prog, impl.main, args)


def export(argv=None) -> None:
  """`onenip-export`: checkpoint -> self-contained export directory."""
  prog = "onenip-export"
  if "--calibrate" in (sys.argv[1:] if argv is None else argv):  # the old name, removed
    _fail(prog, "--calibrate fitted the threshold on the test set; it is now --calibrate-on-test "
          "(default: thresholds from normal training images)")
  args = _parse(prog, "Writes a self-contained export (weights, prompt pool, fusion constant, "
                "thresholds, serialised predictor) of a training run's checkpoint.",
                _export_flags, argv, overrides=True)
  if not args.target_fpr < 1.0:
    _fail(prog, "--target-fpr must be in [0, 1)")
  _need_train_stack(prog)
  _check_stored(prog, args)
  _logging(args.verbose)
  from onenip_jax.serving import export as impl  # pylint: disable=g-import-not-at-top
  return _run(prog, impl.main, args)


def predict(argv=None) -> None:
  """`onenip-predict`: score images with an export (no class label needed)."""
  prog = "onenip-predict"
  args = _parse(prog, "Scores images or folders of images with an export; writes predictions.csv "
                "and predictions.json.", _predict_flags, argv,
                positional=" IMAGE_OR_FOLDER [...]")
  _logging(args.verbose)
  from onenip_jax.serving import predict as impl  # pylint: disable=g-import-not-at-top
  return _run(prog, impl.main, args)


def convert_weights(argv=None) -> int:
  """`onenip-convert-weights`: an EfficientNet `.pth` (lukemelas naming) -> flax `.msgpack`."""
  prog = "onenip-convert-weights"
  args = _parse(prog, "Converts an EfficientNet PyTorch state dict (lukemelas efficientnet_pytorch "
                "/ efficientnet_lite_pytorch naming) into flax msgpack variables, without torch.",
                _convert_flags, argv)
  _need_train_stack(prog)
  from onenip_jax.models import convert as impl  # pylint: disable=g-import-not-at-top
  return _run(prog, impl.main, args)


def build_tfds(argv=None) -> None:
  """`onenip-build-tfds`: a dataset config's data -> TFDS record shards for data.layout='tfds'."""
  prog = "onenip-build-tfds"
  args = _parse(prog, "Writes the train and test samples of a config's dataset as TFDS TFRecord "
                "shards plus their index, read back with --config.data.layout=tfds.",
                _build_tfds_flags, argv, overrides=True)
  _need_train_stack(prog)
  try:
    args.config = loading.load_config(args.config, args.overrides)
  except (FileNotFoundError, loading.ConfigKeyError) as e:
    _fail(prog, str(e))
  _logging(args.verbose)
  from data_pipelines import tfds_builder as impl  # pylint: disable=g-import-not-at-top
  return _run(prog, impl.main, args)


def _check_stored(prog: str, args) -> None:
  """Before any work: a missing config file, overrides that a stored run cannot take, or override
  values out of range (`config.checks`) fail at once, naming the file or key. The whole config is
  checked once the stored run's is loaded."""
  try:
    path = args.config and loading.expand_path(args.config.partition(":")[0], "--config")
    if path and not os.path.isfile(path):
      _fail(prog, f"config file not found: {path}")
    loading.check_stored_run_overrides(args.overrides)
    keys = [k for k in map(loading.override_key, args.overrides) if k]
    if keys:
      from onenip_jax.config import base  # pylint: disable=g-import-not-at-top
      try:
        cfg = loading.apply_overrides(base.get_base_config(), args.overrides)
      except loading.ConfigKeyError:
        cfg = None  # a key of the config file only: checked once the config is loaded
      if cfg is not None:
        checks.check_config(cfg, keys)
  except (loading.ConfigKeyError, errors.UserError) as e:
    _fail(prog, str(e))


# console script -> function; setup.py's entry points name the same functions.
COMMANDS = {"onenip-train": train, "onenip-eval": evaluate, "onenip-export": export,
            "onenip-predict": predict, "onenip-convert-weights": convert_weights,
            "onenip-build-tfds": build_tfds}


def main(argv=None) -> int:
  """`python -m onenip_jax.cli {train,eval,export,predict,convert-weights,build-tfds} ...`."""
  argv = list(sys.argv[1:] if argv is None else argv)
  names = {name[len("onenip-"):]: fn for name, fn in COMMANDS.items()}
  if not argv or argv[0] not in names:
    print(f"usage: python -m onenip_jax.cli {{{','.join(names)}}} [flags] (--help for each)",
          file=sys.stderr)
    return 2
  return names[argv[0]](argv[1:]) or 0


if __name__ == "__main__":
  sys.exit(main())
