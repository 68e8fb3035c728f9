"""Report of a regularization grid (conf/exp/regularization_grid.yaml) or learning-curve study
(conf/exp/learning_curve.yaml): reads the finished child runs from MLflow and writes, to results/<study>/ and the
parent run's artifacts,

- grid.{csv,md}: per technique (and training-set size), final test error mean +- std over seeds, the train-test
  gap, final train error, and the fraction of exactly-zero weights (params/zero_frac), sorted best to worst;
- grid.png: the same as horizontal bars (one panel per training-set size, at most the largest 2 sizes);
- learning_curve.png (when the study has more than one data.train_size): test error vs training-set size, one
  line per technique;
- runs.csv: one row per child run, the numbers the tables are made of.

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

from reglab.studies.output import parent_config
from reglab.errors import ReglabError
from reglab.studies.output import markdown_table

CONF = Path(__file__).resolve().parents[3] / "conf"  # the repository's conf/ (recipe names); optional
MAIN_SETTING = {  # regularizer -> (its main argument, how the label shows it)
    "l1": ("strength", "{}"), "l1_proximal": ("strength", "{}"), "l2": ("strength", "{}"),
    "weight_decay": ("strength", "{}"), "max_norm": ("max_norm", "c={}"), "dropout": ("keep_prob", "keep {}"),
    "dropout_classic": ("keep_prob", "keep {}"), "dropconnect": ("keep_prob", "keep {}"),
    "gaussian_dropout": ("keep_prob", "keep {}"), "spatial_dropout": ("keep_prob", "keep {}"),
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
    runs = client.search_runs(
        [parent.info.experiment_id],
        f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and attributes.status = 'FINISHED'",
    )
    known = recipes()
    rows = []
    for r in runs:
        m, p = r.data.metrics, r.data.params
        if "test/err" not in m or "train/err" not in m:
            continue
        size = p.get("data.train_size")
        rows.append({
            "technique": technique(p, base_norm, known), "train_size": int(size) if size not in (None, "None") else
            None, "seed": int(p.get("seed", 0)), "run_id": r.info.run_id, "test_err": m["test/err"],
            "train_err": m["train/err"], "zero_frac": m.get("params/zero_frac", np.nan),
        })
    if not rows:
        raise ReglabError(f"study={parent.data.tags.get('study')!r}: no finished child run with train/err and "
                          f"test/err yet")
    return pd.DataFrame(rows).sort_values(["train_size", "technique", "seed"])


def grid_table(runs: pd.DataFrame) -> pd.DataFrame:
    g = runs.assign(gap=runs["test_err"] - runs["train_err"]).groupby(["train_size", "technique"], dropna=False)
    t = pd.DataFrame({
        "seeds": g["seed"].nunique(),
        "test_err_mean": g["test_err"].mean(),
        "test_err_std": g["test_err"].std(ddof=0),
        "train_err_mean": g["train_err"].mean(),
        "gap_mean": g["gap"].mean(),
        "zero_frac_mean": g["zero_frac"].mean(),
    }).reset_index()
    # Best to worst within each training-set size (largest size first).
    return t.sort_values(["train_size", "test_err_mean"], ascending=[False, True]).reset_index(drop=True)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _figure_grid(table: pd.DataFrame, runs: pd.DataFrame, subtitle: str, out: Path) -> None:
    plt = _plt()
    sizes = sorted(table["train_size"].dropna().unique(), reverse=True)[:2] or [None]
    n_tech = table["technique"].nunique()
    fig, axes = plt.subplots(1, len(sizes), figsize=(11 * len(sizes), 1.8 + 0.38 * n_tech), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        t = table[table["train_size"] == size] if size is not None else table
        t = t.iloc[::-1]  # best at the top
        y = np.arange(len(t))
        colors = ["tab:gray" if name == "none" else "tab:blue" for name in t["technique"]]
        ax.barh(y, 100 * t["test_err_mean"], xerr=100 * t["test_err_std"], color=colors, alpha=0.8, capsize=3,
                label="test error, mean ± std over seeds")
        ax.plot(100 * t["train_err_mean"], y, "|", color="tab:red", ms=12, mew=2,
                label="train error (noisy labels, training mode)")
        for yi, (_, row) in zip(y, t.iterrows()):
            sub = runs[(runs.technique == row.technique) & ((runs.train_size == size) if size is not None else True)]
            ax.plot(100 * sub["test_err"], np.full(len(sub), yi), "k.", ms=3,
                    label="test error, one seed" if yi == 0 else None)
        ax.set_yticks(y, t["technique"], fontsize=8)
        ax.set_xlabel("error (%)")
        ax.set_xlim(0, 100 * max(float(runs["test_err"].max()), float(runs["train_err"].max())) * 1.1)
        n = int(t["seeds"].max())
        ax.set_title(("" if size is None else f"{int(size)} training examples, ") + f"{n} seed(s) each", fontsize=9)
        ax.grid(alpha=0.3, axis="x")
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3)
    fig.suptitle(f"Regularization grid: final test error, best at the top\n{subtitle}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "grid.png", dpi=120)
    plt.close(fig)


def _figure_learning_curve(table: pd.DataFrame, subtitle: str, out: Path) -> None:
    plt = _plt()
    from matplotlib.ticker import FuncFormatter, NullFormatter

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.get_cmap("tab10")
    for i, (name, t) in enumerate(table.sort_values("train_size").groupby("technique", sort=False)):
        x, m, s = t["train_size"].to_numpy(float), 100 * t["test_err_mean"], 100 * t["test_err_std"]
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
    ax.set_title(f"More data: test error vs training-set size (mean ± std over seeds)\n{subtitle}", fontsize=10)
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
    table = grid_table(runs)
    table.to_csv(out / "grid.csv", index=False)
    (out / "grid.md").write_text(
        f"# {study}: final test error by technique, best to worst (mean ± std over seeds)\n\n{subtitle}\n\n"
        "gap = test error − train error (train error: last epoch, training mode, noisy labels); zero_frac: fraction "
        "of exactly-zero weights at the end.\n\n" + markdown_table(table))
    _figure_grid(table, runs, subtitle, out)
    if table["train_size"].nunique() > 1:
        _figure_learning_curve(table, subtitle, out)
