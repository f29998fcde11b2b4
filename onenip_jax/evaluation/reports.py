"""Metric reports: `metrics.json`, `metrics.md` (paper-style table) and `metrics.csv`.

`metrics.json` layout (values are fractions in [0, 1] or null; n_images an int):

  {"classes": {"<class>": {"i_auroc": f, "i_ap": f, "p_auroc": f, "p_ap": f, "aupro": f,
                          "i_f1max": f, "p_f1max": f, "n_images": i}, ...},
   "mean": {same keys},
   "step": i or null,
   "config": {...} ({} when no config is given),
   ...extra keys}

Every file is written through `data_pipelines.storage.atomic_write` (a temporary name, then a
rename), so a reader never sees a half-written file; the folder may be local, `gs://` or `ram://`.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from data_pipelines import storage
from onenip_jax.evaluation.metrics import ALL_KEYS, METRIC_KEYS

PathLike = Union[str, os.PathLike]

COLUMN_TITLES = {
    "i_auroc": "I-AUROC",
    "i_ap": "I-AP",
    "p_auroc": "P-AUROC",
    "p_ap": "P-AP",
    "aupro": "AUPRO",
    "i_f1max": "I-F1",
    "p_f1max": "P-F1",
}
RESERVED_KEYS = ("classes", "mean", "step", "config")


def json_safe(obj: Any) -> Any:
  """Converts `obj` to plain JSON types.

  ConfigDicts (anything with `to_dict()`) and dataclasses become dicts, tuples/sets lists, numpy
  scalars and arrays Python numbers/lists, paths strings, NaN/inf None; anything else `str()`.
  """
  if obj is None or isinstance(obj, (bool, str)):
    return obj
  if isinstance(obj, (int, np.integer)):
    return int(obj)
  if isinstance(obj, (float, np.floating)):
    value = float(obj)
    return value if math.isfinite(value) else None
  if isinstance(obj, np.bool_):
    return bool(obj)
  if isinstance(obj, np.ndarray):
    return json_safe(obj.tolist())
  if hasattr(obj, "to_dict") and callable(obj.to_dict):
    return json_safe(obj.to_dict())
  if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
    return json_safe(dataclasses.asdict(obj))
  if isinstance(obj, Mapping):
    return {str(k): json_safe(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [json_safe(v) for v in obj]
  if isinstance(obj, (set, frozenset)):
    return [json_safe(v) for v in sorted(obj, key=str)]
  if isinstance(obj, os.PathLike):
    return os.fspath(obj)
  return str(obj)


def _check_row(name: str, row: Any, where: str) -> dict:
  """Validates one metrics row -> a plain dict with exactly ALL_KEYS."""
  if not isinstance(row, Mapping):
    raise ValueError(f"{where}: row {name!r} is not a mapping")
  keys = set(row)
  if keys != set(ALL_KEYS):
    raise ValueError(f"{where}: row {name!r} has keys {sorted(keys)}, expected {list(ALL_KEYS)}")
  out = {}
  for key in METRIC_KEYS:
    value = row[key]
    if value is not None:
      if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{where}: {name}.{key} = {value!r} is not a number or None")
      value = float(value)
      if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(f"{where}: {name}.{key} = {value} is outside [0, 1]")
    out[key] = value
  n = row["n_images"]
  if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
    raise ValueError(f"{where}: {name}.n_images = {n!r} is not a non-negative int")
  out["n_images"] = int(n)
  return out


def _check_metrics(metrics: Any, where: str) -> dict:
  """Validates a `summarize()` result -> {'classes': {...}, 'mean': {...}} of plain rows."""
  if not isinstance(metrics, Mapping) or "classes" not in metrics or "mean" not in metrics:
    raise ValueError(f"{where}: expected a mapping with 'classes' and 'mean'")
  if not isinstance(metrics["classes"], Mapping):
    raise ValueError(f"{where}: 'classes' is not a mapping")
  classes = {str(k): _check_row(str(k), v, where) for k, v in metrics["classes"].items()}
  return {"classes": classes, "mean": _check_row("mean", metrics["mean"], where)}


def _percent(value: Optional[float]) -> str:
  return "-" if value is None else f"{100.0 * value:.2f}"


def format_table(metrics: Mapping) -> str:
  """Paper-style Markdown table: one row per class plus 'mean', values in percent.

  Args:
    metrics: `summarize()` output (or a loaded `metrics.json`).
  Returns:
    The table, lines joined by '\\n' (no trailing newline); '-' marks a metric that is None.
  """
  checked = _check_metrics(metrics, "format_table")
  rows = list(checked["classes"].items()) + [("mean", checked["mean"])]
  header = ["class"] + [COLUMN_TITLES[k] for k in METRIC_KEYS]
  cells = [[name] + [_percent(row[k]) for k in METRIC_KEYS] for name, row in rows]
  cells[-1][0] = "**mean**"
  widths = [max(len(header[i]), *(len(r[i]) for r in cells)) for i in range(len(header))]

  def line(values):
    parts = [values[0].ljust(widths[0])] + [v.rjust(w) for v, w in zip(values[1:], widths[1:])]
    return "| " + " | ".join(parts) + " |"

  rule = "|" + "|".join([":" + "-" * (widths[0] + 1)] + ["-" * (w + 1) + ":" for w in widths[1:]])
  return "\n".join([line(header), rule + "|"] + [line(r) for r in cells])


def format_csv(metrics: Mapping) -> str:
  """CSV with columns class, the metric keys (fractions, empty for None) and n_images."""
  checked = _check_metrics(metrics, "format_csv")
  buf = io.StringIO()
  writer = csv.writer(buf, lineterminator="\n")
  writer.writerow(["class", *ALL_KEYS])
  rows = list(checked["classes"].items()) + [("mean", checked["mean"])]
  for name, row in rows:
    writer.writerow([name] + ["" if row[k] is None else repr(row[k]) for k in METRIC_KEYS]
                    + [row["n_images"]])
  return buf.getvalue()


def write_reports(out_dir: PathLike, metrics: Mapping, *, config: Any = None,
                  step: Optional[int] = None, extra: Optional[Mapping] = None,
                  sections: Optional[Mapping] = None, notes: Sequence[str] = ()) -> dict:
  """Writes metrics.json, metrics.md and metrics.csv into `out_dir` (created if missing).

  Args:
    out_dir: destination folder.
    metrics: `summarize()` output; validated (exact keys, values in [0, 1] or None).
    config: ConfigDict (via `to_dict()`), dict or None; stored JSON-safe under "config".
    step: training step stored under "step" (null if None).
    extra: more top-level JSON keys; must not clash with classes/mean/step/config.
    sections: {title: `summarize()` output} tables appended to metrics.md (e.g. each scoring).
    notes: lines printed under metrics.md's table (why a class has no row or '-' values).
  Returns:
    The JSON document that was written.
  """
  checked = _check_metrics(metrics, "write_reports")
  doc = {"classes": checked["classes"], "mean": checked["mean"],
         "step": None if step is None else int(step),
         "config": {} if config is None else json_safe(config)}
  if extra:
    clash = [k for k in extra if k in RESERVED_KEYS]
    if clash:
      raise ValueError(f"write_reports: extra keys {clash} clash with reserved {RESERVED_KEYS}")
    doc.update(json_safe(dict(extra)))
  text = json.dumps(doc, indent=2, allow_nan=False)
  title = "# Metrics" + ("" if step is None else f" (step {int(step)})")
  storage.atomic_write(storage.join(out_dir, "metrics.json"), text + "\n")
  md = f"{title}\n\n{format_table(checked)}\n"
  if notes:
    md += "\n" + "".join(f"- {n}\n" for n in notes)
  for name, table in (sections or {}).items():
    md += f"\n## {name}\n\n{format_table(_check_metrics(table, f'write_reports {name}'))}\n"
  storage.atomic_write(storage.join(out_dir, "metrics.md"), md)
  storage.atomic_write(storage.join(out_dir, "metrics.csv"), format_csv(checked))
  return doc


def read_metrics(path: PathLike) -> dict:
  """Loads and validates a metrics.json (or the one inside a folder).

  Args:
    path: the file, or a folder holding `metrics.json`.
  Returns:
    The JSON document (classes, mean, step, config, extra keys).
  Raises:
    FileNotFoundError: the file does not exist.
    ValueError: the file is not valid JSON or lacks the expected layout; the message names it.
  """
  path = os.fspath(path)
  if storage.isdir(path):
    path = storage.join(path, "metrics.json")
  text = storage.read_text(path)
  try:
    doc = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"malformed metrics file {path}: {e}") from None
  try:
    checked = _check_metrics(doc, "layout")
  except ValueError as e:
    raise ValueError(f"malformed metrics file {path}: {e}") from None
  doc.update(checked)
  return doc
