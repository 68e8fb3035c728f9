"""Checks a composed config before anything runs, so a bad value fails at start with its key in the message."""

from __future__ import annotations

from omegaconf import DictConfig

from reglab.errors import ConfigError


def _check(cond: bool, key: str, value, expected: str) -> None:
    if not cond:
        raise ConfigError(f"{key}={value!r} is invalid: expected {expected}")


def _number(cfg: DictConfig, key: str):
    value = cfg
    for part in key.split("."):
        value = value.get(part) if value is not None else None
    return value


def validate(cfg: DictConfig) -> None:
    num = (int, float)
    checks = [
        ("seed", lambda v: isinstance(v, int), "an integer"),
        ("model.width", lambda v: v is None or (isinstance(v, int) and v >= 1), "an integer >= 1"),
        ("model.depth", lambda v: v is None or (isinstance(v, int) and v >= 0), "an integer >= 0"),
        ("data.batch_size", lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
        ("data.label_noise", lambda v: isinstance(v, num) and 0 <= v < 1, "a number in [0, 1)"),
        ("data.val_fraction", lambda v: isinstance(v, num) and 0 <= v < 1, "a number in [0, 1)"),
        ("data.train_size", lambda v: v is None or (isinstance(v, int) and v >= 1), "null or an integer >= 1"),
        ("optim.lr", lambda v: isinstance(v, num) and v > 0, "a number > 0"),
        ("optim.weight_decay", lambda v: v is None or (isinstance(v, num) and v >= 0), "a number >= 0"),
        ("optim.momentum", lambda v: v is None or (isinstance(v, num) and 0 <= v < 1), "a number in [0, 1)"),
        ("trainer.max_epochs", lambda v: v is None or (isinstance(v, int) and v >= 1), "an integer >= 1"),
    ]
    for key, ok, expected in checks:
        value = _number(cfg, key)
        if isinstance(value, bool):
            _check(False, key, value, expected)
        _check(ok(value), key, value, expected)
