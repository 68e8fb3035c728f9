"""Report of a double-descent study (Nakkiran et al. 2019, "Deep Double Descent", arXiv 1912.02292): reads the
study's finished child runs from MLflow and writes, to results/<study>/ and the parent run's artifacts,

- modelwise.png / modelwise.{csv,md}: per width, over its n seeds, `reglab.results.summarize` of the final test
  error, train error, test loss and, where the children logged them, the eval-mode train error (`train_eval/err`)
  and the weights' L2 norm (`params/l2`); the figure draws the means vs width (log x) with a +-1 SE band (none for
  n=1), test and train error in one panel and test loss (whose peak is sharper) in a second, with the interpolation
  threshold and the second-descent peak, both found on the means;
- weight_norm.png (when the children logged `params/l2`): the final ||W||_2 vs width, mean +- 1 SE;
- epochwise_heatmap.png / epochwise.{csv,md}: mean test error over seeds by width x epoch (log epoch axis), the
  paper's Figure 2;
- epochwise_curves.png: mean test and train error, and test loss, vs epoch for a small, the critical and a large
  width;
- config.yaml: the study's config (the parent run's).

The interpolation threshold is the first width whose mean final train error is <= INTERPOLATED, measured by
`train_eval/err` (eval mode, the full training set with its noisy labels, once after the last epoch) when every
width has it, else by `train/err` (the mean over the last epoch's batches in train mode, as the Classifier logs it,
on weights that move during the epoch); the table and the figure say which.

Standard error = sample standard deviation over seeds (ddof=1) / sqrt(n), and the CSV's 95% interval is Student's
t (`reglab.results.summarize`); NaN (a blank cell) for a width with one seed. Children that did not finish (failed,
killed, running) are in no number; modelwise.md lists them. Test error and loss are the held-out set after each
epoch (data.test_every_epoch). Epoch e in the tables is the state after e epochs.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from reglab import results
from reglab.errors import ReglabError
from reglab.studies.output import markdown_table, parent_config

INTERPOLATED = 0.01  # "train error ~ 0": at most 1% of the (noisy) training labels not fitted
WIDTH, SEED = "model.width", "seed"
METRICS = {"test_err": "test/err", "train_err": "train/err", "test_loss": "test/loss"}  # column: MLflow history
# Logged where the children have them: train_eval/err once after the last epoch, params/l2 every epoch.
EXTRA = {"train_eval_err": "train_eval/err", "params_l2": "params/l2"}
THRESHOLD_BY = {  # column the interpolation threshold is read from -> how the report names it
    "train_eval_err": "train_eval/err (eval mode, full training set, after the last epoch)",
    "train_err": "train/err (mean over the last epoch's batches, train mode)",
}


def collect(client, parent) -> pd.DataFrame:
    """One row per (finished child, epoch): run, width, seed, params, epoch and the METRICS after that epoch
    (`reglab.results.runs` with their histories), plus the EXTRA ones: `params_l2` per epoch, and `train_eval_err`
    on each run's last epoch (its one value, whatever step it was logged at)."""
    keys = {**METRICS, **EXTRA}
    df = results.runs(client, parent, history=list(keys.values()))
    results.not_pooled(df, parent, (WIDTH, SEED))
    if df.empty or WIDTH not in df:
        raise ReglabError(f"study={parent.data.tags.get('study')!r}: no finished child run with {WIDTH}, train/err "
                          f"and test/err yet")
    df = df.rename(columns={"run_id": "run", WIDTH: "width", SEED: "seed", "model.params": "params",
                            **{key: col for col, key in keys.items()}})
    for col, default in (("seed", 0), ("params", np.nan)):
        if col not in df:
            df[col] = default
    last_eval = df.dropna(subset=["train_eval_err"]).sort_values("step").groupby("run")["train_eval_err"].last()
    # per-epoch points: the final trainer.test (one step past the last epoch) has no train/err
    tested = df["test_err"].notna().any()
    df = df.dropna(subset=["train_err", "test_err"]).copy()
    if df.empty:
        why = ("its children logged test/err only after training (data.test_every_epoch=false), and the report reads "
               "test/err per epoch: run the study with data.test_every_epoch=true") if tested else \
            "no finished child run with train/err and test/err yet"
        raise ReglabError(f"study={parent.data.tags.get('study')!r}: {why}")
    last = df["epoch"] == df.groupby("run")["epoch"].transform("max")
    df["train_eval_err"] = np.where(last, df["run"].map(last_eval), np.nan)
    df["width"] = df["width"].astype(int)
    return df[["run", "width", "seed", "params", "epoch", *keys]].reset_index(drop=True)


def _metrics(df: pd.DataFrame) -> list[str]:
    """METRICS always (a blank column says a metric was not logged), EXTRA where some run has it."""
    return [*METRICS, *(c for c in EXTRA if c in df and df[c].notna().any())]


def finals(history: pd.DataFrame) -> pd.DataFrame:
    """Each run's row after its last epoch."""
    return history[history["epoch"] == history.groupby("run")["epoch"].transform("max")]


def modelwise_table(history: pd.DataFrame) -> pd.DataFrame:
    """Per width: its seeds' numbers after their last epoch, `results.summarize`d: n, and per metric its mean,
    std (ddof=1), SE and 95% t-interval."""
    last = finals(history)
    t = results.summarize(last, "width", _metrics(last))  # sorted by width
    about = last.groupby("width").agg(params=("params", "first"), epochs=("epoch", "max")).reset_index()
    t = t.merge(about, on="width")
    return t[["width", "n", "params", "epochs", *(c for c in t if c not in ("width", "n", "params", "epochs"))]]


def epochwise_table(history: pd.DataFrame) -> pd.DataFrame:
    """Per (width, epoch): n and each per-epoch metric's mean, std, SE and interval over seeds."""
    return results.summarize(history, ["width", "epoch"], [c for c in _metrics(history) if c != "train_eval_err"])


def threshold_metric(table: pd.DataFrame) -> str:
    """The train error the interpolation threshold is read from: train_eval_err when every width has it."""
    col = "train_eval_err_mean"
    return "train_eval_err" if col in table and table[col].notna().all() else "train_err"


def interpolation_threshold(table: pd.DataFrame, metric: str | None = None) -> int | None:
    """The first width whose mean final train error (`metric`, default `threshold_metric`) is <= INTERPOLATED."""
    fitted = table[table[f"{metric or threshold_metric(table)}_mean"] <= INTERPOLATED]
    return int(fitted["width"].iloc[0]) if len(fitted) else None


def sweet_spot(table: pd.DataFrame, metric: str = "test_err") -> int:
    """The classical sweet spot of `metric`'s mean: its lowest value among widths up to the interpolation threshold
    (all widths when none interpolates)."""
    critical = interpolation_threshold(table)
    classical = table if critical is None else table[table["width"] <= critical]
    return int(classical.loc[classical[f"{metric}_mean"].idxmin(), "width"])


def peak_width(table: pd.DataFrame, metric: str = "test_err") -> int | None:
    """Width of the second-descent peak of `metric`'s mean: its highest value beyond the classical sweet spot, so an
    underfitting small width is not "the peak"; None when no wider width's mean is higher than the sweet spot's (the
    curve only falls past it: no peak, whatever the highest remaining value)."""
    sweet = sweet_spot(table, metric)
    values = table.set_index("width")[f"{metric}_mean"]
    beyond = values[values.index > sweet]
    return int(beyond.idxmax()) if len(beyond) and beyond.max() > values[sweet] else None


def second_descent(history: pd.DataFrame, table: pd.DataFrame) -> dict[str, float] | None:
    """Is there a second descent? The final test error at the peak width minus that at the first minimum (the lowest
    mean test error at a smaller width, at most the sweet spot's, so the mean difference is > 0), paired by seed (a
    seed's data, noise and order are the same at every width; `reglab.results.paired`): mean, standard error
    (ddof=1), 95% t-interval, n of the per-seed differences and `distinct` (the interval excludes 0, i.e. lies above
    it). None without a peak."""
    peak = peak_width(table)
    if peak is None:
        return None
    before = table[table["width"] < peak]
    first_min = int(before.loc[before["test_err_mean"].idxmin(), "width"])
    d = results.paired(finals(history), "width", first_min, "test_err", pair_on="seed")
    row = d[d["width"] == peak].iloc[0]
    return {"peak_width": float(peak), "first_min_width": float(first_min),
            "peak_minus_first_min": float(row["diff_mean"]), "peak_minus_first_min_se": float(row["diff_se"]),
            "peak_minus_first_min_ci_low": float(row["diff_ci_low"]),
            "peak_minus_first_min_ci_high": float(row["diff_ci_high"]), "n": float(row["n"]),
            "distinct": bool(row["distinct"])}


def peak_text(table: pd.DataFrame, metric: str) -> str:
    peak = peak_width(table, metric)
    return f"width {peak}" if peak is not None else \
        f"none (the mean falls or stays level past the classical sweet spot, width {sweet_spot(table, metric)})"


def seeds_text(table: pd.DataFrame) -> str:
    return f"n={results.n_range(table['n'])} seed{'s' if table['n'].max() > 1 else ''}"


def _pick_widths(table: pd.DataFrame, critical: int | None) -> list[int]:
    widths = list(table["width"])
    mid = critical if critical is not None else peak_width(table)
    return sorted({widths[0], widths[len(widths) // 2] if mid is None else mid, widths[-1]})


def _spaced(widths: list, ratio: float = 1.25) -> list:
    """Tick widths at least `ratio` apart on the log axis (48, 56, 64 would print over each other)."""
    out = widths[:1]
    for v in widths[1:]:
        if v >= ratio * out[-1]:
            out.append(v)
    return out


def figures(table: pd.DataFrame, epochwise: pd.DataFrame, study: str, subtitle: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    def plain_log_axis(axis, ticks=None):  # log scale read as 1, 10, 100 rather than 10^0, 10^1, 10^2
        if ticks is not None:
            axis.set_ticks(ticks)
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        axis.set_minor_formatter(NullFormatter())

    critical = interpolation_threshold(table)
    by = threshold_metric(table)
    threshold_label = (f"interpolation threshold (mean {METRICS.get(by) or EXTRA[by]} <= {100 * INTERPOLATED:.0f}%): "
                       f"width {critical}")
    band = f"mean ± 1 SE, {seeds_text(table)}" if table["n"].max() > 1 else "one seed"

    # Model-wise: final errors (left) and test loss (right) vs width, mean +- 1 SE over seeds.
    fig, (ax, ax_loss) = plt.subplots(1, 2, figsize=(12, 5.5))
    w = table["width"].to_numpy()
    ticks = _spaced(list(w))

    def curve(axis, col, scale, label, color):
        mean, se = scale * table[f"{col}_mean"].to_numpy(), scale * table[f"{col}_se"].to_numpy()
        axis.plot(w, mean, "o-", color=color, label=f"{label} ({band})", ms=4)
        axis.fill_between(w, mean - se, mean + se, color=color, alpha=0.2)  # NaN SE (n=1): no band there

    curve(ax, "test_err", 100, "test error", "tab:red")
    curve(ax, "train_err", 100, "train error (noisy labels, train mode)", "tab:blue")
    if "train_eval_err_mean" in table:
        curve(ax, "train_eval_err", 100, "train error (noisy labels, eval mode)", "tab:cyan")
    curve(ax_loss, "test_loss", 1, "test loss", "tab:purple")
    peaks = ((ax, "test_err", 100, "test-error peak: {:.1f}%"), (ax_loss, "test_loss", 1, "test-loss peak: {:.3f}"))
    for axis, col, scale, text in peaks:
        if critical is not None:
            axis.axvline(critical, color="gray", ls="--", lw=1, label=threshold_label)
        width = peak_width(table, col) if table[f"{col}_mean"].notna().any() else None
        if width is not None:
            peak = table[table["width"] == width].iloc[0]
            y = scale * peak[f"{col}_mean"]
            axis.annotate(text.format(y) + f" at width {int(peak.width)}", (peak.width, y),
                          textcoords="offset points", xytext=(0, 14), fontsize=8, ha="center",
                          arrowprops={"arrowstyle": "->", "lw": 0.8})
        axis.margins(y=0.12)  # room for the peak's label
        axis.set_xscale("log")
        plain_log_axis(axis.xaxis, ticks)
        axis.set_xlabel("width (log scale)")
        axis.grid(alpha=0.3, which="both")
        axis.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14))  # below: never over a curve
    ax.set_ylabel("error (%)")
    ax_loss.set_ylabel("test loss (cross-entropy)")
    fig.suptitle(f"Model-wise double descent: {study}\n{subtitle}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "modelwise.png", dpi=130, bbox_inches="tight")
    plt.close(fig)

    # Weight norm vs width: the final ||W||_2 (params/l2, the matrices a penalty would act on), mean +- 1 SE.
    if "params_l2_mean" in table:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        curve(ax, "params_l2", 1, "final weight norm ||W||₂", "tab:green")
        if critical is not None:
            ax.axvline(critical, color="gray", ls="--", lw=1, label=threshold_label)
        ax.set_xscale("log")
        plain_log_axis(ax.xaxis, ticks)
        ax.set_ylim(0, None)
        ax.set_xlabel("width (log scale)")
        ax.set_ylabel("||W||₂ over the weight matrices")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8, loc="upper left")
        ax.set_title(f"Weight norm vs width: {study}\n{subtitle}", fontsize=10)
        fig.tight_layout()
        fig.savefig(out / "weight_norm.png", dpi=130)
        plt.close(fig)

    # Epoch-wise heatmap: widths (rows) x epochs (columns), log epoch axis; mean over seeds.
    grid = epochwise.pivot(index="width", columns="epoch", values="test_err_mean").sort_index()
    epochs = grid.columns.to_numpy(dtype=float)
    x_edges = np.concatenate([[epochs[0] - 0.5], (epochs[:-1] + epochs[1:]) / 2, [epochs[-1] + 0.5]])
    y_edges = np.arange(len(grid) + 1) - 0.5
    fig, ax = plt.subplots(figsize=(7, 4.5))
    mesh = ax.pcolormesh(x_edges, y_edges, 100 * grid.to_numpy(), cmap="viridis", shading="flat")
    ax.set_xscale("log")
    plain_log_axis(ax.xaxis)
    ax.set_yticks(range(len(grid)), [str(v) for v in grid.index])
    if critical is not None:
        ax.axhline(list(grid.index).index(critical), color="white", ls="--", lw=1,
                   label=f"interpolation threshold (width {critical})")
        ax.legend(fontsize=8, loc="upper right")
    ax.set_xlabel("epoch (log scale)")
    ax.set_ylabel("width")
    ax.set_title(f"Epoch-wise: mean test error by width and epoch ({study})\n{subtitle}", fontsize=10)
    fig.colorbar(mesh, ax=ax, label="test error (%)")
    fig.tight_layout()
    fig.savefig(out / "epochwise_heatmap.png", dpi=130)
    plt.close(fig)

    # Epoch-wise curves for a small, the critical and a large width; mean over seeds: errors (left), test loss
    # (right, when logged).
    loss = epochwise["test_loss_mean"].notna().any()
    fig, axes = plt.subplots(1, 2 if loss else 1, figsize=(12 if loss else 7, 4.5), squeeze=False)
    ax, ax_loss = axes[0][0], (axes[0][1] if loss else None)
    colors = plt.get_cmap("plasma")(np.linspace(0.1, 0.8, 3))
    for color, width in zip(colors, _pick_widths(table, critical)):
        h = epochwise[epochwise["width"] == width]
        tag = " (interpolation threshold)" if width == critical else ""
        ax.plot(h["epoch"], 100 * h["test_err_mean"], color=color, label=f"width {width}{tag}: test")
        ax.plot(h["epoch"], 100 * h["train_err_mean"], color=color, ls=":", label=f"width {width}: train")
        if ax_loss is not None:
            ax_loss.plot(h["epoch"], h["test_loss_mean"], color=color, label=f"width {width}{tag}: test loss")
    for axis, ylabel in ((ax, "error (%), mean over seeds"), (ax_loss, "test loss (cross-entropy), mean over seeds")):
        if axis is None:
            continue
        axis.set_xscale("log")
        plain_log_axis(axis.xaxis)
        axis.set_xlabel("epoch (log scale)")
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3, which="both")
        axis.legend(fontsize=8)
    fig.suptitle(f"Epoch-wise double descent: {study}\n{subtitle}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "epochwise_curves.png", dpi=130)
    plt.close(fig)


def _subtitle(cfg: dict, table: pd.DataFrame) -> str:
    data = cfg.get("data") or {}
    name = data.get("dataset") or str(data.get("_target_", "")).rsplit(".", 1)[-1].replace("DataModule", "")
    bits = [name or "data"]
    if "label_noise" in data:
        bits.append(f"{100 * data['label_noise']:.0f}% label noise")
    bits += [f"{int(table['epochs'].max())} epochs", f"mean over {seeds_text(table)} per width"]
    return ", ".join(bits)


MARKDOWN_EPOCHS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 4000)


HEADLINE_DESCENT = ("peak_width", "first_min_width", "peak_minus_first_min", "peak_minus_first_min_se")


def headline(client, parent, table: pd.DataFrame, descent: dict[str, float] | None) -> None:
    """The study's headline as metrics of its parent run, so the MLflow UI shows the curve without opening a child:
    modelwise/{test_err,train_err,test_loss} = the means over seeds with step = width (the parent's chart view draws
    the model-wise curve), and summary/{sweet_spot_width, peak_width (where there is a peak), threshold_width,
    first_min_width, peak_minus_first_min(_se)}
    (`second_descent`; NaN where there is none, so an earlier report's value is not what the parent shows). Points the
    parent already holds are not written again (a report rerun on the same runs adds nothing). The modelwise/* curve
    only once no child can still finish (each FINISHED, or FAILED with its failure_reason, which a rerun skips): a
    metric's history keeps every point, and a report of a sweep still running would leave a second point at a width
    whose mean then changes."""
    from mlflow.entities import Metric

    now = int(1000 * pd.Timestamp.now().timestamp())
    pending = [r for r in results.children(client, parent, status=None) if r.info.status != "FINISHED"
               and "failure_reason" not in r.data.tags]
    points = [] if pending else [(f"modelwise/{col}", float(row[f"{col}_mean"]), int(row["width"]))
                                 for col in ("test_err", "train_err", "test_loss") for _, row in table.iterrows()
                                 if pd.notna(row[f"{col}_mean"])]
    peak, critical = peak_width(table), interpolation_threshold(table)
    summary = {"sweet_spot_width": float(sweet_spot(table)),
               "threshold_width": math.nan if critical is None else float(critical)}
    points += [(f"summary/{k}", float(v), 0) for k, v in summary.items()]
    # No peak: NaN, so that the latest value of a key an earlier report wrote (a peak of other runs, or the falling
    # curve's "peak" of the code before) is not what the parent shows (progress.headline leaves NaN out).
    values = {"peak_width": math.nan if peak is None else peak, **(descent or {})}
    points += [(f"summary/{k}", float(values.get(k, math.nan)), 0) for k in HEADLINE_DESCENT]
    def same(v: float) -> object:  # NaN equals NaN here: "no peak" already held is not written again
        return "nan" if math.isnan(v) else v

    held = {(k, m.step, same(m.value)) for k in {k for k, _, _ in points} for m in client.get_metric_history(
        parent.info.run_id, k)}
    new = [Metric(k, v, now, step) for k, v, step in points if (k, step, same(v)) not in held]
    for i in range(0, len(new), 1000):
        client.log_batch(parent.info.run_id, metrics=new[i:i + 1000])


def report(client, parent, out: Path) -> None:
    history = collect(client, parent)
    table, epochwise = modelwise_table(history), epochwise_table(history)
    study = parent.data.tags.get("study", "study")
    cfg = parent_config(client, parent, out)

    table.to_csv(out / "modelwise.csv", index=False)
    critical = interpolation_threshold(table)
    by = threshold_metric(table)
    note = (f"Mean over {seeds_text(table)} per width; `_se` = standard error (sample std, ddof=1, / sqrt(n); blank "
            f"for n=1); modelwise.csv also has the std and the 95% t-interval (`_ci_low`, `_ci_high`) of each."
            f"\n\nInterpolation threshold (first width with mean final train error <= {INTERPOLATED:.0%}, by "
            f"{THRESHOLD_BY[by]}): {critical if critical is not None else 'not reached'}. Test-error peak (second "
            f"descent): {peak_text(table, 'test_err')}.")
    if table["test_loss_mean"].notna().any():
        note += f" Test-loss peak: {peak_text(table, 'test_loss')}."
    descent = second_descent(history, table)
    if descent is not None:
        row = {k: descent[f"peak_minus_first_min{s}"] for k, s in (("diff_mean", ""), ("diff_se", "_se"),
                                                                    ("diff_ci_low", "_ci_low"),
                                                                    ("diff_ci_high", "_ci_high"))}
        note += (f" Peak minus first minimum (width {descent['peak_width']:.0f} minus width "
                 f"{descent['first_min_width']:.0f}, final test error, paired by seed): "
                 f"{results.diff_text({**row, 'n': descent['n'], 'distinct': descent['distinct']})}.")
    note += "\n\n" + results.caveats(client, parent)
    shown = ["width", "n", "params", "epochs", *(f"{m}_{stat}" for m in (*METRICS, *EXTRA)
                                                  if f"{m}_mean" in table for stat in ("mean", "se"))]
    (out / "modelwise.md").write_text(f"# {study}: model-wise\n\n{note}" + markdown_table(table[shown]))
    epochwise.to_csv(out / "epochwise.csv", index=False)
    last = int(epochwise["epoch"].max())
    shown = [e for e in MARKDOWN_EPOCHS if e < last] + [last]
    pivot = epochwise[epochwise["epoch"].isin(shown)].pivot(index="width", columns="epoch", values="test_err_mean")
    pivot.columns = [f"epoch {c}" for c in pivot.columns]
    (out / "epochwise.md").write_text(f"# {study}: mean test error over seeds by width (rows) and epoch (columns)"
                                      f"\n\n" + markdown_table(pivot.reset_index()))
    figures(table, epochwise, study, _subtitle(cfg, table), out)
    headline(client, parent, table, descent)
