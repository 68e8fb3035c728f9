"""reglab/preemption.py in a job of submitit: its time-limit warning (SIGUSR2) is a stop request, handed back to
submitit's own handler (which requeues the job) once the runs are kept, or after SUBMITIT_FALLBACK_S if the job never
reaches a point where it stops. The end-to-end requeue is tests/test_cluster_faults.py's."""

from __future__ import annotations

import os
import signal
import time

import pytest

from reglab import preemption


@pytest.fixture
def submitit_job(monkeypatch):
    """This process as a submitit job whose handler for SIGUSR2 records its calls (submitit's requeues and exits)."""
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    monkeypatch.delenv("SUBMITIT_PREEMPT_SIGNAL", raising=False)
    calls = []
    before = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))
    preemption.reset()
    preemption.install()
    yield calls
    preemption.reset()
    signal.signal(signal.SIGUSR2, before)


def test_the_warning_is_a_stop_request_and_hand_back_gives_it_to_submitit(submitit_job):
    os.kill(os.getpid(), signal.SIGUSR2)
    assert preemption.requested() and submitit_job == []  # submitit's handler waits for the runs to be kept
    assert preemption.name().startswith("SIGUSR2 (submitit")
    assert signal.getitimer(signal.ITIMER_REAL)[0] > 0  # the fallback is armed
    preemption.hand_back()
    assert submitit_job == [signal.SIGUSR2]
    assert signal.getitimer(signal.ITIMER_REAL)[0] == 0  # and disarmed


def test_a_job_that_does_not_stop_in_time_is_handed_back_anyway(submitit_job, monkeypatch):
    monkeypatch.setattr(preemption, "SUBMITIT_FALLBACK_S", 1)
    os.kill(os.getpid(), signal.SIGUSR2)
    deadline = time.monotonic() + 10
    while not submitit_job and time.monotonic() < deadline:
        time.sleep(0.05)  # a data set-up that never checks for the stop
    assert submitit_job == [signal.SIGUSR2]


def test_a_job_submitit_will_not_requeue_ends_stopped_with_one_line(submitit_job, capsys):
    def refuse(signum, frame):
        raise RuntimeError("Job not requeued because: timed-out too many times.")

    preemption._previous[signal.SIGUSR2] = refuse
    os.kill(os.getpid(), signal.SIGUSR2)
    preemption.hand_back()  # before: the error left the job, and the launching process crashed on it
    assert capsys.readouterr().err.strip() == (
        "submitit did not requeue this job (RuntimeError: Job not requeued because: timed-out too many times.); "
        "rerun the same command to continue its runs")


def test_outside_submitit_sigusr2_is_left_alone(monkeypatch):
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    before = signal.getsignal(signal.SIGUSR2)
    preemption.install()
    try:
        assert signal.getsignal(signal.SIGUSR2) is before
    finally:
        preemption.reset()
