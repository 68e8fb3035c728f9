"""+exp=tune_regularization: Optuna picks the regularizers' strengths on val/loss (hydra_plugins/reglab_optuna), each
trial a child run of one MLflow parent, the study in SQLite beside the store; a rerun starts only what is missing.

One tiny study (module fixture, in this process: Hydra's basic launcher) is run, run again unchanged, then with
two trials planted as a killed sweep leaves them (asked, never told) and one more trial allowed."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
from conftest import CONF, ROOT, with_store

TINY = ["+exp=tune_regularization", "hydra/launcher=basic", "hydra/job_logging=none", "hydra/hydra_logging=none",
        "trainer.max_epochs=1", "model.width=8", "model.depth=1", "data.train_size=64",
        "hydra.sweeper.evaluate.seeds=[1]"]


def sweep(root: Path, *args: str, monkeypatch) -> None:
    """scripts/train.py as the user runs it (cli.main, Hydra's multirun), in this process: no 5 s of imports."""
    import torch
    from hydra.core.global_hydra import GlobalHydra

    monkeypatch.setattr(sys, "argv", ["train.py", *TINY, *args, f"paths.root={root}",
                                      f"hydra.sweep.dir={root}/sweep"])
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")  # cli.main sets it; restored after the test
    threads = torch.get_num_threads()  # a multirun job sets its share of threads (reglab.launcher)
    try:
        runpy.run_path(str(ROOT / "scripts" / "train.py"), run_name="__main__")
    finally:
        GlobalHydra.instance().clear()
        torch.set_num_threads(threads)


def store(root: Path):
    import optuna
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name("tuning").experiment_id
    [parent] = client.search_runs([exp], "tags.`reglab.role` = 'parent'")
    children = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    [name] = optuna.get_all_study_names(f"sqlite:///{root}/mlruns/optuna.db")
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{root}/mlruns/optuna.db")
    return parent, children, study.get_trials(), study  # the trials as they are now; the study, live


def trial_children(children, seed: int = 0):
    return [r for r in children if r.data.params["seed"] == str(seed)]


def key_of(run) -> tuple[float, float]:
    p = run.data.params
    return float(p["regularization.l2.strength"]), float(p["regularization.dropout.keep_prob"])


def preset():
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose("train", overrides=["+exp=tune_regularization"], return_hydra_config=True)


def preset_space():
    from reglab.studies.tune import search_space

    return search_space([f"{k}={v}" for k, v in preset().hydra.sweeper.params.items()])[0]


@pytest.fixture(scope="module")
def study(tmp_path_factory, empty_store):
    """-> (root, [(parent, children, Optuna trials, study) after each of the three runs], the two planted trials)."""
    import optuna

    root = with_store(tmp_path_factory.mktemp("tune"), empty_store)
    space = preset_space()
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        states = []
        sweep(root, "hydra.sweeper.n_trials=2", monkeypatch=mp)
        states.append(store(root))
        sweep(root, "hydra.sweeper.n_trials=2", monkeypatch=mp)  # everything done: nothing trains
        states.append(store(root))
        # What kill -9 leaves: trials Optuna handed out and was never told about. One whose job had finished (its
        # child is done; here: trial 0's values again), one whose job never started.
        s = states[-1][3]
        s.enqueue_trial(s.trials[0].params)
        planted = [s.ask(space), s.ask(space)]
        assert [t.state for t in s.get_trials()] == [optuna.trial.TrialState.COMPLETE] * 2 + \
            [optuna.trial.TrialState.RUNNING] * 2
        sweep(root, "hydra.sweeper.n_trials=4", monkeypatch=mp)  # resumes both, asks for no new trial
        states.append(store(root))
    return root, states, planted


def test_preset_sweeps_with_optuna_over_log_strength_and_keep_probability():
    import optuna.distributions as D

    cfg = preset()
    assert cfg.hydra.sweeper._target_ == "hydra_plugins.reglab_optuna.optuna_sweeper.OptunaSweeper"
    from hydra_plugins.reglab_optuna.optuna_sweeper import OptunaSweeper  # noqa: F401  (the plugin is importable)

    assert preset_space() == {
        "regularization.l2.strength": D.FloatDistribution(1e-6, 1e-1, log=True),
        "regularization.dropout.keep_prob": D.FloatDistribution(0.2, 1.0),
    }
    assert cfg.seed not in cfg.hydra.sweeper.evaluate.seeds and len(cfg.hydra.sweeper.evaluate.seeds) >= 3
    assert set(cfg.regularization) == {"l2", "dropout"} and cfg.callbacks.early_stopping is None


def test_trials_are_children_of_one_parent_and_a_rerun_repeats_none(study):
    import optuna

    root, (first, again, _), _ = study
    parent, children, ts, _ = first
    trials = trial_children(children)
    assert len(ts) == 2 and all(t.state == optuna.trial.TrialState.COMPLETE for t in ts)
    assert sorted(key_of(r) for r in trials) == sorted((t.params["regularization.l2.strength"],
                                                       t.params["regularization.dropout.keep_prob"]) for t in ts)
    for t in ts:  # Optuna was told each child's final val/loss
        [child] = [r for r in trials if key_of(r) == (t.params["regularization.l2.strength"],
                                                      t.params["regularization.dropout.keep_prob"])]
        assert t.value == pytest.approx(child.data.metrics["val/loss"])
    # Evaluation with seed 1: the best trial's values and the preset's own.
    best = min(ts, key=lambda t: t.value).params
    assert sorted(key_of(r) for r in trial_children(children, 1)) == sorted(
        [(best["regularization.l2.strength"], best["regularization.dropout.keep_prob"]), (5e-4, 0.5)])
    assert all(r.info.status == "FINISHED" for r in children)

    parent2, children2, ts2, _ = again  # the same command again: the same parent, runs and trials; nothing new
    assert parent2.info.run_id == parent.info.run_id
    assert {r.info.run_id for r in children2} == {r.info.run_id for r in children}
    assert [(t.number, t.value) for t in ts2] == [(t.number, t.value) for t in ts]

    out = root / "results" / "tune_regularization"
    assert {"trials.md", "evaluation.md", "tune.png", "tune.md"} <= {p.name for p in out.iterdir()}
    assert "tuned - default, same seed" in (out / "evaluation.md").read_text()


def test_trials_a_killed_sweep_left_running_are_resumed_under_their_own_numbers(study):
    import optuna

    _, (_, before, after), planted = study
    children_before = before[1]
    _, children, ts, _ = after
    assert [t.state for t in ts] == [optuna.trial.TrialState.COMPLETE] * 4  # no fifth trial asked
    # Trial 2 has trial 0's values: its job found trial 0's child done (no training) and Optuna got its value.
    assert ts[2].params == ts[0].params and ts[2].value == ts[0].value
    # Trial 3 was trained under its own number with the values Optuna had handed out before the "kill".
    assert ts[3].params == planted[1].params
    new = [r for r in trial_children(children) if r.info.run_id not in {c.info.run_id for c in children_before}]
    assert [key_of(r) for r in new] == [(planted[1].params["regularization.l2.strength"],
                                         planted[1].params["regularization.dropout.keep_prob"])]
    assert ts[3].value == pytest.approx(new[0].data.metrics["val/loss"])


def test_a_key_the_config_lacks_fails_in_one_line_before_optuna_stores_anything(tmp_path, empty_store, monkeypatch,
                                                                                capsys):
    import optuna

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = with_store(tmp_path, empty_store)
    with pytest.raises(SystemExit) as exit_:  # regularization=[l2,dropout]: no l1 node
        sweep(root, "regularization.l1.strength=interval(1e-6,1e-3)", monkeypatch=monkeypatch)
    assert exit_.value.code == 2
    [line] = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert line.startswith("error: regularization.l1.strength: the config has no key 'regularization.l1'")
    db = root / "mlruns" / "optuna.db"
    assert not db.exists() or optuna.get_all_study_names(f"sqlite:///{db}") == []
    from mlflow.tracking import MlflowClient  # and no study parent left RUNNING and empty

    client = MlflowClient(f"sqlite:///{root}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name("tuning")
    assert exp is None or client.search_runs([exp.experiment_id]) == []


def test_sweeper_settings_are_checked_and_auto_jobs_follow_the_launcher(monkeypatch):
    import os

    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from reglab.errors import ConfigError
    from reglab.studies.tune import evaluation_seeds, jobs_at_once, probe

    cfg = OmegaConf.create({"seed": 0, "hydra": {"launcher": {"n_jobs": 3}}})
    assert jobs_at_once(cfg, "auto") == 3 and jobs_at_once(cfg, 5) == 5
    assert jobs_at_once(OmegaConf.create({"hydra": {"launcher": {}}}), "auto") == 1  # the basic launcher
    # SLURM (submitit) has no n_jobs: auto meant one trial at a time however many jobs the cluster runs at once.
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        slurm = hydra_compose("train", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    assert jobs_at_once(slurm, "auto") == slurm.hydra.launcher.array_parallelism == 64
    # joblib's -1: a job per CPU this process may use (taskset -c 0,1), not per CPU of the machine.
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert jobs_at_once(OmegaConf.create({"hydra": {"launcher": {"n_jobs": -1}}}), "auto") == 2
    with pytest.raises(ConfigError, match=r"^hydra\.sweeper\.n_jobs=0"):
        jobs_at_once(cfg, 0)
    assert evaluation_seeds(cfg, OmegaConf.create({"seeds": [1, 2]})) == [1, 2]
    with pytest.raises(ConfigError, match=r"^hydra\.sweeper\.evaluate\.seeds=\[0, 1\] contains the tuning seed 0"):
        evaluation_seeds(cfg, OmegaConf.create({"seeds": [0, 1]}))
    assert probe(preset_space()) == {"regularization.l2.strength": 1e-6, "regularization.dropout.keep_prob": 0.2}


def test_a_trial_sigterm_stopped_is_resumed_not_failed(tmp_path, empty_store, monkeypatch, capsys):
    """SIGTERM in trial 1: its job returns None as a failed job does, but the trial stays RUNNING (it was marked
    failed for good: n_trials counts it) and no further trial is asked; the same command resumes it under its
    number and asks the rest."""
    import time

    import optuna

    from reglab import preemption

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = with_store(tmp_path, empty_store)
    check, jobs = preemption.check, []

    def sigterm_in_the_second_job(what):
        if what == "this job":
            jobs.append(what)
            if len(jobs) == 2:
                preemption._requested_at = time.monotonic()  # what the SIGTERM handler sets
        check(what)

    def exit_now(status):  # the launching process's exit, without running pytest's exit handlers
        raise SystemExit(status)

    monkeypatch.setattr(preemption, "check", sigterm_in_the_second_job)
    monkeypatch.setattr(preemption, "exit_now", exit_now)
    try:
        with pytest.raises(SystemExit) as stopped:
            sweep(root, "hydra.sweeper.n_trials=3", "hydra.sweeper.evaluate.seeds=[]", monkeypatch=monkeypatch)
    finally:
        preemption.reset()
    assert stopped.value.code == preemption.EXIT_PREEMPTED
    S = optuna.trial.TrialState
    trials = store(root)[2]
    assert [t.state for t in trials] == [S.COMPLETE, S.RUNNING]  # trial 1 kept, trial 2 never asked
    monkeypatch.setattr(preemption, "check", check)
    sweep(root, "hydra.sweeper.n_trials=3", "hydra.sweeper.evaluate.seeds=[]", monkeypatch=monkeypatch)
    after = store(root)[2]
    assert [t.state for t in after] == [S.COMPLETE] * 3 and after[1].params == trials[1].params


def test_a_resumed_study_draws_new_start_up_trials_not_the_first_runs_again(tmp_path, monkeypatch):
    """Every run of the command built TPESampler(seed=0) anew: a resumed study's random start-up trials 3-5 had
    trials 0-2's values. The sweep here is the plugin's own loop with a launcher whose jobs return at once."""
    from types import SimpleNamespace

    import optuna
    from hydra.utils import instantiate
    from omegaconf import open_dict

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    class Launcher:
        def launch(self, jobs, initial_job_idx):
            return [SimpleNamespace(return_value=1.0) for _ in jobs]

    def run(n_trials: int) -> None:
        cfg = preset()
        with open_dict(cfg):
            cfg.paths.root, cfg.hydra.sweep.dir = str(tmp_path), str(tmp_path / "sweep")
            cfg.hydra.sweeper.n_trials, cfg.hydra.sweeper.evaluate.seeds = n_trials, []
        sweeper = instantiate(cfg.hydra.sweeper)
        sweeper.config, sweeper.launcher = cfg, Launcher()
        sweeper.validate_batch_is_legal = lambda batch: None  # needs Hydra's config loader; the keys are the preset's
        sweeper.sweep([])

    run(3)
    run(6)
    storage = f"sqlite:///{tmp_path}/mlruns/optuna.db"
    [name] = optuna.get_all_study_names(storage)
    trials = optuna.load_study(study_name=name, storage=storage).trials
    assert len(trials) == 6
    first, resumed = [t.params for t in trials[:3]], [t.params for t in trials[3:]]
    assert not any(p in first for p in resumed), (first, resumed)
    # A fresh study is drawn as before: seed 0 + 0 stored trials.
    fresh = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=8, constant_liar=True))
    assert [fresh.ask(preset_space()).params for _ in range(3)] == first
