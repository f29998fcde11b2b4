"""The marker of a finished training run: `<workdir>/finished.json` (read by launch/sweep.py).

Training writes it after the final evaluation (`{"step": N, "metrics": "eval/step_N/metrics.json"}`,
paths relative to the workdir), so a run is finished exactly when the marker and the metrics it
names exist. Through the path layer (local, gs://, ram://).
"""
import json

from data_pipelines import storage

MARKER = "finished.json"


def mark_finished(workdir: str, step: int, eval_dir: str) -> None:
  """Records that `workdir` finished training at `step`, its final metrics in `eval_dir`."""
  rel = eval_dir[len(workdir):].lstrip("/") if eval_dir.startswith(workdir) else eval_dir
  storage.atomic_write(storage.join(workdir, MARKER),
                       json.dumps({"step": int(step), "metrics": storage.join(rel, "metrics.json")}))


def finished(workdir: str) -> dict | None:
  """{'step', 'metrics' (the final metrics.json)} of a finished run; None if it did not finish."""
  if not storage.exists(storage.join(workdir, MARKER)):
    return None
  try:
    marker = json.loads(storage.read_text(storage.join(workdir, MARKER)))
    if not storage.exists(storage.join(workdir, marker["metrics"])):
      return None
    return {"step": marker["step"],
            "metrics": json.loads(storage.read_text(storage.join(workdir, marker["metrics"])))}
  except (OSError, ValueError, KeyError, TypeError):
    return None
