"""Checks a composed config before anything runs, so a bad value fails at start with its key in the message."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, ListConfig, OmegaConf

from reglab.errors import ConfigError

# What a config's `_target_` may name: Hydra imports and calls whatever it is given, so `model._target_=os.system`
# would run a shell command from a config file or a sweep someone shared. The project's configs need only these;
# a new class under reglab is covered, anything else is added here on purpose. (Hydra's own `hydra.callbacks` are
# instantiated by Hydra before any job starts and are not checked here.)
ALLOWED_TARGETS = ("reglab.", "lightning.Trainer", "lightning.pytorch.callbacks.", "hydra_plugins.reglab_population.",
                   "hydra_plugins.reglab_optuna.", "optuna.samplers.")

# Regularizer arguments checked by name in every regularization.<name> node, before Lightning loads (the classes
# in reglab.regularization check them again for Python callers): key suffix -> (test, what is expected).
REGULARIZER_RULES = {
    "keep_prob": (lambda v: 0 < v <= 1, "a probability of keeping a unit, in (0, 1]"),
    "strength": (lambda v: v >= 0, "a number >= 0"),
    "max_norm": (lambda v: v > 0, "a number > 0"),
}


def override_key(override: str) -> str:
    """The key or config group a command-line override sets: `+regularization.l2.strength=1` ->
    `regularization.l2.strength`, `~callbacks.early_stopping` -> `callbacks.early_stopping`."""
    return override.split("=", 1)[0].lstrip("+~")


def _check(cond: bool, key: str, value, expected: str) -> None:
    if not cond:
        raise ConfigError(f"{key}={value!r} is invalid: expected {expected}")


ABSENT = object()  # a key the config does not have (a model without a width), unlike one set to null


def _number(cfg: DictConfig, key: str):
    value = cfg
    for part in key.split("."):
        if not isinstance(value, DictConfig) or part not in value:
            return ABSENT
        value = value.get(part)
    return value


def validate(cfg: DictConfig) -> None:
    num = (int, float)
    absent = ABSENT
    checks = [
        ("seed", lambda v: isinstance(v, int) and 0 <= v < 2**32, "an integer in [0, 2**32)"),
        ("model.width", lambda v: v is absent or (isinstance(v, int) and v >= 1), "an integer >= 1"),
        ("model.depth", lambda v: v is absent or (isinstance(v, int) and v >= 0), "an integer >= 0"),
        ("data.batch_size", lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
        ("data.eval_batch_size", lambda v: v in (absent, None) or (isinstance(v, int) and v >= 1),
         "null or an integer >= 1"),
        ("data.label_noise", lambda v: isinstance(v, num) and 0 <= v < 1, "a number in [0, 1)"),
        ("data.val_fraction", lambda v: isinstance(v, num) and 0 <= v < 1, "a number in [0, 1)"),
        ("data.train_size", lambda v: v in (absent, None) or (isinstance(v, int) and v >= 1),
         "null or an integer >= 1"),
        ("optim.lr", lambda v: isinstance(v, num) and v > 0, "a number > 0"),
        ("optim.weight_decay", lambda v: v is absent or (isinstance(v, num) and v >= 0), "a number >= 0"),
        ("optim.momentum", lambda v: v is absent or (isinstance(v, num) and 0 <= v < 1), "a number in [0, 1)"),
        ("optim.betas", lambda v: v is absent or (len(v) == 2 and all(isinstance(b, num) and not isinstance(b, bool)
                                                                      and 0 <= b < 1 for b in v)),
         "two numbers in [0, 1), e.g. [0.9, 0.999]"),
        ("trainer.max_epochs", lambda v: v in (absent, None) or (isinstance(v, int) and v >= 1), "an integer >= 1"),
        # Lightning takes a negative patience and stops at the first epoch that does not improve, as patience 0 does
        ("callbacks.early_stopping.patience", lambda v: v is absent or (isinstance(v, int) and v >= 0),
         "an integer >= 0"),
        ("resume", lambda v: v in (absent, None, "auto", "restart"), "auto or restart"),
    ]
    for key, ok, expected in checks:
        value = _number(cfg, key)
        if isinstance(value, bool):
            _check(False, key, value, expected)
        if key == "optim.betas" and value is not absent and not isinstance(value, (list, tuple, ListConfig)):
            _check(False, key, value, expected)
        _check(ok(value), key, value, expected)
    optim = cfg.get("optim") or {}
    if optim.get("nesterov") and not optim.get("momentum"):
        raise ConfigError(f"optim.nesterov=true needs optim.momentum > 0 (it is {optim.get('momentum')!r}); set "
                          "optim.momentum=0.9 or optim.nesterov=false")
    _validate_targets(OmegaConf.to_container(cfg, resolve=False))
    _validate_regularizers(cfg)
    _validate_decoupled_decay(cfg)
    _validate_paths(cfg)


def check_target(key: str, value) -> None:
    if not (isinstance(value, str) and value.startswith(ALLOWED_TARGETS)):
        raise ConfigError(f"{key}={value!r} is not allowed: a _target_ must start with {', '.join(ALLOWED_TARGETS)} "
                          "(extend reglab.config.ALLOWED_TARGETS on purpose)")


def _validate_targets(node, key: str = "") -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "_target_":
                check_target(f"{key}_target_", v)
            _validate_targets(v, f"{key}{k}.")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _validate_targets(v, f"{key[:-1]}[{i}].")


def _validate_regularizers(cfg: DictConfig) -> None:
    for name, node in (cfg.get("regularization") or {}).items():
        if not isinstance(node, DictConfig):
            continue
        for arg, value in node.items():
            for suffix, (ok, expected) in REGULARIZER_RULES.items():
                if str(arg).endswith(suffix):
                    key = f"regularization.{name}.{arg}"
                    is_num = isinstance(value, (int, float)) and not isinstance(value, bool)
                    _check(is_num and ok(value), key, value, expected)


def _validate_decoupled_decay(cfg: DictConfig) -> None:
    """Decoupled weight decay multiplies float32 weights by 1 - lr * lambda each step; below 2**-25 that factor is
    exactly 1 and the decay does nothing (EfficientNet's 1e-5 at lr 1e-3 did nothing, bit for bit, until 2026-12-04).
    Checked at the initial learning rate: a schedule can only lower it."""
    lr = _number(cfg, "optim.lr")
    decays = {f"regularization.{name}.strength": node.get("strength")
              for name, node in (cfg.get("regularization") or {}).items()
              if isinstance(node, DictConfig) and str(node.get("_target_", "")).endswith("penalties.WeightDecay")}
    if (cfg.get("optim") or {}).get("name") == "adamw":  # torch's AdamW: the same w <- (1 - lr * wd) w, in float32
        decays["optim.weight_decay"] = cfg.optim.get("weight_decay")
    for key, strength in decays.items():
        if not (isinstance(lr, (int, float)) and isinstance(strength, (int, float))) or strength == 0:
            continue
        if np.float32(1.0 - lr * strength) == np.float32(1.0):
            fix = "or optim=adam with optim.weight_decay (coupled)" if key == "optim.weight_decay" else \
                "or a coupled L2 (regularization=[l2] or optim.weight_decay)"
            raise ConfigError(f"{key}={strength!r} with optim.lr={lr!r} decays the weights by a factor "
                              f"1 - {lr * strength:.3g} per step, exactly 1 in float32 (no decay at all); use a "
                              f"value above {2.0**-25 / lr:.2g} at this lr, {fix}")


def _validate_paths(cfg: DictConfig) -> None:
    """Every output folder must be writable before a run starts: a read-only results folder found after the first
    epoch would leave a FAILED run behind; found here, nothing is written."""
    for name, value in (cfg.get("paths") or {}).items():
        if not isinstance(value, str):
            continue
        path = Path(value).absolute()
        existing = next(p for p in (path, *path.parents) if p.exists())
        if not existing.is_dir():
            reason = "is not a folder"
        elif os.statvfs(existing).f_flag & os.ST_RDONLY:
            reason = "is on a read-only file system"
        elif not os.access(existing, os.W_OK | os.X_OK):
            reason = "is not writable"
        else:
            continue
        also = "" if name == "root" else " (or paths.root=...)"
        raise ConfigError(f"paths.{name}={value}: {existing} {reason}; choose a writable folder with "
                          f"paths.{name}=...{also}")
