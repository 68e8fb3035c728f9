"""Speed settings that are not Lightning Trainer arguments: the top-level `performance` node of conf/train.yaml.

    channels_last: auto            NHWC memory layout for conv nets: tensor-core convolutions without transposes
    compile: false                 torch.compile the network (nn.Module.compile: state_dict keys unchanged)
    float32_matmul_precision: auto TF32 (`high`) for the float32 matmuls left outside bf16 autocast (Ampere and later)
    malloc_cache: auto             glibc's malloc keeps freed memory for the next tensor (see keep_freed_memory)

`auto` means on when the trainer runs on a GPU, off on a CPU, where they buy nothing; malloc_cache's `auto` is on
wherever the C library is glibc. (bf16 autocast and cuDNN autotuning are Trainer arguments: `precision: bf16-mixed`,
`benchmark: true` in conf/trainer/gpu.yaml.)
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any, Mapping

import torch
from torch import nn

from reglab.errors import ConfigError

KEYS = ("channels_last", "compile", "float32_matmul_precision", "malloc_cache")
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
    malloc_cache = perf.get("malloc_cache", "auto")
    if malloc_cache not in ("auto", True, False):
        raise ConfigError(f"performance.malloc_cache={malloc_cache!r} is not auto, true or false")
    return {"channels_last": on_gpu if channels_last == "auto" else channels_last,
            "compile": bool(perf.get("compile", False)),
            "float32_matmul_precision": ("high" if on_gpu else "highest") if precision == "auto" else precision,
            "malloc_cache": glibc() is not None if malloc_cache == "auto" else malloc_cache}


@functools.cache
def glibc() -> ctypes.CDLL | None:
    """The process's C library if it is glibc (whose mallopt parameters keep_freed_memory sets), else None. CDLL(None)
    is the process's own symbols: no library search."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 (only glibc has it)
        libc.mallopt  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


# mallopt parameters (glibc's malloc.h) and the largest mmap threshold it accepts on 64-bit (HEAP_MAX_SIZE / 2).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_MAX = 32 << 20


def keep_freed_memory() -> None:
    """By default glibc gives a large block (>= 128 KiB at first, a threshold it then raises by itself) its own mmap,
    and returns such blocks and free memory above 128 KiB at the top of the heap to the kernel on free: a fused
    model's activations (a population's (5, 1000, 256) test batch is 5 MB) then arrive as fresh pages that fault
    one by one, pass after pass. Serving blocks up to 32 MiB from the heap and keeping up to 1 GiB of it cut a
    population's test-pass page faults ~10x and ran its test pass ~1.8x faster (2-core AMD EPYC VM, 2026-12-02;
    docs/benchmarks.md). The memory stays with the process for its next tensors."""
    libc = glibc()
    if libc is None:
        raise ConfigError("performance.malloc_cache=true needs glibc's malloc; this C library is not glibc")
    if not (libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)):
        raise ConfigError("performance.malloc_cache: glibc refused mallopt; set performance.malloc_cache=false")


def on_gpu(trainer_cfg: Mapping[str, Any]) -> bool:
    accelerator = str(trainer_cfg.get("accelerator", "cpu"))
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def apply(perf_cfg: Mapping[str, Any] | None, trainer_cfg: Mapping[str, Any], net: nn.Module) -> nn.Module:
    """Set the process-wide matmul precision and allocator behaviour, and prepare `net` in place; returns it."""
    gpu = on_gpu(trainer_cfg)
    s = settings(perf_cfg, gpu)
    # A conv net: 4-dim kernels (a population's carry the member as one more dim and convert themselves in `to`).
    conv = any(p.dim() - getattr(net, "member_dims", 0) == 4 for p in net.parameters())
    if s["channels_last"] and conv and not gpu:
        # Not only useless there: torch 2.14's CPU backward of a channels_last 1x1 stride-2 convolution with 2
        # channels (ResNet18 width 2's shortcut) corrupts the heap on AVX2 CPUs (seen on AMD EPYC, 2026-12-02).
        raise ConfigError("performance.channels_last=true is for GPU trainers: on a CPU it buys nothing and torch's "
                          "channels_last convolution backward can crash there; use performance.channels_last=auto")
    torch.set_float32_matmul_precision(s["float32_matmul_precision"])
    if s["malloc_cache"]:
        keep_freed_memory()
    if s["channels_last"] and conv:
        net.to(memory_format=torch.channels_last)  # conv outputs follow the weights' layout
    if s["compile"]:
        net.compile()
    return net
