"""`trainer=ddp` on 2 CPU processes (gloo): one run completes, and MLflow holds it once, each epoch once."""

from __future__ import annotations

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
