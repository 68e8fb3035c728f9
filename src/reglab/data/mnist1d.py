"""MNIST-1D (Greydanus 2020, arXiv 2011.14439): 40-sample 1-D signals made from 10 digit templates by padding,
shear, translation and noise; generated offline by the `mnist1d` package's generator, no download.

`train_samples` + `test_samples` signals are generated with the package's fixed data seed (42, independent of the
run seed); the package already standardizes them to zero mean and unit variance. Generating 14,000 signals takes
~3-5 s of scipy interpolation in every process that needs them (each sweep job, each population), so the tensors are
kept under `root` (default `data/`, as the torchvision datasets) and read back by later processes.
"""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path

import numpy as np
import torch

from reglab.data.base import Arrays, InMemoryDataModule
from reglab.errors import ConfigError


class MNIST1DDataModule(InMemoryDataModule):
    name = "mnist1d"

    def __init__(self, train_samples: int = 4000, test_samples: int = 1000, data_seed: int = 42,
                 root: str | None = "data", **kwargs):
        super().__init__(**kwargs)
        if train_samples < 10 or test_samples < 10:
            raise ConfigError("data.train_samples and data.test_samples must be >= 10")
        self.train_samples, self.test_samples, self.data_seed = train_samples, test_samples, data_seed
        self.root = root

    def load(self) -> Arrays:
        x, y, xt, yt = cached(self.train_samples, self.test_samples, self.data_seed, self.root)
        return Arrays(x, y, xt, yt, 10)


@functools.lru_cache(maxsize=2)
def cached(train_samples: int, test_samples: int, data_seed: int, root: str | None) -> tuple[torch.Tensor, ...]:
    """generate(...), read from root/mnist1d/ when an earlier process wrote it (root=None: no files). Once per
    process: a sweep worker or a population builds the same set for every member (the run seed does not enter it).
    The file is only a cache: one that cannot be read or written is regenerated or skipped."""
    if root is None:
        return generate(train_samples, test_samples, data_seed)
    from importlib.metadata import version

    path = Path(root) / "mnist1d" / f"mnist1d-{version('mnist1d')}-{train_samples}-{test_samples}-{data_seed}.pt"
    try:
        data = tuple(torch.load(path, weights_only=True))
        if (len(data[0]), len(data[2])) == (train_samples, test_samples):  # one short: written before the fix above
            return data
    except Exception:  # noqa: BLE001  absent (the usual first time), or corrupt, which torch.load reports as any of
        pass  # OSError, EOFError, UnpicklingError, RuntimeError, IndexError...: generate it again
    data = generate(train_samples, test_samples, data_seed)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(list(data), tmp)
        os.replace(tmp, path)  # atomic: parallel jobs writing the same file leave one whole copy
    except OSError:  # a read-only or full disk, a root that is a file: the run goes on with the generated tensors
        with contextlib.suppress(OSError):
            tmp.unlink()
    return data


def generate(train_samples: int, test_samples: int, data_seed: int) -> tuple[torch.Tensor, ...]:
    """(x, y, x_test, y_test) from the mnist1d package's generator."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    total = train_samples + test_samples
    # make_dataset makes num_samples // 10 per class; round up so both splits are full.
    args.num_samples = -(-total // 10) * 10
    # The package cuts at int(num_samples * train_split): train_samples / num_samples rounds below train_samples for
    # ~1% of sizes (61 -> 60); half a sample more cannot round past it.
    args.train_split = (train_samples + 0.5) / args.num_samples
    args.seed = data_seed
    state = np.random.get_state()  # the generator reseeds numpy's global RNG; leave the caller's alone
    try:
        d = make_dataset(args)
    finally:
        np.random.set_state(state)
    x = torch.tensor(d["x"], dtype=torch.float32)
    xt = torch.tensor(d["x_test"], dtype=torch.float32)[:test_samples]
    y = torch.tensor(d["y"], dtype=torch.long)
    yt = torch.tensor(d["y_test"], dtype=torch.long)[:test_samples]
    return x, y, xt, yt
