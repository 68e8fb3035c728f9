"""A study's numbers as pandas DataFrames, and the one summary every report and claim is made of.

From a notebook or a Python prompt (the default store of a checkout; `tracking_uri=` for any other):

    >>> from reglab import results
    >>> runs = results.load("double_descent")                    # one row per finished child of the newest parent
    >>> results.summarize(runs, by="model.width", metrics=["test/err"])
    >>> curves = results.load("double_descent", history=["test/err", "train/err"])   # one row per (run, step)
    >>> results.paired(runs, "model.width", baseline=16, metric="test/err")  # same seed = same data, per width
    >>> results.ranks(runs, "model.width", "test/err")              # best first; groups inside the noise tie

Columns of `runs(...)`/`load(...)`: `run_id`, `run_name`, `status`, every param under its config key (`model.width`,
`seed`; numbers parsed, "None" -> NaN), every final metric under its MLflow key (`test/err`). With `history=`, one row
per (run, step) with those metrics as columns, `epoch` = step + 1, and the params repeated (a run's final
trainer.test is logged one step past its last epoch: that row has only the test metrics).

`summarize` gives, per group, n and for each metric its mean, sample standard deviation (ddof=1), standard error
(std / sqrt(n)) and a 95% confidence interval (mean +- t_{0.975, n-1} * SE; Student's t because n is a handful of
seeds). With n = 1 std, SE and the interval are NaN: one seed carries no spread, and nothing pretends it does.
`paired` gives the same for the per-seed differences against a baseline group, and whether the interval excludes 0.

`ranks` gives each group the rank 1 + the number of groups measurably better than it: a paired difference over the
seeds both have whose 95% interval excludes 0 in the other group's favour. Rank 1 = no group is measurably better; groups
with the same count share a rank; `better` names them. Every statement is one paired test, so ranks need not follow
the means where the tests' precision differs: a group whose small, consistent gap behind another excludes 0 can rank
below a noisier group with a higher mean. Groups without a finite mean come last, unranked. The intervals are per
pair, not corrected for the number of pairs compared: among many groups, some distinctions at 95% are chance.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

from reglab.errors import ReglabError

CONFIDENCE = 0.95
META = ("run_id", "run_name", "status")


def _value(v: str):
    if v in ("None", "null", ""):
        return np.nan
    try:
        f = float(v)
    except (TypeError, ValueError):
        return v
    return int(f) if f.is_integer() and "." not in v and "e" not in v.lower() else f


def children(client, parent, status: str | None = "FINISHED") -> list:
    """The parent run's child runs (only `status` ones unless None), oldest first."""
    flt = f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    if status:
        flt += f" and attributes.status = '{status}'"
    found, token = [], None
    while True:
        page = client.search_runs([parent.info.experiment_id], flt, max_results=1000, page_token=token,
                                  order_by=["attributes.start_time ASC"])
        found += list(page)
        token = page.token
        if not token:
            return found


def runs(client, parent, history: Sequence[str] | None = None, status: str | None = "FINISHED") -> pd.DataFrame:
    """One row per child run of `parent` (params + final metrics), or with `history` one row per (run, step)."""
    rows = []
    for r in children(client, parent, status):
        base = {"run_id": r.info.run_id, "run_name": r.info.run_name, "status": r.info.status,
                **{k: _value(v) for k, v in r.data.params.items()}}
        if not history:
            rows.append({**base, **r.data.metrics})
            continue
        curves = {k: {m.step: m.value for m in client.get_metric_history(r.info.run_id, k)} for k in history}
        for step in sorted(set().union(*curves.values())):
            rows.append({**base, "step": step, "epoch": step + 1,
                         **{k: curves[k].get(step, np.nan) for k in history}})
    df = pd.DataFrame(rows)
    if df.empty:
        return pd.DataFrame(columns=[*META, *(["step", "epoch", *history] if history else [])])
    return df


def load(study: str | None = None, *, parent: str | None = None, experiment: str | None = None,
         tracking_uri: str | None = None, root: str = ".", history: Sequence[str] | None = None,
         status: str | None = "FINISHED") -> pd.DataFrame:
    """`runs` of the newest parent of `study` (or of the parent run id `parent`) in `experiment` (default: any; each
    preset logs to its own, e.g. early_stopping) of the store at `tracking_uri` (default: the checkout's mlruns/
    under `root`, or $MLFLOW_TRACKING_URI)."""
    import os

    from mlflow.tracking import MlflowClient

    from reglab.runs import store
    from reglab.runs.study import latest_parent

    uri, _ = store.resolve(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"), root)
    client = MlflowClient(uri)
    if parent:
        p = client.get_run(parent)
    else:
        if not study:
            raise ReglabError("results.load: name a study or a parent run id")
        if experiment is None:
            ids = [e.experiment_id for e in client.search_experiments()]
        else:
            exp = client.get_experiment_by_name(experiment)
            if exp is None:
                raise ReglabError(f"results.load: no experiment {experiment!r} in {uri}")
            ids = [exp.experiment_id]
        p = latest_parent(client, ids, study)
    return runs(client, p, history=history, status=status)


def not_pooled(df: pd.DataFrame, parent, separated: Iterable[str]) -> None:
    """Raise when the finished children `df` differ in a swept key (the parent's sweep.<key> tags) that the report
    does not separate (`separated`): its means over seeds would pool configurations, e.g. `optim.lr=0.01,0.05` or
    `regularization=[],dropout` added to a double-descent sweep. A swept config group is logged as the params under
    it (regularization.dropout.keep_prob, none for []): its configurations are those params' values, row by row."""
    study = parent.data.tags.get("study")
    for key in sorted(k.removeprefix("sweep.") for k in parent.data.tags if k.startswith("sweep.")):
        if key in separated:
            continue
        cols = [c for c in df.columns if c == key or c.startswith(key + ".")]
        rows = {tuple((c, str(v)) for c, v in zip(cols, row) if pd.notna(v))
                for row in df[cols].itertuples(index=False)} if cols else set()
        values = sorted(" ".join(f"{c}={v}" for c, v in row if c != key) or dict(row).get(key, "none")
                        for row in rows)
        if len(values) > 1:
            raise ReglabError(f"study={study!r}: its finished runs differ in {key} ({', '.join(values)}), which its "
                              f"report does not separate: the means would pool them; run one sweep per {key} value "
                              "(each is a study parent of its own)")


def caveats(client, parent, axes: Sequence[str] = ()) -> str:
    """What a report's reader must know about the runs behind its numbers, as markdown paragraphs (or ""): the
    children that did not finish (diverged, crashed, killed, still running), which are in no table or figure, with
    their swept values (the child's tags; `axes`, else the parent's sweep keys) and the recorded reason; and the code
    commits of the finished ones when they are several (a run's fingerprint is its config, not its code: a study rerun
    after a change of the code trains only what is new and pools it with what is done)."""
    children_ = children(client, parent, status=None)
    commits: dict[str, int] = {}
    for r in children_:
        if r.info.status == "FINISHED":
            commit = r.data.tags.get("git_commit", "unknown")
            commits[commit] = commits.get(commit, 0) + 1
    note = ""
    if len(commits) > 1:
        counts = ", ".join(f"{c[:12]}: {n}" for c, n in sorted(commits.items(), key=lambda kv: -kv[1]))
        note = (f"Code: the finished runs come from {len(commits)} commits ({counts} runs); the fingerprint that "
                "makes a rerun skip a done run is its config, not its code: check that no change between these "
                "commits changes results, or rerun the study in a fresh folder.\n\n")
    runs = [r for r in children_ if r.info.status != "FINISHED"]
    if not runs:
        return note
    axes = axes or sorted(k.removeprefix("sweep.") for k in parent.data.tags if k.startswith("sweep."))
    items = []
    for r in runs:
        values = " ".join(f"{k}={r.data.tags.get(k, r.data.params.get(k, '?'))}" for k in axes) or r.info.run_name
        reason = r.data.tags.get("failure_reason", "no reason recorded (killed, or still running)")
        items.append(f"- {values}: {r.info.status}, {reason}")
    return note + f"Left out: {len(runs)} child run(s) that did not finish.\n\n" + "\n".join(items) + "\n\n"


def _interval(se: pd.Series | float, n: pd.Series | int, confidence: float):
    from scipy import stats

    dof = np.asarray(n, dtype=float) - 1
    t = np.where(dof >= 1, stats.t.ppf(0.5 + confidence / 2, np.maximum(dof, 1)), np.nan)
    return t * se


def _require(df: pd.DataFrame, what: str, columns: Iterable[str]) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ReglabError(f"results.{what}: no column {', '.join(map(repr, missing))} "
                          f"(columns: {', '.join(map(str, df.columns))})")


def summarize(df: pd.DataFrame, by: str | Sequence[str], metrics: str | Iterable[str],
              confidence: float = CONFIDENCE) -> pd.DataFrame:
    """Per group of `by`: n and, per metric m, `m_mean`, `m_std` (ddof=1), `m_se`, `m_ci_low`, `m_ci_high`
    (Student's t interval at `confidence`). Rows with a NaN metric count in no number of that metric; n is the
    group's number of rows with the first metric present, and `m_n` that of a metric whose count differs from n in
    some group (its SE and interval rest on m_n runs)."""
    by = [by] if isinstance(by, str) else list(by)
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    if not metrics:
        raise ReglabError("results.summarize: name at least one metric")
    _require(df, "summarize", [*by, *metrics])
    g = df.groupby(by, dropna=False, sort=True)
    out = pd.DataFrame({"n": g[metrics[0]].count()})
    for m in metrics:
        n = g[m].count()
        if not n.equals(out["n"]):
            out[f"{m}_n"] = n
        mean, std = g[m].mean(), g[m].std(ddof=1)
        se = std / np.sqrt(n)
        half = _interval(se, n, confidence)
        out[f"{m}_mean"], out[f"{m}_std"], out[f"{m}_se"] = mean, std, se
        out[f"{m}_ci_low"], out[f"{m}_ci_high"] = mean - half, mean + half
    return out.reset_index()


def paired(df: pd.DataFrame, by: str, baseline, metric: str, pair_on: str = "seed",
           confidence: float = CONFIDENCE, within: Sequence[str] = ()) -> pd.DataFrame:
    """Per group g of `by` (other than `baseline`, and within each group of `within`): the differences
    metric(g) - metric(baseline) of the runs sharing `pair_on` (same seed = same data, noise and order), as n,
    `diff_mean`, `diff_std` (ddof=1), `diff_se`, `diff_ci_low`, `diff_ci_high`, and `distinct`: the interval
    excludes 0 (False with n < 2: no interval, no claim)."""
    within = list(within)
    _require(df, "paired", [by, metric, pair_on, *within])
    rows = []
    groups = df.groupby(within, dropna=False) if within else [((), df)]
    for key, part in groups:
        key = key if isinstance(key, tuple) else (key,)
        # one value per (pair, group); a pair measured twice in a group (a rerun) counts as its mean
        wide = part.pivot_table(index=pair_on, columns=by, values=metric, aggfunc="mean")
        if baseline not in wide.columns:
            where = "".join(f", {k}={v!r}" for k, v in zip(within, key))
            raise ReglabError(f"results.paired: no runs with {by}={baseline!r}{where} to compare against")
        for g in wide.columns:
            if g == baseline:
                continue
            d = (wide[g] - wide[baseline]).dropna()
            n = len(d)
            mean, std = d.mean(), d.std(ddof=1) if n > 1 else math.nan
            se = std / math.sqrt(n) if n > 1 else math.nan
            half = float(_interval(se, n, confidence)) if n > 1 else math.nan
            lo, hi = mean - half, mean + half
            rows.append({**dict(zip(within, key)), by: g, "n": n, "diff_mean": mean, "diff_std": std,
                         "diff_se": se, "diff_ci_low": lo, "diff_ci_high": hi,
                         "distinct": bool(n > 1 and (lo > 0 or hi < 0))})
    return pd.DataFrame(rows)


def ranks(df: pd.DataFrame, by: str, metric: str, pair_on: str = "seed", within: Sequence[str] = (),
          lower_is_better: bool = True, confidence: float = CONFIDENCE) -> pd.DataFrame:
    """Per group of `by` (within each group of `within`), best mean first: its `mean` of `metric`, `rank` (1 + the
    groups measurably better: a paired difference over `pair_on` whose interval excludes 0 in their favour; the
    module docstring) and `better`: those groups, comma-separated."""
    within = list(within)
    _require(df, "ranks", [by, metric, pair_on, *within])
    sign = 1.0 if lower_is_better else -1.0
    out = []
    groups = df.groupby(within, dropna=False) if within else [((), df)]
    for key, part in groups:
        key = key if isinstance(key, tuple) else (key,)
        means = part.groupby(by, sort=True)[metric].mean()
        order = sorted(means.index[means.notna()], key=lambda g: sign * means[g])
        better: dict[object, list] = {g: [] for g in order}
        for b in order:
            d = paired(part, by, b, metric, pair_on, confidence)  # every other group minus b
            # A group b shares no seeds with is missing from its table: no test, no claim.
            d = d.set_index(by) if len(d) else pd.DataFrame({"distinct": [], "diff_mean": []})
            for g in order:
                # b better than g: on the seeds both have (the paired difference g - b), not on the group means,
                # which may rest on other seeds
                if g in d.index and bool(d.loc[g, "distinct"]) and sign * d.loc[g, "diff_mean"] > 0:
                    better[g].append(b)
        for g in order:
            out.append({**dict(zip(within, key)), by: g, "mean": means[g], "rank": 1 + len(better[g]),
                        "better": ", ".join(map(str, better[g]))})
        for g in means.index[means.isna()]:
            out.append({**dict(zip(within, key)), by: g, "mean": means[g], "rank": math.nan, "better": ""})
    return pd.DataFrame(out, columns=[*within, by, "mean", "rank", "better"])


def n_range(ns) -> str:
    """'5', or '3-5' where the groups' seed counts differ (a title must not say 5 when some rest on 3)."""
    lo, hi = int(min(ns)), int(max(ns))
    return f"{lo}" if lo == hi else f"{lo}-{hi}"


def diff_text(row, scale: float = 1.0, digits: int = 4, unit: str = "") -> str:
    """A `paired` row in words: '+0.0530 ± 0.0080 (SE, 95% CI +0.031 to +0.075, n=5): the interval excludes 0';
    with n < 2 no spread and no claim: '+0.0530 (n=1: no interval, no claim)'."""
    f = f"{{:+.{digits}f}}"
    mean = f.format(scale * row["diff_mean"]) + unit
    if int(row["n"]) < 2 or not math.isfinite(row["diff_se"]):
        return f"{mean} (n={int(row['n'])}: no interval, no claim)"
    verdict = "the interval excludes 0" if row["distinct"] else "the interval includes 0, no difference claimed"
    return (f"{mean} ± {scale * row['diff_se']:.{digits}f}{unit} (SE, 95% CI {f.format(scale * row['diff_ci_low'])} "
            f"to {f.format(scale * row['diff_ci_high'])}, n={int(row['n'])}): {verdict}")


def mean_se_text(mean: float, se: float, n: int, scale: float = 100.0, digits: int = 1, unit: str = "%") -> str:
    """'50.1 ± 0.6% (n=5)'; '50.1% (n=1)' without a spread."""
    if n < 2 or not math.isfinite(se):
        return f"{scale * mean:.{digits}f}{unit} (n={n})"
    return f"{scale * mean:.{digits}f} ± {scale * se:.{digits}f}{unit} (n={n})"
