"""reglab.results, the numbers every report and claim is made of: summarize (n, mean, sample std with ddof=1, SE,
Student-t 95% interval) and paired (per-seed differences) against hand computation, ranks with ties, and the errors
a wrong column name gives. The same functions on the store of a real study: tests/test_study_early_stopping.py
(`test_results_reads_the_study_store_*`, which reuses that module's sweep instead of training again)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from reglab import results
from reglab.errors import ReglabError

# technique x seed -> test error; seed s shifts every technique by the same amount (its data)
SHIFT = {0: 0.00, 1: 0.05, 2: -0.04, 3: 0.02}
ERR = {"none": {s: 0.30 + d for s, d in SHIFT.items()},
       "a": {0: 0.27, 1: 0.325, 2: 0.23, 3: 0.295},  # none - 0.03, +-0.005 per seed
       "b": {0: 0.31}}  # one seed only


def frame(seed: int = 0) -> pd.DataFrame:
    rows = [{"technique": t, "seed": s, "test/err": e, "size": 100} for t, by in ERR.items() for s, e in by.items()]
    return pd.DataFrame(rows).sample(frac=1, random_state=seed).reset_index(drop=True)  # any row order


def t_half(values) -> float:
    v = np.asarray(values, dtype=float)
    return stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))


def test_summarize_is_mean_sample_std_se_and_a_student_t_interval():
    s = results.summarize(frame(), "technique", "test/err").set_index("technique")
    assert list(s.index) == ["a", "b", "none"]  # sorted by group
    a = list(ERR["a"].values())
    assert s.loc["a", "n"] == 4
    assert s.loc["a", "test/err_mean"] == pytest.approx(np.mean(a))
    assert s.loc["a", "test/err_std"] == pytest.approx(np.std(a, ddof=1))  # not ddof=0
    assert s.loc["a", "test/err_se"] == pytest.approx(np.std(a, ddof=1) / 2)
    assert s.loc["a", "test/err_ci_low"] == pytest.approx(np.mean(a) - t_half(a))
    assert s.loc["a", "test/err_ci_high"] == pytest.approx(np.mean(a) + t_half(a))
    assert t_half(a) > 1.96 * np.std(a, ddof=1) / 2  # t with 3 degrees of freedom, wider than the normal's
    # one seed: a mean, no spread, no interval (NaN, not 0)
    assert s.loc["b", "n"] == 1 and s.loc["b", "test/err_mean"] == pytest.approx(0.31)
    assert s.loc["b", ["test/err_std", "test/err_se", "test/err_ci_low", "test/err_ci_high"]].isna().all()


def test_summarize_counts_only_present_values_and_keeps_a_missing_group_key():
    df = pd.DataFrame({"size": [10, 10, 10, np.nan, np.nan], "err": [0.1, 0.2, np.nan, 0.4, 0.6],
                       "gap": [0.0, 0.1, 0.2, 0.3, 0.3]})
    s = results.summarize(df, "size", ["err", "gap"])
    assert len(s) == 2 and s["size"].isna().sum() == 1  # a run without data.train_size is still a group
    ten = s[s["size"] == 10].iloc[0]
    assert ten["n"] == 2 and ten["err_mean"] == pytest.approx(0.15)  # n: rows with the first metric present
    assert ten["gap_mean"] == pytest.approx(0.1) and ten["gap_se"] == pytest.approx(0.1 / math.sqrt(3))
    nan = s[s["size"].isna()].iloc[0]
    assert nan["err_mean"] == pytest.approx(0.5) and nan["err_se"] == pytest.approx(0.1)


def test_paired_differences_are_taken_seed_by_seed_whatever_the_row_order():
    d = results.paired(frame(seed=1), "technique", "none", "test/err").set_index("technique")
    diffs = [ERR["a"][s] - ERR["none"][s] for s in SHIFT]  # -0.03, -0.025, -0.03, -0.025
    assert d.loc["a", "n"] == 4
    assert d.loc["a", "diff_mean"] == pytest.approx(np.mean(diffs))
    assert d.loc["a", "diff_std"] == pytest.approx(np.std(diffs, ddof=1))
    assert d.loc["a", "diff_se"] == pytest.approx(np.std(diffs, ddof=1) / 2)
    assert d.loc["a", "diff_ci_low"] == pytest.approx(np.mean(diffs) - t_half(diffs))
    assert d.loc["a", "diff_ci_high"] == pytest.approx(np.mean(diffs) + t_half(diffs))
    assert d.loc["a", "distinct"]
    # Unpaired, the seeds' shifts swamp the 3 points: the two groups' own intervals overlap.
    s = results.summarize(frame(), "technique", "test/err").set_index("technique")
    assert s.loc["a", "test/err_ci_high"] > s.loc["none", "test/err_ci_low"]
    # b shares one seed with none: a difference, no spread, no claim
    assert d.loc["b", "n"] == 1 and d.loc["b", "diff_mean"] == pytest.approx(0.01)
    assert math.isnan(d.loc["b", "diff_se"]) and not d.loc["b", "distinct"]
    # The same answer for any shuffle of the rows.
    again = results.paired(frame(seed=7), "technique", "none", "test/err").set_index("technique")
    pd.testing.assert_frame_equal(d, again.loc[d.index])


def test_paired_within_groups_and_a_difference_inside_the_noise_is_not_distinct():
    add = {0: 0.03, 1: 0.01, 2: 0.05, 3: 0.03}  # at size 200, a is worse by these: differences 0, +.035, +.02, +.005
    big = frame().assign(size=200)
    big.loc[big["technique"] == "a", "test/err"] += big.loc[big["technique"] == "a", "seed"].map(add)
    d = results.paired(pd.concat([frame(), big]), "technique", "none", "test/err", within=["size"])
    assert sorted(zip(d["size"], d["technique"])) == [(100, "a"), (100, "b"), (200, "a"), (200, "b")]
    row = d[(d["size"] == 200) & (d["technique"] == "a")].iloc[0]
    diffs = [ERR["a"][s] - ERR["none"][s] + add[s] for s in SHIFT]
    assert row["diff_mean"] == pytest.approx(np.mean(diffs)) and row["diff_ci_low"] < 0 < row["diff_ci_high"]
    assert not row["distinct"]
    assert d[(d["size"] == 100) & (d["technique"] == "a")].iloc[0]["distinct"]


def test_a_rank_is_one_plus_the_groups_measurably_better():
    # x < y < z < w by 1 point per step, with seed noise: x-y and y-z inside the noise, x-z and x-w distinct, z-w and
    # y-w not.
    noise = {0: 0.0, 1: 0.012, 2: -0.012, 3: 0.006, 4: -0.006}
    rows = []
    for s, e in noise.items():
        rows += [{"t": "x", "seed": s, "err": 0.20 + e}, {"t": "y", "seed": s, "err": 0.21 - e},
                 {"t": "z", "seed": s, "err": 0.22 + e}, {"t": "w", "seed": s, "err": 0.225 + noise[(s + 2) % 5]}]
    df = pd.DataFrame(rows).sample(frac=1, random_state=0)
    d = results.paired(df, "t", "x", "err").set_index("t")
    assert not d.loc["y", "distinct"] and d.loc["z", "distinct"] and d.loc["w", "distinct"]  # the premise
    assert not results.paired(df, "t", "z", "err").set_index("t").loc["w", "distinct"]
    assert not results.paired(df, "t", "y", "err").set_index("t")["distinct"].any()
    r = results.ranks(df, "t", "err")
    assert list(r["t"]) == ["x", "y", "z", "w"]  # best mean first
    # Nothing is measurably better than x or y (rank 1); x is, than z and w (rank 2 each)
    assert list(r["rank"]) == [1, 1, 2, 2] and list(r["better"]) == ["", "", "x", "x"]
    assert r["mean"].tolist() == pytest.approx([0.2, 0.21, 0.22, 0.225])
    up = results.ranks(df, "t", "err", lower_is_better=False)  # e.g. accuracy: the highest is best
    assert list(up["t"]) == ["w", "z", "y", "x"] and list(up["rank"]) == [1, 1, 1, 3]
    assert up["better"].iloc[-1] == "w, z"


def test_a_noisy_group_nothing_is_measurably_better_than_ranks_first():
    # a (best, tight), b 1 point worse (tight: distinct from a), c 1.5 points worse but noisy: no group is measurably
    # better than c. Walking down from b (the rule before), c was compared with b only and ranked behind it.
    noise = [0.0, 0.05, -0.05, 0.04, -0.04]
    rows = [{"t": t, "seed": s, "err": base + scale * e} for s, e in enumerate(noise)
            for t, base, scale in (("a", 0.10, 0.01), ("b", 0.11, 0.01), ("c", 0.115, 1.0))]
    df = pd.DataFrame(rows)
    d = results.paired(df, "t", "a", "err").set_index("t")
    assert d.loc["b", "distinct"] and not d.loc["c", "distinct"]  # the premise
    r = results.ranks(df, "t", "err").set_index("t")
    assert list(r.index) == ["a", "b", "c"]  # best mean first
    assert list(r["rank"]) == [1, 2, 1] and list(r["better"]) == ["", "a", ""]
    # A group without a finite value anywhere (every run diverged) comes last, unranked, not a KeyError.
    nan = pd.concat([df, pd.DataFrame([{"t": "d", "seed": s, "err": float("nan")} for s in range(5)])])
    r = results.ranks(nan, "t", "err")
    assert list(r["t"]) == ["a", "b", "c", "d"] and math.isnan(r["rank"].iloc[-1])


@pytest.mark.parametrize("call, column", [
    (lambda df: results.summarize(df, "technique", ["test/err", "test/erx"]), "test/erx"),
    (lambda df: results.summarize(df, "techniqe", "test/err"), "techniqe"),
    (lambda df: results.paired(df, "technique", "none", "test/err", pair_on="data_seed"), "data_seed"),
    (lambda df: results.paired(df, "technique", "none", "test/err", within=["train_size"]), "train_size"),
    (lambda df: results.ranks(df, "technique", "val/err"), "val/err"),
])
def test_an_unknown_column_is_one_clear_error_naming_it(call, column):
    with pytest.raises(ReglabError, match=f"no column '{column}' .columns: technique, seed, test/err, size."):
        call(frame())


def test_paired_without_the_baseline_names_it():
    with pytest.raises(ReglabError, match=r"no runs with technique='dropout' to compare against"):
        results.paired(frame(), "technique", "dropout", "test/err")


def test_mean_se_text():
    assert results.mean_se_text(0.5012, 0.0061, 5) == "50.1 ± 0.6% (n=5)"
    assert results.mean_se_text(0.5012, math.nan, 1) == "50.1% (n=1)"


def test_a_difference_in_words_claims_nothing_without_an_interval():
    row = {"diff_mean": 0.053, "diff_se": 0.008, "diff_ci_low": 0.031, "diff_ci_high": 0.075, "n": 5, "distinct": True}
    assert results.diff_text(row) == "+0.0530 ± 0.0080 (SE, 95% CI +0.0310 to +0.0750, n=5): the interval excludes 0"
    one = {**row, "diff_se": math.nan, "diff_ci_low": math.nan, "diff_ci_high": math.nan, "n": 1, "distinct": False}
    assert results.diff_text(one, 100, 1, " points") == "+5.3 points (n=1: no interval, no claim)"  # not "± nan"


def test_a_metric_measured_in_fewer_runs_says_on_how_many():
    df = pd.DataFrame({"t": ["a"] * 3, "seed": [0, 1, 2], "err": [0.1, 0.2, 0.3], "l2": [1.0, float("nan"), 3.0]})
    s = results.summarize(df, "t", ["err", "l2"]).iloc[0]
    assert s["n"] == 3 and s["l2_n"] == 2 and "err_n" not in s  # l2's SE is over 2 runs, not the n shown
    assert s["l2_se"] == pytest.approx(np.std([1.0, 3.0], ddof=1) / math.sqrt(2))



def test_load_finds_a_study_in_the_experiment_its_preset_logs_to(tmp_path, empty_store):
    """Each preset logs to its own experiment (+exp=early_stopping: early_stopping); load() looked in `reglab` alone
    and said there was no parent, though the sweep had run."""
    from conftest import with_store
    from mlflow.tracking import MlflowClient

    from reglab.runs.study import child_tags

    uri = f"sqlite:///{with_store(tmp_path, empty_store)}/mlruns/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("early_stopping")
    parent = client.create_run(exp, tags={"study": "early_stopping", "reglab.role": "parent"}).info.run_id
    child = client.create_run(exp, tags=child_tags(parent, "early_stopping")).info.run_id
    client.log_metric(child, "test/err", 0.25)
    client.set_terminated(child)
    assert list(results.load("early_stopping", tracking_uri=uri)["run_id"]) == [child]
    with pytest.raises(ReglabError, match="no experiment 'reglab'"):
        results.load("early_stopping", experiment="reglab", tracking_uri=uri)
