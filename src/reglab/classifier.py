"""The one LightningModule: cross-entropy classification with composable regularizers.

Metrics are accumulated on the device during an epoch (sum of loss, correct, count) and logged once per epoch:
per-step `self.log` synchronizes the device and costs ~25% of a small model's throughput. Names:
`{train,val,test}/{loss,acc,err}`, `train/penalty/<name>`, `model/params`. The logged `step` is the epoch, so
MLflow's x axis reads in epochs. With a weight average (`ema`, `swa`) val/ and test/ metrics are the average's; with
mixed targets (`mixup`, `cutmix`) train/acc counts the dominant label; label smoothing smooths train/loss only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import move_data_to_device
from torch import nn
from torch.optim.swa_utils import update_bn

from reglab.data.loader import epoch_seed
from reglab.population.base import member_losses, member_rows
from reglab.errors import CheckpointError, ConfigError, DivergenceError
from reglab.regularization.averaging import WeightAveraging, has_batch_norm
from reglab.regularization.base import Regularizer
from reglab.regularization.penalties import is_matrix, weight_stats

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULERS = ("none", "cosine", "step")
FAILED_KEY = "reglab_failed_members"  # a population checkpoint's diverged members: member -> {epoch, reason}
DIVERGED_FIX = "training diverged: lower optim.lr or clip gradients (trainer.gradient_clip_val=1.0)"


def build_optimizer(params, name: str, lr: float, momentum: float = 0.0, nesterov: bool = False,
                    betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 0.0,
                    **_: Any) -> torch.optim.Optimizer:
    # On a CPU, torch's fused kernels: one call steps every tensor, where foreach (a multi-tensor kernel on a GPU)
    # dispatches each tensor's few elementwise ops one by one; SGD with momentum over a population's 42 tensors
    # stepped in 0.46-0.56 ms instead of 0.94-1.08 ms (2-core Xeon VM, 2026-12-02), the same update up to float
    # rounding (~2e-7 after 50 steps). Elsewhere foreach: Lightning refuses gradient clipping with a fused optimizer
    # under fp16 AMP, which unscales inside its step.
    groups = list(params)
    tensors = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    impl = {"fused": True} if tensors and all(p.device.type == "cpu" for p in tensors) else {"foreach": True}
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                               **impl)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=tuple(betas), weight_decay=weight_decay, **impl)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), weight_decay=weight_decay, **impl)
    raise ConfigError(f"optim.name={name!r} is not one of {', '.join(OPTIMIZERS)}")


def predicted(logits: torch.Tensor) -> torch.Tensor:
    """The predicted class, argmax over the last dim (the first of tied maxima, as argmax). On a CPU, max(-1) ran
    ~1.5x faster than argmax(-1) over 10 classes."""
    return logits.max(-1).indices


class Classifier(L.LightningModule):
    def __init__(
        self,
        net: nn.Module,
        optim: Mapping[str, Any],
        regularizers: Mapping[str, Regularizer] | None = None,
        check_finite: str = "auto",
        seed: int | None = None,
    ):
        super().__init__()
        self.net = net
        self.seed = seed  # the run seed: each training epoch's draws (dropout masks, ...) from (seed, epoch, rank)
        self.optim_cfg = dict(optim)
        self.regularizers = dict(regularizers or {})
        for name, reg in self.regularizers.items():
            reg.name = name
            reg.attach(net)
        # What a regularizer may hold besides base.py's hooks: `label_smoothing`, the eps of the training loss
        # (regularization/smoothing.py); `mix(x, y)`, a training batch -> (inputs, soft targets) (mixing.py); a
        # WeightAveraging, whose average of the weights is evaluated in their place (averaging.py). One of each.
        smoothing = [r for r in self.regularizers.values() if getattr(r, "label_smoothing", 0.0)]
        self.mixers = [r for r in self.regularizers.values() if callable(getattr(r, "mix", None))]
        averaging = [r for r in self.regularizers.values() if isinstance(r, WeightAveraging)]
        for what, regs in (("smooth the labels", smoothing), ("mix the training batch", self.mixers),
                           ("average the weights", averaging)):
            if len(regs) > 1:
                raise ConfigError(f"regularization: {' and '.join(r.name for r in regs)} both {what}; use one")
        self.label_smoothing = smoothing[0].label_smoothing if smoothing else 0.0
        self.averaging: WeightAveraging | None = averaging[0] if averaging else None
        # A submodule, made after every regularizer has put its modules into `net`: its weights, buffers and
        # n_averaged are in state_dict, so every checkpoint carries the average and a resumed run continues it.
        self.averaged = self.averaging.average(net) if self.averaging else None
        self._evaluate_average = False  # per evaluation epoch: once the average holds at least one step
        self._bn_at = -1  # n_averaged when the average's batch-norm statistics were last recomputed (SWA)
        # NaN/inf check of the loss: every step on CPU (free), at epoch end on accelerators (a per-step check
        # would synchronize the device each step); "step" forces every step everywhere.
        self.check_finite = check_finite
        # A population (reglab/population/) computes M members in one step: logits (M, B, C), one mean loss per
        # member, and member m's metrics go to the m-th logger. `failed`: members whose loss became non-finite, and
        # why; their loss no longer counts and nothing of theirs is logged, while the others train on (their
        # gradient rows may hold NaN, which SGD/Adam/AdamW, elementwise, keep in their own rows). `failed_epoch`:
        # the epoch each failed in (its history ends the epoch before). Both are saved in checkpoints.
        self.members: int | None = getattr(net, "members", None)
        self.failed: dict[int, str] = {}
        self.failed_epoch: dict[int, int] = {}
        # `stopped`: member -> the last epoch it trained, set by early stopping (population/stopping.py); it is frozen
        # from then on, so its later epochs are neither logged nor kept, and its test is logged at the next step.
        self.stopped: dict[int, int] = {}
        self.member_metrics: list[dict[str, float]] = [{} for _ in range(self.members or 0)]  # latest, per member
        self._sums: dict[str, torch.Tensor] = {}
        self._pending_log: dict[int, Any] = {}  # epoch -> metrics (a list of them for a population) to be logged

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.net.parameters())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @property
    def evaluated(self) -> nn.Module:
        """The weights evaluation uses: the average (ema, swa) once it holds a step, else the net."""
        return self.averaged if self.averaged is not None and self._evaluate_average else self.net

    def check_checkpoint(self, path: str) -> None:
        """Before resuming from `path`: a checkpoint of another model (other width, depth or norm, or written by an
        older reglab) would fail deep inside load_state_dict with a many-line error; name the file and what differs."""
        try:
            theirs = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
        except Exception as e:
            raise CheckpointError(f"{path} cannot be read ({type(e).__name__}); delete it to start this run "
                                  f"afresh") from None
        ours = self.state_dict()
        differ = [f"{k} has shape {tuple(theirs[k].shape)}, this model {tuple(v.shape)}"
                  for k, v in ours.items() if k in theirs and theirs[k].shape != v.shape]
        differ += [f"no {k}" for k in ours if k not in theirs] + [f"unknown {k}" for k in theirs if k not in ours]
        if differ:
            raise CheckpointError(f"{path} was saved by another model ({'; '.join(differ[:2])}"
                                  f"{f'; {len(differ) - 2} more' if len(differ) > 2 else ''}); delete "
                                  f"{Path(path).parent} to start this configuration afresh")

    # --- metric accumulation: sums on the device, one reduction per epoch --------------------------------
    def _accumulate(self, stage: str, values: dict[str, torch.Tensor]) -> None:
        for k, v in values.items():
            key = f"{stage}/{k}"
            self._sums[key] = self._sums[key] + v if key in self._sums else v

    def _log_epoch(self, stage: str) -> dict[str, float]:
        keys = [k for k in self._sums if k.startswith(stage + "/")]
        if not keys:
            return {}
        stacked = torch.stack([self._sums.pop(k).float() for k in keys])
        stacked = self.trainer.strategy.reduce(stacked, reduce_op="sum")  # sums over DDP ranks
        sums = dict(zip(keys, stacked))
        n = sums.pop(f"{stage}/n")
        loss = sums.pop(f"{stage}/loss_sum") / n  # () or, for a population, (M,)
        acc = sums.pop(f"{stage}/correct") / n
        metrics = {f"{stage}/loss": loss, f"{stage}/acc": acc, f"{stage}/err": 1 - acc}
        steps = sums.pop(f"{stage}/steps", None)
        for k, v in sums.items():  # train/penalty/<name>: mean per step
            metrics[k] = v / steps
        # A non-finite validation loss means the weights already are (broken by the epoch's last step, whose
        # training loss was still finite): raise before EarlyStopping quietly ends the run as finished and before
        # ModelCheckpoint saves the broken weights.
        if stage in ("train", "val"):
            self._check_finite(loss, f"{stage}/loss", f"in epoch {self.current_epoch}")
        if stage == "train":  # params/zero_frac, params/l1, params/l2 of the weights
            metrics.update(weight_stats(self.net))  # () each, or (M,) for a population
            # train/<regularizer>/<key>: what a regularizer measured this epoch (max-norm's clipped_frac; (M,) for a
            # population)
            metrics.update({f"train/{name}/{key}": value for name, reg in self.regularizers.items()
                            for key, value in reg.epoch_metrics().items()})
        epoch = self.current_epoch
        if self.members is None:
            values: Any = dict(zip(metrics, torch.stack([v.float() for v in metrics.values()]).tolist()))  # one sync
            shown = metrics
        else:
            values = member_rows(metrics)  # one dict per member
            fitting = self.trainer.state.fn == TrainerFn.FITTING
            frozen = {m for m, last in self.stopped.items() if fitting and last < epoch}
            for m, v in enumerate(values):
                if m not in frozen:
                    self.member_metrics[m].update(v)
            alive = torch.tensor([m not in self.failed and m not in frozen for m in range(self.members)],
                                 device=loss.device)
            shown = {k: v[alive].mean() for k, v in metrics.items()}  # what a progress bar shows
        # Straight to the loggers and to trainer.callback_metrics (what EarlyStopping, ModelCheckpoint and run()
        # read) rather than through self.log_dict: Lightning's result collection moves and resets one torchmetrics
        # object per key and call (~0.3 ms each on CPU, ~5 ms per epoch: a tenth of a digits-MLP epoch). The values
        # are already reduced over ranks; MLFlowLogger.log_metrics writes on rank 0 only.
        self.trainer.callback_metrics.update({k: v.detach() for k, v in shown.items()})
        self.trainer.callback_metrics["step"] = torch.tensor(float(epoch))  # as self.log("step"): checkpoints read it
        if self.members is None:
            self._pending_log.setdefault(epoch, {}).update(values)
        else:
            for m, v in enumerate(values):
                if m not in frozen:  # after fit, a stopped member's test goes where its solo run's does
                    step = epoch if fitting else self.stopped.get(m, epoch - 1) + 1
                    self._pending_log.setdefault(step, [{} for _ in values])[m].update(v)
        if self.trainer.state.fn != TrainerFn.FITTING:  # a test after fit: nothing else comes for this step
            self._write_pending()
        return values

    def _check_finite(self, loss: torch.Tensor, what: str, where: str) -> None:
        """A non-finite loss ends a solo run (DivergenceError); in a population it fails that member only."""
        if self.members is None:
            if not torch.isfinite(loss):
                raise DivergenceError(f"{what} is {loss.item()} {where}; {DIVERGED_FIX}")
            return
        for m in torch.nonzero(~torch.isfinite(loss)).flatten().tolist():
            if m not in self.failed:
                self.failed[m] = f"{what} is {loss[m].item()} {where}; {DIVERGED_FIX}"
                self.failed_epoch[m] = self.current_epoch
        if len(self.failed) == self.members:
            raise DivergenceError(f"every member diverged; first: {self.failed[min(self.failed)]}")

    def _write_pending(self) -> None:
        # A training epoch's metrics (train, val and, with data.test_every_epoch, test) reach the loggers in one
        # call at the end of the epoch, after validation and before the checkpoint callbacks that save on training
        # epoch end (Lightning runs monitoring callbacks after the module's hook): a run's history is then never
        # behind its last.ckpt, which is what resuming needs (reglab/runs/lookup.py).
        pending, self._pending_log = self._pending_log, {}
        for step, values in sorted(pending.items()):
            if self.members is None:
                for logger in self.loggers:
                    logger.log_metrics(values, step=step)
                continue
            for m, logger in enumerate(self.loggers):
                if m not in self.failed and values[m]:
                    logger.log_metrics(values[m], step=step)

    def on_train_end(self) -> None:
        self._write_pending()

    def _step(self, stage: str, batch) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        training = stage == "train"
        if training and self.mixers:  # y (B,) -> soft targets (B, C)
            x, y = self.mixers[0].mix(x, y)
        logits = (self.net if training else self.evaluated)(x)
        eps = self.label_smoothing if training else 0.0  # val/test losses stay plain cross-entropy
        if self.members is None:  # (B, C)
            loss = F.cross_entropy(logits, y, label_smoothing=eps)
            # With soft targets (mixup, cutmix) a prediction counts as correct when it is the target's dominant
            # label, the one with weight max(lam, 1 - lam): train/acc and train/err are measured against it.
            label = y if y.dim() == 1 else y.argmax(-1)
            correct = (predicted(logits) == label).sum().float()
        else:  # (M, B, C); y (M, B), each member's own labels, or (B,), a split all members share
            y = y.expand(logits.shape[:2]) if y.dim() == 1 else y
            loss = member_losses(logits, y) if not eps else \
                F.cross_entropy(logits.transpose(1, 2), y, reduction="none", label_smoothing=eps).mean(1)
            correct = (predicted(logits) == y).sum(-1).float()
        n = torch.full_like(correct, float(logits.shape[-2]))  # the batch size B
        # B = 0: the empty last batch of a DDP rank's evaluation shard one example short (data/loader.py), whose mean
        # loss is NaN.
        loss_sum = loss.detach() * n if logits.shape[-2] else torch.zeros_like(correct)
        self._accumulate(stage, {"loss_sum": loss_sum, "correct": correct, "n": n})
        return loss, logits

    # --- training -------------------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss, _ = self._step("train", batch)
        if self.check_finite == "step" or (self.check_finite == "auto" and loss.device.type == "cpu"):
            self._check_finite(loss, "train/loss", f"at epoch {self.current_epoch}, step {self.global_step}")
        alive = None
        if self.members is not None:
            # The sum of the members' mean losses: d(sum)/d(theta_m) = dL_m/d(theta_m), so each member gets exactly
            # its own gradient (and, under SGD/Adam/AdamW, which are elementwise, its own update).
            if self.failed:
                alive = torch.ones_like(loss, dtype=torch.bool)
                alive[list(self.failed)] = False
                loss = torch.where(alive, loss, torch.zeros_like(loss))
            loss = loss.sum()
        total = loss
        penalties = {}
        for name, reg in self.regularizers.items():
            p = reg.penalty(self.net)  # a population's: (M,), each member's own, summed as the losses are
            if p is not None:
                penalties[f"penalty/{name}"] = p.detach()
                if alive is not None:
                    p = torch.where(alive, p, torch.zeros_like(p))
                total = total + p.sum()
        if penalties:
            penalties["steps"] = torch.ones_like(next(iter(penalties.values())))  # () or (M,), as the penalties
            self._accumulate("train", penalties)
        return total

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        for reg in self.regularizers.values():
            reg.before_step(self.net, optimizer)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        optimizer.step(closure=optimizer_closure)
        # Here rather than in on_train_batch_end, which callbacks get first: a population's early stopping puts a
        # stopped member's weights back there (population/stopping.py), and a projection after that would move them.
        if self.regularizers:
            optimizer = self.optimizers(use_pl_optimizer=False)
            for reg in self.regularizers.values():
                reg.after_step(self.net, optimizer)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.averaging is not None and self.averaging.due(
                self.current_epoch, self.trainer.max_epochs or 1, batch_idx + 1 == self.trainer.num_training_batches):
            self.averaged.update_parameters(self.net)

    def on_train_epoch_start(self) -> None:
        if self.seed is not None:
            # Dropout, DropConnect, stochastic depth, mixup: every draw of the step comes from torch's global
            # generator, which Lightning's checkpoints do not hold: a resumed run replayed the masks of the run's
            # first epochs, and every DDP rank (seeded alike) drew the same masks. Per epoch and rank, both hold.
            torch.manual_seed(epoch_seed(self.seed, self.current_epoch, self.global_rank))
        streams = getattr(self.net, "streams", None)  # a population: each member's draws as its solo run's
        if streams is not None:
            streams.start(self.current_epoch, self.global_rank)

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train")
        self._write_pending()

    # --- evaluation -----------------------------------------------------------------------------------------
    def _prepare_average(self) -> None:
        """Before an evaluation epoch: evaluate the average once it holds a step; for SWA, first give it batch-norm
        statistics of its own weights (update_bn over the training split), once per new average."""
        if self.averaged is None:
            return
        n = int(self.averaged.n_averaged)  # one device sync per evaluation epoch
        self._evaluate_average = n > 0
        if self._evaluate_average and self.averaging.recompute_bn and n != self._bn_at \
                and has_batch_norm(self.averaged):
            update_bn(self._training_inputs(), self.averaged)
            self._bn_at = n

    def _training_inputs(self):
        """The training split's inputs as a training step sees them (on the device, normalized), unaugmented."""
        dm = self.trainer.datamodule
        loader = dm.train_dataloader() if dm is not None else self.trainer.train_dataloader
        for batch in loader:
            batch = move_data_to_device(batch, self.device)
            yield (dm.on_after_batch_transfer(batch, 0) if dm is not None else batch)[0]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.failed:  # a resumed population keeps its diverged members out, with their reasons
            checkpoint[FAILED_KEY] = {m: {"epoch": self.failed_epoch[m], "reason": r} for m, r in self.failed.items()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._bn_at = -1  # other weights: the average's batch-norm statistics are recomputed before use
        failed = checkpoint.get(FAILED_KEY) or {}
        self.failed = {int(m): f["reason"] for m, f in failed.items()}
        self.failed_epoch = {int(m): int(f["epoch"]) for m, f in failed.items()}

    def on_validation_epoch_start(self) -> None:
        self._prepare_average()

    def on_test_epoch_start(self) -> None:
        self._prepare_average()

    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        # The data module names its validation loaders: ("val",) or, with data.test_every_epoch, ("val", "test").
        stages = getattr(self.trainer.datamodule, "eval_stages", ("val",))
        self._step(stages[dataloader_idx], batch)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            self._sums = {k: v for k, v in self._sums.items() if not k.startswith(("val/", "test/"))}
            return
        self._log_epoch("val")
        self._log_epoch("test")

    def test_step(self, batch, batch_idx: int) -> None:
        self._step("test", batch)

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    # --- optimizer ------------------------------------------------------------------------------------------
    def configure_optimizers(self):
        cfg = dict(self.optim_cfg)
        scheduler = cfg.pop("scheduler", "none") or "none"
        decay = cfg.get("weight_decay", 0.0)
        # Weight-decay rule (as nanoGPT): decay matrices and conv kernels (tensors with >= 2 dims), never biases
        # or normalization gains/shifts, whose shrinkage only limits what the layer can represent.
        params = [p for p in self.net.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if is_matrix(p, self.net)], "weight_decay": decay},
            {"params": [p for p in params if not is_matrix(p, self.net)], "weight_decay": 0.0},
        ]
        optimizer = build_optimizer([g for g in groups if g["params"]], **cfg)
        if scheduler == "none":
            return optimizer
        epochs = max(self.trainer.max_epochs or 1, 1)
        if scheduler == "cosine":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
        elif scheduler == "step":
            sched = torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(epochs // 3, 1), gamma=0.1)
        else:
            raise ConfigError(f"optim.scheduler={scheduler!r} is not one of {', '.join(SCHEDULERS)}")
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
