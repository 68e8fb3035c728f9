"""Reports of the double-descent controls (conf/exp/double_descent_{noise,samplewise,l2}.yaml): the final test error
of a study's finished children as curves along one swept axis (`x`), one curve per value of another (`line`), read
through `reglab.results` and written to results/<study>/ and the parent run's artifacts:

- curves.{csv,md}: per (line, x), n seeds and the mean, sample std (ddof=1), standard error and 95% t-interval of
  the final test error, train error and test loss (`results.summarize`);
- rise.{csv,md}: per line, the largest rise of its mean test-error curve along x (`rise`): from x_lo to a later
  x_hi, the per-seed differences test_err(x_hi) - test_err(x_lo) as n, mean, SE, 95% interval, and whether it
  excludes 0 (`results.paired`; a seed's data, label noise and order are the same at every x);
- curves.png: mean test error (left) and train error (middle) vs x with a +-1 SE band per line, and the rise per
  line (right, mean +- 1 SE);
- summary.md: the two tables with what they mean, and the children that did not finish (in no number);
- config.yaml: the study's config (the parent run's).

The rise is the test error's double-descent bump, one definition for every axis: model-wise (x = width) it is the
peak minus the lowest error at a smaller width; sample-wise (x = training-set size) it is "more data hurts", the
error at a larger set minus the lowest at a smaller one; a curve that only falls has a negative largest rise. x_lo
and x_hi are chosen on the means, then tested on the per-seed pairs, so the interval is somewhat optimistic (the
pair is the most extreme of the curve's pairs), as for the peak of reglab.studies.double_descent.

`report_l2` adds the line "tuned": per width, the weight decay with the lowest mean test error (Nakkiran, Venkat,
Kakade, Ma 2020, "Optimal regularization can mitigate double descent", arXiv 2003.01897: with the decay tuned per
model size the test error falls monotonically). It is tuned on the test error itself, as that paper's "optimal"
regularization is (the population risk): an oracle, not a validation-selected model.

Train error is the mean over the last epoch's batches in train mode on the (noisy) training labels, as the
Classifier logs it; test error and loss are the clean held-out set after the last epoch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from reglab import results
from reglab.errors import ReglabError
from reglab.studies.output import markdown_table, parent_config, write_figure, write_table

METRICS = ("test/err", "train/err", "test/loss")
TUNED = "tuned"  # report_l2's extra line: the best weight decay per width


def finished(client, parent, x: str, line: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(finished children with the final metrics, children that did not finish) as `results.runs` rows."""
    every = results.runs(client, parent, status=None)
    study = parent.data.tags.get("study")
    if every.empty or not {x, line, *METRICS[:2]} <= set(every.columns):
        raise ReglabError(f"study={study!r}: no child run with {x}, {line}, test/err and train/err yet")
    done = every[every["status"] == "FINISHED"].dropna(subset=list(METRICS[:2]))
    results.not_pooled(done, parent, (x, line, "seed"))
    if done.empty:
        raise ReglabError(f"study={study!r}: no finished child run with test/err and train/err yet")
    if "seed" not in done.columns:
        done = done.assign(seed=0)
    if "test/loss" not in done.columns:
        done = done.assign(**{"test/loss": np.nan})
    return done.reset_index(drop=True), every[every["status"] != "FINISHED"]


def curves(runs: pd.DataFrame, x: str, line: str) -> pd.DataFrame:
    """Per (line, x): n and each metric's mean, std (ddof=1), SE and 95% interval, sorted by line then x."""
    return results.summarize(runs, [line, x], list(METRICS))


def rise(runs: pd.DataFrame, x: str, line: str, metric: str = "test/err") -> pd.DataFrame:
    """Per line: the pair x_lo < x_hi with the largest mean(metric at x_hi) - mean(metric at x_lo), and that
    difference paired by seed (`results.paired`: n, diff_mean, diff_std, diff_se, diff_ci_low, diff_ci_high,
    distinct). A line with one x has no row."""
    rows = []
    for value, part in runs.groupby(line, sort=True):
        means = part.groupby(x)[metric].mean().sort_index()
        xs, m = list(means.index), means.to_numpy()
        pairs = [(m[j] - m[i], i, j) for i in range(len(xs)) for j in range(i + 1, len(xs))]
        if not pairs:
            continue
        _, i, j = max(pairs)
        d = results.paired(part[part[x].isin([xs[i], xs[j]])], x, xs[i], metric)
        d = d.drop(columns=[x]).iloc[0].to_dict()
        rows.append({line: value, "x_lo": xs[i], "x_hi": xs[j], "mean_lo": m[i], "mean_hi": m[j], **d})
    return pd.DataFrame(rows)


def tuned(runs: pd.DataFrame, x: str, line: str, metric: str = "test/err") -> pd.DataFrame:
    """The runs of the best `line` value per x (lowest mean metric), relabelled line=TUNED; `tuned_value` keeps
    which value it was."""
    means = runs.groupby([x, line])[metric].mean()
    best = means.groupby(level=0).idxmin()  # x -> (x, best line value)
    keep = runs.set_index([x, line]).index.isin(list(best))
    out = runs[keep].copy()
    out["tuned_value"] = out[line]
    out[line] = TUNED
    return out


def _label(line: str, value) -> str:
    if value == TUNED:
        return "tuned per width (oracle)"
    if line == "data.label_noise":
        return f"{100 * float(value):g}% label noise"
    if line == "optim.weight_decay":
        return f"weight decay {float(value):g}"
    return f"{line.rsplit('.', 1)[-1].replace('_', ' ')} {value:g}" if isinstance(value, (int, float)) else str(value)


def figure(table: pd.DataFrame, rises: pd.DataFrame, x: str, line: str, title: str):
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    fig, (ax, ax_train, ax_rise) = plt.subplots(1, 3, figsize=(16, 4.8), gridspec_kw={"width_ratios": [3, 3, 2]})
    values = list(dict.fromkeys(table[line]))
    colors = plt.get_cmap("viridis")(np.linspace(0.0, 0.85, max(len(values), 1)))
    xs = sorted(table[x].unique())
    for color, value in zip(colors, values):
        t = table[table[line] == value].sort_values(x)
        style = {"color": "black", "ls": "--"} if value == TUNED else {"color": color}
        for axis, col in ((ax, "test/err"), (ax_train, "train/err")):
            mean, se = 100 * t[f"{col}_mean"].to_numpy(), 100 * t[f"{col}_se"].to_numpy()
            axis.plot(t[x], mean, "o-", ms=4, label=_label(line, value), **style)
            axis.fill_between(t[x], mean - se, mean + se, color=style["color"], alpha=0.15)  # NaN SE: no band
    lo, hi = int(table["n"].min()), int(table["n"].max())
    seeds = f"n={lo}" if lo == hi else f"n={lo}-{hi}"
    for axis, what in ((ax, "test error"), (ax_train, "train error (noisy labels)")):
        axis.set_xscale("log")
        axis.set_xticks(xs)
        axis.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        axis.xaxis.set_minor_formatter(NullFormatter())
        axis.set_xlabel(f"{x} (log scale)")
        axis.set_ylabel(f"{what} (%), mean ± 1 SE, {seeds} seeds")
        axis.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    if not rises.empty:
        labels = [_label(line, v) for v in rises[line]]
        y = np.arange(len(rises))
        ax_rise.errorbar(100 * rises["diff_mean"], y, xerr=100 * rises["diff_se"], fmt="o", capsize=3,  # NaN: no bar
                         color="tab:red")
        ax_rise.axvline(0, color="gray", lw=1)
        ax_rise.set_yticks(y, [f"{lab}\n{a:g} → {b:g}" for lab, a, b in zip(labels, rises["x_lo"], rises["x_hi"])],
                           fontsize=7)
        ax_rise.invert_yaxis()
    ax_rise.set_xlabel("largest rise of test error along x (points)\nper-seed pairs, mean ± 1 SE")
    ax_rise.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def report_curves(client, parent, out: Path, x: str, line: str, tune: bool = False) -> dict[str, pd.DataFrame]:
    """The report of a study whose children sweep `x` and `line` (and seeds); returns its tables."""
    runs, _ = finished(client, parent, x, line)
    if tune:  # one column of labels for the values and "tuned" (%g strings sort as the numbers do here: 0, 0.001, ...)
        runs = pd.concat([runs, tuned(runs, x, line)], ignore_index=True)
        runs[line] = [v if v == TUNED else f"{float(v):g}" for v in runs[line]]
    table, rises = curves(runs, x, line), rise(runs, x, line)
    if tune:  # which value "tuned" took at each x
        picked = runs[runs[line] == TUNED].groupby(x)["tuned_value"].first()
        table["tuned_value"] = [picked.get(v) if lv == TUNED else np.nan for lv, v in zip(table[line], table[x])]
    study = parent.data.tags.get("study", "study")
    parent_config(client, parent, out)
    write_table(table, out / "curves")
    write_table(rises, out / "rise")
    n = f"n={int(table['n'].min())}" + ("" if table["n"].min() == table["n"].max() else f"-{int(table['n'].max())}")
    note = (f"# {study}\n\nFinal test error along `{x}`, one curve per `{line}`: mean over {n} seeds, `_se` = "
            f"standard error (sample std, ddof=1, / sqrt(n)), `_ci_*` = 95% Student-t interval. Errors are "
            f"fractions (0.5 = 50%).\n\n## Largest rise of the mean test error along `{x}`\n\nFrom `x_lo` to a "
            f"larger `x_hi`, chosen on the means; `diff_*` = the per-seed differences test_err(x_hi) - "
            f"test_err(x_lo); `distinct`: the 95% interval excludes 0. A negative rise: the curve only falls.\n\n"
            + markdown_table(rises) + "\n## Curves\n\n" + markdown_table(table[[
                c for c in table.columns if not c.endswith(("_std", "_ci_low", "_ci_high"))]])
            + "\n\n" + results.caveats(client, parent, (line, x, "seed")))
    (out / "summary.md").write_text(note + "\n")
    title = f"{study}: final test and train error vs {x}, one curve per {line} ({n} seeds, mean ± 1 SE)"
    write_figure(figure(table, rises, x, line, title), out / "curves")
    return {"curves": table, "rise": rises}


def report_noise(client, parent, out: Path) -> None:
    """conf/exp/double_descent_noise.yaml: model-wise curves per label-noise level (Nakkiran et al. 2019, Fig. 4)."""
    report_curves(client, parent, out, x="model.width", line="data.label_noise")


def report_samplewise(client, parent, out: Path) -> None:
    """conf/exp/double_descent_samplewise.yaml: test error vs training-set size per width (Nakkiran et al. 2019,
    Sec. 6: more data can hurt near the interpolation threshold)."""
    report_curves(client, parent, out, x="data.train_size", line="model.width")


def report_l2(client, parent, out: Path) -> None:
    """conf/exp/double_descent_l2.yaml: model-wise curves per weight decay, and the per-width tuned one."""
    report_curves(client, parent, out, x="model.width", line="optim.weight_decay", tune=True)
