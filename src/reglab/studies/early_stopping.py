"""Report of an early-stopping study (conf/exp/early_stopping.yaml): reads the finished child runs from MLflow and
writes, to results/<study>/ and the parent run's artifacts,

- learning_curves.png: train and validation loss per epoch of one run trained past the optimum (the lecture's
  Goodfellow et al. Fig. 7.3), with the early-stopping point i* and the epoch where early stopping stopped;
- test_error.png / test_error.{csv,md}: final test error of each arm over seeds (`reglab.results.summarize`: n,
  mean, SE, 95% t-interval; the CSV also the std, ddof=1), bars = mean with +-1 SE error bars, each seed a dot;
- paired.{csv,md}: each early-stopping arm's test error minus the `final` arm's on the same seed (same data, noise,
  initialization and, up to the stop, the same training; `reglab.results.paired`): n, mean, SE, 95% interval,
  `distinct` (the interval excludes 0);
- stopping_points.{csv,md}: per seed, i* (argmin of the early-stopping run's val/loss history), the epoch it
  stopped at, and the lowest val/loss epoch of the run trained for all epochs;
- runs.csv: one row per child run, the numbers the tables are made of.

Arms (the `stopping` group, conf/stopping/): `final` = no early stopping, the weights after trainer.max_epochs;
`best` = early stopping, theta* (the best checkpoint); `retrain` / `continue` = early stopping, then Goodfellow et
al. Algorithms 7.2 / 7.3 on train + validation (reglab/early_stopping.py). Epoch e = the state after e epochs, so
i* = 1 + the 0-based step of the lowest val/loss (the step MLflow holds, and Lightning's checkpoint `epoch`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from reglab import results
from reglab.errors import ReglabError
from reglab.studies.output import markdown_table, parent_config

ARMS = {  # arm -> (label, the run's metric that holds its final test error)
    "final": ("no early stopping\n(final weights)", "test/err"),
    "best": ("early stopping\n(θ* = best checkpoint)", "test/err"),
    "retrain": ("early stopping, then retrain\non train+val for i* steps\n(Alg. 7.2)", "early_stopping/test/err"),
    "continue": ("early stopping, then continue\nθ* on train+val\n(Alg. 7.3)", "early_stopping/test/err"),
}
AFTER_STOP_ARM = {"none": "best", "retrain": "retrain", "continue": "continue"}


def arm_of(params) -> str:
    """The arm of a child run from its logged config (a dict of params, or a `results.runs` row where a param the
    run does not have is NaN): no early-stopping callback = `final`."""
    def given(key):
        v = params.get(key)
        return None if v is None or (isinstance(v, float) and np.isnan(v)) else v

    if given("callbacks.early_stopping._target_") is None:
        return "final"
    return AFTER_STOP_ARM[given("stopping.after_stop") or "none"]


def _get(row, key):
    v = row.get(key, np.nan)
    return None if pd.isna(v) else v


def collect(client, parent) -> tuple[pd.DataFrame, dict[tuple[str, int], dict[str, pd.Series]]]:
    """(one row per finished child run, {(arm, seed): {"train/loss": series, "val/loss": series}}), from
    `reglab.results.runs`: the final metrics, and the per-epoch histories (step = 0-based epoch)."""
    finals = results.runs(client, parent)
    results.not_pooled(finals, parent, ("stopping", "seed"))
    curves_df = results.runs(client, parent, history=["train/loss", "val/loss"])
    rows, curves = [], {}
    for r in finals.to_dict("records"):
        arm, seed = arm_of(r), int(_get(r, "seed") or 0)
        metric = ARMS[arm][1]
        if _get(r, metric) is None:
            continue
        h = curves_df[curves_df["run_id"] == r["run_id"]].set_index("step").sort_index()
        val = h["val/loss"].dropna().astype(float) if len(h) else pd.Series(dtype=float)
        train = h["train/loss"].dropna().astype(float) if len(h) else pd.Series(dtype=float)
        curves[(arm, seed)] = {"train/loss": train, "val/loss": val}
        best = _get(r, "early_stopping/best_epoch")
        rows.append({
            "arm": arm, "seed": seed, "run_id": r["run_id"],
            "test_err": r[metric],
            "epochs": len(val),  # epochs trained in the (first) fit
            "i_star": int(val.idxmin()) + 1 if len(val) else None,  # argmin of the val/loss history, 1-based
            "best_epoch_logged": None if best is None else int(best) + 1,
            "best_step": _get(r, "early_stopping/best_step"),
            "best_val_loss": _get(r, "early_stopping/best_val_loss"),
            "extra_steps": _get(r, "early_stopping/steps"),  # retrain/continue phase
        })
    if not rows:
        raise ReglabError(f"study={parent.data.tags.get('study')!r}: no finished child run with a test error yet")
    order = {a: i for i, a in enumerate(ARMS)}
    df = pd.DataFrame(rows)
    return df.sort_values(["arm", "seed"], key=lambda c: c.map(order) if c.name == "arm" else c), curves


def test_error_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per arm (in ARMS' order): n and the mean, std (ddof=1), SE and 95% t-interval over seeds of the final test
    error and of the epochs trained (`results.summarize`)."""
    t = results.summarize(runs, "arm", ["test_err", "epochs"])
    t = t.set_index("arm").loc[[a for a in ARMS if a in set(t["arm"])]].reset_index()
    t.insert(1, "what", [ARMS[a][0].replace("\n", " ") for a in t["arm"]])
    return t


def paired_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Each other arm's test error minus the `final` arm's on the same seed (empty without a `final` run)."""
    if not (runs["arm"] == "final").any() or runs["arm"].nunique() < 2:
        return pd.DataFrame(columns=["arm", "n", "diff_mean", "diff_std", "diff_se", "diff_ci_low", "diff_ci_high",
                                     "distinct"])
    d = results.paired(runs, "arm", "final", "test_err", pair_on="seed")
    return d.set_index("arm").loc[[a for a in ARMS if a in set(d["arm"])]].reset_index()


def stopping_points(runs: pd.DataFrame, curves: dict) -> pd.DataFrame:
    """Per seed: the early-stopping run's i* and stop epoch, and the lowest val/loss epoch over all epochs."""
    rows = []
    for seed in sorted(runs["seed"].unique()):
        es = runs[(runs.arm == "best") & (runs.seed == seed)]
        full = curves.get(("final", seed), {}).get("val/loss")
        row = {"seed": int(seed)}
        if len(es):
            e = es.iloc[0]
            row.update({"i_star": e.i_star, "best_epoch_logged": e.best_epoch_logged, "stopped_at": e.epochs,
                        "val_loss_at_i_star": curves[("best", seed)]["val/loss"].iloc[e.i_star - 1]})
        if full is not None and len(full):
            row.update({"trained_epochs_without_stopping": len(full), "argmin_all_epochs": int(full.idxmin()) + 1,
                        "val_loss_min_all_epochs": float(full.min()), "val_loss_final": float(full.iloc[-1])})
        rows.append(row)
    return pd.DataFrame(rows)


def _figure_learning_curves(runs: pd.DataFrame, curves: dict, patience: int | None, subtitle: str, out: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # The run to draw: the lowest seed's no-early-stopping run (trained past the optimum), else its longest run.
    seed = int(runs["seed"].min())
    key = ("final", seed) if ("final", seed) in curves else max(
        (k for k in curves if k[1] == seed), key=lambda k: len(curves[k]["val/loss"]))
    train, val = curves[key]["train/loss"], curves[key]["val/loss"]
    es = runs[(runs.arm == "best") & (runs.seed == seed)]
    # i*: the early-stopping run's choice (argmin of its val/loss up to where it stopped), else this curve's argmin.
    i_star = int(es.iloc[0].i_star) if len(es) else int(val.idxmin()) + 1
    stopped = int(es.iloc[0].epochs) if len(es) else None

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(train.index + 1, train.to_numpy(), color="tab:blue", label="training loss (noisy labels)")
    ax.plot(val.index + 1, val.to_numpy(), color="tab:red", label="validation loss (clean labels)")
    ax.axvline(i_star, color="black", ls="--", lw=1)
    ax.plot([i_star], [val.iloc[i_star - 1]], "o", color="black", ms=6,
            label=f"early-stopping point i* = epoch {i_star} (θ*, lowest validation loss)")
    if stopped is not None and stopped < len(val):
        ax.axvline(stopped, color="gray", ls=":", lw=1.2,
                   label=f"early stopping stops: epoch {stopped}" + (f" (patience {patience})" if patience else ""))
    ax.set_xlabel("epoch")
    ax.set_ylabel("cross-entropy loss (nats per example)")
    ax.set_xlim(0, len(val) + 1)
    ax.set_ylim(0, max(float(val.max()), float(train.max())) * 1.05)
    ax.set_title(f"Learning curves: training keeps improving, validation turns up (seed {seed})\n{subtitle}",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", framealpha=0.95)
    fig.tight_layout()
    fig.savefig(out / "learning_curves.png", dpi=130)
    plt.close(fig)


def _figure_test_error(table: pd.DataFrame, runs: pd.DataFrame, subtitle: str, out: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8))
    x = np.arange(len(table))
    colors = ["tab:gray", "tab:blue", "tab:green", "tab:orange"]
    mean, se = 100 * table["test_err_mean"].to_numpy(), 100 * table["test_err_se"].to_numpy()
    ax.bar(x, mean, yerr=se, capsize=5, alpha=0.75, color=colors[: len(table)],  # NaN (n = 1): no bar, not a 0
           label="bar: mean; error bar: ± 1 SE over seeds")
    se = np.nan_to_num(se)  # label positions; no "±" without a spread
    top = 0.0
    for i, arm in enumerate(table["arm"]):
        errs = 100 * runs[runs.arm == arm]["test_err"].to_numpy()
        ax.plot(np.full(len(errs), i) + np.linspace(-0.15, 0.15, len(errs)), errs, "k.", ms=5,
                label="one seed" if i == 0 else None)
        end = max(mean[i] + se[i], errs.max(initial=mean[i]))  # above the error bar and every seed's dot
        top = max(top, end)
        ax.annotate(f"{mean[i]:.1f} ± {se[i]:.1f}%" if se[i] else f"{mean[i]:.1f}%", (i, end),
                    textcoords="offset points", xytext=(0, 4), ha="center", fontsize=8)
    ax.set_xticks(x, [ARMS[a][0] for a in table["arm"]], fontsize=8)
    ax.set_ylabel("test error (%)")
    ax.set_title(f"Final test error with and without early stopping (n = {results.n_range(table['n'])} seeds)\n"
                 f"{subtitle}", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    ax.set_ylim(0, top * 1.25)  # room for the labels and the legend
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(out / "test_error.png", dpi=130)
    plt.close(fig)


def _subtitle(cfg: dict) -> str:
    data, model, optim = cfg.get("data") or {}, cfg.get("model") or {}, cfg.get("optim") or {}
    bits = [str(data.get("_target_", "data")).rsplit(".", 1)[-1].replace("DataModule", "").lower() or "data"]
    if data.get("train_size"):
        bits.append(f"{data['train_size']} training examples")
    if data.get("label_noise"):
        bits.append(f"{100 * data['label_noise']:.0f}% label noise")
    if model.get("width"):
        bits.append(f"{str(model.get('_target_', '')).rsplit('.', 1)[-1]} width {model['width']}")
    if optim.get("name"):
        bits.append(f"{optim['name']} lr {optim.get('lr')}")
    return ", ".join(bits)


def report(client, parent, out: Path) -> None:
    runs, curves = collect(client, parent)
    cfg = parent_config(client, parent, out)
    es_cfg = (cfg.get("callbacks") or {}).get("early_stopping") or {}
    subtitle = _subtitle(cfg)

    runs.to_csv(out / "runs.csv", index=False)
    table = test_error_table(runs)
    table.to_csv(out / "test_error.csv", index=False)
    study = parent.data.tags.get("study", "study")
    shown = ["arm", "what", "n", "test_err_mean", "test_err_se", "test_err_ci_low", "test_err_ci_high", "epochs_mean"]
    (out / "test_error.md").write_text(
        f"# {study}: final test error by arm (mean ± SE over seeds)\n\n{subtitle}\n\n"
        "SE = sample std (ddof=1) / sqrt(n); ci = 95% Student-t interval; test_error.csv also has the std. Paired "
        "differences from the `final` arm: paired.md.\n\n" + results.caveats(client, parent)
        + markdown_table(table[shown]))
    paired = paired_table(runs)
    paired.to_csv(out / "paired.csv", index=False)
    (out / "paired.md").write_text(
        f"# {study}: test error minus the `final` arm's (no early stopping), paired by seed\n\n{subtitle}\n\n"
        "Per arm: the differences test_err(arm) − test_err(final) of the runs with the same seed (same data, label "
        "noise, initialization and batch order), as n, mean, std (ddof=1), SE and 95% Student-t interval; distinct "
        "= the interval excludes 0. Negative = better than training for all epochs.\n\n"
        + (markdown_table(paired) if len(paired) else "No `final` run to pair with.\n"))
    points = stopping_points(runs, curves)
    points.to_csv(out / "stopping_points.csv", index=False)
    (out / "stopping_points.md").write_text(
        f"# {study}: early-stopping points (epochs, 1-based)\n\n"
        "i_star: argmin of the early-stopping run's val/loss history; best_epoch_logged: the best checkpoint's "
        "epoch logged by reglab.early_stopping; stopped_at: epochs the early-stopping run trained; "
        "argmin_all_epochs: lowest val/loss of the run trained for all epochs.\n\n" + markdown_table(points))
    _figure_learning_curves(runs, curves, es_cfg.get("patience"), subtitle, out)
    _figure_test_error(table, runs, subtitle, out)
