"""The `cifar_standard` augmentation (zero-pad, random crop of the original size, horizontal flip) as one batched
tensor operation on the batch's own device: the GPU fast path of `InMemoryDataModule.device_augment`.

Albumentations (reglab/data/augmentation.py) transforms one HWC numpy image at a time on the CPU: ~10-20k
images/s on one core, less than one GPU trains a small ResNet on. Here a whole (N, C, H, W) batch is padded once
and every sample's crop window and flip are gathered with one index operation, on CPU or CUDA tensors alike.

Same distribution as the Albumentations pipeline `Pad(p) -> RandomCrop(H, W) -> HorizontalFlip(q)`: crop offsets
uniform over {0, ..., 2p} in each axis (Albumentations maps h_start in [0, 1) to int((H + 2p - H + 1) * h_start)),
flip with probability q; for the same offsets and flip the pixels are identical (tests/test_fast_paths.py).
It works on [0, 1] floats (after `x / scale`), so the fill is converted from the stored units.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F

from reglab.data.loader import AUGMENTATION, epoch_seed
from reglab.errors import ConfigError

DEVICE_CHOICES = ("auto", True, False)


class PadCropFlip:
    """(N, C, H, W) float -> (N, C, H, W): pad `padding` on every side with `fill`, crop a random HxW window,
    flip left-right with probability `flip_p`. One generator per device, seeded by `seed` and, from start_epoch on,
    by loader.epoch_seed(seed, epoch, rank)."""

    def __init__(self, padding: int, flip_p: float = 0.5, fill: float = 0.0, seed: int = 0):
        if padding < 0 or not 0.0 <= flip_p <= 1.0:
            raise ConfigError(f"augmentation: padding={padding} must be >= 0 and flip p={flip_p} in [0, 1]")
        self.padding, self.flip_p, self.fill, self.seed = int(padding), float(flip_p), float(fill), seed
        self._generators: dict[torch.device, torch.Generator] = {}
        self._stream_seed = seed

    def __repr__(self) -> str:
        return f"PadCropFlip(padding={self.padding}, flip_p={self.flip_p:g}, fill={self.fill:g})"

    def start_epoch(self, epoch: int, rank: int = 0) -> None:
        self._stream_seed = epoch_seed(self.seed, epoch, rank, AUGMENTATION)
        self._generators.clear()

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self._stream_seed)
        return self._generators[device]

    def sample(self, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(dy, dx, flip): crop offsets into the padded image, each (n,) int64 in [0, 2p]; flip (n,) bool."""
        g = self._generator(device)
        offsets = torch.randint(0, 2 * self.padding + 1, (2, n), device=device, generator=g)
        flip = torch.rand(n, device=device, generator=g) < self.flip_p
        return offsets[0], offsets[1], flip

    def apply(self, x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
        """The deterministic part: crop window (dy, dx) of the padded batch, flipped where `flip`."""
        n, c, h, w = x.shape
        p = self.padding
        padded = F.pad(x, (p, p, p, p), value=self.fill) if p else x
        rows = dy[:, None] + torch.arange(h, device=x.device)  # (N, H) row index into the padded image
        cols = torch.arange(w, device=x.device).expand(n, w)
        cols = torch.where(flip[:, None], cols.flip(1), cols) + dx[:, None]  # (N, W), reversed where flipped
        batch = torch.arange(n, device=x.device)[:, None, None]
        out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (N, H, W, C)
        return out.permute(0, 3, 1, 2).contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ConfigError(f"augmentation needs image batches (N, C, H, W), got shape {tuple(x.shape)}")
        return self.apply(x, *self.sample(len(x), x.device))


def from_specs(specs: list[Mapping[str, Any]], image_hw: tuple[int, int], stored_dtype: torch.dtype,
               seed: int = 0) -> PadCropFlip | None:
    """The batched equivalent of a pipeline `[Pad] -> RandomCrop(input size) -> [HorizontalFlip]`, or None when
    the pipeline is anything else (it then stays on Albumentations)."""
    names = [s["name"] for s in specs]
    if names not in (["Pad", "RandomCrop", "HorizontalFlip"], ["Pad", "RandomCrop"], ["RandomCrop", "HorizontalFlip"]):
        return None
    by_name = {s["name"]: dict(s) for s in specs}
    pad = by_name.get("Pad", {"padding": 0})
    crop = by_name["RandomCrop"]
    size = tuple(image_hw[i] if crop.get(k) == "input" else crop.get(k) for i, k in enumerate(("height", "width")))
    if (size != tuple(image_hw) or not isinstance(pad.get("padding"), int) or pad.get("border_mode", 0) != 0
            or any(crop.get(k, False) for k in ("pad_if_needed",)) or crop.get("p", 1.0) != 1.0
            or pad.get("p", 1.0) != 1.0):
        return None
    fill = pad.get("fill", 0)
    if not isinstance(fill, (int, float)):
        return None
    fill = fill / 255.0 if stored_dtype == torch.uint8 else float(fill)  # stored units -> [0, 1] floats
    flip_p = by_name.get("HorizontalFlip", {"p": 0.0}).get("p", 0.5)
    return PadCropFlip(pad["padding"], flip_p=flip_p, fill=fill, seed=seed)


def _on_cuda(trainer_cfg: Mapping[str, Any]) -> bool:
    accelerator = str(trainer_cfg.get("accelerator", "cpu"))
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def for_datamodule(cfg, dm) -> PadCropFlip | None:
    """`augmentation.device`: auto (default) = batched on the device when training on CUDA and the pipeline has a
    batched version; true = always (also on CPU, where it is ~10-50x faster than Albumentations); false = never."""
    from reglab.data.augmentation import _specs

    aug = cfg.get("augmentation") or {}
    choice = aug.get("device", "auto")
    if choice not in DEVICE_CHOICES:
        raise ConfigError(f"augmentation.device={choice!r} is not one of auto, true, false")
    specs = _specs(aug.get("transforms"))
    if not specs or choice is False or (choice == "auto" and not _on_cuda(cfg.trainer)):
        return None
    dm.setup()
    if len(dm.input_shape) != 3:
        return None  # not images; augmentation.for_datamodule reports that
    fast = from_specs(specs, tuple(dm.input_shape[1:]), dm.train_x.dtype, seed=cfg.seed)
    if fast is None and choice is True:
        raise ConfigError("augmentation.device=true: only Pad(border_mode=0) -> RandomCrop(input size) -> "
                          f"HorizontalFlip has a batched on-device version, not {[s['name'] for s in specs]}")
    return fast
