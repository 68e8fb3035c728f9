"""reglab: regularization in deep learning as runnable, reproducible studies (Lightning + Hydra + MLflow)."""

import os

# No outbound calls at run time: albumentations 2.0.8 asks PyPI for a newer version on every import, MLflow
# sends usage telemetry. Set before either is imported; a user's explicit setting wins.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

__version__ = "0.1.0"
