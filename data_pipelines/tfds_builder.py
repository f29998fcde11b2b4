"""`onenip-build-tfds`: a dataset (any layout `indexing` reads) -> TFDS TFRecord shards that
training, evaluation, export and the sweep read as `data.layout="tfds"` (`records.py`).

  onenip-build-tfds --config configs/mvtec.py --data-dir gs://BUCKET/tfds --name mvtec
  onenip-train --config configs/mvtec.py --workdir DIR --config.data.layout=tfds \
      --config.data.tfds_name=mvtec --config.data.tfds_data_dir=gs://BUCKET/tfds

The raw data stays where it is (TFDS "manual_dir" = `data.root`); the builder stores, for each
sample of the train and test splits, the ORIGINAL encoded bytes of image and mask, so decoding the
records gives exactly the pixels the file pipeline gives. Beside the shards it writes
`records.INDEX_FILE`: the source's data.* keys, its index (classes, samples in order, labels,
defects, source paths) and the byte range of every image and mask in the shards, so a host indexes
the data set without reading an image and then reads only its own samples' records.

A `data_dir` on another file system than the local one (gs://, ram://) is built in a local
temporary folder first, then copied there. A data set already built under the same name is kept
(built from another source config: ValueError).

Features per example: image (tf.string, encoded file), mask (tf.string, b"" when none), label
(0/1), class_id (int32, position in the merged class list), cls, defect, path (text), index
(int64, position in the split's list; meta-file duplicates are kept as separate examples).
"""
import dataclasses
import hashlib
import json
import logging
import struct
from typing import Any, Optional

import numpy as np

from data_pipelines import indexing, records, storage
from data_pipelines.errors import UserError
from data_pipelines.tf_setup import import_tensorflow

tf = import_tensorflow()  # GPUs hidden before tensorflow_datasets imports TensorFlow
import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top,wrong-import-position

log = logging.getLogger(__name__)


def _cfg_dict(data_cfg: Any) -> dict:
  """The source's dataset keys as a plain JSON-able dict, defaults filled in (for comparing,
  hashing and rebuilding)."""
  # pylint: disable-next=protected-access
  out = dict(indexing._dataset_cfg(data_cfg, data_cfg), classes=[], extra=[])
  if out["layout"] == "tfds":
    raise UserError("data.layout='tfds' is what this builds; give the source layout's config")
  del out["tfds_name"], out["tfds_data_dir"]
  out["classes"] = list(indexing._get(data_cfg, "classes", ()) or ())  # pylint: disable=protected-access
  out["extra"] = [_cfg_dict(e) for e in (indexing._get(data_cfg, "extra", ()) or ())]  # pylint: disable=protected-access
  return out


@dataclasses.dataclass
class IndexConfig(tfds.core.BuilderConfig):
  """BuilderConfig holding the `data.*` keys (as JSON) of the dataset to index."""
  data_json: str = "{}"


class OnenipIndex(tfds.core.GeneratorBasedBuilder):
  """Train/test splits of any dataset `indexing.index_dataset` reads, as TFRecords."""

  VERSION = tfds.core.Version(records.VERSION)
  RELEASE_NOTES = {"1.0.0": "Original encoded bytes of image and mask per sample.",
                   "1.1.0": "The sample index and every record's byte ranges beside the shards."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Put the dataset in the layout named by data.layout (mvtec folders, UniAD meta files or "
      "VisA split csv) and pass its root as manual_dir (or set data.root).")

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(), dtype=np.object_),
            "mask": tfds.features.Tensor(shape=(), dtype=np.object_),
            "label": tfds.features.Scalar(dtype=np.int64),
            "class_id": tfds.features.Scalar(dtype=np.int32),
            "cls": tfds.features.Text(),
            "defect": tfds.features.Text(),
            "path": tfds.features.Text(),
            "index": tfds.features.Scalar(dtype=np.int64),
        }),
        supervised_keys=None,
        disable_shuffling=True,  # records in index order
        description=__doc__)

  index: Optional[indexing.DatasetIndex] = None   # set by `build` (else indexed here)

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    index = self.index
    if index is None:
      data = json.loads(self.builder_config.data_json)
      if not data.get("root"):
        data["root"] = str(dl_manager.manual_dir)
      index = indexing.index_dataset(data)
    return {"train": self._generate_examples(index.train, index),
            "test": self._generate_examples(index.test, index)}

  def _generate_examples(self, samples, index):
    for i, s in enumerate(samples):
      image = s.read_image()
      mask = s.read_mask() if s.mask_path else b""
      yield i, {"image": image, "mask": mask, "label": int(s.label),
                "class_id": index.class_id(s.cls), "cls": s.cls, "defect": s.defect,
                "path": s.path, "index": i}


def _records(path: str):
  """(byte offset of the data, data) of each record of TFRecord file `path`, in order.

  The TFRecord framing: uint64 length, uint32 masked CRC of it, `length` bytes, uint32 CRC.
  """
  with storage.open(path, "rb") as f:
    offset = 0
    while True:
      head = f.read(12)
      if not head:
        return
      if len(head) != 12:
        raise UserError(f"{path}: truncated record header at byte {offset}")
      (length,) = struct.unpack("<Q", head[:8])
      data = f.read(length)
      if len(data) != length or len(f.read(4)) != 4:
        raise UserError(f"{path}: truncated record at byte {offset}")
      yield offset + 12, data
      offset += 12 + length + 4


def _byte_range(shard: str, offset: int, data: bytes, value: bytes) -> list:
  """[shard, offset, length] of `value` (a feature's bytes) inside the record `data` at `offset`."""
  at = data.find(value)
  if at < 0:
    raise UserError(f"{shard}: a record at byte {offset} does not hold its feature's bytes")
  return [shard, offset + at, len(value)]


def _index_rows(folder: str, filenames, samples) -> list:
  """The `records.INDEX_FILE` rows of one split: `samples` with the byte ranges of their
  records (found by their `index` feature) in the shards `filenames` of `folder`."""
  rows = [None] * len(samples)
  for shard in filenames:
    for offset, data in _records(storage.join(folder, shard)):
      feats = tf.train.Example.FromString(data).features.feature
      i = int(feats["index"].int64_list.value[0])
      image, mask = feats["image"].bytes_list.value[0], feats["mask"].bytes_list.value[0]
      s = samples[i]
      rows[i] = {"path": s.path, "cls": s.cls, "label": int(s.label), "defect": s.defect,
                 "mask_path": s.mask_path, "image": _byte_range(shard, offset, data, image),
                 "mask": _byte_range(shard, offset, data, mask) if s.mask_path else None}
  missing = [samples[i].path for i, r in enumerate(rows) if r is None]
  if missing:
    raise UserError(f"{folder}: {len(missing)} sample(s) have no record, e.g. {missing[0]}")
  return rows


def build(data_cfg: Any, data_dir: str, name: Optional[str] = None) -> str:
  """Indexes `data_cfg` (config.data) and writes its shards and index under `data_dir`.

  Args:
    data_cfg: the source's `data.*` keys (layout, root, classes, meta files, extra ...); an empty
      root is taken from TFDS's manual_dir.
    data_dir: TFDS data folder, local or any TF file system (gs://, ram://); the training
      config's data.tfds_data_dir.
    name: builder config name (data.tfds_name); default a hash of the dataset keys.

  Returns:
    The data set's folder (`records.dataset_dir`): shards, TFDS metadata, `records.INDEX_FILE`;
    locally `tfds.builder_from_directory` reads it as any TFDS data set.

  Raises:
    ValueError when `name` under `data_dir` was built from another source config.
  """
  cfg = _cfg_dict(data_cfg)
  data_json = json.dumps(cfg, sort_keys=True)
  name = name or "d" + hashlib.sha1(data_json.encode()).hexdigest()[:12]
  target = records.dataset_dir(data_dir, name)
  index_file = storage.join(target, records.INDEX_FILE)
  if storage.isfile(index_file):
    stored = json.loads(storage.read_text(index_file))["source"]
    if stored != cfg:
      raise UserError(f"{index_file} was built from another source config ({stored}), not "
                       f"{cfg}; choose another name or delete {target}")
    log.info("data set %r already built at %s", name, target)
    return target
  local = storage.is_local(data_dir)
  build_dir = data_dir if local else storage.staging_dir(target)
  config = IndexConfig(name=name, data_json=data_json,
                       description=f"layout {cfg.get('layout', 'mvtec')} at {cfg.get('root')}")
  builder = OnenipIndex(config=config, data_dir=build_dir, file_format="tfrecord")
  builder.index = index = indexing.index_dataset(cfg)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=cfg.get("root") or None))
  folder = str(builder.data_dir)
  meta = {"format": records.FORMAT, "source": cfg, "classes": list(index.classes)}
  for split, samples in (("train", index.train), ("test", index.test)):
    meta[split] = _index_rows(folder, builder.info.splits[split].filenames, samples)
  storage.atomic_write(storage.join(folder, records.INDEX_FILE), json.dumps(meta))
  if not local:
    storage.copytree(folder, target)
    storage.rmtree(build_dir)
  log.info("built data set %r (%d train, %d test samples, %d classes) at %s", name,
           len(index.train), len(index.test), len(index.classes), target)
  return target


def main(args) -> None:
  """`onenip-build-tfds`: args.config (loaded config), args.data_dir, args.name."""
  data = args.config.data
  if data.layout == "demo" and not data.root:
    raise UserError("layout 'demo' builds from the folder it generates the data in: set "
                     "--config.data.root")
  target = build(data, args.data_dir, args.name)
  log.info("train from it with --config.data.layout=tfds --config.data.tfds_name=%s "
           "--config.data.tfds_data_dir=%s (%s)", args.name, args.data_dir, target)
