"""scripts/bench_gpu.py case (c), the double-descent population, at its smoke sizes on a CPU (~6 s): every row
measured, the estimate's interpolations exact where they must be. The GPU figures themselves need a lent GPU."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

from train_cli import train_cli

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench_gpu.py"


def load_script():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_interpolations_recover_what_they_assume():
    bench = load_script()
    power = {w: 0.3 * w**1.7 for w in (1, 4, 16)}  # a power law: log-log interpolation is exact on it
    for w in (2, 6, 12, 64):  # between measured widths and past the last one (the end segment extended)
        assert math.isclose(bench.loglog(power, w), 0.3 * w**1.7, rel_tol=1e-12)
    flops = {1: 1.0, 4: 10.0, 16: 160.0, 64: 2560.0}
    measured = {1: 5.0, 16: 8.0}
    assert bench.floor_or_flops(measured, flops, 4) == 5.0  # below the floor: the fastest measured epoch
    assert bench.floor_or_flops(measured, flops, 64) == 8.0 * 16  # above it: the widest measured x FLOPs ratio


def test_population_case_smoke_runs_on_cpu(tmp_path):
    out = train_cli("--smoke", "--cases", "c", script=SCRIPT, cwd=tmp_path, timeout=300, OUT=str(tmp_path),
                    OMP_NUM_THREADS="1")
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [r for r in (tmp_path / "bench_gpu.md").read_text().splitlines() if r.startswith("| (c)")]
    assert len(rows) == 6 and not [r for r in rows if "failed:" in r], rows  # matmul, FLOPs, 2 widths, 2 estimates
    assert all(r.count("|") == 5 for r in rows), rows  # no '|' inside a cell: the markdown table stays 4 columns
    fig = json.loads((tmp_path / "population_widths.json").read_text())
    bench = load_script()
    for w in ("1", "2"):
        r = fig["widths"][w]
        assert len(r["solo_step_s"]) == 2 and r["pop_epoch_s"] > 0 and r["flop_bound_epoch_s"] > 0
        steps = math.ceil(fig["spec"]["n_train"] / fig["spec"]["batch"])  # the last partial batch is a step
        assert math.isclose(r["pop_epoch_s"], steps * r["pop_step_s"] + r["pop_test_s"])
    hours = fig["estimate"]["loglog"]
    assert set(hours) == {"solo", "population", "population NCHW", "FLOP bound"}  # no CUDA graph on a CPU
    solo = {int(w): r["solo_epoch_s"] for w, r in fig["widths"].items()}
    expected = bench.FIG1_EPOCHS * sum(bench.loglog(solo, w) for w in bench.FIG1_WIDTHS) / 3600
    assert math.isclose(hours["solo"], expected, rel_tol=1e-9)


def test_cases_flag_rejects_unknown_case(tmp_path):
    out = train_cli("--cases", "a,x", script=SCRIPT, cwd=tmp_path)
    assert out.returncode == 2 and "--cases" in out.stderr
