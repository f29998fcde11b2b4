"""The maps of a set of samples through a Flax `inference.Predictor`, on the host.

Shared by evaluation (`onenip_jax.evaluation.after_training`), the calibration's validation set
(`onenip_jax.evaluation.holdout`) and the export's thresholds (`onenip_jax.serving.thresholds`).
Maps are (N, H, W) float32 at `input_size`.
"""
import jax
import numpy as np

from data_pipelines import input_pipeline
from onenip_jax import sharding
from onenip_jax.evaluation import inference


def iterate_maps(predictor, samples, index, cfg, seed_positions=None, synthesis_seed=None):
  """Runs the Flax predictor over `samples` once each, yielding one host dict per batch.

  Yields:
    {'index' (b,) positions in `samples`, 'rec', 'ref' (b, H, W) float32 ('ref' None without
     refiner), 'mask' (b, H, W) bool, 'has_mask', 'label', 'class_id', 'pool_choice' (b,)} of the
    valid rows of each batch. `synthesis_seed`: score synthetic anomalies made from `samples`
    instead (`input_pipeline.make_eval_iterator`).
  """
  class_mode = predictor.pool is None
  keys = ("image", "mask", "has_mask", "label", "class_id", "index", "valid")
  keys += ("prompt",) if class_mode else ()
  for batch in input_pipeline.make_eval_iterator(
      samples, index, cfg, batch_size=inference.eval_batch_size(cfg),
      process_index=jax.process_index(), process_count=jax.process_count(), with_prompt=class_mode,
      seed_positions=seed_positions, synthesis_seed=synthesis_seed):
    g = sharding.to_global({k: batch[k] for k in keys}, predictor.mesh)
    maps = predictor(g["image"], g.get("prompt"))
    valid = sharding.to_host(g["valid"])
    out = {"index": sharding.to_host(g["index"])[valid],
           "rec": sharding.to_host(maps["rec"])[valid].astype(np.float32),
           "ref": None if maps["ref"] is None else
                  sharding.to_host(maps["ref"])[valid].astype(np.float32),
           "pool_choice": sharding.to_host(maps["pool_choice"])[valid],
           "mask": sharding.to_host(g["mask"])[valid][..., 0] > 0.5}
    for k in ("has_mask", "label", "class_id"):
      out[k] = sharding.to_host(g[k])[valid]
    yield out


def collect_maps(predictor, samples, index, cfg, seed_positions=None, synthesis_seed=None,
                 out=None) -> dict:
  """All maps of `samples` as host arrays ordered like `samples` (see `iterate_maps` for the keys).
  `out`: {key: (len(samples), ...) array} written in place of new arrays for those keys (e.g.
  views of a larger array)."""
  n, size = len(samples), cfg.input_size
  made = {"rec": lambda: np.zeros((n, size, size), np.float32), "ref": lambda: None,
          "mask": lambda: np.zeros((n, size, size), bool), "has_mask": lambda: np.zeros(n, bool),
          "label": lambda: np.zeros(n, np.int32), "class_id": lambda: np.zeros(n, np.int32),
          "pool_choice": lambda: np.full(n, -1, np.int32)}
  given = out or {}
  out = {k: given[k] if k in given else make() for k, make in made.items()}
  for b in iterate_maps(predictor, samples, index, cfg, seed_positions, synthesis_seed):
    idx = b["index"]
    if b["ref"] is not None and out["ref"] is None:
      out["ref"] = np.zeros((n, size, size), np.float32)
    for k in ("rec", "ref", "mask", "has_mask", "label", "class_id", "pool_choice"):
      if b[k] is not None:
        out[k][idx] = b[k]
  return out


def rec_range(predictor, samples, index, cfg) -> tuple[float, float]:
  """(min, max) of the reconstruction map over `samples`, streamed (no maps kept)."""
  lo, hi = np.inf, -np.inf
  for b in iterate_maps(predictor, samples, index, cfg):
    if len(b["rec"]):
      lo, hi = min(lo, float(b["rec"].min())), max(hi, float(b["rec"].max()))
  return lo, hi
