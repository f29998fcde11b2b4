"""Evaluation (spec 9-10) and the `onenip-eval` command.

  onenip-eval --workdir DIR                              # latest checkpoint of a training run
  onenip-eval --exported EXPORT_DIR --config configs/real.py [--out DIR]

Writes metrics.json / metrics.md / metrics.csv, per-image scores.csv (and heatmaps with --heatmaps) to
`<workdir>/eval/` (or `<exported>/eval/`) unless --out says otherwise.
"""
import argparse
import csv
import io
import logging
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from data_pipelines import input_pipeline
from onenip_jax import heatmaps, inference, metrics, reports, scoring, sharding

log = logging.getLogger("onenip")


def collect_maps(predictor: inference.Predictor, samples, index, cfg) -> dict:
  """Runs the predictor over `samples` once each; returns host arrays ordered like `samples`.

  Returns:
    {'rec', 'ref' (N, H, W) float16 ('ref' None without refiner), 'mask' (N, H, W) bool,
     'has_mask' (N,), 'label' (N,), 'class_id' (N,), 'pool_choice' (N,)}.
  """
  n, size = len(samples), cfg.input_size
  out = {"rec": np.zeros((n, size, size), np.float16), "ref": None,
         "mask": np.zeros((n, size, size), bool), "has_mask": np.zeros(n, bool),
         "label": np.zeros(n, np.int32), "class_id": np.zeros(n, np.int32),
         "pool_choice": np.full(n, -1, np.int32)}
  class_mode = predictor.pool is None
  keys = ("image", "mask", "has_mask", "label", "class_id", "index", "valid")
  keys += ("prompt",) if class_mode else ()
  for batch in input_pipeline.make_eval_iterator(
      samples, index, cfg, batch_size=inference._eval_batch(cfg),  # pylint: disable=protected-access
      process_index=jax.process_index(), process_count=jax.process_count(), with_prompt=class_mode):
    g = sharding.to_global({k: batch[k] for k in keys}, predictor.mesh)
    maps = predictor(g["image"], g.get("prompt"))
    valid = sharding.to_host(g["valid"])
    idx = sharding.to_host(g["index"])[valid]
    out["rec"][idx] = sharding.to_host(maps["rec"])[valid]
    if maps["ref"] is not None:
      if out["ref"] is None:
        out["ref"] = np.zeros((n, size, size), np.float16)
      out["ref"][idx] = sharding.to_host(maps["ref"])[valid]
    out["pool_choice"][idx] = sharding.to_host(maps["pool_choice"])[valid]
    out["mask"][idx] = sharding.to_host(g["mask"])[valid][..., 0] > 0.5
    for k in ("has_mask", "label", "class_id"):
      out[k][idx] = sharding.to_host(g[k])[valid]
  return out


def fused_maps(maps: dict, rows: np.ndarray, c: float, alpha: float) -> np.ndarray:
  """(len(rows), H, W) float32 anomaly maps S = (1-alpha) rec + alpha c ref (rec alone without refiner)."""
  rec = maps["rec"][rows].astype(np.float32)
  if maps["ref"] is None:
    return rec
  return np.asarray(scoring.fuse(rec, maps["ref"][rows].astype(np.float32), c, alpha))


def image_scores(anomaly_maps: np.ndarray, pool_size: int, chunk: int = 64) -> np.ndarray:
  """(N, H, W) -> (N,) max of the stride-1 `pool_size` box-filtered map."""
  return np.concatenate([
      np.asarray(scoring.image_scores(jnp.asarray(anomaly_maps[i:i + chunk, ..., None]), pool_size))
      for i in range(0, len(anomaly_maps), chunk)]) if len(anomaly_maps) else np.zeros(0)


def score_and_report(maps: dict, index, samples, cfg, c: float, out_dir: str, *, step=None,
                     extra=None) -> dict:
  """Per-class metrics of fused maps with constant `c`; writes the reports (process 0)."""
  per_class, score_rows = {}, [("path", "class", "defect", "label", "score")]
  empty = empty_defect_masks(maps, samples, cfg.input_size)
  for cid, cls in enumerate(index.classes):
    rows = np.flatnonzero(maps["class_id"] == cid)
    if not len(rows):
      continue
    s = fused_maps(maps, rows, c, cfg.eval.alpha)
    has_mask = maps["has_mask"][rows]
    # Image label from the resized mask (spec 10); images without a mask keep their own label.
    labels = np.where(has_mask, maps["mask"][rows].any(axis=(1, 2)), maps["label"][rows] > 0)
    scores = image_scores(s, cfg.eval.pool_size)
    score_rows += [(samples[i].path, cls, samples[i].defect, int(l), f"{v:.7g}")
                   for i, l, v in zip(rows, labels, scores)]
    pix = has_mask | (labels == 0)
    per_class[cls] = metrics.class_metrics(
        scores, labels.astype(np.int32), s[pix] if pix.any() else None,
        maps["mask"][rows][pix] if pix.any() else None, flip_auroc=cfg.eval.flip_auroc)
    if cfg.eval.heatmaps and jax.process_index() == 0:
      _write_heatmaps(os.path.join(out_dir, "heatmaps", cls), [samples[i] for i in rows], s,
                      maps["mask"][rows], scores, cfg)
  result = metrics.summarize(per_class)
  extra = dict(extra or {}, n_empty_defect_masks=len(empty), empty_defect_masks=empty)
  if jax.process_index() == 0:
    reports.write_reports(out_dir, result, config=cfg, step=step, extra=extra)
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows(score_rows)
    reports.atomic_write_text(os.path.join(out_dir, "scores.csv"), text.getvalue())
  return result


def empty_defect_masks(maps: dict, samples, size: int) -> list:
  """Paths of defect images whose mask is all zero at `size` px (each warned about by name).

  Such an image is scored as normal (the image label comes from the resized mask, spec 10):
  an empty mask file, or a defect too small to survive the resize.
  """
  rows = np.flatnonzero(maps["has_mask"] & (maps["label"] > 0) & ~maps["mask"].any(axis=(1, 2)))
  paths = [samples[i].path for i in rows]
  for i in rows:
    log.warning("the mask of defect image %s (%s) is all zero at %d px: the image counts as "
                "normal in the metrics", samples[i].path, samples[i].mask_path, size)
  return paths


def _write_heatmaps(out_dir, samples, anomaly_maps, masks, scores, cfg) -> None:
  """Up to `eval.max_heatmaps_per_class` PNGs (defective images first, then normal ones) and a
  contact sheet of them."""
  os.makedirs(out_dir, exist_ok=True)
  vmax = float(np.percentile(anomaly_maps, 99.9)) if anomaly_maps.size else 1.0
  n = cfg.eval.max_heatmaps_per_class
  bad = [i for i, s in enumerate(samples) if s.label]
  good = [i for i, s in enumerate(samples) if not s.label]
  chosen = sorted(bad[:n - min(len(good), n // 2)] + good[:max(n // 2, n - len(bad))])
  paths = []
  for i in chosen:
    sample = samples[i]
    image = input_pipeline.load_image(sample.path, cfg.input_size, None, None)
    stem = os.path.splitext(os.path.basename(sample.path))[0]
    path = os.path.join(out_dir, f"{sample.defect}_{stem}.png")
    heatmaps.save_heatmap(path, image, anomaly_maps[i], masks[i] if masks[i].any() else None,
                          float(scores[i]), vmin=float(anomaly_maps.min()), vmax=vmax,
                          title=f"{sample.cls}/{sample.defect}")
    paths.append(path)
  if paths:
    heatmaps.contact_sheet(paths, os.path.join(out_dir, "contact_sheet.png"))


def fusion_constant(cfg, maps: dict, frozen_c: float) -> tuple[float, str]:
  """The fusion constant: the stored frozen one, or the test-set mid-range ('reference' mode)."""
  mode = cfg.eval.fusion
  if mode == "frozen" and not np.isnan(frozen_c):
    return float(frozen_c), "frozen"
  if mode not in ("frozen", "reference"):
    raise ValueError(f"config.eval.fusion={mode!r}: use 'frozen' or 'reference'")
  rec = maps["rec"]
  return float(scoring.mid_range(rec.min(), rec.max())), "reference"


def evaluate_predictor(cfg, predictor, index, out_dir: str, frozen_c: float, *, step=None,
                       samples=None) -> dict:
  """Scores `samples` (default: the test set) and writes the reports to `out_dir`."""
  samples = index.test if samples is None else samples
  maps = collect_maps(predictor, samples, index, cfg)
  c, mode = fusion_constant(cfg, maps, frozen_c)
  extra = {"fusion": mode, "fusion_c": c, "prompt_mode": cfg.eval.prompt_mode}
  if predictor.pool is not None:
    picked = predictor.pool.class_ids[maps["pool_choice"]]
    extra["pool_class_accuracy"] = float(np.mean(picked == maps["class_id"]))
  result = score_and_report(maps, index, samples, cfg, c, out_dir, step=step, extra=extra)
  log.info("eval step %s (%s fusion c=%.4f, %s prompts) -> %s\n%s", step, mode, c,
           cfg.eval.prompt_mode, out_dir, reports.format_table(result))
  return result


def evaluate_state(cfg, state, index, features, backbone_vars, mesh, out_dir: str) -> dict:
  """Evaluation of a train state (periodic and final evaluation during training)."""
  model, _ = inference.make_model(cfg)
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  predictor = inference.make_predictor(cfg, model, features, variables, backbone_vars, mesh, index)
  frozen_c = float(np.asarray(state.fusion_c.addressable_data(0)))
  return evaluate_predictor(cfg, predictor, index, out_dir, frozen_c, step=int(
      np.asarray(state.step.addressable_data(0))))


def frozen_fusion_constant(cfg, state, index, features, backbone_vars, mesh) -> float:
  """Mid-range of the reconstruction map over (up to `eval.fusion_max_images`) normal TRAINING
  images with class-mode prompts: a fusion constant that uses no test-set statistics."""
  model, _ = inference.make_model(cfg)
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  predictor = inference.Predictor(model, features, variables, backbone_vars, mesh)
  n = len(index.train)
  rows = np.linspace(0, n - 1, min(n, cfg.eval.fusion_max_images)).round().astype(int)
  maps = collect_maps(predictor, [index.train[i] for i in np.unique(rows)], index, cfg)
  return float(scoring.mid_range(maps["rec"].min(), maps["rec"].max()))


def main(argv=None) -> None:
  """`onenip-eval`: evaluate a checkpoint (--workdir) or an export (--exported)."""
  from onenip_jax import export  # pylint: disable=g-import-not-at-top
  from onenip_jax.config_loading import ConfigKeyError, load_config  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(prog="onenip-eval", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  src = parser.add_mutually_exclusive_group(required=True)
  src.add_argument("--workdir", help="training work directory (uses its latest checkpoint)")
  src.add_argument("--exported", help="directory written by onenip-export")
  parser.add_argument("--config", help="config file[:args] for the data (default: the stored one)")
  parser.add_argument("--out", help="output directory for the reports")
  parser.add_argument("--step", type=int, help="checkpoint step (default: latest)")
  parser.add_argument("--heatmaps", action="store_true", help="write heatmap PNGs per class")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="config override, e.g. --set eval.prompt_mode=pool (repeatable)")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True)
  logging.getLogger("absl").setLevel(logging.WARNING)
  from data_pipelines import indexing  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh()
  try:
    if args.exported:
      loaded = export.load_export(args.exported, mesh)
      cfg = load_config(args.config, args.set, base=loaded.config)
      predictor, frozen_c, step = loaded.predictor, loaded.fusion_c, loaded.step
      out = args.out or os.path.join(args.exported, "eval")
    else:
      cfg, predictor, frozen_c, step = export.load_checkpoint(
          args.workdir, mesh, args.step, config=args.config, overrides=args.set)
      out = args.out or os.path.join(args.workdir, "eval")
  except ConfigKeyError as e:
    parser.error(str(e))
  cfg.unlock()
  cfg.eval.heatmaps = cfg.eval.heatmaps or args.heatmaps
  index = indexing.index_dataset(cfg.data)
  export.check_classes(predictor, index)
  if cfg.eval.prompt_mode == "pool" and predictor.pool is None:
    predictor.pool = inference.build_prompt_pool(predictor, index, cfg)
  elif cfg.eval.prompt_mode == "class":
    predictor.pool = None
  result = evaluate_predictor(cfg, predictor, index, out, frozen_c, step=step)
  print(f"step {step}, {cfg.eval.prompt_mode} prompts -> {out}/metrics.json\n"
        f"{reports.format_table(result)}")


if __name__ == "__main__":
  main(sys.argv[1:])
