"""Populations through reglab's own path (reglab/population/train.py, the Classifier's one step): every member ends
where its solo run ends, a diverging member fails alone, and members that cannot share a step are refused or
trained one by one. The fused modules themselves: tests/test_population_models.py; their data:
tests/test_population_data.py; a population sweep killed and resumed through the CLI: tests/test_sweep.py."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_members_match, compose, solo_and_population, with_store

from reglab.errors import ConfigError

# Two widths x two seeds of a small MLP on digits, SGD with momentum: members differ in init, split, order, noise.
MLP_BASE = ["data=digits", "data.train_size=256", "data.batch_size=32", "data.label_noise=0.1", "model.depth=2",
            "optim=sgd", "optim.lr=0.05", "optim.momentum=0.9", "callbacks.early_stopping=null", "logger=none",
            "trainer.max_epochs=8", "population.mode=on"]
RESNET_BASE = ["data=digits", "data.train_size=128", "data.batch_size=32", "model=resnet18", "model.width=2",
               "optim=sgd", "optim.lr=0.05", "callbacks.early_stopping=null", "logger=none", "trainer.max_epochs=2",
               "population.mode=on"]


def test_each_mlp_member_ends_where_its_solo_run_ends(tmp_path):
    members = [["model.width=8", "seed=0"], ["model.width=8", "seed=1"], ["model.width=24", "seed=0"],
               ["model.width=24", "seed=1", "data.label_noise=0.3"]]
    solo, pop, solo_w, pop_w = solo_and_population(tmp_path, MLP_BASE, members)
    assert_members_match(solo, pop, solo_w, pop_w)
    assert len({round(p["test/loss"], 6) for p in pop}) == 4  # four different members, not one copied four times
    assert all(p["test/err"] < 0.7 for p in pop), [p["test/err"] for p in pop]  # they learned (chance: 0.9)


def test_each_resnet_member_with_batch_norm_ends_where_its_solo_run_ends(tmp_path):
    members = [["seed=0"], ["seed=1"], ["seed=2"]]
    solo, pop, solo_w, pop_w = solo_and_population(tmp_path, RESNET_BASE, members)
    assert_members_match(solo, pop, solo_w, pop_w)  # BatchNorm running statistics included (test in eval mode)
    assert any("running_mean" in k for k in pop_w[0])


@pytest.mark.parametrize("base, members", [
    # Inverted dropout on the input and hidden units, two widths (their draws interleave across width groups).
    ([*MLP_BASE, "trainer.max_epochs=3", "regularization=[dropout]", "regularization.dropout.input_keep_prob=0.8"],
     [["model.width=8", "seed=0"], ["model.width=8", "seed=1"], ["model.width=24", "seed=0"]]),
    # DropConnect's (out, in) masks and dropout together (awd_lstm_style); classic dropout.
    ([*MLP_BASE, "trainer.max_epochs=3", "regularization=[awd_lstm_style]"], [["model.width=8", "seed=0"],
                                                                              ["model.width=16", "seed=1"]]),
    ([*MLP_BASE, "trainer.max_epochs=3", "regularization=[dropout_classic]"], [["model.width=8", "seed=0"],
                                                                               ["model.width=8", "seed=3"]]),
    # Spatial dropout on a conv population's grouped channels, dropout on its pooled features.
    ([*RESNET_BASE, "regularization=[spatial_dropout,dropout]"], [["seed=0"], ["seed=1"]]),
], ids=["mlp-dropout", "awd-lstm-style", "classic-dropout", "resnet-spatial-dropout"])
def test_a_member_with_dropout_draws_its_solo_runs_masks_and_ends_where_it_ends(tmp_path, base, members):
    """Each member draws from its own stream of torch's generator, seeded as its solo run seeds it each epoch
    (population.base.MemberStreams): its masks, hence its numbers, do not depend on which members share its
    population (until 2026-12-04 the population drew from its first member's seed)."""
    solo, pop, solo_w, pop_w = solo_and_population(tmp_path, base, members)
    assert_members_match(solo, pop, solo_w, pop_w)


def test_a_diverging_member_fails_alone_and_the_others_train_on(tmp_path):
    """A member whose weights are broken (inf) gets a non-finite loss: it is marked failed with the reason, its
    loss stops counting, and the other member still ends exactly where it ends alone."""
    import lightning as L

    from reglab.classifier import Classifier
    from reglab.population import fuse
    from reglab.population.data import PopulationDataModule
    from reglab.train import build_data, build_model

    cfgs = [compose([*MLP_BASE, f"paths.root={tmp_path}", "model.width=8", f"seed={s}"]) for s in (0, 1)]
    nets, dms = [], []
    for c in cfgs:
        L.seed_everything(c.seed, verbose=False)
        dm = build_data(c)
        dm.setup()
        nets.append(build_model(c, dm.input_shape, dm.num_classes))
        dms.append(dm)
    solo = build_model(cfgs[0], dms[0].input_shape, dms[0].num_classes)
    solo.load_state_dict(nets[0].state_dict())
    population = fuse(nets, dms[0].input_shape)
    broken = population.member_state_dict(1)
    broken["head.weight"].fill_(float("inf"))
    population.load_member_state_dict(1, broken)
    optim = {"name": "sgd", "lr": 0.05, "momentum": 0.9}
    module = Classifier(population, optim=optim)

    def trainer():
        return L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, deterministic=True)

    trainer().fit(module, datamodule=PopulationDataModule(dms))
    assert list(module.failed) == [1] and "train/loss is nan" in module.failed[1]
    alone = Classifier(solo, optim=optim)
    L.seed_everything(0, verbose=False)
    trainer().fit(alone, datamodule=build_data(cfgs[0]))
    for k, v in alone.net.state_dict().items():
        torch.testing.assert_close(population.member_state_dict(0)[k], v, rtol=1e-5, atol=1e-6)


def test_a_population_without_callbacks_checkpoint_writes_no_checkpoint_as_its_solo_runs(tmp_path):
    from reglab.population.train import train_population

    cfgs = [compose([*MLP_BASE, f"paths.root={tmp_path}", "model.width=8", "trainer.max_epochs=2",
                     "callbacks.checkpoint=null", f"seed={s}"]) for s in (0, 1)]
    assert len(train_population(cfgs)) == 2
    assert list(tmp_path.rglob("*.ckpt")) == []  # neither the population's last.ckpt nor members' files


def test_population_on_with_a_model_that_cannot_be_fused_is_one_line(tmp_path):
    from reglab.population.train import train_population

    cfgs = [compose([*MLP_BASE, f"paths.root={tmp_path}", "model.norm=group", f"seed={s}"]) for s in (0, 1)]
    with pytest.raises(ConfigError, match=r"population.mode=on: these members cannot share a training step "
                                          r"\(model.norm=group cannot be fused"):
        train_population(cfgs)


def test_population_auto_trains_what_cannot_be_fused_one_by_one(tmp_path):
    from reglab.population.train import train_population

    cfgs = [compose([*MLP_BASE, f"paths.root={tmp_path}", "model.norm=group", "population.mode=auto",
                     "trainer.max_epochs=1", f"seed={s}"]) for s in (0, 1)]
    results = train_population(cfgs)
    assert len(results) == 2 and results[0]["test/loss"] != results[1]["test/loss"]


def test_one_by_one_a_diverging_member_fails_alone_and_the_others_still_train(tmp_path):
    """As in a fused population: the member after a diverged one was never trained (the divergence ended the job,
    and its FAILED run never counts as done, so every rerun stopped at it again)."""
    from reglab.population.train import train_population

    base = [*MLP_BASE, f"paths.root={tmp_path}", "model.norm=group", "population.mode=auto", "trainer.max_epochs=1",
            "regularization=[l2]"]
    cfgs = [compose([*base, "seed=0", "regularization.l2.strength=1e4"]),
            compose([*base, "seed=1", "regularization.l2.strength=1e-4"])]
    diverged, trained = train_population(cfgs)
    assert diverged["train/loss"] != diverged["train/loss"]  # NaN: what population.train.run reports as diverged
    assert trained["test/err"] < 0.9 and trained["train/loss"] == trained["train/loss"]


@pytest.mark.parametrize("override, why", [
    ("+exp=bias_variance", "runner._target_=reglab.studies.bias_variance.run is a study of its own"),
    ("+callbacks.lr=lightning.pytorch.callbacks.LearningRateMonitor", "callbacks.lr is a solo fit's callback"),
    ("callbacks.checkpoint.save_top_k=-1", "save_top_k=-1: a population keeps one best checkpoint per member")])
def test_why_not_keeps_what_a_population_would_run_otherwise_one_job_per_member(override, why):
    """A study's own runner (the population trained classifiers in its place), a Lightning callback the population's
    trainer does not run (dropped silently), save_top_k other than 0 or 1 (one best file per member)."""
    from reglab.population.sweeper import why_not

    assert why in why_not(compose(["callbacks.early_stopping=null", override]))


def test_a_member_that_sets_what_members_cannot_differ_in_is_refused_before_anything_is_written(tmp_path):
    """A hand-written population.members entry may set only member keys: the population trains every member with
    the first one's optimizer, so member 1's optim.lr would be a param it never trained with."""
    from omegaconf import OmegaConf

    from reglab.population.train import member_configs, run

    cfg = compose([*MLP_BASE, f"paths.root={tmp_path}", "regularization=[l2]",
                   "population.members=['seed=0 model.width=8','seed=1 optim.lr=0.5']"])
    with pytest.raises(ConfigError, match=r"^population.members\[1\] sets optim.lr, which members of one population "
                                          r"cannot differ in \(they may differ in seed, data.label_noise, model.width, "
                                          r"optim.weight_decay, regularization.l2.strength\); sweep optim.lr as "
                                          r"separate jobs$"):
        run(cfg)
    assert list(tmp_path.iterdir()) == []
    # What the sweeper writes (member keys, a regularizer's strength among them) passes, each member its own.
    ok = OmegaConf.merge(cfg, {"population": {"members": ["seed=0 model.width=8",
                                                          "seed=1 regularization.l2.strength=0.01"]}})
    a, b = member_configs(ok)
    assert (a.seed, a.model.width, b.seed, b.regularization.l2.strength) == (0, 8, 1, 0.01)
    assert a.optim.lr == b.optim.lr == 0.05


def _runs(root, experiment: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else client.search_runs([exp.experiment_id])


def test_a_population_whose_trainer_cannot_be_built_leaves_no_run_behind(tmp_path, empty_store):
    """The members' MLflow runs start only once everything the config builds is built: a run left RUNNING by a
    config error would never be continued (the fixed config is another run's fingerprint)."""
    from reglab.population.train import train_population

    root = with_store(tmp_path, empty_store)
    cfgs = [compose([*MLP_BASE, "logger=mlflow", "logger.experiment=broken", f"paths.root={root}",
                     "+trainer.no_such_argument=1", f"seed={s}"]) for s in (0, 1)]
    with pytest.raises(Exception, match="no_such_argument"):
        train_population(cfgs)
    assert _runs(root, "broken") == []


def test_when_every_member_diverges_each_run_fails_with_its_own_reason(tmp_path, empty_store):
    from reglab.errors import DivergenceError
    from reglab.population.train import train_population

    root = with_store(tmp_path, empty_store)
    cfgs = [compose([*MLP_BASE, "logger=mlflow", "logger.experiment=diverged", f"paths.root={root}",
                     "regularization=[l2]", f"regularization.l2.strength={s}", "seed=0"]) for s in (1e4, 3e4)]
    with pytest.raises(DivergenceError, match="every member diverged"):
        train_population(cfgs)
    runs = _runs(root, "diverged")
    reasons = [r.data.tags["failure_reason"] for r in runs]
    assert len(runs) == 2 and all(r.info.status == "FAILED" for r in runs)
    assert all(why.startswith("divergence: train/loss is ") and "every member" not in why for why in reasons), reasons


def test_the_sweeper_groups_members_and_balances_the_jobs():
    """A width x seed grid is one group split into as many populations as the launcher runs at once, a width's
    seeds kept together; what cannot share a step (early stopping then retraining) stays a job of its own."""
    from omegaconf import OmegaConf

    from reglab.population.sweeper import cost, split, why_not

    widths = [4, 8, 16, 256, 128, 64] * 2
    cfgs = [OmegaConf.create({"model": {"width": w, "depth": 2}}) for w in widths]
    bins = split(list(range(len(cfgs))), [cost(c) for c in cfgs], widths, parts=2)
    assert len(bins) == 2 and sorted(i for b in bins for i in b) == list(range(12))
    for b in bins:  # both seeds of a width in the same population
        assert all((i + 6) % 12 in b for i in b)
    # Longest first: width 256 (cost ~ 2 x 256^2) outweighs all the others together, so it runs alone.
    assert sorted(sorted({widths[i] for i in b}) for b in bins) == [[4, 8, 16, 64, 128], [256]]
    assert why_not(compose(["callbacks.early_stopping.patience=3"])) is None  # per member: test_population_stopping
    assert why_not(compose(["stopping.after_stop=retrain"])) == \
        "stopping.after_stop=retrain follows each member's early stop with training of its own"
    assert why_not(compose(["callbacks.early_stopping=null", "regularization=[dropout]"])) is None
    # Penalties are applied per member now; what is still refused: tests/test_population_penalties.py
    assert why_not(compose(["callbacks.early_stopping=null", "regularization=[l2]"])) is None
    assert why_not(compose(["callbacks.early_stopping=null", "regularization=[dropconnect]"])) is None
    assert "inference=gaussian" in why_not(compose(["callbacks.early_stopping=null", "regularization=[dropconnect]",
                                                    "regularization.dropconnect.inference=gaussian"]))
    assert why_not(compose(["callbacks.early_stopping=null", "regularization=[dropconnect]",
                            "regularization.dropconnect.mask=per_example"])) == \
        "regularization.dropconnect mask=per_example, inference=mean: a population draws one DropConnect mask per " \
        "member and step and evaluates the mean network"
