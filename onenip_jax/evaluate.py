"""Evaluation (spec 9-10) and the `onenip-eval` command.

  onenip-eval --workdir DIR                              # latest checkpoint of a training run
  onenip-eval --exported EXPORT_DIR [--config configs/real.py] [--out DIR] [--flax]
  onenip-eval --workdir DIR --config.eval.prompt_mode=pool   # the stored config, overridden

Writes metrics.json / metrics.md / metrics.csv, per-image scores.csv (and heatmaps with --heatmaps) to
`<workdir>/eval/` (or `<exported>/eval/`) unless --out says otherwise.

With --exported and a serialised predictor in the export (format 2), the evaluation runs through
`onenip_jax.exported` (jax, numpy and Pillow; no flax, TensorFlow or Orbax is imported) with
class-agnostic pool prompts; --flax uses the Flax predictor and the tf.data pipeline instead (needed
for `eval.prompt_mode=class`).

Protocol: maps are float32 from the network to the metrics. A mask pixel is a defect iff non-zero;
an image's label is that of its resized mask (its own label without a mask). Anomalous test images
without a mask are left out of the pixel metrics (`eval.maskless="skip"`, the default) or scored
against an all-ones mask as the official code does (`"full"`); metrics.json reports how many there
were. Memory: the test set is evaluated one class at a time, so host memory grows with the largest
class, not with the dataset.
"""
import csv
import functools
import io
import logging
import os

import numpy as np

from data_pipelines import storage
from onenip_jax import metrics, reports, scoring

log = logging.getLogger("onenip")
MASKLESS_POLICIES = ("skip", "full")
SCORINGS = ("calibrated", "reference", "refiner", "reconstruction")


def iterate_maps(predictor, samples, index, cfg, seed_positions=None, synthesis_seed=None):
  """Runs the Flax predictor over `samples` once each, yielding one host dict per batch.

  Yields:
    {'index' (b,) positions in `samples`, 'rec', 'ref' (b, H, W) float32 ('ref' None without
     refiner), 'mask' (b, H, W) bool, 'has_mask', 'label', 'class_id', 'pool_choice' (b,)} of the
    valid rows of each batch. `synthesis_seed`: score synthetic anomalies made from `samples`
    instead (`input_pipeline.make_eval_iterator`).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from data_pipelines import input_pipeline  # pylint: disable=g-import-not-at-top
  from onenip_jax import inference, sharding  # pylint: disable=g-import-not-at-top
  class_mode = predictor.pool is None
  keys = ("image", "mask", "has_mask", "label", "class_id", "index", "valid")
  keys += ("prompt",) if class_mode else ()
  for batch in input_pipeline.make_eval_iterator(
      samples, index, cfg, batch_size=inference._eval_batch(cfg),  # pylint: disable=protected-access
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


def collect_maps(predictor, samples, index, cfg, seed_positions=None, synthesis_seed=None) -> dict:
  """All maps of `samples` as host arrays ordered like `samples` (see `iterate_maps` for the keys)."""
  n, size = len(samples), cfg.input_size
  out = {"rec": np.zeros((n, size, size), np.float32), "ref": None,
         "mask": np.zeros((n, size, size), bool), "has_mask": np.zeros(n, bool),
         "label": np.zeros(n, np.int32), "class_id": np.zeros(n, np.int32),
         "pool_choice": np.full(n, -1, np.int32)}
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


def fused_maps(maps: dict, rows: np.ndarray, c: float, alpha: float) -> np.ndarray:
  """(len(rows), H, W) float32 anomaly maps S = (1-alpha) rec + alpha c ref (rec alone without refiner).

  numpy, as `scoring.fuse` computes it (jnp run eagerly would compile once per class's shape).
  """
  rec = maps["rec"][rows].astype(np.float32)
  if maps["ref"] is None:
    return rec
  ref = maps["ref"][rows].astype(np.float32)
  return np.float32(1.0 - alpha) * rec + (np.float32(alpha) * np.float32(c)) * ref


@functools.cache
def _image_scores_fn():
  import jax  # pylint: disable=g-import-not-at-top
  return jax.jit(scoring.image_scores, static_argnums=1)


def image_scores(anomaly_maps: np.ndarray, pool_size: int, chunk: int = 64) -> np.ndarray:
  """(N, H, W) -> (N,) max of the stride-1 `pool_size` box-filtered map (`scoring.image_scores`).

  Chunks of `chunk` maps, the last one zero-padded, so one compiled program serves every class.
  """
  out = []
  for i in range(0, len(anomaly_maps), chunk):
    part = anomaly_maps[i:i + chunk].astype(np.float32)
    padded = np.zeros((chunk,) + part.shape[1:], np.float32)
    padded[:len(part)] = part
    out.append(np.asarray(_image_scores_fn()(padded, pool_size))[:len(part)])
  return np.concatenate(out) if out else np.zeros(0, np.float32)


def class_protocol(scores, anomaly_maps, masks, has_mask, sample_labels, maskless: str,
                   flip_auroc: bool = False) -> tuple[dict, np.ndarray, int]:
  """Metrics of one class under the evaluation protocol (module doc).

  Args:
    scores: (N,) image scores; anomaly_maps: (N, H, W) float32; masks: (N, H, W) bool.
    has_mask, sample_labels: (N,) whether the image has a mask file; its label (> 0 anomalous).
    maskless: "skip" (anomalies without mask left out of pixel metrics) or "full" (all-ones masks).
  Returns:
    (class_metrics dict, (N,) int32 image labels, number of anomalies without mask).
  """
  if maskless not in MASKLESS_POLICIES:
    raise ValueError(f"config.eval.maskless={maskless!r}: use one of {MASKLESS_POLICIES}")
  has_mask = np.asarray(has_mask, bool)
  labels = np.where(has_mask, masks.reshape(len(masks), -1).any(axis=1),
                    np.asarray(sample_labels) > 0).astype(np.int32)
  maskless_anomalies = ~has_mask & (labels > 0)
  if maskless == "full":
    masks = masks.copy()
    masks[maskless_anomalies] = True
    pix = np.ones(len(labels), bool)
  else:
    pix = ~maskless_anomalies
  pix_all = bool(pix.all())
  result = metrics.class_metrics(
      scores, labels, (anomaly_maps if pix_all else anomaly_maps[pix]) if pix.any() else None,
      (masks if pix_all else masks[pix]) if pix.any() else None, flip_auroc=flip_auroc)
  return result, labels, int(maskless_anomalies.sum())


class ReportBuilder:
  """Accumulates per-class results (one class at a time) and writes the reports."""

  def __init__(self, cfg, out_dir: str):
    self.cfg, self.out_dir = cfg, out_dir
    self.per_class, self.maskless, self.empty_masks = {}, {}, []
    self.alternatives = {}   # scoring name -> {class: metrics}
    self.score_rows = [("path", "class", "defect", "label", "score")]
    self.pool_hits = self.pool_total = 0

  def add_class(self, cls, samples, anomaly_maps, scores, masks, has_mask, *, pool_class_ids=None,
                class_ids=None, load_image=None, write_files=True) -> None:
    """Scores one class; `pool_class_ids`/`class_ids` (N,) count the pool's class accuracy."""
    e = self.cfg.eval
    result, labels, n_maskless = class_protocol(
        scores, anomaly_maps, masks, has_mask, [s.label for s in samples],
        e.get("maskless", "skip"), e.flip_auroc)
    self.per_class[cls] = result
    self.maskless[cls] = n_maskless
    self.empty_masks += empty_defect_masks(samples, masks, has_mask, self.cfg.input_size)
    self.score_rows += [(s.path, cls, s.defect, int(l), f"{v:.7g}")
                        for s, l, v in zip(samples, labels, scores)]
    if pool_class_ids is not None:
      self.pool_hits += int(np.sum(np.asarray(pool_class_ids) == np.asarray(class_ids)))
      self.pool_total += len(samples)
    if e.heatmaps and write_files and load_image is not None:
      _write_heatmaps(storage.join(self.out_dir, "heatmaps", cls), samples, anomaly_maps, masks,
                      scores, self.cfg, load_image)

  def add_alternative(self, name, cls, samples, anomaly_maps, scores, masks, has_mask) -> None:
    """Metrics of one class under another scoring `name` (no scores.csv rows, no heatmaps)."""
    e = self.cfg.eval
    self.alternatives.setdefault(name, {})[cls] = class_protocol(
        scores, anomaly_maps, masks, has_mask, [s.label for s in samples],
        e.get("maskless", "skip"), e.flip_auroc)[0]

  def finish(self, *, step=None, extra=None, write_files=True, default_name=None) -> dict:
    """Writes the reports; with `default_name`, metrics.json's "scorings" and metrics.md hold
    every scoring side by side (the default one is the headline `classes` / `mean`)."""
    result = metrics.summarize(self.per_class)
    extra = dict(extra or {})
    sections = {}
    if default_name is not None:
      sections = {default_name: result}
      sections.update({n: metrics.summarize(v) for n, v in self.alternatives.items()})
      extra["scorings"] = sections
    extra["maskless_anomalies"] = {"policy": self.cfg.eval.get("maskless", "skip"),
                                   "count": int(sum(self.maskless.values())),
                                   "per_class": dict(self.maskless)}
    extra.update(n_empty_defect_masks=len(self.empty_masks), empty_defect_masks=list(self.empty_masks))
    if self.pool_total:
      extra["pool_class_accuracy"] = self.pool_hits / self.pool_total
    if write_files:
      reports.write_reports(self.out_dir, result, config=self.cfg, step=step, extra=extra,
                            sections=sections)
      text = io.StringIO()
      csv.writer(text, lineterminator="\n").writerows(self.score_rows)
      storage.atomic_write(storage.join(self.out_dir, "scores.csv"), text.getvalue())
    result.update(extra)
    return result


def empty_defect_masks(samples, masks, has_mask, size: int) -> list:
  """Paths of defect images whose mask is all zero at `size` px, each warned about by name.

  Such an image is scored as normal (its label comes from the resized mask): an empty mask file,
  or a defect too small to survive the resize. masks: (N, H, W) bool; has_mask: (N,) bool.
  """
  empty = np.asarray(has_mask, bool) & ~np.asarray(masks).reshape(len(masks), -1).any(axis=1)
  paths = []
  for s, e in zip(samples, empty):
    if e and s.label > 0:
      log.warning("the mask of defect image %s (%s) is all zero at %d px: the image counts as "
                  "normal in the metrics", s.path, s.mask_path, size)
      paths.append(s.path)
  return paths


def _write_heatmaps(out_dir, samples, anomaly_maps, masks, scores, cfg, load_image) -> None:
  """Up to `eval.max_heatmaps_per_class` PNGs (defective images first, then normal ones) and a
  contact sheet of them; `load_image(path)` gives the uint8 (H, W, 3) model input."""
  from onenip_jax import heatmaps  # pylint: disable=g-import-not-at-top
  vmax = float(np.percentile(anomaly_maps, 99.9)) if anomaly_maps.size else 1.0
  n = cfg.eval.max_heatmaps_per_class
  bad = [i for i, s in enumerate(samples) if s.label]
  good = [i for i, s in enumerate(samples) if not s.label]
  chosen = sorted(bad[:n - min(len(good), n // 2)] + good[:max(n // 2, n - len(bad))])
  paths = []
  for i in chosen:
    sample = samples[i]
    stem = os.path.splitext(os.path.basename(sample.path))[0]
    path = storage.join(out_dir, f"{sample.defect}_{stem}.png")
    heatmaps.save_heatmap(path, load_image(sample.path), anomaly_maps[i],
                          masks[i] if masks[i].any() else None, float(scores[i]),
                          vmin=float(anomaly_maps.min()), vmax=vmax,
                          title=f"{sample.cls}/{sample.defect}")
    paths.append(path)
  if paths:
    heatmaps.contact_sheet(paths, storage.join(out_dir, "contact_sheet.png"))


def _tf_image_loader(cfg):
  from data_pipelines import input_pipeline  # pylint: disable=g-import-not-at-top
  return lambda path: input_pipeline.load_image(path, cfg.input_size, None, None)


def fusion_constant(cfg, predictor, samples, index, frozen_c: float) -> tuple[float, str]:
  """c of the reference fusion and where it came from: the stored frozen one ('frozen'), or the
  test-set mid-range ('test': `eval.fusion_constant="test"` or no frozen one; one extra streamed
  pass over `samples`)."""
  mode = cfg.eval.get("fusion_constant", "frozen")
  if mode not in ("frozen", "test"):
    raise ValueError(f"config.eval.fusion_constant={mode!r}: use 'frozen' or 'test'")
  if mode == "frozen" and not np.isnan(frozen_c):
    return float(frozen_c), "frozen"
  return float(scoring.mid_range(*rec_range(predictor, samples, index, cfg))), "test"


def default_scoring(cfg, calibration, has_refiner: bool) -> str:
  """The scoring `eval.fusion` asks for (module doc of `onenip_jax.calibration`), with the
  fallbacks: 'calibrated' without a calibration -> 'reference' (logged); no refiner ->
  'reconstruction'. The legacy value 'frozen' means 'reference'."""
  mode = {"frozen": "reference"}.get(cfg.eval.fusion, cfg.eval.fusion)
  if mode not in SCORINGS:
    raise ValueError(f"config.eval.fusion={cfg.eval.fusion!r}: use one of {SCORINGS}")
  if not has_refiner:
    return "reconstruction"
  if mode == "calibrated" and not calibration:
    log.info("eval.fusion='calibrated' but the checkpoint has no calibration "
             "(calibration.holdout_fraction=0 or an older run): using the reference fusion")
    return "reference"
  return mode


def scored_maps(name, rec, ref, *, c, cfg, calibration=None, cls=None):
  """(anomaly maps (N, H, W) float32, image scores (N,)) of scoring `name` (see SCORINGS).

  rec, ref: (N, H, W) maps; c: the reference fusion constant; cls: the class whose calibration
  applies (None: the global one, as pool prompts use)."""
  from onenip_jax import calibration as calib  # pylint: disable=g-import-not-at-top
  if name == "calibrated":
    return calib.apply(rec, ref, calib.params_for(calibration, cls))
  if name == "reference":
    s = fused_maps({"rec": rec, "ref": ref}, slice(None), c, cfg.eval.alpha)
  else:
    s = np.asarray(ref if name == "refiner" else rec, np.float32)
  return s, image_scores(s, cfg.eval.pool_size)


def class_rows(samples, classes) -> list[tuple[str, np.ndarray]]:
  """[(class, positions in samples)] for the classes present, in `classes` order."""
  cls = np.asarray([s.cls for s in samples])
  return [(c, np.flatnonzero(cls == c)) for c in classes if np.any(cls == c)]


def evaluate_predictor(cfg, predictor, index, out_dir: str, frozen_c: float, *, step=None,
                       samples=None, calibration=None) -> dict:
  """Scores `samples` (default: the test set) one class at a time; writes the reports to `out_dir`.

  Every scoring of SCORINGS that applies is reported side by side; `default_scoring` picks the one
  of the headline table, scores.csv and heatmaps. `calibration`: the checkpoint's, or None.
  """
  import jax  # pylint: disable=g-import-not-at-top
  samples = index.test if samples is None else samples
  c, c_source = fusion_constant(cfg, predictor, samples, index, frozen_c)
  has_refiner = bool(cfg.model.refiner)
  default = default_scoring(cfg, calibration, has_refiner)
  names = [default] + [n for n in SCORINGS if n != default and (has_refiner or n == "reconstruction")
                       and (n != "calibrated" or calibration)]
  builder = ReportBuilder(cfg, out_dir)
  main_process = jax.process_index() == 0
  pool = predictor.pool
  for cls, rows in class_rows(samples, index.classes):
    subset = [samples[i] for i in rows]
    maps = collect_maps(predictor, subset, index, cfg, seed_positions=rows)
    for name in names:
      s, scores = scored_maps(name, maps["rec"], maps["ref"], c=c, cfg=cfg,
                              calibration=calibration, cls=cls if pool is None else None)
      if name == default:
        builder.add_class(
            cls, subset, s, scores, maps["mask"], maps["has_mask"],
            pool_class_ids=None if pool is None else pool.class_ids[maps["pool_choice"]],
            class_ids=maps["class_id"], load_image=_tf_image_loader(cfg), write_files=main_process)
      else:
        builder.add_alternative(name, cls, subset, s, scores, maps["mask"], maps["has_mask"])
      del s
    del maps
  extra = {"fusion": default, "fusion_c": c, "fusion_c_source": c_source,
           "alpha": cfg.eval.alpha, "calibration": calibration,
           "prompt_mode": cfg.eval.prompt_mode, "backend": "flax"}
  result = builder.finish(step=step, extra=extra, write_files=main_process, default_name=default)
  log.info("eval step %s (%s scoring; reference c=%.4f from %s; %s prompts) -> %s\n%s", step,
           default, c, c_source, cfg.eval.prompt_mode, out_dir, reports.format_table(result))
  return result


def evaluate_exported(cfg, model, index, out_dir: str, *, samples=None) -> dict:
  """`evaluate_predictor` through the serialised predictor (`onenip_jax.exported.ExportedPredictor`):
  numpy/PIL preprocessing, pool prompts, the export's scoring (`model.scoring`) only."""
  from onenip_jax import exported  # pylint: disable=g-import-not-at-top
  samples = index.test if samples is None else samples
  if tuple(index.classes) != model.classes:
    raise ValueError(f"the dataset's classes {index.classes} differ from the exported model's "
                     f"{model.classes}")
  size = model.input_size
  builder = ReportBuilder(cfg, out_dir)
  for cls, rows in class_rows(samples, index.classes):
    subset = [samples[i] for i in rows]
    n = len(subset)
    maps = np.zeros((n, size, size), np.float32)
    scores = np.zeros(n, np.float32)
    picked = np.zeros(n, np.int32)
    for i in range(0, n, model.batch_size):
      chunk = subset[i:i + model.batch_size]
      out = model(np.stack([model.preprocess(s.path) for s in chunk]))
      maps[i:i + len(chunk)], scores[i:i + len(chunk)] = out["map"], out["score"]
      picked[i:i + len(chunk)] = out["class_id"]
    masks = np.zeros((n, size, size), bool)
    has_mask = np.asarray([bool(s.mask_path) for s in subset])
    for j, s in enumerate(subset):
      if s.mask_path:
        masks[j] = exported.load_mask(s.mask_path, size)
    builder.add_class(cls, subset, maps, scores, masks, has_mask, pool_class_ids=picked,
                      class_ids=np.full(n, index.class_id(cls)),
                      load_image=lambda p: exported.load_image(p, size))
    del maps, masks
  c, scoring_entry = float(model.meta["fusion_c"]), model.scoring
  extra = {"fusion": scoring_entry["fusion"], "scoring": scoring_entry, "fusion_c": c,
           "fusion_c_source": "frozen", "alpha": cfg.eval.alpha,
           "calibration": model.meta.get("calibration"), "prompt_mode": "pool",
           "backend": "exported"}
  result = builder.finish(step=model.meta.get("step"), extra=extra)
  log.info("eval of the serialised predictor (%s scoring, pool prompts) -> %s\n%s",
           scoring_entry["fusion"], out_dir, reports.format_table(result))
  return result


def evaluate_state(cfg, state, index, features, backbone_vars, mesh, out_dir: str,
                   calibration=None) -> dict:
  """Evaluation of a train state (periodic and final evaluation during training)."""
  from onenip_jax import inference  # pylint: disable=g-import-not-at-top
  model, _ = inference.make_model(cfg)
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  predictor = inference.make_predictor(cfg, model, features, variables, backbone_vars, mesh, index)
  frozen_c = float(np.asarray(state.fusion_c.addressable_data(0)))
  return evaluate_predictor(cfg, predictor, index, out_dir, frozen_c, step=int(
      np.asarray(state.step.addressable_data(0))), calibration=calibration)


def frozen_fusion_constant(cfg, state, index, features, backbone_vars, mesh) -> float:
  """Mid-range of the reconstruction map over (up to `eval.fusion_max_images`) normal TRAINING
  images with class-mode prompts: a fusion constant that uses no test-set statistics."""
  from onenip_jax import inference  # pylint: disable=g-import-not-at-top
  model, _ = inference.make_model(cfg)
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  predictor = inference.Predictor(model, features, variables, backbone_vars, mesh)
  n = len(index.train)
  rows = np.linspace(0, n - 1, min(n, cfg.eval.fusion_max_images)).round().astype(int)
  lo, hi = rec_range(predictor, [index.train[i] for i in np.unique(rows)], index, cfg)
  return float(scoring.mid_range(lo, hi))


def main(args) -> None:
  """`onenip-eval` with its flags parsed by `onenip_jax.cli`: a checkpoint (args.workdir) or an
  export (args.exported), the stored config with args.config / args.overrides applied."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from data_pipelines import indexing  # pylint: disable=g-import-not-at-top
  from onenip_jax import exported  # pylint: disable=g-import-not-at-top
  from onenip_jax.config_loading import load_config  # pylint: disable=g-import-not-at-top
  if args.exported and not args.flax and exported.has_program(args.exported):
    model = exported.ExportedPredictor.load(args.exported, args.batch_size)
    cfg = load_config(args.config, args.overrides,
                      base=ml_collections.ConfigDict(model.meta["config"]))
    cfg.eval.heatmaps = cfg.eval.heatmaps or args.heatmaps
    if cfg.eval.prompt_mode != "pool":
      log.info("the serialised predictor uses pool prompts (eval.prompt_mode=%r needs --flax)",
               cfg.eval.prompt_mode)
      cfg.eval.prompt_mode = "pool"
    wanted = default_scoring(cfg, model.meta.get("calibration"), bool(cfg.model.refiner))
    if wanted != model.scoring["fusion"]:
      log.warning("eval.fusion asks for the %r scoring; the serialised predictor computes the "
                  "export's %r (pass --flax, or re-export with --config.eval.fusion=%s)", wanted,
                  model.scoring["fusion"], wanted)
    out = args.out or os.path.join(args.exported, "eval")
    result = evaluate_exported(cfg, model, indexing.index_config(cfg), out)
    print(f"step {model.meta.get('step')}, pool prompts, serialised predictor -> {out}/metrics.json"
          f"\n{reports.format_table(result)}")
    return
  from onenip_jax import export, inference, sharding  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh()
  if args.exported:
    loaded = export.load_export(args.exported, mesh)
    cfg = load_config(args.config, args.overrides, base=loaded.config)
    predictor, frozen_c, step = loaded.predictor, loaded.fusion_c, loaded.step
    calibration = loaded.calibration
    out = args.out or os.path.join(args.exported, "eval")
  else:
    cfg, predictor, frozen_c, step = export.load_checkpoint(
        args.workdir, mesh, args.step, config=args.config, overrides=args.overrides)
    out = args.out or os.path.join(args.workdir, "eval")
    from onenip_jax import checkpoints  # pylint: disable=g-import-not-at-top
    calibration = checkpoints.read_calibration(args.workdir, step)
  cfg.unlock()
  cfg.eval.heatmaps = cfg.eval.heatmaps or args.heatmaps
  index = indexing.index_config(cfg)
  export.check_classes(predictor, index)
  if cfg.eval.prompt_mode == "pool" and predictor.pool is None:
    predictor.pool = inference.build_prompt_pool(predictor, index, cfg)
  elif cfg.eval.prompt_mode == "class":
    predictor.pool = None
  result = evaluate_predictor(cfg, predictor, index, out, frozen_c, step=step,
                              calibration=calibration)
  print(f"step {step}, {cfg.eval.prompt_mode} prompts -> {out}/metrics.json\n"
        f"{reports.format_table(result)}")


if __name__ == "__main__":  # `python -m onenip_jax.evaluate ...`: the command line lives in the CLI
  from onenip_jax import cli  # pylint: disable=g-import-not-at-top
  cli.evaluate()
