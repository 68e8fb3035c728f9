"""No outbound network, loopback-only servers, weights-only checkpoint loading, and `_target_` limited to an
allowlist (docs/reliability.md, Security)."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from reglab.config import ALLOWED_TARGETS
from train_cli import SCRIPT, TINY, train_env

ROOT = Path(__file__).resolve().parents[1]
CODE = sorted([*(ROOT / "src").rglob("*.py"), *(ROOT / "scripts").rglob("*.py")])
CONFIGS = sorted((ROOT / "conf").rglob("*.yaml"))
# Set by `import reglab`; stripped from the child's environment so the test sees what reglab itself sets.
NO_NETWORK_VARS = ("NO_ALBUMENTATIONS_UPDATE", "MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK")

# Runs a Python program with an audit hook that refuses (and records) every connection or name lookup that is not
# loopback; the record goes to $NETWORK_LOG as JSON at exit, so an attempt a library swallows is still seen.
GUARD = r"""
import atexit, ipaddress, json, os, runpy, socket, sys

attempts = []

def loopback(host):
    host = str(host).split("%")[0]
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

def guard(event, args):
    if event == "socket.connect" and isinstance(args[1], tuple) and not loopback(args[1][0]):
        attempts.append(f"connect {args[1]!r}")
        raise ConnectionRefusedError(f"network guard: no outbound connections ({args[1]!r})")
    if event == "socket.getaddrinfo" and args[0] is not None and not loopback(args[0]):
        attempts.append(f"getaddrinfo {args[0]!r}")
        raise socket.gaierror(f"network guard: no name lookups ({args[0]!r})")

sys.addaudithook(guard)
atexit.register(lambda: open(os.environ["NETWORK_LOG"], "w").write(json.dumps(attempts)))
sys.argv = sys.argv[1:]
if sys.argv[0] == "-c":
    exec(sys.argv[1])
else:
    runpy.run_path(sys.argv[0], run_name="__main__")
"""


def guarded(args: list[str], tmp_path: Path) -> tuple[subprocess.CompletedProcess, list[str]]:
    log = tmp_path / "network.json"
    # Without proxy variables: behind a proxy the guard would record the proxy's host, not the one asked for.
    env = {k: v for k, v in train_env(NETWORK_LOG=str(log)).items()
           if k not in NO_NETWORK_VARS and not k.lower().endswith("_proxy")}
    r = subprocess.run([sys.executable, "-c", GUARD, *args], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=180)
    return r, json.loads(log.read_text())


def test_the_guard_sees_what_albumentations_does_without_reglab(tmp_path):
    """Control: imported without reglab, albumentations 2.0.8 asks PyPI for its latest version (and swallows the
    failure). The guard records it, so an empty record below means no attempt, not a blind guard."""
    r, attempts = guarded(["-c", "import albumentations"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert any("pypi.org" in a for a in attempts), attempts


def test_training_with_tracking_and_augmentation_makes_no_outbound_connection(tmp_path):
    """A real CLI run: MLflow store, run, params, metrics and the checkpoint artifact; albumentations imported."""
    r, attempts = guarded([str(SCRIPT), *TINY, "augmentation=digits_safe", "trainer.max_epochs=2",
                           f"paths.root={tmp_path}"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert attempts == []
    assert (tmp_path / "mlruns" / "mlflow.db").exists() and any((tmp_path / "mlruns" / "artifacts").rglob("*.ckpt"))


def _joined_lines(path: Path) -> list[str]:
    return path.read_text().replace("\\\n", " ").splitlines()  # shell/make continuation lines as one


def test_servers_the_project_starts_bind_loopback_only():
    """Nothing binds every interface; every `mlflow ui|server` command (Makefile, CI, shell scripts) names
    --host 127.0.0.1. The Python code starts no server."""
    commands = [ROOT / "Makefile", ROOT / "Dockerfile", *(ROOT / ".ci").rglob("*"), *(ROOT / "scripts").rglob("*.sh")]
    starts = 0
    for path in {p for p in [*commands, *CODE, *CONFIGS] if p.is_file()}:
        for line in _joined_lines(path):
            line = re.sub(r"(^|\s)#.*", "", line)  # comments may name a server; commands start them
            assert "0.0.0.0" not in line, f"{path}: {line.strip()}"
            if path in commands and re.search(r"mlflow\S*\s+(ui|server)\b", line):
                starts += 1
                assert re.search(r"--host[ =](127\.0\.0\.1|\$\(UI_HOST\)|\$\{?UI_HOST)", line), \
                    f"{path}: {line.strip()}"
            if path in CODE:
                assert not re.search(r"""["']mlflow["'],\s*["'](ui|server)["']""", line), f"{path}: {line.strip()}"
    assert starts >= 1  # `make ui` at least


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            yield node, node.func.attr, {k.arg: k.value for k in node.keywords}


def _true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


@pytest.mark.parametrize("path", CODE, ids=lambda p: str(p.relative_to(ROOT)))
def test_checkpoints_are_loaded_weights_only(path):
    """torch.load(..., weights_only=True), and Lightning's fit/validate/test given a ckpt_path pass it on: a
    checkpoint is data, never code (a pickled object in it would otherwise run on load)."""
    for call, name, kwargs in _calls(ast.parse(path.read_text())):
        where = f"{path.relative_to(ROOT)}:{call.lineno}"
        if name == "load" and isinstance(call.func.value, ast.Name) and call.func.value.id == "torch":
            assert _true(kwargs.get("weights_only")), f"{where}: torch.load without weights_only=True"
        if name in ("fit", "validate", "test") and "ckpt_path" in kwargs:
            assert _true(kwargs.get("weights_only")), f"{where}: {name}(ckpt_path=...) without weights_only=True"


def _targets(node, key=""):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "_target_":
                yield key + k, v
            yield from _targets(v, f"{key}{k}.")
    elif isinstance(node, list):
        for v in node:
            yield from _targets(v, key)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "conf")))
def test_every_config_target_is_on_the_allowlist(path):
    for key, target in _targets(yaml.safe_load(path.read_text())):
        assert str(target).startswith(ALLOWED_TARGETS), f"{path}: {key}={target}"


def test_no_network_environment_is_set_by_importing_reglab():
    code = "import os, reglab; print([os.environ.get(k) for k in %r])" % (NO_NETWORK_VARS,)
    env = {k: v for k, v in os.environ.items() if k not in NO_NETWORK_VARS}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['1', 'true', 'true']"
