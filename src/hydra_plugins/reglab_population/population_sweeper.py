"""Hydra's basic sweeper plus populations (reglab/population/sweeper.py says which jobs it merges and why).

Hydra loads sweepers only from the `hydra_plugins` namespace package and imports every module in it at start-up,
so this module imports nothing of reglab (torch, Lightning) until a sweep actually runs.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, List

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

log = logging.getLogger(__name__)


class PopulationSweeper(BasicSweeper):
    def sweep(self, arguments: List[str]) -> Any:
        params_conf = self._parse_config()
        params_conf.extend(arguments)
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        overrides = parser.parse_overrides(params_conf)
        jobs = [list(job) for batch in self.split_arguments(overrides, None) for job in batch]
        try:
            # population.mode other than off (YAML reads an unquoted off as false): members merged into populations
            if OmegaConf.select(self.config, "population.mode", default="off") not in ("off", False):
                from reglab.population.sweeper import plan

                swept = {o.key_or_group.lstrip("+") for o in overrides if o.is_sweep_override()}
                jobs = plan(self.config, self.hydra_context.config_loader, jobs, swept)
            tic = time.perf_counter()
            self.validate_batch_is_legal(jobs)  # composition errors before any job starts
            log.debug("validated %d jobs in %.2f s", len(jobs), time.perf_counter() - tic)
            from reglab.launcher import check_gpu_slots

            check_gpu_slots(self.config, self.config.hydra.launcher, len(jobs))
        except Exception:
            # Refused before any job ran (a setting it cannot honour, a job that does not compose): the study's
            # parent, opened at the start of the multirun, would stay in the store RUNNING and empty.
            from reglab.runs.study import drop_empty_parent

            drop_empty_parent(self.config)
            raise
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        results = self.launcher.launch(jobs, initial_job_idx=0)
        for r in results:
            _ = r.return_value  # raises a job's exception, as the basic sweeper does
        return [results]
