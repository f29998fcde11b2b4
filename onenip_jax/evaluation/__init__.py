"""After the network: the predictor, maps, scorings, calibration, metrics and reports."""
