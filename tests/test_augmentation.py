"""Augmentation pipelines: every conf/augmentation file builds and keeps shape and dtype; cifar_standard is
pad-4 + crop + flip exactly; bad transform names and arguments are errors; digits warn about label-changing
transforms; the pipeline touches the training split only; previews are written and logged to MLflow."""

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CONF, compose, quick
from omegaconf import OmegaConf

from reglab.data import DigitsDataModule
from reglab.data.augmentation import BatchAugment, build_pipeline, build_transform, for_datamodule, label_changing
from reglab.errors import ConfigError

PIPELINES = sorted(p.stem for p in (CONF / "augmentation").glob("*.yaml"))


def _transforms(name):
    return OmegaConf.load(CONF / "augmentation" / f"{name}.yaml").transforms


@pytest.mark.parametrize("name", PIPELINES)
def test_every_pipeline_keeps_shape_and_stored_dtype(name):
    g = torch.Generator().manual_seed(0)
    cifar = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=g)
    digits = torch.randint(0, 17, (16, 1, 8, 8), generator=g).float()  # digits: float 0..16, scale 16
    for x, scale in ((cifar, 255.0), (digits, 16.0)):
        aug = BatchAugment(_transforms(name), image_hw=x.shape[2:], scale=scale, seed=0)
        out = aug(x)
        assert out.shape == x.shape and out.dtype == x.dtype
        assert out.min() >= 0 and out.max() <= scale
        if len(_transforms(name)):
            assert not torch.equal(out, x)


def _shift(img, dy, dx):  # zero-filled translation of a (C, H, W) image: what pad 4 + crop computes
    out = torch.zeros_like(img)
    h, w = img.shape[1:]
    out[:, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        img[:, max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def test_cifar_standard_is_pad4_random_crop_and_flip():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=g)  # no zeros: padding is visible
    out = BatchAugment(_transforms("cifar_standard"), image_hw=(32, 32), scale=255.0, seed=0)(x)
    flips, shifts = 0, set()
    for img, res in zip(x, out):
        found = [(f, dy, dx) for f in (0, 1) for dy in range(-4, 5) for dx in range(-4, 5)
                 if torch.equal(res, _shift(img.flip(2) if f else img, dy, dx))]
        assert len(found) == 1, "every output is one zero-padded shift of |d| <= 4, flipped or not"
        flips += found[0][0]
        shifts.add(found[0][1:])
    assert 16 < flips < 48  # p = 0.5
    assert len(shifts) > 20  # many of the 81 offsets


def test_the_transforms_of_a_seeded_pipeline_draw_independently():
    # Albumentations 2.0.8 seeds every transform of a Compose alike: two p = 0.5 flips were applied together or not
    # at all. Independent coins agree on about half of the images.
    x = torch.arange(400 * 16, dtype=torch.uint8).view(400, 1, 4, 4)  # no image is symmetric under either flip
    aug = BatchAugment([{"name": "HorizontalFlip", "p": 0.5}, {"name": "VerticalFlip", "p": 0.5}], (4, 4), 255.0,
                       seed=0)
    for epoch in (None, 1):
        if epoch is not None:
            aug.start_epoch(epoch)
        out = aug(x)
        h = torch.tensor([torch.equal(o, i.flip(2)) or torch.equal(o, i.flip(1).flip(2)) for o, i in zip(out, x)])
        v = torch.tensor([torch.equal(o, i.flip(1)) or torch.equal(o, i.flip(1).flip(2)) for o, i in zip(out, x)])
        assert 0.4 < h.float().mean() < 0.6 and 0.4 < v.float().mean() < 0.6
        assert 0.4 < (h == v).float().mean() < 0.6


def test_seeded_pipelines_repeat():
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    a = BatchAugment(_transforms("figure_9_1"), (32, 32), 255.0, seed=3)(x)
    b = BatchAugment(_transforms("figure_9_1"), (32, 32), 255.0, seed=3)(x)
    assert torch.equal(a, b)


@pytest.mark.parametrize("spec, match", [
    ({"name": "HorizontalFlp"}, r"transforms\[0\]\.name='HorizontalFlp'.*did you mean HorizontalFlip"),
    ({"name": "RandomCrop", "height": 4, "widht": 4}, r"transforms\[0\]: RandomCrop takes no argument 'widht'"),
    ({"name": "Rotate", "limit": "lots"}, r"transforms\[0\]: Rotate\(limit='lots'\) is invalid"),
    ({"name": "GaussNoise", "var_limit": [10, 50]}, "no argument 'var_limit'"),  # a pre-2.0 argument name
    ({"name": "Compose"}, "not an Albumentations transform"),
    ({"name": "Affine", "rotate": "input"}, "only allowed for height/width"),
])
def test_bad_transforms_are_config_errors(spec, match):
    with pytest.raises(ConfigError, match=match):
        build_transform(spec, 0, image_hw=(8, 8))


def test_albumentations_alone_only_warns_on_a_misspelled_argument():
    # Why build_transform checks arguments itself: albumentations 2.0.8 accepts this with a warning.
    import albumentations as A

    with pytest.warns(UserWarning, match="not valid"):
        A.HorizontalFlip(pp=0.5)
    with pytest.raises(ConfigError, match="no argument 'pp'"):
        build_pipeline([{"name": "HorizontalFlip", "pp": 0.5}])


def test_label_changing_transforms():
    assert label_changing(_transforms("figure_9_1")) == ["HorizontalFlip"]
    assert label_changing(_transforms("digits_safe")) == []
    assert label_changing([{"name": "Rotate", "limit": 90}]) == ["Rotate(limit=90)"]
    assert label_changing([{"name": "Affine", "rotate": [-10, 10]}]) == []


def test_digit_dataset_warns_about_flips_and_not_about_safe_shifts():
    dm = DigitsDataModule(seed=0)
    with pytest.warns(UserWarning, match="b/d, 6/9"):
        for_datamodule({"transforms": _transforms("figure_9_1")}, dm)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        aug = for_datamodule({"transforms": _transforms("digits_safe")}, dm)
    assert aug.image_hw == (8, 8) and aug.scale == 16.0
    assert for_datamodule({"transforms": []}, dm) is None


def test_augmentation_on_non_images_is_a_config_error():
    from reglab.data import MNIST1DDataModule

    with pytest.raises(ConfigError, match="not images"):
        for_datamodule({"transforms": _transforms("digits_safe")}, MNIST1DDataModule(train_samples=100,
                                                                                      test_samples=20))


def test_only_training_batches_are_augmented_after_label_noise(tmp_root, monkeypatch):
    from reglab import train

    seen = []

    class Spy:
        def __call__(self, x):
            seen.append(len(x))
            return x

        def preview(self, *a, **k):  # pragma: no cover - logger is none here
            raise AssertionError

    monkeypatch.setattr(train.augmentation, "for_datamodule", lambda *a, **k: Spy())
    cfg = compose(quick(tmp_root, "model.width=16", "data.train_size=200", "data.label_noise=0.2",
                        "callbacks.early_stopping=null", "callbacks.checkpoint=null"))
    dm = train.build_data(cfg)
    dm.setup()
    assert isinstance(dm.augment, Spy) and dm.label_noise_realized > 0  # noise is in train_y before any batch
    train.run(cfg)
    assert sum(seen) == 2 * 200  # two epochs of the 200 training images; no validation or test batch


def test_preview_png_and_mlflow_artifact(tmp_root, mlflow_uri):
    import mlflow

    from reglab.data.augmentation import write_preview
    from reglab.train import run

    from PIL import Image

    with pytest.warns(UserWarning, match="b/d"):
        path = write_preview(compose(["augmentation=figure_9_1"]), tmp_root / "p.png")
    assert np.asarray(Image.open(path)).std() > 10
    fig = BatchAugment(_transforms("figure_9_1"), (8, 8), 16.0).preview(torch.rand(1, 8, 8) * 16)
    # 2 rows (photo, data sample) x 9 columns (original, the 7 transforms of panels b-h, the pipeline)
    assert len(fig.axes) == 18 and fig.axes[8].get_title() == "pipeline"

    cfg = compose(quick(tmp_root, "logger=mlflow", f"logger.tracking_uri={mlflow_uri}", "logger.experiment=aug",
                        "augmentation=digits_safe", "model.width=16", "data.train_size=200",
                        "callbacks.early_stopping=null", "callbacks.checkpoint=null", "trainer.max_epochs=1"))
    run(cfg)
    client = mlflow.MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("aug")
    run_info = client.search_runs([exp.experiment_id])[0].info
    names = [a.path for a in client.list_artifacts(run_info.run_id)]
    assert "augmentation_preview.png" in names
    local = Path(client.download_artifacts(run_info.run_id, "augmentation_preview.png", str(tmp_root)))
    assert np.asarray(Image.open(local)).std() > 10  # an image, not a blank canvas


@pytest.mark.parametrize("device", [False, True], ids=["albumentations", "batched"])
def test_draws_are_a_function_of_seed_epoch_and_rank(device):
    # A resumed run must draw what the uninterrupted run drew (its epochs' draws cannot depend on the epochs before),
    # and DDP ranks must draw independently: seeded by the run seed alone, every rank gave its i-th image of a step
    # the same crop and flip.
    from types import SimpleNamespace

    from reglab.train import build_data

    over = ["data=synthetic", "augmentation=cifar_standard", f"+augmentation.device={str(device).lower()}"]

    def module(epoch, rank):
        dm = build_data(compose(over))
        dm.setup()
        dm.trainer = SimpleNamespace(training=True, current_epoch=epoch, global_rank=rank, world_size=2)
        return dm

    x = module(0, 0).train_x[:64]

    def draws(dm):  # the batch hooks read the trainer's epoch and rank
        return dm.on_after_batch_transfer(dm.on_before_batch_transfer((x, None), 0), 0)[0]

    uninterrupted = module(0, 0)
    draws(uninterrupted)
    uninterrupted.trainer.current_epoch = 1
    epoch1 = draws(uninterrupted)
    assert torch.equal(epoch1, draws(module(1, 0)))  # resumed at epoch 1: the same draws
    assert not torch.equal(epoch1, draws(module(0, 0)))  # epochs differ
    assert not torch.equal(epoch1, draws(module(1, 1)))  # ranks differ
    assert torch.equal(draws(module(1, 1)), draws(module(1, 1)))
    # A new fit of the same data module (the retrain after early stopping: a new Trainer) starts its epoch 0 afresh,
    # not where the fit before it left the stream.
    first = draws(uninterrupted)  # epoch 1 of the first fit, drawn again: the stream has moved on
    uninterrupted.trainer = SimpleNamespace(training=True, current_epoch=1, global_rank=0, world_size=2)
    assert not torch.equal(first, epoch1) and torch.equal(draws(uninterrupted), epoch1)


def test_augment_preview_script_names_an_unknown_augmentation_in_one_line(tmp_path):
    """As train.py and report.py do (it printed Hydra's report and exited 1)."""
    from train_cli import train_cli

    script = Path(__file__).resolve().parents[1] / "scripts" / "augment_preview.py"
    out = train_cli("augmentation=nosuch", f"paths.root={tmp_path}", script=script, cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines() == ["error: augmentation=nosuch: there is no conf/augmentation/nosuch.yaml; "
                                               "choose one of: cifar_standard, digits_safe, figure_9_1, none"]
