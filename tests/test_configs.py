"""Every config file under conf/ composes and instantiates; parametrized over the files, so a new one is covered."""

import importlib
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import CONF, compose
from reglab.errors import DataError
from reglab.train import build_callbacks, build_data, build_model, build_regularizers

FILES = sorted(p.relative_to(CONF) for p in CONF.rglob("*.yaml") if p.name != "train.yaml")
# The input each model family is tried on: MLPs on digits-shaped data; ResNets on CIFAR-shaped images.
SHAPES = {"MLP": (1, 8, 8), "ResNet18": (3, 32, 32)}


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
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    if cfg.get("runner", "train") != "train":
        return  # a study runner's own config; its module test runs it
    try:
        data = build_data(cfg)
        assert hasattr(data, "setup")
    except DataError as e:  # a torchvision dataset whose files are not here (no download in tests): the config
        assert "\n" not in str(e) and cfg.data.get("dataset")  # is fine, and says so in one line
    model_name = cfg.model._target_.rsplit(".", 1)[-1]
    net = build_model(cfg, SHAPES[model_name], 10)
    for reg in build_regularizers(cfg).values():
        try:
            reg.attach(net)
        except ValueError as e:  # a technique that does not apply to this model says so at start
            assert str(e) and "\n" not in str(e)
    for cb in build_callbacks(cfg, tmp_path):
        assert cb is not None
    # GPU and DDP trainer files are built on one CPU process here: what is checked is that they construct.
    cpu_only = {} if torch.cuda.is_available() else {"accelerator": "cpu", "devices": 1, "strategy": "auto"}
    from reglab import performance

    performance.settings(cfg.trainer)  # trainer.performance: reglab's switches, checked, not Trainer arguments
    trainer = instantiate(performance.trainer_config(cfg.trainer), logger=False, enable_progress_bar=False,
                          default_root_dir=str(tmp_path), **cpu_only)
    assert trainer.max_epochs == cfg.trainer.max_epochs


def test_every_group_option_is_a_listed_file():
    # The defaults in train.yaml point at files that exist (a renamed file would break every run).
    train = OmegaConf.load(CONF / "train.yaml")
    for entry in train.defaults:
        if isinstance(entry, str):
            continue
        (group, option), = entry.items()
        for name in option if OmegaConf.is_list(option) else [option]:
            assert (CONF / group / f"{name}.yaml").exists(), f"{group}/{name}.yaml"
