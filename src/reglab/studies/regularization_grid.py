"""Report of a regularization grid (conf/exp/regularization_grid.yaml) or learning-curve study
(conf/exp/learning_curve.yaml): reads the finished child runs from MLflow and writes, to results/<study>/ and the
parent run's artifacts,

- grid.{csv,md}: per technique (and training-set size), `reglab.results.summarize` over seeds of the final test
  error (n, mean, SE, 95% t-interval; the CSV also the std, ddof=1), the train-test gap, final train error and the
  fraction of exactly-zero weights (params/zero_frac), the eval-mode train error (train_eval/err) where logged; the
  paired difference from `none`; the rank; sorted by mean test error;
- paired.{csv,md}: per technique (and training-set size), test error minus that of `none` on the same seed (same
  data, label noise and batch order; `reglab.results.paired`): n, mean, SE, 95% t-interval and `distinct` (the
  interval excludes 0). Pairing removes what a seed does to every technique alike, so it sees differences that two
  overlapping per-technique intervals hide;
- grid.png: per training-set size (at most the largest 2), the test error as bars (mean +- 1 SE, each seed a dot)
  and, beside it, the paired difference from `none` (mean and 95% interval, colored by whether it is distinct);
- learning_curve.png (when the study has more than one data.train_size): test error vs training-set size, one
  line per technique, mean +- 1 SE band;
- runs.csv: one row per child run, the numbers the tables are made of.

Ranking (`reglab.results.ranks`, within each training-set size): a technique's rank is 1 + the number of
techniques measurably better than it (a lower mean test error and a paired per-seed difference whose 95% interval
excludes 0; they are `better` in grid.csv), so rank 1 = none is measurably better, techniques with the same count
share a rank ("=k" in grid.png), and the order never claims more than the seeds measured. Ranks need not follow the
means (a small but consistent gap is measurable where a larger noisy one is not). The intervals are per pair and not
corrected for the many pairs a grid has: a lone distinction may be chance.

A technique is named from the run's logged config: the regularizers it has (`regularization.<name>.*` params) with
their main setting, plus batch norm when the run's model.norm differs from the study's. Recipes
(conf/regularization files with `# @package _global_`) are recognized by their regularizer set and norm.

Train error is the mean over the last epoch's batches, in training mode (dropout on) and on the noisy labels, as the
Classifier logs it; test error is the final weights on the clean test set (these presets turn early stopping off,
so that the regularizers, not the stopping time, make the difference).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from reglab import results
from reglab.errors import ReglabError
from reglab.studies.output import markdown_table, parent_config

BASELINE = "none"  # the technique every other one is paired against
CONF = Path(__file__).resolve().parents[3] / "conf"  # the repository's conf/ (recipe names); optional
MAIN_SETTING = {  # regularizer -> (its main argument, how the label shows it)
    "l1": ("strength", "{}"), "l1_proximal": ("strength", "{}"), "l2": ("strength", "{}"),
    "weight_decay": ("strength", "{}"), "max_norm": ("max_norm", "c={}"), "dropout": ("keep_prob", "keep {}"),
    "dropout_classic": ("keep_prob", "keep {}"), "dropconnect": ("keep_prob", "keep {}"),
    "gaussian_dropout": ("keep_prob", "keep {}"), "spatial_dropout": ("keep_prob", "keep {}"),
    "label_smoothing": ("smoothing", "ε={}"), "mixup": ("alpha", "α={}"), "cutmix": ("alpha", "α={}"),
    "stochastic_depth": ("keep_prob", "keep {}"), "ema": ("decay", "d={}"), "swa": ("start", "from {}"),
}


def recipes(conf: Path = CONF) -> dict[tuple[frozenset, str | None], str]:
    """{(regularizer names, model.norm it sets or None): recipe name} from conf/regularization/*.yaml."""
    out = {}
    for path in sorted((conf / "regularization").glob("*.yaml")) if conf.is_dir() else []:
        node = yaml.safe_load(path.read_text()) or {}
        parts = [str(d).rsplit("/", 1)[-1] for d in node.get("defaults", []) if str(d).startswith("/regularization/")]
        if parts:
            out[(frozenset(parts), (node.get("model") or {}).get("norm"))] = path.stem
    return out


def _number(v: str) -> str:
    try:
        return f"{float(v):g}"
    except ValueError:
        return v


def technique(params: dict[str, str], base_norm: str, known: dict) -> str:
    names = list(dict.fromkeys(k.split(".")[1] for k in params if k.startswith("regularization.")))
    parts = []
    for name in names:
        arg, fmt = MAIN_SETTING.get(name, (None, ""))
        if name == "elastic_net":
            parts.append(f"elastic_net l1 {_number(params['regularization.elastic_net.l1_strength'])}, "
                         f"l2 {_number(params['regularization.elastic_net.l2_strength'])}")
        elif arg and f"regularization.{name}.{arg}" in params:
            parts.append(f"{name} " + fmt.format(_number(params[f"regularization.{name}.{arg}"])))
        else:
            parts.append(name)
    norm = params.get("model.norm", base_norm)
    if norm != base_norm:
        parts.append(f"{norm} norm")
    label = " + ".join(parts) or "none"
    recipe = known.get((frozenset(names), norm)) or known.get((frozenset(names), None))
    return f"{recipe}: {label}" if recipe and len(names) > 1 else label


def collect(client, parent, base_norm: str) -> pd.DataFrame:
    """One row per finished child with a final test and train error (`reglab.results.runs`): technique,
    train_size, seed, run_id, test_err, train_err, zero_frac, gap = test_err - train_err."""
    df = results.runs(client, parent)
    if not {"test/err", "train/err"} <= set(df.columns):
        df = df.iloc[0:0]
    else:
        df = df.dropna(subset=["test/err", "train/err"])
    if df.empty:
        raise ReglabError(f"study={parent.data.tags.get('study')!r}: no finished child run with train/err and "
                          f"test/err yet")
    results.not_pooled(df, parent, ("regularization", "data.train_size", "seed"))
    known = recipes()
    # technique() reads the run's config as logged: regularization.* and model.norm, as strings, absent = not set
    config = [c for c in df.columns if c.startswith("regularization.") or c == "model.norm"]
    names = [technique({k: str(v) for k, v in row.items() if pd.notna(v)}, base_norm, known)
             for row in df[config].to_dict("records")]
    out = pd.DataFrame({
        "technique": names,
        "train_size": df["data.train_size"] if "data.train_size" in df else np.nan,
        "seed": df["seed"] if "seed" in df else 0,
        "run_id": df["run_id"],
        "test_err": df["test/err"], "train_err": df["train/err"],
        "zero_frac": df["params/zero_frac"] if "params/zero_frac" in df else np.nan,
        # eval mode (dropout off) on the full, noisy training set, once after the last epoch, where logged
        "train_eval_err": df["train_eval/err"] if "train_eval/err" in df else np.nan,
    })
    out["gap"] = out["test_err"] - out["train_err"]
    return out.sort_values(["train_size", "technique", "seed"]).reset_index(drop=True)


def paired_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Test error minus BASELINE's, paired by seed, per technique and training-set size (sizes without a BASELINE
    run are left out); best (most negative) first within each size, largest size first."""
    cols = ["train_size", "technique", "n", "diff_mean", "diff_std", "diff_se", "diff_ci_low", "diff_ci_high",
            "distinct"]
    sizes = runs.loc[runs["technique"] == BASELINE, "train_size"].unique()
    part = runs[runs["train_size"].isin(sizes)]
    if part.empty or part["technique"].nunique() < 2:
        return pd.DataFrame(columns=cols)
    d = results.paired(part, "technique", BASELINE, "test_err", pair_on="seed", within=["train_size"])
    return d[cols].sort_values(["train_size", "diff_mean"], ascending=[False, True]).reset_index(drop=True)


def grid_table(runs: pd.DataFrame, paired: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per (train_size, technique): rank, n, and mean, std (ddof=1), SE, 95% interval of test_err, train_err, gap
    and zero_frac (`results.summarize`), and the paired difference from BASELINE (`vs_none_*`). Sorted largest
    size first, then by mean test error (ranks need not follow it)."""
    paired = paired_table(runs) if paired is None else paired
    metrics = ["test_err", "train_err", "gap", "zero_frac"]
    metrics += ["train_eval_err"] if "train_eval_err" in runs and runs["train_eval_err"].notna().any() else []
    t = results.summarize(runs, ["train_size", "technique"], metrics)
    r = results.ranks(runs, "technique", "test_err", pair_on="seed", within=["train_size"])
    t = t.merge(r[["train_size", "technique", "rank", "better"]], on=["train_size", "technique"], how="left")
    # vs_none_n: the seeds paired with none's (a seed without a none run is left out of the difference)
    vs = paired.drop(columns=["diff_std"]).rename(
        columns=lambda c: c.replace("diff_", f"vs_{BASELINE}_") if c.startswith("diff_") else
        (f"vs_{BASELINE}_{c}" if c in ("distinct", "n") else c))
    t = t.merge(vs, on=["train_size", "technique"], how="left")
    first = ["train_size", "rank", "technique", "n", "better"]
    t = t[[*first, *(c for c in t.columns if c not in first)]]
    return t.sort_values(["train_size", "test_err_mean"], ascending=[False, True]).reset_index(drop=True)


# grid.md: the columns a reader needs; grid.csv has them all
MARKDOWN_COLUMNS = ["train_size", "rank", "technique", "n", "test_err_mean", "test_err_se", "test_err_ci_low",
                    "test_err_ci_high", f"vs_{BASELINE}_mean", f"vs_{BASELINE}_ci_low", f"vs_{BASELINE}_ci_high",
                    f"vs_{BASELINE}_distinct", f"vs_{BASELINE}_n", "train_err_mean", "train_eval_err_mean", "gap_mean", "zero_frac_mean"]


def rank_labels(t: pd.DataFrame) -> list[str]:
    """'=k technique' for a rank that techniques share, 'k technique' for one that is its own."""
    shared = t["rank"].value_counts()
    return [f"-  {name}" if pd.isna(r) else f"{'=' if shared[r] > 1 else ''}{int(r)}  {name}"
            for r, name in zip(t["rank"], t["technique"])]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _figure_grid(table: pd.DataFrame, runs: pd.DataFrame, subtitle: str, out: Path) -> None:
    plt = _plt()
    sizes = sorted(table["train_size"].dropna().unique(), reverse=True)[:2] or [None]
    n_tech = table["technique"].nunique()
    has_pairs = table[f"vs_{BASELINE}_mean"].notna().any()
    fig, axes = plt.subplots(len(sizes), 2 if has_pairs else 1, figsize=(16 if has_pairs else 10,
                             (2.2 + 0.4 * n_tech) * len(sizes)), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 2]} if has_pairs else None)
    top = 100 * max(float(runs["test_err"].max()), float(runs["train_err"].max()))
    for row_axes, size in zip(axes, sizes):
        ax = row_axes[0]
        t = table[table["train_size"] == size] if size is not None else table
        sub_runs = runs[runs["train_size"] == size] if size is not None else runs
        t = t.iloc[::-1]  # best at the top
        y = np.arange(len(t))
        mean, se = 100 * t["test_err_mean"].to_numpy(), 100 * t["test_err_se"].to_numpy()
        colors = ["tab:gray" if name == BASELINE else "tab:blue" for name in t["technique"]]
        ax.barh(y, mean, xerr=se, color=colors, alpha=0.8, capsize=3)  # NaN (n = 1): no bar, not a 0
        se = np.nan_to_num(se)  # label positions; no "±" without a spread
        ax.plot(100 * t["train_err_mean"], y, "|", color="tab:red", ms=12, mew=2)
        for yi, name, m, e in zip(y, t["technique"], mean, se):
            seeds = 100 * sub_runs.loc[sub_runs["technique"] == name, "test_err"].to_numpy()
            ax.plot(seeds, np.full(len(seeds), yi), "k.", ms=3)
            end = max(m + e, seeds.max(initial=m))  # the label starts past the error bar and every seed's dot
            ax.annotate(f"{m:.1f} ± {e:.1f}" if e else f"{m:.1f}", (end, yi), textcoords="offset points",
                        xytext=(4, 0), va="center", fontsize=7)
        ax.set_yticks(y, rank_labels(t), fontsize=8)
        ax.set_xlabel("test error (%)")
        ax.set_xlim(0, top * 1.25)  # room for the value labels
        ax.set_title(("" if size is None else f"{int(size)} training examples, ") + f"n = {results.n_range(t['n'])} "
                     "seed(s) per technique; "
                     "rank = 1 + techniques measurably better; =k: shared", fontsize=9)
        ax.grid(alpha=0.3, axis="x")
        if has_pairs:
            _panel_paired(row_axes[1], t, y)
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [Patch(color="tab:blue", alpha=0.8, label="test error: bar = mean, error bar = ± 1 SE over seeds"),
               Patch(color="tab:gray", alpha=0.8, label=f"{BASELINE} (no regularization)"),
               Line2D([], [], ls="", marker=".", color="k", label="test error, one seed"),
               Line2D([], [], ls="", marker="|", ms=12, mew=2, color="tab:red",
                      label="train error (noisy labels, training mode)")]
    if has_pairs:
        handles += [Patch(color="tab:green", alpha=0.7, label=f"paired difference: distinct, better than {BASELINE}"),
                    Patch(color="tab:red", alpha=0.7, label=f"paired difference: distinct, worse than {BASELINE}"),
                    Patch(color="tab:gray", alpha=0.7, label="paired difference: not distinct (interval holds 0)"),
                    Line2D([], [], color="k", marker="|", ms=8, lw=1,
                           label="paired difference: error bar = 95% t-interval over seeds")]
    fig.suptitle(f"Regularization grid: final test error, lowest mean at the top\n{subtitle}", fontsize=10)
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=8, frameon=False)
    rows = -(-len(handles) // 4)
    fig.tight_layout(rect=(0, (0.25 * rows + 0.15) / fig.get_figheight(), 1, 1))  # the legend's rows below
    fig.savefig(out / "grid.png", dpi=120)
    plt.close(fig)


def _panel_paired(ax, t: pd.DataFrame, y: np.ndarray) -> None:
    """Test error minus BASELINE's on the same seed, mean and 95% t-interval, on the left panel's rows."""
    mean = 100 * t[f"vs_{BASELINE}_mean"].to_numpy(dtype=float)
    lo = 100 * t[f"vs_{BASELINE}_ci_low"].to_numpy(dtype=float)
    hi = 100 * t[f"vs_{BASELINE}_ci_high"].to_numpy(dtype=float)
    distinct = t[f"vs_{BASELINE}_distinct"].fillna(False).to_numpy(dtype=bool)
    shown = ~np.isnan(mean)
    kinds = (("tab:green", distinct & (mean < 0)), ("tab:red", distinct & (mean > 0)), ("tab:gray", ~distinct & shown))
    for color, sel in kinds:
        if sel.any():
            ax.barh(y[sel], mean[sel], color=color, alpha=0.7)
    has_ci = shown & ~np.isnan(lo)
    ax.errorbar(mean[has_ci], y[has_ci], xerr=[mean[has_ci] - lo[has_ci], hi[has_ci] - mean[has_ci]], fmt="none",
                ecolor="black", capsize=3, lw=1)
    ends = np.where(has_ci, hi, mean)
    right = np.nanmax(np.concatenate([ends[shown], [0.0]]))
    left = np.nanmin(np.concatenate([np.where(has_ci, lo, mean)[shown], [0.0]]))
    for yi, m, l, h, end, ok in zip(y, mean, lo, hi, ends, shown):
        if not ok:
            continue
        text = f"{m:+.1f} [{l:+.1f}, {h:+.1f}]" if not np.isnan(l) else f"{m:+.1f} (n=1)"
        # past the error bar's right end, and past 0 where the bar itself ends there
        ax.annotate(text, (max(end, 0.0), yi), textcoords="offset points", xytext=(4, 0), va="center", fontsize=7)
    span = max(right - left, 1e-9)
    ax.set_xlim(left - 0.05 * span, right + 0.8 * span)  # room for the labels on the right
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(y, [""] * len(y))
    ax.set_ylim(-0.5, len(y) - 0.5)
    ax.set_xlabel(f"test error − {BASELINE}'s on the same seed (percentage points)")
    ax.set_title(f"paired difference from {BASELINE} (same seed): mean [95% interval]", fontsize=9)
    ax.grid(alpha=0.3, axis="x")


def _figure_learning_curve(table: pd.DataFrame, subtitle: str, out: Path) -> None:
    plt = _plt()
    from matplotlib.ticker import FuncFormatter, NullFormatter

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.get_cmap("tab10")
    for i, (name, t) in enumerate(table.sort_values("train_size").groupby("technique", sort=False)):
        x, m, s = t["train_size"].to_numpy(float), 100 * t["test_err_mean"], 100 * t["test_err_se"]
        ax.plot(x, m, "o-", color=colors(i), label=f"{name}: test", ms=4)
        ax.fill_between(x, m - s, m + s, color=colors(i), alpha=0.15)
        ax.plot(x, 100 * t["train_err_mean"], ":", color=colors(i), label=f"{name}: train (noisy labels)")
    ax.set_xscale("log")
    sizes = sorted(table["train_size"].unique())
    ax.set_xticks(sizes)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("training-set size (examples, log scale)")
    ax.set_ylabel("error (%)")
    n = results.n_range(table["n"])
    ax.set_title(f"More data: test error vs training-set size (mean, band ± 1 SE over n = {n} seeds)\n{subtitle}",
                 fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "learning_curve.png", dpi=130)
    plt.close(fig)


def _subtitle(cfg: dict) -> str:
    data, model, optim = cfg.get("data") or {}, cfg.get("model") or {}, cfg.get("optim") or {}
    bits = [str(data.get("_target_", "data")).rsplit(".", 1)[-1].replace("DataModule", "").lower() or "data"]
    if data.get("label_noise"):
        bits.append(f"{100 * data['label_noise']:.0f}% label noise")
    if model.get("width"):
        name = str(model.get("_target_", "")).rsplit(".", 1)[-1]
        bits.append(f"{name} width {model['width']}" + (f" depth {model['depth']}" if "depth" in model else ""))
    if optim.get("name"):
        bits.append(f"{optim['name']} lr {optim.get('lr')}")
    if (cfg.get("trainer") or {}).get("max_epochs"):
        bits.append(f"{cfg['trainer']['max_epochs']} epochs")
    return ", ".join(bits)


def report(client, parent, out: Path) -> None:
    cfg = parent_config(client, parent, out)
    runs = collect(client, parent, base_norm=str((cfg.get("model") or {}).get("norm", "none")))
    subtitle = _subtitle(cfg)
    study = parent.data.tags.get("study", "study")
    runs.to_csv(out / "runs.csv", index=False)
    paired = paired_table(runs)
    table = grid_table(runs, paired)
    table.to_csv(out / "grid.csv", index=False)
    n = f"n = {results.n_range(table['n'])}"
    (out / "grid.md").write_text(
        f"# {study}: final test error by technique, lowest mean first (mean ± SE over {n} seeds)\n\n{subtitle}\n\n"
        "test_err: mean, standard error (sample std, ddof=1, / sqrt(n)) and 95% Student-t interval over seeds. "
        f"vs_{BASELINE}: test error minus {BASELINE}'s on the same seed (mean and 95% interval of the paired "
        f"differences over the vs_{BASELINE}_n seeds both have; distinct = the interval excludes 0; paired.md). "
        "rank: 1 + the techniques measurably better (a lower mean and a paired difference whose 95% interval excludes "
        "0; grid.csv's `better` names them): rank 1 = none is; ranks need not follow the means. Intervals per pair, "
        "not corrected for the number of pairs. gap = test "
        "error − train error (train error: last epoch, training mode, noisy labels); train_eval_err (where "
        "logged): eval mode, dropout off, the full noisy training set after the last epoch; zero_frac: fraction "
        "of exactly-zero weights at the end. grid.csv has every column (std, intervals of each metric).\n\n"
        + results.caveats(client, parent) + markdown_table(table[[c for c in MARKDOWN_COLUMNS if c in table]]))
    paired.to_csv(out / "paired.csv", index=False)
    (out / "paired.md").write_text(
        f"# {study}: test error minus {BASELINE}'s, paired by seed\n\n{subtitle}\n\n"
        f"Per technique (and training-set size): the differences test_err(technique) − test_err({BASELINE}) of the "
        "runs with the same seed (same data, label noise and batch order), as n, mean, std (ddof=1), SE and 95% "
        "Student-t interval; distinct = the interval excludes 0 (never with n < 2). Negative = better than "
        f"{BASELINE}. Intervals are per technique, not corrected for the number of techniques.\n\n"
        + (markdown_table(paired) if len(paired) else f"No run of `{BASELINE}` to pair with.\n"))
    _figure_grid(table, runs, subtitle, out)
    if table["train_size"].nunique() > 1:
        _figure_learning_curve(table, subtitle, out)
