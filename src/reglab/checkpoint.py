"""ModelCheckpoint whose `last.ckpt` is the latest epoch again, written at most once per epoch and not more often
than resuming needs.

Lightning >= 2.6 writes `last.ckpt` only in a step where a top-k file was written too (with `save_top_k: 1` and a
monitor: only when val/loss improves), so `last.ckpt` silently becomes a copy of the best epoch, and a resumed run
restarts from there. Before 2.6 it was written every epoch, as well as the best file when the epoch improved: two
identical files, and for a small model an epoch can take less time than serializing a checkpoint (digits MLP: ~40 ms
per epoch, ~5 ms per write). Here, at each epoch where a checkpoint is due (`every_n_epochs`):

- if the top-k save of the same step just wrote a file, `last.ckpt` becomes a hard link to it (no bytes written);
- otherwise `last.ckpt` is written when `last_every_s` seconds have passed since it was last brought up to date
  (null or 0: every due epoch), and always at the end of training (`on_train_end`; not after an exception such as divergence,
  whose weights are broken).

So a killed run loses at most `last_every_s` seconds of training (reglab.sweep resumes from `last.ckpt`; the
epochs after it are recomputed exactly). A hard link, unlike Lightning's `save_last: link` (a symlink to the most
recent top-k file, an older epoch when this one did not improve), leaves two independent names for one file:
Lightning replaces a checkpoint by writing a temporary file and renaming it, and drops the old best by unlinking
its name, neither of which touches the other name's data.

Every checkpoint write is atomic on the checkpoint's own file system (`AtomicCheckpointIO`, installed by this
callback): Lightning's `_atomic_save` stages the file in the system temporary folder and moves it into place, which
across file systems is a copy, so a full checkpoint disk left a zero-byte `best-N.ckpt` and an error naming a file
in /tmp (seen with a full 2 MiB tmpfs, tests/test_cluster_faults.py).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from reglab import preemption


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save into `<path>.<pid>.tmp` beside the target, fsync, then rename: a reader (a resume) sees the old
    file or the new one, never part of one. A failed write (a full disk) removes the temporary file and raises the
    OSError with the checkpoint's own path, which `reglab.cli.one_line` turns into one line."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        import torch

        path = Path(path)
        if "://" in str(path) or storage_options is not None:  # remote storage: Lightning's own way
            return super().save_checkpoint(checkpoint, path, storage_options)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise OSError(e.errno, e.strerror, str(path)) from e
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def remove_stale(folder) -> None:
    """The temporary files (`<name>.<pid>.tmp`, `.link`) of writes a kill cut short: a process no longer alive
    left them, and nothing else removes them (a wide ResNet's is hundreds of MB)."""
    for tmp in [*Path(folder).glob("*.tmp"), *Path(folder).glob("*.link")]:
        pid = tmp.suffixes[-2][1:] if len(tmp.suffixes) >= 2 else ""
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def hard_link(source, path) -> bool:
    """`path` becomes a second name of the file `source` (replacing what was there in one step); False where the
    file system has no hard links."""
    tmp = f"{path}.{os.getpid()}.link"
    try:
        os.link(source, tmp)
        os.replace(tmp, path)
    except OSError:
        Path(tmp).unlink(missing_ok=True)
        return False
    return True


def on_any_rank(trainer, flag: bool) -> bool:
    """`flag` of any rank, on every rank. A DDP run's ranks must stop at the same batch and write last.ckpt together
    (its save ends in a barrier): a rank that stopped alone would leave the others waiting forever, or crash them.
    SIGTERM reaches each rank at its own moment (or, from a user's kill, only one)."""
    if trainer.world_size <= 1:
        return flag
    return bool(trainer.strategy.reduce_boolean_decision(flag, all=False))


def stop_requested(trainer) -> bool:
    """Whether any rank was asked to stop; a rank that was not adopts the request. The shared answer, not this
    rank's flag read again: a signal that came since the vote counts at the next one."""
    stop = on_any_rank(trainer, preemption.requested())
    if stop:
        preemption.adopt()
    return stop


class Checkpoint(ModelCheckpoint):
    def __init__(self, *args, last_every_s: float | None = None, stop_within_s: float | None = 20.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.last_every_s = float(last_every_s or 0.0)
        self.stop_within_s = float(20.0 if stop_within_s is None else stop_within_s)  # after SIGTERM (preemption.py)
        self._last_written_at = float("-inf")  # time.monotonic() of the last write of last.ckpt
        self._last_step = -1  # global step that last.ckpt holds
        self._epoch_started_at = time.monotonic()

    # Lightning registers its SIGTERM handler at the start of each fit and test, right before the sanity check; it
    # stops mid-epoch or mid-evaluation with its own SIGTERMException (SystemExit), neither a point a run continues
    # from exactly nor a stop reglab marks resumable. Take SIGTERM back at the first hook after that (its teardown
    # restores the handler that was there before, also ours). A SIGTERM that came in between reached both handlers
    # (Lightning's calls the one it replaced): ours keeps it, and Lightning's flag, which would raise at the next
    # batch, is cleared (seen in CI: SIGTERM during the sanity check ended a run with SIGTERMException).
    def _take_back_sigterm(self, trainer) -> None:
        preemption.install(sigint=False)  # Lightning leaves SIGINT alone: the CLI's, or a Python caller's own
        if trainer.received_sigterm:
            preemption.handler(signal.SIGTERM, None)
            trainer._signal_connector.received_sigterm = False

    def on_sanity_check_start(self, trainer, pl_module) -> None:
        self._take_back_sigterm(trainer)

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._take_back_sigterm(trainer)

    def on_test_start(self, trainer, pl_module) -> None:
        # The test pass is short: under SIGTERM it finishes, and the run with it.
        self._take_back_sigterm(trainer)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._epoch_started_at = time.monotonic()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not stop_requested(trainer):
            return
        # Finish the epoch (an exact point to continue from) only if it ends inside the grace period.
        total = trainer.num_training_batches
        done = (batch_idx + 1) / total if total and total != float("inf") else 1.0
        left = (time.monotonic() - self._epoch_started_at) * (1 / done - 1)
        why = None
        if preemption.at_once():
            why = f"stopped by a second Ctrl-C in epoch {trainer.current_epoch}"
        elif preemption.seconds_since() + 2 * left > self.stop_within_s:
            why = (f"stopped by {preemption.name()} in epoch {trainer.current_epoch} (it would not end within "
                   f"stop_within_s={self.stop_within_s:g} s)")
        if on_any_rank(trainer, why is not None):  # each rank's clock and estimate differ: stop together
            why = why or f"stopped with another rank in epoch {trainer.current_epoch}"
            raise preemption.Preempted(f"{why}; {self._resume_point()}")

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # Lightning's default; keep a user's own
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        if self.dirpath and trainer.is_global_zero:
            remove_stale(self.dirpath)

    def _due(self, trainer) -> bool:
        return self._every_n_epochs >= 1 and (trainer.current_epoch + 1) % self._every_n_epochs == 0

    def _after_epoch(self, trainer, on_train_epoch_end: bool) -> None:
        if self._should_skip_saving_checkpoint(trainer) or \
                self._should_save_on_train_epoch_end(trainer) != on_train_epoch_end:
            return
        monitor_candidates = self._monitor_candidates(trainer)
        if self._due(trainer):
            self._save_topk_checkpoint(trainer, monitor_candidates)
        stopping = stop_requested(trainer)
        if not self.save_last:
            if stopping:
                raise preemption.Preempted(f"stopped by {preemption.name()} after epoch {trainer.current_epoch} "
                                           "(callbacks.checkpoint.save_last=false: no checkpoint to continue from)")
            return
        linked = self._last_global_step_saved == trainer.global_step and self._link_last(trainer, monitor_candidates)
        due = self._due(trainer) and time.monotonic() - self._last_written_at >= self.last_every_s
        if on_any_rank(trainer, not linked and (stopping or due)):  # each rank times the interval on its own clock
            self._save_last_checkpoint(trainer, monitor_candidates)
        if stopping:
            raise preemption.Preempted(f"stopped by {preemption.name()} after epoch {trainer.current_epoch}; "
                                       f"{self._resume_point()}")

    def _resume_point(self) -> str:
        last = Path(self.last_model_path or Path(self.dirpath or ".") / f"{self.CHECKPOINT_NAME_LAST}.ckpt")
        if not last.is_file():
            return "no checkpoint was written yet: the rerun starts it afresh"
        return f"rerun the same command to continue from {last}"

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._defer_save_until_validation:  # a step- or time-triggered save waiting for its metric
            return super().on_validation_end(trainer, pl_module)
        self._after_epoch(trainer, on_train_epoch_end=False)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._after_epoch(trainer, on_train_epoch_end=True)

    def on_train_end(self, trainer, pl_module) -> None:
        super().on_train_end(trainer, pl_module)
        if self.save_last and self._last_step != trainer.global_step and trainer.global_step > 0 \
                and not self._should_skip_saving_checkpoint_at_end(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _should_skip_saving_checkpoint_at_end(self, trainer) -> bool:
        return bool(trainer.fast_dev_run) or trainer.sanity_checking

    @staticmethod
    def _history_first(trainer) -> None:
        """The run's stored history must never be behind last.ckpt (resuming needs every epoch up to the
        checkpoint's in the store: reglab/runs/lookup.py): write the epochs the loggers hold before making it
        current. With save_on_train_epoch_end (conf/callbacks/checkpoint.yaml) the epoch's own metrics are among
        them: the Classifier hands them over in its on_train_epoch_end, which Lightning runs before this callback's."""
        from reglab.runs.logger import RunLogger

        for logger in trainer.loggers:
            if isinstance(logger, RunLogger):
                logger.flush()

    def _save_last_checkpoint(self, trainer, monitor_candidates) -> None:
        # Also Lightning's own calls (on_exception, step- or time-triggered saves): a write, as usual.
        self._history_first(trainer)
        self._last_step = trainer.global_step
        self._last_written_at = time.monotonic()
        super()._save_last_checkpoint(trainer, monitor_candidates)

    def _link_last(self, trainer, monitor_candidates) -> bool:
        """last.ckpt -> a hard link to the file the top-k save wrote in this step; False where that cannot be."""
        source = self._last_checkpoint_saved
        if not source or trainer.world_size != 1 or "://" in str(source) or not Path(source).is_file():
            return False
        path = self.format_checkpoint_name(monitor_candidates, self.CHECKPOINT_NAME_LAST)
        self._history_first(trainer)
        if trainer.is_global_zero and not hard_link(source, path):
            return False
        previous, self.last_model_path, self._last_step = self.last_model_path, path, trainer.global_step
        self._last_written_at = time.monotonic()  # last.ckpt is current again: the interval restarts
        if previous and previous != path and self._should_remove_checkpoint(trainer, previous, path):
            self._remove_checkpoint(trainer, previous)
        return True
