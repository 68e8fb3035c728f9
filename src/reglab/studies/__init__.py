"""Studies: sweeps, reports (read MLflow, write figures and tables) and runners for presets that are not one Classifier fit."""
