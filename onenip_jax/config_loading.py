"""Configs from `get_config(arg)` files or stored runs, with `--config.KEY=VALUE` overrides.

The one override grammar of every command (`onenip_jax.cli`): `--config.KEY=VALUE`,
`--config.KEY VALUE`, and for booleans `--config.KEY` / `--noconfig.KEY`, parsed by
ml_collections' config_flags by the type of the value they replace. Imports only absl and
ml_collections (no TensorFlow or JAX).
"""
import importlib.util
import os
import re

import ml_collections
from absl import flags
from ml_collections import config_flags


class ConfigKeyError(ValueError):
  """An override names a key the config does not have, or one a stored run cannot change."""


# Keys a stored run (a checkpoint or an export) fixes: its weights are of this model and input size.
STORED_RUN_KEYS = ("model", "input_size")

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
          f"weights are of the stored {', '.join(k + '.*' if k == 'model' else k for k in STORED_RUN_KEYS)}")


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
    if not os.path.isfile(path):
      raise FileNotFoundError(f"config file not found: {path}")
    module_spec = importlib.util.spec_from_file_location("_onenip_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    cfg = module.get_config(arg) if arg else module.get_config()
    if base is not None:
      with cfg.unlocked():
        for key in (k for k in STORED_RUN_KEYS if k in base):
          value = base[key]
          cfg[key] = _as_config(value.to_dict()) if isinstance(value, ml_collections.ConfigDict) else value
  elif base is not None:
    cfg = _as_config(_tuples(base.to_dict()))
  else:
    raise ValueError("a config is needed: pass --config configs/X.py[:args]")
  return apply_overrides(cfg, tokens)


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
