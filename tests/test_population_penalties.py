"""Regularizers that act on the training step, fused: penalties (L1, L2, elastic net), decoupled weight decay,
proximal L1, max-norm, label smoothing and optim.weight_decay on a population give each member what its solo run
gets. Members differ in seed, MLP width and the regularizer's strength; each ends within 1e-5 of its solo run
(every final metric and weight) with the same per-epoch train/penalty/<name> and train/max_norm/clipped_frac. What
populations still refuse, and the presets that fuse now. The comparison helpers: tests/conftest.py."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from conftest import assert_members_match, compose, solo_and_population

from reglab.classifier import Classifier
from reglab.models import MLP, ResNet18
from reglab.population import fuse
from reglab.population.sweeper import member_keys, why_not
from reglab.regularization.penalties import (
    L1, L2, CoupledWeightDecay, ElasticNet, L1Proximal, MaxNorm, WeightDecay,
)

BASE = ["data=digits", "data.train_size=128", "data.batch_size=32", "data.label_noise=0.1", "model.depth=2",
        "optim=sgd", "optim.lr=0.05", "optim.momentum=0.9", "callbacks.early_stopping=null", "logger=none",
        "trainer.max_epochs=3", "population.mode=on"]
# Members 0 and 2 differ in the strength only; the width-8 and width-16 groups each hold both strengths, their members
# not adjacent (member 0's rows and member 2's share one stacked tensor).
SHAPES = [["model.width=8", "seed=0"], ["model.width=16", "seed=1"], ["model.width=8", "seed=0"],
          ["model.width=16", "seed=0"]]
WEAK_STRONG = (0, 0, 1, 1)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # models this small gain nothing from threads on a shared CPU (and wait on busy cores)
    yield
    torch.set_num_threads(before)


def members(*strengths: tuple[str, tuple[float, float]]) -> list[list[str]]:
    """SHAPES with each `key` at its first value for members 0, 1 and its second for members 2, 3."""
    return [[*shape, *(f"{key}={values[w]}" for key, values in strengths)] for shape, w in zip(SHAPES, WEAK_STRONG)]


def train_logged(root, base, member_overrides):
    """solo_and_population, and each run's train/* metrics per epoch as the Classifier hands them to its loggers:
    (solo, pop, solo weights, pop weights, solo histories, pop histories), history = [{metric: value}] per epoch."""
    logged: dict[Classifier, list] = {}
    log_epoch = Classifier._log_epoch

    def spy(self, stage):
        values = log_epoch(self, stage)
        if stage == "train":
            logged.setdefault(self, []).append(values)
        return values

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Classifier, "_log_epoch", spy)
        result = solo_and_population(root, base, member_overrides)
    *solo_runs, population = logged.values()
    pop_history = [[epoch[m] for epoch in population] for m in range(len(member_overrides))]
    return (*result, solo_runs, pop_history)


def assert_histories_match(solo_h, pop_h, prefix: str):
    """Every epoch's train/* and params/* of each member as its solo run's, `prefix` among them."""
    for s, p in zip(solo_h, pop_h):
        assert any(k.startswith(prefix) for k in s[0]) and len(s) == len(p) == 3
        for epoch, (a, b) in enumerate(zip(s, p)):
            assert b.keys() == a.keys()
            for k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-7), (epoch, k)


# --- each member ends where its solo run ends ------------------------------------------------------------------------
CASES = {  # regularization: the strengths members differ in (weak, strong), the per-epoch metric to compare
    "l1": ([("regularization.l1.strength", (1e-3, 1e-2))], "train/penalty/l1"),
    "l2": ([("regularization.l2.strength", (1e-3, 3e-2))], "train/penalty/l2"),
    "elastic_net": ([("regularization.elastic_net.l1_strength", (1e-3, 1e-2)),
                     ("regularization.elastic_net.l2_strength", (3e-2, 1e-3))], "train/penalty/elastic_net"),
    "weight_decay": ([("regularization.weight_decay.strength", (0.1, 1.0))], "params/"),
    "l1_proximal": ([("regularization.l1_proximal.strength", (1e-2, 1e-1))], "params/zero_frac"),
    "max_norm": ([("regularization.max_norm.max_norm", (0.3, 0.6))], "train/max_norm/clipped_frac"),
    "label_smoothing": ([], "train/loss"),  # one eps: the members differ in seed and width
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_member_ends_where_its_solo_run_ends_with_its_own_strength(tmp_path, name):
    strengths, history = CASES[name]
    solo, pop, solo_w, pop_w, solo_h, pop_h = train_logged(tmp_path, [*BASE, f"regularization=[{name}]"],
                                                           members(*strengths))
    assert_members_match(solo, pop, solo_w, pop_w)
    assert_histories_match(solo_h, pop_h, history)
    if strengths:  # the strength reached its member: same seed and width, another end
        assert pop[0]["params/l2"] != pytest.approx(pop[2]["params/l2"], rel=1e-3)
    if name == "l1_proximal":
        assert pop[2]["params/zero_frac"] > 0  # exact zeros
    if name == "max_norm":  # it binds, and the looser ball clips fewer rows
        assert 0 < pop[2]["train/max_norm/clipped_frac"] < pop[0]["train/max_norm/clipped_frac"]


@pytest.mark.parametrize("optim", ["sgd", "adam", "adamw"])
def test_members_differing_in_optim_weight_decay_end_where_their_solo_runs_end(tmp_path, optim):
    """SGD's and Adam's decay (g + wd*w) and AdamW's (w * (1 - lr*wd)) per member, the optimizer's own set to 0; with
    an L2 penalty beside it, whose gradient comes first."""
    base = [o for o in BASE if not o.startswith("optim.")] + [f"optim={optim}", "optim.lr=0.01", "regularization=[l2]"]
    decay = (1e-2, 0.3) if optim == "sgd" else (1e-3, 3.0)
    solo, pop, solo_w, pop_w, solo_h, pop_h = train_logged(tmp_path, base, members(("optim.weight_decay", decay)))
    assert_members_match(solo, pop, solo_w, pop_w)
    assert_histories_match(solo_h, pop_h, "train/penalty/l2")
    assert pop[0]["params/l2"] != pytest.approx(pop[2]["params/l2"], rel=1e-3)


def test_resnet_members_max_norm_per_output_channel_of_the_grouped_kernels(tmp_path):
    base = ["data=digits", "data.train_size=64", "data.batch_size=32", "model=resnet18", "model.width=2",
            "optim=sgd", "optim.lr=0.05", "callbacks.early_stopping=null", "logger=none", "trainer.max_epochs=2",
            "population.mode=on", "regularization=[max_norm]"]
    runs = [["seed=0", "regularization.max_norm.max_norm=0.3"], ["seed=1", "regularization.max_norm.max_norm=0.3"],
            ["seed=0", "regularization.max_norm.max_norm=0.5"]]
    solo, pop, solo_w, pop_w = solo_and_population(tmp_path, base, runs)
    assert_members_match(solo, pop, solo_w, pop_w)
    assert 0 < pop[2]["train/max_norm/clipped_frac"] < pop[0]["train/max_norm/clipped_frac"]


# --- the hooks on stacked tensors, one step, against each solo net ---------------------------------------------------
def solo_nets(kind: str) -> list[torch.nn.Module]:
    torch.manual_seed(0)
    if kind == "resnet":
        return [ResNet18((1, 8, 8), 3, width=2, norm="batch") for _ in range(3)]
    return [MLP((6,), 3, width=w, depth=2, norm="batch") for w in (4, 8, 4)]  # groups {0, 2} and {1}


HOOKS = [  # (regularizer with one value per member, one per member's solo run)
    (lambda v: L1(v, include_bias=True), (1e-2, 3e-2, 1e-1)),
    (lambda v: L2(v), (1e-2, 3e-2, 1e-1)),
    (lambda v: ElasticNet(v, v), (1e-2, 3e-2, 1e-1)),
    (lambda v: WeightDecay(v, include_bias=True), (0.5, 2.0, 5.0)),
    (lambda v: CoupledWeightDecay(v), (0.5, 2.0, 5.0)),
    (lambda v: L1Proximal(v), (0.1, 0.3, 1.0)),
    (lambda v: MaxNorm(v), (0.3, 0.5, 0.8)),
]


@pytest.mark.parametrize("kind", ["mlp", "resnet"])
@pytest.mark.parametrize("make, values", HOOKS)
def test_a_population_hook_acts_on_each_member_as_on_its_solo_net(kind, make, values):
    """penalty, before_step, an SGD step and after_step on a population with one value per member equal the same on
    each member's solo net with its own value: the penalty (M,), the weights, max-norm's clipped fraction (M,). The
    gradient besides the penalty's is sin(w), elementwise, so it is the same on stacked and solo tensors (the fused
    forward pass, whose sums run in another order, is the end-to-end tests' part)."""
    nets = solo_nets(kind)
    population = fuse(copy.deepcopy(nets), (1, 8, 8) if kind == "resnet" else (6,))
    with torch.no_grad():
        for p in [*population.parameters(), *(q for net in nets for q in net.parameters())]:
            p.mul_(4)  # rows well outside max-norm's balls, weights well past L1's thresholds

    def step(net, reg):
        penalty = reg.penalty(net)
        if penalty is not None:
            penalty.sum().backward()
        for p in net.parameters():
            p.grad = p.detach().sin() + (0 if p.grad is None else p.grad)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        reg.before_step(net, opt)
        opt.step()
        reg.after_step(net, opt)
        return penalty, reg.epoch_metrics()

    fused, fused_metrics = step(population, make(list(values)))
    for m, (net, value) in enumerate(zip(nets, values)):
        alone, metrics = step(net, make(value))
        if alone is not None:
            assert fused.shape == (3,) and fused[m].item() == pytest.approx(alone.item(), rel=1e-6)
        for k, v in metrics.items():
            assert fused_metrics[k].shape == (3,) and fused_metrics[k][m].item() == pytest.approx(v.item(), rel=1e-6)
        for k, v in net.state_dict().items():
            torch.testing.assert_close(population.member_state_dict(m)[k], v, rtol=1e-6, atol=1e-7, msg=k)


def test_per_member_values_need_a_population_of_as_many():
    with pytest.raises(ValueError, match="one per member"):
        L2([0.1, 0.2]).penalty(solo_nets("mlp")[0])
    with pytest.raises(ValueError, match="3 members"):
        MaxNorm([0.1, 0.2]).after_step(fuse(solo_nets("mlp"), (6,)), torch.optim.SGD([torch.zeros(1)], lr=0.1))


def test_a_stopped_member_stays_frozen_under_a_projection_after_the_step(tmp_path):
    """Early stopping puts a stopped member's weights back after each step (population/stopping.py) in
    on_train_batch_end, which callbacks get first: the Classifier's after_step hooks (soft-thresholding here) run
    before it, in optimizer_step, so the member stays bit for bit where it stopped."""
    from reglab.population.data import PopulationDataModule
    from reglab.population.stopping import MemberStopping
    from reglab.train import build_data, build_model

    base = [o for o in BASE if not o.startswith("callbacks.")]
    cfgs = [compose([*base, f"paths.root={tmp_path}", "model.width=8", f"seed={s}",
                     "callbacks.early_stopping.patience=5"]) for s in (0, 1)]
    nets, dms = [], []
    for c in cfgs:
        L.seed_everything(c.seed, verbose=False)
        dms.append(build_data(c))
        dms[-1].setup()
        nets.append(build_model(c, dms[-1].input_shape, dms[-1].num_classes))
    module = Classifier(fuse(nets, dms[0].input_shape), {"name": "sgd", "lr": 0.05},
                        {"l1_proximal": L1Proximal(0.05)})
    stopping = MemberStopping.from_config(cfgs[0], 2)
    stopping.stopped[1] = {"epoch": 0, "step": 0, "metrics": {}}  # as a resumed population whose member 1 stopped
    before = module.net.member_state_dict(1)
    L.Trainer(max_epochs=2, logger=False, callbacks=[stopping], enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, num_sanity_val_steps=0).fit(module, datamodule=PopulationDataModule(dms))
    after = module.net.member_state_dict(1)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert not torch.equal(module.net.member_state_dict(0)["hidden.0.linear.weight"],
                           nets[0].hidden[0].linear.weight)  # member 0 trained (and was thresholded)


# --- what still runs one job per member, and the presets ---------------------------------------------------------------
def test_why_not_refuses_each_remaining_step_regularizer_in_one_line_naming_it():
    cfg = ["callbacks.early_stopping=null"]
    for name in ("l1", "l2", "elastic_net", "weight_decay", "l1_proximal", "max_norm", "label_smoothing",
                 "l2_dropout_bn", "efficientnet_style", "awd_lstm_style"):
        assert why_not(compose([*cfg, f"regularization=[{name}]"])) is None, name
    refused = {"mixup": "lam and pairing drawn per step", "cutmix": "box and pairing drawn per step",
               "ema": "not kept per member", "swa": "update_bn resets torch's BatchNorm layers",
               "stochastic_depth": "share their samples' draws"}
    for name, why in refused.items():
        reason = why_not(compose([*cfg, "model=resnet18", f"regularization=[{name}]"]))
        assert reason.startswith(f"regularization.{name} ") and why in reason and "\n" not in reason, reason
    both = why_not(compose([*cfg, "regularization=[l2,mixup,ema]"]))
    assert "l2" not in both and both.count("regularization.") == 2


def test_why_not_refuses_what_couples_the_members_steps_and_keeps_bf16():
    cfg = ["callbacks.early_stopping=null"]
    for override, why in (("+trainer.gradient_clip_val=1.0", "gradient clipping"),
                          ("+trainer.accumulate_grad_batches=2", "accumulation"),
                          ("trainer.precision=16-mixed", "fp16 loss scaling"), ("trainer.devices=2", "one device")):
        reason = why_not(compose([*cfg, override]))
        assert reason and why in reason and "\n" not in reason, (override, reason)
    assert why_not(compose([*cfg, "trainer.precision=bf16-mixed"])) is None


def test_why_not_counts_the_gpus_auto_means(monkeypatch):
    """trainer.devices=auto on a machine with two GPUs starts two DDP ranks (launcher.uses_ddp, the one parse)."""
    from reglab import launcher

    cfg = compose(["callbacks.early_stopping=null", "trainer=gpu", "trainer.devices=auto"])
    monkeypatch.setattr(launcher, "visible_gpus", lambda devices: [0])
    assert why_not(cfg) is None
    monkeypatch.setattr(launcher, "visible_gpus", lambda devices: [0, 1])
    assert why_not(cfg) == "trainer.devices=auto starts DDP ranks; a population trains on one device"


def test_strengths_and_optim_weight_decay_are_member_keys_where_the_regularizer_takes_them():
    keys = member_keys(compose(["regularization=[elastic_net,max_norm,dropout,label_smoothing]"]))
    assert {"optim.weight_decay", "regularization.elastic_net.l1_strength", "regularization.elastic_net.l2_strength",
            "regularization.max_norm.max_norm"} <= set(keys)
    assert not any(k.startswith(("regularization.dropout", "regularization.label_smoothing")) for k in keys)


def test_the_regularization_grid_fuses_all_but_mixup_ema_and_swa():
    import yaml
    from conftest import CONF

    grid = yaml.safe_load((CONF / "exp" / "regularization_grid.yaml").read_text())["hydra"]["sweeper"]["params"]
    solo = {r for r in grid["regularization"].split(",") if why_not(compose(["+exp=regularization_grid", f"regularization={r}"]))}
    assert solo == {"mixup", "ema", "swa"}
