"""PNG grid of an augmentation pipeline, each transform alone and the whole pipeline, on scikit-learn's sample
photo and on the first training image of the data set:

    python scripts/augment_preview.py augmentation=figure_9_1 [data=cifar10] [+out=preview.png]

Default output: <paths.root>/outputs/augment_preview/<augmentation>.png. Runs that use augmentation log the same
grid to MLflow as augmentation_preview.png.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import reglab  # noqa: F401  (no-network environment before albumentations loads)
from reglab import cli
from reglab.data.augmentation import write_preview
from reglab.errors import ReglabError

CONF = Path(__file__).resolve().parents[1] / "conf"


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    name = HydraConfig.get().runtime.choices.get("augmentation", "augmentation")
    out = cfg.get("out") or f"{cfg.paths.root}/outputs/augment_preview/{name}.png"
    try:
        path = write_preview(cfg, out)
    except ReglabError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(path)


if __name__ == "__main__":
    cli.main(main, CONF)  # Hydra's composition errors (an unknown augmentation, a bad override) as one line
