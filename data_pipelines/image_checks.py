"""Full-decode checks of image files, and the cache that remembers the intact ones.

`probe` decodes a file in full with the decoder the pipelines use (TF for PNG and JPEG, PIL for
anything else or where TF is not installed), so a file damaged anywhere fails while indexing, not
at the training step that first reads it. A JPEG is also decoded by libjpeg-turbo in strict mode
(`simplejpeg`): libjpeg reports damaged entropy-coded data ("Corrupt JPEG data: ...") only as a
warning, which TF and PIL print or drop and decode garbled rows; here it is an error naming the
file. A JPEG carries no checksum, so damage that happens to leave a well-formed stream (a few in a
hundred random overwrites) still passes. `probe_all` runs it in threads with a progress bar and,
given a JSON cache file, skips files whose size and mtime match an earlier intact decode.
"""
import concurrent.futures
import io
import json
import logging
import os
import re
from typing import Iterable, Optional

import simplejpeg
from PIL import Image
from tqdm import tqdm

from data_pipelines import pil_decode, storage
from data_pipelines.tf_setup import import_tensorflow

logger = logging.getLogger(__name__)

CACHE_VERSION = 2   # 2: JPEGs decoded strictly (a version-1 cache may hold damaged JPEGs)


class Unreadable(Exception):
  """An image or mask that fails validation (message names the file)."""


def _tensorflow():
  """TensorFlow where it is installed, else None: a machine that evaluates an export with the
  serialised predictor has none, and decodes (so verifies) with PIL."""
  try:
    return import_tensorflow()
  except ImportError:
    return None


def _strict_jpeg(data: bytes) -> None:
  """Decodes JPEG bytes with libjpeg-turbo, its warnings raised as ValueError."""
  space = simplejpeg.decode_jpeg_header(data)[2]
  simplejpeg.decode_jpeg(data, colorspace={"Gray": "GRAY", "CMYK": "CMYK", "YCCK": "CMYK"}.get(
      space, "RGB"), strict=True)


def probe(path: str, max_pixels: Optional[int] = None, limit_name: str = "max_pixels") -> tuple:
  """(width, height) of an image file after decoding all of it; `Unreadable` naming it if not.

  The decoder is the one the pipelines use (TF for PNG and JPEG, which is stricter than PIL on
  damaged JPEG data; PIL for anything else, and for everything where TF is not installed), plus
  the strict libjpeg decode of a JPEG (module doc), so a file damaged anywhere fails here, not at
  the training step that first reads it. An image of more than `max_pixels` pixels (None: no
  limit; `limit_name` is the setting named in the message) fails from its header, undecoded.
  """
  if not storage.isfile(path):
    raise Unreadable(f"file not found: {path}")
  data = storage.read_bytes(path)
  if not data:
    raise Unreadable(f"empty (zero-byte) image file: {path}")
  try:
    if max_pixels is not None:
      pil_decode.check_pixels(pil_decode.image_size(data), max_pixels, limit_name)
  except ValueError as e:
    raise Unreadable(f"{path}: {e}") from None
  except Exception:  # pylint: disable=broad-except
    pass  # an unreadable header: the decode below names the reason
  try:
    is_jpeg = data[:3] == b"\xff\xd8\xff"
    if is_jpeg:
      _strict_jpeg(data)
    tf = _tensorflow() if data[:4] == b"\x89PNG" or is_jpeg else None
    if tf is not None:
      if data[:4] == b"\x89PNG":
        shape = tf.io.decode_png(data, channels=0, dtype=tf.uint16).shape
      else:
        shape = tf.io.decode_jpeg(data, dct_method="INTEGER_ACCURATE").shape
      return int(shape[1]), int(shape[0])
    with Image.open(io.BytesIO(data)) as im:
      im.load()
      return im.size
  except Exception as e:  # PIL and TF raise many types (OSError, SyntaxError, InvalidArgumentError)
    reason = re.sub(r"\{\{function_node [^}]*\}\}\s*|\s*\[Op:\w+\]", "", str(e)).strip()
    reason = reason.splitlines()[-1] if reason else type(e).__name__
    raise Unreadable(f"unreadable image file {path}: {reason}") from None


def _file_key(path: str) -> Optional[list]:
  """[size, mtime_ns] of `path` (what the verification cache is keyed by), None if absent.

  `ram://` reports mtime 0, so there only the size tells a changed file."""
  if not storage.exists(path):
    return None
  return list(storage.stat(path))


def _read_cache(cache_path: Optional[str]) -> dict:
  """{path: [size, mtime_ns, [w, h]]} of a verification cache; {} when absent or unreadable."""
  if not cache_path or not storage.isfile(cache_path):
    return {}
  try:
    cache = json.loads(storage.read_text(cache_path))
    return cache["files"] if cache.get("version") == CACHE_VERSION else {}
  except (OSError, ValueError, KeyError, TypeError, AttributeError):
    logger.warning("ignoring the unreadable image verification cache %s", cache_path)
    return {}


def _write_cache(cache_path: str, files: dict) -> None:
  """Writes the cache atomically (`storage.atomic_write`)."""
  storage.atomic_write(cache_path, json.dumps({"version": CACHE_VERSION, "files": files}))


def probe_all(paths: Iterable[str], cache_path: Optional[str] = None,
              max_pixels: Optional[int] = None, limit_name: str = "max_pixels") -> dict:
  """{path: (w, h) or Unreadable} for every distinct path, decoded in threads (PIL releases
  the GIL while decoding) with a progress bar. With `cache_path`, files whose size and mtime
  match the cache are not decoded again, and the intact ones are added to the cache. Images of
  more than `max_pixels` pixels are Unreadable (`probe`), cached ones too."""
  unique = list(dict.fromkeys(p for p in paths if p))
  cache = _read_cache(cache_path)
  keys = {p: _file_key(p) for p in unique}
  out = {p: tuple(cache[p][2]) for p in unique
         if keys[p] is not None and p in cache and cache[p][:2] == keys[p]}
  for p, size in out.items():
    try:
      pil_decode.check_pixels(size, max_pixels, limit_name)
    except ValueError as e:
      out[p] = Unreadable(f"{p}: {e}")
  todo = [p for p in unique if p not in out]

  def run(p):
    try:
      return probe(p, max_pixels, limit_name)
    except Unreadable as e:
      return e

  if todo:
    bar = tqdm(total=len(todo), desc="verifying images", unit="img", mininterval=1.0,
               disable=len(todo) < 64, leave=False)
    workers = min(16, 2 * (os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      for p, r in zip(todo, pool.map(run, todo)):
        out[p] = r
        bar.update(1)
    bar.close()
    if cache_path:
      good = {p: keys[p] + [list(r)] for p, r in out.items()
              if not isinstance(r, Unreadable) and keys[p] is not None}
      _write_cache(cache_path, {**cache, **good})
  return out
