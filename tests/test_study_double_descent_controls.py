"""The double-descent controls (+exp=double_descent_{noise,samplewise,l2}): their reports on small synthetic stores
(child runs written directly, no training) against numbers computed by hand, and the presets' grids and fusing
against what their headers say."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import CONF, compose
from scipy import stats

from reglab.population.sweeper import member_keys, why_not
from reglab.studies import double_descent_controls as ddc

T2 = stats.t.ppf(0.975, 2)  # 3 seeds: Student t with 2 degrees of freedom


def study(uri: str, name: str, rows: list[dict], failed: dict | None = None):
    """A parent and one FINISHED child per row ({param: value, ..., "test/err": e, "train/err": t}), plus one FAILED
    child with the params `failed`, as a sweep leaves them in MLflow."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    from reglab.runs.study import child_tags

    client = MlflowClient(uri)
    exp = client.create_experiment(f"controls_{name}")
    parent = client.create_run(exp, run_name=name, tags={"study": name, "reglab.role": "parent"}).info.run_id
    for row in rows:
        run = client.create_run(exp, tags=child_tags(parent, name)).info.run_id
        params = [Param(k, str(v)) for k, v in row.items() if "/" not in k]
        metrics = [Metric(k, v, 0, 299) for k, v in row.items() if "/" in k]
        metrics.append(Metric("test/loss", 2 * row["test/err"], 0, 300))
        client.log_batch(run, metrics=metrics, params=params)
        client.set_terminated(run)
    if failed:
        run = client.create_run(exp, tags=child_tags(parent, name)).info.run_id
        client.log_batch(run, params=[Param(k, str(v)) for k, v in failed.items()])
        client.set_terminated(run, "FAILED")
    return client, client.get_run(parent)


def se(values) -> float:
    return float(np.std(values, ddof=1) / math.sqrt(len(values)))


# Label noise 0 and 20%, widths 8, 16, 32, seeds 0-2; test error of seed s (train error 0.1 everywhere):
#   0%:  0.5 + 0.01 s, 0.45 + 0.015 s, 0.3 + 0.01 s     falls: its largest rise is 8 -> 16, -0.05 + 0.005 s
#   20%: 0.6 + 0.01 s, 0.5 + 0.01 s,  0.7 + 0.03 s      a peak: 16 -> 32, 0.2 + 0.02 s
NOISE = {0.0: {8: (0.5, 0.01), 16: (0.45, 0.015), 32: (0.3, 0.01)},
         0.2: {8: (0.6, 0.01), 16: (0.5, 0.01), 32: (0.7, 0.03)}}


def test_noise_report_is_mean_and_se_per_noise_and_width_and_the_paired_rise(mlflow_uri, tmp_path):
    rows = [{"data.label_noise": p, "model.width": w, "seed": s, "test/err": a + b * s, "train/err": 0.1}
            for p, curve in NOISE.items() for w, (a, b) in curve.items() for s in range(3)]
    client, parent = study(mlflow_uri, "noise", rows, failed={"data.label_noise": 0.2, "model.width": 64, "seed": 0})
    ddc.report_noise(client, parent, tmp_path)

    c = pd.read_csv(tmp_path / "curves.csv").set_index(["data.label_noise", "model.width"])
    assert len(c) == 6 and (c["n"] == 3).all()
    peak = [0.7, 0.73, 0.76]
    assert c.loc[(0.2, 32), "test/err_mean"] == pytest.approx(0.73)
    assert c.loc[(0.2, 32), "test/err_std"] == pytest.approx(0.03)  # ddof=1
    assert c.loc[(0.2, 32), "test/err_se"] == pytest.approx(se(peak))
    assert c.loc[(0.2, 32), "test/err_ci_high"] == pytest.approx(0.73 + T2 * se(peak))
    assert c.loc[(0.0, 16), "test/err_mean"] == pytest.approx(0.465)
    assert c.loc[(0.2, 32), "test/loss_mean"] == pytest.approx(1.46) and c["train/err_se"].eq(0).all()

    r = pd.read_csv(tmp_path / "rise.csv").set_index("data.label_noise")
    assert (r.loc[0.2, "x_lo"], r.loc[0.2, "x_hi"], r.loc[0.2, "n"]) == (16, 32, 3)
    assert r.loc[0.2, "diff_mean"] == pytest.approx(0.22) and r.loc[0.2, "diff_se"] == pytest.approx(se([.2, .22, .24]))
    assert r.loc[0.2, "distinct"]
    assert (r.loc[0.0, "x_lo"], r.loc[0.0, "x_hi"]) == (8, 16)  # the curve falls: its least negative step
    assert r.loc[0.0, "diff_mean"] == pytest.approx(-0.045) and r.loc[0.0, "diff_se"] == pytest.approx(se([0, .005, .01]))

    summary = (tmp_path / "summary.md").read_text()
    assert "mean over n=3 seeds" in summary and "Left out: 1 child run(s)" in summary
    assert "data.label_noise=0.2 model.width=64 seed=0: FAILED" in summary
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def frame(curves: dict, x: str, line: str, train_err: float = 0.0) -> pd.DataFrame:
    """`results.runs`-shaped rows: curves {line value: {x: (a, b)}} give seed s the test error a + b s."""
    return pd.DataFrame([{line: v, x: xv, "seed": s, "test/err": a + b * s, "train/err": train_err,
                          "test/loss": 2 * (a + b * s)}
                         for v, curve in curves.items() for xv, (a, b) in curve.items() for s in range(3)])


def test_samplewise_rise_finds_where_more_data_hurts():
    # Width 16: 0.6, 0.5, 0.55 (+0.01 s; +0.02 s at 1000) at 250, 500, 1000 examples: 500 -> 1000 hurts by 0.05 + 0.01 s.
    # Width 48 only falls: 0.6 + 0.01 s, 0.5 + 0.02 s, 0.4 + 0.01 s; its largest rise is 250 -> 500, -0.1 + 0.01 s.
    runs = frame({16: {250: (0.6, 0.01), 500: (0.5, 0.01), 1000: (0.55, 0.02)},
                  48: {250: (0.6, 0.01), 500: (0.5, 0.02), 1000: (0.4, 0.01)}}, "data.train_size", "model.width")
    c = ddc.curves(runs, "data.train_size", "model.width").set_index(["model.width", "data.train_size"])
    assert list(c.index) == [(16, 250), (16, 500), (16, 1000), (48, 250), (48, 500), (48, 1000)]
    assert c.loc[(16, 1000), "test/err_mean"] == pytest.approx(0.57) and (c["n"] == 3).all()
    r = ddc.rise(runs, "data.train_size", "model.width").set_index("model.width")
    assert (r.loc[16, "x_lo"], r.loc[16, "x_hi"]) == (500, 1000) and r.loc[16, "distinct"]
    assert r.loc[16, "diff_mean"] == pytest.approx(0.06) and r.loc[16, "diff_se"] == pytest.approx(se([.05, .06, .07]))
    assert (r.loc[48, "x_lo"], r.loc[48, "x_hi"]) == (250, 500)
    assert r.loc[48, "diff_mean"] == pytest.approx(-0.09) and r.loc[48, "diff_ci_high"] < 0


def test_l2_tuned_curve_takes_the_best_decay_per_width():
    # No decay: 0.5 at width 16, a peak of 0.6 (+0.01 s) at 48; decay 0.01: 0.52 and 0.45 (+0.01 s).
    # Tuned: decay 0 at 16, 0.01 at 48, so its rise 16 -> 48 is -0.05 + 0.01 s: the peak is gone.
    runs = frame({0.0: {16: (0.5, 0.0), 48: (0.6, 0.01)}, 0.01: {16: (0.52, 0.0), 48: (0.45, 0.01)}},
                 "model.width", "optim.weight_decay")
    t = ddc.tuned(runs, "model.width", "optim.weight_decay")
    assert (t["optim.weight_decay"] == ddc.TUNED).all() and len(t) == 6
    assert dict(t.groupby("model.width")["tuned_value"].first()) == {16: 0.0, 48: 0.01}
    both = pd.concat([runs, t], ignore_index=True)
    both["optim.weight_decay"] = both["optim.weight_decay"].astype(str)
    r = ddc.rise(both, "model.width", "optim.weight_decay").set_index("optim.weight_decay")
    assert r.loc["0.0", "diff_mean"] == pytest.approx(0.11)  # 0.6 + 0.01 s - 0.5
    assert r.loc[ddc.TUNED, "diff_mean"] == pytest.approx(-0.04)
    assert r.loc[ddc.TUNED, "diff_se"] == pytest.approx(se([0, .01, .02]))


# --- the presets: their grids, runs, jobs and fusing are what their headers say ------------------------------------
PRESETS = {"double_descent_noise": ("report_noise", "model.width", "data.label_noise", None),
           "double_descent_samplewise": ("report_samplewise", "data.train_size", "model.width", "data.train_size"),
           "double_descent_l2": ("report_l2", "model.width", "optim.weight_decay", None)}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_sweeps_what_its_header_says_and_fuses_as_it_says(name):
    report, x, line, unfused = PRESETS[name]
    path = CONF / "exp" / f"{name}.yaml"
    text = path.read_text()
    header = " ".join(line.lstrip("# ").strip() for line in text.splitlines() if line.startswith("#"))
    axes = {k: str(v).split(",") for k, v in yaml.safe_load(text)["hydra"]["sweeper"]["params"].items()}
    assert set(axes) == {x, line, "seed"} and len(axes["seed"]) == 5  # 5 seeds

    runs = int(re.search(r"= (\d+) (?:child )?runs", header).group(1))
    assert runs == math.prod(len(v) for v in axes.values())
    assert f"x seeds 0-{len(axes['seed']) - 1}" in header

    cfg = compose([f"+exp={name}"])
    assert cfg.report._target_ == f"reglab.studies.double_descent_controls.{report}"
    assert cfg.population.mode == "auto" and why_not(cfg) is None  # every member can share a step
    outside = set(axes) - set(member_keys(cfg))  # swept keys that split the grid into groups
    assert outside == ({unfused} if unfused else set())
    groups = math.prod(len(axes[k]) for k in outside)
    n_jobs = yaml.safe_load((CONF / "hydra" / "launcher" / "local.yaml").read_text())["n_jobs"]
    jobs = int(re.findall(r"(\d+) population jobs", header)[-1])  # "..., so N population jobs"
    assert jobs == groups * n_jobs
    assert "Runtime:" in header and "MEASURED" not in header
    assert Path(path).read_text().startswith("# @package _global_\n# Command:  python scripts/train.py +exp=" + name)
