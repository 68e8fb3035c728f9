"""Which members of a sweep share a training step: how a grid becomes population jobs.

The Hydra sweeper `hydra_plugins.reglab_population.population_sweeper.PopulationSweeper` is Hydra's basic sweeper
(the grid; the launcher, joblib, GPU slots or SLURM, places the jobs as before) with `plan` added when
`population.mode` is auto or on: the grid's configurations are grouped by `identity(cfg, without=member_keys(cfg))`
(equal but for seed, label noise, optim.weight_decay, the strengths of penalties and step hooks and, for MLPs,
width) and by their other overrides, each group is split into `population.jobs` populations of about equal cost
(auto: as many as the launcher runs at once; a width's members stay together, so a group of fewer widths makes fewer
populations, and a ResNet18 group, of one width, one), and each population is launched as one job whose
`population.members` lists its members' overrides (reglab/population/train.py trains it). Configurations alone in
their group, or that cannot share a step (`why_not`), stay jobs of their own. With `population.mode=off` it is the
basic sweeper.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from reglab.config import override_key
from reglab.launcher import uses_ddp

log = logging.getLogger(__name__)
# Plain values that leave a step's shapes alone. optim.weight_decay: a population whose members differ in it gives
# each its own through a hook, the optimizer's own set to 0 (reglab/population/train.py).
MEMBER_KEYS = ("seed", "data.label_noise", "model.width", "optim.weight_decay")
# The regularizers that only put modules into the model's slots (dropout family): the fused model carries them.
SLOT_REGULARIZERS = ("reglab.regularization.dropout.",)
# Regularizers the population's Classifier applies to each member as its solo run does (a penalty per member, the
# step hooks per row: reglab/regularization/penalties.py; label smoothing per member's loss), with the values members
# may differ in.
PENALTIES = "reglab.regularization.penalties."
STEP_REGULARIZERS = {PENALTIES + "L1": ("strength",), PENALTIES + "L2": ("strength",),
                     PENALTIES + "ElasticNet": ("l1_strength", "l2_strength"), PENALTIES + "WeightDecay": ("strength",),
                     PENALTIES + "L1Proximal": ("strength",), PENALTIES + "MaxNorm": ("max_norm",),
                     "reglab.regularization.smoothing.LabelSmoothing": ()}
# What keeps the others one job per member, one line each.
REFUSED = {
    "reglab.regularization.mixing.MixUpRegularizer": "mixes each batch with one lam and pairing drawn per step; a "
    "population's stacked batch would need one per member",
    "reglab.regularization.mixing.CutMixRegularizer": "mixes each batch with one box and pairing drawn per step; a "
    "population's stacked batch would need one per member",
    "reglab.regularization.averaging.EMA": "the average evaluated in place of the weights is not kept per member "
    "(a member's checkpoint, theta* and train_eval hold its raw weights)",
    "reglab.regularization.averaging.SWA": "the average evaluated in place of the weights is not kept per member, "
    "and update_bn resets torch's BatchNorm layers, not a population's stacked ones",
    "reglab.regularization.stochastic_depth.StochasticDepthRegularizer": "drops a sample's residual branch, and a "
    "population's members share their samples' draws",
}


MODES = ("off", "auto", "on")
TRAIN_RUN = "reglab.train.run"
# The callbacks a population runs per member (population/stopping.py; the progress bar as is).
POPULATION_CALLBACKS = ("checkpoint", "early_stopping", "progress")
# DropConnect as StackedLinear computes it exactly (reglab/population/base.py): (mask, inference); others run solo.
FUSED_DROPCONNECT = ("per_batch", "mean")
DROPCONNECT_WHY = "a population draws one DropConnect mask per member and step and evaluates the mean network"


def mode(cfg: DictConfig) -> str:
    """population.mode as a word: YAML reads an unquoted `off`/`on` as false/true."""
    value = OmegaConf.select(cfg, "population.mode", default="off")
    value = {False: "off", True: "on"}.get(value, value) if isinstance(value, bool) else str(value)
    if value not in MODES:
        from reglab.errors import ConfigError

        raise ConfigError(f"population.mode={value!r} is not one of {', '.join(MODES)}")
    return value


def why_not(cfg: DictConfig) -> str | None:
    """What in a member's config (not its model, which reglab.population.fusable checks) keeps it from sharing a
    step with others, or None."""
    runner = str(OmegaConf.select(cfg, "runner._target_", default=TRAIN_RUN))
    if runner != TRAIN_RUN:  # cli.runner sends any config with population.members to the population's training
        return f"runner._target_={runner} is a study of its own, not a classifier's fit"
    callbacks = cfg.get("callbacks") or {}
    other = sorted(k for k, v in callbacks.items() if v is not None and k not in POPULATION_CALLBACKS)
    if other:  # the population's trainer has only its own (train_population): another would be dropped silently
        return f"callbacks.{other[0]} is a solo fit's callback (a population runs {', '.join(POPULATION_CALLBACKS)})"
    top_k = (callbacks.get("checkpoint") or {}).get("save_top_k", 1)
    if top_k not in (0, 1):
        return f"callbacks.checkpoint.save_top_k={top_k}: a population keeps one best checkpoint per member"
    if callbacks.get("early_stopping") is not None:  # per member: reglab/population/stopping.py
        after = (cfg.get("stopping") or {}).get("after_stop") or "none"
        if after != "none":
            return f"stopping.after_stop={after} follows each member's early stop with training of its own"
        if cfg.trainer.get("min_steps") or cfg.trainer.get("val_check_interval", 1.0) not in (None, 1.0):
            return "with trainer.min_steps or val_check_interval, early stopping can end a member mid-epoch"
    refused = []
    for name, node in (cfg.get("regularization") or {}).items():
        target = str(node.get("_target_", ""))
        if not target.startswith(SLOT_REGULARIZERS) and target not in STEP_REGULARIZERS:
            refused.append(f"regularization.{name} {REFUSED.get(target, 'acts on the training step (not fused)')}")
    if refused:
        return "; ".join(refused)
    for name, node in (cfg.get("regularization") or {}).items():
        if str(node.get("_target_", "")).endswith(".DropConnectRegularizer"):
            chosen = (node.get("mask", "per_batch"), node.get("inference", "mean"))
            if chosen != FUSED_DROPCONNECT:
                return f"regularization.{name} mask={chosen[0]}, inference={chosen[1]}: {DROPCONNECT_WHY}"
    t = cfg.trainer
    if t.get("gradient_clip_val") or (t.get("accumulate_grad_batches") or 1) != 1:
        return "gradient clipping / accumulation couple the members"
    ddp = uses_ddp(cfg)  # devices=auto on a machine with several GPUs too
    if ddp:
        return f"{ddp} starts DDP ranks; a population trains on one device"
    if t.get("max_time"):
        return "trainer.max_time would end every member at the population's time, a solo run at its own"
    if str(t.get("precision")) in ("16", "16-mixed"):  # bf16 needs no loss scaling
        return "fp16 loss scaling skips every member's step when one member's gradient overflows"
    return None


def member_keys(cfg: DictConfig) -> tuple[str, ...]:
    """The keys members of one population may differ in: MEMBER_KEYS and its regularizers' STEP_REGULARIZERS values."""
    values = tuple(f"regularization.{name}.{key}" for name, node in (cfg.get("regularization") or {}).items()
                   for key in STEP_REGULARIZERS.get(str(node.get("_target_", "")), ()))
    # ResNet18 members of other widths would need other kernels: only equal widths are stacked (groups = members).
    if str(cfg.model.get("_target_", "")).endswith("MLP"):
        return MEMBER_KEYS + values
    return tuple(k for k in MEMBER_KEYS if k != "model.width") + values


def cost(cfg: DictConfig) -> float:
    """Relative cost of one member's step: its multiply-adds, as width^2 per hidden layer (MLP) or width^2 for a
    conv net; enough to balance populations between workers."""
    width = float(cfg.model.get("width") or 1)
    return width * width * max(int(cfg.model.get("depth") or 1), 1) + 100.0 * width


def split(members: list[int], costs: list[float], widths: list[Any], parts: int) -> list[list[int]]:
    """Longest processing time first, over units of equal width (a width's seeds stay together: stacked, they
    cost little more than one), into `parts` bins of about equal summed cost; empty bins are dropped."""
    units: dict[Any, list[int]] = {}
    for i in members:
        units.setdefault(widths[i], []).append(i)
    bins: list[list[int]] = [[] for _ in range(max(1, parts))]
    load = [0.0] * len(bins)
    for unit in sorted(units.values(), key=lambda u: -sum(costs[i] for i in u)):
        b = load.index(min(load))
        bins[b] += unit
        load[b] += sum(costs[i] for i in unit)
    return [b for b in bins if b]


def plan(config: DictConfig, loader, jobs: list[list[str]], swept: set[str]) -> list[list[str]]:
    """The sweep's jobs (override lists) with the members of each population merged into one job."""
    from reglab.runs.identity import identity

    refuse = mode(config) == "on"  # a wrong value: one line, before anything runs
    cfgs = sweep_configs(config, loader, jobs)
    groups: dict[str, list[int]] = {}
    differ: dict[str, set[str]] = {}  # per group: the swept keys its members may differ in
    alone: list[int] = []
    for i, cfg in enumerate(cfgs):
        reason = why_not(cfg)
        if reason is not None and refuse:
            from reglab.errors import ConfigError

            raise ConfigError(f"population.mode=on: job {' '.join(jobs[i])} cannot share a training step ({reason}); "
                              "use population.mode=auto to train such jobs one by one")
        if reason is None:
            # A population job carries its first member's other overrides: configurations that differ in one the
            # identity leaves out (logger.experiment, paths.*: where a run is kept, not what it trains) are apart.
            keys = member_keys(cfg)
            members = set(keys) & swept
            rest = tuple(sorted(o for o in jobs[i] if override_key(o) not in members))
            group = f"{identity(cfg, without=keys)} {rest}"
            groups.setdefault(group, []).append(i)
            differ[group] = members
        else:
            alone.append(i)
    parts = parallel_jobs(config)
    out = [jobs[i] for i in alone]
    costs = [cost(c) for c in cfgs]
    widths = [c.model.get("width") for c in cfgs]
    for group, members in groups.items():
        if len(members) == 1:
            out.append(jobs[members[0]])
            continue
        keys = differ[group]
        for part in split(members, costs, widths, parts):
            common = [o for o in jobs[part[0]] if override_key(o) not in keys]
            listed = ",".join("'" + " ".join(o for o in jobs[i] if override_key(o) in keys) + "'" for i in part)
            out.append([*common, f"population.members=[{listed}]"])
    log.info("population: %d configurations in %d jobs", len(jobs), len(out))
    return out


def sweep_configs(config: DictConfig, loader, jobs: list[list[str]]) -> list[DictConfig]:
    """Each job's composed config, for grouping (its `hydra` node is the first job's). Composing make run's 70 jobs
    took 5.6 s, before any trained (0.5 s this way): a job that differs from the first only in plain values is the
    first's config with those values set (with_values)."""
    first = loader.load_sweep_config(config, jobs[0]) if jobs else None
    out = []
    for job in jobs:
        cfg = with_values(first, [o for o in job if o not in jobs[0]]) if len(job) == len(jobs[0]) else None
        out.append(cfg if cfg is not None else loader.load_sweep_config(config, job))  # another shape: Hydra composes
    return out


def with_values(base: DictConfig, overrides: list[str]) -> DictConfig | None:
    """A copy of `base` with `key=value` overrides applied as Hydra's composition applies them (in order, after the
    config groups), when each sets a plain value of a key `base` already holds (seed=3, model.width=64); None when
    one does not (a config group as model=resnet18, +key, ~key, a new key, a list or dict value): only Hydra can
    compose that."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if any(override_key(o) != o.split("=", 1)[0] for o in overrides):
        return None
    values = {o.key_or_group: o.value() for o in OverridesParser.create().parse_overrides(overrides)}
    if not all(_is_leaf(base, key) and not isinstance(v, (dict, list)) for key, v in values.items()):
        return None
    cfg = copy.deepcopy(base)
    with open_dict(cfg):
        for key, value in values.items():
            OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def _is_leaf(cfg: DictConfig, key: str) -> bool:
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    return isinstance(node, DictConfig) and leaf in node and not OmegaConf.is_config(node._get_node(leaf))


def parallel_jobs(config: DictConfig) -> int:
    """population.jobs, or (auto) the launcher's jobs at once: joblib's n_jobs (-1 = all usable CPUs), submitit's
    array_parallelism (SLURM), else 1."""
    from reglab.launcher import launcher_parallelism

    setting = OmegaConf.select(config, "population.jobs", default="auto")
    if setting != "auto":
        if isinstance(setting, bool) or not isinstance(setting, int):
            from reglab.errors import ConfigError

            raise ConfigError(f"population.jobs={setting!r} is not a whole number of jobs or auto")
        return max(1, setting)
    return launcher_parallelism(OmegaConf.select(config, "hydra.launcher", default=None))

