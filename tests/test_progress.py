"""What a sweep shows while it runs (reglab/progress.py): the jobs' events, the launching process's state machine, its
live view and its lines, without training (the CLI sweep's lines are asserted in test_sweep.py)."""

from __future__ import annotations

import io
import json
from types import SimpleNamespace

import pytest
from conftest import CONF
from omegaconf import OmegaConf

from reglab import progress
from reglab.progress import Job, Sweep, Watcher

COMMON = ["+exp=double_descent_mnist1d", "trainer.max_epochs=10"]
GRID = [[*COMMON, f"model.width={w}", f"seed={s}"] for w in (8, 16) for s in (0, 1)]
SWEPT = ["model.width", "seed"]


def member(width: int, seed: int) -> list[str]:
    return [*COMMON, f"model.width={width}", f"seed={seed}"]


def test_the_state_machine_counts_members_shows_running_jobs_and_the_time_left():
    from rich.console import Console

    sweep = Sweep(GRID, SWEPT, epochs=10, start=100.0)
    # Job 0 is a population of the two width-8 members; job 1 the (solo) member width 16 seed 0.
    assert sweep.apply({"ev": "job", "job": 0, "t": 101.0, "members": [member(8, 0), member(8, 1)]}) == []
    assert sweep.apply({"ev": "job", "job": 1, "t": 101.0, "members": [member(16, 0)]}) == []
    for num in (0, 1):  # each fit reports where it starts (0: a new one)
        sweep.apply({"ev": "epoch", "job": num, "t": 102.0, "epoch": 0, "of": 10})
    assert sweep.eta(now=103.0) is None  # nothing trained yet: no rate
    sweep.apply({"ev": "epoch", "job": 0, "t": 110.0, "epoch": 5, "of": 10})
    sweep.apply({"ev": "epoch", "job": 1, "t": 110.0, "epoch": 5, "of": 10})
    # 15 member-epochs done in 10 s; left: 3 x 5 running + 10 for the member no job has started yet.
    assert sweep.eta(now=110.0) == pytest.approx(25 * 10 / 15)

    console = Console(record=True, force_terminal=True, width=120)
    console.print(sweep.render(now=110.0))
    view = console.export_text()
    assert "0/4 members" in view and "10s elapsed" in view and "~17s left" in view
    assert "job 0" in view and "model.width=8 seed=0,1 (2)" in view and "epoch 5/10" in view
    assert "job 1" in view and "model.width=16 seed=0" in view

    lines = sweep.apply({"ev": "member", "job": 0, "t": 121.0, "member": member(8, 1), "status": "done",
                         "metrics": {"test/err": 0.25, "train/err": 0.5, "train_eval/err": 0.125}})
    assert lines == ["model.width=8 seed=1  test/err=0.2500 train_eval/err=0.1250  20s  [1/4]"]
    lines = sweep.apply({"ev": "member", "job": 0, "t": 121.0, "member": member(8, 0), "status": "skipped",
                         "metrics": {"test/err": 0.5}})
    assert lines == ["model.width=8 seed=0  test/err=0.5000  done before  [2/4]"]
    # A one-member job's metrics come with its end; a job that ended on an error fails its members.
    assert sweep.apply({"ev": "end", "job": 0, "t": 121.0, "metrics": {"test/err": 0.4}, "error": None}) == []
    assert sweep.apply({"ev": "end", "job": 1, "t": 131.0, "metrics": {"test/err": 0.3, "train/err": 0.0},
                        "error": None}) == ["model.width=16 seed=0  test/err=0.3000 train/err=0.0000  30s  [3/4]"]
    sweep.apply({"ev": "job", "job": 2, "t": 132.0, "members": [member(16, 1)]})
    assert sweep.apply({"ev": "end", "job": 2, "t": 133.0, "metrics": None, "error": "data.x: bad"}) == \
        ["model.width=16 seed=1  failed: data.x: bad  [4/4]"]
    console = Console(record=True, force_terminal=True, width=120)
    console.print(sweep.render(now=140.0))
    view = console.export_text()
    assert "4/4 members" in view and "1 failed" in view and "job" not in view  # nothing runs any more
    assert sweep.final_line(now=160.0, where="report: results/x") == \
        "sweep: 4/4 members in 1m00s (1 done before), 1 FAILED | report: results/x"


def test_a_stopped_job_that_submitit_requeues_counts_its_members_once():
    sweep = Sweep(GRID[:1], SWEPT, epochs=10, start=100.0)
    sweep.apply({"ev": "job", "job": 0, "t": 101.0, "members": [member(8, 0)]})
    stop = "stopped by SIGUSR2 (submitit: the job's time limit or preemption) after epoch 6; rerun the same command"
    assert sweep.apply({"ev": "end", "job": 0, "t": 110.0, "metrics": None, "error": stop, "stopped": True}) == [
        "model.width=8 seed=0  stopped by SIGUSR2 (submitit: the job's time limit or preemption) after epoch 6 "
        "(the rerun continues it)  [1/1]"]
    # The requeued job starts again and finishes: one member, done (before: 0/1 members, 1 stopped).
    sweep.apply({"ev": "job", "job": 0, "t": 112.0, "members": [member(8, 0)]})
    assert sweep.apply({"ev": "end", "job": 0, "t": 120.0, "metrics": {"test/err": 0.25}, "error": None}) == \
        ["model.width=8 seed=0  test/err=0.2500  8s  [1/1]"]
    assert sweep.final_line(now=130.0) == "sweep: 1/1 members in 30s"


def test_events_of_an_earlier_sweep_or_a_killed_worker_are_not_read(tmp_path):
    path = tmp_path / progress.EVENTS
    old = Job(path, 0, [*COMMON, "model.width=8", "seed=0"], tmp_path / "0")
    progress.emit(old, "job", members=[member(8, 0)])
    out = io.StringIO()
    watcher = Watcher(path, Sweep(GRID, SWEPT, 10, 0.0), out, live=False)  # starts after what is in the file
    progress.emit(old, "end", metrics={"test/err": 0.5}, error=None)  # its job started before this sweep: ignored
    with open(path, "a") as f:  # this sweep's job 0 starts; then a worker is killed in the middle of a line
        f.write(json.dumps({"ev": "job", "job": 0, "t": 1.0, "members": [member(8, 0)]}) + "\n")
        f.write('{"ev":"end","job":0,"t":5,"metr')
    watcher.poll()
    assert out.getvalue() == "" and watcher.sweep.members[frozenset(member(8, 0))].status == "running"
    with open(path, "a") as f:
        f.write('ics":{"test/err":0.25},"error":null}\n')
    watcher.poll()
    assert out.getvalue().splitlines() == ["model.width=8 seed=0  test/err=0.2500  4s  [1/4]"]


def test_a_population_job_reports_each_member_with_its_own_overrides(tmp_path):
    cfg = OmegaConf.create({"population": {"members": ["model.width=8 seed=0", "model.width=8 seed=1",
                                                       "model.width=16 seed=0"]}})
    overrides = [*COMMON, "population.members=['model.width=8 seed=0','model.width=8 seed=1','model.width=16 seed=0']"]
    job = Job(tmp_path / progress.EVENTS, 3, overrides, tmp_path / "3")
    assert progress.job_members(cfg, overrides) == [member(8, 0), member(8, 1), member(16, 0)]
    assert progress.job_members(OmegaConf.create({"population": {"members": []}}), member(8, 0)) == [member(8, 0)]
    metrics = [{"test/err": 0.5}, {"test/err": 0.25, "train/loss": float("nan")}, {"test/err": 0.75}]
    progress.members_done(cfg, metrics, trained=[1, 2], job=job)
    events = [json.loads(line) for line in job.events.read_text().splitlines()]
    assert [(e["ev"], e["job"], e["member"], e["status"]) for e in events] == [
        ("member", 3, member(8, 0), "skipped"), ("member", 3, member(8, 1), "failed"),
        ("member", 3, member(16, 0), "done")]
    assert events[1]["metrics"] == {"test/err": 0.25} and events[1]["error"] == "diverged"  # NaN is not JSON


def test_the_grid_is_the_one_hydra_expands_and_labels_name_the_swept_keys():
    from hydra import compose, initialize_config_dir

    task = ["+exp=double_descent_mnist1d", "data.label_noise=0.1"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=task, return_hydra_config=True)
    # The command line's sweeps (the compose API refuses them) over the preset's grid of 20 widths x 5 seeds.
    cfg.hydra.overrides.task = [*task, "model.width=8,16", "seed=0,1,2"]
    members, swept = progress.grid(cfg)
    assert len(members) == 6 and swept == ["model.width", "seed"]
    cfg.hydra.overrides.task = [*task, "model.width=8,16", "seed=0"]
    assert progress.grid(cfg)[1] == ["model.width"]  # one seed: not a swept key any more
    cfg.hydra.overrides.task = [*task, "model=glob(*)"]
    assert progress.grid(cfg) is None  # a glob needs Hydra's config loader: members are learnt as their jobs start
    cfg.hydra.overrides.task = [*task, "model.width=8,16", "seed=0,1,2"]
    assert all("data.label_noise=0.1" in m for m in members)
    sweep = Sweep(members, swept, 10, 0.0)
    assert sorted(m.label for m in sweep.members.values())[:2] == ["model.width=16 seed=0", "model.width=16 seed=1"]


def test_a_tuning_sweep_labels_its_trials_by_the_search_space():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["+exp=tune_regularization"], return_hydra_config=True)
    members, swept = progress.grid(cfg)  # Optuna chooses as it goes: no members known ahead, only their keys
    assert members is None and swept == ["regularization.l2.strength", "regularization.dropout.keep_prob", "seed"]
    sweep = Sweep(members, swept, 10, 0.0)
    trial = ["+exp=tune_regularization", "data.train_size=300", "regularization.l2.strength=0.0031",
             "regularization.dropout.keep_prob=0.42", "seed=0"]
    sweep.apply({"ev": "job", "job": 0, "t": 1.0, "members": [trial]})
    lines = sweep.apply({"ev": "end", "job": 0, "t": 5.0, "metrics": {"test/err": 0.25}, "error": None})
    assert lines == ["regularization.l2.strength=0.0031 regularization.dropout.keep_prob=0.42 seed=0  "
                     "test/err=0.2500  4s  [1/?]"]


def test_the_last_line_has_the_studys_headline_from_its_parent_run():
    parent = SimpleNamespace(data=SimpleNamespace(tags={"study": "dd"}, metrics={
        "summary/peak_width": 48.0, "summary/peak_minus_first_min": 0.0532, "summary/peak_minus_first_min_se": 0.008,
        "modelwise/test_err": 0.3}))
    assert progress.headline(parent) == "dd: peak_minus_first_min=0.0532 ± 0.0080 peak_width=48"
    assert progress.headline(SimpleNamespace(data=SimpleNamespace(tags={}, metrics={}))) == ""
    none = {"summary/sweet_spot_width": 16.0, "summary/peak_width": float("nan")}  # a curve without a peak
    assert progress.headline(SimpleNamespace(data=SimpleNamespace(tags={"study": "dd"}, metrics=none))) == \
        "dd: sweet_spot_width=16"


def test_the_progress_bar_draws_in_a_single_run_and_reports_epochs_in_a_sweep_job(tmp_path, monkeypatch):
    from reglab import progress_bar

    assert progress_bar.RunProgressBar().is_enabled  # no Hydra job: Lightning's Rich bar
    job = Job(tmp_path / progress.EVENTS, 1, member(8, 0), tmp_path / "1")
    monkeypatch.setattr(progress_bar, "current_job", lambda: job)
    monkeypatch.setattr(progress_bar, "EPOCH_EVERY_S", 3600.0)  # "within the interval" whatever a stall here takes
    bar = progress_bar.RunProgressBar()
    assert bar.is_disabled
    trainer = SimpleNamespace(current_epoch=3, max_epochs=5, is_global_zero=True, sanity_checking=False)
    bar.on_train_start(trainer, None)  # a resumed fit: starts at epoch 3
    bar.on_train_epoch_end(trainer, None)  # within EPOCH_EVERY_S of the last report: not written
    trainer.current_epoch = 4
    bar.on_train_epoch_end(trainer, None)  # the last epoch: always written
    events = [json.loads(line) for line in job.events.read_text().splitlines()]
    assert [(e["ev"], e["epoch"], e["of"]) for e in events] == [("epoch", 3, 5), ("epoch", 5, 5)]


def test_on_a_terminal_a_sweep_jobs_prints_go_to_its_folder_and_it_still_counts_as_watched(tmp_path, monkeypatch):
    import sys

    job = Job(tmp_path / progress.EVENTS, 0, member(8, 0), tmp_path / "0")
    monkeypatch.setattr(progress, "current_job", lambda: job)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    with progress.job_output():
        print("MLflow: run ...")
        print("a warning", file=sys.stderr)
        assert sys.stdout.isatty()  # reglab.train keeps the progress bar (the epoch reports) for a watched sweep
    assert (tmp_path / "0" / progress.OUTPUT).read_text() == "MLflow: run ...\na warning\n"
