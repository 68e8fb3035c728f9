"""Every file in conf/regularization/ and conf/augmentation/ trains 2 epochs on digits and learns; every
regularization file either applies to both models or fails at start with a ConfigError naming it."""

import math

import pytest
import torch
from conftest import CONF, compose, quick

from reglab.errors import ConfigError
from reglab.models import MLP, ResNet18

REGULARIZATION = sorted(p.stem for p in (CONF / "regularization").glob("*.yaml"))
AUGMENTATION = sorted(p.stem for p in (CONF / "augmentation").glob("*.yaml"))
RESNET_ONLY = {"spatial_dropout", "stochastic_depth"}  # feature maps, residual blocks; a width-4 ResNet18, 300 images
LEAN = ("model.width=64", "optim.lr=0.01", "callbacks.early_stopping=null", "callbacks.checkpoint=null")
PENALTY = {"l1", "l2", "elastic_net"}  # add a term to the loss -> train/penalty/<name>


def _learned(metrics, floor=0.4):
    assert math.isfinite(metrics["train/loss"])
    assert metrics["val/acc"] > floor, metrics  # chance is 0.1
    for k in ("params/zero_frac", "params/l1", "params/l2"):
        assert k in metrics


def _model(name: str) -> tuple[str, ...]:
    return ("model=resnet18", "model.width=4", "data.train_size=300") if name in RESNET_ONLY else ()


@pytest.fixture(scope="module")
def unregularized(tmp_path_factory) -> dict:
    """The same runs without a regularizer, per model: what each config must change."""
    from reglab.train import run

    return {resnet: run(compose(quick(tmp_path_factory.mktemp("none"), "regularization=[]", *LEAN,
                                      *_model("stochastic_depth" if resnet else "l1"))))
            for resnet in (False, True)}


@pytest.mark.parametrize("name", REGULARIZATION)
def test_regularization_config_trains(tmp_root, name, unregularized):
    from reglab.train import run

    # At 2 epochs SWA's default start (0.75) averages one snapshot, the final weights: both epochs here.
    swa = ("regularization.swa.start=0",) if name == "swa" else ()
    cfg = compose(quick(tmp_root, f"regularization=[{name}]", *LEAN, *_model(name), *swa))
    assert cfg.regularization, f"{name}.yaml must define at least one regularizer"
    metrics = run(cfg)
    if name not in RESNET_ONLY:
        _learned(metrics)
    # It took effect: the run is not the unregularized one (same seed, data, order and initialization; on a CPU
    # both are deterministic), in its training or its evaluation (EMA and SWA evaluate their average).
    plain = unregularized[name in RESNET_ONLY]
    assert (metrics["train/loss"], metrics["val/loss"]) != (plain["train/loss"], plain["val/loss"]), name
    for reg in cfg.regularization:  # config file name = dict key = metric suffix
        assert (f"train/penalty/{reg}" in metrics) == (reg in PENALTY)
        if reg in PENALTY:
            assert metrics[f"train/penalty/{reg}"] > 0


@pytest.mark.parametrize("name", AUGMENTATION)
def test_augmentation_config_trains(tmp_root, name):
    from reglab.train import run

    from reglab.train import build_data

    # CIFAR's pad-4 crop and flips on 8x8 digits (half the image shifted away, 6/9 swapped) learn slowly: at 2 epochs
    # val/loss was 2.18-2.31 over seeds 0-3 (a coin flip against a floor), at 8 epochs 1.60-2.07.
    epochs = 8 if name == "cifar_standard" else 2
    cfg = compose(quick(tmp_root, f"augmentation={name}", *LEAN, f"trainer.max_epochs={epochs}"))
    assert (build_data(cfg).augment is None) == (len(cfg.augmentation.transforms) == 0)
    metrics = run(cfg)
    # Every pipeline must train; cifar_standard on digits only needs to beat the uniform guess, ln 10 = 2.30, clearly.
    if name == "cifar_standard":
        assert metrics["val/loss"] < math.log(10) - 0.15, metrics
    else:
        _learned(metrics)


@pytest.mark.parametrize("name", REGULARIZATION)
def test_regularization_applies_to_both_models_or_says_why(name):
    from reglab.classifier import Classifier
    from reglab.train import build_regularizers

    cfg = compose([f"regularization=[{name}]"])
    for net in (MLP((1, 8, 8), 10, width=8), ResNet18((1, 8, 8), 10, width=2)):
        try:
            Classifier(net, optim={"name": "adam", "lr": 1e-3}, regularizers=build_regularizers(cfg))
        except ConfigError as e:
            assert str(e).startswith("regularization."), e
            assert name in RESNET_ONLY and isinstance(net, MLP), f"{name} refused {type(net).__name__}: {e}"
            continue
        x = torch.randn(4, 1, 8, 8)
        net.train()(x).sum().backward()
        assert net.eval()(x).shape == (4, 10)


def test_values_are_overridable_and_bad_ones_fail_with_the_key(tmp_root):
    from reglab.train import build_regularizers, run

    regs = build_regularizers(compose(["regularization=[l2,dropout]", "regularization.l2.strength=1e-4",
                                       "regularization.dropout.keep_prob=0.8"]))
    assert regs["l2"].strength == 1e-4 and regs["dropout"].keep_prob == 0.8
    with pytest.raises(ConfigError, match=r"regularization\.dropout.*keep_prob=1.5"):
        run(compose(quick(tmp_root, "regularization=[dropout]", "regularization.dropout.keep_prob=1.5")))
    with pytest.raises(ConfigError, match=r"regularization\.spatial_dropout: spatial dropout"):
        run(compose(quick(tmp_root, "regularization=[spatial_dropout]")))


def test_recipe_combines_techniques():
    cfg = compose(["regularization=[l2_dropout_bn]"])
    assert set(cfg.regularization) == {"l2", "dropout"} and cfg.model.norm == "batch"
    cfg = compose(["regularization=[l2_dropout_bn]", "regularization.l2.strength=1e-3", "model.norm=layer"])
    assert cfg.regularization.l2.strength == 1e-3 and cfg.model.norm == "layer"


def test_proximal_l1_gives_exact_zeros_in_training_and_subgradient_l1_does_not(tmp_root):
    from reglab.train import run

    common = ("optim=sgd", "optim.momentum=0", "optim.lr=0.05", "model.width=64", "callbacks.early_stopping=null",
              "callbacks.checkpoint=null")
    prox = run(compose(quick(tmp_root, "regularization=[l1_proximal]", "regularization.l1_proximal.strength=0.02",
                             *common)))
    sub = run(compose(quick(tmp_root, "regularization=[l1]", "regularization.l1.strength=0.02", *common)))
    assert prox["params/zero_frac"] > 0.1, prox  # 2 epochs of SGD; the fraction keeps growing with training
    assert sub["params/zero_frac"] == 0, sub
    assert sub["train/penalty/l1"] > 0 and "train/penalty/l1_proximal" not in prox
