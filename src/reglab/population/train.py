"""run(cfg) for a population job: the sweep members listed in `cfg.population.members`, trained as one fused model.

Each member is the configuration its solo job would run (cfg with its overrides applied), with the same identity,
child run, params, per-epoch metrics and final test metrics: a study's report cannot tell the difference. The order
is train.run's, per member where a member has its own:

look up every member (done ones drop out) -> per member: seed, data, model -> fuse -> one Classifier over the
population, with the members' penalties and step hooks, each member's strength its own (`step_regularizers`) -> one
RunLogger per member -> Trainer (a checkpoint of the whole population; with early stopping, each
member stops at its own epoch: population/stopping.py) -> fit -> each member's training split in evaluation mode
(train_eval/{loss,err}) -> test (with early stopping, each member at its theta*) -> each member's last and best
(theta*, population/stopping.MemberBest) weights into its own checkpoint folder, under its solo run's file names ->
each member's run ends (FINISHED; FAILED with its reason if it diverged): until then a kill leaves it resumable.

Resume: the population's `last.ckpt` lives in a folder named by the members' identities in the order of its rows; a
rerun continues it when every unfinished member's run reaches its epoch (reglab/runs/lookup.py's rule; a member that
stopped early or diverged, the epoch its history ends at), else all of them start over. Members that cannot be fused
(and `population.mode=auto`) are trained one after another by reglab.train.run (each with its own look-up and
resume), before anything of theirs is discarded or written here.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import sys
from pathlib import Path

import lightning as L
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from omegaconf import DictConfig, OmegaConf

from reglab import cli, performance, preemption, progress, train
from reglab.checkpoint import AtomicCheckpointIO, Checkpoint, hard_link, remove_stale
from reglab.classifier import Classifier
from reglab.config import validate
from reglab.errors import ConfigError, DivergenceError
from reglab.population import fusable, fuse
from reglab.population.base import member_rows
from reglab.population.data import PopulationDataModule
from reglab.population.stopping import MemberBest, MemberStopping, history_ends
from reglab.population.sweeper import SLOT_REGULARIZERS, STEP_REGULARIZERS, member_keys, mode, why_not
from reglab.regularization.base import Regularizer
from reglab.regularization.penalties import CoupledWeightDecay, WeightDecay
from reglab.runs.identity import identity, without_hydra
from reglab.runs.logger import build_logger
from reglab.runs.lookup import Run, discard, look_up, resume_point


def member_configs(cfg: DictConfig) -> list[DictConfig]:
    """One config per `population.members` entry ("key=value key=value"), as its solo job composes it. An entry may
    set only what members of one population may differ in (sweeper.member_keys; the sweeper writes no other): the
    population trains every member with the first one's optimizer and trainer, so a member's own optim.lr or
    trainer.max_epochs would be logged as a param it never trained with."""
    parser = OverridesParser.create()
    base = OmegaConf.to_container(without_hydra(cfg), resolve=False)
    base["population"]["members"] = []
    out = []
    for i, member in enumerate(cfg.population.members):
        c = OmegaConf.create(base)
        overrides = parser.parse_overrides(str(member).split())
        for o in overrides:
            OmegaConf.update(c, o.key_or_group.lstrip("+"), o.value(), merge=False, force_add=True)
        allowed = member_keys(c)
        for key in (o.key_or_group.lstrip("+") for o in overrides):
            if key not in allowed:
                raise ConfigError(f"population.members[{i}] sets {key}, which members of one population cannot "
                                  f"differ in (they may differ in {', '.join(allowed)}); sweep {key} as separate jobs")
        out.append(c)
    return out


def step_regularizers(cfgs: list[DictConfig]) -> dict[str, Regularizer]:
    """The regularizers the population's Classifier applies (the dropout family is in the members' models already),
    built from the members' configs: a value the members differ in (their strengths, sweeper.STEP_REGULARIZERS)
    becomes one per member. Members that differ in optim.weight_decay get it from a last hook, each its own: AdamW's
    decoupled w <- (1 - lr*wd) w as WeightDecay, SGD's and Adam's g <- g + wd*w as CoupledWeightDecay; the caller
    then builds the optimizer without decay."""
    out = {}
    for name, node in (cfgs[0].get("regularization") or {}).items():
        if node._target_.startswith(SLOT_REGULARIZERS):
            continue
        args = {}
        for key in node:
            values = [c.regularization[name][key] for c in cfgs]
            differ = any(v != values[0] for v in values)
            if differ and key not in STEP_REGULARIZERS.get(node._target_, ()):
                raise ConfigError(f"regularization.{name}.{key}: members of one population differ in it")
            args[key] = values if differ else values[0]
        out[name] = train.build(OmegaConf.create({**args, "_convert_": "all"}), f"regularization.{name}")
    decays = [c.optim.get("weight_decay") or 0.0 for c in cfgs]
    if any(d != decays[0] for d in decays):
        out["optim.weight_decay"] = (WeightDecay if cfgs[0].optim.name == "adamw" else CoupledWeightDecay)(decays)
    return out


def run(cfg: DictConfig) -> dict[str, float]:
    cfgs = member_configs(cfg)
    for c in cfgs:
        validate(c)
    train.check_accelerator(cfgs[0])
    found = [look_up(c) for c in cfgs]
    todo = [i for i, r in enumerate(found) if not r.done]
    if todo:
        preemption.check(f"population of {len(todo)} members")
    metrics = [r.metrics or {} for r in found]
    if todo:
        for i, m in zip(todo, train_population([cfgs[i] for i in todo], [found[i] for i in todo])):
            metrics[i] = m
    progress.members_done(cfg, metrics, todo)  # each member's line in the sweep's progress (reglab/progress.py)
    diverged = [i for i in todo if not all(math.isfinite(v) for v in metrics[i].values())]
    if diverged:  # as a solo job that diverges: the sweep ends with a non-zero status, the other members kept
        cli.job_failed(f"{len(diverged)} of {len(cfgs)} members diverged, the others finished (each diverged run is "
                       f"FAILED with tag failure_reason); first: {cfg.population.members[diverged[0]]}")
    keys = set.intersection(*(set(m) for m in metrics)) if metrics else set()
    return {k: sum(m[k] for m in metrics) / len(metrics) for k in keys}  # the members' mean, for the job's line


def train_population(cfgs: list[DictConfig], found: list[Run] | None = None) -> list[dict[str, float]]:
    """Train the members `cfgs` (none of them done) as one population and return each one's final metrics.
    `found`: their look_up, when the caller has made it."""
    lead = cfgs[0]
    nets, dms = [], []
    for c in cfgs:  # per member, as train.run: seed, data, model and regularizers (its own initialization and split)
        L.seed_everything(c.seed, workers=True, verbose=False)
        dm = train.build_data(c)
        dm.setup()
        nets.append(train.build_module(c, dm).net)
        dms.append(dm)
    reason = why_not(lead) or fusable(nets)
    if reason:
        if mode(lead) == "on":
            raise ConfigError(f"population.mode=on: these members cannot share a training step ({reason}); use "
                              "population.mode=auto to train them one by one")
        print(f"population: {reason}; training the {len(cfgs)} members one by one", file=sys.stderr)
        return [_solo(c) for c in cfgs]  # each member's own look-up, run and checkpoint resume

    folder, runs, resume = _resume_or_restart(cfgs, found or [look_up(c) for c in cfgs])
    data = PopulationDataModule(dms)
    regularizers = step_regularizers(cfgs)
    optim = OmegaConf.to_container(lead.optim, resolve=True)
    if "optim.weight_decay" in regularizers:
        optim["weight_decay"] = 0.0
    population = fuse(nets, dms[0].input_shape)
    population.streams.seeds = [c.seed for c in cfgs]  # each member's dropout-family draws: its solo run's
    module = Classifier(population, optim=optim, regularizers=regularizers, seed=lead.seed)
    last = folder / "last.ckpt"
    if resume:
        module.check_checkpoint(str(last))
    performance.apply(lead.get("performance"), lead.trainer, module.net)
    loggers = [build_logger(c, r) for c, r in zip(cfgs, runs)]
    if any(lg is None for lg in loggers):
        loggers = []
    for lg in loggers:
        lg.member = True
    ck = (lead.get("callbacks") or {}).get("checkpoint")
    # callbacks.checkpoint=null: no checkpoint at all, as a solo run (nothing to resume from, no member files).
    checkpoint = None if ck is None else Checkpoint(
        dirpath=str(folder), monitor=None, save_top_k=0, save_last=True,
        every_n_epochs=int(ck.get("every_n_epochs") or 1), last_every_s=ck.get("last_every_s"),
        stop_within_s=ck.get("stop_within_s"), save_on_train_epoch_end=True)
    # The population's own checkpoint (all members, optimizer, loops), each member's theta* and early stopping
    # and, on a terminal, the preset's progress bar.
    theta_star = MemberBest.from_config(lead, len(cfgs))  # before `checkpoint`: see MemberBest
    stopping = MemberStopping.from_config(lead, len(cfgs))
    callbacks = [*(c for c in (theta_star, checkpoint, stopping) if c is not None),
                 *(c for c in train.build_callbacks(lead, folder) if isinstance(c, ProgressBar))]
    trainer = instantiate(lead.trainer, logger=loggers or False, callbacks=callbacks, default_root_dir=str(folder),
                          enable_checkpointing=checkpoint is not None,
                          enable_progress_bar=any(isinstance(c, ProgressBar) for c in callbacks))
    # The members' runs start here, once everything a config could break is built (as in train.run): an error
    # above leaves no run behind.
    for c, r, lg, net, dm in zip(cfgs, runs, loggers, nets, dms):
        if r.run_id is None:
            lg.log_header(c, sum(p.numel() for p in net.parameters()), dm)
    try:
        with preemption.keeping(loggers):
            preemption.check(f"population of {len(cfgs)} members")
            trainer.fit(module, datamodule=data, ckpt_path=str(last) if resume else None, weights_only=True)
    except DivergenceError as e:  # every member diverged: each is tagged with its own reason
        for m, lg in enumerate(loggers):
            lg.fail(f"divergence: {module.failed.get(m, e)}")
            lg.end("failed")
        raise
    # Each member's eval-mode loss and error on its own training split and labels, as train.run logs them.
    train_eval = member_rows(train.evaluate_training_set(module.net, data))
    for m, lg in enumerate(loggers):
        if m not in module.failed and m not in module.stopped:  # a stopped member's is logged at its stop
            lg.log_after_fit(train_eval[m], step=trainer.current_epoch - 1)  # the last epoch trained
    # Each member's final weights, epoch and step (a stopped member's: its stop's), then its test at theta*.
    final = [{f"net.{k}": v.clone() for k, v in net.state_dict().items()} for net in module.net.member_nets()]
    ends = [(stopping.stopped[m]["epoch"], stopping.stopped[m]["step"]) if stopping and m in stopping.stopped
            else (trainer.current_epoch - 1, trainer.global_step) for m in range(len(cfgs))]
    if stopping and theta_star:  # as train.run: with early stopping the test is at theta*
        theta_star.load_best(module.net)
    with preemption.keeping(loggers):
        preemption.check(f"the test pass of a population of {len(cfgs)} members")
        trainer.test(module, datamodule=data, verbose=False, weights_only=True)
    after = [stopping.metrics(m, theta_star.best[m] if theta_star else None) if stopping else {}
             for m in range(len(cfgs))]
    out, ended = [], []
    for m, (c, r, net) in enumerate(zip(cfgs, runs, module.net.member_nets())):
        if loggers and "train/loss" not in module.member_metrics[m]:  # resumed after its last epoch (as train.run)
            module.member_metrics[m] = {**loggers[m].last_epoch(), **module.member_metrics[m]}
        out.append({**module.member_metrics[m], **train_eval[m], **after[m],
                    "model/params": float(sum(p.numel() for p in net.parameters()))})
        # A diverged member's weights are not finite and are not kept (failure_reason).
        files = None if m in module.failed or checkpoint is None else \
            _save_member(c, r.ckpt_dir, final[m], ends[m], theta_star.best[m] if theta_star else None)
        if not loggers:
            continue
        if m in module.failed:
            loggers[m].fail(f"divergence: {module.failed[m]}")
            ended.append((loggers[m], "failed"))
            continue
        if after[m]:
            loggers[m].log_after_end(after[m])
        if files is not None:
            loggers[m].member_checkpoints(files)
        ended.append((loggers[m], "success"))
    # Ended once every member's files are written: a member ended (done) before a kill would make the rerun a
    # population of the others, whose folder (named by its members) is not this one's: they would train again.
    for lg, status in ended:
        lg.end(status)  # FINISHED (or FAILED); a kill before leaves it to be continued
    return out


def _solo(cfg: DictConfig) -> dict[str, float]:
    """One member trained as its own run; a divergence ends that run FAILED (train.run tags it) and, as in a fused
    population, the members after it still train: `run` reports it from the NaN returned here."""
    try:
        return cli.runner(cfg)(cfg)  # the config's runner (a member's population.members is empty)
    except DivergenceError:
        return {"train/loss": math.nan}


def _resume_or_restart(cfgs: list[DictConfig], found: list[Run]) -> tuple[Path, list[Run], bool]:
    """The population's checkpoint folder, each member's run as it continues (or starts), and whether the fit resumes
    from the folder's last.ckpt: only if every member's history reaches it (a member that stopped early or diverged,
    the epoch its history ends at); else every member starts over, its attempts and the folder discarded."""
    # Named by the members in the order of their rows, which is how the checkpoint holds them (stacked weights,
    # optimizer and early-stopping state): a rerun that lists the same members in another order starts them over
    # rather than hand one member's state to another.
    folder = Path(cfgs[0].paths.checkpoints) / ("population-" + hashlib.sha256(
        " ".join(identity(c) for c in cfgs).encode()).hexdigest()[:12])
    last = folder / "last.ckpt"
    ends = history_ends(last)
    runs = [resume_point(c, r, last=last, reached=ends.get(m)) for m, (c, r) in enumerate(zip(cfgs, found))]
    resume = all(r.ckpt_path for r in runs)
    for c, r in zip(cfgs, runs):
        discard(c, r, restart=not resume)
    if not resume and folder.exists():
        shutil.rmtree(folder)
    return folder, runs, resume


def _save_member(cfg: DictConfig, folder: Path, final: dict[str, torch.Tensor], end: tuple[int, int],
                 best: dict | None) -> ModelCheckpoint:
    """A member's own checkpoint folder as its solo run's callbacks.checkpoint leaves it: last.ckpt with the final
    weights, epoch and step (save_last), and the one best file, theta* (MemberBest), under callbacks.checkpoint's
    file name; a hard link to last.ckpt when theta* is the final epoch, as reglab.checkpoint links them. Each file
    written atomically. Returned as the ModelCheckpoint that would have written them: what the member's logger
    uploads (logger.log_model)."""
    ck = cfg.callbacks.checkpoint
    files = ModelCheckpoint(dirpath=folder, filename=ck.get("filename"), monitor=ck.get("monitor"),
                            mode=ck.get("mode", "min"), save_top_k=ck.get("save_top_k", 1),
                            save_last=ck.get("save_last"), every_n_epochs=ck.get("every_n_epochs"),
                            auto_insert_metric_name=ck.get("auto_insert_metric_name", True))
    io = AtomicCheckpointIO()
    remove_stale(folder)
    last = folder / "last.ckpt"
    if ck.get("save_last"):
        io.save_checkpoint({"state_dict": final, "epoch": end[0], "global_step": end[1]}, last)
        files.last_model_path = str(last)
    if best is not None:
        metrics = {k: torch.tensor(v) for k, v in best["metrics"].items()}
        metrics.update(epoch=torch.tensor(best["epoch"]), step=torch.tensor(best["step"]))
        path = Path(files.format_checkpoint_name(metrics))
        path.parent.mkdir(parents=True, exist_ok=True)  # a metric named a/b in the template: a folder, as Lightning's
        if not (files.last_model_path and (best["epoch"], best["step"]) == end and hard_link(last, path)):
            io.save_checkpoint({"state_dict": {f"net.{k}": v for k, v in best["state"].items()},
                                "epoch": best["epoch"], "global_step": best["step"]}, path)
        files.best_model_path, files.best_model_score = str(path), best["score"]
        files.best_k_models = {str(path): best["score"]}
    return files
