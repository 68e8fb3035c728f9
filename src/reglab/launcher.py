"""How the jobs of a multirun share a machine: one GPU slot per job process, CPU threads per job, and the guard
against Lightning DDP inside a multirun.

GPU packing (`launcher.jobs_per_gpu`): a job process claims one slot, (GPU g, slot s < jobs_per_gpu), by holding an
exclusive flock on `<lock_dir>/gpu<g>-slot<s>.lock` for the rest of its life, and sets CUDA_VISIBLE_DEVICES=g
before anything initializes CUDA (`JobResources.on_job_start` runs before the job's code). Launcher workers
(joblib's loky processes) live across jobs and CUDA reads CUDA_VISIBLE_DEVICES once per process, so a process keeps
its slot; the OS drops the lock when the process exits, even when it is killed. Under the submitit launcher
(hydra/launcher=slurm) each job is a SLURM job of its own, SLURM sets its CUDA_VISIBLE_DEVICES, and nothing is
claimed. A joblib sweep inside one SLURM allocation (sbatch --gres=gpu:4) claims slots among the allocation's GPUs,
counted per $SLURM_JOB_ID: SLURM numbers each allocation's GPUs from 0, so two jobs on one node both see a GPU 0.

CPU threads (`launcher.cpu_threads`) and joblib's n_jobs=-1 count the CPUs this process may use (`usable_cpus`), not
the machine's.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import tempfile
from pathlib import Path
from typing import IO, Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, ListConfig

from reglab.errors import ConfigError

ENV_SLOT = "REGLAB_GPU_SLOT"  # set once a process holds a slot: later jobs in the same worker keep it
_held: list[IO] = []  # open lock files of this process (closing one would free its slot)


def visible_gpus(setting: Any) -> list[str]:
    """launcher.gpus: `auto` (CUDA_VISIBLE_DEVICES of the launching shell, else `nvidia-smi -L`), a count, or ids.
    Under a CUDA_VISIBLE_DEVICES of the shell, a count takes its first GPUs and ids index its list, as CUDA and
    Lightning's `devices` number them: the sweep never reaches a GPU the shell (or SLURM) did not give it."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    shell = [g.strip() for g in env.split(",") if g.strip()] if env is not None else None
    if setting in (None, "auto"):
        if shell is not None:
            return shell
        try:  # without initializing CUDA, which would pin this process's device list
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return []
        return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]
    if isinstance(setting, str):  # "0,1" from a command line or an environment variable
        setting = [g.strip() for g in setting.split(",") if g.strip()]
    if isinstance(setting, bool) or not isinstance(setting, (int, list, tuple, ListConfig)):
        raise ConfigError(f"launcher.gpus={setting!r} is invalid: expected auto, a count or a list of GPU ids")
    ids = list(range(setting)) if isinstance(setting, int) else [int(g) if str(g).isdigit() else g for g in setting]
    if shell is None:
        return [str(g) for g in ids]
    bad = [g for g in ids if not isinstance(g, int) or isinstance(g, bool) or not 0 <= g < len(shell)]
    if bad:
        given = f"gives {len(shell)}: use indices 0..{len(shell) - 1} into that list, or auto" if shell else \
            "hides every GPU"
        raise ConfigError(f"launcher.gpus={setting!r} asks for GPU(s) {bad} but CUDA_VISIBLE_DEVICES={env!r} {given}")
    return [shell[g] for g in ids]


def claim_gpu(gpus: list[str], jobs_per_gpu: int, lock_dir: Path) -> tuple[str, IO]:
    """The GPU of the first free slot, filling each GPU's slot 0 before any slot 1 (spreads jobs over GPUs),
    and the open lock file that holds it."""
    if jobs_per_gpu < 1:
        raise ConfigError(f"launcher.jobs_per_gpu={jobs_per_gpu} is invalid: expected an integer >= 1")
    lock_dir.mkdir(parents=True, exist_ok=True)
    for slot in range(jobs_per_gpu):
        for gpu in gpus:
            f = open(lock_dir / f"gpu{gpu}-slot{slot}.lock", "w")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                continue
            return gpu, f
    raise ConfigError(
        f"launcher: all {len(gpus)} GPU(s) x launcher.jobs_per_gpu={jobs_per_gpu} slots are taken; run at most "
        f"that many jobs at once (hydra.launcher.n_jobs) or raise launcher.jobs_per_gpu"
    )


def under_submitit(launcher_target: str = "") -> bool:
    """Whether this job runs under a submitit launcher (hydra.launcher._target_, or the SUBMITIT_EXECUTOR its job
    script exports): a job of its own, whose GPUs SLURM (or submitit's local executor) already chose."""
    return "submitit" in launcher_target or "SUBMITIT_EXECUTOR" in os.environ


def assign_gpu(cfg: DictConfig, launcher_target: str = "") -> str | None:
    """Give this job process its GPU (sets CUDA_VISIBLE_DEVICES); None when nothing is to be assigned.
    launcher_target: hydra.launcher._target_ of the sweep."""
    if ENV_SLOT in os.environ:
        return os.environ["CUDA_VISIBLE_DEVICES"]
    if under_submitit(launcher_target) or cfg.trainer.get("accelerator") == "cpu":
        return None
    launcher = cfg.get("launcher") or {}
    gpus = visible_gpus(launcher.get("gpus", "auto"))
    if not gpus:
        return None
    # One folder per user: another user's folder in /tmp is not ours to write (PermissionError), nor are their GPUs'
    # slots ours to count.
    lock_dir = Path(launcher.get("lock_dir") or Path(tempfile.gettempdir()) / f"reglab-gpu-slots-{os.getuid()}")
    if os.environ.get("SLURM_JOB_ID"):  # another allocation's GPU 0 on this node is another GPU under the same name
        lock_dir = lock_dir / f"slurm-{os.environ['SLURM_JOB_ID']}"
    per_gpu = launcher.get("jobs_per_gpu", 1)
    if not isinstance(per_gpu, int) or isinstance(per_gpu, bool):
        raise ConfigError(f"launcher.jobs_per_gpu={per_gpu!r} is invalid: expected an integer >= 1")
    try:
        gpu, handle = claim_gpu(gpus, per_gpu, lock_dir)
    except OSError as e:
        raise ConfigError(f"launcher.lock_dir={lock_dir}: {e.strerror or e}; set launcher.lock_dir to a folder "
                          "this user can write") from e
    _held.append(handle)
    os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    os.environ[ENV_SLOT] = Path(handle.name).stem
    return gpu


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity (taskset, a cgroup cpuset, SLURM's CPU binding), at most
    $SLURM_CPUS_PER_TASK (an allocation without CPU binding leaves the affinity at the whole node). os.cpu_count()
    counts the machine's."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no sched_getaffinity
        n = os.cpu_count() or 1
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "").strip()
    if slurm.isdigit() and int(slurm) > 0:
        n = min(n, int(slurm))
    return max(1, n)


def joblib_jobs(n_jobs: Any) -> int:
    """Job processes joblib runs at once for n_jobs: -1 = one per usable CPU, -2 = all but one, ...; unset: 1."""
    n = int(n_jobs or 1)
    return n if n > 0 else max(1, usable_cpus() + 1 + n)


def launcher_parallelism(launcher: Any) -> int:
    """Jobs a Hydra launcher (its hydra.launcher node) runs at once, wherever they run: joblib's n_jobs, submitit's
    array_parallelism (SLURM jobs, each in an allocation of its own), else 1 (the basic launcher)."""
    launcher = launcher or {}
    if launcher.get("n_jobs") is not None:
        return joblib_jobs(launcher.get("n_jobs"))
    return max(1, int(launcher.get("array_parallelism") or 1))


def cpu_threads(setting: Any, concurrent_jobs: int) -> int:
    """launcher.cpu_threads: `auto` = cores / jobs running at once (oversubscribed threads cost more than they
    give: 2 jobs x 2 threads on 2 cores run ~10x slower than 2 x 1), or a number."""
    if setting in (None, "auto"):
        return max(1, usable_cpus() // max(1, concurrent_jobs))
    if not isinstance(setting, int) or isinstance(setting, bool) or setting < 1:
        raise ConfigError(f"launcher.cpu_threads={setting!r} is invalid: expected auto or an integer >= 1")
    return setting


def device_count(devices: Any) -> int | None:
    """The processes trainer.devices names: 2, "2", [0, 1], "0,1"; None for -1 and auto (the machine's count)."""
    if isinstance(devices, (list, tuple, ListConfig)):
        return len(devices)
    text = str(devices).strip()
    if "," in text:
        return len([d for d in text.split(",") if d.strip()])
    return int(text) if text.isdigit() else None


def _several(devices: Any, accelerator: str) -> bool:
    """Whether trainer.devices asks Lightning for more than one process; -1 and (on a GPU) auto mean every device
    there is."""
    count = device_count(devices)
    if count is not None:
        return count > 1
    if str(devices).strip() == "-1" or (str(devices).strip() == "auto" and accelerator != "cpu"):
        return (os.cpu_count() or 1) > 1 if accelerator == "cpu" else len(visible_gpus("auto")) > 1
    return False


def uses_ddp(cfg: DictConfig) -> str | None:
    """The trainer setting that makes Lightning start DDP ranks, or None: strategy ddp*, or the default strategy
    (auto), which picks DDP for more than one device or node."""
    t = cfg.trainer
    strategy, devices = str(t.get("strategy") or "auto"), t.get("devices", "auto")
    nodes = t.get("num_nodes") or 1
    if strategy.startswith("ddp"):
        return f"trainer.strategy={strategy}" if devices not in (1, "1") or nodes != 1 else None
    if strategy != "auto":
        return None
    if nodes != 1:
        return f"trainer.num_nodes={nodes}"
    return f"trainer.devices={devices}" if _several(devices, str(t.get("accelerator") or "auto")) else None


def refuse_ddp_in_multirun(cfg: DictConfig) -> None:
    setting = uses_ddp(cfg)
    if setting:
        # Lightning starts DDP ranks by re-running sys.argv, which re-launches the whole sweep (Lightning #11300).
        raise ConfigError(f"{setting} starts Lightning DDP, which cannot run inside a multirun (it would re-launch "
                          "the whole sweep); run one configuration at a time, or sweep with trainer=gpu "
                          "trainer.devices=1 and launcher.jobs_per_gpu")


def check_gpu_slots(cfg: DictConfig, hydra_launcher: Any, jobs: int) -> None:
    """In the launching process, before any job (reglab's sweeper): a joblib sweep that would run more jobs at once
    than there are GPU slots would start the extra jobs only for each to fail on finding every slot taken."""
    launcher_node = hydra_launcher or {}
    if under_submitit(str(launcher_node.get("_target_") or "")) or cfg.trainer.get("accelerator") == "cpu":
        return
    settings = cfg.get("launcher") or {}
    gpus = visible_gpus(settings.get("gpus", "auto"))
    per_gpu = settings.get("jobs_per_gpu", 1)
    at_once = min(joblib_jobs(launcher_node.get("n_jobs")), jobs)
    if gpus and isinstance(per_gpu, int) and at_once > len(gpus) * per_gpu:
        raise ConfigError(f"hydra.launcher.n_jobs={launcher_node.get('n_jobs')} runs {at_once} of the {jobs} jobs at "
                          f"once on {len(gpus)} GPU(s) x launcher.jobs_per_gpu={per_gpu} slots; lower n_jobs or raise "
                          "launcher.jobs_per_gpu")


class JobResources(Callback):
    """Hydra callback (conf/train.yaml): in a multirun, each job gets its GPU slot and its share of CPU threads
    before its code runs."""

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        if hc.mode != RunMode.MULTIRUN:
            return
        from reglab.cli import stop

        # The jobs sharing this machine (or allocation): joblib's workers. Not submitit's array_parallelism, whose jobs
        # each have an allocation of their own.
        concurrent = joblib_jobs(hc.launcher.get("n_jobs"))
        try:
            refuse_ddp_in_multirun(config)
            assign_gpu(config, str(hc.launcher.get("_target_") or ""))
            threads = cpu_threads((config.get("launcher") or {}).get("cpu_threads", "auto"), concurrent)
        except ConfigError as e:
            stop(e)
        import torch

        torch.set_num_threads(threads)
