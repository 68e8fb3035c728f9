"""Report of a double-descent study (Nakkiran et al. 2019, "Deep Double Descent", arXiv 1912.02292): reads the
study's finished child runs from MLflow and writes, to results/<study>/ and the parent run's artifacts,

- modelwise.png / modelwise.{csv,md}: final test and train error vs width (log x), mean +- std over seeds, with the
  interpolation threshold (the first width whose mean final train error is <= INTERPOLATED) marked;
- epochwise_heatmap.png / epochwise.{csv,md}: test error by width x epoch (log epoch axis), the paper's Figure 2;
- epochwise_curves.png: test error vs epoch for a small, the critical and a large width;
- config.yaml: the study's config (the parent run's).

Train error is the mean over the epoch's batches (in train mode), as logged by the Classifier; test error is the
held-out set after each epoch (data.test_every_epoch). Epoch e in the tables is the state after e epochs.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from reglab.studies.output import parent_config
from reglab.errors import ReglabError

INTERPOLATED = 0.01  # "train error ~ 0": at most 1% of the (noisy) training labels not fitted
WIDTH, SEED = "model.width", "seed"


def collect(client, parent) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per-run final numbers, per-run per-epoch history) of the parent's finished children."""
    runs = client.search_runs(
        [parent.info.experiment_id],
        f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and attributes.status = 'FINISHED'",
    )
    finals, rows = [], []
    for r in runs:
        width, seed = int(r.data.params[WIDTH]), int(r.data.params.get(SEED, 0))
        train = {m.step: m.value for m in client.get_metric_history(r.info.run_id, "train/err")}
        test = {m.step: m.value for m in client.get_metric_history(r.info.run_id, "test/err")}
        steps = sorted(s for s in train if s in test)  # per-epoch points (the final trainer.test is one past them)
        if not steps:
            continue
        for s in steps:
            rows.append({"width": width, "seed": seed, "epoch": s + 1, "train_err": train[s], "test_err": test[s]})
        last = steps[-1]
        finals.append({"width": width, "seed": seed, "params": int(float(r.data.params.get("model.params", "nan")))
                       if r.data.params.get("model.params") else None, "epochs": last + 1,
                       "train_err": train[last], "test_err": test[last]})
    if not finals:
        raise ReglabError(f"study={parent.data.tags.get('study')!r}: no finished child run with train/err and "
                          f"test/err yet")
    return pd.DataFrame(finals), pd.DataFrame(rows)


def modelwise_table(finals: pd.DataFrame) -> pd.DataFrame:
    g = finals.groupby("width")
    t = pd.DataFrame({
        "params": g["params"].first(),
        "seeds": g["seed"].nunique(),
        "epochs": g["epochs"].max(),
        "test_err_mean": g["test_err"].mean(),
        "test_err_std": g["test_err"].std(ddof=0),
        "train_err_mean": g["train_err"].mean(),
        "train_err_std": g["train_err"].std(ddof=0),
    }).reset_index()
    return t.sort_values("width")


def interpolation_threshold(table: pd.DataFrame) -> int | None:
    fitted = table[table["train_err_mean"] <= INTERPOLATED]
    return int(fitted["width"].iloc[0]) if len(fitted) else None


def peak_width(table: pd.DataFrame) -> int:
    """Width of the second-descent peak: the highest test error at or beyond the classical sweet spot (the lowest
    test error among widths up to the interpolation threshold), so an underfitting small width is not "the peak"."""
    critical = interpolation_threshold(table)
    classical = table if critical is None else table[table["width"] <= critical]
    sweet = classical.loc[classical["test_err_mean"].idxmin(), "width"]
    beyond = table[table["width"] >= sweet]
    return int(beyond.loc[beyond["test_err_mean"].idxmax(), "width"])


def epochwise_table(history: pd.DataFrame) -> pd.DataFrame:
    g = history.groupby(["width", "epoch"])
    return pd.DataFrame({
        "test_err_mean": g["test_err"].mean(),
        "test_err_std": g["test_err"].std(ddof=0),
        "train_err_mean": g["train_err"].mean(),
    }).reset_index()


def to_markdown(df: pd.DataFrame, floatfmt: str = "{:.4f}") -> str:
    def cell(v):
        if isinstance(v, float):
            return "" if math.isnan(v) else floatfmt.format(v)
        return str(v)

    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


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
    n_seeds = int(table["seeds"].max())

    # Model-wise: final errors vs width.
    fig, ax = plt.subplots(figsize=(7, 4.5))
    w = table["width"].to_numpy()
    for key, label, color in (("test", "test error", "tab:red"), ("train", "train error (noisy labels)", "tab:blue")):
        mean, std = 100 * table[f"{key}_err_mean"].to_numpy(), 100 * table[f"{key}_err_std"].to_numpy()
        ax.plot(w, mean, "o-", color=color, label=label, ms=4)
        if n_seeds > 1:
            ax.fill_between(w, mean - std, mean + std, color=color, alpha=0.2)
    if critical is not None:
        ax.axvline(critical, color="gray", ls="--", lw=1,
                   label=f"interpolation threshold (train err <= {100 * INTERPOLATED:.0f}%): width {critical}")
    peak = table[table["width"] == peak_width(table)].iloc[0]
    ax.annotate(f"test-error peak: {100 * peak.test_err_mean:.1f}% at width {int(peak.width)}",
                (peak.width, 100 * peak.test_err_mean), textcoords="offset points", xytext=(0, 14), fontsize=8,
                ha="center", arrowprops={"arrowstyle": "->", "lw": 0.8})
    ax.set_xscale("log")
    plain_log_axis(ax.xaxis, list(w))
    ax.set_xlabel("width (hidden units per layer, log scale)")
    ax.set_ylabel("error (%)")
    ax.set_title(f"Model-wise double descent: {study}\n{subtitle}", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "modelwise.png", dpi=130)
    plt.close(fig)

    # Epoch-wise heatmap: widths (rows) x epochs (columns), log epoch axis.
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
    ax.set_ylabel("width (hidden units per layer)")
    ax.set_title(f"Epoch-wise: test error by width and epoch ({study})\n{subtitle}", fontsize=10)
    fig.colorbar(mesh, ax=ax, label="test error (%)")
    fig.tight_layout()
    fig.savefig(out / "epochwise_heatmap.png", dpi=130)
    plt.close(fig)

    # Epoch-wise curves for a small, the critical and a large width.
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
    ax.set_ylabel("error (%)")
    ax.set_title(f"Epoch-wise double descent: {study}\n{subtitle}", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "epochwise_curves.png", dpi=130)
    plt.close(fig)


def _subtitle(cfg: dict, table: pd.DataFrame) -> str:
    data = cfg.get("data") or {}
    name = str(data.get("_target_", "")).rsplit(".", 1)[-1].replace("DataModule", "") or "data"
    bits = [name]
    if "label_noise" in data:
        bits.append(f"{100 * data['label_noise']:.0f}% label noise")
    bits += [f"{int(table['epochs'].max())} epochs", f"mean of {int(table['seeds'].max())} seed(s)"]
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


def report(client, parent, out: Path) -> None:
    finals, history = collect(client, parent)
    table = modelwise_table(finals)
    epochwise = epochwise_table(history)
    study = parent.data.tags.get("study", "study")
    cfg = parent_config(client, parent, out)

    table.to_csv(out / "modelwise.csv", index=False)
    critical = interpolation_threshold(table)
    note = (f"Interpolation threshold (first width with mean final train error <= {INTERPOLATED:.0%}): "
            f"{critical if critical is not None else 'not reached'}. Test-error peak (second descent): width "
            f"{peak_width(table)}.\n\n")
    note += left_out_note(client, parent)
    (out / "modelwise.md").write_text(f"# {study}: model-wise\n\n{note}" + to_markdown(table))
    epochwise.to_csv(out / "epochwise.csv", index=False)
    last = int(epochwise["epoch"].max())
    shown = [e for e in MARKDOWN_EPOCHS if e < last] + [last]
    pivot = epochwise[epochwise["epoch"].isin(shown)].pivot(index="width", columns="epoch", values="test_err_mean")
    pivot.columns = [f"epoch {c}" for c in pivot.columns]
    (out / "epochwise.md").write_text(f"# {study}: mean test error by width (rows) and epoch (columns)\n\n"
                                      + to_markdown(pivot.reset_index()))
    figures(table, epochwise, study, _subtitle(cfg, table), out)
