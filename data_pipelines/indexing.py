"""Dataset indexing: every supported layout becomes one validated in-memory list of samples.

Layouts (`data.layout`):
  "mvtec"     folders `<root>/<class>/train/<normal>/*`, `<root>/<class>/test/<defect>/*`, masks
              `<root>/<class>/ground_truth/<defect>/<stem>[_mask].<ext>`; `<normal>` is `good`
              or `ok` (MVTec AD, BTAD, custom data). If `<root>` itself holds `train/`, it is one
              class named after the folder. Extensions: png/jpg/jpeg/bmp/tif/tiff, any case.
  "meta"      UniAD/OneNIP json-lines `data.meta_train` / `data.meta_test` (spec 1.1), paths
              relative to `data.root`, read as shipped (duplicates included). `defect` is the
              image's parent folder name for anomalies.
  "visa_csv"  VisA's `split_csv/1cls.csv` (`object,split,label,image,mask`), paths relative to
              root; `defect` is "anomaly" for anomalies.

`data.extra` holds more dataset configs (dicts with the same keys; a missing key takes the default
of `onenip_jax/base_config.py`, `skip_bad` that of the main config) merged into one class list. A class
name found in more than one dataset becomes `<tag>_<class>` in every dataset that has it, where
`tag` is the dataset config's optional `tag` key, else the root folder's name (e.g.
`mvtec_bottle`, `btad_01`); tags that collide get `_<i>` appended (i = dataset position, 0 = main).

Every image and mask is decoded in full once while indexing (PIL, in threads, with a progress bar;
PNG chunk checksums verified too), so a file damaged anywhere fails here rather than at the
training step that first reads it (the 2.1k files of ../shared/data/real: 1.3 s on 2 cores). One
`ValueError` lists every unreadable file; `data.skip_bad=True` turns each into one warning and
skips the sample (an unreadable mask drops only the mask). `index_dataset(..., verify_cache=F)`
remembers the intact files in F keyed by path, size and mtime: a resumed run does not decode
them again.

Anomalous test images without a mask keep `mask_path=None`. By default the pixel metrics skip them
(and metrics.json counts them); `eval.maskless="full"` scores them against an all-one mask as the
reference does (spec 1.1).
"""
import collections
import concurrent.futures
import csv
import dataclasses
import functools
import io
import json
import logging
import os
import re
from typing import Any, Iterable, Optional

import numpy as np
from PIL import Image

from data_pipelines import storage

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
NORMAL_FOLDERS = ("good", "ok")
_LAYOUTS = ("mvtec", "meta", "visa_csv")
_DATASET_KEYS_DEFAULTS = {
    "layout": "mvtec", "root": "", "classes": (), "meta_train": "", "meta_test": "",
    "visa_csv": "", "skip_bad": False}
_CACHE_VERSION = 1
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
  """
  path: str
  cls: str
  label: int
  mask_path: Optional[str] = None
  defect: str = "good"


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
      raise ValueError(f"unknown class {cls!r}; classes: {list(self.classes)}") from None

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
  """Plain dict of one dataset's keys; defaults for missing ones (`skip_bad` from `parent`)."""
  out = {key: _get(cfg, key, default) for key, default in _DATASET_KEYS_DEFAULTS.items()}
  if parent is not None:
    out["skip_bad"] = _get(cfg, "skip_bad", _get(parent, "skip_bad", False))
  out["tag"] = _get(cfg, "tag", "")
  out["extra"] = _get(cfg, "extra", ())
  return out


# ------------------------------------------------------------------------------------------------
# File checks


class _Unreadable(Exception):
  """An image or mask that fails validation (message names the file)."""


def _is_image_file(name: str) -> bool:
  return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _tensorflow():
  """TensorFlow where it is installed, else None: a machine that evaluates an export with the
  serialised predictor has none, and decodes (so verifies) with PIL."""
  from data_pipelines.tf_setup import import_tensorflow  # pylint: disable=g-import-not-at-top
  try:
    return import_tensorflow()
  except ImportError:
    return None


def _probe(path: str) -> tuple:
  """(width, height) of an image file after decoding all of it; `_Unreadable` naming it if not.

  The decoder is the one the pipelines use (TF for PNG and JPEG, which is stricter than PIL on
  damaged JPEG data; PIL for anything else, and for everything where TF is not installed), so a
  file damaged anywhere fails here, not at the training step that first reads it.
  """
  if not storage.isfile(path):
    raise _Unreadable(f"file not found: {path}")
  data = storage.read_bytes(path)
  if not data:
    raise _Unreadable(f"empty (zero-byte) image file: {path}")
  try:
    tf = _tensorflow() if data[:4] == b"\x89PNG" or data[:3] == b"\xff\xd8\xff" else None
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
    raise _Unreadable(f"unreadable image file {path}: {reason}") from None


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
    return cache["files"] if cache.get("version") == _CACHE_VERSION else {}
  except (OSError, ValueError, KeyError, TypeError, AttributeError):
    logger.warning("ignoring the unreadable image verification cache %s", cache_path)
    return {}


def _write_cache(cache_path: str, files: dict) -> None:
  """Writes the cache atomically (`storage.atomic_write`)."""
  storage.atomic_write(cache_path, json.dumps({"version": _CACHE_VERSION, "files": files}))


def _probe_all(paths: Iterable[str], cache_path: Optional[str] = None) -> dict:
  """{path: (w, h) or _Unreadable} for every distinct path, decoded in threads (PIL releases
  the GIL while decoding) with a progress bar. With `cache_path`, files whose size and mtime
  match the cache are not decoded again, and the intact ones are added to the cache."""
  unique = list(dict.fromkeys(p for p in paths if p))
  cache = _read_cache(cache_path)
  keys = {p: _file_key(p) for p in unique}
  out = {p: tuple(cache[p][2]) for p in unique
         if keys[p] is not None and p in cache and cache[p][:2] == keys[p]}
  todo = [p for p in unique if p not in out]

  def run(p):
    try:
      return _probe(p)
    except _Unreadable as e:
      return e

  if todo:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
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
              if not isinstance(r, _Unreadable) and keys[p] is not None}
      _write_cache(cache_path, {**cache, **good})
  return out


@dataclasses.dataclass
class _Record:
  """A sample before validation, with `where` naming its origin for error messages."""
  split: str
  path: str
  cls: str
  label: int
  mask_path: Optional[str]
  defect: str
  where: str = ""


def _validate(records: list, skip_bad: bool, dataset: str, cache_path: Optional[str]) -> list:
  """Checks the files of `records`; returns (split, Sample) pairs (warns/raises per module doc).

  Without `skip_bad`, one ValueError lists every unreadable file.
  """
  probes = _probe_all([r.path for r in records] + [r.mask_path for r in records if r.mask_path],
                      cache_path)
  out, bad = [], []
  missing_mask = collections.defaultdict(list)
  size_mismatch = []
  for r in records:
    where = f" ({r.where})" if r.where else ""
    img = probes[r.path]
    if isinstance(img, _Unreadable):
      bad.append(f"{img}{where}")
      if skip_bad:
        logger.warning("skipping %s%s (data.skip_bad=True)", img, where)
      continue
    mask_path = r.mask_path
    if mask_path:
      msk = probes[mask_path]
      if isinstance(msk, _Unreadable):
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
    raise ValueError(f"{dataset}: {len(bad)} unreadable file(s) (pass data.skip_bad=True to skip "
                     "them):\n  " + "\n  ".join(shown))
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
# Layouts


def _list_images(folder: str) -> list:
  return sorted(os.path.join(folder, n) for n in storage.listdir(folder)
                if _is_image_file(n) and storage.isfile(os.path.join(folder, n)))


def _subdirs(folder: str) -> list:
  return sorted(n for n in storage.listdir(folder)
                if not n.startswith(".") and storage.isdir(os.path.join(folder, n)))


def _mvtec_records(root: str) -> list:
  """Records of a folder-layout dataset (MVTec AD, BTAD, custom)."""
  if storage.isdir(os.path.join(root, "train")):
    class_dirs = [(os.path.basename(storage.normpath(root)), storage.normpath(root))]
  else:
    class_dirs = [(c, os.path.join(root, c)) for c in _subdirs(root)]
  if not class_dirs:
    raise ValueError(f"no class folders in data.root {root!r} (layout 'mvtec')")
  records = []
  for cls, cdir in class_dirs:
    train_dir = os.path.join(cdir, "train")
    normal_dirs = ([os.path.join(train_dir, d) for d in _subdirs(train_dir)
                    if d.lower() in NORMAL_FOLDERS] if storage.isdir(train_dir) else [])
    train = [p for d in normal_dirs for p in _list_images(d)]
    if not train:
      raise ValueError(
          f"class {cls!r}: no normal training image in {train_dir}/{{{','.join(NORMAL_FOLDERS)}}} "
          f"(class folder {cdir})")
    records += [_Record("train", p, cls, 0, None, "good") for p in train]
    test_dir = os.path.join(cdir, "test")
    if not storage.isdir(test_dir):
      logger.warning("class %r has no test folder %s", cls, test_dir)
      continue
    for defect in _subdirs(test_dir):
      normal = defect.lower() in NORMAL_FOLDERS
      masks = {}
      gt_dir = os.path.join(cdir, "ground_truth", defect)
      if not normal and storage.isdir(gt_dir):
        for m in _list_images(gt_dir):
          masks.setdefault(os.path.splitext(os.path.basename(m))[0], m)
      for p in _list_images(os.path.join(test_dir, defect)):
        stem = os.path.splitext(os.path.basename(p))[0]
        mask = None if normal else masks.get(stem + "_mask", masks.get(stem))
        records.append(_Record("test", p, cls, 0 if normal else 1, mask,
                               "good" if normal else defect))
  return records


def _meta_records(root: str, meta_file: str, split: str) -> list:
  """Records of one UniAD json-lines meta file (spec 1.1), duplicates kept."""
  if not meta_file:
    return []
  if not storage.isfile(meta_file):
    raise ValueError(f"meta file not found: {meta_file} (data.meta_{split})")
  records = []
  with storage.open(meta_file, "r") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"line {lineno} of {meta_file}"
      try:
        meta = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where} is not JSON ({e}): {line.strip()[:200]}") from None
      if not isinstance(meta, dict) or not meta.get("filename"):
        raise ValueError(f"{where} has no 'filename': {line.strip()[:200]}")
      rel = meta["filename"]
      parts = rel.replace("\\", "/").split("/")
      cls = meta.get("clsname") or (parts[-4] if len(parts) >= 4 else None)
      if not cls:
        raise ValueError(f"{where} has no 'clsname' and {rel!r} has under 4 path components")
      try:
        label = int(meta.get("label", 0))
      except (TypeError, ValueError):
        raise ValueError(f"{where}: label {meta.get('label')!r} is not 0/1") from None
      if label not in (0, 1):
        raise ValueError(f"{where}: label {label} is not 0/1")
      mask = meta.get("maskname") or None
      defect = "good" if label == 0 else (parts[-2] if len(parts) >= 2 else "defective")
      records.append(_Record(split, os.path.join(root, rel), str(cls), label,
                             os.path.join(root, mask) if mask else None, defect, where))
  return records


def _visa_records(root: str, csv_file: str) -> list:
  """Records of VisA's split csv (`object,split,label,image,mask`)."""
  if not csv_file:
    raise ValueError("data.visa_csv is empty (layout 'visa_csv')")
  if not storage.isfile(csv_file):
    raise ValueError(f"data.visa_csv not found: {csv_file}")
  records = []
  with storage.open(csv_file, "r") as f:
    reader = csv.DictReader(f)
    need = {"object", "split", "label", "image"}
    if not need <= set(reader.fieldnames or ()):
      raise ValueError(f"{csv_file}: columns {reader.fieldnames} lack {sorted(need)}")
    for lineno, row in enumerate(reader, 2):
      where = f"line {lineno} of {csv_file}"
      split, lab = row["split"].strip().lower(), row["label"].strip().lower()
      if split not in ("train", "test"):
        raise ValueError(f"{where}: split {row['split']!r} is not train/test")
      if lab not in ("normal", "anomaly"):
        raise ValueError(f"{where}: label {row['label']!r} is not normal/anomaly")
      label = int(lab == "anomaly")
      mask = (row.get("mask") or "").strip()
      records.append(_Record(split, os.path.join(root, row["image"].strip()), row["object"].strip(),
                             label, os.path.join(root, mask) if mask else None,
                             "anomaly" if label else "good", where))
  return records


def _index_one(dcfg: dict, cache_path: Optional[str] = None) -> tuple:
  """(train, test, classes) of one dataset config (no merging)."""
  layout, root = dcfg["layout"], dcfg["root"]
  if layout == "demo":  # the built-in demo: generated (once) in MVTec layout at data.root
    if not root:
      raise ValueError("data.root is empty: layout 'demo' needs the folder to generate the data in")
    from data_pipelines import demo_data  # pylint: disable=g-import-not-at-top
    layout, root = "mvtec", demo_data.make_demo_dataset(root)
  if layout not in _LAYOUTS:
    raise ValueError(f"unknown data.layout {layout!r}; supported: {list(_LAYOUTS) + ['demo']}")
  if not root or not storage.isdir(root):
    raise ValueError(f"data.root {root!r} does not exist or is not a folder")
  if layout == "mvtec":
    records = _mvtec_records(root)
  elif layout == "meta":
    if not dcfg["meta_train"]:
      raise ValueError("data.meta_train is empty (layout 'meta')")
    records = (_meta_records(root, dcfg["meta_train"], "train")
               + _meta_records(root, dcfg["meta_test"], "test"))
  else:
    records = _visa_records(root, dcfg["visa_csv"])
  found = list(dict.fromkeys(r.cls for r in records))
  wanted = list(dcfg["classes"] or ())
  if wanted:
    unknown = [c for c in wanted if c not in found]
    if unknown:
      raise ValueError(f"data.classes {unknown} not found in {root}; available: {found}")
    keep = set(wanted)
    records = [r for r in records if r.cls in keep]
    found = wanted
  samples = _validate(records, bool(dcfg["skip_bad"]), f"{layout} dataset {root}", cache_path)
  train = [s for split, s in samples if split == "train"]
  test = [s for split, s in samples if split == "test"]
  with_normal = {s.cls for s in train if s.label == 0}
  for c in found:
    if c not in with_normal:
      raise ValueError(f"class {c!r} of {root} has no normal training image")
  return train, test, tuple(found)


def index_dataset(data_cfg: Any, verify_cache: Optional[str] = None) -> DatasetIndex:
  """Indexes and validates `data_cfg` (config.data) and the datasets of `data_cfg.extra`.

  Args:
    data_cfg: a ConfigDict / mapping with the `data.*` keys of `onenip_jax/base_config.py`.
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
      raise ValueError(f"data.extra[{i - 1}] has its own 'extra'; nesting is not supported")
  parts = [_index_one(d, verify_cache) for d in dcfgs]
  if len(parts) == 1:
    train, test, classes = parts[0]
    return DatasetIndex(train=train, test=test, classes=classes)

  tags = []
  for i, d in enumerate(dcfgs):
    tag = d["tag"] or os.path.basename(storage.normpath(d["root"])) or f"data{i}"
    tags.append(tag if tag not in tags else f"{tag}_{i}")
  count = collections.Counter(c for _, _, classes in parts for c in set(classes))
  train, test, classes = [], [], []
  for tag, (tr, te, cl) in zip(tags, parts):
    rename = {c: (f"{tag}_{c}" if count[c] > 1 else c) for c in cl}
    for c in cl:
      if rename[c] in classes:
        raise ValueError(f"merged class name {rename[c]!r} (from {tag!r}) is not unique; set a "
                         "distinct 'tag' in the data.extra entries")
      classes.append(rename[c])
    train += [dataclasses.replace(s, cls=rename[s.cls]) for s in tr]
    test += [dataclasses.replace(s, cls=rename[s.cls]) for s in te]
  return DatasetIndex(train=train, test=test, classes=tuple(classes))


def split_holdout(index: DatasetIndex, fraction: float, seed: int) -> DatasetIndex:
  """Moves round(fraction * n) of each class's n normal training samples to `index.holdout`.

  The choice is a permutation seeded by (seed, class position), so it depends only on the seed and
  the class's own list. At least one image is held out when fraction > 0, and at least one stays
  for training (a class with a single normal image keeps it and holds none out).

  Raises:
    ValueError if `fraction` (config key calibration.holdout_fraction) is not in [0, 1).
  """
  if not 0.0 <= fraction < 1.0:
    raise ValueError(f"calibration.holdout_fraction={fraction!r}: must be in [0, 1)")
  if fraction == 0.0:
    return index
  out = set()
  for c_id, cls in enumerate(index.classes):
    rows = index.normal_train_indices(cls)
    k = min(max(1, int(round(fraction * len(rows)))), len(rows) - 1)
    if k <= 0:
      logger.warning("class %r has %d normal training image(s): none held out for calibration",
                     cls, len(rows))
      continue
    perm = np.random.default_rng([int(seed), c_id]).permutation(len(rows))
    out.update(rows[i] for i in perm[:k])
  return dataclasses.replace(index, train=[s for i, s in enumerate(index.train) if i not in out],
                             holdout=[s for i, s in enumerate(index.train) if i in out])


def index_config(cfg: Any, verify_cache: Optional[str] = None) -> DatasetIndex:
  """`index_dataset(cfg.data)` with the calibration hold-out of the experiment config `cfg`
  (`calibration.holdout_fraction`, seeded by `seed`; 0 or absent: none). Training, evaluation and
  calibration all index through this, so they agree on which images were trained on."""
  calib = _get(cfg, "calibration", None)
  fraction = float(_get(calib, "holdout_fraction", 0.0))
  return split_holdout(index_dataset(cfg.data, verify_cache), fraction, int(_get(cfg, "seed", 0)))


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
