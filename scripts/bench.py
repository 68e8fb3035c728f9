"""`make bench`: what reglab costs over plain PyTorch, measured side by side in one process.

    python scripts/bench.py [--repeats 5] [--threads 1] [--cases step,study,study_full,population,data] [--out FILE]

Cases (each repeat runs every variant of a case once, in alternating order, so load from other processes hits
them alike; the table gives medians over the repeats and the min-max spread):
1. step overhead: `reglab.train.run(cfg)` as a user runs it (Classifier, MLflow logging on into a temporary SQLite
   store, checkpoint callback on) against a plain PyTorch loop over preloaded tensors doing the same work (same
   model, seed, batches, Adam, epochs, a validation pass per epoch and a final test pass). Ratio = plain time /
   reglab time (reglab's throughput relative to plain PyTorch; 1.0 = no overhead). Models: the MLP
   64-512-512-10 on sklearn digits; ResNet18 at width 16 on synthetic CIFAR-shaped (3x32x32 uint8) tensors.
2. study time: the MNIST-1D double-descent sweep as `make run` runs it (populations: members share steps), at 2
   epochs (start-up) and whole (500 epochs), against a plain script training the same members one after another
   in 2 processes. Ratio = reglab time / plain time. And one of its 2 population jobs per epoch, against the same
   fused model trained by hand (where a population job's time goes: the fused arithmetic, or reglab around it) and
   against reglab training the same members one job each (what a population saves per member).
3. data path: images/s of the cifar_standard augmentation through Albumentations (per image, CPU) and through the
   batched PadCropFlip (reglab/data/device_augment.py) on 32x32x3 batches of 512.
Writes the table with machine, date and versions between the markers of --out (default docs/benchmarks.md, only
when every case ran: a subset would drop the other rows). The runs' temporary stores are removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import io
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import reglab  # noqa: F401  (no-network environment before Lightning, MLflow and albumentations load)

ROOT = Path(__file__).resolve().parents[1]
CASES = ("step", "study", "study_full", "population", "data")  # --cases; all of them: make bench
CONF = ROOT / "conf"


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=overrides)


@contextlib.contextmanager
def quiet():
    """Lightning and MLflow print per run; the bench prints only its table."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@dataclass
class Case:
    name: str
    variants: dict[str, Callable[[], float]]  # variant -> one timed repeat (seconds)
    ratio: Callable[[dict[str, float]], float]  # medians -> the case's ratio
    ratio_name: str
    goal: str
    met: Callable[[float], bool]
    times: dict[str, list[float]] = field(default_factory=dict)
    note: str = ""
    warmup: bool = True  # False for variants that start a fresh process each time
    also: tuple[str, Callable[[dict[str, float]], float]] | None = None  # a second ratio: (its name, medians -> it)


# --- case 1: step overhead ------------------------------------------------------------------------------------
def plain_loop(cfg) -> float:
    """What a researcher would write by hand: tensors normalized once, a shuffled index per epoch, Adam, a
    validation pass per epoch and a test pass at the end. Returns seconds from model creation to the test loss."""
    import torch
    import torch.nn.functional as F
    from hydra.utils import instantiate

    dm = instantiate(cfg.data, seed=cfg.seed)
    dm.setup()
    xs = {k: dm.normalize(getattr(dm, f"{k}_x")) for k in ("train", "val", "test")}
    ys = {k: getattr(dm, f"{k}_y") for k in ("train", "val", "test")}
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    net = instantiate(cfg.model, input_shape=dm.input_shape, num_classes=dm.num_classes)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.optim.lr)
    bs, n = cfg.data.batch_size, len(ys["train"])

    def evaluate(split: str) -> float:
        net.eval()
        with torch.no_grad():
            correct = loss = 0.0
            for i in range(0, len(ys[split]), 1000):
                logits = net(xs[split][i:i + 1000])
                loss += F.cross_entropy(logits, ys[split][i:i + 1000], reduction="sum").item()
                correct += (logits.argmax(1) == ys[split][i:i + 1000]).sum().item()
        net.train()
        return loss / len(ys[split])

    for epoch in range(cfg.trainer.max_epochs):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(epoch))
        for i in range(0, n, bs):
            idx = perm[i:i + bs]
            loss = F.cross_entropy(net(xs["train"][idx]), ys["train"][idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        evaluate("val")
    evaluate("test")
    return time.perf_counter() - t0


def reglab_run(cfg) -> float:
    from reglab.train import run

    t0 = time.perf_counter()
    with quiet():
        run(cfg)
    return time.perf_counter() - t0


def step_case(name: str, overrides: list[str], store: Path, goal: float, note: str) -> Case:
    common = [f"paths.root={store}", "callbacks.early_stopping=null", *overrides]
    cfg_reglab = compose([*common, f"logger.tracking_uri=sqlite:///{store}/mlruns/mlflow.db",
                          "logger.experiment=bench"])
    cfg_plain = compose([*common, "logger=none"])
    return Case(
        name, {"reglab": lambda: reglab_run(cfg_reglab), "plain": lambda: plain_loop(cfg_plain)},
        ratio=lambda m: m["plain"] / m["reglab"], ratio_name="plain / reglab time", goal=f">= {goal:.2f}",
        met=lambda r: r >= goal, note=note,
    )


# --- case 2: study time -------------------------------------------------------------------------------------
STUDY = "double_descent_mnist1d"


def study_cli(store: Path, epochs: int, population: str, smoke: bool) -> float:
    """The study as `make run` runs it (scripts/train.py +exp=..., Hydra multirun, 2 jobs), in a fresh store, with
    population.mode=auto (members share steps: 2 population jobs) or off (one job per member)."""
    root = Path(tempfile.mkdtemp(dir=store))
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), f"+exp={STUDY}", f"trainer.max_epochs={epochs}",
           f"paths.root={root}", f"hydra.sweep.dir={root}/multirun", f"population.mode={population}"]
    cmd += ["model.width=2,8", "seed=0,1", "data.train_samples=400", "data.test_samples=200"] if smoke else \
        [f"model.width={','.join(map(str, make_run_widths()))}"]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    return time.perf_counter() - t0


def make_run_widths() -> list[int]:
    """The widths `make run` trains (DD_WIDTHS in the Makefile), else the preset's whole grid."""
    import re

    found = re.search(r"^DD_WIDTHS \?= *([0-9,]+)", (ROOT / "Makefile").read_text(), re.M)
    if found:
        return [int(w) for w in found.group(1).split(",")]
    return [int(w) for w in str(preset_sweep()["model.width"]).split(",")]


def preset_sweep() -> dict:
    import yaml

    return yaml.safe_load((CONF / "exp" / f"{STUDY}.yaml").read_text())["hydra"]["sweeper"]["params"]


def study_jobs(smoke: bool) -> list[list[tuple[int, int]]]:
    """The (width, seed) members of the study's 2 jobs, balanced as the population sweeper balances them."""
    from omegaconf import OmegaConf

    from reglab.population.sweeper import cost, split

    widths = [2, 8] if smoke else make_run_widths()
    seeds = [0, 1] if smoke else [int(v) for v in str(preset_sweep()["seed"]).split(",")]
    depth = compose([f"+exp={STUDY}", "logger=none"]).model.depth
    members = [(w, s) for w in widths for s in seeds]
    costs = [cost(OmegaConf.create({"model": {"width": w, "depth": depth}})) for w, _ in members]
    return [[members[i] for i in part] for part in split(list(range(len(members))), costs,
                                                         [w for w, _ in members], 2)]


def study_plain(epochs: int, smoke: bool) -> float:
    """A plain script doing the study's work without reglab: every member (width x seed) its own MLP, initialized
    from its seed, its own noisy labels and batch order, SGD with momentum, the test error after every epoch, one
    member after another; the widths split between 2 processes of 1 thread each, as the study's 2 jobs are
    (balanced the same way). Timed from the processes' start (python and torch imports included) to the last end."""
    cfg = compose([f"+exp={STUDY}", "logger=none"])
    data = {k: v for k, v in cfg.data.items() if k != "_target_"}
    if smoke:
        data.update(train_samples=400, test_samples=200)
    scripts = []
    for part in study_jobs(smoke):
        scripts.append(f"""
import torch, torch.nn.functional as F
from reglab.data import MNIST1DDataModule
from reglab.models import MLP
torch.set_num_threads(1)
for width, seed in {part!r}:
    dm = MNIST1DDataModule(**{data!r}, seed=seed); dm.setup()
    x, y, xt, yt = dm.train_x, dm.train_y, dm.test_x, dm.test_y
    torch.manual_seed(seed)
    net = MLP((40,), 10, width, {cfg.model.depth})
    opt = torch.optim.SGD(net.parameters(), lr={cfg.optim.lr}, momentum={cfg.optim.momentum})
    for epoch in range({epochs}):
        perm = torch.randperm(len(y))
        for i in range(0, len(y), {cfg.data.batch_size}):
            idx = perm[i:i + {cfg.data.batch_size}]
            loss = F.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad(); loss.backward(); opt.step()
        with torch.no_grad():
            test_err = sum((net(xt[i:i + 1000]).argmax(1) != yt[i:i + 1000]).sum().item()
                           for i in range(0, len(yt), 1000)) / len(yt)
""")
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", sc], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=ROOT) for sc in scripts]
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"plain study script failed:\n{err[-2000:]}")
    return time.perf_counter() - t0


def study_case(store: Path, smoke: bool) -> Case | None:
    epochs = 1 if smoke else 2
    return Case(
        f"study, start-up: {STUDY}, {2 if smoke else len(make_run_widths())} widths x 5 seeds x {epochs} epochs "
        f"(make run's command with trainer.max_epochs={epochs})",
        {"reglab population.mode=auto": lambda: study_cli(store, epochs, "auto", smoke),
         "reglab population.mode=off": lambda: study_cli(store, epochs, "off", smoke),
         "plain": lambda: study_plain(epochs, smoke)},
        ratio=lambda m: m["reglab population.mode=auto"] / m["plain"],
        ratio_name="reglab (populations) / plain time", goal="<= 0.50", met=lambda r: r <= 0.5,
        note="each variant is fresh processes (start-up, imports, MLflow store creation included); the plain "
             "script logs nothing. At 2 of the study's 500 epochs start-up dominates; the next row is the real "
             "study. population.mode=off is the same study with one job per member (the old way)",
        warmup=False,
    )


def study_full_case(store: Path, smoke: bool) -> Case:
    epochs = 2 if smoke else 500
    return Case(
        f"study, whole: `make run` ({len(make_run_widths())} widths x 5 seeds x {epochs} epochs, 2 population jobs)",
        {"reglab population.mode=auto": lambda: study_cli(store, epochs, "auto", smoke),
         "plain": lambda: study_plain(epochs, smoke)},
        ratio=lambda m: m["reglab population.mode=auto"] / m["plain"],
        ratio_name="reglab (populations) / plain time", goal="<= 0.50 and <= 6.5 min",
        met=lambda r: r <= 0.5,
        note="one repeat (the two variants take 10-30 min together on a 2-core VM); the plain script is the same work "
             "as above",
        warmup=False,
    )


def population_part(smoke: bool) -> tuple[list[int], list[int]]:
    """(widths, seeds) of make run's first population job."""
    part = study_jobs(smoke)[0]
    return sorted({w for w, _ in part}, reverse=True), sorted({s for _, s in part})


def population_cli(store: Path, widths: list[int], seeds: list[int], epochs: int, smoke: bool,
                   mode: str = "auto") -> float:
    """One population job as the study runs it (one process, one thread), from start-up to its report; with
    mode="off" the same members as one job each, one after another in the same process."""
    root = Path(tempfile.mkdtemp(dir=store))
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), f"+exp={STUDY}", "hydra/launcher=basic",
           "population.jobs=1", f"population.mode={mode}", "launcher.cpu_threads=1", f"trainer.max_epochs={epochs}",
           f"model.width={','.join(map(str, widths))}", f"seed={','.join(map(str, seeds))}", f"paths.root={root}",
           f"hydra.sweep.dir={root}/multirun"] + (["data.train_samples=400", "data.test_samples=200"] if smoke else [])
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    return time.perf_counter() - t0


def population_plain(widths: list[int], seeds: list[int], epochs: int, smoke: bool) -> float:
    """The same members fused by hand: reglab.population's model (MLP width groups, stacked seeds), SGD as reglab
    builds it, each member's own batch order and noisy labels, the training loss and errors summed per epoch, a test
    pass (loss and errors per member) per epoch; no Lightning, no MLflow. Seconds per epoch, after one warm-up
    epoch. With the preset's `performance` settings applied as reglab's population job applies them (malloc_cache
    keeps glibc's freed memory), so the row compares what each does around the same fused arithmetic."""
    import torch

    from reglab import performance
    from reglab.classifier import build_optimizer
    from reglab.data import MNIST1DDataModule
    from reglab.models import MLP
    from reglab.population import fuse, member_losses

    cfg = compose([f"+exp={STUDY}", "logger=none"])
    data = {k: v for k, v in cfg.data.items() if k != "_target_"}
    if smoke:
        data.update(train_samples=400, test_samples=200)
    dms, nets = {}, []
    for w in widths:
        for s in seeds:
            if s not in dms:
                dms[s] = MNIST1DDataModule(**data, seed=s)
                dms[s].setup()
            torch.manual_seed(s)
            nets.append(MLP((40,), 10, w, cfg.model.depth))
    net = performance.apply(cfg.get("performance"), cfg.trainer, fuse(nets))  # as the population job applies it
    x = torch.stack([dms[s].train_x for _ in widths for s in seeds]).float()
    y = torch.stack([dms[s].train_y for _ in widths for s in seeds])
    xt, yt = dms[seeds[0]].test_x.float(), dms[seeds[0]].test_y
    M, N = y.shape
    opt = build_optimizer(net.parameters(), "sgd", lr=cfg.optim.lr, momentum=cfg.optim.momentum)  # as reglab's
    gens = [torch.Generator().manual_seed(i) for i in range(M)]
    bs = cfg.data.batch_size

    def epoch() -> None:
        net.train()
        idx = torch.stack([torch.randperm(N, generator=g) for g in gens]) + N * torch.arange(M)[:, None]
        loss_sum, wrong = torch.zeros(M), torch.zeros(M)
        for b in range(0, N, bs):
            i = idx[:, b:b + bs].flatten()
            xb, yb = x.flatten(0, 1).index_select(0, i).view(M, -1, 40), y.flatten().index_select(0, i).view(M, -1)
            logits = net(xb)
            losses = member_losses(logits, yb)
            opt.zero_grad()
            losses.sum().backward()
            opt.step()
            loss_sum += losses.detach()
            wrong += (logits.detach().max(-1).indices != yb).sum(1)
        net.eval()
        with torch.no_grad():
            for b in range(0, len(yt), 1000):
                logits = net(xt[b:b + 1000])
                loss_sum += member_losses(logits, yt[b:b + 1000].expand(M, -1))
                wrong += (logits.max(-1).indices != yt[b:b + 1000]).sum(1)

    epoch()
    t0 = time.perf_counter()
    for _ in range(epochs):
        epoch()
    return (time.perf_counter() - t0) / epochs


SOLO = "reglab solo (one job per member)"


def population_case(store: Path, smoke: bool) -> Case:
    widths, seeds = population_part(smoke)
    e1, e2 = (1, 3) if smoke else (2, 22)

    def reglab_epoch(seeds: list[int] = seeds, mode: str = "auto") -> float:
        # The difference of two whole runs: start-up, each member's setup and the report cancel.
        return (population_cli(store, widths, seeds, e2, smoke, mode) -
                population_cli(store, widths, seeds, e1, smoke, mode)) / (e2 - e1)

    def solo_epoch() -> float:
        # Seed 0 of each width alone: the seeds of one width cost alike, so x len(seeds) is all members' epoch.
        return reglab_epoch(seeds[:1], "off") * len(seeds)

    return Case(
        f"population job, per epoch: make run's first job ({len(widths)} widths {widths[0]}-{widths[-1]} x "
        f"{len(seeds)} seeds = {len(widths) * len(seeds)} members)",
        {"reglab": reglab_epoch, "fused plain loop": lambda: population_plain(widths, seeds, 2 if smoke else 10,
                                                                              smoke),
         SOLO: solo_epoch},
        ratio=lambda m: m["fused plain loop"] / m["reglab"], ratio_name="plain / reglab time per epoch",
        also=("reglab population / solo time per member and epoch", lambda m: m["reglab"] / m[SOLO]),
        goal="(no goal)", met=lambda r: True,
        note=f"where a population job's time goes: reglab = (a whole run of {e2} epochs - one of {e1}) / {e2 - e1}, "
             "one process, one thread, MLflow logging and checkpoints on; the fused plain loop trains the same "
             "fused model by hand (per-member batches, SGD, a test pass with loss and errors per epoch); reglab solo "
             "= the same command with population.mode=off (each member its own job, one after another in one "
             "process), for seed 0 of each width, times the seeds (a width's seeds cost alike)",
        warmup=False,
    )


# --- case 3: data path ----------------------------------------------------------------------------------------
def data_case(batches: int) -> Case:
    import torch
    import yaml

    from reglab.data.augmentation import BatchAugment
    from reglab.data.device_augment import from_specs

    specs = yaml.safe_load((CONF / "augmentation" / "cifar_standard.yaml").read_text())["transforms"]
    x = torch.randint(0, 256, (512, 3, 32, 32), dtype=torch.uint8)
    albu = BatchAugment(specs, image_hw=(32, 32), scale=255.0, seed=0)
    fast = from_specs(specs, (32, 32), torch.uint8, seed=0)

    def per_image(fn) -> Callable[[], float]:
        def timed() -> float:
            t0 = time.perf_counter()
            for _ in range(batches):
                fn(x)
            return (time.perf_counter() - t0) / (batches * len(x))  # seconds per image
        return timed

    return Case(
        "data: cifar_standard on 3x32x32, batches of 512 (CPU)",
        {"albumentations": per_image(albu), "batched": per_image(lambda b: fast(b.float() / 255))},
        ratio=lambda m: m["albumentations"] / m["batched"], ratio_name="batched / Albumentations img/s",
        goal="(no goal)", met=lambda r: True,
        note="img/s = 1 / the times below; the batched path includes the uint8 -> float conversion",
    )


# --- driver ---------------------------------------------------------------------------------------------------
def measure(case: Case, repeats: int) -> None:
    names = list(case.variants)
    for name in names if case.warmup else []:  # warm-up: imports, lazy init, the SQLite store's first write
        case.variants[name]()
    case.times = {n: [] for n in names}
    for r in range(repeats):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            case.times[name].append(case.variants[name]())
        print(f"  {case.name} repeat {r + 1}/{repeats}: " +
              ", ".join(f"{n} {case.times[n][-1]:.3g}" for n in names), file=sys.stderr)


def fmt_times(ts: list[float], per_image: bool) -> str:
    if per_image:
        return f"{1 / statistics.median(ts):,.0f} img/s ({1 / max(ts):,.0f}-{1 / min(ts):,.0f})"
    return f"{statistics.median(ts):.2f} s ({min(ts):.2f}-{max(ts):.2f})"


def table(cases: list[Case]) -> str:
    rows = ["| case | variant: median (min-max) | ratio | goal | met |", "|---|---|---|---|---|"]
    for c in cases:
        med = {n: statistics.median(t) for n, t in c.times.items()}
        repeats = [{n: t[i] for n, t in c.times.items()} for i in range(len(next(iter(c.times.values()))))]

        def cell(name: str, f: Callable[[dict[str, float]], float]) -> str:  # ratio of the medians, per-repeat range
            paired = [f(m) for m in repeats]
            return f"**{f(med):.2f}** {name} (per repeat {min(paired):.2f}-{max(paired):.2f})"

        r = c.ratio(med)
        per_image = c.name.startswith("data")
        variants = "<br>".join(f"{n}: {fmt_times(t, per_image)}" for n, t in c.times.items())
        goal_met = "yes" if c.met(r) else "**no**"
        if c.goal == "(no goal)":
            goal_met = "-"
        ratios = "<br>".join(cell(*x) for x in [(c.ratio_name, c.ratio)] + ([c.also] if c.also else []))
        rows.append(f"| {c.name} | {variants} | {ratios} | {c.goal} | {goal_met} |")
    notes = [f"- {c.name}: {c.note}" for c in cases if c.note]
    return "\n".join(rows + [""] + notes)


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    versions = ", ".join(f"{p} {importlib.metadata.version(p)}" for p in
                         ("torch", "lightning", "mlflow", "albumentations", "hydra-core"))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip() or "unknown"
    return (f"{cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, load average at start "
            f"{load:.1f}; Python {platform.python_version()}; {versions}; git {commit}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads for every variant (1: stable timings on a shared 2-core machine)")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of: {', '.join(CASES)}")
    p.add_argument("--study-repeats", type=int, default=3)
    p.add_argument("--out", default=None,
                   help="the markdown file whose bench section the table replaces (default: docs/benchmarks.md, "
                        "written only when every case ran: a subset would drop the other rows)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, 2 repeats, nothing written (a quick check)")
    args = p.parse_args()
    wanted = args.cases.split(",")
    unknown = [c for c in wanted if c not in CASES]
    if unknown:
        p.error(f"--cases: unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    for name in ("repeats", "threads", "study_repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)}: must be >= 1")
    out = Path(args.out) if args.out else ROOT / "docs" / "benchmarks.md" if set(wanted) == set(CASES) else None

    import torch

    torch.set_num_threads(args.threads)
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    repeats = 2 if args.smoke else args.repeats
    started = time.perf_counter()
    store = Path(tempfile.mkdtemp(prefix="reglab-bench-"))  # the runs' MLflow stores and checkpoints
    try:
        run_cases(args, wanted, repeats, store, started, out)
    finally:
        shutil.rmtree(store, ignore_errors=True)


def run_cases(args, wanted: list[str], repeats: int, store: Path, started: float, out: Path | None) -> None:
    cases: list[Case] = []
    if "step" in wanted:
        mlp_epochs = 2 if args.smoke else 30
        cases.append(step_case(
            f"step: MLP 64-512-512-10, digits, batch 128, Adam, {mlp_epochs} epochs", [
                "data=digits", "model=mlp", "model.width=512", "model.depth=2", "optim=adam",
                f"trainer.max_epochs={mlp_epochs}"], store, 0.90,
            "digits has ~1,290 training images: an epoch is 11 steps, so per-epoch work (validation, logging, "
            "checkpoints) weighs as much as the steps"))
        n = 256 if args.smoke else 512
        cases.append(step_case(
            f"step: ResNet18 width 16, synthetic 3x32x32, batch 128, Adam, {n} images x 2 epochs", [
                "data=synthetic", f"data.train_samples={n}", "data.test_samples=256", "data.val_fraction=0.0625",
                "model=resnet18", "model.width=16", "optim=adam", "trainer.max_epochs=2"], store, 0.97,
            "random uint8 images (conf/data/synthetic.yaml): CIFAR-10's shape without its files"))
    if "study" in wanted:
        cases.append(study_case(store, smoke=args.smoke))
    if "study_full" in wanted:
        cases.append(study_full_case(store, smoke=args.smoke))
    if "population" in wanted:
        cases.append(population_case(store, smoke=args.smoke))
    if "data" in wanted:
        cases.append(data_case(2 if args.smoke else 6))

    for case in cases:
        # A study variant is a whole sweep (minutes for the full one): fewer repeats.
        measure(case, 1 if case.name.startswith("study, whole") else
                min(repeats, args.study_repeats) if case.name.startswith("study") else repeats)
    md = table(cases)
    elapsed = time.perf_counter() - started
    print(md)
    if args.smoke:
        return
    if out is None:
        print("not written: a subset of the cases (--out FILE writes its table there)", file=sys.stderr)
        return
    header = (f"Command: `make bench` (`python scripts/bench.py --repeats {repeats} --threads {args.threads}`), "
              f"{datetime.date.today().isoformat()}, {elapsed / 60:.1f} min.\n\nMachine: {machine()}.\n")
    write_section(out, header + "\n" + md + "\n")
    print(f"written to {out}", file=sys.stderr)


MARK_BEGIN, MARK_END = "<!-- bench.py: begin -->", "<!-- bench.py: end -->"


def write_section(path: Path, body: str) -> None:
    """Replace the bench section of the doc (between the markers), keeping the hand-written text around it."""
    text = path.read_text() if path.exists() else f"# Benchmarks\n\n{MARK_BEGIN}\n{MARK_END}\n"
    if MARK_BEGIN not in text:
        text += f"\n{MARK_BEGIN}\n{MARK_END}\n"
    head, rest = text.split(MARK_BEGIN, 1)
    tail = rest.split(MARK_END, 1)[1] if MARK_END in rest else ""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{head}{MARK_BEGIN}\n{body}{MARK_END}{tail}")


if __name__ == "__main__":
    main()
