"""The progress bar of a run (conf/callbacks/progress.yaml): Lightning's Rich bar in a single run; in a multirun job
it draws nothing and tells the launching process the epoch instead (reglab/progress.py shows the whole sweep)."""

from __future__ import annotations

import time
from typing import Any

from lightning.pytorch.callbacks import RichProgressBar

from reglab.progress import current_job, emit

EPOCH_EVERY_S = 1.0  # a job reports its epoch at most this often (a 500-epoch population would write 500 lines)


class RunProgressBar(RichProgressBar):
    """RichProgressBar(leave=...) in a single run. In a multirun job (loky workers share the terminal: their bars
    would overwrite each other and the sweep's view) it is disabled (RichProgressBar.disable, the switch Lightning
    uses on non-zero ranks) and writes `epoch` events: at the start of a fit (a resumed one starts past 0), then at
    most every EPOCH_EVERY_S seconds, and at the last epoch. Being a ProgressBar, a population job keeps it too
    (reglab/population/train.py)."""

    def __init__(self, leave: bool = False, **kwargs: Any) -> None:
        super().__init__(leave=leave, **kwargs)
        self._job = current_job()
        if self._job is not None:
            self.disable()
        self._last = 0.0

    def _report(self, trainer: Any, epoch: int, force: bool) -> None:
        now = time.time()
        if self._job is not None and trainer.is_global_zero and (force or now - self._last >= EPOCH_EVERY_S):
            self._last = now
            emit(self._job, "epoch", epoch=int(epoch), of=int(trainer.max_epochs or 0))

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        super().on_train_start(trainer, pl_module)
        self._report(trainer, trainer.current_epoch, force=True)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        epoch = trainer.current_epoch + 1
        self._report(trainer, epoch, force=epoch >= (trainer.max_epochs or 0))
