"""kill -9 of a single run (no study): rerunning the same command continues the same MLflow run from last.ckpt
with every epoch once, or, when the kill fell between the checkpoint and the history write, marks the old run
superseded and starts over. Either way nothing is duplicated and the rerun ends FINISHED."""

import signal
import time

import mlflow
import pytest
import torch

from conftest import with_store
from reglab.runs.lookup import checkpoint_epoch
from train_cli import TINY, kill_once_logged, launch, logged_epoch, train_cli

EPOCHS = 12  # the kill comes after epoch 2 (polled every 20 ms; an epoch takes ~0.1 s)
ARGS = [*TINY, "data.train_size=1000", "model.width=256", f"trainer.max_epochs={EPOCHS}",
        "callbacks.early_stopping=null", "callbacks.checkpoint.last_every_s=null", "logger.experiment=single",
        "logger.log_model=false"]


def _runs(uri):
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("single")
    return client, (client.search_runs([exp.experiment_id]) if exp else [])


def _steps(client, run, key="train/loss"):
    return sorted(m.step for m in client.get_metric_history(run.info.run_id, key))


@pytest.mark.slow
def test_killed_single_run_is_continued_by_the_same_command(tmp_path, empty_store):
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    logged = kill_once_logged(*ARGS, root=with_store(tmp_path, empty_store), epoch=2)
    client, (killed,) = _runs(uri)
    assert killed.info.status == "RUNNING" and 2 <= logged < EPOCHS - 1, \
        f"the kill missed the run: {(tmp_path / 'killed.log').read_text()[-2000:]}"
    assert _steps(client, killed)[:logged + 1] == list(range(logged + 1))  # the history the tag vouches for
    [last] = tmp_path.glob("outputs/checkpoints/*/last.ckpt")
    resumable = logged >= checkpoint_epoch(last)  # the rule of reglab.runs.lookup
    print(f"killed at logged epoch {logged}, checkpoint epoch {checkpoint_epoch(last)}, resumable={resumable}")

    rerun = train_cli(*ARGS, cwd=tmp_path, timeout=240)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    client, runs = _runs(uri)
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert len(finished) == 1
    if resumable:
        assert len(runs) == 1 and finished[0].info.run_id == killed.info.run_id  # the same run continued
    else:
        old = client.get_run(killed.info.run_id)
        assert old.info.status == "KILLED" and old.data.tags["reglab.superseded_by_rerun"] == "true"
    assert _steps(client, finished[0]) == list(range(EPOCHS))  # every epoch exactly once
    state = torch.load(next(tmp_path.glob("outputs/checkpoints/*/last.ckpt")), weights_only=True)
    assert state["epoch"] == EPOCHS - 1


@pytest.mark.parametrize(("stop", "epochs"), [
    (["callbacks.early_stopping=null", "trainer.max_epochs=4"], 4),
    # Stopped early at epoch 3 of 8 (min_delta 10: no epoch after the first improves): Lightning keeps its Trainer's
    # should_stop out of the checkpoint, and the resumed fit trained on (reglab.early_stopping.EarlyStopping).
    (["callbacks.early_stopping.patience=3", "callbacks.early_stopping.min_delta=10", "trainer.max_epochs=8"], 4),
], ids=["max_epochs", "early_stopping"])
def test_a_run_stopped_between_its_fit_and_its_test_is_continued_by_testing_only(tmp_path, empty_store, monkeypatch,
                                                                                  stop, epochs):
    """Lightning ends its loggers' runs at the end of every fit; reglab's run stays RUNNING until its test and
    everything after it are logged, so a kill in the test pass is never taken for a finished run. Stopped by SIGTERM
    right before the test, with a last.ckpt written when training ended (Lightning's epoch there is one past the
    last epoch trained), the same command continues the same run: it tests and trains nothing, and logs every epoch
    and train_eval once."""
    from conftest import compose, quick

    from reglab import preemption, train
    from reglab.classifier import Classifier

    root = with_store(tmp_path, empty_store)
    # No top-k file and last_every_s far away: last.ckpt is written at epoch 0 and when training ends.
    cfg = compose(quick(root, "data=digits", "model.width=32", "optim=adam", "logger=mlflow",
                        "logger.experiment=single", *stop, "callbacks.checkpoint.save_top_k=0",
                        "callbacks.checkpoint.last_every_s=3600"))
    uri = f"sqlite:///{root}/mlruns/mlflow.db"
    seen, check = [], preemption.check

    def stop_before_the_test(what):
        if what.endswith("test pass") and not seen:
            seen.append(_runs(uri)[1][0].info.status)
            raise preemption.Preempted(f"{what}: stopped by the test")
        check(what)

    monkeypatch.setattr(preemption, "check", stop_before_the_test)
    with pytest.raises(preemption.Preempted):
        train.run(cfg)
    client, (stopped,) = _runs(uri)
    assert seen == ["RUNNING"] and stopped.info.status == "KILLED"  # resumable (reglab.preemption)
    assert checkpoint_epoch(next((root / "outputs" / "checkpoints").glob("*/last.ckpt"))) == epochs - 1

    steps = []
    training_step = Classifier.training_step
    monkeypatch.setattr(Classifier, "training_step", lambda self, *a: steps.append(1) or training_step(self, *a))
    metrics = train.run(cfg)
    assert metrics["test/acc"] > 0.3  # trained weights (chance: 0.1)
    client, (done,) = _runs(uri)
    assert done.info.run_id == stopped.info.run_id and done.info.status == "FINISHED"
    assert steps == []  # nothing trained again
    assert _steps(client, done) == list(range(epochs)) and _steps(client, done, "train_eval/loss") == [epochs - 1]
    assert _steps(client, done, "test/loss") == [epochs]
    # The last epoch's train/val metrics too (what a sweep's progress line and Optuna's objective read), from the
    # store: the fit that only resumed computed none (Optuna took the trial for failed: no val/loss).
    last = {k: v for k, v in done.data.metrics.items() if k.startswith(("train/", "val/"))}
    assert last and all(metrics[k] == v for k, v in last.items()), (metrics, last)


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_keeps_a_single_run_resumable_and_the_same_command_continues_it(tmp_path, empty_store, presses):
    """Ctrl-C once: the epoch ends, last.ckpt is written, one line, exit 130, the run KILLED with reglab.resumable.
    Twice: it stops at once, resumable from its last checkpoint. Either way the same command continues the run (before,
    Lightning's KeyboardInterrupt ended it FAILED, silently, and the rerun started over)."""
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    root = with_store(tmp_path, empty_store)
    log = root / "interrupted.log"
    proc = launch(*ARGS, f"paths.root={root}", cwd=root, out=log, err=log)
    deadline = time.time() + 180
    while (logged_epoch(root) < 2 or not any(root.glob("outputs/checkpoints/*/last.ckpt"))) and \
            proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    for _ in range(presses):
        proc.send_signal(signal.SIGINT)
        time.sleep(0.05)
    code = proc.wait(60)
    out = log.read_text()
    assert code == 130 and "Traceback" not in out, out[-3000:]
    assert "Ctrl-C" in [line for line in out.splitlines() if line.startswith("preempted")][-1], out[-3000:]
    client, (stopped,) = _runs(uri)
    assert stopped.info.status == "KILLED" and stopped.data.tags.get("reglab.resumable") == "true", out[-3000:]
    assert len(_steps(client, stopped)) < EPOCHS

    rerun = train_cli(*ARGS, cwd=tmp_path, timeout=240)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    client, runs = _runs(uri)
    assert [r.info.run_id for r in runs] == [stopped.info.run_id]  # the same run, continued
    assert runs[0].info.status == "FINISHED" and _steps(client, runs[0]) == list(range(EPOCHS))
    assert "reglab.resumable" not in runs[0].data.tags  # finished: nothing left to resume (before: the tag stayed)
