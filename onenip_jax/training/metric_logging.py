"""Metrics of a training run, written by process 0 only and off the training thread.

`MetricLogger(workdir)` writes through `clu.metric_writers` (one background thread, so a slow
file system never stalls a step):
  * TensorBoard event files in `<workdir>/tb` (tf.summary: any path tf.io.gfile serves, e.g. a
    local folder, gs:// or ram://): train scalars, every evaluation's mean and per-class metrics
    (`eval/<metric>`, `eval/<class>/<metric>`), heatmap contact sheets and the config as
    hyper-parameters;
  * one JSON line per scalar write in `<workdir>/train_log.jsonl` (also through tf.io.gfile).
On other processes every method does nothing.
"""
import io
import json
import logging
import math
import os
from typing import Any, Mapping

import jax
import numpy as np
from PIL import Image

from data_pipelines.tf_setup import import_tensorflow

log = logging.getLogger("onenip")

# The metrics of an evaluation that go to TensorBoard (others, e.g. n_images, stay in metrics.json).
EVAL_KEYS_SKIPPED = ("n_images",)


def _writers():
  """clu's metric_writers module (imported late: it pulls in TensorFlow and TensorBoard)."""
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  return metric_writers


def make_jsonl_writer(path: str):
  """A clu MetricWriter that appends each `write_scalars` call to `path` as one JSON line."""
  metric_writers = _writers()
  tf = import_tensorflow()

  class JsonlWriter(metric_writers.MetricWriter):
    """Scalars as JSON lines {"step": s, name: value, ...}; every other kind is not written."""

    def __init__(self):
      self._file = tf.io.gfile.GFile(path, "a")

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
      row = {"step": int(step), **{k: _plain(v) for k, v in scalars.items()}}
      self._file.write(json.dumps(row) + "\n")
      self._file.flush()

    def write_summaries(self, step, values, metadata=None):
      pass

    def write_images(self, step, images):
      pass

    def write_videos(self, step, videos):
      pass

    def write_audios(self, step, audios, *, sample_rate):
      pass

    def write_texts(self, step, texts):
      pass

    def write_histograms(self, step, arrays, num_buckets=None):
      pass

    def write_hparams(self, hparams):
      pass

    def flush(self):
      self._file.flush()

    def close(self):
      self._file.close()

  return JsonlWriter()


def _plain(v):
  """A JSON-friendly Python scalar."""
  v = np.asarray(v).item()
  return None if isinstance(v, float) and math.isnan(v) else v


def flat_config(cfg) -> dict:
  """{'a.b': value} of a ConfigDict, values as bool/int/float/str (TensorBoard's hparams types)."""
  out = {}

  def walk(tree, prefix):
    for k, v in tree.items():
      if isinstance(v, dict):
        walk(v, f"{prefix}{k}.")
      else:
        out[f"{prefix}{k}"] = v if isinstance(v, (bool, int, float, str)) else str(v)

  walk(json.loads(cfg.to_json_best_effort()), "")
  return out


def eval_scalars(result: Mapping) -> dict:
  """TensorBoard scalars of an evaluation result ({'mean': ..., 'classes': {cls: ...}})."""
  out = {f"eval/{k}": v for k, v in result["mean"].items()
         if v is not None and k not in EVAL_KEYS_SKIPPED}
  for cls, values in result.get("classes", {}).items():
    out.update({f"eval/{cls}/{k}": v for k, v in values.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)
                and k not in EVAL_KEYS_SKIPPED and v is not None})
  return out


def read_contact_sheets(eval_dir: str, max_classes: int = 4) -> dict:
  """{'heatmaps/<class>': (H, W, 3) uint8} from `<eval_dir>/heatmaps/<class>/contact_sheet.png`,
  written by evaluate when `eval.heatmaps` is on; {} when there are none."""
  tf = import_tensorflow()
  root = os.path.join(eval_dir, "heatmaps")
  if not tf.io.gfile.isdir(root):
    return {}
  images = {}
  for cls in sorted(tf.io.gfile.listdir(root))[:max_classes]:
    cls = cls.rstrip("/")
    path = os.path.join(root, cls, "contact_sheet.png")
    if tf.io.gfile.exists(path):
      with tf.io.gfile.GFile(path, "rb") as f:
        images[f"heatmaps/{cls}"] = np.asarray(Image.open(io.BytesIO(f.read())).convert("RGB"))
  return images


class MetricLogger:
  """Asynchronous metric writing of a run (process 0 only); `close()` waits for every write."""

  def __init__(self, workdir: str, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._writer = None
    if self.enabled:
      metric_writers = _writers()
      self._writer = metric_writers.AsyncMultiWriter([
          metric_writers.SummaryWriter(os.path.join(workdir, "tb")),
          make_jsonl_writer(os.path.join(workdir, "train_log.jsonl"))])

  def scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Train scalars of `step`: TensorBoard and one line of train_log.jsonl."""
    if self._writer is not None:
      self._writer.write_scalars(step, {k: _plain(v) for k, v in scalars.items()})

  def evaluation(self, step: int, result: Mapping, eval_dir: str | None = None) -> None:
    """An evaluation's mean and per-class metrics, and its heatmap contact sheets if any."""
    if self._writer is None:
      return
    self.scalars(step, eval_scalars(result))
    if eval_dir is not None:
      images = read_contact_sheets(eval_dir)
      if images:
        self._writer.write_images(step, images)

  def hparams(self, cfg) -> None:
    """The run's config as TensorBoard hyper-parameters (call once per run)."""
    if self._writer is not None:
      self._writer.write_hparams(flat_config(cfg))

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    """Waits for the pending writes and closes the files."""
    if self._writer is not None:
      self._writer.close()
      self._writer = None
