"""LightningDataModules, one per dataset family; all share the in-memory path of `base.InMemoryDataModule`."""

from reglab.data.base import InMemoryDataModule
from reglab.data.digits import DigitsDataModule
from reglab.data.mnist1d import MNIST1DDataModule
from reglab.data.vision import VisionDataModule

__all__ = ["InMemoryDataModule", "DigitsDataModule", "MNIST1DDataModule", "VisionDataModule"]
