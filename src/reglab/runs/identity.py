"""Who a run is: one hash of what it computes.

`identity(cfg)` is the sha256 of the resolved config minus the keys that change how a run is observed, not what it
computes (`OBSERVATION_KEYS`): a rerun with another logger, progress bar, output folder or launcher is recognised as
the same run. `identity(cfg, without=swept_keys)` is what all members of a study share: it keys the study's parent
run (reglab/runs/study.py) and which sweep members can share one training step (reglab/population/).
"""

from __future__ import annotations

import hashlib
import json

from omegaconf import DictConfig, OmegaConf

# Observation only. `data.root` says where dataset files are kept, not which data. `population` chooses how members
# are trained together, which leaves each member's numbers as they are alone (to float summation order), so it does
# not change who the run is either.
OBSERVATION_KEYS = ("logger", "paths", "data.root", "callbacks.progress", "hydra", "report", "study", "launcher",
                    "population", "resume")


def _drop(container: dict, dotted: str) -> None:
    *path, last = dotted.lstrip("+~").split(".")
    for part in path:
        container = container.get(part) if isinstance(container, dict) else None
        if container is None:
            return
    if isinstance(container, dict):
        container.pop(last, None)


def without_hydra(cfg: DictConfig) -> DictConfig:
    """cfg without Hydra's own node (present in Hydra callbacks; its values need Hydra's runtime resolvers)."""
    return OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]) if "hydra" in cfg else cfg


def semantic_config(cfg: DictConfig, without: tuple[str, ...] | list[str] = ()) -> dict:
    """The resolved config as plain containers, minus OBSERVATION_KEYS and the dotted keys in `without`."""
    c = OmegaConf.to_container(without_hydra(cfg), resolve=True)
    for key in (*OBSERVATION_KEYS, *without):
        _drop(c, key)
    return c


def identity(cfg: DictConfig, without: tuple[str, ...] | list[str] = ()) -> str:
    """sha256 hex of semantic_config(cfg, without): equal identities <=> the same computation."""
    blob = json.dumps(semantic_config(cfg, without), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()
