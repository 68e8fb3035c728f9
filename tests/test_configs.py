"""Every config file under conf/ composes, passes validation and builds what it names; parametrized over the files,
so a new one is covered."""

import importlib
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import get_class, instantiate
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from omegaconf import OmegaConf

from conftest import CONF, compose
from reglab import cli, performance
from reglab.classifier import Classifier
from reglab.config import validate
from reglab.errors import ConfigError, DataError
from reglab.models import MLP
from reglab.train import build_callbacks, build_data, build_model, build_regularizers

FILES = sorted(p.relative_to(CONF) for p in CONF.rglob("*.yaml") if p.name != "train.yaml")
# The input each model family is tried on when its dataset's files are not here: MLPs on digits-shaped data, ResNets
# on CIFAR-shaped images.
SHAPES = {"MLP": (1, 8, 8), "ResNet18": (3, 32, 32)}
RESNET_ONLY = {"spatial_dropout", "stochastic_depth"}  # feature maps, residual blocks: an MLP has none, says so at start


def override_for(rel: Path) -> tuple[list[str], bool]:
    group, name = rel.parent.as_posix(), rel.stem
    if group.startswith("hydra/"):
        return [f"{group}={name}"], True  # e.g. hydra/launcher=local
    if group == "exp":
        return [f"+exp={name}"], False
    if group == "stopping":  # the arms of +exp=early_stopping: a group presets add, not in train.yaml's defaults
        return [f"+stopping={name}"], False
    if group == "regularization":
        return [f"regularization=[{name}]"], False
    if group == "callbacks" and name != "default":
        return [f"callbacks={name}"], False
    return [f"{group}={name}"], False


def first_batch(cfg):
    """(data module, its first training batch as the model sees it), or (None, None) for a torchvision dataset whose
    files are not here (tests download nothing): it must say so in one line."""
    try:
        dm = build_data(cfg)
        dm.setup()
    except DataError as e:
        assert "\n" not in str(e) and cfg.data.get("dataset"), e
        return None, None
    x, y = next(iter(dm.train_dataloader()))
    return dm, (dm.normalize(x), y)


@pytest.mark.parametrize("rel", FILES, ids=[f.as_posix() for f in FILES])
def test_config_composes_and_instantiates(rel, tmp_path):
    overrides, is_hydra = override_for(rel)
    if is_hydra:
        from hydra import compose as hydra_compose
        from hydra import initialize_config_dir

        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = hydra_compose("train", overrides=overrides, return_hydra_config=True)
        node = OmegaConf.select(cfg, rel.parent.as_posix().replace("/", "."))  # e.g. hydra.launcher
        target = node._target_
        module, cls = target.rsplit(".", 1)
        assert hasattr(importlib.import_module(module), cls), target  # the plugin it names is installed
        return
    cfg = compose(overrides)
    if "download" in (cfg.get("data") or {}):
        # A torchvision dataset: no download (CI has a network; this machine's attempts left empty folders under
        # ./data) and no files from ./data either: the missing dataset must be one line (first_batch).
        cfg = compose([*overrides, "data.download=false", f"data.root={tmp_path}"])
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    validate(cfg)  # every shipped value is valid
    if cfg.runner._target_ != "reglab.train.run":
        assert callable(cli.runner(cfg))  # a study runner's own config: the function exists; its module's test runs it
        return

    dm, batch = first_batch(cfg)
    if dm is not None:
        x, y = batch
        assert x.dtype == torch.float32 and tuple(x.shape) == (min(cfg.data.batch_size, len(dm.train_y)),
                                                               *dm.input_shape)
        assert 0 <= y.min() and y.max() < dm.num_classes
    shape = dm.input_shape if dm is not None else SHAPES[cfg.model._target_.rsplit(".", 1)[-1]]
    classes = dm.num_classes if dm is not None else 10
    net = build_model(cfg, shape, classes)
    refused = sorted(RESNET_ONLY & set(cfg.get("regularization") or {})) if isinstance(net, MLP) else []
    if refused:
        with pytest.raises(ConfigError, match=f"^regularization\\.{refused[0]}: "):
            Classifier(net, optim=dict(cfg.optim), regularizers=build_regularizers(cfg))
    else:
        Classifier(net, optim=dict(cfg.optim), regularizers=build_regularizers(cfg))
        x = batch[0][:4] if batch is not None else torch.randn(4, *shape)
        assert net.eval()(x).shape == (len(x), classes)

    # Every callbacks.<name> node is an instance of the class its _target_ names (a progress bar only on a terminal);
    # a checkpoint writes into the folder it is given.
    nodes = [node for node in (cfg.get("callbacks") or {}).values() if node is not None]
    classes_named = [get_class(node._target_) for node in nodes]
    shown = [c for c in classes_named if sys.stdout.isatty() or not issubclass(c, ProgressBar)]
    callbacks = build_callbacks(cfg, tmp_path)
    assert [type(c) for c in callbacks] == shown
    assert all(c.dirpath == str(tmp_path) for c in callbacks if isinstance(c, ModelCheckpoint))

    # cfg.trainer is exactly Lightning's Trainer arguments; GPU and DDP files are built on one CPU process here.
    performance.settings(cfg.get("performance"), performance.on_gpu(cfg.trainer))  # reglab's switches: valid
    cpu_only = {} if torch.cuda.is_available() else {"accelerator": "cpu", "devices": 1, "strategy": "auto"}
    trainer = instantiate(cfg.trainer, logger=False, enable_progress_bar=False, default_root_dir=str(tmp_path),
                          **cpu_only)
    assert trainer.max_epochs == cfg.trainer.max_epochs


def test_every_group_option_is_a_listed_file():
    # The defaults in train.yaml point at files that exist (a renamed file would break every run).
    train = OmegaConf.load(CONF / "train.yaml")
    for entry in train.defaults:
        if isinstance(entry, str):
            continue
        (group, option), = entry.items()
        group = group.removeprefix("override ")  # e.g. `override hydra/sweeper: population`
        for name in option if OmegaConf.is_list(option) else [option]:
            assert (CONF / group / f"{name}.yaml").exists(), f"{group}/{name}.yaml"


@pytest.mark.parametrize("overrides", [
    ["seed=3", "model.width=8", "paths.root=/tmp/x"],  # plain values only: set on the cached composition
    ["model.width=8", "model=resnet18", "optim=adam", "optim.lr=0.5"],  # groups first, whatever their place
    ["+exp=double_descent_mnist1d", "seed=2", "data.label_noise=0.2"],
    ["regularization=[l2,dropout]", "regularization.l2.strength=0.5", "regularization.dropout.keep_prob=0.7"],
    ["callbacks.early_stopping=null", "callbacks.checkpoint.every_n_epochs=5"],  # null replaces a node: Hydra's
    ["model.width=8", "model.width=16"],  # the same key twice: the last wins
    ["+model.extra=1", "model.width=4"], ["~callbacks.early_stopping", "seed=1"],
])
def test_compose_gives_what_hydra_composes(overrides):
    """conftest.compose caches the composition of everything but plain values and sets those on a copy: the result
    must be Hydra's own composition of the same overrides."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        expected = hydra_compose(config_name="train", overrides=overrides)
    got = compose(overrides)
    assert OmegaConf.to_yaml(got) == OmegaConf.to_yaml(expected)
    got.seed = 123  # a copy: the cached composition is not changed by a test
    assert compose(overrides).seed != 123 or "seed=123" in overrides


def _sweep_axes() -> list[tuple[str, str, list[str]]]:
    """(preset, key, each value it sweeps) for every axis of every conf/exp file's grid; an Optuna interval by its
    two ends."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import IntervalSweep

    parser = OverridesParser.create()
    out = []
    for path in sorted((CONF / "exp").glob("*.yaml")):
        params = OmegaConf.select(OmegaConf.load(path), "hydra.sweeper.params") or {}
        for key, value in params.items():
            override = parser.parse_override(f"{key}={value}")
            if isinstance(override.value(), IntervalSweep):
                ends = [override.value().start, override.value().end]
                values = [str(int(v) if isinstance(v, float) and key.endswith("width") else v) for v in ends]
            else:
                values = list(override.sweep_string_iterator())
            out.append((path.stem, key, values))
    return out


AXES = _sweep_axes()


@pytest.mark.parametrize("preset, key, values", AXES, ids=[f"{p}:{k}" for p, k, _ in AXES])
def test_every_value_a_preset_sweeps_composes_validates_and_builds(preset, key, values):
    """A preset's grid is expanded by Hydra only when the study starts: a misspelled option or a value that fails
    validation would stop it midway (after the children before it trained). Each value, set alone on the preset."""
    for value in values:
        cfg = compose([f"+exp={preset}", f"{key}={value}"])
        validate(cfg)
        if cfg.runner._target_ != "reglab.train.run":
            continue
        model = cfg.model._target_.rsplit(".", 1)[-1]
        net = build_model(cfg, SHAPES[model], 10)
        regularizers = build_regularizers(cfg)
        if not (isinstance(net, MLP) and RESNET_ONLY & set(cfg.get("regularization") or {})):
            Classifier(net, optim=dict(cfg.optim), regularizers=regularizers)
