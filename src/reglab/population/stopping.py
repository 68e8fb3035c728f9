"""Early stopping per member of a population (`stopping.after_stop=none`): each member stops at the epoch its solo
run stops, stays frozen from then on, and is tested at its theta*, the weights its solo run's best checkpoint holds.

At the end of each epoch, for every member still training and with that member's own metrics
(`Classifier.member_metrics`):
- theta*: `MemberBest`, ModelCheckpoint's rule for its best file (conf/callbacks/checkpoint.yaml: monitor, mode,
  every_n_epochs), kept as a copy of the member's weights in memory: at each epoch a checkpoint is due, the first
  epoch with the best monitored value (NaN counts as the worst; without a monitor, the latest). It runs with or
  without early stopping, so each member's checkpoint folder gets the best file its solo run's has;
- the stopping decision: Lightning's own, one EarlyStopping per member asked with the member's monitored value, at
  the point of the epoch where the solo run's EarlyStopping is asked;
- a member told to stop is frozen: its parameters and buffers are put back after every optimizer step (momentum,
  Adam's moments and weight decay move weights whose gradient is zero, and the forward pass moves batch-norm
  statistics), its later epochs are not logged (`Classifier.stopped`), and `train_eval/*` is logged with its stop
  epoch, as its solo run logs it after fit.
The fit ends when every member that has not failed has stopped (or at max_epochs). This state is in the population's
last.ckpt, so a rerun after kill -9 continues exactly; `history_ends` tells the lookup how far a stopped (or
diverged) member's history has to reach.

What a solo run does after its stop with `stopping.after_stop=retrain|continue` is not done here:
population/sweeper.why_not keeps those configurations one job per member.
"""

from __future__ import annotations

import logging
import math
import pickle
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Checkpoint, EarlyStopping
from omegaconf import DictConfig

from reglab.classifier import FAILED_KEY
from reglab.errors import ConfigError
from reglab.population.base import member_rows

log = logging.getLogger(__name__)
BETTER = {"min": torch.lt, "max": torch.gt}


class MemberStopping(EarlyStopping):
    """An EarlyStopping for where Lightning calls it: among the monitoring callbacks, after the module's epoch-end hook
    has computed the epoch's metrics and before the checkpoint that saves this state, and on the solo run's schedule
    (check_on_train_epoch_end). Its own best_score and wait_count stay unused; `rules` decide, one per member."""

    def __init__(self, rules: list[EarlyStopping], check_on_train_epoch_end: bool | None = None):
        super().__init__(monitor=rules[0].monitor, mode=rules[0].mode,
                         check_on_train_epoch_end=check_on_train_epoch_end)
        self.rules = rules
        # The Trainer's should_stop stays set once EarlyStopping sets it, and the solo run stops at the first epoch
        # where trainer.min_epochs allows: `asked` is that flag per member.
        self.asked = [False] * len(rules)
        # member -> epoch, global step and metrics at its stop (the metrics: what a resumed fit no longer computes)
        self.stopped: dict[int, dict[str, Any]] = {}
        self._frozen: dict[int, dict[str, torch.Tensor]] = {}

    @classmethod
    def from_config(cls, cfg: DictConfig, members: int) -> MemberStopping | None:
        node = (cfg.get("callbacks") or {}).get("early_stopping")
        if node is None:
            return None
        return cls([instantiate(node) for _ in range(members)], node.get("check_on_train_epoch_end"))

    def training(self, module) -> list[int]:
        return [m for m in range(len(self.rules)) if m not in self.stopped and m not in module.failed]

    # --- the epoch's decisions ------------------------------------------------------------------------------
    def _run_early_stopping_check(self, trainer) -> None:
        if trainer.fast_dev_run:
            return
        module = trainer.lightning_module
        loop = trainer.fit_loop
        # What FitLoop._can_stop_early asks after this epoch (min_steps never reaches here: sweeper.why_not).
        may_stop = not loop.min_epochs or trainer.current_epoch + 1 >= loop.min_epochs
        stopping = []
        for m in self.training(module):
            rule, logs = self.rules[m], module.member_metrics[m]
            if not rule._validate_condition_metric(logs):  # strict: raises as the solo run's would
                continue
            should_stop, reason = rule._evaluate_stopping_criteria(torch.tensor(logs[rule.monitor],
                                                                                dtype=torch.float32))
            if should_stop:
                rule.stopped_epoch, rule.stopping_reason_message = trainer.current_epoch, reason
            if reason and rule.verbose:
                log.info("member %d: %s", m, reason)
            self.asked[m] = self.asked[m] or should_stop
            if self.asked[m] and may_stop:
                stopping.append(m)
        for m in stopping:
            self.stopped[m] = {"epoch": trainer.current_epoch, "step": trainer.global_step,
                               "metrics": dict(module.member_metrics[m])}
            self._freeze(module, m)
        if stopping:
            self._log_train_eval(trainer, module, stopping)
        if not self.training(module):
            trainer.should_stop = True

    def _freeze(self, module, m: int) -> None:
        self._frozen[m] = module.net.member_state_dict(m)
        module.stopped[m] = self.stopped[m]["epoch"]

    def _log_train_eval(self, trainer, module, members: list[int]) -> None:
        """train_eval/* of members that just stopped, in their stop epoch's batch: their weights are final now, and
        written here it is in their history before last.ckpt (a resumed run logs nothing at earlier steps)."""
        from reglab.train import evaluate_training_set

        if not trainer.loggers:
            return
        rows = member_rows(evaluate_training_set(module.net, trainer.datamodule))
        for m in members:
            # log_after_fit, not log_metrics: after a resume from a last.ckpt older than the store's history, the
            # stop epoch is not new to the logger, but these points may not be in the store yet.
            trainer.loggers[m].log_after_fit(rows[m], step=self.stopped[m]["epoch"])

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # A stop decided at validation end (check_val_every_n_epoch > 1) came before the module's epoch-end hook
        # computed this epoch's train/* and params/*: what a resumed fit returns for the member is taken now.
        for m, stop in self.stopped.items():
            if stop["epoch"] == trainer.current_epoch:
                stop["metrics"] = dict(pl_module.member_metrics[m])
        super().on_train_epoch_end(trainer, pl_module)

    def on_fit_start(self, trainer, pl_module) -> None:
        # Resumed: the members that had stopped are frozen at the weights last.ckpt holds (restored before this hook).
        for m, stop in self.stopped.items():
            self._freeze(pl_module, m)
            pl_module.member_metrics[m].update(stop["metrics"])
        if self.stopped and not self.training(pl_module):
            trainer.should_stop = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        for m, state in self._frozen.items():
            pl_module.net.load_member_state_dict(m, state)

    # --- after fit --------------------------------------------------------------------------------------------
    def metrics(self, m: int, best: dict[str, Any] | None) -> dict[str, float]:
        """early_stopping/* of member m, as reglab.early_stopping.after_stop gives a solo run with after_stop=none;
        `best`: the member's theta* (MemberBest.best[m]), None without one."""
        out = {}
        score = self.rules[m].best_score
        if score is not None and torch.isfinite(score):
            out["early_stopping/best_val_loss"] = float(score)
        if best is not None:
            out["early_stopping/best_step"] = float(best["step"])
            out["early_stopping/best_epoch"] = float(best["epoch"])
        return out

    # --- checkpoint -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"rules": [r.state_dict() for r in self.rules], "asked": list(self.asked),
                "stopped": {m: dict(s) for m, s in self.stopped.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if len(state_dict["rules"]) != len(self.rules):
            raise ConfigError(f"the checkpoint's early stopping holds {len(state_dict['rules'])} members, this "
                              f"population has {len(self.rules)}")
        for rule, state in zip(self.rules, state_dict["rules"]):
            rule.load_state_dict(state)
        self.asked = list(state_dict["asked"])
        self.stopped = {int(m): dict(s) for m, s in state_dict["stopped"].items()}


class MemberBest(Checkpoint):
    """theta* of every member, by the rule the solo run's ModelCheckpoint keeps its best file by (save_top_k=1:
    the one best file; population/train.py writes it under the solo run's name). Members that failed, or stopped
    before this epoch, keep what they have.

    A Checkpoint, so that Lightning calls it where it calls ModelCheckpoint: after the module's epoch-end hook has
    computed the epoch's metrics (callbacks that are neither Checkpoint nor EarlyStopping run before that hook), and
    after MemberStopping. Listed before the population's own Checkpoint, whose last.ckpt then holds this epoch's
    theta* (Lightning keeps the order of Checkpoint callbacks)."""

    def __init__(self, members: int, monitor: str | None, mode: str = "min", every_n_epochs: int = 1):
        self.monitor, self.mode, self.every_n_epochs = monitor, mode, every_n_epochs
        # score, epoch, step, the member's metrics of that epoch (for the file name), state
        self.best: list[dict[str, Any] | None] = [None] * members

    @classmethod
    def from_config(cls, cfg: DictConfig, members: int) -> MemberBest | None:
        ck = (cfg.get("callbacks") or {}).get("checkpoint")
        if ck is None or ck.get("save_top_k", 1) == 0:
            return None
        every = ck.get("every_n_epochs")  # None: ModelCheckpoint's default, every epoch
        return cls(members, ck.get("monitor"), ck.get("mode", "min"), 1 if every is None else int(every))

    @property
    def state_key(self) -> str:
        return type(self).__name__

    def on_train_epoch_end(self, trainer, module) -> None:
        epoch = trainer.current_epoch
        if trainer.fast_dev_run or self.every_n_epochs < 1 or (epoch + 1) % self.every_n_epochs:
            return  # as ModelCheckpoint: nothing under fast_dev_run, only at due epochs
        for m in range(len(self.best)):
            if m in module.failed or module.stopped.get(m, epoch) < epoch:
                continue
            metrics = dict(module.member_metrics[m])
            current = None  # ModelCheckpoint without a monitor: its best file is the latest
            if self.monitor is not None:
                value = metrics.get(self.monitor)
                if value is None:  # as ModelCheckpoint: an error once validation has run, else not yet measured
                    if trainer.fit_loop.epoch_loop.val_loop._has_run:
                        raise ConfigError(f"callbacks.checkpoint.monitor={self.monitor!r} is not a metric of the "
                                          f"population's members: {', '.join(sorted(metrics))}")
                    continue
                current = torch.tensor(value, dtype=torch.float32)  # the float32 value its solo run compares
                if torch.isnan(current):
                    current = torch.tensor(math.inf if self.mode == "min" else -math.inf)
                best = self.best[m]
                if best is not None and not BETTER[self.mode](current, best["score"]):
                    continue
            self.best[m] = {"score": current, "epoch": epoch, "step": trainer.global_step, "metrics": metrics,
                            "state": module.net.member_state_dict(m)}

    def load_best(self, net) -> None:
        """Every member with a theta* at theta*, for the test (the solo run tests ckpt_path="best")."""
        for m, best in enumerate(self.best):
            if best is not None:
                net.load_member_state_dict(m, best["state"])

    def state_dict(self) -> dict[str, Any]:
        return {"best": list(self.best)}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        # A population checkpoint written before theta* had a callback of its own (until 2026-12-03) holds it in
        # MemberStopping's state: a run interrupted then and resumed now keeps the theta* it had found.
        states = checkpoint.get("callbacks") or {}
        if self.state_key not in states:
            for key, state in states.items():
                if key.startswith(MemberStopping.__name__ + "{") and "best" in state:
                    self.load_state_dict({"best": [None if b is None else {"metrics": {}, **b} for b in state["best"]]})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if len(state_dict["best"]) != len(self.best):
            raise ConfigError(f"the checkpoint's theta* holds {len(state_dict['best'])} members, this population "
                              f"has {len(self.best)}")
        self.best = list(state_dict["best"])


def history_ends(path: Path) -> dict[int, int]:
    """Member -> the last epoch its history holds, for members whose history ends before the population checkpoint
    `path` ({} without one): a member that stopped early, at its stop epoch; one that diverged, the epoch before."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (FileNotFoundError, RuntimeError, EOFError, OSError, pickle.UnpicklingError, ValueError):
        return {}  # an unreadable file: the lookup says so in one line, unless resume=restart discards it anyway
    if not isinstance(ckpt, dict):
        return {}
    ends = {int(m): int(f["epoch"]) - 1 for m, f in (ckpt.get(FAILED_KEY) or {}).items()}
    for key, state in (ckpt.get("callbacks") or {}).items():
        if key.startswith(MemberStopping.__name__ + "{"):
            ends.update({int(m): int(s["epoch"]) for m, s in state["stopped"].items()})
    return ends
