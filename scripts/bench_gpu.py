"""GPU figures for docs/benchmarks.md, in one run on one H100 (no internet, no dataset files): (a) + (b) took 299 s
(docs/gpu/h100_2026-11-26.md); (c) is sized for 1-3 minutes but has not run on a GPU yet.

    python scripts/bench_gpu.py            # on the GPU machine; writes $OUT/bench_gpu.md (default ./bench_gpu_out)
    python scripts/bench_gpu.py --cases c  # only case (c); also --cases a,b (the cases before it)
    python scripts/bench_gpu.py --smoke    # tiny sizes, runs on CPU too: checks the script itself

(a) ResNet18 width 64 on CIFAR-10-shaped synthetic uint8 images resident on the GPU, cifar_standard augmentation
    batched on the device (reglab/data/device_augment.py), bf16 autocast, SGD + Nesterov: training images/s for
    eager, +channels_last, +torch.compile (plain loop: the hardware ceiling), and reglab.train.run with
    conf/trainer/gpu.yaml (the framework's figure). Goal: >= 40,000 img/s.
(b) One epoch of each width of the ResNet18 double-descent sweep (conf/exp/double_descent.yaml's model.width
    values when the file exists, else 12 widths 1..64), 50k images: one after another in one process vs all at
    once as concurrent processes on the same GPU (what launcher.jobs_per_gpu does).
(c) The double-descent population: seconds per epoch (50k train images, batch 128, + the 10k test pass that
    data.test_every_epoch adds) of 5 seeds of ResNet18 at widths 1, 4, 16, 64, bf16, channels_last, Adam lr 1e-4,
    data and per-member cifar_standard on the device, plain loops (no Lightning): the 5 solo members one after
    another (each timed) vs the 5 fused by reglab.population.fuse (channels_last; NCHW, the layout
    train_population runs today; and the whole fused step captured as one CUDA graph) vs the FLOP bound (member
    FLOPs from FlopCounterMode x 5 / a measured dense bf16 matmul's TFLOP/s). From those: GPU-hours of Nakkiran
    et al.'s Figure 1 (12 widths x 5 seeds x 4,000 epochs) on one GPU, by two stated interpolations; goal <= 24.
    Each timing is a few dozen steps after warm-up, scaled to an epoch's 391 steps.
Every case runs under its own try/except and time budget, so one failure still leaves the others' rows.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import reglab  # noqa: F401  (no-network environment first)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WIDTHS = [1, 2, 4, 6, 8, 12, 16, 24, 32, 40, 48, 64]


def device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize()


def resident_data(n: int, dev, side: int = 32, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, side, side), generator=g, dtype=torch.uint8).to(dev)
    y = torch.randint(0, 10, (n,), generator=g).to(dev)
    return x, y


def train_images_per_s(width: int, n: int, batch: int, steps: int, warmup: int, channels_last: bool,
                       compile_: bool, budget_s: float) -> float:
    """Plain loop: uint8 batch on device -> [0,1] -> PadCropFlip -> normalize -> bf16 autocast fwd/bwd -> SGD."""
    import torch
    import torch.nn.functional as F

    from reglab.data.device_augment import PadCropFlip
    from reglab.models import ResNet18

    dev = device()
    x, y = resident_data(n, dev)
    aug = PadCropFlip(4, 0.5, 0.0, seed=0)
    net = ResNet18((3, 32, 32), 10, width=width).to(dev)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    if compile_:
        net.compile()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    mean = torch.tensor([0.49, 0.48, 0.45], device=dev).view(1, 3, 1, 1)
    std = torch.tensor([0.25, 0.24, 0.26], device=dev).view(1, 3, 1, 1)
    use_bf16 = dev.type == "cuda"
    start = time.perf_counter()

    def step(i: int) -> None:
        idx = torch.randint(0, n, (batch,), device=dev)
        xb = (aug(x[idx].float() / 255) - mean) / std
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = F.cross_entropy(net(xb), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for i in range(warmup):
        step(i)
    sync(dev)
    t0, done = time.perf_counter(), 0
    for i in range(steps):
        step(i)
        done += 1
        if i % 20 == 19:
            sync(dev)
            if time.perf_counter() - start > budget_s:
                break
    sync(dev)
    return done * batch / (time.perf_counter() - t0)


def reglab_images_per_s(width: int, n: int, batch: int, epochs: int, smoke: bool) -> float:
    """reglab.train.run with conf/trainer/gpu.yaml (cpu.yaml without a GPU), synthetic data, cifar_standard on the
    device: images/s over the epochs after the first (which includes cuDNN autotuning), from epoch timestamps."""
    import tempfile

    import lightning as L
    from hydra import compose, initialize_config_dir

    from reglab import train

    stamps: list[float] = []

    class Stamp(L.Callback):
        def on_train_epoch_start(self, trainer, module):
            sync(device())
            stamps.append(time.perf_counter())

        def on_train_end(self, trainer, module):
            sync(device())
            stamps.append(time.perf_counter())

    gpu = device().type == "cuda"
    root = tempfile.mkdtemp(prefix="bench-gpu-")
    overrides = [
        f"paths.root={root}", "logger=none", "data=synthetic", f"data.train_samples={n}", "data.test_samples=1000",
        "data.val_fraction=0.0", f"data.batch_size={batch}", "model=resnet18", f"model.width={width}",
        "optim=sgd", f"trainer={'gpu' if gpu else 'cpu'}", f"trainer.max_epochs={epochs}",
        "augmentation=cifar_standard", "+augmentation.device=true", "callbacks.early_stopping=null",
        "callbacks.checkpoint=null",
    ]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    original = train.build_callbacks
    train.build_callbacks = lambda c, d: [*original(c, d), Stamp()]
    try:
        train.run(cfg)
    finally:
        train.build_callbacks = original
        shutil.rmtree(root, ignore_errors=True)
    if len(stamps) < 3:
        raise RuntimeError(f"expected >= 2 epochs of timestamps, got {len(stamps)}")
    steady = stamps[-1] - stamps[1]  # epochs 2.. (validation-free: val_fraction 0, no test_every_epoch)
    return n * (len(stamps) - 2) / steady


def sweep_widths() -> list[int]:
    path = ROOT / "conf" / "exp" / "double_descent.yaml"
    try:
        import yaml

        spec = yaml.safe_load(path.read_text())["hydra"]["sweeper"]["params"]["model.width"]
        return [int(w) for w in str(spec).split(",")]
    except Exception:
        return DEFAULT_WIDTHS


def one_epoch(width: int, n: int, batch: int) -> dict:
    """Child process entry: one epoch of ResNet18 at `width` on n resident images; prints JSON."""
    t_start = time.perf_counter()
    rate = train_images_per_s(width, n, batch, steps=max(n // batch, 1), warmup=3, channels_last=True,
                              compile_=False, budget_s=600)
    return {"width": width, "img_s": rate, "seconds": time.perf_counter() - t_start}


def sweep_case(widths: list[int], n: int, batch: int, timeout: float) -> tuple[float, float, list[dict]]:
    """(sequential seconds, concurrent seconds, per-width results): both wall-clock over the whole sweep, each
    process paying its own start-up, as a real sweep does."""
    cmd = [sys.executable, __file__, "--child", "--n", str(n), "--batch", str(batch)]
    t0 = time.perf_counter()
    seq = []
    for w in widths:
        out = subprocess.run([*cmd, "--width", str(w)], capture_output=True, text=True, timeout=timeout)
        seq.append(json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {"width": w,
                   "error": out.stderr[-300:]})
    t_seq = time.perf_counter() - t0
    t0 = time.perf_counter()
    procs = [subprocess.Popen([*cmd, "--width", str(w)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for w in widths]
    conc = []
    for w, p in zip(widths, procs):
        try:
            out, err = p.communicate(timeout=max(timeout - (time.perf_counter() - t0), 1))
            conc.append(json.loads(out.strip().splitlines()[-1]) if p.returncode == 0 else {"width": w,
                        "error": err[-300:]})
        except subprocess.TimeoutExpired:
            p.kill()
            conc.append({"width": w, "error": "timeout"})
    t_conc = time.perf_counter() - t0
    for s, c in zip(seq, conc):
        s["concurrent_img_s"] = c.get("img_s")
    return t_seq, t_conc, seq


# --- (c) the ResNet18 double-descent population -----------------------------------------------------------------
# Nakkiran et al. 2019, Figure 1: 12 widths x 5 seeds x 4,000 epochs (conf/exp/double_descent.yaml sweeps 20 where
# this list has 24). The estimate below is for this list.
FIG1_WIDTHS = [1, 2, 4, 6, 8, 10, 12, 16, 24, 32, 48, 64]
FIG1_EPOCHS = 4000
GOAL_GPU_HOURS = 24.0


@dataclass(frozen=True)
class PopSpec:
    """Sizes of case (c). GPU: conf/exp/double_descent.yaml's (CIFAR-10: 50,000 train, 10,000 test images, batch
    128, test batch max(128, 1000) = data.eval_batch_size's default); smoke: tiny, for a CPU."""

    widths: tuple[int, ...] = (1, 4, 16, 64)
    members: int = 5
    n_train: int = 50_000
    n_test: int = 10_000
    batch: int = 128
    eval_batch: int = 1000
    side: int = 32
    warmup: int = 5
    steps: int = 40
    matmul_n: int = 8192
    budget_s: float = 20.0  # per timing loop: stops early (after >= 10 steps) past this

    @property
    def train_steps(self) -> int:  # an epoch's steps: TensorLoader keeps the last partial batch (drop_last False)
        return math.ceil(self.n_train / self.batch)

    @property
    def test_batches(self) -> int:
        return math.ceil(self.n_test / self.eval_batch)


SMOKE_SPEC = PopSpec(widths=(1, 2), members=2, n_train=256, n_test=64, batch=16, eval_batch=32, side=16, warmup=1,
                     steps=2, matmul_n=256, budget_s=5.0)


def matmul_tflops(n: int, dev, reps: int = 100) -> float:
    """Dense bf16 (n x n) @ (n x n) throughput in TFLOP/s (2 n^3 FLOPs each): the ceiling the FLOP bound divides by."""
    import torch

    a, b = (torch.randn(n, n, device=dev, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(dev)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def member_flops(width: int, spec: PopSpec) -> float:
    """One solo member's FLOPs per epoch: spec.train_steps training steps (forward + backward at spec.batch) and a
    test pass (forward of spec.test_batches batches of spec.eval_batch), counted by FlopCounterMode on meta tensors
    (shapes only, no compute; convolutions and matmuls, 2 FLOPs per multiply-add; norms and Adam not counted)."""
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from reglab.models import ResNet18

    with torch.device("meta"):
        net = ResNet18((3, spec.side, spec.side), 10, width=width)
        x, y = torch.empty(spec.batch, 3, spec.side, spec.side), torch.zeros(spec.batch, dtype=torch.long)
        xt = torch.empty(spec.eval_batch, 3, spec.side, spec.side)
    with FlopCounterMode(display=False) as train:
        F.cross_entropy(net(x), y).backward()
    net.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as test:
        net(xt)
    return spec.train_steps * train.get_total_flops() + spec.test_batches * test.get_total_flops()


def adam(net, capturable: bool = False):
    """Adam as conf/exp/double_descent.yaml sets it (lr 1e-4, betas (0.9, 0.999), no weight decay), in
    Classifier.configure_optimizers' two parameter groups (matrices and kernels / the rest)."""
    import torch

    from reglab.classifier import build_optimizer
    from reglab.regularization.penalties import is_matrix

    params = list(net.parameters())
    groups = [{"params": [p for p in params if is_matrix(p, net)]},
              {"params": [p for p in params if not is_matrix(p, net)]}]
    if capturable:  # Adam's step count on the device, so a CUDA graph can replay the update
        return torch.optim.Adam(groups, lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0, capturable=True)
    return build_optimizer(groups, "adam", lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0)


def train_batch(x, y, idx, augs, mean, std):
    """idx (B,) or (M, B) into resident uint8 images -> normalized float batch, labels. The data path of
    InMemoryDataModule.normalize / PopulationDataModule.normalize: x / 255, each member's own PadCropFlip on its own
    (B, C, H, W) slice (one call per member, as the population runs them), then (x - mean) / std."""
    import torch

    xb = x[idx].float() / 255
    xb = augs[0](xb) if idx.dim() == 1 else torch.stack([aug(xb[m]) for m, aug in enumerate(augs)])
    return (xb - mean) / std, y[idx]


def make_step(net, opt, dev, graph_safe: bool = False):
    """One training step (bf16 autocast on CUDA): solo logits (B, classes) -> cross-entropy; population logits
    (M, B, classes) -> member_losses(...).sum(), the loss Classifier.training_step backpropagates."""
    import torch
    import torch.nn.functional as F

    from reglab.population import member_losses

    def step(xb, yb, zero_grad: bool = True):
        # Under CUDA-graph capture autocast must not cache its casts (they would outlive the graph's pool).
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda", cache_enabled=not graph_safe):
            logits = net(xb)
            loss = member_losses(logits, yb).sum() if logits.dim() == 3 else F.cross_entropy(logits, yb)
        if zero_grad:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return step


def seconds_per_call(fn, warmup: int, steps: int, dev, budget_s: float) -> float:
    """fn(i) for i < warmup untimed, then mean seconds over up to `steps` calls (>= 10, or all if fewer, before
    `budget_s` cuts it short), synchronized before and after."""
    for i in range(warmup):
        fn(i)
    sync(dev)
    t0, done = time.perf_counter(), 0
    for i in range(warmup, warmup + steps):
        fn(i)
        done += 1
        if done >= 10 and done % 5 == 0 and time.perf_counter() - t0 > budget_s:
            break
    sync(dev)
    return (time.perf_counter() - t0) / done


def test_pass_s(net, xt, yt, spec: PopSpec, mean, std, dev, channels_last: bool) -> float:
    """Seconds of one test pass (spec.test_batches batches of spec.eval_batch, eval mode, bf16): the shared
    (B, C, H, W) test batch every member reads, with its loss and accuracy, as Classifier._step computes them."""
    import torch
    import torch.nn.functional as F

    from reglab.population import member_losses

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net.eval()

    @torch.no_grad()
    def one(i: int):
        b = i % spec.test_batches
        xb = ((xt[b * spec.eval_batch:(b + 1) * spec.eval_batch].float() / 255 - mean) / std).contiguous(
            memory_format=fmt)
        yb = yt[b * spec.eval_batch:(b + 1) * spec.eval_batch]
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            logits = net(xb)
        yb = yb.expand(logits.shape[:-1])
        loss = member_losses(logits, yb) if logits.dim() == 3 else F.cross_entropy(logits, yb)
        return loss, (logits.argmax(-1) == yb).sum(-1)  # the metrics' kernels, as in training

    seconds = spec.test_batches * seconds_per_call(one, 1, spec.test_batches, dev, budget_s=1e9)
    net.train()
    return seconds


def graphed_step(step, opt, xb, yb):
    """PyTorch's whole-network CUDA-graph recipe (torch.cuda.graphs docs): warm up on a side stream (cuDNN
    autotuning, Adam's state), capture forward + backward + Adam once on static input tensors, then each call
    copies the batch in and replays the recorded kernels with one launch. Gradients are None at capture, so the
    graph's backward writes them fresh on every replay (no zero_grad inside the graph)."""
    import torch

    static_x, static_y = xb.clone(), yb.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step(static_x, static_y, zero_grad=True)
    torch.cuda.current_stream().wait_stream(side)
    opt.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step(static_x, static_y, zero_grad=False)

    def replay(xb, yb):
        static_x.copy_(xb)
        static_y.copy_(yb)
        graph.replay()
        return static_loss

    return replay


def members(width: int, spec: PopSpec, dev):
    """spec.members solo ResNet18s at `width`, each built with its own seed as its solo run builds it (on the CPU:
    fuse() and deepcopy take them from there), each member's epoch order (M, N) on `dev`, and its PadCropFlip."""
    import torch

    from reglab.data.device_augment import PadCropFlip
    from reglab.models import ResNet18

    nets = []
    for m in range(spec.members):
        torch.manual_seed(m)
        nets.append(ResNet18((3, spec.side, spec.side), 10, width=width))
    g = torch.Generator().manual_seed(width)
    perm = torch.stack([torch.randperm(spec.n_train, generator=g) for _ in nets]).to(dev)
    return nets, perm, [PadCropFlip(4, 0.5, 0.0, seed=m) for m in range(spec.members)]


def batch_of(i: int, perm, spec: PopSpec):
    """Step i's indices: a full batch of each row of perm, cycling over the epoch's full batches."""
    b = i % (spec.n_train // spec.batch)
    return perm[..., b * spec.batch:(b + 1) * spec.batch]


def population_width(width: int, spec: PopSpec, data, dev) -> dict:
    """Per-epoch seconds (spec.train_steps training steps + one test pass) of spec.members seeds of ResNet18 at
    `width`, eager: solo (each member alone, one after another, each timed), population (fused, channels_last)
    and population NCHW (the layout train_population runs today: performance.apply looks for nn.Conv2d, which a
    population's StackedConv2d is not)."""
    import copy

    import torch

    from reglab.population import fuse

    x, y, xt, yt, mean, std = data
    nets, perm, augs = members(width, spec, dev)
    # channels_last on the GPU only: on a CPU (the smoke run) torch 2.14's channels_last backward of ResNet18's 1x1
    # stride-2 shortcut with 2 channels corrupts the heap (an abort or a segfault; seen on a 2-core AMD EPYC VM,
    # AVX2, 2026-12-02), and it buys nothing there (reglab.performance refuses it on a CPU).
    cl = torch.channels_last if dev.type == "cuda" else torch.contiguous_format
    r: dict = {"width": width, "members": spec.members, "solo_step_s": [], "solo_test_s": []}
    for m, member in enumerate(nets):  # solo: member m alone, its own order and augmentation, one after another
        net = copy.deepcopy(member).to(dev, memory_format=cl)
        step = make_step(net, adam(net), dev)

        def solo(i: int, m=m, step=step) -> None:
            xb, yb = train_batch(x, y, batch_of(i, perm[m], spec), augs[m:m + 1], mean, std)
            step(xb.contiguous(memory_format=cl), yb)

        r["solo_step_s"].append(seconds_per_call(solo, spec.warmup, spec.steps, dev, spec.budget_s))
        r["solo_test_s"].append(test_pass_s(net, xt, yt, spec, mean, std, dev, cl == torch.channels_last))
        del net, step
    r["solo_epoch_s"] = sum(spec.train_steps * s + t for s, t in zip(r["solo_step_s"], r["solo_test_s"]))

    for key, fmt in [("pop", cl), ("pop_nchw", torch.contiguous_format)]:  # the M members fused: one step for all
        pop = fuse(nets).to(dev, memory_format=fmt)
        step = make_step(pop, adam(pop), dev)

        def fused(i: int, step=step) -> None:
            step(*train_batch(x, y, batch_of(i, perm, spec), augs, mean, std))

        r[f"{key}_step_s"] = seconds_per_call(fused, spec.warmup, spec.steps, dev, spec.budget_s)
        r[f"{key}_test_s"] = test_pass_s(pop, xt, yt, spec, mean, std, dev, fmt == torch.channels_last)
        r[f"{key}_epoch_s"] = spec.train_steps * r[f"{key}_step_s"] + r[f"{key}_test_s"]
        del pop, step
    return r


def graphed_width(width: int, spec: PopSpec, data, dev, test_s: float) -> dict:
    """The fused channels_last step of population_width captured whole (forward, backward, Adam) as one CUDA
    graph and replayed; data preparation stays eager, the test pass is the eager one (`test_s`). Checks that the
    replays train (the head's weights move, the loss is finite)."""
    import torch

    from reglab.population import fuse

    x, y, _, _, mean, std = data
    nets, perm, augs = members(width, spec, dev)
    pop = fuse(nets).to(dev, memory_format=torch.channels_last)
    opt = adam(pop, capturable=True)
    replay = graphed_step(make_step(pop, opt, dev, graph_safe=True), opt,
                          *train_batch(x, y, batch_of(0, perm, spec), augs, mean, std))
    before = pop.head.weight.detach().clone()
    step_s = seconds_per_call(lambda i: replay(*train_batch(x, y, batch_of(i, perm, spec), augs, mean, std)),
                              spec.warmup, spec.steps, dev, spec.budget_s)
    loss = replay(*train_batch(x, y, batch_of(0, perm, spec), augs, mean, std))
    if not torch.isfinite(loss).item() or torch.equal(before, pop.head.weight.detach()):
        raise RuntimeError(f"width {width}: the CUDA-graph replays left the weights unchanged or the loss not finite")
    return {"graph_step_s": step_s, "graph_epoch_s": spec.train_steps * step_s + test_s}


def loglog(points: dict[int, float], width: int) -> float:
    """Seconds at `width` from measured {width: seconds}: piecewise linear in (log width, log seconds) between
    neighbouring measured widths; outside them the end segment is extended (a power law)."""
    ws = sorted(points)
    if width in points or len(ws) == 1:
        return points.get(width, points[ws[0]])
    k = next((i for i, w in enumerate(ws) if w > width), len(ws) - 1)  # the first measured width above, or the last
    lo, hi = ws[max(k - 1, 0)], ws[max(k, 1)]
    frac = (math.log(width) - math.log(lo)) / (math.log(hi) - math.log(lo))
    return math.exp(math.log(points[lo]) + frac * (math.log(points[hi]) - math.log(points[lo])))


def floor_or_flops(points: dict[int, float], flops: dict[int, float], width: int) -> float:
    """max(launch-bound floor, FLOP-proportional): the floor is the fastest measured per-epoch time, the
    FLOP-proportional time scales the widest measured width's time by the member FLOPs ratio (FlopCounterMode)."""
    top = max(points)
    return max(min(points.values()), points[top] * flops[width] / flops[top])


VARIANTS = [("solo", "solo"), ("pop", "population"), ("pop_nchw", "population NCHW"),
            ("graph", "population + CUDA graph")]


def population_case(case, spec: PopSpec, dev, out_dir: Path, smoke: bool) -> None:
    """Case (c): rows for the matmul ceiling, each measured width, and the Figure 1 estimate (two interpolations);
    raw figures in out_dir/population_widths.json."""
    import torch

    M = spec.members
    fig: dict = {"spec": asdict(spec), "widths": {}, "estimate": {}}
    benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True  # conf/trainer/gpu.yaml: benchmark: true
    try:
        case(f"(c) dense bf16 matmul {spec.matmul_n}^3 (the FLOP bound's ceiling)",
             lambda: f"{fig.setdefault('tflops', matmul_tflops(spec.matmul_n, dev)):,.1f} TFLOP/s")
        flops: dict[int, float] = {}
        data: list = []

        def setup() -> str:
            x, y = resident_data(spec.n_train, dev, spec.side)
            xt, yt = resident_data(spec.n_test, dev, spec.side, seed=1)
            mean = torch.tensor([0.49, 0.48, 0.45], device=dev).view(1, 3, 1, 1)
            std = torch.tensor([0.25, 0.24, 0.26], device=dev).view(1, 3, 1, 1)
            data.extend([x, y, xt, yt, mean, std])
            flops.update({w: member_flops(w, spec) for w in sorted(set(FIG1_WIDTHS) | set(spec.widths))})
            fig["member_flops_per_epoch"] = flops
            return ", ".join(f"w{w} {f / 1e12:.3g}" for w, f in flops.items())

        case(f"(c) one member's TFLOP per epoch ({spec.train_steps} steps fwd+bwd + test pass fwd; FlopCounterMode "
             "on meta tensors)", setup)

        def one_width(w: int) -> str:
            if not data:
                raise RuntimeError("the setup row failed")
            r = population_width(w, spec, data, dev)
            if "tflops" in fig:
                r["flop_bound_epoch_s"] = M * flops[w] / (fig["tflops"] * 1e12)
            fig["widths"][w] = r
            solo = r["solo_epoch_s"]
            parts = [f"solo ({M} one after another) {solo:.2f} s ({1e3 * sum(r['solo_step_s']) / M:.1f} ms/step)"]
            for key, name in VARIANTS[1:3]:
                parts.append(f"{name} {r[f'{key}_epoch_s']:.2f} s ({1e3 * r[f'{key}_step_s']:.1f} ms/step, "
                             f"{solo / r[f'{key}_epoch_s']:.1f}x solo)")
            if "flop_bound_epoch_s" in r:
                parts.append(f"FLOP bound {r['flop_bound_epoch_s']:.3g} s ({M} x {flops[w] / 1e12:.3g} TFLOP)")
            return "; ".join(parts)

        for w in spec.widths:
            case(f"(c) ResNet18 w{w}, {M} seeds: seconds per epoch ({spec.n_train:,} train images, batch "
                 f"{spec.batch}, + test pass {spec.n_test:,}), bf16, Adam, on-device data + per-member aug",
                 lambda w=w: one_width(w), "population < solo")

        def one_graph(w: int) -> str:
            r = fig["widths"].get(w)
            if r is None:
                raise RuntimeError(f"width {w}'s eager row failed")
            r.update(graphed_width(w, spec, data, dev, r["pop_test_s"]))
            return (f"population + CUDA graph {r['graph_epoch_s']:.2f} s ({1e3 * r['graph_step_s']:.1f} ms/step, "
                    f"{r['solo_epoch_s'] / r['graph_epoch_s']:.1f}x solo, {r['pop_epoch_s'] / r['graph_epoch_s']:.1f}x "
                    "eager population)")

        # After every eager row: a capture that fails cannot cost them.
        for w in spec.widths if dev.type == "cuda" else []:
            case(f"(c) ResNet18 w{w}, {M} seeds fused, whole step (fwd, bwd, Adam capturable) as one CUDA graph: "
                 "seconds per epoch (test pass eager)", lambda w=w: one_graph(w), "population < solo")

        measured = sorted(fig["widths"])
        title = (f"(c) Nakkiran Fig. 1 on one GPU{' [smoke sizes: not a figure]' if smoke else ''}: "
                 f"{len(FIG1_WIDTHS)} widths {FIG1_WIDTHS} x {M} seeds x {FIG1_EPOCHS:,} epochs, per-epoch time ")
        for method, how in [("loglog", f"log-log interpolated in width between measured widths {measured}"),
                            ("floor_flops", "max(fastest measured epoch, widest measured x member FLOPs ratio)")]:

            def estimate(method=method) -> str:
                if not measured:
                    raise RuntimeError("no width was measured")
                hours = {}
                for key, name in VARIANTS:
                    points = {w: fig["widths"][w][f"{key}_epoch_s"] for w in measured
                              if f"{key}_epoch_s" in fig["widths"][w]}
                    if len(points) == len(measured):
                        t = [loglog(points, w) if method == "loglog" else floor_or_flops(points, flops, w)
                             for w in FIG1_WIDTHS]
                        hours[name] = FIG1_EPOCHS * sum(t) / 3600
                if "tflops" in fig:  # counted at every width: no interpolation
                    hours["FLOP bound"] = FIG1_EPOCHS * M * sum(flops[w] for w in FIG1_WIDTHS) / (
                        fig["tflops"] * 1e12) / 3600
                fig["estimate"][method] = hours
                verdict = ", ".join(f"{k} {'yes' if v <= GOAL_GPU_HOURS else 'no'}" for k, v in hours.items())
                return ("; ".join(f"{k} {v:,.1f} GPU-h" for k, v in hours.items())
                        + f". <= {GOAL_GPU_HOURS:g} GPU-h: {verdict}")  # no '|': the row is a markdown cell

            case(title + how, estimate, f"<= {GOAL_GPU_HOURS:g} GPU-h")
    finally:
        torch.backends.cudnn.benchmark = benchmark
        (out_dir / "population_widths.json").write_text(json.dumps(fig, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes; runs on CPU (checks the script)")
    p.add_argument("--cases", default="a,b,c", help="which cases to run, comma-separated (default: a,b,c)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--width", type=int, default=64, help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=50_000, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=512, help=argparse.SUPPRESS)
    args = p.parse_args()
    cases = set(args.cases.split(","))
    if not cases or not cases <= {"a", "b", "c"}:
        p.error(f"--cases takes a comma-separated subset of a,b,c, got {args.cases!r}")
    if args.child:
        print(json.dumps(one_epoch(args.width, args.n, args.batch)))
        return

    import torch

    out_dir = Path(os.environ.get("OUT", "./bench_gpu_out"))
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = device()
    card = torch.cuda.get_device_name(0) if dev.type == "cuda" else "CPU (no CUDA)"
    smoke = args.smoke
    n = 512 if smoke else 50_000
    steps = 2 if smoke else 300
    width = 8 if smoke else 64
    rows: list[str] = []
    started = time.perf_counter()

    def case(label: str, fn, goal: str = "") -> None:
        t0 = time.perf_counter()
        try:
            value = fn()
            rows.append(f"| {label} | {value} | {goal} | {time.perf_counter() - t0:.0f} s |")
        except Exception as e:  # one failed case must not cost the others
            rows.append(f"| {label} | failed: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
                        f" | {goal} | {time.perf_counter() - t0:.0f} s |")
            traceback.print_exc()
        print(rows[-1], flush=True)

    if "a" in cases:
        goal = ">= 40,000 img/s"
        for batch in ([64] if smoke else [512]):
            for cl, comp, label in [(False, False, "eager"), (True, False, "eager + channels_last"),
                                    (True, True, "channels_last + torch.compile")]:
                if comp and smoke:
                    continue
                case(f"(a) ResNet18 w{width}, batch {batch}, bf16, on-device aug, plain loop: {label}",
                     lambda cl=cl, comp=comp, b=batch: f"{train_images_per_s(width, n, b, steps, 15 if comp else 5, cl, comp, budget_s=60):,.0f} img/s",
                     goal)
        case(f"(a) ResNet18 w{width}, batch 512, reglab.train.run (trainer=gpu, augmentation=cifar_standard on device)",
             lambda: f"{reglab_images_per_s(width, n, 64 if smoke else 512, 2 if smoke else 3, smoke):,.0f} img/s", goal)

    if "b" in cases:
        widths = [1, 2] if smoke else sweep_widths()
        sweep_n = 128 if smoke else 50_000

        def sweep() -> str:
            t_seq, t_conc, per = sweep_case(widths, sweep_n, 64 if smoke else 512, timeout=60 if smoke else 150)
            (out_dir / "sweep_widths.json").write_text(json.dumps(per, indent=1))
            failed = [r["width"] for r in per if "error" in r]
            return (f"one after another {t_seq:.1f} s, all {len(widths)} concurrent {t_conc:.1f} s "
                    f"(ratio {t_conc / t_seq:.2f}){'; failed widths ' + str(failed) if failed else ''}")

        case(f"(b) one epoch ({sweep_n:,} images) of each of {len(widths)} ResNet18 widths {widths}, bf16 + "
             "channels_last, separate processes", sweep, "concurrent < one after another")

    if "c" in cases:
        population_case(case, SMOKE_SPEC if smoke else PopSpec(), dev, out_dir, smoke)

    flags = (" --smoke" if smoke else "") + ("" if cases == {"a", "b", "c"} else f" --cases {args.cases}")
    head = (f"GPU figures: `python scripts/bench_gpu.py{flags}`, "
            f"{datetime.datetime.now().isoformat(timespec='minutes')}, {card}, torch {torch.__version__}, "
            f"{time.perf_counter() - started:.0f} s in all.\n\n| case | result | goal | time |\n|---|---|---|---|")
    md = head + "\n" + "\n".join(rows) + "\n"
    (out_dir / "bench_gpu.md").write_text(md)
    print("\n" + md)
    print(f"written to {out_dir / 'bench_gpu.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
