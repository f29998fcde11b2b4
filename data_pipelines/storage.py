"""The one path layer: every file the project reads or writes goes through these functions.

Paths are plain strings. Two backends serve them:
  * local paths (no `scheme://`): `os`, `shutil` and `open`; TensorFlow is not imported, so the
    offline consumer (`onenip_jax/serving/program.py`) stays free of it;
  * any `scheme://` path (`gs://`, TensorFlow's in-memory `ram://`, ...): `tf.io.gfile`, imported on
    first use. tf.data reads the same paths with `tf.io.read_file`.

`etils.epath` is not used: it has no `ram://` (it raises KeyError for an unknown scheme).

Writes are atomic through `atomic_write` (a temporary name, then a rename). Locally the rename is
`os.replace`, atomic on POSIX. On `gs://` a rename is a copy then a delete; since an object only
appears once its upload is complete, a reader still never sees a half-written file, but two
concurrent writers race (the last rename wins). `ram://` renames one entry at a time as well.
Directories are never renamed on non-local schemes (`ram://` does not move a directory's
children): `move_dir` copies them instead (not atomic there).
"""
import io
import os
import re
import shutil
import tempfile
import uuid
from typing import Iterator, Union

from data_pipelines.errors import UserError
from data_pipelines.tf_setup import import_tensorflow  # TensorFlow itself only for gs:// paths

PathLike = Union[str, os.PathLike]

# File name endings (lower case) read as images everywhere: dataset layouts, predict inputs,
# validation folders, contact sheets. Textures take a subset (`textures.TEXTURE_EXTENSIONS`).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_CACHE_ENV = "ONENIP_CACHE_DIR"


def is_image_name(name: str) -> bool:
  """True for a file name ending in one of `IMAGE_EXTENSIONS` (any case)."""
  return name.lower().endswith(IMAGE_EXTENSIONS)


def cache_dir() -> str:
  """The project's cache folder: `$ONENIP_CACHE_DIR`, else `~/.cache/onenip_jax`.

  It holds the converted backbone weights, the scikit-image textures and the demo dataset.
  """
  return os.environ.get(_CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "onenip_jax")


def is_local(path: PathLike) -> bool:
  """True for a path of the local file system (no `scheme://` prefix)."""
  return "://" not in os.fspath(path)


_ENV_VAR = re.compile(r"\$(?:\{([A-Za-z_]\w*)\}|([A-Za-z_]\w*))", re.ASCII)


def expand_path(path: str) -> str:
  """`$VAR` / `${VAR}` and then a leading `~` / `~user` expanded in a local path; a URL unchanged.

  A `$` not followed by a variable name stays as it is. Raises KeyError naming a variable that is
  not set (no silent literal `$VAR` folder).
  """
  if not path or not is_local(path):
    return path

  def value(m):
    name = m.group(1) if m.group(1) is not None else m.group(2)
    if name not in os.environ:
      raise KeyError(name)
    return os.environ[name]

  return os.path.expanduser(_ENV_VAR.sub(value, path))


def scheme(path: PathLike) -> str:
  """'gs', 'ram', ... of a URL; '' for a local path."""
  path = os.fspath(path)
  return path.split("://", 1)[0] if "://" in path else ""


def _gfile():
  tf = import_tensorflow()
  return tf.io.gfile


def join(path: PathLike, *parts: str) -> str:
  return os.path.join(os.fspath(path), *parts)


def safe_name(name: str, what: str) -> str:
  """`name` when it is one plain file or folder name, else ValueError naming it and `what`.

  Names made from data (class, defect and file names) become output paths; refused are the empty
  name, "." and "..", and names holding a separator ("/" or "\\", so also absolute paths) or a
  NUL, any of which could put a file outside its output folder.
  """
  if (not isinstance(name, str) or name in ("", ".", "..")
      or any(c in name for c in ("/", "\\", "\0"))):
    raise UserError(f"{what} {name!r} cannot be a file or folder name: it must be non-empty, not "
                     "'.' or '..', and hold no '/' or '\\'")
  return name


def join_inside(base: PathLike, *names: str, what: str = "name") -> str:
  """`join(base, *names)` after `safe_name(n, what)` of every name: a path that stays in `base`."""
  return join(base, *(safe_name(n, what) for n in names))


def abspath(path: PathLike) -> str:
  """`~` expanded and made absolute for a local path; a URL unchanged."""
  path = os.fspath(path)
  return os.path.abspath(os.path.expanduser(path)) if is_local(path) else path


def normpath(path: PathLike) -> str:
  """`os.path.normpath` that keeps the `//` of a URL (normpath would turn `gs://b` into `gs:/b`)."""
  path = os.fspath(path)
  if is_local(path):
    return os.path.normpath(path)
  head, rest = path.split("://", 1)
  return f"{head}://{os.path.normpath(rest).lstrip('/')}"


def open(path: PathLike, mode: str = "r"):  # pylint: disable=redefined-builtin
  """A file object; text modes are UTF-8 with no newline translation."""
  path = os.fspath(path)
  if is_local(path):
    if "b" in mode:
      return io.open(path, mode)
    return io.open(path, mode, encoding="utf-8", newline="")
  return _gfile().GFile(path, mode)


def read_bytes(path: PathLike) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def read_range(path: PathLike, offset: int, length: int) -> bytes:
  """`length` bytes of file `path` from byte `offset` (a record inside a shard): only that range
  is read, on any backend. ValueError naming the file if it ends before."""
  with open(path, "rb") as f:
    f.seek(int(offset))
    data = f.read(int(length))
  if len(data) != int(length):
    raise UserError(f"{path}: {length} bytes expected at offset {offset}, the file has "
                     f"{len(data)} there (truncated or replaced since it was indexed?)")
  return data


def read_text(path: PathLike) -> str:
  return read_bytes(path).decode("utf-8")


def exists(path: PathLike) -> bool:
  path = os.fspath(path)
  return os.path.exists(path) if is_local(path) else _gfile().exists(path)


def isdir(path: PathLike) -> bool:
  path = os.fspath(path)
  return os.path.isdir(path) if is_local(path) else _gfile().isdir(path)


def isfile(path: PathLike) -> bool:
  path = os.fspath(path)
  if is_local(path):
    return os.path.isfile(path)
  return _gfile().exists(path) and not _gfile().isdir(path)


def listdir(path: PathLike) -> list:
  """Entry names (no trailing '/'), unsorted as the backend gives them."""
  path = os.fspath(path)
  if is_local(path):
    return os.listdir(path)
  return [n.rstrip("/") for n in _gfile().listdir(path)]


def walk(path: PathLike) -> Iterator:
  """(folder, subfolder names, file names) as `os.walk`, top-down."""
  path = os.fspath(path)
  if is_local(path):
    yield from os.walk(path)
  else:
    for d, subdirs, files in _gfile().walk(path):
      yield d, [s.rstrip("/") for s in subdirs], files


def makedirs(path: PathLike) -> None:
  """Creates `path` and its parents; no error when it exists."""
  path = os.fspath(path)
  if is_local(path):
    os.makedirs(path, exist_ok=True)
  else:
    _gfile().makedirs(path)


def remove(path: PathLike) -> None:
  path = os.fspath(path)
  if is_local(path):
    os.remove(path)
  else:
    _gfile().remove(path)


def rmtree(path: PathLike, missing_ok: bool = True) -> None:
  path = os.fspath(path)
  if missing_ok and not exists(path):
    return
  if is_local(path):
    shutil.rmtree(path)
  else:
    _gfile().rmtree(path)


def stat(path: PathLike) -> tuple:
  """(size in bytes, modification time in ns); `ram://` reports mtime 0."""
  path = os.fspath(path)
  if is_local(path):
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns
  st = _gfile().stat(path)
  return st.length, st.mtime_nsec


def rename(src: PathLike, dst: PathLike) -> None:
  """Moves file `src` onto `dst`, replacing it (atomic locally; see the module doc)."""
  src, dst = os.fspath(src), os.fspath(dst)
  if is_local(src) and is_local(dst):
    os.replace(src, dst)
  else:
    _gfile().rename(src, dst, overwrite=True)


def copytree(src: PathLike, dst: PathLike) -> None:
  """Copies the folder `src` to `dst` (which must not exist), across backends."""
  src, dst = os.fspath(src), os.fspath(dst)
  if is_local(src) and is_local(dst):
    shutil.copytree(src, dst)
    return
  for d, _, files in walk(src):
    target = join(dst, os.path.relpath(d, src)) if d != src else dst
    makedirs(target)
    for name in files:
      with open(join(d, name), "rb") as f, open(join(target, name), "wb") as g:
        g.write(f.read())


def atomic_write(path: PathLike, data: Union[bytes, str]) -> None:
  """Writes `data` (str: UTF-8) to a temporary name beside `path`, then renames it onto `path`.

  Creates the parent folders. Locally the temporary file is fsynced and `os.replace`d (atomic);
  on object stores the rename is a copy + delete (see the module doc): no half-written file is
  ever visible, but it is not one atomic step.
  """
  path = os.fspath(path)
  if isinstance(data, str):
    data = data.encode("utf-8")
  folder, name = os.path.split(path)
  if folder:
    makedirs(folder)
  if is_local(path):
    fd, tmp = tempfile.mkstemp(dir=folder or ".", prefix=f".{name}.", suffix=".tmp")
    try:
      with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, path)
    except BaseException:
      if os.path.exists(tmp):
        os.remove(tmp)
      raise
    return
  tmp = join(folder, f".{name}.{uuid.uuid4().hex}.tmp")
  try:
    with open(tmp, "wb") as f:
      f.write(data)
    rename(tmp, path)
  except BaseException:
    if exists(tmp):
      remove(tmp)
    raise


def staging_dir(target: PathLike) -> str:
  """A fresh empty local folder `.<name>.tmp_*` to build `target` in before `move_dir`: beside
  it when `target` is local (same file system, so the final move is a rename), else in the
  temporary folder."""
  target = os.fspath(target)
  prefix = f".{os.path.basename(target.rstrip('/'))}.tmp_"
  if is_local(target):
    parent = os.path.dirname(os.path.abspath(target))
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=prefix, dir=parent)
  return tempfile.mkdtemp(prefix=prefix)


def move_dir(src: PathLike, dst: PathLike) -> None:
  """Moves the folder `src` to `dst`, replacing `dst` (any backends).

  Both local: the old `dst` is removed, then `src` renamed (a reader may briefly see neither).
  Otherwise a copy, then `src` is deleted: a reader may see a partly copied folder.
  """
  src, dst = os.fspath(src), os.fspath(dst)
  rmtree(dst)
  if is_local(src) and is_local(dst):
    os.replace(src, dst)
  else:
    copytree(src, dst)
    rmtree(src)
