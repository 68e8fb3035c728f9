"""A population sweep killed with SIGKILL and run again: every member continues from the population's checkpoint,
its MLflow run the same one, every epoch logged once, and the final numbers those of an uninterrupted run. In
process: the same after SIGTERM with a diverged member and with members that cannot be fused (trained one by one);
the same members listed in another order start over, ending as uninterrupted."""

from __future__ import annotations

import math
import os
import signal
from pathlib import Path

import pytest
from conftest import compose, with_store

from train_cli import kill_once_logged, train_cli

EPOCHS, EVERY = 12, 3
SWEEP = ["+exp=double_descent_mnist1d", "hydra/launcher=basic", "data.test_samples=500", "data.train_samples=1000",
         "optim.lr=0.05", "model.width=16,32", "seed=0,1", "population.mode=on", f"trainer.max_epochs={EPOCHS}",
         f"callbacks.checkpoint.every_n_epochs={EVERY}"]


@pytest.mark.slow
def test_a_killed_population_resumes_every_member_exactly(tmp_path, empty_store):
    from mlflow.tracking import MlflowClient

    from reglab.population.train import train_population

    root = with_store(tmp_path, empty_store)
    killed_at = kill_once_logged(*SWEEP, f"hydra.sweep.dir={root}/sweep", root=root, epoch=EVERY - 1)
    assert EVERY - 1 <= killed_at < EPOCHS - 1, (root / "killed.log").read_text()[-2000:]
    client = MlflowClient(f"sqlite:///{root}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name("double_descent").experiment_id
    before = {r.data.tags["fingerprint"]: r for r in client.search_runs([exp], "tags.`reglab.role` = 'child'")}
    assert len(before) == 4 and all(r.info.status == "RUNNING" for r in before.values())
    assert list(Path(root, "outputs", "checkpoints").glob("population-*/last.ckpt"))

    rerun = train_cli(*SWEEP, f"paths.root={root}", f"hydra.sweep.dir={root}/sweep", cwd=root, timeout=240)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    after = client.search_runs([exp], "tags.`reglab.role` = 'child'")
    assert len(after) == 4 and all(r.info.status == "FINISHED" for r in after)
    assert {r.info.run_id for r in after} == {r.info.run_id for r in before.values()}  # the same runs continued
    for r in after:
        assert [m.step for m in client.get_metric_history(r.info.run_id, "train/loss")] == list(range(EPOCHS))
        assert [m.step for m in client.get_metric_history(r.info.run_id, "test/err")] == list(range(EPOCHS + 1))

    # Exact on CPU: the same members trained without interruption end with the same numbers.
    members = [[f"model.width={w}", f"seed={s}"] for w in (16, 32) for s in (0, 1)]
    base = [a for a in SWEEP if not a.startswith(("hydra/", "model.width", "seed="))]
    reference = train_population([compose([*base, *m, f"paths.root={root / 'ref'}", "logger=none", "study=null"])
                                  for m in members])
    by_member = {(r.data.params["model.width"], r.data.params["seed"]): r for r in after}
    for m, ref in zip(members, reference):
        got = by_member[(m[0].split("=")[1], m[1].split("=")[1])].data.metrics
        assert got["test/err"] == pytest.approx(ref["test/err"], abs=1e-6)
        assert got["train/loss"] == pytest.approx(ref["train/loss"], rel=1e-6)


# In process: a population stopped by SIGTERM at the end of an epoch (reglab's Checkpoint then writes last.ckpt and
# ends the fit, as a preemption does), then trained again. Seeds 0 and 1 learn; the third member's L2 strength makes
# its weights grow ~1000x per step, so its loss is inf within its first two epochs and it fails alone.
BASE = ["data=digits", "data.train_size=256", "data.batch_size=32", "model.width=16", "model.depth=1", "optim=sgd",
        "optim.lr=0.05", "optim.momentum=0.9", "regularization=[l2]", "callbacks.early_stopping=null",
        "callbacks.checkpoint.every_n_epochs=1", "callbacks.checkpoint.last_every_s=null", "callbacks.progress=null",
        "trainer.max_epochs=5", "population.mode=on", "logger.experiment=pop"]
MEMBERS = [["seed=0"], ["seed=1"], ["seed=0", "regularization.l2.strength=1e4"]]
STOP_AFTER = 2  # the epoch whose end SIGTERM stops


def configs(root: Path, members=MEMBERS, *extra: str):
    return [compose([*BASE, *extra, f"paths.root={root}", *m]) for m in members]


def runs_of(root: Path) -> dict[tuple[str, str], object]:
    """(seed, l2 strength) -> the MLflow run of that member in the store under root."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name("pop").experiment_id
    return {(r.data.params["seed"], r.data.params["regularization.l2.strength"]): r for r in client.search_runs([exp])
            if "reglab.superseded_by_rerun" not in r.data.tags}


def histories(root: Path) -> dict[tuple[str, str], tuple[str, str | None, dict[str, list[tuple[int, float]]]]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root}/mlruns/mlflow.db")
    return {key: (r.info.status, r.data.tags.get("failure_reason"),
                  {k: sorted((m.step, m.value) for m in client.get_metric_history(r.info.run_id, k))
                   for k in ("train/loss", "val/loss", "params/l2")})
            for key, r in sorted(runs_of(root).items())}


def stopped_by_sigterm(cfgs) -> None:
    from reglab import preemption
    from reglab.classifier import Classifier
    from reglab.population.train import train_population

    original = Classifier.on_train_epoch_end

    def hook(self):
        original(self)
        if self.current_epoch == STOP_AFTER:
            os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    preemption.reset()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(Classifier, "on_train_epoch_end", hook)
            with pytest.raises(preemption.Preempted):
                train_population(cfgs)
    finally:
        signal.signal(signal.SIGTERM, before)
        preemption.reset()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, empty_store):
    from reglab.population.train import train_population

    root = with_store(tmp_path_factory.mktemp("uninterrupted"), empty_store)
    return train_population(configs(root)), histories(root)


@pytest.mark.parametrize("order", ["same", "reversed"])
def test_a_population_with_a_diverged_member_resumes_and_never_swaps_members_state(order, uninterrupted, tmp_path,
                                                                                   empty_store):
    """The diverged member stays failed (its reason and epoch are in the checkpoint), so the others continue rather
    than start over. The checkpoint holds the members by position: listed in another order, they start over (never
    one member's state handed to another) and still end as uninterrupted."""
    from reglab.population.stopping import history_ends
    from reglab.population.train import train_population

    reference, reference_h = uninterrupted
    assert [h[0] for h in reference_h.values()].count("FAILED") == 1
    members = MEMBERS if order == "same" else MEMBERS[:2]  # reversed: two members that would both resume
    root = with_store(tmp_path, empty_store)
    stopped_by_sigterm(configs(root, members))
    (last,) = (root / "outputs" / "checkpoints").glob("population-*/last.ckpt")
    if order == "same":
        assert sorted(history_ends(last).values()) in ([-1], [0])  # the diverged member's history ends before epoch 1
    killed = {k: r.info.run_id for k, r in runs_of(root).items()}

    rerun = members if order == "same" else members[::-1]
    again = train_population(configs(root, rerun))

    continued = {k: r.info.run_id for k, r in runs_of(root).items()} == killed
    assert continued == (order == "same")
    got, expected = histories(root), {k: reference_h[k] for k in histories(root)}
    if order == "same":  # exact on the CPU (compared as text: the diverged member's NaNs are equal there)
        assert repr(again) == repr(reference)
        assert repr(got) == repr(expected)  # every epoch once, the same values and failure reason
    else:  # another row order sums in another order: within the populations' 1e-5 of their solo runs
        assert close(again, [reference[MEMBERS.index(m)] for m in rerun])
        assert [h[:2] for h in got.values()] == [h[:2] for h in expected.values()]  # statuses, failure reasons
        assert close([h[2] for h in got.values()], [h[2] for h in expected.values()])


def test_a_population_stopped_before_its_test_pass_is_continued_by_testing_only(uninterrupted, tmp_path, empty_store,
                                                                              monkeypatch):
    """The members' runs stay RUNNING until the population has tested them and written their files (Lightning ends
    its loggers' runs at the end of the fit): stopped right before the test pass, after a last.ckpt written when
    training ended, the rerun continues every member's run, trains nothing, and ends as the uninterrupted one, the
    diverged member FAILED with its reason."""
    from mlflow.tracking import MlflowClient

    from reglab import preemption
    from reglab.classifier import Classifier
    from reglab.population.train import train_population

    reference, reference_h = uninterrupted
    root = with_store(tmp_path, empty_store)
    cfgs = configs(root, MEMBERS, "callbacks.checkpoint.last_every_s=3600")  # last.ckpt at epoch 0 and at the end
    seen, check = [], preemption.check

    def stop_before_the_test(what):
        if what.startswith("the test pass") and not seen:
            seen.extend(r.info.status for r in runs_of(root).values())
            raise preemption.Preempted(f"{what}: stopped by the test")
        check(what)

    monkeypatch.setattr(preemption, "check", stop_before_the_test)
    with pytest.raises(preemption.Preempted):
        train_population(cfgs)
    assert seen == ["RUNNING"] * len(MEMBERS)
    killed = {k: r.info.run_id for k, r in runs_of(root).items()}

    steps = []
    training_step = Classifier.training_step
    monkeypatch.setattr(Classifier, "training_step", lambda self, *a: steps.append(1) or training_step(self, *a))
    again = train_population(cfgs)
    assert steps == [] and {k: r.info.run_id for k, r in runs_of(root).items()} == killed
    assert repr(histories(root)) == repr(reference_h)  # every epoch once, the same values, statuses and reasons
    client = MlflowClient(f"sqlite:///{root}/mlruns/mlflow.db")
    for m, (a, b, r) in enumerate(zip(again, reference, runs_of(root).values())):
        # Every metric, the last epoch's train/val ones too (read from the store: the resumed fit computed none); of
        # the diverged member, whose last epoch's NaN metrics were never stored, its test.
        diverged = b["train/loss"] != b["train/loss"]
        keys = [k for k in b if k.startswith("test/")] if diverged else list(b)
        assert repr({k: a.get(k) for k in keys}) == repr({k: b[k] for k in keys}), (m, a)
        tested = [x.step for x in client.get_metric_history(r.info.run_id, "test/loss")]
        assert tested == ([] if r.info.status == "FAILED" else [5]), m


def close(a, b) -> bool:
    """Equal structure; numbers within 1e-5 relative (1e-7 absolute), NaN equal to NaN."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(close(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == pytest.approx(b, rel=1e-5, abs=1e-7)


def test_members_that_cannot_be_fused_resume_their_own_runs(tmp_path, empty_store):
    """population.mode=auto with a model that cannot be fused trains the members one by one (reglab.train.run):
    a rerun after a stop continues the interrupted member's own run and checkpoint, as its solo job would."""
    from reglab.population.train import train_population

    root = with_store(tmp_path, empty_store)
    cfgs = configs(root, MEMBERS[:2], "model.norm=group", "population.mode=auto")
    stopped_by_sigterm(cfgs)
    (interrupted,) = [r.info.run_id for r in runs_of(root).values() if r.info.status != "FINISHED"]

    train_population(cfgs)

    after = runs_of(root)
    assert len(after) == 2 and all(r.info.status == "FINISHED" for r in after.values())
    assert interrupted in {r.info.run_id for r in after.values()}
