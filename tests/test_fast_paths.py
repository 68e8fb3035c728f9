"""The fast path computes what the reference path computes: the batched on-device cifar_standard against the
Albumentations pipeline."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import yaml

from conftest import CONF
from reglab.data.augmentation import build_pipeline
from reglab.data.device_augment import PadCropFlip, from_specs

CIFAR_STANDARD = yaml.safe_load((CONF / "augmentation" / "cifar_standard.yaml").read_text())["transforms"]
N = 3000
PAD, SIZE = 4, 32


def position_image() -> np.ndarray:
    """32x32x3 uint8 whose pixels name their position: channel 0 = 7 * row + 1, channel 1 = 7 * col + 1,
    channel 2 = 255; the zero padding is the only place with a 0 (so offsets and flips can be read back)."""
    r, c = np.meshgrid(np.arange(SIZE), np.arange(SIZE), indexing="ij")
    return np.stack([7 * r + 1, 7 * c + 1, np.full_like(r, 255)], axis=-1).astype(np.uint8)


def read_params(out: np.ndarray) -> tuple[int, int, bool]:
    """(dy, dx, flip) of one augmented position image (H, W, 3): the source pixel of the output's corners."""
    inside = out[..., 2] == 255
    ys, xs = np.nonzero(inside)
    top, left = ys.min(), xs.min()
    src_row = (int(out[top, left, 0]) - 1) // 7
    a, b = (int(out[top, left, 1]) - 1) // 7, (int(out[top, xs.max(), 1]) - 1) // 7
    flip = a > b
    dy = PAD + src_row - top  # output row `top` shows source row src_row; padded row = src_row + PAD
    # Output column j shows padded column dx + j, or dx + (W - 1 - j) when flipped; source = padded - PAD.
    dx = PAD + a - (SIZE - 1 - left if flip else left)
    return int(dy), int(dx), bool(flip)


def chi_square_uniform(values: np.ndarray, k: int) -> float:
    counts = np.bincount(values, minlength=k)
    expected = len(values) / k
    return float(((counts - expected) ** 2 / expected).sum())


# 99.9% quantile of chi-square with 8 degrees of freedom (9 offsets): a correct sampler fails 1 in 1000 seeds.
CHI2_8_999 = 26.12


@pytest.fixture(scope="module")
def albumentations_params():
    pipeline = build_pipeline(CIFAR_STANDARD, seed=0, image_hw=(SIZE, SIZE))
    img = position_image()
    return np.array([read_params(pipeline(image=img)["image"]) for _ in range(N)])


@pytest.fixture(scope="module")
def device_aug():
    aug = from_specs(CIFAR_STANDARD, (SIZE, SIZE), torch.uint8, seed=0)
    assert isinstance(aug, PadCropFlip) and aug.padding == PAD and aug.flip_p == 0.5 and aug.fill == 0.0
    return aug


def test_read_params_recovers_known_crops(device_aug):
    x = torch.from_numpy(position_image()).permute(2, 0, 1)[None].float() / 255
    for dy, dx, flip in [(0, 0, False), (8, 3, True), (4, 8, False), (2, 0, True)]:
        out = device_aug.apply(x, torch.tensor([dy]), torch.tensor([dx]), torch.tensor([flip]))
        img = (out[0].permute(1, 2, 0) * 255).round().byte().numpy()
        assert read_params(img) == (dy, dx, flip)


def test_albumentations_offsets_uniform_and_flip_half(albumentations_params):
    dy, dx, flip = albumentations_params.T
    assert dy.min() == 0 and dy.max() == 2 * PAD and dx.min() == 0 and dx.max() == 2 * PAD
    assert chi_square_uniform(dy, 2 * PAD + 1) < CHI2_8_999
    assert chi_square_uniform(dx, 2 * PAD + 1) < CHI2_8_999
    assert abs(flip.mean() - 0.5) < 4 * math.sqrt(0.25 / N)  # 4 standard errors


def test_device_offsets_and_flip_match_albumentations(device_aug, albumentations_params):
    x = torch.from_numpy(position_image()).permute(2, 0, 1)[None].float().div(255).expand(N, -1, -1, -1)
    out = (device_aug(x).permute(0, 2, 3, 1) * 255).round().byte().numpy()
    params = np.array([read_params(o) for o in out])
    dy, dx, flip = params.T
    assert dy.min() == 0 and dy.max() == 2 * PAD and dx.min() == 0 and dx.max() == 2 * PAD
    assert chi_square_uniform(dy, 2 * PAD + 1) < CHI2_8_999
    assert chi_square_uniform(dx, 2 * PAD + 1) < CHI2_8_999
    assert abs(flip.mean() - 0.5) < 4 * math.sqrt(0.25 / N)
    assert len(np.unique(dy * 100 + dx * 2 + flip)) == (2 * PAD + 1) ** 2 * 2  # every combination occurs
    # Same joint distribution as Albumentations: offsets and flip rates differ by less than sampling noise.
    a_dy, a_dx, a_flip = albumentations_params.T
    assert abs(dy.mean() - a_dy.mean()) < 4 * math.sqrt(2 * 20 / 3 / N)  # var of U{0..8} = 80/12
    assert abs(flip.mean() - a_flip.mean()) < 4 * math.sqrt(0.5 / N)


def test_device_pixels_equal_albumentations_for_same_crop(device_aug):
    """A random photo-like image through Albumentations; the device path with the offsets and flip read off the
    position image (same seed, same draws) gives the identical pixels."""
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    for seed in range(20):
        params = read_params(build_pipeline(CIFAR_STANDARD, seed=seed, image_hw=(SIZE, SIZE))(
            image=position_image())["image"])
        expected = build_pipeline(CIFAR_STANDARD, seed=seed, image_hw=(SIZE, SIZE))(image=photo)["image"]
        x = torch.from_numpy(photo).permute(2, 0, 1)[None].float() / 255
        dy, dx, flip = (torch.tensor([v]) for v in params)
        out = (device_aug.apply(x, dy, dx, flip)[0].permute(1, 2, 0) * 255).round().byte().numpy()
        np.testing.assert_array_equal(out, expected)


def test_other_pipelines_have_no_device_version():
    assert from_specs([{"name": "Rotate", "limit": 10}], (32, 32), torch.uint8) is None
    assert from_specs([{"name": "Pad", "padding": 4, "border_mode": 2},
                       {"name": "RandomCrop", "height": "input", "width": "input"}], (32, 32), torch.uint8) is None


@pytest.mark.gpu
def test_device_aug_on_cuda_matches_cpu_for_same_params(device_aug):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    x = torch.rand(64, 3, SIZE, SIZE)
    dy, dx, flip = device_aug.sample(64, torch.device("cpu"))
    cpu = device_aug.apply(x, dy, dx, flip)
    cuda = device_aug.apply(x.cuda(), dy.cuda(), dx.cuda(), flip.cuda())
    torch.testing.assert_close(cuda.cpu(), cpu, rtol=0, atol=0)
