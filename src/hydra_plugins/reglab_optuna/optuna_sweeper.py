"""A Hydra sweeper that asks Optuna which configuration to train next (conf/hydra/sweeper/optuna.yaml).

Why not Hydra's own `hydra-optuna-sweeper` (1.3.0, checked 2026-12-02 with hydra-core 1.3.8): it pins
optuna<3, and Optuna 2.10's SQLite storage fails against the SQLAlchemy 2.1 / alembic 1.20 that MLflow 3 brings
(`AssertionError` in `get_current_version`), so its study could not outlive the process; and its loop runs
`n_trials` *more* trials on every invocation and leaves the trials a killed sweep had started RUNNING forever.
This one keeps its search-space grammar (`interval`, `tag(log, interval)`, `choice`, `range` in
`hydra.sweeper.params`) and adds what a resumable study needs:

- the Optuna study lives in SQLite beside the MLflow store (reglab.studies.tune.storage_url), named after the
  reglab study and its key (the key of the MLflow parent run), so the same command finds it again;
- `n_trials` is the study's total: a rerun starts only the trials still missing;
- a trial a killed sweep left RUNNING is launched again with its own parameters: the job is the same
  configuration, so reglab's run lookup finds its MLflow child done or resumes it from its checkpoint, and the
  trial is told its value under its own number;
- trials go to the launcher as many at a time as it runs at once (joblib's n_jobs, side by side; submitit's
  array_parallelism), as any sweep's jobs;
- the sampler is seeded with its `seed` + the trials the study holds: a resumed study draws new start-up trials,
  not the first run's again;
- then, with `evaluate.seeds`, the best trial's parameters and the preset's own (untuned) values are trained with
  each of those seeds, in one launch: the report compares their test errors paired by seed.

Hydra imports every module of `hydra_plugins` at start-up: nothing of reglab or Optuna is imported here until a
sweep runs.
"""

from __future__ import annotations

import functools
import logging
import math
from pathlib import Path
from typing import Any, List

from hydra.plugins.sweeper import Sweeper
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


class OptunaSweeper(Sweeper):
    def __init__(self, sampler: Any, direction: str = "minimize", n_trials: int = 20, n_jobs: Any = "auto",
                 storage: str | None = None, study_name: str | None = None, params: DictConfig | None = None,
                 evaluate: DictConfig | None = None, max_batch_size: int | None = None) -> None:
        # max_batch_size: the population sweeper's key, unused. A preset cannot replace train.yaml's
        # `override hydra/sweeper: population` (Hydra keeps the first override of a group, and the primary config's
        # comes first), so conf/exp/tune_regularization.yaml merges this sweeper's config onto that node.
        self.sampler, self.direction, self.n_trials, self.n_jobs = sampler, direction, n_trials, n_jobs
        self.storage, self.study_name, self.params = storage, study_name, params
        self.evaluate = evaluate
        self.config = self.launcher = self.hydra_context = None
        self.job_idx = 0

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(config=config, hydra_context=hydra_context,
                                                                task_function=task_function)

    def seeded_sampler(self, stored: int) -> Any:
        """The sampler for a study that holds `stored` trials. A sampler built anew with the same seed replays the
        first run's random start-up trials on every resume; seed + stored does not, and leaves a fresh study's seed."""
        if not isinstance(self.sampler, functools.partial):  # an instance (a caller's own): its seed is the caller's
            return self.sampler
        seed = self.sampler.keywords.get("seed")
        return self.sampler(seed=None if seed is None else seed + stored)

    def _launch(self, jobs: list[list[str]]) -> list:
        returns = self.launcher.launch(jobs, initial_job_idx=self.job_idx)
        self.job_idx += len(returns)
        return list(returns)

    def sweep(self, arguments: List[str]) -> Any:
        import optuna

        from reglab import preemption
        from reglab.config import override_key
        from reglab.studies import tune

        cfg = self.config
        try:
            space, fixed = tune.search_space([f"{k}={v}" for k, v in (self.params or {}).items()] + list(arguments))
            seeds = tune.evaluation_seeds(cfg, self.evaluate)
            storage = tune.storage_url(cfg, self.storage)
            name = self.study_name or tune.study_name(cfg)
            n_jobs = tune.jobs_at_once(cfg, self.n_jobs)
            # A key the config lacks fails here, before Optuna stores a study or hands out a trial.
            self.validate_batch_is_legal([[*fixed, *tune.overrides(tune.probe(space))]])
        except Exception:
            # Refused before any trial ran: the study's parent, opened at the start of the multirun, holds nothing.
            from reglab.runs.study import drop_empty_parent

            drop_empty_parent(cfg)
            raise
        sweep_dir = Path(cfg.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, sweep_dir / "multirun.yaml")
        # A stand-in sampler: the study's own is seeded from the number of trials it holds, known once it is loaded.
        study = optuna.create_study(storage=storage, study_name=name, sampler=optuna.samplers.RandomSampler(),
                                    direction=self.direction, load_if_exists=True)
        study.sampler = self.seeded_sampler(len(study.get_trials(deepcopy=False)))
        S = optuna.trial.TrialState
        resumed = []
        for t in study.get_trials(deepcopy=False, states=(S.RUNNING,)):
            if set(t.params) == set(space):
                resumed.append(t)
            else:  # started under another search space: not a configuration of this one
                log.warning("trial %d has keys %s, the search space %s: marked failed", t.number, sorted(t.params),
                            sorted(space))
                study.tell(t.number, state=S.FAIL)
        ended = len(study.get_trials(deepcopy=False, states=(S.COMPLETE, S.FAIL, S.PRUNED)))
        new = max(0, self.n_trials - ended - len(resumed))
        log.info("Optuna study %s in %s: %d trial(s) ended, %d to resume, %d new; %d at a time", name, storage,
                 ended, len(resumed), new, n_jobs)
        results = []
        while resumed or new:
            batch = []  # (trial number, params)
            while resumed and len(batch) < n_jobs:
                t = resumed.pop(0)
                batch.append((t.number, t.params))
            while new and len(batch) < n_jobs:
                t = study.ask(space)
                batch.append((t.number, t.params))
                new -= 1
            jobs = [[*fixed, *tune.overrides(params)] for _, params in batch]
            returns = self._launch(jobs)
            results.append(returns)
            # SIGTERM (preemption): a job it stopped returns None as a failed one does, but its trial is not
            # failed: left RUNNING, the same command resumes it with its values; no new trial is asked.
            stopped = preemption.requested()
            bug = None
            for (number, _), ret in zip(batch, returns):
                try:
                    value = ret.return_value  # raises the job's exception
                except Exception as e:  # a bug (user errors return None): left RUNNING, retried with the same
                    bug = bug or e      # parameters by the next run of the command
                    continue
                if value is None and stopped:
                    continue
                if value is None or not math.isfinite(float(value)):  # a user error or divergence: deterministic
                    study.tell(number, state=S.FAIL)
                else:
                    study.tell(number, float(value))
            if bug is not None:
                raise bug
            if stopped:
                return results

        if seeds:
            done = study.get_trials(deepcopy=False, states=(S.COMPLETE,))
            if not done:
                log.warning("no trial of study %s completed: nothing to evaluate", name)
                return results
            best = study.best_trial
            log.info("best trial %d (%s = %.4g): %s; evaluated with seeds %s against the preset's values",
                     best.number, "value", best.value, best.params, seeds)
            keep = [a for a in fixed if override_key(a) != "seed"]
            jobs = [[*keep, *tune.overrides(best.params), f"seed={s}"] for s in seeds]
            jobs += [[*keep, f"seed={s}"] for s in seeds]
            returns = self._launch(jobs)
            results.append(returns)
            for ret in returns:
                _ = ret.return_value  # raises a job's bug, as the basic sweeper does
        return results
