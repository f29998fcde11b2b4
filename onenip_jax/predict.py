"""Single-image inference from an export: `onenip-predict`.

  onenip-predict --exported EXPORT_DIR [--out DIR] [--threshold T] [--heatmaps] [--skip-bad] IMAGE_OR_FOLDER...

Each image is resized to the model's input size (any size or channel count), paired with the most
similar prompt of the export's prompt pool (class-agnostic: no label needed), and scored. Writes
`predictions.json` and `predictions.csv` (path, score, anomalous, matched class) and, with
--heatmaps, one PNG per image. The decision threshold is --threshold, else the F1-optimal one stored
by `onenip-export --calibrate`; without either, only scores are written.
"""
import argparse
import csv
import json
import logging
import os
import sys

import numpy as np

from onenip_jax import evaluate, heatmaps, sharding
from onenip_jax.export import load_export

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
log = logging.getLogger("onenip")


def find_images(inputs) -> list[str]:
  """Files and folders (searched recursively) -> sorted image paths; an empty result is an error."""
  paths = []
  for item in inputs:
    if os.path.isdir(item):
      found = sorted(os.path.join(d, f) for d, _, files in os.walk(item) for f in files
                     if f.lower().endswith(IMAGE_EXTENSIONS))
      if not found:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in folder {item}")
      paths.extend(found)
    elif os.path.isfile(item):
      paths.append(item)
    else:
      raise FileNotFoundError(f"no such file or folder: {item}")
  return paths


def predict(loaded, paths, *, batch_size: int = 8, skip_bad: bool = False):
  """Returns (results list of dicts, fused maps (N, H, W) float32, images (N, H, W, 3) uint8)."""
  from data_pipelines import input_pipeline  # pylint: disable=g-import-not-at-top
  cfg, predictor = loaded.config, loaded.predictor
  size, mean, std = cfg.input_size, cfg.data.mean, cfg.data.std
  n_dev = predictor.mesh.devices.size
  batch_size = max(n_dev, (batch_size + n_dev - 1) // n_dev * n_dev)
  good, images = [], []
  for p in paths:
    try:
      images.append(input_pipeline.load_image(p, size, None, None))
      good.append(p)
    except Exception as e:  # decoding errors of many kinds
      if not skip_bad:
        raise ValueError(f"cannot read image {p}: {e} (pass --skip-bad to skip it)") from e
      log.warning("skipping unreadable image %s: %s", p, e)
  results, maps_out = [], []
  for i in range(0, len(good), batch_size):
    raw = np.stack(images[i:i + batch_size])
    n = len(raw)
    x = (raw.astype(np.float32) / 255.0 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    x = np.concatenate([x, np.zeros((batch_size - n,) + x.shape[1:], np.float32)])
    g = sharding.to_global({"image": x}, predictor.mesh)
    maps = predictor(g["image"])
    host = {k: (sharding.to_host(v)[:n] if v is not None else None) for k, v in maps.items()}
    host = {"rec": host["rec"].astype(np.float16), "ref": None if host["ref"] is None
            else host["ref"].astype(np.float16)}
    s = evaluate.fused_maps(host, np.arange(n), loaded.fusion_c, cfg.eval.alpha)
    scores = evaluate.image_scores(s, cfg.eval.pool_size)
    choice = sharding.to_host(maps["pool_choice"])[:n]
    for j in range(n):
      results.append({"path": good[i + j], "score": float(scores[j]),
                      "matched_class": loaded.classes[int(predictor.pool.class_ids[choice[j]])]})
    maps_out.append(s)
  maps_all = np.concatenate(maps_out) if maps_out else np.zeros((0, size, size), np.float32)
  return results, maps_all, np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="onenip-predict", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("inputs", nargs="+", help="image files or folders")
  parser.add_argument("--exported", required=True, help="directory written by onenip-export")
  parser.add_argument("--out", default="predictions", help="output directory")
  parser.add_argument("--threshold", type=float, help="decision threshold on the image score")
  parser.add_argument("--heatmaps", action="store_true", help="write a heatmap PNG per image")
  parser.add_argument("--skip-bad", action="store_true", help="skip unreadable images (warned)")
  parser.add_argument("--batch-size", type=int, default=8)
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True)
  logging.getLogger("absl").setLevel(logging.WARNING)
  paths = find_images(args.inputs)
  loaded = load_export(args.exported)
  threshold = args.threshold if args.threshold is not None else loaded.threshold
  results, maps, images = predict(loaded, paths, batch_size=args.batch_size, skip_bad=args.skip_bad)
  if not results:
    print(f"onenip-predict: error: none of the {len(paths)} image(s) could be read, nothing was "
          "scored", file=sys.stderr)
    sys.exit(1)
  for r in results:
    r["anomalous"] = None if threshold is None else bool(r["score"] > threshold)
  os.makedirs(args.out, exist_ok=True)
  if args.heatmaps:
    vmax = float(np.percentile(maps, 99.9)) if maps.size else 1.0
    for r, m, img in zip(results, maps, images):
      name = os.path.splitext(os.path.relpath(r["path"]).replace(os.sep, "_").lstrip("._"))[0]
      r["heatmap"] = os.path.join(args.out, "heatmaps", name + ".png")
      os.makedirs(os.path.dirname(r["heatmap"]), exist_ok=True)
      heatmaps.save_heatmap(r["heatmap"], img, m, None, r["score"], vmin=0.0, vmax=vmax,
                            title=r["matched_class"])
  payload = {"threshold": threshold, "fusion_c": loaded.fusion_c, "step": loaded.step,
             "predictions": results}
  tmp = os.path.join(args.out, ".predictions.json.tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(payload, f, indent=1)
  os.replace(tmp, os.path.join(args.out, "predictions.json"))
  tmp = os.path.join(args.out, ".predictions.csv.tmp")
  with open(tmp, "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f)
    w.writerow(["path", "score", "anomalous", "matched_class"])
    for r in results:
      w.writerow([r["path"], f"{r['score']:.6f}", r["anomalous"], r["matched_class"]])
  os.replace(tmp, os.path.join(args.out, "predictions.csv"))
  flagged = sum(bool(r["anomalous"]) for r in results)
  print(f"{len(results)} images scored -> {args.out}/predictions.json"
        + (f"; {flagged} above threshold {threshold:.5f}" if threshold is not None else ""))


if __name__ == "__main__":
  main(sys.argv[1:])
