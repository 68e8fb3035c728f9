"""`trainer=ddp` on 2 CPU processes (gloo): one run completes, and MLflow holds it once, each epoch once; a SIGTERM
to one rank stops both at the same point."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from train_cli import train_cli


@pytest.mark.slow
@pytest.mark.cluster  # two processes: make test-cluster (in .ci/run), outside make test's 5 minutes
def test_ddp_on_two_cpu_processes_logs_one_run(tmp_root, mlflow_uri):
    from mlflow.tracking import MlflowClient

    experiment = "ddp_two_cpu_processes"
    out = train_cli("trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_epochs=4",
                    "data=digits", "data.batch_size=32", "model.width=32", f"paths.root={tmp_root}",
                    # 359 test images: rank 0 takes 180 (179 + 1), rank 1 179 and an empty last batch
                    "+data.eval_batch_size=179",
                    f"logger.tracking_uri={mlflow_uri}", f"logger.experiment={experiment}", "logger.log_model=false",
                    f"hydra.run.dir={tmp_root}/run",
                    cwd=tmp_root, timeout=240, CUDA_VISIBLE_DEVICES="")  # gloo on CPU even where a GPU is present
    assert out.returncode == 0, out.stderr[-3000:]

    client = MlflowClient(mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    [run] = runs
    assert run.info.status == "FINISHED" and "reglab.superseded_by_rerun" not in run.data.tags  # rank 1 keeps off
    assert run.data.params["trainer.strategy"] == "ddp"
    for key in ("train/loss", "val/err"):  # rank 0 logs, once per epoch; sums come from both ranks' shards
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [0, 1, 2, 3]
    assert run.data.metrics["test/err"] < 0.5  # it learned (digits: chance is 90% error)
    # Scored on all 359 test images (358 before: each rank's shard was trimmed to equal length): acc x 359 is a count.
    correct = run.data.metrics["test/acc"] * 359
    assert abs(correct - round(correct)) < 1e-3, correct


@pytest.mark.slow
@pytest.mark.cluster
def test_sigterm_to_one_rank_stops_both_together_and_the_rerun_continues(tmp_path, empty_store):
    """SIGTERM reaches the ranks of a DDP job at their own moments, or (a user's `kill`) one rank only. Both ranks
    must stop at the same point, writing last.ckpt together, and leave; before, the signalled rank stopped alone and
    rank 0 crashed in its next collective or waited forever at the checkpoint's barrier."""
    from mlflow.tracking import MlflowClient

    from conftest import with_store
    from train_cli import SCRIPT, logged_epoch, signal_once_checkpointed, train_env

    root = with_store(tmp_path / "root", empty_store)
    args = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_epochs=120",
            "callbacks.early_stopping=null", "data=digits", "data.batch_size=32", "model.width=32",
            f"paths.root={root}", "logger.log_model=false", f"hydra.run.dir={root}/run"]
    # Rank 1 only (a child of rank 0, mid-run: ~0.1 s per epoch here): rank 0 must learn it from rank 1.
    code = signal_once_checkpointed(*args, root=root, log=root / "preempted.log", pick="scripts/train.py",
                                    sig=signal.SIGTERM, settle=1.0, wait=60, CUDA_VISIBLE_DEVICES="")
    output = (root / "preempted.log").read_text()
    assert code == 143, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    # One line, from rank 0; rank 1 leaves quietly with status 0 (Lightning's launcher kills rank 0 when another rank
    # exits non-zero, perhaps before rank 0 has marked its run resumable).
    assert output.count("preempted: stopped by SIGTERM") == 1, output[-3000:]
    stopped_at = logged_epoch(root)
    assert 0 <= stopped_at < 110, output  # stopped, not finished
    client = MlflowClient(f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    [cut] = client.search_runs(experiments)
    assert cut.info.status == "KILLED" and cut.data.tags.get("reglab.resumable") == "true"

    rerun = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=root, env=train_env(CUDA_VISIBLE_DEVICES=""),
                           capture_output=True, text=True, timeout=240)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    [run] = client.search_runs(experiments)
    assert run.info.run_id == cut.info.run_id and run.info.status == "FINISHED"  # continued, not started over
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == list(range(120))
