"""Faults a run survives: divergence, a full disk, a read-only results folder (docs/reliability.md)."""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import compose, quick, with_store
from reglab.errors import DivergenceError
from train_cli import TINY, train_cli


def only_error_line(stderr: str) -> str:
    """The one `error:` line of a failed CLI run; there is no traceback."""
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return errors[0]


def runs_of(uri: str, experiment: str):
    client = MlflowClient(uri)
    return client, client.search_runs([client.get_experiment_by_name(experiment).experiment_id])


# --- divergence ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("broken_after", ["first", "last"])
def test_divergence_fails_the_run_and_keeps_the_last_good_checkpoint(broken_after, tmp_root, mlflow_uri,
                                                                     monkeypatch):
    """The weights turn NaN after epoch 2's first step (the next training loss is NaN) or after its last one (the
    training losses were finite; validation is the first to see it). Either way the run stops in epoch 2, is FAILED
    in MLflow with the reason, and last.ckpt holds epoch 1's finite weights."""
    from reglab import train
    from reglab.classifier import Classifier

    after_step = Classifier.on_train_batch_end

    def on_train_batch_end(self, outputs, batch, batch_idx):
        after_step(self, outputs, batch, batch_idx)
        last = batch_idx == self.trainer.num_training_batches - 1
        if self.current_epoch == 2 and (broken_after == "first" or last):
            with torch.no_grad():
                next(self.net.parameters()).fill_(float("nan"))

    monkeypatch.setattr(Classifier, "on_train_batch_end", on_train_batch_end)
    experiment = f"faults-divergence-{broken_after}"
    cfg = compose(quick(tmp_root, *TINY, "logger=mlflow", f"logger.tracking_uri={mlflow_uri}",
                        f"logger.experiment={experiment}", "logger.log_model=false", "trainer.max_epochs=6",
                        "callbacks.early_stopping=null"))
    first_nan = "train/loss is nan at epoch 2" if broken_after == "first" else "val/loss is nan in epoch 2"
    with pytest.raises(DivergenceError, match=f"{first_nan}.*lower optim.lr"):
        train.run(cfg)

    client, (run,) = runs_of(mlflow_uri, experiment)
    assert run.info.status == "FAILED"
    assert run.data.tags["failure_reason"].startswith(f"divergence: {first_nan}")
    for key in ("train/loss", "val/loss"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [0, 1]

    (ckpt_dir,) = Path(cfg.paths.checkpoints).iterdir()
    ckpt = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 1
    assert ckpt["state_dict"] and all(torch.isfinite(t).all() for t in ckpt["state_dict"].values())


def test_divergence_through_the_cli_is_one_line_and_a_failed_run(tmp_path, mlflow_uri):
    """An absurd learning rate: the loss is NaN by the second step."""
    r = train_cli(*TINY, "optim=sgd", "optim.lr=1e30", f"paths.root={tmp_path}", f"logger.tracking_uri={mlflow_uri}",
                  "logger.experiment=faults-cli-divergence", "logger.log_model=false", cwd=tmp_path)
    assert r.returncode == 2
    assert "training diverged: lower optim.lr" in only_error_line(r.stderr)
    _, (run,) = runs_of(mlflow_uri, "faults-cli-divergence")
    assert run.info.status == "FAILED" and run.data.tags["failure_reason"].startswith("divergence: ")


# --- storage ---------------------------------------------------------------------------------------------------
def _disk_fills_at(limit: int):
    """Runs in the child: files cannot grow past `limit` bytes (EFBIG, as ENOSPC would be for a full disk)."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_disk_full_while_creating_the_store_leaves_no_half_written_store(tmp_path):
    results = tmp_path / "results"
    r = train_cli(*TINY, f"paths.root={results}", cwd=tmp_path,
                  preexec_fn=_disk_fills_at(256 * 1024))  # the new store needs ~1 MB
    assert r.returncode == 2
    line = only_error_line(r.stderr)
    assert "paths.root" in line and str(results / "mlruns") in line
    # No store at all rather than a half-migrated one the next run could not open; no temporary file left.
    assert sorted(p.name for p in (results / "mlruns").iterdir()) == ["artifacts", "mlflow.db.lock"]


def _read_only_prefix(folder: Path) -> list[str]:
    """A command prefix that runs a command with `folder` read-only: a read-only bind mount in a private mount
    namespace as root (root ignores permission bits), chmod otherwise."""
    if os.geteuid() != 0:
        for p in [folder, *folder.rglob("*")]:
            p.chmod(0o555 if p.is_dir() else 0o444)
        return []
    unshare = shutil.which("unshare")
    probe = subprocess.run([unshare or "unshare", "-m", "true"], capture_output=True) if unshare else None
    if probe is None or probe.returncode != 0:
        pytest.skip("running as root without `unshare -m`: cannot make a folder read-only")
    script = 'mount --bind "$0" "$0" && mount -o remount,ro,bind "$0" && exec "$@"'
    return [unshare, "-m", "sh", "-c", script, str(folder)]


def test_read_only_results_folder_is_one_line_and_untouched(tmp_path, empty_store):
    results = with_store(tmp_path / "results", empty_store)  # a store from earlier runs
    before = {p: p.read_bytes() for p in results.rglob("*") if p.is_file()}
    prefix = _read_only_prefix(results)
    try:
        r = train_cli(*TINY, f"paths.root={results}", cwd=tmp_path, prefix=prefix)
    finally:
        for p in [results, *results.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
    assert r.returncode == 2
    line = only_error_line(r.stderr)
    assert f"paths.root={results}" in line and ("read-only" in line or "not writable" in line)
    assert {p: p.read_bytes() for p in results.rglob("*") if p.is_file()} == before


# --- a sweep with a failing job ------------------------------------------------------------------------------------
# One job per configuration (populations, several configurations in one job, have tests of their own).
STUDY = ["+exp=double_descent_mnist1d", "hydra/launcher=basic", "++population.mode=off", "seed=0",
         "data.train_samples=1000", "data.test_samples=500", "model.width=8", "trainer.max_epochs=2"]


def test_a_population_whose_member_diverges_ends_the_sweep_as_its_solo_job_would(tmp_path, empty_store):
    """One population job, two members; the second's L2 strength makes it diverge. It fails alone (FAILED, the
    other FINISHED and the report written) and, as with one job per member, the sweep exits 2 naming it."""
    with_store(tmp_path, empty_store)
    members = [a for a in STUDY if a != "++population.mode=off"]
    r = train_cli(*members, "++population.mode=on", "regularization=[l2]", "regularization.l2.strength=0.0,1e4",
                  f"paths.root={tmp_path}", f"hydra.sweep.dir={tmp_path}/sweep", cwd=tmp_path)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(errors) == 2, r.stderr[-3000:]
    assert "1 of 2 members diverged" in errors[0] and "regularization.l2.strength=10000.0" in errors[0]
    assert errors[1].startswith("error: 1 sweep job(s) failed, the others ran")
    client, runs = runs_of(f"sqlite:///{tmp_path}/mlruns/mlflow.db", "double_descent")
    children = {run.data.params["regularization.l2.strength"]: run.info.status for run in runs
                if run.data.tags.get("reglab.role") == "child"}
    assert children == {"0.0": "FINISHED", "10000.0": "FAILED"}
    assert (tmp_path / "results" / "double_descent_mnist1d" / "modelwise.md").exists()


@pytest.mark.parametrize("setting, words", [
    # EMA acts on the training step: with mode=on the sweep is refused, not quietly run one job per member.
    (["++population.mode=on", "regularization=[ema]"], ["population.mode=on", "regularization.ema", "auto"]),
    (["population.jobs=four"], ["population.jobs='four'", "whole number"]),
])
def test_a_population_setting_the_sweep_cannot_honour_is_one_line_before_anything_runs(tmp_path, setting, words):
    r = train_cli(*[a for a in STUDY if a != "++population.mode=off"], "seed=0,1", *setting,
                  f"paths.root={tmp_path}", f"hydra.sweep.dir={tmp_path}/sweep", cwd=tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and all(w in lines[0] for w in words), r.stderr[-2000:]
    assert not (tmp_path / "outputs").exists()  # no job ran
    # and no study parent is left RUNNING and empty (it is opened when the multirun starts, before the plan)
    assert runs_of(f"sqlite:///{tmp_path}/mlruns/mlflow.db", "double_descent")[1] == []


def test_a_report_that_cannot_be_written_ends_the_sweep_with_one_line(tmp_path, empty_store):
    """Hydra turns an exception in its end-of-sweep callback into a warning: the sweep exited 0 without its report.
    The double-descent report needs test/err per epoch; without it the sweep now ends with one line, exit 2, its
    runs kept."""
    with_store(tmp_path, empty_store)
    r = train_cli(*STUDY, "data.test_every_epoch=false", f"paths.root={tmp_path}",
                  f"hydra.sweep.dir={tmp_path}/sweep", cwd=tmp_path)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(errors) == 1, r.stderr[-3000:]
    assert errors[0].startswith("error: the double_descent_mnist1d report: ") and \
        "data.test_every_epoch=true" in errors[0] and "scripts/report.py" in errors[0]
    client, runs = runs_of(f"sqlite:///{tmp_path}/mlruns/mlflow.db", "double_descent")
    assert sorted(run.info.status for run in runs) == ["FINISHED", "FINISHED"]  # the parent and its child


def test_a_diverging_sweep_job_fails_alone_and_the_report_says_so(tmp_path, empty_store):
    with_store(tmp_path, empty_store)
    r = train_cli(*STUDY, "optim.lr=0.05,1e30", f"paths.root={tmp_path}", f"hydra.sweep.dir={tmp_path}/sweep",
                  cwd=tmp_path)
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert "Traceback" not in r.stderr and len(errors) == 2, r.stderr[-3000:]
    assert "optim.lr=1e+30" in errors[0] and "training diverged" in errors[0]  # the job, when it failed
    assert errors[1].startswith("error: 1 sweep job(s) failed, the others ran")  # the sweep, at its end

    client, runs = runs_of(f"sqlite:///{tmp_path}/mlruns/mlflow.db", "double_descent")
    (parent,) = [run for run in runs if run.data.tags.get("reglab.role") == "parent"]
    assert parent.info.status == "FINISHED" and parent.info.end_time >= parent.info.start_time  # its duration
    status = {run.data.params["optim.lr"]: run for run in runs if run.data.tags.get("reglab.role") == "child"}
    assert status["0.05"].info.status == "FINISHED"
    assert status["1e+30"].info.status == "FAILED"
    assert status["1e+30"].data.tags["failure_reason"].startswith("divergence: train/loss is nan")

    report = tmp_path / "results" / "double_descent_mnist1d"
    md = (report / "modelwise.md").read_text()
    assert "Left out: 1 child run(s) that did not finish." in md
    (left_out,) = [line for line in md.splitlines() if line.startswith("- ") and "optim.lr=1e+30" in line]
    assert ": FAILED, divergence: train/loss is nan" in left_out  # its swept values, its status and why
    import csv

    (row,) = csv.DictReader((report / "modelwise.csv").open())  # width 8, from the finished run alone
    assert row["width"] == "8" and row["n"] == "1"
