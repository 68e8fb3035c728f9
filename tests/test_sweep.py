"""Studies as sweeps: one MLflow parent, one child per configuration, skipped when done, resumed when interrupted.

One sweep (module fixture) is killed with SIGKILL inside its first child and run again; the tests read what it left:
the resumed child, the new child, the parent and the report, and a third run that finds everything done."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import compose, with_store

from train_cli import kill_once_logged, train_cli

# The CPU double-descent preset made tiny: sequential jobs, one per configuration (populations, which train several
# in one job, have tests of their own), small test set, a few epochs.
TINY_STUDY = ["+exp=double_descent_mnist1d", "hydra/launcher=basic", "++population.mode=off", "seed=0",
              "data.test_samples=500", "data.train_samples=1000", "optim.lr=0.05"]
EPOCHS, EVERY = 12, 3  # checkpoint (and one MLflow batch) every 3 epochs
SWEEP = [*TINY_STUDY, "model.width=64,8", f"trainer.max_epochs={EPOCHS}",
         f"callbacks.checkpoint.every_n_epochs={EVERY}"]


def sweep_cli(root: Path, *args: str, timeout: float = 240):
    return train_cli(*args, f"paths.root={root}", f"hydra.sweep.dir={root}/sweep", cwd=root, timeout=timeout)


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


@pytest.fixture(scope="module")
def killed_sweep(tmp_path_factory, empty_store):
    """The sweep (widths 64 then 8) killed once its first child has a checkpoint and MLflow holds its history that far
    (after epoch index EVERY-1), then the same command again. -> (root, the child as the kill left it, the rerun's
    CompletedProcess)."""
    root = with_store(tmp_path_factory.mktemp("killed_sweep"), empty_store)
    killed_at = kill_once_logged(*SWEEP, f"hydra.sweep.dir={root}/sweep", root=root, epoch=EVERY - 1)
    assert EVERY - 1 <= killed_at < EPOCHS - 1, \
        f"the kill missed the run (last logged epoch {killed_at}): {(root / 'killed.log').read_text()[-2000:]}"
    [interrupted] = children(root)
    assert interrupted.info.status == "RUNNING" and interrupted.data.params["model.width"] == "64"
    assert list(Path(root, "outputs", "checkpoints").glob("mlp-w64-*/last.ckpt"))

    rerun = sweep_cli(root, *SWEEP)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    return root, interrupted, rerun


@pytest.mark.slow
def test_killed_sweep_resumes_its_child_without_lost_or_repeated_epochs(killed_sweep):
    from reglab.train import run

    root, interrupted, _ = killed_sweep
    finished = children(root, "FINISHED")
    assert sorted(int(r.data.params["model.width"]) for r in finished) == [8, 64]  # one finished child per config
    assert len(children(root)) == 2
    resumed = next(r for r in finished if r.data.params["model.width"] == "64")
    assert resumed.info.run_id == interrupted.info.run_id  # the same MLflow run continued
    for r in finished:  # the resumed child and the one the kill never reached
        for key in ("train/loss", "train/err"):
            assert steps(root, r, key) == list(range(EPOCHS))  # every epoch exactly once
        assert steps(root, r, "test/err") == list(range(EPOCHS + 1))  # test error every epoch + the final test

    # Resuming is exact on CPU: the final numbers equal an uninterrupted run of the same configuration.
    cfg = compose([a for a in SWEEP if not a.startswith(("hydra/", "model.width"))]
                  + ["model.width=64", f"paths.root={root / 'ref'}", "logger=none", "study=null"])
    reference = run(cfg)
    assert resumed.data.metrics["test/err"] == pytest.approx(reference["test/err"], abs=1e-6)
    assert resumed.data.metrics["train/loss"] == pytest.approx(reference["train/loss"], rel=1e-5)


@pytest.mark.slow
def test_sweep_logs_one_parent_and_a_child_per_width_and_its_report(killed_sweep):
    root, _, _ = killed_sweep
    c, exp = client(root)
    [parent] = c.search_runs([exp], "tags.`reglab.role` = 'parent'")
    assert parent.data.tags["study"] == "double_descent_mnist1d" and parent.info.status == "FINISHED"
    assert parent.data.tags["sweep.model.width"] == "64,8"
    kids = children(root)
    assert sorted(int(r.data.params["model.width"]) for r in kids) == [8, 64]
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in kids)
    # Both widths learned something (10 classes: chance is 90% error).
    assert all(r.data.metrics["test/err"] < 0.85 for r in kids), [r.data.metrics["test/err"] for r in kids]
    # The sweep wrote its report: files in results/<study>/ and the same files on the parent run.
    out = root / "results" / "double_descent_mnist1d"
    expected = {"modelwise.png", "modelwise.csv", "modelwise.md", "epochwise_heatmap.png", "epochwise_curves.png",
                "epochwise.csv", "epochwise.md", "config.yaml"}
    assert expected <= {p.name for p in out.iterdir()}
    assert expected <= {a.path for a in c.list_artifacts(parent.info.run_id)}


@pytest.mark.slow
def test_the_same_sweep_again_reuses_the_parent_and_skips_every_child(killed_sweep):
    root, _, _ = killed_sweep
    c, exp = client(root)
    parents, kids = c.search_runs([exp], "tags.`reglab.role` = 'parent'"), children(root)
    again = sweep_cli(root, *SWEEP)
    assert again.returncode == 0, again.stderr[-2000:]
    assert [p.info.run_id for p in c.search_runs([exp], "tags.`reglab.role` = 'parent'")] == \
        [p.info.run_id for p in parents]
    assert sorted(r.info.run_id for r in children(root)) == sorted(r.info.run_id for r in kids)  # no new run
    assert all(steps(root, r) == list(range(EPOCHS)) for r in children(root))  # no new epoch


@pytest.mark.slow
def test_a_sweep_in_a_log_prints_a_line_per_member_and_the_studys_last_line(killed_sweep):
    # Without a terminal (CI, nohup, SLURM): each finished member with its swept values, errors, time and [k/n]; the
    # job's own metric line (test/acc=... of nobody knows which member) is gone.
    root, _, rerun = killed_sweep
    lines = rerun.stderr.splitlines()
    members = [line for line in lines if line.endswith("/2]")]
    time = r"(\d+h)?(\d+m)?\d+s"
    assert len(members) == 2, rerun.stderr[-3000:]
    assert re.fullmatch(rf"model\.width=64  test/err=0\.\d{{4}} train_eval/err=0\.\d{{4}}  {time}  \[1/2\]", members[0])
    assert re.fullmatch(rf"model\.width=8  test/err=0\.\d{{4}} train_eval/err=0\.\d{{4}}  {time}  \[2/2\]", members[1])
    [last] = [line for line in lines if line.startswith("sweep: ")]
    # The report's headline (summary/* of the parent: a peak_width only where the curve rises past its sweet spot).
    assert re.fullmatch(rf"sweep: 2/2 members in {time} \| double_descent_mnist1d: .*sweet_spot_width=(64|8).* \| "
                        rf"report: {re.escape(str(root / 'results' / 'double_descent_mnist1d'))}", last), last
    assert "test/acc=" not in rerun.stdout + rerun.stderr


def test_study_needs_mlflow(tmp_root):
    from reglab.errors import ConfigError
    from reglab.train import run

    cfg = compose(["+exp=double_descent_mnist1d", "logger=none", f"paths.root={tmp_root}", "model.width=4"])
    with pytest.raises(ConfigError, match="needs logger=mlflow"):
        run(cfg)


def test_cifar_preset_without_the_data_stops_with_the_data_modules_message(tmp_root):
    from reglab.errors import DataError
    from reglab.train import build_data

    cfg = compose(["+exp=double_descent", "model.width=1", f"data.root={tmp_root}/data", "data.download=false"])
    with pytest.raises(DataError, match=r"^cifar10: dataset files missing[^\n]*$"):
        build_data(cfg).setup()


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
    assert cfg.study == name and cfg.report._target_ == "reglab.studies.double_descent.report"
    assert cfg.data.label_noise == 0.15 and cfg.data.test_every_epoch and cfg.callbacks.early_stopping is None


def test_configurations_kept_apart_only_by_where_they_log_are_not_one_population():
    """The identity leaves out where a run is kept (logger.experiment), so two experiments' seeds group alike; a
    population job carries one set of other overrides, so they must be two populations, not one listing each seed
    twice under the first experiment."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.utils import create_config_search_path
    from hydra.types import RunMode

    from reglab.population.sweeper import plan

    conf = str(Path(__file__).resolve().parents[1] / "conf")
    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(conf))
    config = loader.load_configuration("train", overrides=["+exp=double_descent_mnist1d"], run_mode=RunMode.MULTIRUN)
    jobs = [[f"logger.experiment={e}", "model.width=8", f"seed={s}"] for e in ("a", "b") for s in (0, 1)]
    out = plan(config, loader, jobs, {"logger.experiment", "seed"})
    assert sorted(out) == [["logger.experiment=a", "model.width=8", "population.members=['seed=0','seed=1']"],
                           ["logger.experiment=b", "model.width=8", "population.members=['seed=0','seed=1']"]], out


def test_grouping_composes_plain_value_jobs_as_hydra_does():
    """plan() composes one job and sets the others' plain values on a copy (make run's 70 jobs: 5.6 s -> 0.5 s);
    every job's identity is the one Hydra's own composition gives, also for a config-group override and a new key,
    which go through Hydra."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.utils import create_config_search_path
    from hydra.types import RunMode

    from reglab.population.sweeper import sweep_configs
    from reglab.runs.identity import identity

    conf = str(Path(__file__).resolve().parents[1] / "conf")
    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(conf))
    config = loader.load_configuration("train", overrides=["+exp=double_descent_mnist1d"], run_mode=RunMode.MULTIRUN)
    jobs = [[f"model.width={w}", f"seed={s}", f"data.label_noise={n}", "optim=adam" if w == 8 else "optim=sgd"]
            + (["+extra_note=x"] if s == 2 else []) for w in (4, 8) for s in (0, 2) for n in (0.1, 0.2)]
    fast = sweep_configs(config, loader, jobs)
    full = [loader.load_sweep_config(config, job) for job in jobs]
    assert [identity(a) for a in fast] == [identity(b) for b in full]
    assert len({identity(a) for a in fast}) == len(jobs)


@pytest.mark.parametrize(("launcher", "jobs"), [("slurm", 64), ("gpus", 1), ("basic", 1)])
def test_auto_population_jobs_are_the_jobs_the_launcher_runs_at_once(launcher, jobs):
    """population.jobs=auto read only joblib's n_jobs: under SLURM (submitit: array_parallelism) all the widths and
    seeds of an MLP group became one population job, one GPU's, while the cluster ran nothing else of the sweep."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from reglab.population.sweeper import parallel_jobs

    conf = str(Path(__file__).resolve().parents[1] / "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        cfg = hydra_compose("train", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert parallel_jobs(cfg) == jobs
    cfg.population.jobs = 3
    assert parallel_jobs(cfg) == 3
