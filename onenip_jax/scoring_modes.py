"""The named scorings of SCORINGS: which one `eval.fusion` picks, and their maps and scores.

  calibrated      the run's calibration (`onenip_jax.calibration`): z-scored rec and refiner maps
  reference       the reference fusion (1 - alpha) rec + alpha c ref (`scoring.fused_maps`)
  refiner         the refiner probability alone
  reconstruction  the reconstruction error alone

Host numpy (maps are (N, H, W)); the array maths are `onenip_jax.scoring` and
`onenip_jax.calibration`, the by-name dispatch of evaluation and export lives here.
"""
import logging

import numpy as np

from onenip_jax import calibration as calib
from onenip_jax import exported, scoring

log = logging.getLogger("onenip")
SCORINGS = ("calibrated", "reference", "refiner", "reconstruction")


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
  if name == "calibrated":
    return calib.apply(rec, ref, calib.params_for(calibration, cls))
  if name == "reference":
    s = scoring.fused_maps({"rec": rec, "ref": ref}, slice(None), c, cfg.eval.alpha)
  else:
    s = np.asarray(ref if name == "refiner" else rec, np.float32)
  return s, scoring.image_scores_np(s, cfg.eval.pool_size)


def make_scoring(cfg, fusion_c: float, calibration: dict | None) -> dict:
  """export.json's `scoring`: the `eval.fusion` scoring (`default_scoring`, with its
  fallbacks) as {"fusion", "params": {exported.SCORING_KEYS}, "pool_size", "calibration_scope",
  "requested", "note"}; calibrated uses the GLOBAL calibration (pool prompts: module doc of
  `onenip_jax.export`), which must have been fitted with pool prompts (else PromptModeError)."""
  requested = {"frozen": "reference"}.get(cfg.eval.fusion, cfg.eval.fusion)
  name = default_scoring(cfg, calibration, bool(cfg.model.refiner))
  alpha, pool_size, scope, note = float(cfg.eval.alpha), int(cfg.eval.pool_size), None, ""
  values = {"reference": (0.0, 1.0, 0.0, 1.0, float(np.float32(1.0 - alpha)),
                          float(np.float32(alpha) * np.float32(fusion_c)), 0.0),
            "refiner": (0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0),
            "reconstruction": (0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0)}
  if name == "calibrated":
    why = calib.prompt_mode_error(calibration, "pool")
    if why:  # an export scores pool prompts
      raise calib.PromptModeError(f"eval.fusion='calibrated' for an export: {why}")
    g, scope = calibration["global"], "global"
    values["calibrated"] = (g["rec_mean"], g["rec_std"], g["ref_mean"], g["ref_std"],
                            float(np.float32(1.0 - g["weight"])), float(g["weight"]),
                            float(g.get("ref_space", "probability") == "logodds"))
    pool_size = int(g["pool_size"])
    note = (f"global calibration: w={g['weight']:g}, box {pool_size}, validation "
            f"mean {100 * g['objective']:.2f} ({g['n_normal']} held-out normal + "
            f"{g['n_synthetic']} synthetic images, {calibration.get('prompt_mode', '?')} prompts)")
  elif requested == "calibrated" and name == "reference":
    note = ("eval.fusion='calibrated' but the run has no calibration (calibration."
            "holdout_fraction=0 or an older run): the reference fusion")
  elif name != requested:
    note = f"eval.fusion={requested!r} needs a refiner; this model has none"
  return {"fusion": name, "params": dict(zip(exported.SCORING_KEYS, map(float, values[name]))),
          "pool_size": pool_size, "calibration_scope": scope, "requested": requested,
          "note": note}


def score_maps(entry: dict, rec: np.ndarray, ref: np.ndarray | None, cfg, fusion_c: float,
               calibration: dict | None) -> tuple[np.ndarray, np.ndarray]:
  """(N, H, W) pool-prompt maps -> (anomaly maps (N, H, W) f32, image scores (N,)) of the
  scoring `entry` (`make_scoring`), computed as `onenip-eval` does (`scored_maps`)."""
  return scored_maps(entry["fusion"], rec, ref, c=fusion_c, cfg=cfg, calibration=calibration,
                     cls=None)
