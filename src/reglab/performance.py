"""Speed settings that are not Lightning Trainer arguments: the top-level `performance` node of conf/train.yaml.

    channels_last: auto            NHWC memory layout for conv nets: tensor-core convolutions without transposes
    compile: false                 torch.compile the network (nn.Module.compile: state_dict keys unchanged)
    float32_matmul_precision: auto TF32 (`high`) for the float32 matmuls left outside bf16 autocast (Ampere and later)

`auto` means on when the trainer runs on a GPU, off on a CPU, where they buy nothing. (bf16 autocast and cuDNN
autotuning are Trainer arguments: `precision: bf16-mixed`, `benchmark: true` in conf/trainer/gpu.yaml.)
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from reglab.errors import ConfigError

KEYS = ("channels_last", "compile", "float32_matmul_precision")
PRECISIONS = ("auto", "highest", "high", "medium")


def settings(perf_cfg: Mapping[str, Any] | None, on_gpu: bool) -> dict[str, Any]:
    perf = dict(perf_cfg or {})
    unknown = [k for k in perf if k not in KEYS]
    if unknown:
        raise ConfigError(f"performance.{unknown[0]} is not one of {', '.join(KEYS)}")
    precision = perf.get("float32_matmul_precision") or "auto"
    if precision not in PRECISIONS:
        raise ConfigError(f"performance.float32_matmul_precision={precision!r} is not one of {', '.join(PRECISIONS)}")
    channels_last = perf.get("channels_last", "auto")
    if channels_last not in ("auto", True, False):
        raise ConfigError(f"performance.channels_last={channels_last!r} is not auto, true or false")
    return {"channels_last": on_gpu if channels_last == "auto" else channels_last,
            "compile": bool(perf.get("compile", False)),
            "float32_matmul_precision": ("high" if on_gpu else "highest") if precision == "auto" else precision}


def on_gpu(trainer_cfg: Mapping[str, Any]) -> bool:
    accelerator = str(trainer_cfg.get("accelerator", "cpu"))
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def apply(perf_cfg: Mapping[str, Any] | None, trainer_cfg: Mapping[str, Any], net: nn.Module) -> nn.Module:
    """Set the process-wide matmul precision and prepare `net` in place; returns it."""
    s = settings(perf_cfg, on_gpu(trainer_cfg))
    torch.set_float32_matmul_precision(s["float32_matmul_precision"])
    # A conv net: 4-dim kernels (a population's carry the member as one more dim and convert themselves in `to`).
    if s["channels_last"] and any(p.dim() - getattr(net, "member_dims", 0) == 4 for p in net.parameters()):
        net.to(memory_format=torch.channels_last)  # conv outputs follow the weights' layout
    if s["compile"]:
        net.compile()
    return net
