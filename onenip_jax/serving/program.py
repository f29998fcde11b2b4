"""The serialised predictor of an export, run with jax, numpy and Pillow only.

This module imports nothing of flax, TensorFlow, Orbax or `onenip_jax.models` (only
`data_pipelines.pil_decode`, the pipeline's numpy/PIL decoder, `data_pipelines.storage`, which
imports TensorFlow only for a non-local path such as `gs://`, and `onenip_jax.evaluation.scoring`,
jax and numpy): it scores images on any machine with jax, numpy and Pillow. What it reads (written
by `onenip-export`, format version FORMAT_VERSION; an export of an older format is refused with the
command that re-exports it):

  export.json                 format and package version, classes, input size, preprocessing
                              (resize method, mean, std), fusion constant, `scoring` (the anomaly
                              map the program computes: its name, SCORING_KEYS values and box
                              size), `calibration` (the run's, or null), thresholds (each with how
                              it was made, on that scoring), the serialised platforms and the config
  predictor.jaxexport         `jax.export` serialisation (StableHLO) of the whole pool-mode predictor
                              f(weights, images (B, H, W, 3), pool features (K, h, w, C), pool
                              descriptors (K, C), pool class ids (K,), scoring (7,)) ->
                              (anomaly map (B, H, W), image score (B,), matched class id (B,)),
                              B and K symbolic, lowered for cpu and, when the installed jax can, cuda
                              and tpu
  predictor_weights.npz       the weights, leaves `w00000`, `w00001`, ... in the program's order
  prompt_pool.npz             features, descriptors and class_ids of the prompt pool

The map and image score are `onenip_jax.evaluation.scoring.score` of the `scoring` argument (the
vector of `scoring.SCORING_KEYS`): S = rec_weight (rec - rec_mean) / rec_std + ref_weight (g(ref) -
ref_mean) / ref_std, g the refiner's log-odds or the identity, and the max of its stride-1
`scoring.pool_size` box mean. This one form holds every scoring of `onenip-eval`: the calibrated one
(normal-data statistics, w; `onenip_jax.evaluation.calibration`), the reference fusion (means 0,
stds 1, weights 1 - alpha and alpha c), refiner or reconstruction only.

The weights and the scoring numbers are arguments stored beside the program rather than
constants inside it: the program stays small (a few hundred kB) whatever the backbone, its
serialisation does not copy hundreds of MB of constants through MLIR, the weights stay plain numpy
arrays anyone can inspect, the scoring stays readable (and editable) in export.json, and the same
program serves any retrained weights or scoring of the same architecture. Only the box size, a
shape, is compiled in.

Preprocessing is the eval pipeline's (`data_pipelines/input_pipeline.py`) redone in numpy: PIL
decoding, TF's antialiased bilinear resize (`tf.image.resize(..., antialias=True)`, the same spans,
weights and float32 order of operations), round to uint8, then (x / 255 - mean) / std. Masks: PIL
NEAREST's pixels, any non-zero value is a defect.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import json
import math
import os

import jax
import numpy as np

from data_pipelines import storage
from data_pipelines.errors import UserError, UserFileNotFoundError
from data_pipelines.pil_decode import pil_decode
from onenip_jax.evaluation import scoring

FORMAT_VERSION = 5
REEXPORT = "onenip-export --workdir RUN --out DIR"
PROGRAM_FILE = "predictor.jaxexport"
WEIGHTS_FILE = "predictor_weights.npz"
POOL_FILE = "prompt_pool.npz"
META_FILE = "export.json"
RESIZE_METHOD = "tf-bilinear-antialias"


# ------------------------------------------------------------------------------------------------
# Preprocessing


def decode_image(path: str | bytes, channels: int = 3) -> np.ndarray:
  """Any PIL-readable file (or its encoded bytes) -> uint8 (h, w, channels), decoded as the
  tf.data pipeline's PIL path."""
  return pil_decode(path if isinstance(path, bytes) else storage.read_bytes(path), channels)


@functools.lru_cache(maxsize=64)
def _triangle_spans(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
  """(starts (n_out,), weights (n_out, span)) of TF's ScaleAndTranslate, triangle kernel, antialias."""
  f32 = np.float32
  scale = f32(n_out) / f32(n_in)
  inv_scale = f32(1.0 / float(scale))
  kernel_scale = max(inv_scale, f32(1.0))
  span = min(2 * int(math.ceil(float(kernel_scale))) + 1, n_in)
  inv_kernel_scale = f32(1.0) / kernel_scale
  starts = np.zeros(n_out, np.int64)
  weights = np.zeros((n_out, span), np.float32)
  for x in range(n_out):
    sample = f32(x + 0.5) * inv_scale
    if sample < 0 or sample > n_in:
      continue
    start = min(max(int(math.ceil(float(sample - kernel_scale - f32(0.5)))), 0), n_in - 1)
    end = min(max(int(math.floor(float(sample + kernel_scale - f32(0.5)))), 0), n_in - 1) + 1
    total, ws = f32(0.0), []
    for source in range(start, end):
      pos = abs((f32(source) + f32(0.5) - sample) * inv_kernel_scale)
      w = f32(1.0) - pos if pos < 1.0 else f32(0.0)
      total = f32(total + w)
      ws.append(w)
    if abs(total) >= 1000.0 * np.finfo(np.float32).tiny:
      inv_total = f32(1.0) / total
      weights[x, :len(ws)] = np.asarray(ws, np.float32) * inv_total
    starts[x] = start
  return starts, weights


def _gather(image: np.ndarray, starts: np.ndarray, weights: np.ndarray, axis: int) -> np.ndarray:
  """Weighted spans along `axis`, accumulated in float32 in TF's order."""
  n = image.shape[axis]
  out = None
  for j in range(weights.shape[1]):
    src = np.take(image, np.minimum(starts + j, n - 1), axis=axis).astype(np.float32)
    w = weights[:, j].reshape((-1,) + (1,) * (image.ndim - 1 - axis))
    term = w * src
    out = term if out is None else out + term
  return out


def resize_bilinear(image: np.ndarray, size: int) -> np.ndarray:
  """uint8 (h, w, c) -> uint8 (size, size, c), as `tf.image.resize(bilinear, antialias=True)` + round."""
  rows = _gather(image, *_triangle_spans(image.shape[0], size), axis=0)
  out = _gather(rows, *_triangle_spans(image.shape[1], size), axis=1)
  return np.rint(np.clip(out, 0.0, 255.0)).astype(np.uint8)


def load_image(path: str | bytes, size: int) -> np.ndarray:
  """An image file (or its encoded bytes) -> the model's uint8 (size, size, 3) input pixels."""
  return resize_bilinear(decode_image(path, 3), size)


def normalize(images: np.ndarray, mean, std) -> np.ndarray:
  """uint8 (..., 3) -> float32 (x / 255 - mean) / std."""
  x = images.astype(np.float32) / np.float32(255.0)
  return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def _pil_nearest_table(n_in: int, n_out: int) -> np.ndarray:
  step = np.float64(n_in) / n_out
  steps = np.full(n_out, step)
  steps[0] = 0.5 * step
  return np.minimum(np.cumsum(steps).astype(np.int64), int(n_in) - 1)


def load_mask(path: str | bytes, size: int) -> np.ndarray:
  """A mask file (or its encoded bytes) -> bool (size, size): PIL NEAREST resize, any non-zero
  pixel is a defect."""
  m = decode_image(path, 1)[..., 0]
  m = m[_pil_nearest_table(m.shape[0], size)][:, _pil_nearest_table(m.shape[1], size)]
  return m > 0


# ------------------------------------------------------------------------------------------------
# The serialised predictor


def read_meta(export_dir: str) -> dict:
  """export.json of `export_dir`; clear errors for a missing, damaged, old or foreign file."""
  path = storage.join(export_dir, META_FILE)
  if not storage.isfile(path):
    raise UserFileNotFoundError(f"export is incomplete: {META_FILE} missing ({path})")
  try:
    meta = json.loads(storage.read_text(path))
  except json.JSONDecodeError as e:
    raise UserError(f"{path} is not valid JSON ({e}); the export is damaged") from e
  version = meta.get("format_version")
  if isinstance(version, int) and version < FORMAT_VERSION:
    raise UserError(f"{export_dir} is an export of format {version}, which this onenip-jax no "
                    f"longer reads (format {FORMAT_VERSION}); re-export the run: {REEXPORT}")
  if version != FORMAT_VERSION:
    raise UserError(f"{path}: export format version {version!r} is not supported by this "
                    f"onenip-jax (format {FORMAT_VERSION}); re-export the run: {REEXPORT}")
  return meta


def _load_npz(path: str) -> dict:
  if not storage.isfile(path):
    raise UserFileNotFoundError(f"export is incomplete: {os.path.basename(path)} missing ({path})")
  try:
    with np.load(io.BytesIO(storage.read_bytes(path))) as z:
      return {k: z[k] for k in z.files}
  except Exception as e:  # zipfile / format errors of a damaged file
    raise UserError(f"{path} cannot be read ({e}); the export is damaged") from e


def threshold_value(thresholds: dict | None, cls: str | None) -> float | None:
  """The per-class threshold of `cls` when there is one, else the global one, else None."""
  if not thresholds:
    return None
  entry = (thresholds.get("per_class") or {}).get(cls) if cls is not None else None
  entry = entry or thresholds.get("global")
  return None if entry is None else float(entry["value"])


@dataclasses.dataclass
class ExportedPredictor:
  """The serialised pool-mode predictor of an export directory.

  Attributes:
    meta: export.json.
    program: the deserialised `jax.export.Exported`.
    weights: its weight leaves; pool: {'features', 'descriptors', 'class_ids'}.
    batch_size: images per call (batches are padded to it, so one compilation serves all).
  """
  meta: dict
  program: jax.export.Exported
  weights: list
  pool: dict
  batch_size: int = 8

  @classmethod
  def load(cls, export_dir: str, batch_size: int = 8) -> "ExportedPredictor":
    meta = read_meta(export_dir)
    path = storage.join(export_dir, PROGRAM_FILE)
    if not storage.isfile(path):
      raise UserFileNotFoundError(f"export is incomplete: {PROGRAM_FILE} missing ({path})")
    data = storage.read_bytes(path)
    try:
      program = jax.export.deserialize(bytearray(data))
    except Exception as e:  # flatbuffer / version errors
      raise UserError(f"{path} cannot be deserialised ({type(e).__name__}: {e}); the export is "
                      "damaged or needs a newer jax") from e
    backend = jax.default_backend()
    if backend not in program.platforms:
      raise UserError(f"{path} was lowered for {program.platforms}, not for this machine's "
                      f"{backend!r}; re-export on a jax that can lower for it")
    raw = _load_npz(storage.join(export_dir, WEIGHTS_FILE))
    n = int(meta["program"]["n_weights"])
    missing = [f"w{i:05d}" for i in range(n) if f"w{i:05d}" not in raw]
    if missing:
      raise UserError(f"{storage.join(export_dir, WEIGHTS_FILE)} lacks {len(missing)} of {n} "
                      f"weights (e.g. {missing[0]}); the export is damaged")
    pool = _load_npz(storage.join(export_dir, POOL_FILE))
    pool["class_ids"] = pool["class_ids"].astype(np.int32)
    # On the device once, not copied at every call.
    weights = jax.device_put([raw[f"w{i:05d}"] for i in range(n)])
    pool = jax.device_put({k: pool[k] for k in ("features", "descriptors", "class_ids")})
    return cls(meta, program, weights, pool, batch_size)

  @property
  def scoring(self) -> dict:
    """export.json's `scoring`: {"fusion", "params": {scoring.SCORING_KEYS}, "pool_size", ...}."""
    return self.meta["scoring"]

  @property
  def classes(self) -> tuple[str, ...]:
    return tuple(self.meta["classes"])

  @property
  def input_size(self) -> int:
    return int(self.meta["input_size"])

  def preprocess(self, path: str | bytes) -> np.ndarray:
    """An image file (or its encoded bytes) -> normalised float32 (H, W, 3), as the eval
    pipeline."""
    pre = self.meta["preprocessing"]
    return normalize(load_image(path, self.input_size), pre["mean"], pre["std"])

  def __call__(self, images: np.ndarray) -> dict:
    """Normalised float32 (B, H, W, 3) -> {'map' (B, H, W) f32, 'score' (B,) f32, 'class_id' (B,)}
    of the export's scoring."""
    vector = scoring.vector(self.scoring["params"])
    images = np.asarray(images, np.float32)
    outs = []
    for i in range(0, len(images), self.batch_size):
      x = images[i:i + self.batch_size]
      n = len(x)
      if n < self.batch_size:
        x = np.concatenate([x, np.zeros((self.batch_size - n,) + x.shape[1:], np.float32)])
      m, s, k = self.program.call(self.weights, x, self.pool["features"],
                                  self.pool["descriptors"], self.pool["class_ids"], vector)
      outs.append((np.asarray(m)[:n], np.asarray(s)[:n], np.asarray(k)[:n]))
    size = self.input_size
    if not outs:
      return {"map": np.zeros((0, size, size), np.float32), "score": np.zeros(0, np.float32),
              "class_id": np.zeros(0, np.int32)}
    return {"map": np.concatenate([o[0] for o in outs]),
            "score": np.concatenate([o[1] for o in outs]),
            "class_id": np.concatenate([o[2] for o in outs]).astype(np.int32)}

  def threshold(self, cls: str | None) -> float | None:
    """The decision threshold for an image matched to class `cls` (per-class, else global)."""
    return threshold_value(self.meta.get("thresholds"), cls)
