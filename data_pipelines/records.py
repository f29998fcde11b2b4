"""Layout "tfds": the sample index stored with the record shards, and random access to each record.

`tfds_builder.py` turns a source dataset config (any other layout) into TFDS TFRecord shards that
hold each sample's original encoded image and mask, and writes `INDEX_FILE` beside them:
  {"format": 1, "source": the source's data.* keys, "classes": [...],
   "train": [sample, ...], "test": [sample, ...]}
  sample: {"path", "cls", "label", "defect", "mask_path" (source paths; mask_path null without
           a mask), "image": [shard, offset, length], "mask": [shard, offset, length] | null}
Shard names are relative to the index's folder (`dataset_dir`), so the folder can be copied
anywhere (local disk, gs://). The lists are `indexing.index_dataset(source)`'s train and test
lists in order, so layout "tfds" gives the index of the source layout (same classes, samples,
order, hold-out split) without reading a single image.

Each encoded image is one byte range of one shard (`Sample.image_record`): a process reads only
the ranges of its own samples (`storage.read_range`: seek + read, on local files, gs:// and ram://;
`SampleBytes` in tf.data), never whole shards.
"""
import json
from typing import Any, Sequence

import numpy as np

from data_pipelines import storage
from data_pipelines.errors import UserError
from data_pipelines.tf_setup import import_tensorflow  # TensorFlow only when reading in tf.data

BUILDER_NAME = "onenip_index"   # the TFDS builder's name: <data_dir>/<BUILDER_NAME>/<name>/<VERSION>
VERSION = "1.1.0"
INDEX_FILE = "onenip_samples.json"
FORMAT = 1


def dataset_dir(data_dir: str, name: str) -> str:
  """The folder holding the shards and `INDEX_FILE` of data set `name` under TFDS's `data_dir`."""
  return storage.join(data_dir, BUILDER_NAME, name, VERSION)


def _sample(row: dict, folder: str) -> dict:
  rec = lambda r: (storage.join(folder, r[0]), int(r[1]), int(r[2])) if r else ()
  return {"path": row["path"], "cls": row["cls"], "label": int(row["label"]),
          "mask_path": row.get("mask_path") or None, "defect": row["defect"],
          "image_record": rec(row["image"]), "mask_record": rec(row.get("mask"))}


def load_index(data_dir: str, name: str, classes: Sequence[str] = ()) -> tuple:
  """(train, test, classes) of data set `name` in `data_dir` (data.tfds_data_dir, data.tfds_name);
  train and test are lists of `indexing.Sample` fields (dicts), in the source's order.

  `classes` (data.classes) keeps those classes, in that order; () keeps all.

  Raises:
    ValueError naming the setting or file at fault.
  """
  if not data_dir or not name:
    raise UserError("layout 'tfds' needs data.tfds_data_dir and data.tfds_name (got "
                     f"{data_dir!r}, {name!r})")
  folder = dataset_dir(data_dir, name)
  path = storage.join(folder, INDEX_FILE)
  if not storage.isfile(path):
    raise UserError(f"{path} not found: no data set data.tfds_name={name!r} built under "
                     f"data.tfds_data_dir={data_dir!r} (onenip-build-tfds)")
  try:
    meta = json.loads(storage.read_text(path))
  except json.JSONDecodeError as e:
    raise UserError(f"{path} is not JSON ({e})") from None
  if meta.get("format") != FORMAT:
    raise UserError(f"{path}: format {meta.get('format')!r}, this code reads {FORMAT}; rebuild it")
  found = list(meta["classes"])
  wanted = list(classes or ())
  unknown = [c for c in wanted if c not in found]
  if unknown:
    raise UserError(f"data.classes {unknown} not in {path}; available: {found}")
  keep = set(wanted or found)
  split = lambda key: [_sample(r, folder) for r in meta[key] if r["cls"] in keep]
  return split("train"), split("test"), tuple(wanted or found)


# ------------------------------------------------------------------------------------------------
# Reading in tf.data


class SampleBytes:
  """The encoded images (or masks) of a list of samples, read by position with TF ops.

  A sample with a record reads its byte range of the shard, one without its file. A list without
  records reads files only (`tf.io.read_file`, no Python in the graph).
  """

  def __init__(self, samples: Sequence[Any], mask: bool = False):
    """samples: `indexing.Sample`s; mask: read their masks instead (only those with one)."""
    self._tf = tf = import_tensorflow()
    recs = [s.mask_record if mask else s.image_record for s in samples]
    files = [r[0] if r else ((s.mask_path or "") if mask else s.path)
             for r, s in zip(recs, samples)]
    self._files, self._ranged = tf.constant(files, tf.string), any(recs)
    self._offsets = tf.constant([r[1] if r else -1 for r in recs], tf.int64)
    self._lengths = tf.constant([r[2] if r else 0 for r in recs], tf.int64)

  def read(self, i):
    """tf.string scalar: the encoded bytes of sample `i` (int scalar tensor)."""
    tf = self._tf
    path = tf.gather(self._files, i)
    if not self._ranged:
      return tf.io.read_file(path)
    offset, length = tf.gather(self._offsets, i), tf.gather(self._lengths, i)
    return tf.cond(offset < 0, lambda: tf.io.read_file(path),
                   lambda: tf.ensure_shape(tf.numpy_function(
                       _read_range, [path, offset, length], tf.string, stateful=False), []))


def _read_range(path, offset, length) -> np.ndarray:
  """`storage.read_range` for `tf.numpy_function`: the bytes as a 0-d object array."""
  return np.array(storage.read_range(path.decode(), int(offset), int(length)), dtype=object)
