"""Train one model, or a sweep with --multirun:  python scripts/train.py [+exp=NAME] [group=option] [key=value]"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

import reglab  # noqa: F401  (sets the no-network environment before Lightning, MLflow and albumentations load)
from reglab import cli
from reglab.config import validate

CONF = Path(__file__).resolve().parent.parent / "conf"


def train(cfg: DictConfig) -> dict[str, float]:
    validate(cfg)  # a bad value fails in a second, before Lightning (5 s to import) loads
    cli.quiet_libraries()  # in each job's own process (sweep workers are fresh processes)
    cli.exit_quickly()
    return cli.runner(cfg)(cfg)


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    metrics = cli.run_job(train, cfg, CONF)  # a user error: one line `error: ...`, exit status 2
    if metrics is None:  # a multirun job that failed: the sweep goes on, cli.main exits non-zero at its end
        return None
    cli.metrics_line(metrics)  # a single run's val/ and test/ line; a sweep prints one line per member instead
    return metrics.get("val/loss")


if __name__ == "__main__":
    cli.main(main, CONF)  # Hydra's composition errors (unknown option or key, bad override) as one line too
