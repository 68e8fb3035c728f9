"""GPU speed settings that are not Lightning Trainer arguments: `trainer.performance` in conf/trainer/*.yaml.

    channels_last: true            NHWC memory layout for conv nets: tensor-core convolutions without transposes
    compile: false                 torch.compile the network (nn.Module.compile: state_dict keys unchanged)
    float32_matmul_precision: high TF32 for the float32 matmuls left outside bf16 autocast (Ampere and later)

(bf16 autocast and cuDNN autotuning are Trainer arguments: `precision: bf16-mixed`, `benchmark: true`.)
Off on CPU, where they buy nothing; conf/trainer/gpu.yaml turns on what helps a modern NVIDIA GPU.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from reglab.errors import ConfigError

KEYS = ("channels_last", "compile", "float32_matmul_precision")


def trainer_config(trainer_cfg: DictConfig) -> DictConfig:
    """cfg.trainer without the `performance` node: the arguments of lightning.Trainer."""
    return OmegaConf.masked_copy(trainer_cfg, [k for k in trainer_cfg if k != "performance"])


def settings(trainer_cfg: Mapping[str, Any]) -> dict[str, Any]:
    perf = dict(trainer_cfg.get("performance") or {})
    unknown = [k for k in perf if k not in KEYS]
    if unknown:
        raise ConfigError(f"trainer.performance.{unknown[0]} is not one of {', '.join(KEYS)}")
    precision = perf.get("float32_matmul_precision") or "highest"
    if precision not in ("highest", "high", "medium"):
        raise ConfigError(f"trainer.performance.float32_matmul_precision={precision!r} is not highest, high, medium")
    return {"channels_last": bool(perf.get("channels_last", False)), "compile": bool(perf.get("compile", False)),
            "float32_matmul_precision": precision}


def apply(trainer_cfg: Mapping[str, Any], net: nn.Module) -> nn.Module:
    """Set the process-wide matmul precision and prepare `net` in place; returns it."""
    s = settings(trainer_cfg)
    torch.set_float32_matmul_precision(s["float32_matmul_precision"])
    if s["channels_last"] and any(isinstance(m, nn.Conv2d) for m in net.modules()):
        net.to(memory_format=torch.channels_last)  # conv outputs follow the weights' layout
    if s["compile"]:
        net.compile()
    return net
