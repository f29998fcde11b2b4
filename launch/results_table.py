r"""Prints a run's per-class results as the README's Markdown table, beside the reference numbers.

  python -m launch.results_table runs/real/eval/step_600 [--pool runs/real/eval-pool]

Reads `metrics.json` (and the run's `train_log.jsonl` for steps and wall time when found).
"""
import argparse
import json
import os

from onenip_jax.evaluation import reports

# Published OneNIP numbers (the official code's v2 log, docs/algorithm.md §12.4, MVTec 224, EfficientNet-B4, 15 classes,
# 1000 epochs, 8 GPUs) and the official code run on this data (shared/data/README.md: Lite2, 224,
# 638 steps, test-set fusion constant).
REFERENCE = {
    "bottle (paper, B4, 15 classes, 1000 ep)": (1.0, 1.0, 0.985143, 0.81372, None),
    "bottle (official code here, Lite2, 638 steps)": (0.9270, 0.9800, 0.7936, 0.3915, None),
    "magnetic_tile (official code here, Lite2, 638 steps)": (0.7581, 0.8678, 0.7269, 0.1599, None),
}
KEYS = ("i_auroc", "i_ap", "p_auroc", "p_ap", "aupro")


def _pct(v):
  return "-" if v is None else f"{100 * v:.2f}"


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("eval_dir")
  p.add_argument("--pool", help="eval dir of the same checkpoint in pool prompt mode")
  a = p.parse_args()
  m = reports.read_metrics(a.eval_dir)
  rows = [(f"{c} (this repo)", r) for c, r in m["classes"].items()] + [("mean (this repo)", m["mean"])]
  if a.pool:
    pm = reports.read_metrics(a.pool)
    rows += [(f"{c} (this repo, pool prompts)", r) for c, r in pm["classes"].items()]
    rows += [("mean (this repo, pool prompts)", pm["mean"])]
  print(f"step {m['step']}, fusion {m.get('fusion')} (c = {m.get('fusion_c', float('nan')):.4f}), "
        f"prompts {m.get('prompt_mode')}"
        + (f"; pool picked the right class for {100 * pm['pool_class_accuracy']:.1f}% of test images"
           if a.pool else ""))
  print()
  print("| model | I-AUROC | I-AP | P-AUROC | P-AP | AUPRO |")
  print("|---|---|---|---|---|---|")
  for name, r in rows:
    print(f"| {name} | " + " | ".join(_pct(r[k]) for k in KEYS) + " |")
  for name, vals in REFERENCE.items():
    print(f"| {name} | " + " | ".join(_pct(v) for v in vals) + " |")
  log = os.path.join(a.eval_dir, "..", "..", "train_log.jsonl")
  if os.path.isfile(log):
    with open(log, encoding="utf-8") as f:
      losses = [json.loads(line) for line in f if '"total"' in line]
    if losses:
      print(f"\ntraining loss: step {losses[0]['step']} {losses[0]['total']:.4f} -> "
            f"step {losses[-1]['step']} {losses[-1]['total']:.4f}")


if __name__ == "__main__":
  main()
