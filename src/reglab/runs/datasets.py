"""What a run trained and was evaluated on, as MLflow dataset inputs: the runs table's Dataset column and its filter.

Each run logs its three splits under the datamodule's name (`digits`, `mnist1d`, `cifar10`, ...), with the input
tag `mlflow.data.context` = train / val / test. A split's digest is the sha256 (first DIGEST_CHARS hex digits) of
what makes it this run's split: its positions in the loaded training set (the seeded validation split and training
subset), its labels as trained on (after label noise), and a strided sample of its inputs (another generator
setting or file gives other inputs). Two runs with the same digest saw the same examples with the same labels; the
seed or the label noise changes the train digest. The profile holds the sizes. Hashing labels and indices, not
every input byte, keeps this to milliseconds for CIFAR-sized sets, and a population logs one per member.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

from mlflow.data.code_dataset_source import CodeDatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Dataset, DatasetInput, InputTag
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

DIGEST_CHARS = 10  # MLflow shows digests of about 8 characters; its store keeps up to 36
INPUT_SAMPLE = 1 << 16  # input values hashed per split, evenly strided


class SplitDataset(MetaDataset):
    """A split held in memory by a reglab datamodule: metadata only (name, digest, source, profile), no data."""

    def __init__(self, source: CodeDatasetSource, name: str, digest: str, profile: dict[str, Any]):
        self._profile = profile
        super().__init__(source, name=name, digest=digest)

    @property
    def profile(self) -> dict[str, Any]:
        return self._profile

    def to_dict(self) -> dict[str, str]:
        return {**super().to_dict(), "profile": json.dumps(self._profile)}


def digest(name: str, exact: tuple[torch.Tensor, ...], sampled: torch.Tensor) -> str:
    """sha256 of `name`, every value of the `exact` tensors (indices, labels) and INPUT_SAMPLE evenly strided values
    of `sampled` (the inputs), with their shapes and dtypes."""
    flat = sampled.detach().reshape(-1)
    flat = flat[:: max(1, flat.numel() // INPUT_SAMPLE)][:INPUT_SAMPLE]
    h = hashlib.sha256(name.encode())
    for t, values in [*((t, t.detach().reshape(-1)) for t in exact), (sampled, flat)]:
        h.update(f"{tuple(t.shape)} {t.dtype};".encode())
        h.update(values.cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:DIGEST_CHARS]


def splits(dm) -> dict[str, SplitDataset]:
    """{context: dataset} of a set-up InMemoryDataModule (reglab/data/base.py); an empty validation split is left
    out. The store keeps one copy of a (name, digest) per experiment, so what varies between runs goes in the digest,
    not the source."""
    source = CodeDatasetSource({"datamodule": f"{type(dm).__module__}.{type(dm).__qualname__}"})
    noise = {"label_noise": dm.label_noise, "label_noise_realized": round(dm.label_noise_realized, 6)}
    parts = {"train": (dm.train_x, dm.train_y, (dm.train_idx,), noise),
             "val": (dm.val_x, dm.val_y, (dm.val_idx,), {}),
             "test": (dm.test_x, dm.test_y, (), {})}
    out = {}
    for context, (x, y, where, extra) in parts.items():
        if len(y):
            profile = {"num_rows": len(y), "input_shape": list(x.shape[1:]), "num_classes": dm.num_classes, **extra}
            out[context] = SplitDataset(source, dm.name, digest(f"{dm.name}/{context}", (*where, y), x), profile)
    return out


def inputs(dm) -> list[DatasetInput]:
    """The run's dataset inputs for MlflowClient.log_inputs (what mlflow.log_input builds, for a given run id)."""
    return [DatasetInput(Dataset(**ds.to_dict()), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])
            for context, ds in splits(dm).items()]
