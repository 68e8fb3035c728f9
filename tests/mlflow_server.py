"""A real `mlflow server` / `mlflow ui` for tests: a free 127.0.0.1 port, its own process group (setsid), and the
whole group (uvicorn and its workers) killed afterwards."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

# Ports Chromium refuses to open (ERR_UNSAFE_PORT); ephemeral ports never are, but say so rather than hope.
BROWSER_BLOCKED_PORTS = {5060, 5061, 6000, 6566, 6665, 6666, 6667, 6668, 6669, 6697, 10080}
# Clients of a loopback server must not be sent to a proxy from the environment.
LOOPBACK_ENV = {"NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}


def free_port() -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in BROWSER_BLOCKED_PORTS:
            return port


def _healthy(url: str) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def mlflow_server(backend_uri: str, workdir: Path, command: str = "server", timeout: float = 90,
                  port: int | None = None) -> Iterator[str]:
    """Yields the server's http://127.0.0.1:<port> (a free port unless given: a restarted server keeps its
    address); artifacts it serves go to workdir/mlartifacts."""
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    args = [str(Path(sys.executable).with_name("mlflow")), command, "--backend-store-uri", backend_uri,
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    if command == "server":
        args += ["--artifacts-destination", str(workdir / "mlartifacts")]
    env = {**os.environ, **LOOPBACK_ENV, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log_path = workdir / f"mlflow-{command}-{port}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(args, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not _healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow {command} did not come up on {url}:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        # Workers that outlived the parent are in the same group: make sure none is left.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
