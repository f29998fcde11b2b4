"""Loading `get_config(arg)` files outside absl (for onenip-eval / -export / -predict)."""
import ast
import importlib.util
import os

import ml_collections


class ConfigKeyError(ValueError):
  """An override names a key the config does not have."""


def load_config(spec: str | None, overrides=(), base: ml_collections.ConfigDict | None = None):
  """Config from `path.py[:arg]` (or a copy of `base` when spec is None) with `key=value` overrides.

  Raises:
    FileNotFoundError / ValueError (ConfigKeyError for an unknown key) naming the file or key.
  """
  if spec:
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"config file not found: {path}")
    module_spec = importlib.util.spec_from_file_location("_onenip_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    cfg = module.get_config(arg) if arg else module.get_config()
  elif base is not None:
    cfg = ml_collections.ConfigDict(base.to_dict())
  else:
    raise ValueError("a config is needed: pass --config configs/X.py[:args]")
  for item in overrides:
    key, sep, value = item.partition("=")
    if not sep:
      raise ValueError(f"override {item!r} is not KEY=VALUE")
    set_key(cfg, key.strip(), value.strip())
  return cfg


def set_key(cfg: ml_collections.ConfigDict, dotted: str, text: str) -> None:
  """cfg[dotted] = text parsed as a Python literal (strings may be bare); unknown keys raise."""
  *parents, leaf = dotted.split(".")
  node = cfg
  for p in parents:
    if p not in node or not isinstance(node[p], ml_collections.ConfigDict):
      raise ConfigKeyError(f"unknown config key {dotted!r}")
    node = node[p]
  if leaf not in node:
    raise ConfigKeyError(f"unknown config key {dotted!r}")
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    value = text
  with cfg.unlocked():
    node[leaf] = value
