"""Self-contained export of a trained model, and loading it back: `onenip-export`.

  onenip-export --workdir DIR --out EXPORT_DIR [--step N] [--calibrate]

EXPORT_DIR holds everything inference needs and nothing of training (no optimiser state):
  export.json        format version, classes, input size, normalisation, fusion constant,
                     thresholds, checkpoint step and the full config
  model.msgpack      the network's params and batch statistics
  backbone.msgpack   the frozen backbone's variables
  prompt_pool.npz    per-class prompt features for class-agnostic (pool) prompts
The directory is written under a temporary name and renamed, so it is complete or absent.
"""
import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import tempfile

import flax.serialization
import jax
import ml_collections
import numpy as np

from onenip_jax import checkpoints, inference, sharding
from onenip_jax.config_loading import load_config

FORMAT_VERSION = 1
log = logging.getLogger("onenip")


@dataclasses.dataclass
class LoadedModel:
  predictor: inference.Predictor
  config: ml_collections.ConfigDict
  classes: tuple[str, ...]
  fusion_c: float
  step: int
  threshold: float | None


def load_checkpoint(workdir: str, mesh, step=None, *, config=None, overrides=()):
  """(cfg, predictor without pool, frozen fusion constant, step) from a training work directory."""
  from onenip_jax import train  # pylint: disable=g-import-not-at-top
  stored = checkpoints.restore_config(workdir, step)
  cfg = load_config(config, overrides, base=stored)
  model, features = inference.make_model(stored)
  tx = train.make_optimizer(stored, 1)
  template = jax.jit(lambda: train.init_state(stored, model, tx, features.channels),
                     out_shardings=sharding.replicated(mesh))()
  manager = checkpoints.make_manager(workdir, stored)
  if step is None:  # the newest intact checkpoint (a damaged one is reported and skipped)
    state, _, _ = checkpoints.restore_latest(manager, template)
  else:
    state = checkpoints.restore(manager, template, step)
  manager.close()
  backbone_vars = jax.device_put(features.load_variables(stored.model), sharding.replicated(mesh))
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  predictor = inference.Predictor(model, features, variables, backbone_vars, mesh)
  fusion_c = float(np.asarray(state.fusion_c.addressable_data(0)))
  return cfg, predictor, fusion_c, int(np.asarray(state.step.addressable_data(0)))


def check_classes(predictor: inference.Predictor, index) -> None:
  """Pool prompts carry class ids: the evaluated dataset must list the same classes."""
  if predictor.pool is not None and predictor.classes not in (None, tuple(index.classes)):
    raise ValueError(f"the dataset's classes {index.classes} differ from the exported model's "
                     f"{predictor.classes}")


def _write_bytes(path: str, data: bytes) -> None:
  with open(path, "wb") as f:
    f.write(data)


def check_out_dir(out_dir: str, overwrite: bool, workdir: str | None = None) -> None:
  """Refuses an export destination that exists (unless `overwrite`) or that is not an export.

  `overwrite` replaces only a folder holding an `export.json`, and never `workdir` or a folder
  containing it.

  Raises:
    FileExistsError / ValueError naming the folder.
  """
  out = os.path.realpath(out_dir)
  if workdir is not None:
    work = os.path.realpath(workdir)
    if out == work or work.startswith(out.rstrip(os.sep) + os.sep):
      raise ValueError(f"--out {out_dir} is the training workdir {workdir} or a folder holding "
                       "it; export to another folder")
  if not os.path.lexists(out_dir):
    return
  if not overwrite:
    raise FileExistsError(f"{out_dir} exists; pass --overwrite to replace an earlier export")
  if not os.path.isdir(out_dir) or not os.path.isfile(os.path.join(out_dir, "export.json")):
    raise ValueError(f"--overwrite replaces only an earlier export, and {out_dir} holds no "
                     "export.json; choose another --out or remove it yourself")


def write_export(out_dir: str, cfg, predictor: inference.Predictor, classes, fusion_c: float,
                 step: int, threshold: float | None = None, overwrite: bool = False,
                 workdir: str | None = None) -> None:
  """Writes the export directory atomically (temporary sibling directory, then rename)."""
  check_out_dir(out_dir, overwrite, workdir)
  parent = os.path.dirname(os.path.abspath(out_dir))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".export-", dir=parent)
  try:
    host = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), predictor.variables)
    _write_bytes(os.path.join(tmp, "model.msgpack"), flax.serialization.msgpack_serialize(host))
    bb = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), predictor.backbone_vars)
    _write_bytes(os.path.join(tmp, "backbone.msgpack"), flax.serialization.msgpack_serialize(bb))
    pool = predictor.pool
    np.savez(os.path.join(tmp, "prompt_pool.npz"), features=pool.features,
             class_ids=pool.class_ids, descriptors=pool.descriptors)
    meta = {"format_version": FORMAT_VERSION, "classes": list(classes), "step": step,
            "input_size": cfg.input_size, "mean": list(cfg.data.mean), "std": list(cfg.data.std),
            "fusion_c": fusion_c, "alpha": cfg.eval.alpha, "pool_size": cfg.eval.pool_size,
            "threshold": threshold, "backbone": cfg.model.backbone,
            "config": json.loads(cfg.to_json_best_effort())}
    with open(os.path.join(tmp, "export.json"), "w", encoding="utf-8") as f:
      json.dump(meta, f, indent=1)
    if os.path.exists(out_dir):
      shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _read(path: str, what: str) -> bytes:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"export is incomplete: {what} missing ({path})")
  with open(path, "rb") as f:
    return f.read()


def load_export(export_dir: str, mesh=None) -> LoadedModel:
  """Loads an export with no training state; clear errors for missing, truncated or foreign files."""
  mesh = mesh or sharding.make_mesh()
  meta_path = os.path.join(export_dir, "export.json")
  try:
    meta = json.loads(_read(meta_path, "export.json"))
  except json.JSONDecodeError as e:
    raise ValueError(f"{meta_path} is not valid JSON ({e}); the export is damaged") from e
  if meta.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"{meta_path}: export format version {meta.get('format_version')!r} is not "
                     f"supported by this onenip-jax (expects {FORMAT_VERSION}); re-export the model")
  cfg = ml_collections.ConfigDict(meta["config"])
  model, features = inference.make_model(cfg)
  variables = _restore_msgpack(os.path.join(export_dir, "model.msgpack"))
  backbone_vars = _restore_msgpack(os.path.join(export_dir, "backbone.msgpack"))
  pool_path = os.path.join(export_dir, "prompt_pool.npz")
  _read(pool_path, "prompt_pool.npz")
  try:
    with np.load(pool_path) as z:
      pool = inference.PromptPool(z["features"], z["class_ids"], z["descriptors"])
  except Exception as e:  # zipfile / pickle errors of a damaged file
    raise ValueError(f"{pool_path} cannot be read ({e}); the export is damaged") from e
  repl = sharding.replicated(mesh)
  predictor = inference.Predictor(model, features, jax.device_put(variables, repl),
                                  jax.device_put(backbone_vars, repl), mesh, pool,
                                  tuple(meta["classes"]))
  return LoadedModel(predictor, cfg, tuple(meta["classes"]), float(meta["fusion_c"]),
                     int(meta["step"]), meta.get("threshold"))


def _restore_msgpack(path: str) -> dict:
  try:
    return flax.serialization.msgpack_restore(_read(path, os.path.basename(path)))
  except (ValueError, TypeError, Exception) as e:  # msgpack raises several exception types
    if isinstance(e, FileNotFoundError):
      raise
    raise ValueError(f"{path} cannot be decoded ({type(e).__name__}: {e}); the export is damaged "
                     "or truncated") from e


def main(argv=None) -> None:
  """`onenip-export`: checkpoint -> self-contained export directory."""
  parser = argparse.ArgumentParser(prog="onenip-export", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True, help="training work directory")
  parser.add_argument("--out", required=True, help="export directory to create")
  parser.add_argument("--step", type=int, help="checkpoint step (default: latest)")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing export")
  parser.add_argument("--calibrate", action="store_true",
                      help="store the F1-optimal image threshold measured on the config's test set")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True)
  logging.getLogger("absl").setLevel(logging.WARNING)
  try:  # before any work: a wrong --out should not cost the time of loading and calibrating
    check_out_dir(args.out, args.overwrite, args.workdir)
  except (FileExistsError, ValueError) as e:
    parser.error(str(e))
  from data_pipelines import indexing  # pylint: disable=g-import-not-at-top
  from onenip_jax import evaluate, metrics  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh()
  cfg, predictor, fusion_c, step = load_checkpoint(args.workdir, mesh, args.step)
  if np.isnan(fusion_c):
    raise ValueError(f"{args.workdir}: the checkpoint at step {step} has no frozen fusion constant "
                     "(training did not finish); finish training or pass --step of a final checkpoint")
  index = indexing.index_dataset(cfg.data,
                                 verify_cache=os.path.join(args.workdir, "verified_images.json"))
  predictor.pool = inference.build_prompt_pool(predictor, index, cfg)
  threshold = None
  if args.calibrate:
    maps = evaluate.collect_maps(predictor, index.test, index, cfg)
    s = evaluate.fused_maps(maps, np.arange(len(index.test)), fusion_c, cfg.eval.alpha)
    scores = evaluate.image_scores(s, cfg.eval.pool_size)
    labels = np.where(maps["has_mask"], maps["mask"].any(axis=(1, 2)), maps["label"] > 0)
    _, threshold = metrics.f1_max(scores, labels.astype(np.int32))
    threshold = float(threshold)
    log.info("F1-optimal image threshold on %d images: %.5f", len(scores), threshold)
  write_export(args.out, cfg, predictor, index.classes, fusion_c, step, threshold, args.overwrite,
               args.workdir)
  log.info("exported step %d to %s", step, args.out)


if __name__ == "__main__":
  main(sys.argv[1:])
