"""Studies as sweeps: one MLflow parent, one child per configuration, skipped when done, resumed when interrupted."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import compose

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train.py"
# The CPU double-descent preset made tiny: sequential jobs, small test set, a few epochs.
TINY_STUDY = ["+exp=double_descent_mnist1d", "hydra/launcher=basic", "data.test_samples=500",
              "data.train_samples=1000", "optim.lr=0.05"]


def train_cli(root: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "HYDRA_FULL_ERROR")}
    return subprocess.run([sys.executable, str(SCRIPT), *args, f"paths.root={root}", f"hydra.sweep.dir={root}/sweep"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=timeout)


def client(root: Path):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{root}/mlruns/mlflow.db")
    return c, c.get_experiment_by_name("double_descent").experiment_id


def children(root: Path, status: str | None = None):
    c, exp = client(root)
    query = "tags.`reglab.role` = 'child'" + (f" and attributes.status = '{status}'" if status else "")
    return c.search_runs([exp], query)


def steps(root: Path, run, key: str = "train/loss") -> list[int]:
    c, _ = client(root)
    return [m.step for m in c.get_metric_history(run.info.run_id, key)]


@pytest.mark.slow
def test_sweep_logs_one_parent_and_a_child_per_width_and_a_rerun_adds_nothing(tmp_root):
    args = [*TINY_STUDY, "model.width=16,64", "trainer.max_epochs=3"]
    first = train_cli(tmp_root, *args)
    assert first.returncode == 0, first.stderr[-2000:]

    c, exp = client(tmp_root)
    parents = c.search_runs([exp], "tags.`reglab.role` = 'parent'")
    assert len(parents) == 1 and parents[0].data.tags["study"] == "double_descent_mnist1d"
    assert parents[0].info.status == "FINISHED"
    kids = children(tmp_root)
    assert sorted(int(r.data.params["model.width"]) for r in kids) == [16, 64]
    for r in kids:
        assert r.info.status == "FINISHED"
        assert r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert steps(tmp_root, r) == [0, 1, 2]  # train metrics every epoch
        assert steps(tmp_root, r, "test/err")[:3] == [0, 1, 2]  # test error every epoch, then the final test
    # Both widths learned something (10 classes: chance is 90% error).
    assert all(r.data.metrics["test/err"] < 0.85 for r in kids), [r.data.metrics["test/err"] for r in kids]
    # The sweep wrote its report: files in results/<study>/ and the same files on the parent run.
    out = tmp_root / "results" / "double_descent_mnist1d"
    expected = {"modelwise.png", "modelwise.csv", "modelwise.md", "epochwise_heatmap.png", "epochwise_curves.png",
                "epochwise.csv", "epochwise.md", "config.yaml"}
    assert expected <= {p.name for p in out.iterdir()}
    assert expected <= {a.path for a in c.list_artifacts(parents[0].info.run_id)}

    # The same command again: the parent is reused and both children are skipped (no new run, no new epoch).
    again = train_cli(tmp_root, *args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert [p.info.run_id for p in c.search_runs([exp], "tags.`reglab.role` = 'parent'")] == [parents[0].info.run_id]
    assert sorted(r.info.run_id for r in children(tmp_root)) == sorted(r.info.run_id for r in kids)
    assert all(steps(tmp_root, r) == [0, 1, 2] for r in children(tmp_root))


def _max_logged_step(root: Path, key: str = "train/loss") -> int:
    db = root / "mlruns" / "mlflow.db"
    if not db.exists():
        return -1
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
            row = con.execute("select max(step) from metrics where key = ?", (key,)).fetchone()
    except sqlite3.OperationalError:  # store still being created
        return -1
    return -1 if row[0] is None else row[0]


@pytest.mark.slow
def test_killed_sweep_resumes_its_child_without_lost_or_repeated_epochs(tmp_root):
    from reglab.train import run

    epochs, every = 12, 3
    args = [*TINY_STUDY, "model.width=64,8", f"trainer.max_epochs={epochs}",
            f"callbacks.checkpoint.every_n_epochs={every}"]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *args, f"paths.root={tmp_root}",
                             f"hydra.sweep.dir={tmp_root}/sweep"], cwd=tmp_root, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Kill the whole sweep (SIGKILL: no cleanup at all) once the first child has a checkpoint (after epoch index
    # every-1) and MLflow holds its history that far (the child logger writes it in one batch per checkpoint).
    deadline = time.time() + 180
    while _max_logged_step(tmp_root) < every - 1 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = _max_logged_step(tmp_root)
    assert every - 1 <= killed_at < epochs - 1, f"the kill missed the run (last logged epoch {killed_at})"
    [interrupted] = children(tmp_root)
    assert interrupted.info.status == "RUNNING"
    assert list(Path(tmp_root, "outputs", "checkpoints").glob("mlp-w64-*/last.ckpt"))

    rerun = train_cli(tmp_root, *args)
    assert rerun.returncode == 0, rerun.stderr[-2000:]

    finished = children(tmp_root, "FINISHED")
    assert sorted(int(r.data.params["model.width"]) for r in finished) == [8, 64]  # one finished child per config
    assert len(children(tmp_root)) == 2
    resumed = next(r for r in finished if r.data.params["model.width"] == "64")
    assert resumed.info.run_id == interrupted.info.run_id  # the same MLflow run continued
    for key in ("train/loss", "train/err"):
        assert steps(tmp_root, resumed, key) == list(range(epochs))  # every epoch exactly once
    assert steps(tmp_root, resumed, "test/err") == list(range(epochs + 1))  # + the final test

    # Resuming is exact on CPU: the final numbers equal an uninterrupted run of the same configuration.
    cfg = compose([a for a in args if not a.startswith(("hydra/", "model.width"))]
                  + ["model.width=64", f"paths.root={tmp_root / 'ref'}", "logger=none", "study=null"])
    reference = run(cfg)
    assert resumed.data.metrics["test/err"] == pytest.approx(reference["test/err"], abs=1e-6)
    assert resumed.data.metrics["train/loss"] == pytest.approx(reference["train/loss"], rel=1e-5)


def test_study_needs_mlflow(tmp_root):
    from reglab.errors import ConfigError
    from reglab.train import run

    cfg = compose(["+exp=double_descent_mnist1d", "logger=none", f"paths.root={tmp_root}", "model.width=4"])
    with pytest.raises(ConfigError, match="needs logger=mlflow"):
        run(cfg)


def test_study_key_ignores_swept_keys_only():
    from reglab.sweep import study_key

    base = compose(["+exp=double_descent_mnist1d", "model.width=4", "seed=0"])
    other_width = compose(["+exp=double_descent_mnist1d", "model.width=64", "seed=3"])
    other_noise = compose(["+exp=double_descent_mnist1d", "model.width=4", "data.label_noise=0.2"])
    axes = ["model.width", "seed"]
    assert study_key(base, axes) == study_key(other_width, axes)
    assert study_key(base, axes) != study_key(other_noise, axes)
    assert study_key(base, axes) != study_key(other_width, ["model.width"])


def test_child_logger_drops_epochs_the_run_holds_and_writes_one_batch_per_checkpoint(mlflow_uri, tmp_root):
    from mlflow.tracking import MlflowClient

    from reglab.sweep import Child, child_logger

    client = MlflowClient(mlflow_uri)
    exp = client.create_experiment(f"child_logger_{tmp_root.name}")
    run = client.create_run(exp).info.run_id
    for step in range(6):  # an interrupted attempt logged epochs 0..5; its checkpoint is older (epoch 2)
        client.log_metric(run, "train/loss", 1.0, step=step)
    cfg = compose(["callbacks.checkpoint.every_n_epochs=3"])
    logger = child_logger(cfg, Child("parent", "s", run_id=run, logged_through={"train/loss": 5}),
                          experiment_name="unused", tracking_uri=mlflow_uri)
    for step in range(3, 9):  # the resumed run recomputes 3..5, then goes on
        logger.log_metrics({"train/loss": 2.0}, step=step)
        history = client.get_metric_history(run, "train/loss")
        assert len(history) == (9 if step == 8 else 6)  # written at the checkpoint epoch (8), not before
    assert sorted((m.step, m.value) for m in history) == [(s, 1.0) for s in range(6)] + [(6, 2.0), (7, 2.0), (8, 2.0)]


@pytest.mark.slow
def test_cifar_preset_without_the_data_stops_with_the_data_modules_message(tmp_root):
    out = train_cli(tmp_root, "+exp=double_descent", "model.width=1", f"data.root={tmp_root}/data",
                    "data.download=false")
    assert out.returncode == 2
    assert "error: " in out.stderr and "cifar10: dataset files missing" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("name", ["double_descent", "double_descent_mnist1d"])
def test_study_presets_sweep_without_dash_m_and_say_what_they_cost(name):
    from conftest import CONF
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    text = (CONF / "exp" / f"{name}.yaml").read_text()
    assert all(f"# {field}:" in text for field in ("Command", "Question"))
    assert "# Runtime:" in text or "# Cost:" in text
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose("train", overrides=[f"+exp={name}"], return_hydra_config=True)
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN" and "model.width" in cfg.hydra.sweeper.params
    assert cfg.study == name and cfg.report == "double_descent"
    assert cfg.data.label_noise == 0.15 and cfg.data.test_every_epoch and cfg.callbacks.early_stopping is None
