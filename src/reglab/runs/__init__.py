"""Where a run lives, who it is, and whether it is done, resumed or new; the one logger that writes it to MLflow.

store.py     the MLflow store (SQLite under paths.root/mlruns by default) and the code tags every run carries
identity.py  one hash of what a run computes (minus how it is observed)
lookup.py    open_run(cfg) -> Run: done / resume from last.ckpt / new, for single runs and study children alike
logger.py    RunLogger: new or continued run, batched epochs, the header, metrics after the run ended
datasets.py  a run's splits as MLflow dataset inputs (the UI's Dataset column): name, digest, sizes, context
study.py     a study's parent run, its children's names and tags, the Hydra callback around a sweep, the report
"""

# reglab.runs.logger imports Lightning (seconds): not re-exported here, so a sweep's launching process, which only
# opens the parent run, does not pay for it.
from reglab.runs.identity import identity
from reglab.runs.lookup import Run, open_run

__all__ = ["Run", "identity", "open_run"]
