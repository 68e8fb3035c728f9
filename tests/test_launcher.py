"""Sharing a machine between sweep jobs: GPU slots (tested without GPUs), CPU threads, the DDP guard, launcher
configs."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections import Counter

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
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID")}
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


def test_no_gpu_claimed_for_cpu_jobs_or_under_slurm(tmp_path, monkeypatch):
    monkeypatch.delenv(launcher.ENV_SLOT, raising=False)
    cfg = OmegaConf.create({"trainer": {"accelerator": "cpu"},
                            "launcher": {"gpus": [0], "jobs_per_gpu": 1, "lock_dir": str(tmp_path)}})
    assert launcher.assign_gpu(cfg) is None
    cfg.trainer.accelerator = "gpu"
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    assert launcher.assign_gpu(cfg) is None
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(("setting", "env", "expected"), [
    ("auto", "2,5", ["2", "5"]), (3, None, ["0", "1", "2"]), ([1, 3], None, ["1", "3"]), ("auto", "", []),
])
def test_visible_gpus(setting, env, expected, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", env) if env is not None else None
    assert launcher.visible_gpus(setting) == expected


def test_cpu_threads_split_the_cores(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert launcher.cpu_threads("auto", 4) == 4
    assert launcher.cpu_threads("auto", 32) == 1
    assert launcher.cpu_threads(2, 4) == 2


def test_ddp_inside_a_multirun_is_refused_with_one_line(tmp_path):
    out = train_cli("-m", "trainer=ddp", "model.width=4,8", "logger=none", f"paths.root={tmp_path}",
                    f"hydra.sweep.dir={tmp_path}/sweep", cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("error: trainer.strategy=ddp starts Lightning DDP, which cannot run inside a multirun")
    assert "Launching jobs" not in out.stdout + out.stderr  # refused before any job started


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
