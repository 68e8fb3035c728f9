"""Sharing a machine between sweep jobs: GPU slots (tested without GPUs), CPU threads, the DDP guard, launcher
configs."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
from collections import Counter
from types import SimpleNamespace

import pytest
from conftest import CONF, compose
from omegaconf import OmegaConf

from reglab import launcher
from reglab.errors import ConfigError
from train_cli import train_cli


def test_slots_fill_every_gpu_before_packing_a_second_job_and_free_on_close(tmp_path):
    held = [launcher.claim_gpu(["0", "1", "2"], 2, tmp_path) for _ in range(6)]
    assert [g for g, _ in held[:3]] == ["0", "1", "2"]  # one job per GPU first
    assert Counter(g for g, _ in held) == {"0": 2, "1": 2, "2": 2}  # then jobs_per_gpu each
    with pytest.raises(ConfigError, match="jobs_per_gpu=2"):
        launcher.claim_gpu(["0", "1", "2"], 2, tmp_path)
    held[4][1].close()  # that job's process ended: its slot is free again
    assert launcher.claim_gpu(["0", "1", "2"], 2, tmp_path)[0] == held[4][0]


def test_each_job_process_sees_only_its_gpu(tmp_path):
    # Four concurrent job processes, 2 GPUs x 2 jobs per GPU: each gets CUDA_VISIBLE_DEVICES before any CUDA use.
    code = textwrap.dedent(f"""
        import os, sys
        from omegaconf import OmegaConf
        from reglab.launcher import assign_gpu
        cfg = OmegaConf.create({{"trainer": {{"accelerator": "gpu"}},
                                "launcher": {{"gpus": [0, 1], "jobs_per_gpu": 2, "lock_dir": r"{tmp_path}"}}}})
        first = assign_gpu(cfg)
        again = assign_gpu(cfg)  # the next job in the same worker process keeps the slot
        print(first, again, os.environ["CUDA_VISIBLE_DEVICES"], flush=True)
        if sys.argv[1] == "hold":
            sys.stdin.read()  # holds its slot until the test closes its stdin (not a sleep that a slow machine outlasts)
    """)
    env = {k: v for k, v in os.environ.items()
           if k not in ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID") and not k.startswith("SUBMITIT_")}
    procs = [subprocess.Popen([sys.executable, "-c", code, "hold"], env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) for _ in range(4)]
    seen = [p.stdout.readline().split() for p in procs]
    # A fifth job while the four run: no slot left, a one-line error naming the knob.
    extra = subprocess.run([sys.executable, "-c", code, "done"], env=env, capture_output=True, text=True)
    for p in procs:
        p.stdin.close()
        p.wait(timeout=60)
    assert all(first == again == visible for first, again, visible in seen)
    assert Counter(first for first, _, _ in seen) == {"0": 2, "1": 2}
    assert extra.returncode != 0 and "launcher.jobs_per_gpu=2" in extra.stderr


SUBMITIT = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
JOBLIB = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"


@pytest.fixture
def job_process(monkeypatch, tmp_path):
    """This process as a fresh job process: no slot, no SLURM or submitit variables, the default lock folder under
    tmp_path; what assign_gpu sets is undone and the slots it holds are freed after the test."""
    for k in [k for k in os.environ if k.startswith(("SLURM_", "SUBMITIT_"))]:
        monkeypatch.delenv(k)
    for k in ("CUDA_VISIBLE_DEVICES", launcher.ENV_SLOT):
        monkeypatch.setenv(k, "")  # recorded before the delenv: a value assign_gpu sets later is undone too
        monkeypatch.delenv(k)
    held = []
    monkeypatch.setattr(launcher, "_held", held)
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path))
    yield
    for f in held:
        f.close()


def test_no_gpu_claimed_for_cpu_jobs_or_under_the_submitit_launcher(job_process, tmp_path, monkeypatch):
    cfg = OmegaConf.create({"trainer": {"accelerator": "cpu"},
                            "launcher": {"gpus": [0], "jobs_per_gpu": 1, "lock_dir": str(tmp_path)}})
    assert launcher.assign_gpu(cfg) is None
    cfg.trainer.accelerator = "gpu"
    monkeypatch.setenv("SLURM_JOB_ID", "123")  # a SLURM job of its own, whose GPU SLURM chose
    assert launcher.assign_gpu(cfg, SUBMITIT) is None
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")  # what submitit's job script exports
    assert launcher.assign_gpu(cfg, "") is None
    assert not list(tmp_path.iterdir())


def test_a_joblib_sweep_inside_a_slurm_allocation_spreads_its_jobs_over_the_allocations_gpus(job_process, tmp_path,
                                                                                             monkeypatch):
    # sbatch --gres=gpu:4, then a joblib sweep: SLURM_JOB_ID alone meant "claim nothing"; every job trained on GPU 0.
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    cfg = OmegaConf.create({"trainer": {"accelerator": "gpu"}, "launcher": {"gpus": "auto", "jobs_per_gpu": 1}})

    def job_process_starts(visible: str) -> str | None:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)  # the allocation's, inherited from sbatch
        monkeypatch.delenv(launcher.ENV_SLOT, raising=False)
        return launcher.assign_gpu(cfg, JOBLIB)

    assert sorted(job_process_starts("0,1,2,3") for _ in range(4)) == ["0", "1", "2", "3"]
    # Another allocation on this node: SLURM numbers its one GPU 0 too, a GPU that job 123's slots do not hold.
    monkeypatch.setenv("SLURM_JOB_ID", "456")
    assert job_process_starts("0") == "0"
    assert {p.name for p in (tmp_path / f"reglab-gpu-slots-{os.getuid()}").iterdir()} == {"slurm-123", "slurm-456"}


@pytest.mark.parametrize(("setting", "env", "expected"), [
    ("auto", "2,5", ["2", "5"]), (3, None, ["0", "1", "2"]), ([1, 3], None, ["1", "3"]), ("auto", "", []),
    # Under the shell's (or SLURM's) CUDA_VISIBLE_DEVICES a count and ids index its list, as CUDA numbers them.
    (1, "4,6", ["4"]), ([1], "4,6", ["6"]), (2, "GPU-a1,GPU-b2", ["GPU-a1", "GPU-b2"]),
    ("0,2", None, ["0", "2"]), ("1", "4,6", ["6"]), (["GPU-a1"], None, ["GPU-a1"]),
])
def test_visible_gpus(setting, env, expected, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", env) if env is not None else None
    assert launcher.visible_gpus(setting) == expected


@pytest.mark.parametrize(("setting", "env", "message"), [
    (3, "4,6", "CUDA_VISIBLE_DEVICES='4,6' gives 2"), ([0, 2], "4,6", "asks for GPU.s. .2."),
    (["GPU-x"], "4,6", "asks for GPU.s. .'GPU-x'."), ([0], "", "CUDA_VISIBLE_DEVICES='' hides every GPU"),
    (True, None, "launcher.gpus=True is invalid"), (1.5, None, "launcher.gpus=1.5 is invalid"),
])
def test_a_gpu_setting_that_cannot_be_honoured_is_one_line(setting, env, message, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    if env is not None:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", env)
    with pytest.raises(ConfigError, match=message):
        launcher.visible_gpus(setting)


def test_cpu_threads_split_the_cpus_this_process_may_use(monkeypatch):
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert launcher.cpu_threads("auto", 4) == 4
    assert launcher.cpu_threads("auto", 32) == 1
    assert launcher.cpu_threads(2, 4) == 2
    # taskset -c 0 or a cgroup cpuset: os.cpu_count() still counts the machine's 16 CPUs.
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert launcher.cpu_threads("auto", 1) == 1
    # sbatch --cpus-per-task=4 on a cluster that does not bind CPUs: the affinity is the whole node.
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "4")
    assert launcher.cpu_threads("auto", 2) == 2
    assert launcher.joblib_jobs(-1) == 4 and launcher.joblib_jobs(-2) == 3 and launcher.joblib_jobs(None) == 1
    monkeypatch.delenv("SLURM_CPUS_PER_TASK")
    monkeypatch.delattr(os, "sched_getaffinity")  # macOS
    assert launcher.usable_cpus() == 16


@pytest.mark.parametrize(("hydra_launcher", "cpus", "threads"), [
    # A submitit job is an allocation of its own: its CPUs are its alone, whatever array_parallelism says.
    ({"_target_": SUBMITIT, "array_parallelism": 64}, 8, 8),
    ({"_target_": JOBLIB, "n_jobs": -1}, 4, 1),  # joblib's n_jobs=-1: one job per usable CPU
])
def test_a_job_gets_its_share_of_the_cpus_it_may_use(hydra_launcher, cpus, threads, job_process, tmp_path,
                                                     monkeypatch):
    import torch
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda: SimpleNamespace(mode=RunMode.MULTIRUN,
                                                                                 launcher=hydra_launcher)))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)))
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # SLURM's choice, or the machine's one GPU
    got = []
    monkeypatch.setattr(torch, "set_num_threads", got.append)
    launcher.JobResources().on_job_start(compose(["trainer=gpu"]))
    assert got == [threads]
    # Under submitit nothing is claimed; under joblib the job holds a slot of its allocation's GPU 0.
    assert (launcher.ENV_SLOT in os.environ) == (hydra_launcher["_target_"] == JOBLIB)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0"


def test_ddp_inside_a_multirun_is_refused_with_one_line(tmp_path):
    out = train_cli("-m", "trainer=ddp", "model.width=4,8", "logger=none", f"paths.root={tmp_path}",
                    f"hydra.sweep.dir={tmp_path}/sweep", cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("error: trainer.strategy=ddp starts Lightning DDP, which cannot run inside a multirun")
    assert "Launching jobs" not in out.stdout + out.stderr  # refused before any job started


def test_more_jobs_at_once_than_gpu_slots_is_one_line_before_any_job(tmp_path, monkeypatch):
    # Before: the sweep started, and every job past the slots failed on its own ("all ... slots are taken").
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    out = train_cli("-m", "trainer=gpu", "hydra/launcher=gpus", "hydra.launcher.n_jobs=8", "launcher.gpus=[0]",
                    "launcher.jobs_per_gpu=2", "model.width=4,8,16", f"paths.root={tmp_path}",
                    f"hydra.sweep.dir={tmp_path}/sweep", cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == (
        "error: hydra.launcher.n_jobs=8 runs 3 of the 3 jobs at once on 1 GPU(s) x launcher.jobs_per_gpu=2 slots; "
        "lower n_jobs or raise launcher.jobs_per_gpu")
    assert "Launching jobs" not in out.stdout + out.stderr
    assert not list((tmp_path / "sweep").glob("*/"))  # no job folder
    # An n_jobs larger than the sweep needs is no error: 2 jobs fit 1 GPU x 2 slots.
    assert launcher.check_gpu_slots(compose(["trainer=gpu", "launcher.gpus=[0]", "launcher.jobs_per_gpu=2"]),
                                    {"n_jobs": 8}, 2) is None


def test_a_job_that_cannot_start_stops_the_sweep_with_one_line(monkeypatch, capsys):
    """Hydra turns an exception raised in a callback into a warning and starts the job anyway (a DDP job would
    re-launch the sweep; a job without a GPU slot would share one): JobResources exits instead."""
    from types import SimpleNamespace

    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda: SimpleNamespace(mode=RunMode.MULTIRUN, launcher={})))
    with pytest.raises(SystemExit) as stopped:
        launcher.JobResources().on_job_start(compose(["trainer=ddp"]))
    assert stopped.value.code == 2
    assert capsys.readouterr().err.startswith("error: trainer.strategy=ddp starts Lightning DDP, which cannot run inside a multirun")


@pytest.mark.parametrize(("overrides", "setting"), [
    (["trainer=ddp"], "trainer.strategy=ddp"),
    # Lightning's default strategy (auto) picks DDP for more than one device: the sweep was re-launched per rank.
    (["trainer=gpu", "trainer.devices=2"], "trainer.devices=2"),
    (["trainer=gpu", "trainer.devices=[0,1]"], "trainer.devices=[0, 1]"),
    (["trainer=gpu", "trainer.devices='0,1'"], "trainer.devices=0,1"),
    (["trainer=cpu", "+trainer.num_nodes=2"], "trainer.num_nodes=2"),
    (["trainer=gpu"], None), (["trainer=cpu"], None), (["trainer=ddp", "trainer.devices=1"], None),
])
def test_every_trainer_setting_that_starts_ddp_is_named(overrides, setting, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # one GPU visible
    assert launcher.uses_ddp(compose(overrides)) == setting


@pytest.mark.parametrize(("override", "key"), [
    ("launcher.cpu_threads=x", "launcher.cpu_threads='x'"), ("launcher.cpu_threads=0", "launcher.cpu_threads=0"),
    # Both before a GPU slot is claimed (a claim would hold a lock and set CUDA_VISIBLE_DEVICES in this process).
    ("launcher.jobs_per_gpu=two", "launcher.jobs_per_gpu='two'"),
    ("+launcher.lock_dir=/proc/reglab", "launcher.lock_dir=/proc/reglab"),
])
def test_a_bad_launcher_setting_stops_the_sweep_with_one_line_naming_it(override, key, monkeypatch, capsys):
    # Hydra turns any exception raised in on_job_start into a warning: a ValueError started every job on GPU 0.
    from types import SimpleNamespace

    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    monkeypatch.delenv(launcher.ENV_SLOT, raising=False)
    monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda: SimpleNamespace(mode=RunMode.MULTIRUN, launcher={})))
    with pytest.raises(SystemExit) as stopped:
        trainer = "trainer=cpu" if "cpu_threads" in override else "trainer=gpu"
        launcher.JobResources().on_job_start(compose([trainer, "launcher.gpus=[0]", override]))
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.startswith(f"error: {key}") and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF / "hydra" / "launcher").glob("*.yaml")))
def test_launcher_configs_compose(name):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose("train", overrides=[f"hydra/launcher={name}"], return_hydra_config=True)
    assert "joblib" in cfg.hydra.launcher._target_ or "submitit" in cfg.hydra.launcher._target_
    OmegaConf.to_container(cfg.hydra.launcher, resolve=True)


def test_launcher_keys_do_not_change_the_fingerprint():
    from reglab.runs import identity

    assert identity(compose(["launcher.jobs_per_gpu=4"])) == identity(compose([]))
