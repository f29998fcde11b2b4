"""Dataset layouts: the readers that turn one dataset folder (or its index file) into records.

Layouts (`data.layout`):
  "mvtec"     folders `<root>/<class>/train/<normal>/*`, `<root>/<class>/test/<defect>/*`, masks
              `<root>/<class>/ground_truth/<defect>/<stem>[_mask].<ext>`; `<normal>` is `good`
              or `ok` (MVTec AD, MPDD, BTAD's ok/ko, custom data). If `<root>` itself holds
              `train/`, it is one class named after the folder. Extensions: png/jpg/jpeg/bmp/tif/
              tiff, any case; a mask pairs with its image by stem whatever the two extensions.
  "meta"      UniAD/OneNIP json-lines `data.meta_train` / `data.meta_test` (docs/algorithm.md §2.1), paths
              relative to `data.root`, read as shipped (duplicates included). `defect` is the
              image's parent folder name for anomalies.
  "visa_csv"  VisA's split csv `data.visa_csv` (`object,split,label,image,mask`; label normal or
              anomaly), paths relative to root; "" = `<root>/split_csv/1cls.csv`, as downloaded.
              `defect` is "anomaly" for anomalies.

Records are not validated here: `indexing` decodes their files and turns them into samples.
"""
import csv
import dataclasses
import json
import logging
import os
from typing import Optional

from data_pipelines import storage
from data_pipelines.errors import UserError

logger = logging.getLogger(__name__)

NORMAL_FOLDERS = ("good", "ok")


@dataclasses.dataclass
class Record:
  """A sample before validation, with `where` naming its origin for error messages."""
  split: str
  path: str
  cls: str
  label: int
  mask_path: Optional[str]
  defect: str
  where: str = ""


def _list_images(folder: str) -> list:
  return sorted(os.path.join(folder, n) for n in storage.listdir(folder)
                if not n.startswith(".") and storage.is_image_name(n)
                and storage.isfile(os.path.join(folder, n)))


def _subdirs(folder: str) -> list:
  return sorted(n for n in storage.listdir(folder)
                if not n.startswith(".") and storage.isdir(os.path.join(folder, n)))


def mvtec_records(root: str, classes=()) -> list:
  """Records of a folder-layout dataset (MVTec AD, BTAD, custom); with `classes` (data.classes),
  only those class folders are read, so another folder (empty, say) does not stop the run."""
  if storage.isdir(os.path.join(root, "train")):
    class_dirs = [(os.path.basename(storage.normpath(root)), storage.normpath(root))]
  else:
    class_dirs = [(c, os.path.join(root, c)) for c in _subdirs(root)]
  if not class_dirs:
    raise UserError(f"no class folders in data.root {root!r} (layout 'mvtec')")
  if classes:
    names = [c for c, _ in class_dirs]
    unknown = [c for c in classes if c not in names]
    if unknown:
      raise UserError(f"data.classes {unknown} not found in {root}; available: {names}")
    class_dirs = [(c, d) for c, d in class_dirs if c in set(classes)]
  records = []
  for cls, cdir in class_dirs:
    train_dir = os.path.join(cdir, "train")
    normal_dirs = ([os.path.join(train_dir, d) for d in _subdirs(train_dir)
                    if d.lower() in NORMAL_FOLDERS] if storage.isdir(train_dir) else [])
    train = [p for d in normal_dirs for p in _list_images(d)]
    if not train:
      raise UserError(
          f"class {cls!r}: no normal training image in {train_dir}/{{{','.join(NORMAL_FOLDERS)}}} "
          f"(class folder {cdir})")
    records += [Record("train", p, cls, 0, None, "good") for p in train]
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
        # Paired by file stem, the extensions may differ: `<stem>_mask.*` (MVTec AD, MPDD), else
        # `<stem>.*` (BTAD: 01 has .bmp images and .png masks, 02 .png and .png, 03 .bmp and .bmp).
        mask = None if normal else masks.get(stem + "_mask", masks.get(stem))
        records.append(Record("test", p, cls, 0 if normal else 1, mask,
                               "good" if normal else defect))
  return records


def meta_records(root: str, meta_file: str, split: str) -> list:
  """Records of one UniAD json-lines meta file (docs/algorithm.md §2.1), duplicates kept."""
  if not meta_file:
    return []
  if not storage.isfile(meta_file):
    raise UserError(f"meta file not found: {meta_file} (data.meta_{split})")
  records = []
  with storage.open(meta_file, "r") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"line {lineno} of {meta_file}"
      try:
        meta = json.loads(line)
      except json.JSONDecodeError as e:
        raise UserError(f"{where} is not JSON ({e}): {line.strip()[:200]}") from None
      if not isinstance(meta, dict) or not meta.get("filename"):
        raise UserError(f"{where} has no 'filename': {line.strip()[:200]}")
      rel = meta["filename"]
      parts = rel.replace("\\", "/").split("/")
      cls = meta.get("clsname") or (parts[-4] if len(parts) >= 4 else None)
      if not cls:
        raise UserError(f"{where} has no 'clsname' and {rel!r} has under 4 path components")
      try:
        label = int(meta.get("label", 0))
      except (TypeError, ValueError):
        raise UserError(f"{where}: label {meta.get('label')!r} is not 0/1") from None
      if label not in (0, 1):
        raise UserError(f"{where}: label {label} is not 0/1")
      mask = meta.get("maskname") or None
      defect = "good" if label == 0 else (parts[-2] if len(parts) >= 2 else "defective")
      records.append(Record(split, os.path.join(root, rel), str(cls), label,
                             os.path.join(root, mask) if mask else None, defect, where))
  return records


def visa_records(root: str, csv_file: str) -> list:
  """Records of VisA's split csv (`object,split,label,image,mask`); "" = the download's 1cls.csv."""
  csv_file = csv_file or storage.join(root, "split_csv", "1cls.csv")
  if not storage.isfile(csv_file):
    raise UserError(f"data.visa_csv not found: {csv_file}")
  records = []
  with storage.open(csv_file, "r") as f:
    reader = csv.DictReader(f)
    need = {"object", "split", "label", "image"}
    if not need <= set(reader.fieldnames or ()):
      raise UserError(f"{csv_file}: columns {reader.fieldnames} lack {sorted(need)}")
    for lineno, row in enumerate(reader, 2):
      where = f"line {lineno} of {csv_file}"
      split, lab = row["split"].strip().lower(), row["label"].strip().lower()
      if split not in ("train", "test"):
        raise UserError(f"{where}: split {row['split']!r} is not train/test")
      if lab not in ("normal", "anomaly"):
        raise UserError(f"{where}: label {row['label']!r} is not normal/anomaly")
      label = int(lab == "anomaly")
      mask = (row.get("mask") or "").strip()
      records.append(Record(split, os.path.join(root, row["image"].strip()), row["object"].strip(),
                             label, os.path.join(root, mask) if mask else None,
                             "anomaly" if label else "good", where))
  return records
