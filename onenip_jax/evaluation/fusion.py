"""The named scorings of SCORINGS: which one `eval.fusion` picks, and the vector of each.

  calibrated      the run's calibration (`calibration`): z-scored rec and refiner maps
  reference       the reference fusion (1 - alpha) rec + alpha c ref
  refiner         the refiner probability alone
  reconstruction  the reconstruction error alone

Each is a scoring vector of `scoring.scoring_params`, computed by `scoring.score`; this module
picks the name and the calibration's parameters it uses.
"""
import logging

from onenip_jax.evaluation import calibration as calib
from onenip_jax.evaluation import scoring

log = logging.getLogger("onenip")
SCORINGS = ("calibrated", "reference", "refiner", "reconstruction")


def default_scoring(cfg, calibration, has_refiner: bool) -> str:
  """The scoring `eval.fusion` asks for (module doc of `onenip_jax.evaluation.calibration`), with
  the fallbacks: 'calibrated' without a calibration -> 'reference' (logged); no refiner ->
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


def params_and_pool_size(name, *, c, cfg, calibration=None, cls=None) -> tuple[dict, int]:
  """({SCORING_KEYS: value}, box size) of scoring `name` (see SCORINGS).

  c: the reference fusion constant; cls: the class whose calibration applies (None: the global
  one, as pool prompts use; raises `calibration.PromptModeError` for parameters fitted with other
  prompts)."""
  if name == "calibrated":
    params = calib.params_for(calibration, cls)
    return scoring.scoring_params(name, calibrated=params), int(params["pool_size"])
  return (scoring.scoring_params(name, alpha=float(cfg.eval.alpha), c=c),
          int(cfg.eval.pool_size))


def scored_maps(name, rec, ref, *, c, cfg, calibration=None, cls=None):
  """(anomaly maps (N, H, W) float32, image scores (N,)) of scoring `name` on host maps
  rec, ref (N, H, W) (`scoring.score_host`); arguments as `params_and_pool_size`."""
  params, pool_size = params_and_pool_size(name, c=c, cfg=cfg, calibration=calibration, cls=cls)
  return scoring.score_host(rec, ref, scoring.vector(params), pool_size)


def make_scoring(cfg, fusion_c: float, calibration: dict | None) -> dict:
  """export.json's `scoring`: the `eval.fusion` scoring (`default_scoring`, with its fallbacks) as
  {"fusion", "params": {scoring.SCORING_KEYS}, "pool_size", "calibration_scope", "requested",
  "note"}; calibrated uses the GLOBAL calibration (pool prompts: module doc of
  `onenip_jax.serving.export`), which must have been fitted with pool prompts (else
  PromptModeError)."""
  requested = {"frozen": "reference"}.get(cfg.eval.fusion, cfg.eval.fusion)
  name = default_scoring(cfg, calibration, bool(cfg.model.refiner))
  scope, note = None, ""
  if name == "calibrated":
    why = calib.prompt_mode_error(calibration, "pool")
    if why:  # an export scores pool prompts
      raise calib.PromptModeError(f"eval.fusion='calibrated' for an export: {why}")
    g, scope = calibration["global"], "global"
    note = (f"global calibration: w={g['weight']:g}, box {int(g['pool_size'])}, validation "
            f"mean {100 * g['objective']:.2f} ({g['n_normal']} held-out normal + "
            f"{g['n_synthetic']} synthetic images, {calibration.get('prompt_mode', '?')} prompts)")
  elif requested == "calibrated" and name == "reference":
    note = ("eval.fusion='calibrated' but the run has no calibration (calibration."
            "holdout_fraction=0 or an older run): the reference fusion")
  elif name != requested:
    note = f"eval.fusion={requested!r} needs a refiner; this model has none"
  params, pool_size = params_and_pool_size(name, c=fusion_c, cfg=cfg, calibration=calibration)
  return {"fusion": name, "params": params, "pool_size": pool_size, "calibration_scope": scope,
          "requested": requested, "note": note}
