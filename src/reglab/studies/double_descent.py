"""Report of a double-descent study (Nakkiran et al. 2019, "Deep Double Descent", arXiv 1912.02292): reads the
study's finished child runs from MLflow and writes, to results/<study>/ and the parent run's artifacts,

- modelwise.png / modelwise.{csv,md}: per width, over its n seeds, the mean and standard error of the final test
  error, train error and test loss; the figure draws the means vs width (log x) with a +-1 SE band (none for n=1),
  test and train error in one panel and test loss (whose peak is sharper) in a second, with the interpolation
  threshold (the first width whose mean final train error is <= INTERPOLATED) and the second-descent peak, both
  found on the means;
- epochwise_heatmap.png / epochwise.{csv,md}: mean test error over seeds by width x epoch (log epoch axis), the
  paper's Figure 2;
- epochwise_curves.png: mean test and train error vs epoch for a small, the critical and a large width;
- config.yaml: the study's config (the parent run's).

Standard error = sample standard deviation over seeds (ddof=1) / sqrt(n): pandas' `sem`; NaN (a blank cell) for a
width with one seed. Children that did not finish (failed, killed, running) are in no number; modelwise.md lists
them. Train error is the mean over the epoch's batches (in train mode, on the noisy labels), as logged by the
Classifier; test error and loss are the held-out set after each epoch (data.test_every_epoch). Epoch e in the
tables is the state after e epochs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from reglab.errors import ReglabError
from reglab.studies.output import markdown_table, parent_config

INTERPOLATED = 0.01  # "train error ~ 0": at most 1% of the (noisy) training labels not fitted
WIDTH, SEED = "model.width", "seed"
METRICS = {"test_err": "test/err", "train_err": "train/err", "test_loss": "test/loss"}  # column: MLflow history


def collect(client, parent) -> pd.DataFrame:
    """One row per (finished child, epoch): run, width, seed, params, epoch and the METRICS after that epoch."""
    runs = client.search_runs(
        [parent.info.experiment_id],
        f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and attributes.status = 'FINISHED'",
    )
    rows = []
    for r in runs:
        p = r.data.params
        width, seed = int(p[WIDTH]), int(p.get(SEED, 0))
        params = int(float(p["model.params"])) if p.get("model.params") else None
        h = {col: {m.step: m.value for m in client.get_metric_history(r.info.run_id, key)}
             for col, key in METRICS.items()}
        steps = sorted(set(h["train_err"]) & set(h["test_err"]))  # per-epoch points (the final test is one past)
        for s in steps:
            rows.append({"run": r.info.run_id, "width": width, "seed": seed, "params": params, "epoch": s + 1,
                         **{col: h[col].get(s, np.nan) for col in METRICS}})
    if not rows:
        raise ReglabError(f"study={parent.data.tags.get('study')!r}: no finished child run with train/err and "
                          f"test/err yet")
    return pd.DataFrame(rows)


def mean_se() -> dict[str, tuple[str, str]]:
    """Named aggregations over a group's runs (its seeds): each metric's mean and standard error (pandas' sem:
    std with ddof=1 / sqrt(n); NaN for n=1)."""
    out = {}
    for col in METRICS:
        out[f"{col}_mean"] = (col, "mean")
        out[f"{col}_se"] = (col, "sem")
    return out


def modelwise_table(history: pd.DataFrame) -> pd.DataFrame:
    """Per width: its seeds' numbers after their last epoch, as n, mean and SE."""
    finals = history[history["epoch"] == history.groupby("run")["epoch"].transform("max")]
    t = finals.groupby("width").agg(n=("run", "size"), params=("params", "first"), epochs=("epoch", "max"),
                                    **mean_se())
    return t.reset_index()  # groupby sorts by width


def epochwise_table(history: pd.DataFrame) -> pd.DataFrame:
    return history.groupby(["width", "epoch"]).agg(n=("run", "size"), **mean_se()).reset_index()


def interpolation_threshold(table: pd.DataFrame) -> int | None:
    fitted = table[table["train_err_mean"] <= INTERPOLATED]
    return int(fitted["width"].iloc[0]) if len(fitted) else None


def peak_width(table: pd.DataFrame, metric: str = "test_err") -> int:
    """Width of the second-descent peak of `metric`'s mean: its highest value at or beyond the classical sweet spot
    (the lowest value among widths up to the interpolation threshold), so an underfitting small width is not "the
    peak"."""
    critical = interpolation_threshold(table)
    classical = table if critical is None else table[table["width"] <= critical]
    sweet = classical.loc[classical[f"{metric}_mean"].idxmin(), "width"]
    beyond = table[table["width"] >= sweet]
    return int(beyond.loc[beyond[f"{metric}_mean"].idxmax(), "width"])


def second_descent(history: pd.DataFrame, table: pd.DataFrame) -> dict[str, float] | None:
    """Is there a second descent? The final test error at the peak width minus that at the first minimum (the lowest
    mean test error at a smaller width), paired by seed (a seed's data, noise and order are the same at every width):
    mean, standard error (ddof=1) and n of the per-seed differences. None without a smaller width."""
    peak = peak_width(table)
    before = table[table["width"] < peak]
    if before.empty:
        return None
    first_min = int(before.loc[before["test_err_mean"].idxmin(), "width"])
    finals = history[history["epoch"] == history.groupby("run")["epoch"].transform("max")]
    by_seed = finals.pivot_table(index="seed", columns="width", values="test_err")
    diff = (by_seed[peak] - by_seed[first_min]).dropna()
    return {"peak_width": float(peak), "first_min_width": float(first_min), "peak_minus_first_min": diff.mean(),
            "peak_minus_first_min_se": diff.sem(), "n": float(len(diff))}


def seeds_text(table: pd.DataFrame) -> str:
    lo, hi = int(table["n"].min()), int(table["n"].max())
    return f"n={lo} seed{'s' if hi > 1 else ''}" if lo == hi else f"n={lo}-{hi} seeds"


def _pick_widths(table: pd.DataFrame, critical: int | None) -> list[int]:
    widths = list(table["width"])
    mid = critical if critical is not None else peak_width(table)
    return sorted({widths[0], mid, widths[-1]})


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
    band = f"mean ± 1 SE, {seeds_text(table)}" if table["n"].max() > 1 else "one seed"

    # Model-wise: final errors (left) and test loss (right) vs width, mean +- 1 SE over seeds.
    fig, (ax, ax_loss) = plt.subplots(1, 2, figsize=(12, 4.5))
    w = table["width"].to_numpy()

    def curve(axis, col, scale, label, color):
        mean, se = scale * table[f"{col}_mean"].to_numpy(), scale * table[f"{col}_se"].to_numpy()
        axis.plot(w, mean, "o-", color=color, label=f"{label} ({band})", ms=4)
        axis.fill_between(w, mean - se, mean + se, color=color, alpha=0.2)  # NaN SE (n=1): no band there

    curve(ax, "test_err", 100, "test error", "tab:red")
    curve(ax, "train_err", 100, "train error (noisy labels)", "tab:blue")
    curve(ax_loss, "test_loss", 1, "test loss", "tab:purple")
    # Legends where the curves are not: error falls from the left, loss is low on the left.
    peaks = ((ax, "test_err", 100, "test-error peak: {:.1f}%", "lower left"),
             (ax_loss, "test_loss", 1, "test-loss peak: {:.3f}", "center left"))
    for axis, col, scale, text, where in peaks:
        if critical is not None:
            axis.axvline(critical, color="gray", ls="--", lw=1,
                         label=f"interpolation threshold (mean train err <= {100 * INTERPOLATED:.0f}%): "
                               f"width {critical}")
        if table[f"{col}_mean"].notna().any():
            peak = table[table["width"] == peak_width(table, col)].iloc[0]
            y = scale * peak[f"{col}_mean"]
            axis.annotate(text.format(y) + f" at width {int(peak.width)}", (peak.width, y),
                          textcoords="offset points", xytext=(0, 14), fontsize=8, ha="center",
                          arrowprops={"arrowstyle": "->", "lw": 0.8})
        axis.margins(y=0.12)  # room for the peak's label
        axis.set_xscale("log")
        plain_log_axis(axis.xaxis, list(w))
        axis.set_xlabel("width (log scale)")
        axis.grid(alpha=0.3, which="both")
        axis.legend(fontsize=8, loc=where)
    ax.set_ylabel("error (%)")
    ax_loss.set_ylabel("test loss (cross-entropy)")
    fig.suptitle(f"Model-wise double descent: {study}\n{subtitle}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "modelwise.png", dpi=130)
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

    # Epoch-wise curves for a small, the critical and a large width; mean over seeds.
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.get_cmap("plasma")(np.linspace(0.1, 0.8, 3))
    for color, width in zip(colors, _pick_widths(table, critical)):
        h = epochwise[epochwise["width"] == width]
        tag = " (interpolation threshold)" if width == critical else ""
        ax.plot(h["epoch"], 100 * h["test_err_mean"], color=color, label=f"width {width}{tag}: test")
        ax.plot(h["epoch"], 100 * h["train_err_mean"], color=color, ls=":", label=f"width {width}: train")
    ax.set_xscale("log")
    plain_log_axis(ax.xaxis)
    ax.set_xlabel("epoch (log scale)")
    ax.set_ylabel("error (%), mean over seeds")
    ax.set_title(f"Epoch-wise double descent: {study}\n{subtitle}", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
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


def left_out_note(client, parent) -> str:
    """The parent's children that did not finish (diverged, crashed, killed, still running): they are in no table or
    figure, and the report says which, with their swept values and the recorded reason."""
    runs = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' "
                              f"and attributes.status != 'FINISHED'")
    if not runs:
        return ""
    axes = sorted(k.removeprefix("sweep.") for k in parent.data.tags if k.startswith("sweep."))
    items = []
    for r in runs:
        values = " ".join(f"{k}={r.data.params.get(k, '?')}" for k in axes) or r.info.run_name
        reason = r.data.tags.get("failure_reason", "no reason recorded (killed, or still running)")
        items.append(f"- {values}: {r.info.status}, {reason}")
    return f"Left out: {len(runs)} child run(s) that did not finish.\n\n" + "\n".join(items) + "\n\n"


def headline(client, parent, table: pd.DataFrame, descent: dict[str, float] | None) -> None:
    """The study's headline as metrics of its parent run, so the MLflow UI shows the curve without opening a child:
    modelwise/{test_err,train_err,test_loss} = the means over seeds with step = width (the parent's chart view draws
    the model-wise curve), and summary/{peak_width, threshold_width, first_min_width, peak_minus_first_min(_se)}
    (`second_descent`). Points the parent already holds are not written again (a report rerun on the same runs adds
    nothing)."""
    from mlflow.entities import Metric

    now = int(1000 * pd.Timestamp.now().timestamp())
    points = [(f"modelwise/{col}", float(row[f"{col}_mean"]), int(row["width"]))
              for col in ("test_err", "train_err", "test_loss") for _, row in table.iterrows()
              if pd.notna(row[f"{col}_mean"])]
    summary = {"peak_width": float(peak_width(table))}
    critical = interpolation_threshold(table)
    if critical is not None:
        summary["threshold_width"] = float(critical)
    summary.update({k: v for k, v in (descent or {}).items() if k != "n"})
    points += [(f"summary/{k}", float(v), 0) for k, v in summary.items() if pd.notna(v)]
    held = {(k, m.step, m.value) for k in {k for k, _, _ in points} for m in client.get_metric_history(
        parent.info.run_id, k)}
    new = [Metric(k, v, now, step) for k, v, step in points if (k, step, v) not in held]
    for i in range(0, len(new), 1000):
        client.log_batch(parent.info.run_id, metrics=new[i:i + 1000])


def report(client, parent, out: Path) -> None:
    history = collect(client, parent)
    table, epochwise = modelwise_table(history), epochwise_table(history)
    study = parent.data.tags.get("study", "study")
    cfg = parent_config(client, parent, out)

    table.to_csv(out / "modelwise.csv", index=False)
    critical = interpolation_threshold(table)
    note = (f"Mean over {seeds_text(table)} per width; `_se` = standard error (sample std, ddof=1, / sqrt(n); blank "
            f"for n=1).\n\nInterpolation threshold (first width with mean final train error <= {INTERPOLATED:.0%}): "
            f"{critical if critical is not None else 'not reached'}. Test-error peak (second descent): width "
            f"{peak_width(table)}.")
    if table["test_loss_mean"].notna().any():
        note += f" Test-loss peak: width {peak_width(table, 'test_loss')}."
    descent = second_descent(history, table)
    if descent is not None:
        note += (f" Peak minus first minimum (width {descent['peak_width']:.0f} minus width "
                 f"{descent['first_min_width']:.0f}, final test error, paired by seed): "
                 f"{descent['peak_minus_first_min']:.4f} ± {descent['peak_minus_first_min_se']:.4f} (SE, "
                 f"n={descent['n']:.0f}).")
    note += "\n\n" + left_out_note(client, parent)
    (out / "modelwise.md").write_text(f"# {study}: model-wise\n\n{note}" + markdown_table(table))
    epochwise.to_csv(out / "epochwise.csv", index=False)
    last = int(epochwise["epoch"].max())
    shown = [e for e in MARKDOWN_EPOCHS if e < last] + [last]
    pivot = epochwise[epochwise["epoch"].isin(shown)].pivot(index="width", columns="epoch", values="test_err_mean")
    pivot.columns = [f"epoch {c}" for c in pivot.columns]
    (out / "epochwise.md").write_text(f"# {study}: mean test error over seeds by width (rows) and epoch (columns)"
                                      f"\n\n" + markdown_table(pivot.reset_index()))
    figures(table, epochwise, study, _subtitle(cfg, table), out)
    headline(client, parent, table, descent)
