"""Dataset indexing: every supported layout becomes one validated in-memory list of samples.

Layouts (`data.layout`): "mvtec" (folders), "meta" (UniAD json lines), "visa_csv" (VisA's split
csv) and "demo", read by `layouts.py` (see there); "tfds": record shards written by
`tfds_builder.py` from one of those, read by `records.py` (the same samples in the same order,
from the index stored with the shards: no image is read or decoded while indexing).

`data.extra` holds more dataset configs (dicts with the same keys; a missing key takes the default
of `onenip_jax/config/base.py`, `skip_bad` that of the main config) merged into one class list. A
class name found in more than one dataset becomes `<tag>_<class>` in every dataset that has it,
where `tag` is the dataset config's optional `tag` key, else the root folder's name (e.g.
`mvtec_bottle`, `btad_01`); tags that collide get `_<i>` appended (i = dataset position, 0 = main).

Every image and mask is decoded in full once while indexing (`image_checks.py`: in threads, with
a progress bar; PNG chunk checksums verified too), so a file damaged anywhere fails here rather
than at the training step that first reads it (the 2.1k files of ../shared/data/real: 1.3 s on 2 cores). One
`ValueError` lists every unreadable file; `data.skip_bad=True` turns each into one warning and
skips the sample (an unreadable mask drops only the mask), and one more warning counts them. An
image of more than `data.max_pixels` pixels (width x height, read from its header before any
decode; default `pil_decode.MAX_PIXELS`) counts as unreadable. `index_dataset(...,
verify_cache=F)` remembers the intact files in F keyed by path, size and mtime: a resumed run does
not decode them again.

Class names become output folders (`heatmaps/<class>`): a name that is empty, "." / "..", or holds
a "/" or "\\" (a meta file's `clsname`, a csv's `object`) is an error naming the index file line.

Anomalous test images without a mask keep `mask_path=None`. By default the pixel metrics skip them
(and metrics.json counts them); `eval.maskless="full"` scores them against an all-one mask as the
reference does (docs/algorithm.md §2.1).
"""
import collections
import dataclasses
import functools
import logging
import os
from typing import Any, Optional

import numpy as np

from data_pipelines import demo_data, image_checks, layouts, pil_decode, storage
from data_pipelines import records as record_shards
from data_pipelines.errors import UserError

logger = logging.getLogger(__name__)

_LAYOUTS = ("mvtec", "meta", "visa_csv")
_DATASET_KEYS_DEFAULTS = {
    "layout": "mvtec", "root": "", "classes": (), "meta_train": "", "meta_test": "",
    "visa_csv": "", "skip_bad": False, "max_pixels": pil_decode.MAX_PIXELS,
    "tfds_name": "", "tfds_data_dir": ""}
_MAX_LISTED = 20   # unreadable files listed in the error


@dataclasses.dataclass(frozen=True)
class Sample:
  """One image of the dataset.

  Attributes:
    path: image file path.
    cls: class name (after any merge prefix).
    label: 0 normal, 1 anomalous.
    mask_path: ground-truth mask path, None when there is none (normals; anomalies without mask).
    defect: "good" for normals, else the defect type (folder name).
    image_record, mask_record: (shard file, byte offset, length) of the encoded image / mask
      inside a record shard (layout "tfds"); () = read the file at path / mask_path.
  """
  path: str
  cls: str
  label: int
  mask_path: Optional[str] = None
  defect: str = "good"
  image_record: tuple = ()
  mask_record: tuple = ()

  def read_image(self) -> bytes:
    """The image's encoded bytes, from its record or its file."""
    return storage.read_range(*self.image_record) if self.image_record else \
        storage.read_bytes(self.path)

  def read_mask(self) -> bytes:
    """The mask's encoded bytes, from its record or its file (the sample must have a mask)."""
    return storage.read_range(*self.mask_record) if self.mask_record else \
        storage.read_bytes(self.mask_path)


@dataclasses.dataclass(frozen=True)
class DatasetIndex:
  """The train and test samples of one (possibly merged) dataset.

  Attributes:
    train: training samples (normals; duplicates of meta files kept), without the held-out ones.
    test: test samples.
    classes: class names; a class's id is its position here.
    holdout: normal training samples held out for calibration (`split_holdout`), never trained on.
  """
  train: list
  test: list
  classes: tuple
  holdout: list = dataclasses.field(default_factory=list)

  @functools.cached_property
  def _class_ids(self) -> dict:
    return {c: i for i, c in enumerate(self.classes)}

  def class_id(self, cls: str) -> int:
    """Id (position in `classes`) of class `cls`; ValueError naming the classes if unknown."""
    try:
      return self._class_ids[cls]
    except KeyError:
      raise UserError(f"unknown class {cls!r}; classes: {list(self.classes)}") from None

  def normal_train_indices(self, cls: str) -> list:
    """Positions in `train` of the normal (label 0) samples of class `cls`."""
    return [i for i, s in enumerate(self.train) if s.cls == cls and s.label == 0]


# ------------------------------------------------------------------------------------------------
# Config access


def _get(cfg: Any, key: str, default: Any) -> Any:
  """`cfg[key]` for ConfigDicts and plain mappings, `default` when absent."""
  if cfg is None:
    return default
  try:
    if key in cfg:
      return cfg[key]
  except TypeError:
    pass
  return getattr(cfg, key, default)


def _dataset_cfg(cfg: Any, parent: Any = None) -> dict:
  """Plain dict of one dataset's keys; defaults for missing ones (`skip_bad` and `max_pixels`
  from `parent`)."""
  out = {key: _get(cfg, key, default) for key, default in _DATASET_KEYS_DEFAULTS.items()}
  if parent is not None:
    for key in ("skip_bad", "max_pixels"):
      out[key] = _get(cfg, key, _get(parent, key, _DATASET_KEYS_DEFAULTS[key]))
  out["tag"] = _get(cfg, "tag", "")
  out["extra"] = _get(cfg, "extra", ())
  return out


# ------------------------------------------------------------------------------------------------
# Validation


def _validate(records: list, skip_bad: bool, dataset: str, cache_path: Optional[str],
              max_pixels: Optional[int] = None) -> list:
  """Checks the files of `records`; returns (split, Sample) pairs (warns/raises per module doc).

  Without `skip_bad`, one ValueError lists every unreadable file (an image over `max_pixels`
  pixels counts as unreadable).
  """
  probes = image_checks.probe_all(
      [r.path for r in records] + [r.mask_path for r in records if r.mask_path], cache_path,
      max_pixels=max_pixels, limit_name="data.max_pixels")
  out, bad = [], []
  missing_mask = collections.defaultdict(list)
  size_mismatch = []
  for r in records:
    where = f" ({r.where})" if r.where else ""
    img = probes[r.path]
    if isinstance(img, image_checks.Unreadable):
      bad.append(f"{img}{where}")
      if skip_bad:
        logger.warning("skipping %s%s (data.skip_bad=True)", img, where)
      continue
    mask_path = r.mask_path
    if mask_path:
      msk = probes[mask_path]
      if isinstance(msk, image_checks.Unreadable):
        bad.append(f"mask of {r.path}: {msk}{where}")
        if skip_bad:
          logger.warning("dropping the mask of %s: %s%s (data.skip_bad=True)", r.path, msk, where)
        mask_path = None
      elif msk != img:
        size_mismatch.append((mask_path, msk, r.path, img))
    if r.label == 1 and r.split == "test" and not mask_path:
      missing_mask[r.cls].append(r.path)
    out.append((r.split, Sample(r.path, r.cls, int(r.label), mask_path or None, r.defect)))
  bad = list(dict.fromkeys(bad))
  if bad and not skip_bad:
    shown = bad[:_MAX_LISTED] + ([f"... and {len(bad) - _MAX_LISTED} more"]
                                 if len(bad) > _MAX_LISTED else [])
    raise UserError(f"{dataset}: {len(bad)} unreadable file(s) (pass data.skip_bad=True to skip "
                    "them):\n  " + "\n  ".join(shown))
  if bad:
    logger.warning("%s: skipped %d unreadable file(s) (data.skip_bad=True)", dataset, len(bad))
  for cls, paths in missing_mask.items():
    logger.warning(
        "%s: class %r has %d anomalous test image(s) without a ground-truth mask (e.g. %s); "
        "pixel metrics skip them", dataset, cls, len(paths), paths[0])
  if size_mismatch:
    m, ms, p, ps = size_mismatch[0]
    logger.warning(
        "%s: %d mask(s) differ in size from their image, e.g. mask %s is %dx%d but image %s is "
        "%dx%d; masks are resized to the input size", dataset, len(size_mismatch), m, *ms, p, *ps)
  return out


# ------------------------------------------------------------------------------------------------
# Index


def _index_one(dcfg: dict, cache_path: Optional[str] = None) -> tuple:
  """(train, test, classes) of one dataset config (no merging)."""
  layout, root = dcfg["layout"], dcfg["root"]
  if layout == "tfds":  # record shards written by tfds_builder: their stored index, no decoding
    train, test, classes = record_shards.load_index(dcfg["tfds_data_dir"], dcfg["tfds_name"],
                                                    dcfg["classes"])
    return [Sample(**s) for s in train], [Sample(**s) for s in test], classes
  if layout == "demo":  # the built-in demo: generated (once) in MVTec layout at data.root
    if not root:
      raise UserError("data.root is empty: layout 'demo' needs the folder to generate the data in")
    layout, root = "mvtec", demo_data.make_demo_dataset(root)
  if layout not in _LAYOUTS:
    raise UserError(f"unknown data.layout {layout!r}; supported: "
                    f"{list(_LAYOUTS) + ['demo', 'tfds']}")
  if not root or not storage.isdir(root):
    raise UserError(f"data.root {root!r} does not exist or is not a folder")
  wanted = list(dcfg["classes"] or ())
  if layout == "mvtec":
    records = layouts.mvtec_records(root, wanted)
  elif layout == "meta":
    if not dcfg["meta_train"]:
      raise UserError("data.meta_train is empty (layout 'meta')")
    records = (layouts.meta_records(root, dcfg["meta_train"], "train")
               + layouts.meta_records(root, dcfg["meta_test"], "test"))
  else:
    records = layouts.visa_records(root, dcfg["visa_csv"])
  found = list(dict.fromkeys(r.cls for r in records))
  if wanted:
    unknown = [c for c in wanted if c not in found]
    if unknown:
      raise UserError(f"data.classes {unknown} not found in {root}; available: {found}")
    keep = set(wanted)
    records = [r for r in records if r.cls in keep]
    found = wanted
  for r in records:  # class names become output folders (heatmaps/<class>)
    storage.safe_name(r.cls, f"{r.where or 'a class folder of ' + root}: class name")
  max_pixels = dcfg["max_pixels"]
  samples = _validate(records, bool(dcfg["skip_bad"]), f"{layout} dataset {root}", cache_path,
                      None if max_pixels is None else int(max_pixels))
  train = [s for split, s in samples if split == "train"]
  test = [s for split, s in samples if split == "test"]
  with_normal = {s.cls for s in train if s.label == 0}
  for c in found:
    if c not in with_normal:
      raise UserError(f"class {c!r} of {root} has no normal training image")
  return train, test, tuple(found)


def index_dataset(data_cfg: Any, verify_cache: Optional[str] = None) -> DatasetIndex:
  """Indexes and validates `data_cfg` (config.data) and the datasets of `data_cfg.extra`.

  Args:
    data_cfg: a ConfigDict / mapping with the `data.*` keys of `onenip_jax/config/base.py`.
    verify_cache: optional JSON file (e.g. `<workdir>/verified_images.json`) remembering the
      files that decoded fine, keyed by path, size and mtime, so a resumed run skips them.

  Returns:
    DatasetIndex with the merged class list (see the module doc for the merge naming).

  Raises:
    ValueError naming the file, folder, class or config key at fault.
  """
  main = _dataset_cfg(data_cfg)
  extra = list(main["extra"] or ())
  dcfgs = [main] + [_dataset_cfg(e, parent=data_cfg) for e in extra]
  for i, d in enumerate(dcfgs[1:], 1):
    if d["extra"]:
      raise UserError(f"data.extra[{i - 1}] has its own 'extra'; nesting is not supported")
  parts = [_index_one(d, verify_cache) for d in dcfgs]
  if len(parts) == 1:
    train, test, classes = parts[0]
    return DatasetIndex(train=train, test=test, classes=classes)

  tags = []
  for i, d in enumerate(dcfgs):
    tag = (d["tag"] or (d["tfds_name"] if d["layout"] == "tfds" else "")
           or os.path.basename(storage.normpath(d["root"])) or f"data{i}")
    tags.append(tag if tag not in tags else f"{tag}_{i}")
  count = collections.Counter(c for _, _, classes in parts for c in set(classes))
  train, test, classes = [], [], []
  for tag, (tr, te, cl) in zip(tags, parts):
    rename = {c: (f"{tag}_{c}" if count[c] > 1 else c) for c in cl}
    for c in cl:
      storage.safe_name(rename[c], f"tag {tag!r} of data.extra: merged class name")
      if rename[c] in classes:
        raise UserError(f"merged class name {rename[c]!r} (from {tag!r}) is not unique; set a "
                        "distinct 'tag' in the data.extra entries")
      classes.append(rename[c])
    train += [dataclasses.replace(s, cls=rename[s.cls]) for s in tr]
    test += [dataclasses.replace(s, cls=rename[s.cls]) for s in te]
  return DatasetIndex(train=train, test=test, classes=tuple(classes))


def split_holdout(index: DatasetIndex, fraction: float, seed: int) -> DatasetIndex:
  """Moves round(fraction * n) of each class's n distinct normal training images to
  `index.holdout`.

  Images are told apart by path: a list that names one image several times (a meta file's
  repeats) moves all its copies to one side, and `holdout` holds each held-out image once. The
  choice is a permutation of the distinct images in order of first appearance, seeded by (seed,
  class position), so it depends only on the seed and the class's own list (a list without
  repeats splits by position as before). At least one image is held out when fraction > 0, and at
  least one stays for training (a class with a single normal image keeps it and holds none out).

  Raises:
    ValueError if `fraction` (config key calibration.holdout_fraction) is not in [0, 1).
  """
  if not 0.0 <= fraction < 1.0:
    raise UserError(f"calibration.holdout_fraction={fraction!r}: must be in [0, 1)")
  if fraction == 0.0:
    return index
  out, kept = set(), set()
  for c_id, cls in enumerate(index.classes):
    copies = {}  # path -> its positions in index.train
    for i in index.normal_train_indices(cls):
      copies.setdefault(index.train[i].path, []).append(i)
    images = list(copies.values())
    k = min(max(1, int(round(fraction * len(images)))), len(images) - 1)
    if k <= 0:
      logger.warning("class %r has %d normal training image(s): none held out for calibration",
                     cls, len(images))
      continue
    perm = np.random.default_rng([int(seed), c_id]).permutation(len(images))
    for j in perm[:k]:
      out.update(images[j])
      kept.add(images[j][0])
  return dataclasses.replace(index, train=[s for i, s in enumerate(index.train) if i not in out],
                             holdout=[s for i, s in enumerate(index.train) if i in kept])


def index_config(cfg: Any, verify_cache: Optional[str] = None) -> DatasetIndex:
  """`index_dataset(cfg.data)` with the calibration hold-out of the experiment config `cfg`
  (`calibration.holdout_fraction`, seeded by `seed`; 0 or absent: none). Training, evaluation and
  calibration all index through this, so they agree on which images were trained on."""
  calib = _get(cfg, "calibration", None)
  fraction = float(_get(calib, "holdout_fraction", 0.0))
  return split_holdout(index_dataset(cfg.data, verify_cache), fraction, int(_get(cfg, "seed", 0)))


def class_rows(samples, classes) -> list[tuple[str, np.ndarray]]:
  """[(class, positions in samples)] for the classes present, in `classes` order."""
  cls = np.asarray([s.cls for s in samples])
  return [(c, np.flatnonzero(cls == c)) for c in classes if np.any(cls == c)]


def test_set_gaps(classes, samples) -> list:
  """One message per class of `classes` whose test `samples` cannot give metrics: none at all, or
  no anomalous one (its AUROC, AP and F1 are then undefined); [] when every class has both."""
  gaps = []
  for c in classes:
    labels = [s.label for s in samples if s.cls == c]
    if not labels:
      gaps.append(f"class {c!r} has no test images: it gets no metrics")
    elif not any(labels):
      gaps.append(f"class {c!r} has no anomalous test images ({len(labels)} normal): its AUROC, AP "
                  "and F1 are undefined ('-')")
  return gaps


def summarize(index: DatasetIndex) -> str:
  """One line per class: train / test normal / test anomalous / masks counts."""
  rows = []
  for c in index.classes:
    tr = sum(s.cls == c for s in index.train)
    te = [s for s in index.test if s.cls == c]
    n_normal, n_anomalous = sum(s.label == 0 for s in te), sum(s.label == 1 for s in te)
    rows.append(f"{c}: train {tr}, test {n_normal} normal + {n_anomalous} anomalous, "
                f"{sum(bool(s.mask_path) for s in te)} masks")
  return "\n".join(rows)
