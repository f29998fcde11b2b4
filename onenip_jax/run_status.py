"""The marker of a finished training run: `<workdir>/finished.json` (read by launch/sweep.py).

Training writes it after the final evaluation (`{"step": N, "metrics": "eval/step_N/metrics.json"}`,
paths relative to the workdir), so a run is finished exactly when the marker and the metrics it
names exist. Standard library only.
"""
import json
import os

MARKER = "finished.json"


def mark_finished(workdir: str, step: int, eval_dir: str) -> None:
  """Records that `workdir` finished training at `step`, its final metrics in `eval_dir`."""
  metrics = os.path.relpath(os.path.join(eval_dir, "metrics.json"), workdir)
  tmp = os.path.join(workdir, f".{MARKER}.tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump({"step": int(step), "metrics": metrics}, f)
  os.replace(tmp, os.path.join(workdir, MARKER))


def finished(workdir: str) -> dict | None:
  """{'step', 'metrics' (the final metrics.json)} of a finished run; None if it did not finish."""
  try:
    with open(os.path.join(workdir, MARKER), encoding="utf-8") as f:
      marker = json.load(f)
    with open(os.path.join(workdir, marker["metrics"]), encoding="utf-8") as f:
      return {"step": marker["step"], "metrics": json.load(f)}
  except (OSError, ValueError, KeyError, TypeError):
    return None
