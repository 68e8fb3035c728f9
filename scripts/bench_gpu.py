"""GPU figures for docs/benchmarks.md, in one run of under 4 minutes on one H100 (no internet, no dataset files).

    python scripts/bench_gpu.py            # on the GPU machine; writes $OUT/bench_gpu.md (default ./bench_gpu_out)
    python scripts/bench_gpu.py --smoke    # tiny sizes, runs on CPU too: checks the script itself

(a) ResNet18 width 64 on CIFAR-10-shaped synthetic uint8 images resident on the GPU, cifar_standard augmentation
    batched on the device (reglab/data/device_augment.py), bf16 autocast, SGD + Nesterov: training images/s for
    eager, +channels_last, +torch.compile (plain loop: the hardware ceiling), and reglab.train.run with
    conf/trainer/gpu.yaml (the framework's figure). Goal: >= 40,000 img/s.
(b) One epoch of each width of the ResNet18 double-descent sweep (conf/exp/double_descent.yaml's model.width
    values when the file exists, else 12 widths 1..64), 50k images: one after another in one process vs all at
    once as concurrent processes on the same GPU (what launcher.jobs_per_gpu does).
Every case runs under its own try/except and time budget, so one failure still leaves the others' rows.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
import traceback
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


def resident_data(n: int, dev):
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8).to(dev)
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes; runs on CPU (checks the script)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--width", type=int, default=64, help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=50_000, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=512, help=argparse.SUPPRESS)
    args = p.parse_args()
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

    head = (f"GPU figures: `python scripts/bench_gpu.py{' --smoke' if smoke else ''}`, "
            f"{datetime.datetime.now().isoformat(timespec='minutes')}, {card}, torch {torch.__version__}, "
            f"{time.perf_counter() - started:.0f} s in all.\n\n| case | result | goal | time |\n|---|---|---|---|")
    md = head + "\n" + "\n".join(rows) + "\n"
    (out_dir / "bench_gpu.md").write_text(md)
    print("\n" + md)
    print(f"written to {out_dir / 'bench_gpu.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
