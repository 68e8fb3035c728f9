"""Many writers to one MLflow store: N processes through one `mlflow server` (SQLite behind it) and M processes
straight into one SQLite file, each R runs x P params x K metric points, the way a SLURM array of reglab jobs logs.
Counts what landed (every run, param and point must) and prints the throughput (points/s) of each way.

    python scripts/bench_writers.py                       # 16 via the server (2 workers), 8 to SQLite, 5 x 50 x 200
    python scripts/bench_writers.py --server-procs 4 --sqlite-procs 4 --runs 2    # the test's size

Each process logs its runs as reglab's RunLogger does: the params in one request, then the points as synchronous
batches of 10 (an epoch's metrics) with the run's reglab.logged_epoch tag. Exit status 1 if anything is missing.
Results: docs/reliability.md ("Many writers").
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

PER_BATCH = 10  # metric points per request: one epoch's metrics


def writer(uri: str, experiment_id: str, tag: str, runs: int, params: int, points: int, start_at: float) -> float:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    time.sleep(max(0.0, start_at - time.time()))  # every process starts writing at once
    t0 = time.perf_counter()
    for r in range(runs):
        run = client.create_run(experiment_id, run_name=f"{tag}-r{r}", tags={"writer": tag})
        rid = run.info.run_id
        client.log_batch(rid, params=[Param(f"p{i}", str(i)) for i in range(params)], synchronous=True)
        now = int(time.time() * 1000)
        for b in range(0, points, PER_BATCH):
            ms = [Metric(f"m{k}", float(b + k), now, b // PER_BATCH) for k in range(min(PER_BATCH, points - b))]
            client.log_batch(rid, metrics=ms, tags=[RunTag("reglab.logged_epoch", str(b // PER_BATCH))],
                             synchronous=True)
        client.set_terminated(rid)
    return time.perf_counter() - t0


def _healthy(url: str) -> bool:
    try:
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _new_store(folder: Path) -> str:
    from reglab.runs import store

    uri, _ = store.resolve(f"sqlite:///{folder / 'mlflow.db'}", folder)
    return uri


def run_case(name: str, uri: str, procs: int, runs: int, params: int, points: int) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.create_experiment(f"writers-{name}-{time.time_ns()}")
    start_at = time.time() + 3.0 + 0.5 * procs  # after every process has imported mlflow
    with mp.get_context("spawn").Pool(procs) as pool:
        t0 = time.time()
        times = pool.starmap(writer, [(uri, exp, f"w{i}", runs, params, points, start_at) for i in range(procs)])
    wall = time.time() - max(start_at, t0)
    found = client.search_runs([exp], max_results=10_000)
    landed_params = sum(len(r.data.params) for r in found)
    landed_points = sum(len(client.get_metric_history(r.info.run_id, f"m{k}")) for r in found
                        for k in range(PER_BATCH))
    want_runs, want_points = procs * runs, procs * runs * points
    return {"case": name, "processes": procs, "runs": f"{len(found)}/{want_runs}",
            "params": f"{landed_params}/{want_runs * params}", "points": f"{landed_points}/{want_points}",
            "complete": len(found) == want_runs and landed_params == want_runs * params and landed_points == want_points,
            "wall_s": round(wall, 1), "points_per_s": round(want_points / wall, 1),
            "slowest_process_s": round(max(times), 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--server-procs", type=int, default=16)
    ap.add_argument("--server-workers", type=int, default=2)
    ap.add_argument("--sqlite-procs", type=int, default=8)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--params", type=int, default=50)
    ap.add_argument("--points", type=int, default=200)
    args = ap.parse_args()
    if args.server_procs < 0 or args.sqlite_procs < 0 or not (args.server_procs or args.sqlite_procs):
        ap.error("--server-procs and --sqlite-procs: >= 0 each, one of them > 0 (no case to run)")
    for name in ("server_workers", "runs", "params", "points"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')}={getattr(args, name)}: must be >= 1")
    os.environ.update({"MLFLOW_DISABLE_TELEMETRY": "true", "NO_PROXY": "127.0.0.1,localhost",
                       "no_proxy": "127.0.0.1,localhost"})
    work = Path(tempfile.mkdtemp(prefix="bench_writers-"))
    results, server = [], None
    try:
        if args.server_procs:
            backend = _new_store(work / "server")
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
            from mlflow_server import free_port

            port = free_port()
            url = f"http://127.0.0.1:{port}"
            server = subprocess.Popen(
                [str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri", backend,
                 "--artifacts-destination", str(work / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
                 "--workers", str(args.server_workers)], cwd=work, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, start_new_session=True,
                env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
            deadline = time.time() + 120
            while not _healthy(url):
                if server.poll() is not None or time.time() > deadline:
                    raise SystemExit(f"mlflow server did not come up on {url}")
                time.sleep(0.5)
            results.append(run_case(f"server ({args.server_workers} workers, SQLite behind it)", url,
                                    args.server_procs, args.runs, args.params, args.points))
        if args.sqlite_procs:
            results.append(run_case("SQLite file, direct", _new_store(work / "direct"), args.sqlite_procs,
                                    args.runs, args.params, args.points))
    finally:
        if server is not None:
            import contextlib
            import signal

            with contextlib.suppress(ProcessLookupError):  # a server that died at start-up: its message stands
                os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)
    cols = list(results[0])
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in results:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    print(f"({os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end)")
    return 0 if all(r["complete"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
