"""Early stopping per member of a population (reglab/population/stopping.py): each member stops at its solo run's
epoch, its MLflow history ends there, it is tested at its theta*, it is frozen bit for bit after its stop, and a
population stopped mid-way and run again ends exactly as an uninterrupted one. after_stop=retrain|continue stay solo."""

from __future__ import annotations

import inspect
import os
import signal
from pathlib import Path

import pytest
import torch
from conftest import compose, weights, with_store

# Digits with noisy labels overfit in a few epochs; batch norm (running statistics are buffers a frozen member must
# keep) and SGD with momentum (which moves a member whose gradient is zero). Seeds 0, 6 and 3 have their best
# epochs at 3, 4 and 5 (three different stops; seeds 0-2 all stop at the same epoch since 2026-12-04's label draws).
BASE = ["data=digits", "data.train_size=200", "data.batch_size=50", "data.label_noise=0.3", "data.val_fraction=0.3",
        "model.width=64", "model.depth=1", "model.norm=batch", "optim=sgd", "optim.lr=0.1", "optim.momentum=0.9",
        "trainer.max_epochs=12", "callbacks.early_stopping.patience=2", "callbacks.checkpoint.last_every_s=null",
        "callbacks.progress=null", "population.mode=on", "logger.experiment=es"]
SEEDS = (0, 6, 3)
HISTORY = ("train/loss", "val/loss", "val/err", "params/l2", "train_eval/loss", "test/loss", "test/err")


def configs(root: Path, *extra: str):
    return [compose([*BASE, f"paths.root={root}", f"seed={s}", *extra]) for s in SEEDS]


def client_of(root: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{root}/mlruns/mlflow.db")


def histories(root: Path) -> dict[int, dict[str, list[tuple[int, float]]]]:
    """seed -> metric -> [(step, value)] of each run in the store under root."""
    client = client_of(root)
    exp = client.get_experiment_by_name("es").experiment_id
    out = {}
    for r in client.search_runs([exp]):
        assert r.info.status == "FINISHED"
        out[int(r.data.params["seed"])] = {k: sorted((m.step, m.value) for m in client.get_metric_history(
            r.info.run_id, k)) for k in (*HISTORY, "early_stopping/best_epoch", "early_stopping/best_step")}
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory, empty_store):
    """Each seed alone (reglab.train.run), then the three as one population, recording each member's weights at the
    moment it is frozen."""
    from reglab.population import stopping
    from reglab.population.train import train_population
    from reglab.runs.lookup import find_run
    from reglab.train import run

    root = tmp_path_factory.mktemp("stopping")
    solo_root, pop_root = with_store(root / "solo", empty_store), with_store(root / "pop", empty_store)
    solo = [run(c) for c in configs(solo_root)]
    frozen = {}
    freeze = stopping.MemberStopping._freeze

    def spy(self, module, m):
        freeze(self, module, m)
        frozen[m] = (module.trainer.current_epoch, module.net.member_state_dict(m))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(stopping.MemberStopping, "_freeze", spy)
        pop = train_population(configs(pop_root))
    pop_last = [weights(find_run(c).ckpt_dir / "last.ckpt") for c in configs(pop_root)]
    return solo, pop, histories(solo_root), histories(pop_root), frozen, pop_last, pop_root


def test_each_member_stops_at_its_solo_runs_epoch_and_is_tested_at_its_theta_star(trained):
    solo, pop, solo_h, pop_h, *_ = trained
    stops = [len(solo_h[s]["val/loss"]) for s in SEEDS]
    assert len(set(stops)) == len(SEEDS) and max(stops) < 12, stops  # each its own stop, all before max_epochs
    for s, a, b in zip(SEEDS, solo, pop):
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (s, key)
        assert b["early_stopping/best_epoch"] == a["early_stopping/best_epoch"] < len(solo_h[s]["val/loss"]) - 1
    assert len({round(p["test/loss"], 6) for p in pop}) == len(SEEDS)  # three members, not one copied


def test_each_members_mlflow_history_ends_at_its_stop_epoch_as_its_solo_runs(trained):
    _, _, solo_h, pop_h, *_ = trained
    for s in SEEDS:
        stop = len(solo_h[s]["val/loss"]) - 1
        assert [step for step, _ in solo_h[s]["train/loss"]] == list(range(stop + 1))
        assert [step for step, _ in pop_h[s]["test/err"]] == [stop + 1]  # the test at theta*, after the last epoch
        for key in (*HISTORY, "early_stopping/best_epoch", "early_stopping/best_step"):
            assert [step for step, _ in pop_h[s][key]] == [step for step, _ in solo_h[s][key]], (s, key)
            for (_, a), (_, b) in zip(solo_h[s][key], pop_h[s][key]):
                assert b == pytest.approx(a, rel=1e-5, abs=1e-7), (s, key)


def test_a_stopped_member_is_frozen_bit_for_bit_while_the_others_train_on(trained):
    """Its parameters and batch-norm buffers when it stopped are its final ones, although SGD's momentum and the
    forward passes of the epochs the population trained after it would have moved them."""
    _, _, solo_h, _, frozen, pop_last, _ = trained
    last = max(len(solo_h[s]["val/loss"]) for s in SEEDS) - 1
    assert sorted(frozen) == [0, 1, 2] and min(epoch for epoch, _ in frozen.values()) < last  # others trained on
    for m, (epoch, state) in frozen.items():
        final = pop_last[m]
        assert final.keys() == {f"net.{k}" for k in state} and any("running_mean" in k for k in state)
        for k, v in state.items():
            assert torch.equal(final[f"net.{k}"], v), (m, epoch, k)


def _sigterm_after_epoch(epoch: int):
    """A MemberStopping.on_train_epoch_end that sends SIGTERM once `epoch` ends: reglab's Checkpoint then writes
    last.ckpt and stops the fit (reglab/preemption.py), leaving the runs resumable as a kill would."""
    from reglab.population import stopping

    original = stopping.MemberStopping.on_train_epoch_end

    def hook(self, trainer, pl_module):
        original(self, trainer, pl_module)
        if trainer.current_epoch == epoch:
            os.kill(os.getpid(), signal.SIGTERM)

    return hook


@pytest.mark.parametrize("written_by", ["this version", "before MemberBest"])
def test_a_population_stopped_after_a_members_stop_resumes_to_the_same_result(trained, tmp_path, empty_store,
                                                                               written_by):
    """`before MemberBest`: a checkpoint written when theta* was part of MemberStopping's state (until 2026-12-03)."""
    from reglab import preemption
    from reglab.population import stopping
    from reglab.population.train import train_population

    _, pop, solo_h, pop_h, *_ = trained
    stops = {m: len(solo_h[s]["val/loss"]) - 1 for m, s in enumerate(SEEDS)}
    kill = min(stops.values()) + 1  # one member stopped an epoch before the checkpoint, one in it, one trains on
    assert sorted(stops.values()) == [kill - 1, kill, kill + 1]
    root = with_store(tmp_path, empty_store)
    before = signal.getsignal(signal.SIGTERM)
    preemption.reset()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(stopping.MemberStopping, "on_train_epoch_end", _sigterm_after_epoch(kill))
            with pytest.raises(preemption.Preempted):
                train_population(configs(root))
    finally:
        signal.signal(signal.SIGTERM, before)
        preemption.reset()
    last = next((root / "outputs" / "checkpoints").glob("population-*/last.ckpt"))
    assert stopping.history_ends(last) == {m: e for m, e in stops.items() if e <= kill}
    if written_by == "before MemberBest":
        ckpt = torch.load(last, weights_only=True)
        states = ckpt["callbacks"]
        [key] = [k for k in states if k.startswith("MemberStopping{")]
        states[key]["best"] = [None if b is None else {k: v for k, v in b.items() if k != "metrics"}
                               for b in states.pop("MemberBest")["best"]]
        torch.save(ckpt, last)
    killed = {r.info.run_id for r in client_of(root).search_runs([client_of(root).get_experiment_by_name("es")
                                                                   .experiment_id])}
    again = train_population(configs(root))
    assert again == pop  # exact on the CPU
    assert histories(root) == pop_h  # every epoch once, the same values, each run FINISHED
    assert {r.info.run_id for r in client_of(root).search_runs([client_of(root).get_experiment_by_name("es")
                                                               .experiment_id])} == killed  # continued, not redone


@pytest.mark.parametrize("checkpoint", [
    # The default callbacks.checkpoint (best-<epoch>.ckpt by val/loss) without early stopping: best file, final test.
    ["callbacks.early_stopping=null"],
    # The double-descent presets': no monitor, the latest due epoch under epoch-<epoch>.ckpt.
    ["callbacks.early_stopping=null", "callbacks.checkpoint.monitor=null",
     "callbacks.checkpoint.filename='epoch-{epoch}'", "callbacks.checkpoint.every_n_epochs=3"],
    # A template with a metric in it, and early stopping (tested at theta*).
    ["callbacks.checkpoint.filename='e{epoch}-err{val/err:.3f}'"],
    # No monitor, every epoch: the latest epoch is the best, last.ckpt a hard link to its file.
    ["callbacks.early_stopping=null", "callbacks.checkpoint.monitor=null",
     "callbacks.checkpoint.filename='epoch-{epoch}'"],
    # Validation every 2 epochs: at epoch 0 val/loss is not yet measured (ModelCheckpoint waits, so must theta*).
    ["callbacks.early_stopping=null", "+trainer.check_val_every_n_epoch=2"],
], ids=["best-by-val-loss", "latest-every-3", "metric-in-name-and-early-stopping", "linked", "validation-every-2"])
def test_each_members_checkpoint_folder_holds_the_files_of_its_solo_run(tmp_path, checkpoint):
    """Every member's folder has the files its solo run's has, by name, each with the same step and weights within
    1e-5, the best file also with the same epoch, and last.ckpt a hard link to it exactly where the solo run's is:
    theta* is kept per member with or without early stopping (population/stopping.MemberBest). (A solo last.ckpt
    written when training ends, not at an epoch's end, holds Lightning's epoch count there, one more than the last
    epoch's index that a member's last.ckpt holds.)"""
    from reglab.population.train import train_population
    from reglab.runs.lookup import find_run
    from reglab.train import run

    def members(root):
        base = [o for o in BASE if not o.startswith("logger.")]
        return [compose([*base, f"paths.root={root}", f"seed={s}", "logger=none", "trainer.max_epochs=8",
                         *checkpoint]) for s in SEEDS]

    solo = [run(c) for c in members(tmp_path / "solo")]
    pop = train_population(members(tmp_path / "pop"))
    for c_solo, c_pop, a, b in zip(members(tmp_path / "solo"), members(tmp_path / "pop"), solo, pop):
        assert b["test/loss"] == pytest.approx(a["test/loss"], rel=1e-5)
        solo_dir, pop_dir = find_run(c_solo).ckpt_dir, find_run(c_pop).ckpt_dir
        files = sorted(f.name for f in solo_dir.glob("*.ckpt"))
        assert len(files) == 2 and sorted(f.name for f in pop_dir.glob("*.ckpt")) == files
        linked = [len({(d / name).stat().st_ino for name in files}) == 1 for d in (solo_dir, pop_dir)]
        assert linked[1] == linked[0] == (checkpoint[-1] == "callbacks.checkpoint.filename='epoch-{epoch}'")
        for name in files:
            theirs, ours = (torch.load(d / name, map_location="cpu", weights_only=True) for d in (solo_dir, pop_dir))
            assert ours["global_step"] == theirs["global_step"], name
            assert name == "last.ckpt" or ours["epoch"] == theirs["epoch"], name
            assert ours["state_dict"].keys() == theirs["state_dict"].keys()
            for k, v in theirs["state_dict"].items():
                torch.testing.assert_close(ours["state_dict"][k].float(), v.float(), rtol=1e-5, atol=1e-6,
                                           msg=f"{name}: {k}")


def test_each_members_mlflow_artifacts_are_its_own_checkpoint_files_as_its_solo_runs(trained, tmp_path):
    """logger.log_model (on by default): a member's run holds the files of its own checkpoint folder under the names
    its solo run's has, each with the member's own weights, not the population's checkpoint."""
    *_, pop_root = trained
    solo_root = pop_root.parent / "solo"

    def artifacts(root):
        client = client_of(root)
        out = {}
        for r in client.search_runs([client.get_experiment_by_name("es").experiment_id]):
            files = sorted(f"{d.path}/{f.path.rsplit('/', 1)[-1]}" for d in client.list_artifacts(r.info.run_id)
                           if d.is_dir for f in client.list_artifacts(r.info.run_id, d.path))
            out[int(r.data.params["seed"])] = (r.info.run_id, client, files)
        return out

    solo, pop = artifacts(solo_root), artifacts(pop_root)
    for s in SEEDS:
        names = [f for f in solo[s][2] if f.endswith(".ckpt")]
        assert len(names) == 2 and pop[s][2] == solo[s][2], s  # last/ and best-<epoch>/, each with its metadata
        for name in names:
            (ours, theirs) = (weights(Path(client.download_artifacts(run_id, name, str(tmp_path / f"{who}{s}"))))
                              for who, (run_id, client, _) in (("pop", pop[s]), ("solo", solo[s])))
            assert ours.keys() == theirs.keys(), (s, name)
            for k, v in theirs.items():
                torch.testing.assert_close(ours[k].float(), v.float(), rtol=1e-5, atol=1e-6, msg=f"{s} {name}: {k}")


def test_why_not_still_refuses_retrain_and_continue_after_early_stopping():
    from reglab.population.sweeper import why_not

    assert why_not(compose(["callbacks.early_stopping.patience=3"])) is None
    for after in ("retrain", "continue"):
        assert why_not(compose(["callbacks.early_stopping.patience=3", f"stopping.after_stop={after}"])) == \
            f"stopping.after_stop={after} follows each member's early stop with training of its own"
    # Without early stopping after_stop does nothing (reglab.early_stopping.strategy): nothing to refuse.
    assert why_not(compose(["callbacks.early_stopping=null", "stopping.after_stop=retrain"])) is None
    assert "mid-epoch" in why_not(compose(["callbacks.early_stopping.patience=3", "+trainer.min_steps=100"]))
    # A time limit stops a population at its own clock time, each solo run at another.
    assert "max_time" in why_not(compose(["+trainer.max_time=00:01:00:00"]))


def test_the_early_stopping_preset_fuses_its_theta_star_arm_only():
    from reglab.population.sweeper import why_not

    arms = {arm: why_not(compose(["+exp=early_stopping", f"stopping={arm}"]))
            for arm in ("final", "best", "retrain", "continue")}
    assert arms["final"] is None and arms["best"] is None
    assert arms["retrain"].startswith("stopping.after_stop=retrain") and \
        arms["continue"].startswith("stopping.after_stop=continue")


def test_the_private_earlystopping_members_stopping_py_uses_keep_their_signature():
    """MemberStopping asks Lightning's own rule per member through EarlyStopping's private methods; this fails,
    naming the method, the day a Lightning release renames or reshapes one."""
    from lightning.pytorch.callbacks import EarlyStopping

    for name, params in {"_evaluate_stopping_criteria": ["current"], "_validate_condition_metric": ["logs"],
                         "_run_early_stopping_check": ["trainer"]}.items():
        method = getattr(EarlyStopping, name, None)
        assert method is not None, f"EarlyStopping.{name} is gone: reglab/population/stopping.py must follow"
        assert [p for p in inspect.signature(method).parameters if p != "self"] == params, name


def test_a_stop_decided_at_validation_end_resumes_with_the_stop_epochs_train_metrics(tmp_path, empty_store):
    """check_val_every_n_epoch=2: the stop is decided at validation end, before the module's epoch-end hook computes
    the epoch's train/* and params/*; the metrics a resumed fit returns for a stopped member are those of its stop
    epoch (they were the epoch before's: train/loss 1.055 for 0.904 in a review's run)."""
    from reglab import preemption
    from reglab.population import stopping
    from reglab.population.train import train_population

    extra = ("+trainer.check_val_every_n_epoch=2", "callbacks.early_stopping.patience=1", "trainer.max_epochs=14")
    whole = train_population(configs(with_store(tmp_path / "whole", empty_store), *extra))
    root = with_store(tmp_path / "killed", empty_store)
    before = signal.getsignal(signal.SIGTERM)
    preemption.reset()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(stopping.MemberStopping, "on_train_epoch_end", _sigterm_after_epoch(6))
            with pytest.raises(preemption.Preempted):
                train_population(configs(root, *extra))
    finally:
        signal.signal(signal.SIGTERM, before)
        preemption.reset()
    assert stopping.history_ends(next(root.rglob("population-*/last.ckpt")))  # a member had stopped by then
    assert train_population(configs(root, *extra)) == whole


# A kill -9 right after a member's stop epoch was flushed to the store (the logger's timer fell due there), at an
# epoch with no last.ckpt due (every 3rd epoch): the rerun resumes from the older last.ckpt, and the member stops
# again at an epoch its history already holds.
KILLED_AFTER_A_STOP = """
import os, sys
from conftest import compose
from reglab.population import stopping
from reglab.population.train import train_population
from reglab.runs import logger
cfgs = [compose(sys.argv[2:] + [f"seed={s}"]) for s in (0, 6, 3)]
init = logger.RunLogger.__init__
def flushing(self, *a, **k):
    init(self, *a, **k)
    self.flush_every_s = 0.0  # every epoch's points flushed at its end
logger.RunLogger.__init__ = flushing
log_train_eval = stopping.MemberStopping._log_train_eval
def then_killed(self, trainer, module, members):
    for lg in trainer.loggers:
        lg.flush_every_s = 1e9  # the stop epoch's metrics are in the store, its train_eval/* not yet
    log_train_eval(self, trainer, module, members)
    if trainer.current_epoch % 3 != 2:
        os._exit(9)
    for lg in trainer.loggers:
        lg.flush_every_s = 0.0
stopping.MemberStopping._log_train_eval = then_killed
train_population(cfgs)
"""


def test_a_member_stopped_again_after_a_kill_still_gets_its_train_eval(tmp_path, empty_store):
    import subprocess
    import sys

    from reglab.population.train import train_population

    root = with_store(tmp_path, empty_store)
    overrides = [*BASE, f"paths.root={root}", "callbacks.checkpoint.every_n_epochs=3"]
    killed = subprocess.run([sys.executable, "-c", KILLED_AFTER_A_STOP, str(root), *overrides],
                            cwd=Path(__file__).parent, capture_output=True, text=True)
    assert killed.returncode == 9, killed.stderr[-2000:]
    train_population([compose([*overrides, f"seed={s}"]) for s in SEEDS])
    h = histories(root)
    for s in SEEDS:
        assert [step for step, _ in h[s]["train_eval/loss"]] == [len(h[s]["val/loss"]) - 1], (s, h[s]["train_eval/loss"])
