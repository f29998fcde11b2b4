"""The export (`export`, `thresholds`) and what runs it: `program`, `predict`, `eval_export`."""
