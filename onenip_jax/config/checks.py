"""The value checks of a config, run by every command that takes one before any work is done.

`check_config(cfg)` raises `ConfigValueError` naming the first key whose value is out of range
(batch sizes, run length, input size, fractions and probabilities, learning rate, ...). A key the
config lacks (an older stored run) is not checked. Imports only the standard library and
`data_pipelines.errors`, so the CLI can check before it imports JAX or TensorFlow.
"""
import math
import numbers

from data_pipelines.errors import UserError

# input_size must be a multiple of this: the backbone's stride-32 stage, the neck's stride 16 and
# the Perlin noise cells.
INPUT_SIZE_MULTIPLE = 32

_MISSING = object()


class ConfigValueError(UserError):
  """A config value is out of range; the message names the key and the value."""


def _get(cfg, dotted: str):
  node = cfg
  for part in dotted.split("."):
    try:
      node = node[part]
    except (KeyError, TypeError, AttributeError):
      return _MISSING
  return node


def _is_int(v) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _int_at_least(lo: int):
  return lambda v: _is_int(v) and v >= lo, f"must be an integer >= {lo}"


def _real(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False):
  def ok(v):
    return (_is_real(v) and (v > lo if lo_open else v >= lo)
            and (v < hi if hi_open else v <= hi))
  text = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
  return ok, f"must be a number in {text}"


_POSITIVE = (lambda v: _is_real(v) and v > 0, "must be a number > 0")
_NON_NEGATIVE = (lambda v: _is_real(v) and v >= 0, "must be a number >= 0")
_FRACTION = _real(0.0, 1.0)

# key -> (predicate, what the value must be)
CHECKS = {
    "batch_size": _int_at_least(1),
    "eval.batch_size": (lambda v: _is_int(v) and v >= 0, "must be an integer >= 0 (0 = batch_size)"),
    "total_steps": (lambda v: _is_int(v) and v >= 0, "must be an integer >= 0 (0 = num_epochs)"),
    "num_epochs": _NON_NEGATIVE,
    "input_size": (lambda v: _is_int(v) and v > 0 and v % INPUT_SIZE_MULTIPLE == 0,
                   f"must be a positive multiple of {INPUT_SIZE_MULTIPLE}"),
    "log_every_steps": _int_at_least(1),
    "optim.lr": _POSITIVE,
    "optim.b1": _real(0.0, 1.0, hi_open=True),
    "optim.b2": _real(0.0, 1.0, hi_open=True),
    "optim.eps": _POSITIVE,
    "optim.weight_decay": _NON_NEGATIVE,
    "optim.grad_clip": _NON_NEGATIVE,
    "optim.lr_drop_factor": _NON_NEGATIVE,
    "optim.reference_batch_size": _int_at_least(1),
    "data.synthesis.p_cutpaste": _FRACTION,
    "data.synthesis.perlin_threshold": _FRACTION,
    "data.synthesis.beta_max": _FRACTION,
    "model.dropout": _real(0.0, 1.0, hi_open=True),
    "model.jitter_prob": _FRACTION,
    "model.hidden_dim": _int_at_least(1),
    "model.num_heads": _int_at_least(1),
    "model.ffn_dim": _int_at_least(1),
    "model.bn_group_size": _int_at_least(1),
    "eval.every_epochs": (lambda v: _is_int(v) and v >= 0, "must be an integer >= 0 (0 = at the end)"),
    "eval.alpha": _FRACTION,
    "eval.pool_size": _int_at_least(1),
    "eval.pool_k": _int_at_least(1),
    "eval.fusion_max_images": _int_at_least(1),
    "eval.max_heatmaps_per_class": (lambda v: _is_int(v) and v >= 0, "must be an integer >= 0"),
    "calibration.holdout_fraction": _real(0.0, 1.0, hi_open=True),
    "calibration.synthetic_per_image": _int_at_least(1),
    "calibration.weights": (lambda v: isinstance(v, (tuple, list)) and len(v) > 0
                            and all(_FRACTION[0](w) for w in v),
                            "must be a non-empty list of numbers in [0, 1]"),
    "calibration.pool_sizes": (lambda v: isinstance(v, (tuple, list)) and len(v) > 0
                               and all(_is_int(p) and p >= 1 for p in v),
                               "must be a non-empty list of integers >= 1"),
    "ckpt.every_steps": _int_at_least(1),
    "ckpt.keep": _int_at_least(1),
}


def check_config(cfg, keys=None) -> None:
  """Raises `ConfigValueError` for the first out-of-range value of `cfg` (a ConfigDict or dict).

  Also checks that the run has a length (total_steps > 0 or num_epochs > 0) and that
  model.hidden_dim is divisible by model.num_heads. With `keys` (dotted), only those keys and
  the rules that involve them are checked (e.g. the overrides of a stored run's config).
  """
  wanted = lambda *ks: keys is None or any(k in keys for k in ks)
  for key, (ok, must) in CHECKS.items():
    value = _get(cfg, key)
    if wanted(key) and value is not _MISSING and not ok(value):
      raise ConfigValueError(f"config.{key}={value!r}: {must}")
  steps, epochs = _get(cfg, "total_steps"), _get(cfg, "num_epochs")
  if (wanted("total_steps", "num_epochs") and steps is not _MISSING and epochs is not _MISSING
      and steps == 0 and epochs == 0):
    raise ConfigValueError("config.total_steps=0 and config.num_epochs=0: the run has no steps; "
                           "set one of them > 0")
  dim, heads = _get(cfg, "model.hidden_dim"), _get(cfg, "model.num_heads")
  if (wanted("model.hidden_dim", "model.num_heads") and dim is not _MISSING
      and heads is not _MISSING and dim % heads):
    raise ConfigValueError(f"config.model.hidden_dim={dim} must be divisible by "
                           f"config.model.num_heads={heads}")
