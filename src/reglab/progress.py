"""What a researcher sees while a sweep runs: one live view on a terminal, one line per finished member in a log.

A multirun's jobs run in other processes (joblib's loky workers, SLURM), so they tell the launching process how far
they are through a file: each job appends small JSON lines to `<hydra.sweep.dir>/progress.jsonl` (one `write` of
one line with O_APPEND each, so lines of parallel jobs never interleave), and the launching process reads what was
added every half second. A worker that is killed leaves at most a line without its newline, which is never read.
Nothing listens anywhere. SLURM jobs on other nodes write into the sweep folder on the shared disk; NFS does not
promise atomic appends from several nodes, and a line two writers garbled is skipped (the view then misses it).

Events, each with the job's number `job` and time `t`:
  job     a job starts (cli.run_job): `members`, each member's overrides (a population job lists all of its members)
  epoch   a job's fit reached epoch `epoch` of `of` (reglab.progress_bar.RunProgressBar, at most one a second)
  member  one member of a population finished (`members_done`): `member`, `status`, `metrics`
  end     a job ended (cli.run_job): the metrics of a one-member job, or the `error` that ended it

The launching process (`Watcher`, started by runs.study.StudyCallback) knows every member before any job starts
(the grid Hydra's basic sweeper expands, `grid`), applies the events to a `Sweep` and shows them: when stderr is a
terminal, a Rich live view (members done / total, the running jobs with their members and epoch, elapsed, time
left); otherwise one line per finished member (`model.width=48 seed=3  test/err=0.2650 train/err=0.0000  41s
[3/28]`). At the end, one line: the counts, the study's headline (its parent run's `summary/*` metrics) and where
the report is. A single run keeps Lightning's Rich progress bar (reglab/progress_bar.py, conf/callbacks/progress.yaml).
This module imports neither Lightning nor Rich at import: scripts/train.py fails on a bad value before they load.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import math
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterator

from reglab import preemption

EVENTS = "progress.jsonl"
OUTPUT = "output.log"  # on a terminal, a sweep job's own prints go here: the live view owns the screen
POLL_S = 0.5
TRAIN_ERR = ("train_eval/err", "train/err")  # eval-mode error on the training set when logged, else training-mode


# ------------------------------------------------------------------ in a job's process


@dataclass
class Job:
    """A multirun job as its own process sees it: where it reports, its number, its overrides."""

    events: Path
    num: int
    overrides: list[str]
    output_dir: Path


def current_job() -> Job | None:
    """This process's multirun job, or None (a single run, a test calling train.run)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None
    return Job(Path(hc.sweep.dir).resolve() / EVENTS, int(hc.job.num), list(hc.overrides.task),
               Path(hc.runtime.output_dir))


def emit(job: Job | None, event: str, **fields: Any) -> None:
    """Append one event line. Progress is an observation: a full disk must not stop training, so OSError is dropped."""
    if job is None:
        return
    line = json.dumps({"ev": event, "job": job.num, "t": time.time(), **fields}, separators=(",", ":")) + "\n"
    try:
        job.events.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(job.events, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
    except OSError:
        pass


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def job_members(cfg: Any, overrides: list[str]) -> list[list[str]]:
    """Each member's overrides as its solo job would have them: a population job's shared overrides plus one
    `population.members` entry (reglab/population/sweeper.py writes them so), or the job's own."""
    entries = list((cfg.get("population") or {}).get("members") or [])
    if not entries:
        return [list(overrides)]
    common = [o for o in overrides if _key(o) != "population.members"]
    return [common + str(e).split() for e in entries]


def job_started(cfg: Any) -> None:
    job = current_job()
    if job is not None:
        emit(job, "job", members=job_members(cfg, job.overrides), pid=os.getpid())


def job_ended(metrics: dict[str, float] | None, error: str | None = None, stopped: bool = False) -> None:
    """`stopped`: preempted (SIGTERM or Ctrl-C, reglab/preemption.py), not failed: the rerun continues it."""
    emit(current_job(), "end", metrics=_finite(metrics), error=error, stopped=stopped)


@contextlib.contextmanager
def job_output() -> Iterator[None]:
    """On a terminal, a sweep job's prints and warnings go to <job folder>/output.log instead of breaking the
    launching process's live view (the job's errors still reach the screen: cli.run_job prints them after)."""
    job = current_job()
    if job is None or not sys.stderr.isatty():
        yield
        return
    job.output_dir.mkdir(parents=True, exist_ok=True)
    with open(job.output_dir / OUTPUT, "a") as f:
        out = WatchedOutput(f)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            yield


class WatchedOutput:
    """A job's prints on their way to output.log while a person watches the sweep's view: `isatty` still says so
    (reglab.train keeps the progress bar, which reports the epochs, only then)."""

    def __init__(self, file: IO[str]):
        self.file = file

    def write(self, text: str) -> int:
        return self.file.write(text)

    def flush(self) -> None:
        self.file.flush()

    def isatty(self) -> bool:
        return True

    def __getattr__(self, name: str) -> Any:
        return getattr(self.file, name)


def members_done(cfg: Any, metrics: list[dict[str, float]], trained: list[int], job: Job | None = None) -> None:
    """A population job's members, each with its final metrics (reglab/population/train.py calls this at its end):
    `skipped` for those finished before this job, `failed` for a member whose metrics are not finite (diverged)."""
    job = job or current_job()
    if job is None:
        return
    for i, (member, m) in enumerate(zip(job_members(cfg, job.overrides), metrics)):
        finite = all(math.isfinite(v) for v in m.values()) and bool(m)
        status = "done" if i in trained and finite else "failed" if i in trained else "skipped"
        emit(job, "member", member=member, status=status, metrics=_finite(m),
             error=None if finite or i not in trained else "diverged")


def _finite(metrics: dict[str, float] | None) -> dict[str, float] | None:
    if metrics is None:
        return None
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}


# ------------------------------------------------------------------ in the launching process


def grid(config: Any) -> tuple[list[list[str]] | None, list[str]] | None:
    """(every member's overrides, the swept keys) as Hydra's basic sweeper expands them (the population sweeper
    expands the same grid before it merges members into jobs); for the Optuna sweeper, which chooses members as it
    goes, (None, its search space's keys and the seed); None for another sweeper."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf import OmegaConf

    target = str(OmegaConf.select(config, "hydra.sweeper._target_", default="") or "")
    if target.endswith("OptunaSweeper"):  # trials, then the best and the preset's values with other seeds
        return None, [*(OmegaConf.select(config, "hydra.sweeper.params") or {}), "seed"]
    if not target.endswith(("PopulationSweeper", "BasicSweeper")):
        return None
    params = [f"{k}={v}" for k, v in (OmegaConf.select(config, "hydra.sweeper.params") or {}).items()]
    try:
        overrides = OverridesParser.create().parse_overrides(params + list(config.hydra.overrides.task))
        jobs = [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]
    except HydraException:  # a glob over a config group needs Hydra's loader: the members are learnt as they start
        return None
    # Swept: keys with more than one value in the grid (a command line's seed=0 over a preset's seed sweep is not).
    keys = list(dict.fromkeys(o.get_key_element().lstrip("+~") for o in overrides if o.is_sweep_override()))
    varying = [k for k in keys if len({o for job in jobs for o in job if _key(o) == k}) > 1]
    return jobs, varying or keys


@dataclass
class Member:
    label: str
    status: str = "pending"  # pending | running | done | skipped (finished before this sweep) | failed
    job: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float | None = None
    error: str | None = None


@dataclass
class JobState:
    num: int
    members: list[frozenset]
    started: float
    epoch: int | None = None
    of: int | None = None
    first_epoch: int | None = None  # where its fit started (a resumed fit: past 0)
    ended: bool = False


def fmt_seconds(s: float) -> str:
    s = max(0, int(round(s)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Sweep:
    """The sweep as the launching process knows it: members, jobs, what each event changes. Time is passed in
    (`now`) so that tests can replay events."""

    def __init__(self, members: list[list[str]] | None, swept: list[str], epochs: int | None, start: float):
        self.swept = list(swept)
        self.members: dict[frozenset, Member] = {}
        self.jobs: dict[int, JobState] = {}
        self.epochs = epochs  # a member's epochs before its job reports them (trainer.max_epochs)
        self.start = start
        self.finished = 0
        self.known_total = members is not None
        for m in members or []:
            self._member(m)

    def _member(self, overrides: list[str]) -> Member:
        key = frozenset(overrides)
        if key not in self.members:
            shown = [o for o in overrides if _key(o) in self.swept] or list(overrides)
            self.members[key] = Member(" ".join(shown))
        return self.members[key]

    @property
    def total(self) -> int:
        return len(self.members)

    def count(self) -> str:
        return f"[{self.finished}/{self.total if self.known_total else '?'}]"

    def apply(self, ev: dict[str, Any]) -> list[str]:
        """Apply one event; the lines of the members it finished."""
        kind, num, t = ev.get("ev"), ev.get("job"), float(ev.get("t") or 0.0)
        if kind == "job":
            keys = [frozenset(m) for m in ev.get("members") or []]
            for m in ev.get("members") or []:
                member = self._member(m)
                if member.status == "stopped":  # its job requeued (submitit after a time limit) or run again
                    self.finished -= 1
                    member.status = "pending"
                if member.status == "pending":
                    member.status, member.job = "running", num
            self.jobs[num] = JobState(num, keys, t)
            return []
        job = self.jobs.get(num)
        if job is None:  # the job's start line came before this sweep (another run into the same folder)
            return []
        if kind == "epoch":
            job.epoch, job.of = int(ev["epoch"]), int(ev.get("of") or 0) or job.of
            if job.first_epoch is None:
                job.first_epoch = job.epoch
            return []
        if kind == "member":
            return self._finish(self._member(ev["member"]), ev.get("status", "done"), ev.get("metrics"),
                                ev.get("error"), t - job.started)
        if kind == "end":
            job.ended = True
            lines = []
            for key in job.members:
                member = self.members[key]
                if member.status != "running":
                    continue
                if ev.get("stopped"):
                    lines += self._finish(member, "stopped", None, ev.get("error"), t - job.started)
                elif ev.get("error") or ev.get("metrics") is None or len(job.members) > 1:
                    lines += self._finish(member, "failed", None, ev.get("error") or "the job returned nothing",
                                          t - job.started)
                else:
                    lines += self._finish(member, "done", ev["metrics"], None, t - job.started)
            return lines
        return []

    def _finish(self, member: Member, status: str, metrics: dict | None, error: str | None,
                seconds: float) -> list[str]:
        if member.status in ("done", "skipped", "failed", "stopped"):
            return []
        member.status, member.metrics, member.error, member.seconds = status, metrics or {}, error, seconds
        self.finished += 1
        return [self.line(member)]

    def line(self, member: Member) -> str:
        """`model.width=48 seed=3  test/err=0.2650 train_eval/err=0.0000  41s  [3/28]`"""
        if member.status == "failed":
            return f"{member.label}  failed: {member.error}  {self.count()}"
        if member.status == "stopped":
            # The job's own reason (the signal came to its process: SIGTERM, submitit's SIGUSR2), up to its advice.
            reason = (member.error or "").split(";")[0] or f"stopped by {preemption.name()}"
            return f"{member.label}  {reason} (the rerun continues it)  {self.count()}"
        m = member.metrics
        errs = [f"test/err={m['test/err']:.4f}"] if "test/err" in m else []
        errs += [f"{k}={m[k]:.4f}" for k in TRAIN_ERR if k in m][:1]
        when = "done before" if member.status == "skipped" else fmt_seconds(member.seconds or 0)
        return f"{member.label}  {' '.join(errs) or 'no test/err'}  {when}  {self.count()}"

    # ---- time left: member-epochs, counted from what the jobs report
    def eta(self, now: float) -> float | None:
        """Seconds left: the member-epochs still to train over the rate at which this sweep has trained them (jobs
        in parallel included). None before any epoch was reported."""
        done = left = 0.0
        for member in self.members.values():
            job = self.jobs.get(member.job) if member.job is not None else None
            epochs = (job.of if job and job.of else None) or self.epochs or 1
            first = job.first_epoch if job and job.first_epoch is not None else 0
            if member.status == "pending":
                left += epochs
            elif member.status == "running":
                at = job.epoch if job and job.epoch is not None else first
                done += at - first
                left += epochs - at
            elif member.status == "done":
                done += epochs - first
        if done <= 0:
            return None
        return left * (now - self.start) / done

    def running(self) -> list[tuple[JobState, list[Member]]]:
        out = []
        for job in self.jobs.values():
            members = [self.members[k] for k in job.members if self.members[k].status == "running"]
            if members and not job.ended:
                out.append((job, members))
        return out

    def summary_label(self, members: list[Member]) -> str:
        """`model.width=8,16 seed=0-4 (10)`: the values of each swept key among a job's members."""
        if len(members) == 1:
            return members[0].label
        values: dict[str, list[str]] = {}
        for m in members:
            for part in m.label.split():
                k, _, v = part.partition("=")
                if v not in values.setdefault(k, []):
                    values[k].append(v)
        return " ".join(f"{k}={','.join(v)}" for k, v in values.items()) + f" ({len(members)})"

    def render(self, now: float):
        """The live view: a bar of members done, elapsed and time left, then one row per running job."""
        from rich.console import Group
        from rich.progress_bar import ProgressBar as Bar
        from rich.table import Table
        from rich.text import Text

        head = Table.grid(padding=(0, 1))
        eta = self.eta(now)
        failed = sum(m.status == "failed" for m in self.members.values())
        head.add_row(Text("sweep", style="bold"), Text(f"{self.finished}/{self.total} members"),
                     Bar(total=max(self.total, 1), completed=self.finished, width=30),
                     Text(f"{fmt_seconds(now - self.start)} elapsed"),
                     Text(f"~{fmt_seconds(eta)} left" if eta is not None else "~? left"),
                     Text(f"{failed} failed", style="red") if failed else Text(""))
        rows = Table.grid(padding=(0, 2))
        for job, members in self.running():
            epoch = f"epoch {job.epoch}/{job.of}" if job.epoch is not None else "starting"
            rows.add_row(Text(f"  job {job.num}", style="dim"), Text(self.summary_label(members)),
                         Text(epoch), Text(fmt_seconds(now - job.started), style="dim"))
        return Group(head, rows)

    def final_line(self, now: float, headline: str = "", where: str = "") -> str:
        failed = sum(m.status == "failed" for m in self.members.values())
        skipped = sum(m.status == "skipped" for m in self.members.values())
        stopped = sum(m.status == "stopped" for m in self.members.values())
        parts = [f"sweep: {self.finished - stopped}/{self.total} members in {fmt_seconds(now - self.start)}"
                 + (f" ({skipped} done before)" if skipped else "") + (f", {failed} FAILED" if failed else "")
                 + (f", {stopped} stopped by {preemption.name()}" if stopped else "")]
        return " | ".join(parts + [p for p in (headline, where) if p])


def headline(parent: Any) -> str:
    """`study: peak_width=48 threshold_width=24 peak_minus_first_min=0.0530 ± 0.0080` from the parent run's
    `summary/*` metrics (a report writes them: reglab/studies/double_descent.py), `<x>_se` beside `<x>`."""
    metrics = {k.removeprefix("summary/"): v for k, v in parent.data.metrics.items() if k.startswith("summary/")}
    bits = []
    for k in sorted(k for k in metrics if not k.endswith("_se") and math.isfinite(metrics[k])):  # NaN: none (no peak)
        v = metrics[k]
        text = f"{int(v)}" if float(v).is_integer() else f"{v:.4f}"
        if f"{k}_se" in metrics:
            text += f" ± {metrics[f'{k}_se']:.4f}"
        bits.append(f"{k}={text}")
    study = parent.data.tags.get("study", "study")
    return f"{study}: {' '.join(bits)}" if bits else ""


class Watcher:
    """Reads the sweep's events file from where it ended when the sweep started, every POLL_S seconds in a
    thread, and shows the sweep: a Rich live view on a terminal (started at the first event, after Hydra's launch
    lines), else one line per finished member on `stream`."""

    def __init__(self, path: Path, sweep: Sweep, stream: IO[str], live: bool):
        self.path, self.sweep, self.stream, self.live = path, sweep, stream, live
        self.offset = path.stat().st_size if path.exists() else 0
        self._partial = b""
        self._view = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="reglab-progress", daemon=True)

    @classmethod
    def start(cls, config: Any, stream: IO[str] | None = None) -> "Watcher":
        from omegaconf import OmegaConf

        stream = stream or sys.stderr
        expanded = grid(config)
        members, swept = expanded if expanded else (None, [])
        epochs = OmegaConf.select(config, "trainer.max_epochs", default=None)
        path = Path(config.hydra.sweep.dir).resolve() / EVENTS
        w = cls(path, Sweep(members, swept, int(epochs) if epochs else None, time.time()), stream,
                live=stream.isatty())
        w._thread.start()
        atexit.register(w.stop)  # a sweep that raises never reaches on_multirun_end: leave the terminal clean
        return w

    def _read(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(chunk)
        *lines, self._partial = (self._partial + chunk).split(b"\n")
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def poll(self) -> None:
        with self._lock:
            events = self._read()
            for ev in events:
                for line in self.sweep.apply(ev):
                    if not self.live:
                        print(line, file=self.stream, flush=True)
            if self.live and (events or self._view is not None):
                self._show()

    def _show(self) -> None:
        from rich.console import Console
        from rich.live import Live

        view = self.sweep.render(time.time())
        if self._view is None:
            self._view = Live(view, console=Console(file=self.stream), auto_refresh=False, transient=False,
                              redirect_stdout=False, redirect_stderr=False)
            self._view.start(refresh=True)
        else:
            self._view.update(view, refresh=True)

    def _loop(self) -> None:
        while not self._stop.wait(POLL_S):
            self.poll()

    def stop(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        self.poll()  # what the last jobs wrote after the last poll
        if self._view is not None:
            self._view.stop()
            self._view = None

    def finish(self, parent: Any = None, report: Path | str | None = None, sweep_dir: str | None = None) -> str:
        """Stop, and print the sweep's last line: counts, the study's headline, where its report (or the sweep's
        folder) is."""
        self.stop()
        where = f"report: {report}" if report else (f"outputs: {sweep_dir}" if sweep_dir else "")
        line = self.sweep.final_line(time.time(), headline(parent) if parent is not None else "", where)
        print(line, file=self.stream, flush=True)
        return line


# The launching process's watcher, a module global: Hydra's joblib launcher pickles its callbacks to the workers, and
# a thread cannot be pickled.
_watcher: Watcher | None = None


def start(config: Any) -> Watcher:
    global _watcher
    stop()
    _watcher = Watcher.start(config)
    return _watcher


def stop() -> None:
    if _watcher is not None:
        _watcher.stop()


def finish(parent: Any = None, report: Path | str | None = None, sweep_dir: str | None = None) -> str | None:
    """The sweep's last line (Watcher.finish); None when no sweep was watched."""
    global _watcher
    w, _watcher = _watcher, None
    return w.finish(parent, report, sweep_dir) if w is not None else None
