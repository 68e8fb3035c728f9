"""A population sweep killed with SIGKILL and run again: every member continues from the population's checkpoint,
its MLflow run the same one, every epoch logged once, and the final numbers those of an uninterrupted run."""

from __future__ import annotations

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
