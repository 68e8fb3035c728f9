"""Faults at cluster scale (docs/reliability.md, "Faults at cluster scale"): preemption (SIGTERM, then SIGKILL after
the grace period), a full disk mid-run, a corrupted checkpoint, a tracking server that goes away and comes back.
Each through real processes or the real training path, each compared with what an uninterrupted run gives.

Marker `cluster`: 4-10 minutes together on 2 cores (docs/benchmarks.md), so `make test` leaves them out and
`bash .ci/run` runs them with `make test-cluster`."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest
import torch

from conftest import compose, with_store
from mlflow_server import free_port, mlflow_server
from train_cli import SCRIPT, TINY, logged_epoch, signal_once_checkpointed, train_cli, train_env

pytestmark = pytest.mark.cluster

GRACE_S = 30  # SLURM's default KillWait: SIGKILL follows SIGTERM after this
EPOCHS = 12
SOLO = [*TINY, f"trainer.max_epochs={EPOCHS}", "callbacks.early_stopping=null",
        "callbacks.checkpoint.last_every_s=null", "logger.experiment=faults", "logger.log_model=false"]


def _client(root: Path):
    return mlflow.MlflowClient(f"sqlite:///{root}/mlruns/mlflow.db")


def _runs(client, experiment="faults"):
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id]) if exp else []


def _history(client, run, key="train/loss") -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))


def _finals(client, run) -> dict:
    return {k: v for k, v in run.data.metrics.items() if k.startswith(("train/", "val/", "test/"))}


# ---------------------------------------------------------------- preemption of a single run, at random moments

def _train_in_process(root: Path, *extra: str, sigterm_after: float | None = None):
    """reglab.train.run in this process (reglab.cli.run_job installs the same handler), with SIGTERM sent
    to this process after `sigterm_after` seconds. Returns the Preempted error, or None if the run finished."""
    from reglab import preemption, train

    cfg = compose([f"paths.root={root}", *SOLO, *extra])
    preemption.reset()
    before = signal.getsignal(signal.SIGTERM)
    preemption.install()
    timer = threading.Timer(sigterm_after, os.kill, (os.getpid(), signal.SIGTERM)) if sigterm_after else None
    try:
        if timer:
            timer.start()
        train.run(cfg)
        if timer:
            timer.cancel()
            timer.join()
        return None
    except preemption.Preempted as e:
        return e
    finally:
        if timer:
            timer.cancel()
        signal.signal(signal.SIGTERM, before)
        preemption.reset()


def test_sigterm_at_random_moments_then_the_same_command_gives_the_uninterrupted_run(tmp_path, empty_store):
    """10 trials, SIGTERM at a uniformly random moment of the run (lookup, data, fit, test); the rerun ends with
    every epoch once and the exact metrics of an uninterrupted run (CPU, bit for bit)."""
    for name in ("warm-up", "ref"):  # the second run's duration is what a trial's would be (imports done)
        ref_root = with_store(tmp_path / name, empty_store)
        t0 = time.monotonic()
        assert _train_in_process(ref_root) is None
        duration = time.monotonic() - t0
    client = _client(ref_root)
    [ref] = _runs(client)
    ref_history, ref_finals = _history(client, ref), _finals(client, ref)
    assert [s for s, _ in ref_history] == list(range(EPOCHS))

    rng = random.Random(0)
    stopped_in_fit = 0
    for trial in range(10):
        root = with_store(tmp_path / f"trial{trial}", empty_store)
        at = rng.uniform(0.05, duration)
        err = _train_in_process(root, sigterm_after=at)
        client = _client(root)
        if err is not None:
            runs = _runs(client)
            assert all(r.info.status != "FINISHED" for r in runs), f"trial {trial}: a preempted run FINISHED"
            stopped_in_fit += "after epoch" in str(err) or "in epoch" in str(err)
            assert _train_in_process(root) is None  # the same command again
        runs = _runs(client)
        finished = [r for r in runs if r.info.status == "FINISHED"]
        assert len(finished) == 1, f"trial {trial} (SIGTERM at {at:.2f} s): {[r.info.status for r in runs]}"
        assert _history(client, finished[0]) == ref_history, f"trial {trial}: history differs (SIGTERM at {at:.2f} s)"
        assert _finals(client, finished[0]) == ref_finals, f"trial {trial}: final metrics differ"
    assert stopped_in_fit >= 3, "too few trials stopped a fit: the test does not test preemption"


# ---------------------------------------------------------------- preemption of a sweep (the launcher and its workers)

SWEEP = ["+exp=double_descent_mnist1d", "model.width=8,32", "seed=0,1", "data.train_samples=400",
         "data.test_samples=400", "trainer.max_epochs=120", "callbacks.checkpoint.every_n_epochs=1",
         "callbacks.checkpoint.last_every_s=null"]


def _sweep(root: Path, **kw) -> subprocess.CompletedProcess:
    return train_cli(*SWEEP, f"paths.root={root}", f"hydra.sweep.dir={root}/sweep", cwd=root, timeout=300, **kw)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def _children_by_member(root: Path) -> dict[tuple[int, int], list]:
    client = _client(root)
    exp = client.get_experiment_by_name("double_descent")
    out: dict[tuple[int, int], list] = {}
    for r in client.search_runs([exp.experiment_id], "tags.`reglab.role` = 'child'"):
        out.setdefault((int(r.data.params["model.width"]), int(r.data.params["seed"])), []).append(r)
    return out


def test_sigterm_to_a_sweep_stops_every_process_within_the_grace_period_and_the_rerun_completes(tmp_path, empty_store):
    ref_root = with_store(tmp_path / "ref", empty_store)
    r = _sweep(ref_root)
    assert r.returncode == 0, r.stderr[-3000:]
    ref = _children_by_member(ref_root)
    assert len(ref) == 4

    root = with_store(tmp_path / "cut", empty_store)
    with open(root / "preempted.log", "w") as log:
        proc = subprocess.Popen([sys.executable, str(SCRIPT), *SWEEP, f"paths.root={root}",
                                 f"hydra.sweep.dir={root}/sweep"], cwd=root, env=train_env(), stdout=log,
                                stderr=log, start_new_session=True)
        deadline = time.monotonic() + 240
        while (logged_epoch(root) < 3 or len(list(root.glob("outputs/checkpoints/population-*/last.ckpt"))) < 2) \
                and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the sweep ended before it could be preempted"
        os.killpg(proc.pid, signal.SIGTERM)  # as SLURM and spot instances do: every process of the job
        t0 = time.monotonic()
        while (proc.poll() is None or _group_alive(proc.pid)) and time.monotonic() - t0 < GRACE_S + 30:
            time.sleep(0.1)  # poll() reaps the launcher: a zombie still counts as a member of its group
        took = time.monotonic() - t0
        if _group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    output = (root / "preempted.log").read_text()
    assert took < GRACE_S, f"processes of the sweep outlived the grace period ({took:.0f} s):\n{output[-3000:]}"
    assert proc.returncode == 143, output[-3000:]
    assert "preempted (SIGTERM)" in output and "Traceback" not in output, output[-3000:]
    cut = _children_by_member(root)
    states = sorted((k, r.info.status, r.data.tags.get("reglab.resumable")) for k, rs in cut.items() for r in rs)
    # The sweep is 2 population jobs, one per width, started a second or more apart (seen: the width-8 job ended
    # before the width-32 job had written its first checkpoint, on a loaded CI machine); a job that ended before the
    # signal keeps its members FINISHED. Every other member stopped resumable, all of a population alike, and at
    # least one did, or nothing was preempted.
    stopped = [s for s in states if s[1] != "FINISHED"]
    assert stopped and all(resumable == "true" for _, _, resumable in stopped), states
    assert all(len({s[1] for s in states if s[0][0] == width}) == 1 for width in {k[0] for k in cut}), states

    r = _sweep(root)
    assert r.returncode == 0, r.stderr[-3000:]
    done = _children_by_member(root)
    assert sorted(done) == sorted(ref)
    client, ref_client = _client(root), _client(ref_root)
    for member, runs in done.items():
        assert [x.info.status for x in runs] == ["FINISHED"], (member, [x.info.status for x in runs])
        assert _history(client, runs[0], "test/err") == _history(ref_client, ref[member][0], "test/err"), member
        assert _finals(client, runs[0]) == _finals(ref_client, ref[member][0]), member


# ---------------------------------------------------------------- submitit's time limit

def test_a_submitit_job_warned_of_its_time_limit_is_requeued_and_continues_its_run(tmp_path, empty_store):
    """hydra/launcher=slurm at a time limit, with submitit's local executor standing in for SLURM (the same job code
    and signal handling; its controller restarts a task that exits with submitit's requeue status). submitit warns a
    job with SIGUSR2 (SLURM's --signal, signal_delay_s before the limit); reglab takes it as a stop request (epoch
    end, last.ckpt, run KILLED and resumable) and then lets submitit requeue the job. Before, submitit's handler
    exited mid-step: Lightning marked the run FAILED and every requeued attempt started over from epoch 0."""
    from mlflow.tracking import MlflowClient

    root = with_store(tmp_path / "root", empty_store)
    epochs = 400
    args = ["-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", *TINY, "logger.log_model=false",
            f"trainer.max_epochs={epochs}", "callbacks.early_stopping=null", f"paths.root={root}",
            f"hydra.sweep.dir={root}/sweep"]
    # SIGUSR2 is what SLURM sends signal_delay_s before the time limit.
    code = signal_once_checkpointed(*args, root=root, log=root / "sweep.log", pick="submitit.core._submit",
                                    sig=signal.SIGUSR2)
    output = (root / "sweep.log").read_text()
    job_log = "".join(f.read_text() for f in (root / "sweep" / ".submitit").glob("*/*_log.*"))
    assert code == 0, output[-3000:] + job_log[-3000:]
    assert "Requeued job" in job_log and "stopped by SIGUSR2" in job_log, job_log[-3000:]
    assert "sweep: 1/1 members" in output, output[-2000:]
    client = MlflowClient(f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED"  # the same run, continued: before, one FAILED run per attempt
    assert "reglab.resumable" not in run.data.tags and "SIGUSR2" in run.data.tags["reglab.stopped_by"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == list(range(epochs))


# ---------------------------------------------------------------- a disk that fills mid-run

@contextlib.contextmanager
def small_disk(path: Path, size: str = "1m"):
    path.mkdir(parents=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a {size} tmpfs to fill (needs root with CAP_SYS_ADMIN): {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _fill(disk: Path) -> Path:
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        with contextlib.suppress(OSError):  # unbuffered: stops at the first block that does not fit
            while True:
                os.write(fd, b"\0" * 4096)
    finally:
        os.close(fd)
    return filler


def test_a_disk_that_fills_mid_run_keeps_the_last_checkpoint_and_the_same_command_resumes(tmp_path, empty_store):
    root = with_store(tmp_path / "root", empty_store)
    with small_disk(tmp_path / "disk") as disk:
        args = [*SOLO, "trainer.max_epochs=400", f"paths.root={root}", f"paths.checkpoints={disk}/ckpt"]
        with open(root / "full.log", "w") as log:
            proc = subprocess.Popen([sys.executable, str(SCRIPT), *args], cwd=root, env=train_env(), stdout=log,
                                    stderr=log)
            deadline = time.monotonic() + 180
            while not list(disk.glob("ckpt/*/last.ckpt")) and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            filler = _fill(disk)
            proc.wait(timeout=120)
        err = (root / "full.log").read_text()
        lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert proc.returncode == 2, err[-3000:]
        assert len(lines) == 1 and "No space left on device" in lines[0] and f"{disk}/ckpt/" in lines[0], err[-3000:]
        assert "Traceback" not in err
        [folder] = disk.glob("ckpt/*")
        assert not [p for p in folder.iterdir() if p.suffix == ".tmp" or p.stat().st_size == 0], \
            list(folder.iterdir())  # no half-written file under any name
        state = torch.load(folder / "last.ckpt", weights_only=True)
        client = _client(root)
        [run] = _runs(client)
        assert run.info.status == "KILLED" and run.data.tags["reglab.resumable"] == "true"
        history = _history(client, run)
        assert history and history[-1][0] >= state["epoch"]  # the store holds every epoch the checkpoint has

        filler.unlink()  # space freed: the same command continues the same run
        r = train_cli(*args, cwd=root, timeout=240)
        assert r.returncode == 0, r.stderr[-3000:]
        [run] = _runs(client)
        assert run.info.status == "FINISHED"
        assert [s for s, _ in _history(client, run)] == list(range(400))


# ---------------------------------------------------------------- a corrupted checkpoint where a resume expects one

@pytest.mark.parametrize("damage", ["zero_bytes", "truncated"])
def test_a_corrupted_checkpoint_is_one_line_and_restarts_only_when_asked(damage, tmp_path, empty_store):
    from reglab import train
    from reglab.cli import one_line
    from reglab.errors import ConfigError

    root = with_store(tmp_path, empty_store)

    def sigterm_once_checkpointed():
        while not (logged_epoch(root) >= 2 and list(root.glob("outputs/checkpoints/*/last.ckpt"))):
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    watcher = threading.Thread(target=sigterm_once_checkpointed, daemon=True)
    watcher.start()
    assert _train_in_process(root, "trainer.max_epochs=200") is not None
    [last] = root.glob("outputs/checkpoints/*/last.ckpt")
    data = last.read_bytes()
    last.write_bytes(b"" if damage == "zero_bytes" else data[: len(data) // 2])
    client = _client(root)
    [before] = _runs(client)

    with pytest.raises(ConfigError) as e:
        train.run(compose([f"paths.root={root}", *SOLO, "trainer.max_epochs=200"]))
    line = one_line(e.value, Path("conf"))
    assert str(last) in line and "resume=restart" in line and "\n" not in line, line
    [after] = _runs(client)  # nothing changed: not restarted silently
    assert (after.info.run_id, after.info.status) == (before.info.run_id, before.info.status)
    assert last.stat().st_size == (0 if damage == "zero_bytes" else len(data) // 2)

    assert _train_in_process(root, "trainer.max_epochs=200", "resume=restart") is None
    runs = {r.info.run_id: r for r in _runs(client)}
    assert runs[before.info.run_id].info.status == "KILLED"
    assert runs[before.info.run_id].data.tags.get("reglab.superseded_by_rerun") == "true"
    [fresh] = [r for r in runs.values() if r.info.status == "FINISHED"]
    assert [s for s, _ in _history(client, fresh)] == list(range(200))


# ---------------------------------------------------------------- the tracking server goes away and comes back

def test_a_tracking_server_outage_mid_sweep_loses_nothing(tmp_path, empty_store):
    """`mlflow server` killed for 20 s in the middle of a 3-job sweep, then restarted on the same store and port:
    every child finishes with its whole metric history (MLflow's client retries with back-off,
    docs/reliability.md)."""
    store_db = tmp_path / "server.db"
    shutil.copyfile(empty_store, store_db)
    port = free_port()
    args = ["--multirun", *TINY, "model.width=8,16,24", "trainer.max_epochs=60", "callbacks.early_stopping=null",
            "callbacks.checkpoint.last_every_s=null", "logger.experiment=outage", "logger.log_model=false",
            "hydra/launcher=local", "hydra.launcher.n_jobs=1", f"paths.root={tmp_path}",
            f"hydra.sweep.dir={tmp_path}/sweep", f"logger.tracking_uri=http://127.0.0.1:{port}"]
    with open(tmp_path / "sweep.log", "w") as log:
        with mlflow_server(f"sqlite:///{store_db}", tmp_path, port=port):
            proc = subprocess.Popen([sys.executable, str(SCRIPT), *args], cwd=tmp_path, env=train_env(),
                                    stdout=log, stderr=log)
            deadline = time.monotonic() + 240
            while logged_epoch(tmp_path, db=store_db) < 5 and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
        assert proc.poll() is None, (tmp_path / "sweep.log").read_text()[-3000:]
        time.sleep(20)  # the server is gone; training goes on, its writes wait and retry
        assert proc.poll() is None, "the sweep died while the server was away:\n" + \
            (tmp_path / "sweep.log").read_text()[-3000:]
        with mlflow_server(f"sqlite:///{store_db}", tmp_path, port=port) as url:
            proc.wait(timeout=300)
            out = (tmp_path / "sweep.log").read_text()
            assert proc.returncode == 0, out[-3000:]
            client = mlflow.MlflowClient(url)
            exp = client.get_experiment_by_name("outage")
            kids = client.search_runs([exp.experiment_id])
            assert len(kids) == 3 and all(k.info.status == "FINISHED" for k in kids), [k.info.status for k in kids]
            for k in kids:
                assert [s for s, _ in _history(client, k)] == list(range(60)), k.info.run_name


def test_a_server_gone_for_longer_than_the_retries_stops_the_run_with_one_line_and_it_resumes(tmp_path, empty_store):
    """Retries cut short (MLFLOW_HTTP_REQUEST_MAX_RETRIES=1): the run stops with one line naming the server, stays
    RUNNING with its last checkpoint, and the same command continues it once the server is back."""
    store_db = tmp_path / "server.db"
    shutil.copyfile(empty_store, store_db)
    port = free_port()
    args = [*SOLO, "trainer.max_epochs=300", f"paths.root={tmp_path}", f"logger.tracking_uri=http://127.0.0.1:{port}"]
    quick_retries = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
    with open(tmp_path / "run.log", "w") as log:
        with mlflow_server(f"sqlite:///{store_db}", tmp_path, port=port):
            proc = subprocess.Popen([sys.executable, str(SCRIPT), *args], cwd=tmp_path,
                                    env=train_env(**quick_retries), stdout=log, stderr=log)
            deadline = time.monotonic() + 240
            while logged_epoch(tmp_path, db=store_db) < 3 and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
        proc.wait(timeout=120)  # the server is gone for good
    err = (tmp_path / "run.log").read_text()
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1, err[-3000:]
    assert f"127.0.0.1:{port}" in lines[0] and "rerun the same command" in lines[0] and "Traceback" not in err
    with mlflow_server(f"sqlite:///{store_db}", tmp_path, port=port) as url:
        client = mlflow.MlflowClient(url)
        [run] = _runs(client)
        assert run.info.status == "RUNNING"
        r = train_cli(*args, cwd=tmp_path, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        [run] = _runs(client)
        assert run.info.status == "FINISHED"
        assert [s for s, _ in _history(client, run)] == list(range(300))


# ---------------------------------------------------------------- many writers

def test_many_writers_through_a_server_and_into_sqlite_lose_nothing():
    """scripts/bench_writers.py at a test's size (its full size is docs/reliability.md's figure): every run, param
    and metric point lands, through an `mlflow server` with 2 workers and straight into one SQLite file."""
    r = subprocess.run([sys.executable, str(SCRIPT.with_name("bench_writers.py")), "--server-procs", "4",
                        "--sqlite-procs", "2", "--runs", "2"], capture_output=True, text=True, timeout=600,
                       env=train_env())
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert r.stdout.count("| True |") == 2, r.stdout
