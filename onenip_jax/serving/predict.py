"""Single-image inference from an export: `onenip-predict`.

  onenip-predict --exported EXPORT_DIR [--out DIR] [--threshold T] [--heatmaps] [--save-maps]
                 [--skip-bad] IMAGE_OR_FOLDER...

Each image is resized to the model's input size (any size or channel count), paired with the most
similar prompt of the export's prompt pool (class-agnostic: no label needed), and scored with the
export's scoring (export.json `scoring`: the export's `eval.fusion`, by default `calibrated`, the
run's global calibration, or the reference fusion for a run without one), by the export's serialised
predictor (`onenip_jax.serving.program`: jax, numpy and Pillow only; no flax, TensorFlow or Orbax is
imported).

Results are written as they come, batch by batch: `predictions.csv` (path, score, anomalous,
matched class, threshold), with --heatmaps one PNG per image (one colour scale for the run, set by
the first batch), with --save-maps the raw float32 (H, W) anomaly map of each image as `.npy`; at the
end `predictions.json` with all rows. They are written into a hidden folder `<out>/.predict.tmp_*`
and moved into `<out>` only when the run succeeds (predictions.json last), so a failed run leaves
the previous outputs as they were. A map or heatmap is named after its input's path relative to
the working directory, extension included, with "%", "/" and "\\" percent-encoded (`output_name`:
`sub/x.png` -> `sub%2Fx.png.npy`, `sub_x.png` -> `sub_x.png.npy`), so no two inputs share one;
an input given twice is scored once. An image is anomalous iff its score > the threshold:
--threshold for every image, else the export's threshold of the matched class (else its global
one), which the export computed on the same scoring; without any, only scores are written.
"""
import csv
import io
import json
import logging
import os
import sys

import numpy as np

from data_pipelines import storage
from data_pipelines.errors import UserError, UserFileNotFoundError
from onenip_jax.evaluation import heatmaps
from onenip_jax.serving import program

IMAGE_EXTENSIONS = storage.IMAGE_EXTENSIONS
log = logging.getLogger("onenip")


def find_images(inputs) -> list[str]:
  """Files and folders (searched recursively) -> sorted image paths, each file once; an empty
  result is an error."""
  paths = []
  for item in inputs:
    if storage.isdir(item):
      found = sorted(storage.join(d, f) for d, _, files in storage.walk(item) for f in files
                     if f.lower().endswith(IMAGE_EXTENSIONS))
      if not found:
        raise UserError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in folder {item}")
      paths.extend(found)
    elif storage.isfile(item):
      paths.append(item)
    else:
      raise UserFileNotFoundError(f"no such file or folder: {item}")
  unique = {}
  for p in paths:  # one entry per file however it was spelt ("x.png", "./x.png", an absolute path)
    unique.setdefault(storage.abspath(p), p)
  return list(unique.values())


class ExportedScorer:
  """The serialised predictor (`program.ExportedPredictor`) behind the scorer interface of
  `predict`."""

  def __init__(self, export_dir: str, batch_size: int):
    self.model = program.ExportedPredictor.load(export_dir, batch_size)
    meta = self.model.meta
    self.classes, self.input_size = self.model.classes, self.model.input_size
    self.fusion_c, self.step, self.thresholds = meta["fusion_c"], meta.get("step"), meta.get(
        "thresholds")
    self.scoring, self.backend = self.model.scoring, "exported"

  def load(self, path: str) -> np.ndarray:
    """An image file -> uint8 (H, W, 3) model input pixels."""
    return program.load_image(path, self.input_size)

  def __call__(self, raw: np.ndarray):
    """uint8 (B, H, W, 3) -> (maps (B, H, W) float32, scores (B,), matched class names)."""
    pre = self.model.meta["preprocessing"]
    out = self.model(program.normalize(raw, pre["mean"], pre["std"]))
    return out["map"], out["score"], [self.classes[int(k)] for k in out["class_id"]]


def threshold_for(scorer, cls: str, override: float | None) -> float | None:
  """--threshold, else the export's threshold of class `cls`, else its global one, else None."""
  if override is not None:
    return override
  return program.threshold_value(scorer.thresholds, cls)


def predict(scorer, paths, *, batch_size: int = 8, skip_bad: bool = False):
  """Yields, per batch of `batch_size` readable images, (rows, maps (b, H, W) f32, images (b, H, W, 3) u8).

  Rows are {'path', 'score', 'matched_class'}. Only one batch is held at a time.
  """
  for i in range(0, len(paths), batch_size):
    good, images = [], []
    for p in paths[i:i + batch_size]:
      try:
        images.append(scorer.load(p))
        good.append(p)
      except Exception as e:  # decoding errors of many kinds
        if not skip_bad:
          raise UserError(f"cannot read image {p}: {e} (pass --skip-bad to skip it)") from e
        log.warning("skipping unreadable image %s: %s", p, e)
    if not good:
      continue
    raw = np.stack(images)
    maps, scores, names = scorer(raw)
    rows = [{"path": p, "score": float(v), "matched_class": c}
            for p, v, c in zip(good, scores, names)]
    yield rows, maps, raw


def _npy_bytes(anomaly_map) -> bytes:
  buf = io.BytesIO()
  np.save(buf, np.asarray(anomaly_map, np.float32))
  return buf.getvalue()


def output_name(path: str) -> str:
  """The file name (before the `.npy` / `.png` suffix) that stands for input `path`: its path
  relative to the working directory (a URL as it is), extension included, "%" then "/" and "\\"
  percent-encoded and a leading "." too, so distinct paths never share a name."""
  rel = os.path.relpath(os.path.abspath(path)) if storage.is_local(path) else path
  name = rel.replace("%", "%25").replace("/", "%2F").replace("\\", "%5C")
  return "%2E" + name[1:] if name.startswith(".") else name


def _publish(staging: str, out: str) -> None:
  """Moves every file of the folder `staging` to the same place under `out` (predictions.json
  last)."""
  files = [os.path.relpath(storage.join(d, f), staging) for d, _, names in storage.walk(staging)
           for f in names]
  for rel in sorted(files, key=lambda r: r == "predictions.json"):
    src, dst = storage.join(staging, rel), storage.join(out, rel)
    if storage.is_local(src) and storage.is_local(dst):
      storage.makedirs(os.path.dirname(dst))
      storage.rename(src, dst)
    else:
      storage.atomic_write(dst, storage.read_bytes(src))


def main(args) -> None:
  """`onenip-predict` with its flags parsed by `onenip_jax.cli` (args.inputs: files or folders)."""
  paths = find_images(args.inputs)
  scorer = ExportedScorer(args.exported, args.batch_size)
  storage.makedirs(args.out)
  staging = storage.staging_dir(storage.join(args.out, "predict"))
  try:
    results = _predict_into(args, scorer, paths, staging)
    if results:
      _publish(staging, args.out)
  finally:
    storage.rmtree(staging)
  if not results:
    print(f"onenip-predict: error: none of the {len(paths)} image(s) could be read, nothing was "
          "scored", file=sys.stderr)
    sys.exit(1)
  flagged = sum(bool(r["anomalous"]) for r in results)
  print(f"{len(results)} images scored ({scorer.backend} predictor) -> {args.out}/predictions.json"
        + (f"; {flagged} above threshold" if any(r["threshold"] is not None for r in results)
           else ""))


def _predict_into(args, scorer, paths, staging: str) -> list:
  """Scores `paths`, writing every output file into the folder `staging` as it comes and
  predictions.json (with paths under `args.out`) at the end; the rows, [] when none was read."""
  results, vmax, names = [], None, set()
  csv_path = storage.join(staging, "predictions.csv")
  with storage.open(csv_path, "w") as f:
    w = csv.writer(f)
    w.writerow(["path", "score", "anomalous", "matched_class", "threshold"])
    for rows, maps, images in predict(scorer, paths, batch_size=args.batch_size,
                                      skip_bad=args.skip_bad):
      for r, m, img in zip(rows, maps, images):
        t = threshold_for(scorer, r["matched_class"], args.threshold)
        r["threshold"], r["anomalous"] = t, None if t is None else bool(r["score"] > t)
        name = output_name(r["path"])
        if name in names:  # never: find_images drops repeated paths
          raise ValueError(f"two inputs would share the output name {name!r} ({r['path']})")
        names.add(name)
        what = f"output name (from input {r['path']})"
        if args.save_maps:
          storage.atomic_write(storage.join_inside(staging, "maps", name + ".npy", what=what),
                               _npy_bytes(m))
          r["map"] = storage.join(args.out, "maps", name + ".npy")
        if args.heatmaps:
          if vmax is None:  # 0: the low end (the normal mean of a calibrated z-map)
            vmax = float(np.percentile(maps, 99.9))
            vmax = vmax if vmax > 0 else 1.0
          heatmaps.save_heatmap(storage.join_inside(staging, "heatmaps", name + ".png", what=what),
                                img, m, None, r["score"], vmin=0.0, vmax=vmax,
                                title=r["matched_class"])
          r["heatmap"] = storage.join(args.out, "heatmaps", name + ".png")
        w.writerow([r["path"], f"{r['score']:.7g}", r["anomalous"], r["matched_class"],
                    "" if t is None else f"{t:.7g}"])
      f.flush()
      results += rows
  if results:
    global_t = args.threshold if args.threshold is not None else threshold_for(scorer, None, None)
    payload = {"threshold": global_t, "thresholds": None if args.threshold is not None
               else scorer.thresholds, "scoring": scorer.scoring, "fusion_c": scorer.fusion_c,
               "step": scorer.step, "backend": scorer.backend, "predictions": results}
    storage.atomic_write(storage.join(staging, "predictions.json"), json.dumps(payload, indent=1))
  return results

