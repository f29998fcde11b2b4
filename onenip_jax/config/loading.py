"""Configs from `get_config(arg)` files or stored runs, with `--config.KEY=VALUE` overrides.

A config file is any Python file with `get_config(arg=None)`, loaded by its path (inside the
repository or not; it imports its shared defaults from `onenip_jax.config.base`). A stored config
(a checkpoint's or an export's) of the layout before `config.backbone` existed is translated on
reading by `upgrade_stored_config`.

The one override grammar of every command (`onenip_jax.cli`): `--config.KEY=VALUE`,
`--config.KEY VALUE`, and for booleans `--config.KEY` / `--noconfig.KEY`, parsed by
ml_collections' config_flags by the type of the value they replace.

Paths: after the overrides, every path setting (`PATH_KEYS`, and `DATASET_PATH_KEYS` in each entry
of `data.extra`) has `$VAR` / `${VAR}` and then a leading `~` expanded (`expand_path`; the CLI
applies the same to its path flags). A `scheme://` path (`gs://`, `ram://`) is left untouched; a
variable that is not set is an error naming the setting and the variable (`PathError`), never a
literal `$VAR` folder. Imports only absl, ml_collections and `data_pipelines.storage` (no
TensorFlow or JAX).
"""
import importlib.util
import os
import re

import ml_collections
from absl import flags
from ml_collections import config_flags

from data_pipelines import storage


class ConfigKeyError(ValueError):
  """An override names a key the config does not have, or one a stored run cannot change."""


class PathError(ConfigKeyError):
  """A path setting or flag names an environment variable that is not set (a ConfigKeyError, so
  every command reports it in one line)."""


# Config keys holding a file or folder path: `DATASET_PATH_KEYS` of `data` and of each entry of
# `data.extra`, and the others of `PATH_KEYS`.
DATASET_PATH_KEYS = ("root", "meta_train", "meta_test", "visa_csv", "tfds_data_dir")
PATH_KEYS = tuple(f"data.{k}" for k in DATASET_PATH_KEYS) + ("data.textures", "backbone.weights")

# Keys a stored run (a checkpoint or an export) fixes: its weights are of this model and input size.
STORED_RUN_KEYS = ("backbone", "model", "input_size")

# Old stored layout (everything in `model`) -> new: {old model key: (section, key)}.
_MOVED_MODEL_KEYS = {"backbone": ("backbone", "name"), "backbone_weights": ("backbone", "weights"),
                     "backbone_padding": ("backbone", "padding"),
                     "restoration": ("loss", "restoration")}

_OVERRIDE = re.compile(r"^--?(no)?config\.([^=]+)(=.*)?$")


def override_key(token: str) -> str | None:
  """'data.root' for '--config.data.root=x' (also '--noconfig.KEY', '--config.KEY'); else None."""
  m = _OVERRIDE.match(token)
  return m.group(2) if m else None


def is_override(token: str) -> bool:
  return override_key(token) is not None


def check_stored_run_overrides(overrides) -> None:
  """Fails, naming the key, for an override a stored run cannot take (`STORED_RUN_KEYS`)."""
  for token in _tokens(overrides):
    key = override_key(token)
    if key and key.split(".")[0] in STORED_RUN_KEYS:
      raise ConfigKeyError(
          f"config key {key!r} cannot be overridden for a stored run (from {token}): the "
          f"weights are of the stored {', '.join(k + '.*' if k != 'input_size' else k for k in STORED_RUN_KEYS)}")


def load_config(spec: str | None, overrides=(), base: ml_collections.ConfigDict | None = None):
  """Config from `path.py[:arg]` (or a copy of the stored run's `base`) with overrides applied.

  Args:
    spec: config file and its argument, or None for `base`.
    overrides: command-line tokens (`--config.KEY=VALUE`, `--config.KEY VALUE`, ...) or, for
      callers in Python, plain `KEY=VALUE` strings.
    base: the stored config of a checkpoint or export. With `base`, `STORED_RUN_KEYS` may not be
      overridden, and a config file's values for them are replaced by the stored ones.

  Raises:
    FileNotFoundError / ValueError (ConfigKeyError for a bad key) naming the file or key.
  """
  tokens = _tokens(overrides)
  if base is not None:
    check_stored_run_overrides(tokens)
  if spec:
    path, _, arg = spec.partition(":")
    path = expand_path(path, "--config")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"config file not found: {path}")
    module = load_python_file(path)
    if not callable(getattr(module, "get_config", None)):
      raise ValueError(f"config file {path} has no get_config(arg=None) function")
    cfg = module.get_config(arg) if arg else module.get_config()
    if base is not None:
      base = ml_collections.ConfigDict(upgrade_stored_config(base.to_dict()))
      with cfg.unlocked():
        for key in (k for k in STORED_RUN_KEYS if k in base):
          value = base[key]
          cfg[key] = _as_config(value.to_dict()) if isinstance(value, ml_collections.ConfigDict) else value
  elif base is not None:
    cfg = _as_config(upgrade_stored_config(base.to_dict()))
  else:
    raise ValueError("a config is needed: pass --config configs/X.py[:args]")
  return expand_paths(apply_overrides(cfg, tokens))


def expand_path(value: str, setting: str) -> str:
  """`value` with `$VAR`, `${VAR}` and a leading `~` expanded (`storage.expand_path`; URLs as
  they are). Raises PathError naming `setting` (a config key or flag) for an unset variable."""
  try:
    return storage.expand_path(value)
  except KeyError as e:
    raise PathError(f"{setting}={value!r}: environment variable {e.args[0]} is not set") from None


def expand_paths(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`cfg` with every path setting expanded in place by `expand_path` (module doc)."""
  for key in PATH_KEYS:
    if has_key(cfg, key):
      section, name = key.rsplit(".", 1)
      node = cfg[section]
      if isinstance(node[name], str):
        node[name] = expand_path(node[name], key)
  extra = cfg.data.get("extra") if has_key(cfg, "data") else None
  if extra:
    entries = []
    for i, entry in enumerate(extra):
      entry = entry if isinstance(entry, ml_collections.ConfigDict) else dict(entry)
      for name in DATASET_PATH_KEYS:
        if isinstance(entry.get(name), str):
          entry[name] = expand_path(entry[name], f"data.extra[{i}].{name}")
      entries.append(entry)
    cfg.data.extra = tuple(entries)
  return cfg


def load_python_file(path: str):
  """The module of the Python file at `path` (a config file, or a launch script's sibling), run
  without putting its folder on sys.path."""
  name = "_onenip_file_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
  module_spec = importlib.util.spec_from_file_location(name, path)
  if module_spec is None:
    raise ValueError(f"not a Python file: {path}")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


def upgrade_stored_config(stored: dict) -> dict:
  """A stored config dict (checkpoint or export) in the current layout; the one home of the
  translation of old layouts. Applied wherever a stored config is read, before any comparison.

  Layout 1 (before `config.backbone`): `model.backbone`, `model.backbone_weights` and
  `model.backbone_padding` become `backbone.name`, `.weights`, `.padding`; `model.dtype` also
  sets `backbone.dtype` (it was the dtype of both); `model.restoration` becomes
  `loss.restoration`. Before `config.calibration`, nothing was held out: such a config gets
  `calibration.holdout_fraction = 0` (so its run indexes, evaluates and resumes with the training
  set it had). Before layout "tfds", `data` had no `tfds_name` / `tfds_data_dir`: they get their
  defaults (""). Before `model.matmul_dtype`, the matmuls ran in `model.dtype`, with the attention
  layout now called 'einsum'. A config already in the current layout is returned unchanged (a copy).
  """
  out = {k: dict(v) if isinstance(v, dict) else v for k, v in stored.items()}
  if "calibration" not in out:
    out["calibration"] = {"holdout_fraction": 0.0}
  if isinstance(out.get("data"), dict) and "tfds_name" not in out["data"]:
    out["data"].update(tfds_name="", tfds_data_dir="")
  model = out.get("model")
  if isinstance(model, dict) and "matmul_dtype" not in model:
    model["matmul_dtype"] = model.get("dtype", "float32")
    model.setdefault("attention", "einsum")
  if "backbone" in out or not isinstance(model, dict) or "backbone" not in model:
    return out
  out["backbone"] = {"dtype": model.get("dtype", "float32")}
  for old, (section, key) in _MOVED_MODEL_KEYS.items():
    if old in model:
      out.setdefault(section, {})[key] = model.pop(old)
  return out


def apply_overrides(cfg: ml_collections.ConfigDict, tokens) -> ml_collections.ConfigDict:
  """`cfg` (unlocked) with `--config.*` tokens applied by config_flags; bad keys raise by name."""
  tokens = _tokens(tokens)
  for i, token in enumerate(tokens):
    key = override_key(token)
    if key is None:
      if i == 0 or not takes_value(tokens[i - 1]):
        raise ConfigKeyError(f"{token!r} is not a config override (--config.KEY=VALUE)")
    elif not has_key(cfg, key):
      raise ConfigKeyError(f"unknown config key {key!r} (from {token})")
  if not tokens:
    cfg.unlock()
    return cfg
  fv = flags.FlagValues()
  argv = ["config", *tokens]
  holder = config_flags.DEFINE_config_dict("config", cfg, flag_values=fv, lock_config=False,
                                           sys_argv=argv)
  try:
    left = fv(argv)[1:]
  except flags.Error as e:
    raise ConfigKeyError(str(e)) from e
  if left:
    raise ConfigKeyError(f"unexpected argument {left[0]!r} after the config overrides")
  holder.value.unlock()
  return holder.value


def has_key(cfg: ml_collections.ConfigDict, dotted: str) -> bool:
  node = cfg
  for part in dotted.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return False
    node = node[part]
  return True


def takes_value(token: str) -> bool:
  """'--config.KEY' without '=': the next token may be its VALUE."""
  return is_override(token) and "=" not in token and not token.lstrip("-").startswith("no")


def _tokens(overrides) -> list[str]:
  """Override tokens; a plain 'KEY=VALUE' (not the VALUE of '--config.KEY VALUE') gets the prefix."""
  out = []
  for item in overrides:
    if not item.startswith("-") and "=" in item and not (out and takes_value(out[-1])):
      item = f"--config.{item}"
    out.append(item)
  return out


def _tuples(tree):
  """JSON lists (a stored config) back to the tuples the config files use."""
  if isinstance(tree, dict):
    return {k: _tuples(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return tuple(_tuples(v) for v in tree)
  return tree


def _as_config(tree) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(_tuples(tree))
