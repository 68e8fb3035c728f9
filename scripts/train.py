"""Train one model, or a sweep with --multirun:  python scripts/train.py [+exp=NAME] [group=option] [key=value]"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

import reglab  # noqa: F401  (sets the no-network environment before Lightning, MLflow and albumentations load)
from reglab.errors import ReglabError
from reglab.train import main as run_config


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    try:
        metrics = run_config(cfg)
    except ReglabError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(" ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()) if k.startswith(("val/", "test/"))))
    return metrics.get("val/loss")


if __name__ == "__main__":
    main()
