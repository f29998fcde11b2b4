"""TFDS builder that turns an indexed dataset (`indexing.index_dataset`) into TFRecord shards.

The raw data stays where it is (TFDS "manual_dir" = `data.root`); the builder stores, for each
sample of the train and test splits, the ORIGINAL encoded bytes of image and mask, so reading the
records back and decoding them with `input_pipeline.decode` gives exactly the pixels the file
pipeline gives. Useful to ship one dataset as a few large files (object stores, TPU VMs).

  builder = tfds_builder.build(config.data, data_dir="/tmp/tfds", name="mvtec")
  ds = builder.as_dataset(split="test")   # dicts: image, mask (bytes), label, class_id, ...

Features per example: image (tf.string, encoded file), mask (tf.string, b"" when none), label
(0/1), class_id (int32, position in the merged class list), cls, defect, path (text), index
(int64, position in the split's list; meta-file duplicates are kept as separate examples).
"""
import dataclasses
import hashlib
import json
from typing import Any, Optional

import numpy as np

from data_pipelines import indexing, storage
from data_pipelines.tf_setup import import_tensorflow

import_tensorflow()  # GPUs hidden before tensorflow_datasets imports TensorFlow
import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top,wrong-import-position


def _cfg_dict(data_cfg: Any) -> dict:
  """The dataset keys of `data_cfg` as a plain JSON-able dict (for hashing and rebuilding)."""
  keys = ("layout", "root", "classes", "meta_train", "meta_test", "visa_csv", "skip_bad", "tag")
  get = indexing._get  # pylint: disable=protected-access
  out = {k: get(data_cfg, k, None) for k in keys}
  out = {k: v for k, v in out.items() if v is not None}
  out["classes"] = list(out.get("classes") or ())
  out["extra"] = [_cfg_dict(e) for e in (get(data_cfg, "extra", ()) or ())]
  return out


@dataclasses.dataclass
class IndexConfig(tfds.core.BuilderConfig):
  """BuilderConfig holding the `data.*` keys (as JSON) of the dataset to index."""
  data_json: str = "{}"


class OnenipIndex(tfds.core.GeneratorBasedBuilder):
  """Train/test splits of any dataset `indexing.index_dataset` reads, as TFRecords."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Original encoded bytes of image and mask per sample."}
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

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    data = json.loads(self.builder_config.data_json)
    if not data.get("root"):
      data["root"] = str(dl_manager.manual_dir)
    index = indexing.index_dataset(data)
    return {"train": self._generate_examples(index.train, index),
            "test": self._generate_examples(index.test, index)}

  def _generate_examples(self, samples, index):
    for i, s in enumerate(samples):
      image = storage.read_bytes(s.path)
      mask = storage.read_bytes(s.mask_path) if s.mask_path else b""
      yield i, {"image": image, "mask": mask, "label": int(s.label),
                "class_id": index.class_id(s.cls), "cls": s.cls, "defect": s.defect,
                "path": s.path, "index": i}


def build(data_cfg: Any, data_dir: str, name: Optional[str] = None) -> OnenipIndex:
  """Indexes `data_cfg` (config.data) and writes its TFRecords under `data_dir` if not there yet.

  Args:
    data_cfg: the `data.*` keys (layout, root, classes, meta files, extra ...); an empty root
      is taken from TFDS's manual_dir.
    data_dir: TFDS data folder.
    name: builder config name; default a hash of the dataset keys.

  Returns:
    The prepared builder (`.as_dataset(split="train" | "test")`).
  """
  cfg = _cfg_dict(data_cfg)
  data_json = json.dumps(cfg, sort_keys=True)
  name = name or "d" + hashlib.sha1(data_json.encode()).hexdigest()[:12]
  config = IndexConfig(name=name, data_json=data_json,
                       description=f"layout {cfg.get('layout', 'mvtec')} at {cfg.get('root')}")
  builder = OnenipIndex(config=config, data_dir=data_dir)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=cfg.get("root") or None))
  return builder
