"""The export and its consumers: the serialised predictor, its thresholds, onenip-predict, onenip-eval --exported."""
