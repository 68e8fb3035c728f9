"""Choosing a regularizer's strength on validation data (conf/exp/tune_regularization.yaml), and its report.

The lecture's rule: lambda (and a dropout keep probability) are hyperparameters, chosen on a validation set, never
on the test set. The study is a Hydra multirun whose sweeper (hydra_plugins/reglab_optuna/optuna_sweeper.py) asks
Optuna for each trial's values of the searched keys (`hydra.sweeper.params`), trains it as one child run of the
study's MLflow parent with the preset's seed, and tells Optuna the job's return value: the final epoch's `val/loss`
(scripts/train.py returns it; early stopping is off in the preset, so the weights tested are the weights validated).
Then the best trial's values and the preset's own values (the untuned default) are trained with fresh seeds
(`hydra.sweeper.evaluate.seeds`, never the tuning seed: the tuning seed's validation split chose the winner, so its
numbers there are optimistic) as children of the same parent.

The Optuna study is stored in SQLite beside the MLflow store (`storage_url`) under the name `<study>-<key>`, the
key being the MLflow parent's `reglab.study_key` (`identity(cfg, without=searched keys)`): the same command finds
the same study; a changed preset (data, model, epochs) is a new one.

The report (`report`) reads only MLflow and writes, to results/<study>/ and the parent's artifacts:
- trials.{csv,md}: one row per trial (the tuning seed's children) in the order they started (`started`; Optuna
  numbers its trials itself): the searched values, val/loss, val/err, status;
- evaluation.{csv,md}: test error and test loss per arm over the evaluation seeds (n, mean, ddof=1 std, SE, 95%
  t-interval; `reglab.results.summarize`) and the per-seed difference tuned - default (`reglab.results.paired`);
  evaluation_runs.csv: those runs;
- tune.png: val/loss vs each searched value (the best trial and the default value marked) and, when evaluated,
  test error and test loss per seed of both arms joined by seed;
- tune.md: the best configuration and the paired result in words;
and the headline as metrics of the parent (summary/best_val_loss, summary/test_{err,loss}_{tuned,default,diff}_mean,
summary/test_{err,loss}_diff_se, summary/eval_seeds).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from reglab import results
from reglab.errors import ConfigError, ReglabError
from reglab.runs.identity import identity
from reglab.studies.output import parent_config, write_figure, write_table

SEED = "seed"
OBJECTIVE = "val/loss"  # what the job returns (scripts/train.py) and what the report ranks trials by
TEST = ("test/err", "test/loss")  # compared tuned vs default over the evaluation seeds: the lecture's error, and the
                                  # held-out counterpart of the objective


# ---- the sweep's side (called by the sweeper in the launching process) ----

def search_space(arguments: list[str]) -> tuple[dict[str, Any], list[str]]:
    """({key: Optuna distribution} of the sweep overrides, [the other overrides, as given]). Grammar of Hydra's
    optuna sweeper: `interval(a, b)` uniform, `tag(log, interval(a, b))` log-uniform (integers if both ends are),
    `choice(...)` and `range(...)` categorical."""
    import optuna.distributions as D
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import IntervalSweep, Transformer

    space, fixed = {}, []
    for o in OverridesParser.create().parse_overrides(arguments):
        if not o.is_sweep_override():
            fixed.append(o.input_line)
            continue
        key, value = o.get_key_element(), o.value()
        if isinstance(value, IntervalSweep):
            log = "log" in value.tags
            if isinstance(value.start, int) and isinstance(value.end, int):
                space[key] = D.IntDistribution(value.start, value.end, log=log)
            else:
                space[key] = D.FloatDistribution(float(value.start), float(value.end), log=log)
        else:  # choice or range: the listed values
            space[key] = D.CategoricalDistribution(list(o.sweep_iterator(transformer=Transformer.encode)))
    if not space:
        raise ConfigError("hydra.sweeper.params: nothing to search; give a key a range such as "
                          "'tag(log, interval(1e-6, 1e-1))'")
    return space, fixed


def probe(space: dict[str, Any]) -> dict[str, Any]:
    """One point of the search space (each range's low end, each list's first value): a configuration to compose
    before the search starts."""
    return {k: d.choices[0] if hasattr(d, "choices") else d.low for k, d in space.items()}


def overrides(params: dict[str, Any]) -> list[str]:
    # repr keeps every digit of a float: the same trial resumed is the same configuration (one run identity)
    return [f"{k}={v!r}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()]


def evaluation_seeds(cfg: DictConfig, evaluate: DictConfig | None) -> list[int]:
    seeds = list((evaluate or {}).get("seeds") or [])
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ConfigError(f"hydra.sweeper.evaluate.seeds={seeds}: expected a list of integers")
    if cfg.seed in seeds:
        raise ConfigError(f"hydra.sweeper.evaluate.seeds={seeds} contains the tuning seed {cfg.seed}: its validation "
                          "split chose the best trial, so evaluate on other seeds")
    return seeds


def storage_url(cfg: DictConfig, given: str | None = None) -> str:
    """`given`, else SQLite beside the MLflow store: <folder of a sqlite:/// tracking URI>/optuna.db, or
    <paths.root>/mlruns/optuna.db (also when MLflow is a server). The folder of a SQLite URL is created."""
    url = given
    if not url:
        uri = OmegaConf.select(cfg, "logger.tracking_uri")
        folder = Path(uri.removeprefix("sqlite:///")).parent if uri and uri.startswith("sqlite:///") else \
            Path(cfg.paths.root).resolve() / "mlruns"
        url = f"sqlite:///{folder / 'optuna.db'}"
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return url


def study_name(cfg: DictConfig) -> str:
    """`<study>-<first 12 hex of the parent's reglab.study_key>` (reglab/runs/study.py keys the parent the same way)."""
    from reglab.runs.study import sweep_axes

    if not cfg.get("study"):
        raise ConfigError("study: the Optuna sweeper needs a study name (a conf/exp/ preset sets `study:`)")
    return f"{cfg.study}-{identity(cfg, without=list(sweep_axes(cfg.hydra)))[:12]}"


def jobs_at_once(cfg: DictConfig, n_jobs: Any) -> int:
    """hydra.sweeper.n_jobs: trials launched together; auto = the launcher's jobs at once (joblib's n_jobs, -1: every
    usable CPU; submitit's array_parallelism), 1 for the basic launcher."""
    if n_jobs in (None, "auto"):
        from reglab.launcher import launcher_parallelism

        n_jobs = launcher_parallelism(OmegaConf.select(cfg, "hydra.launcher", default=None))
    if not isinstance(n_jobs, int) or isinstance(n_jobs, bool) or n_jobs < 1:
        raise ConfigError(f"hydra.sweeper.n_jobs={n_jobs!r}: expected auto or an integer >= 1")
    return n_jobs


# ---- the report (reads MLflow only) ----

def _searched(parent) -> dict[str, str]:
    """{key: its search range} from the parent's sweep.<key> tags (reglab.runs.study.open_parent)."""
    return {k.removeprefix("sweep.").lstrip("+"): v for k, v in parent.data.tags.items() if k.startswith("sweep.")}


def _select(cfg: dict, key: str):
    node = cfg
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _same(a: pd.Series, b) -> pd.Series:
    return pd.Series(np.isclose(pd.to_numeric(a, errors="coerce"), float(b), rtol=1e-12, atol=0), index=a.index) \
        if isinstance(b, (int, float)) else a.astype(str) == str(b)


def report(client, parent, out: Path) -> None:
    searched = _searched(parent)
    study = parent.data.tags.get("study")
    cfg = parent_config(client, parent, out)
    runs = results.runs(client, parent, status=None)
    if runs.empty or not searched or not set(searched) <= set(runs.columns) or not cfg:
        raise ReglabError(f"study={study!r}: no trial (a child run with the searched keys "
                          f"{', '.join(searched) or '?'}) and study config in this parent yet")
    for col in (OBJECTIVE, "val/err", *TEST):
        runs[col] = runs[col] if col in runs else np.nan
    runs = runs[runs["status"] != "RUNNING"]  # a trial still training (or killed, not yet resumed)
    tuning_seed = cfg.get(SEED, 0)
    trials = runs[runs[SEED] == tuning_seed].reset_index(drop=True)
    trials.insert(0, "started", range(len(trials)))  # order of the child runs' start (Optuna numbers its own)
    ok = trials[(trials["status"] == "FINISHED") & np.isfinite(trials[OBJECTIVE].astype(float))]
    if ok.empty:
        raise ReglabError(f"study={study!r}: no trial finished with a finite {OBJECTIVE}")
    best = ok.loc[ok[OBJECTIVE].astype(float).idxmin()]
    default = {k: _select(cfg, k) for k in searched}

    cols = ["started", *searched, OBJECTIVE, "val/err", "status"]
    write_table(trials[cols], out / "trials")

    evals = runs[runs[SEED] != tuning_seed].copy()
    is_best = np.logical_and.reduce([_same(evals[k], best[k]) for k in searched]) if len(evals) else []
    is_default = np.logical_and.reduce([_same(evals[k], v) for k, v in default.items()]) if len(evals) else []
    evals["arm"] = np.where(is_best, "tuned", np.where(is_default, "default", "earlier best"))
    evals = evals[(evals["arm"] != "earlier best") & (evals["status"] == "FINISHED")]
    paired = summary = None
    if not evals.empty and {"tuned", "default"} <= set(evals["arm"]):
        summary = results.summarize(evals, by="arm", metrics=list(TEST))
        paired = {m: results.paired(evals, "arm", baseline="default", metric=m) for m in TEST}
        write_table(evaluation_table(summary, paired), out / "evaluation")
    evals[["arm", SEED, *searched, *TEST, OBJECTIVE, "run_id"]].to_csv(out / "evaluation_runs.csv", index=False)
    _figure(trials, ok, best, default, searched, evals, paired, out)
    (out / "tune.md").write_text(_words(study, trials, ok, best, default, searched, summary, paired, tuning_seed))
    _headline(client, parent, best, summary, paired)


def evaluation_table(summary: pd.DataFrame, paired: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Per test metric: each arm and the paired difference tuned - default, in the same columns (mean, ddof=1 std,
    SE, 95% t-interval over the evaluation seeds)."""
    stats = ("mean", "std", "se", "ci_low", "ci_high")
    rows = []
    for metric, diff in paired.items():
        rows += [{"metric": metric, "of": arm, "n": int(r["n"]), **{k: r[f"{metric}_{k}"] for k in stats}}
                 for arm in ("default", "tuned") for _, r in summary[summary["arm"] == arm].iterrows()]
        rows += [{"metric": metric, "of": "tuned - default, same seed", "n": int(r["n"]),
                  **{k: r[f"diff_{k}"] for k in stats}, "interval excludes 0": bool(r["distinct"])}
                 for _, r in diff.iterrows()]
    return pd.DataFrame(rows)


def _figure(trials, ok, best, default, searched, evals, paired, out: Path) -> None:
    import matplotlib.pyplot as plt

    panels = len(searched) + (len(TEST) if paired is not None else 0)
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.6), squeeze=False)
    for ax, (key, rng) in zip(axes[0], searched.items()):
        x = pd.to_numeric(ok[key], errors="coerce")
        ax.scatter(x, ok[OBJECTIVE], c=ok["started"], cmap="viridis", s=22, label="trial (colour: order)")
        ax.scatter([best[key]], [best[OBJECTIVE]], marker="*", s=220, c="tab:red", label="best")
        if isinstance(default[key], (int, float)):
            ax.axvline(default[key], color="gray", ls="--", lw=1, label="preset default")
        dist = search_space([f"{key}={rng}"])[0][key]
        if getattr(dist, "log", False):
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(plt.NullFormatter())
        if hasattr(dist, "low"):  # the whole searched range: where the trials did not go shows too
            pad = (dist.high / dist.low) ** 0.03 if dist.log else 0.03 * (dist.high - dist.low)
            ax.set_xlim(*((dist.low / pad, dist.high * pad) if dist.log else (dist.low - pad, dist.high + pad)))
        ax.set_xlabel(key)
        ax.set_ylabel(f"{OBJECTIVE} (final epoch, seed {int(trials[SEED].iloc[0])})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if paired is not None:
        for ax, m in zip(axes[0][len(searched):], TEST):
            scale, unit = (100, " pts") if m.endswith("err") else (1, "")
            wide = evals.pivot_table(index=SEED, columns="arm", values=m)
            for seed, row in wide.iterrows():
                ax.plot([0, 1], scale * row[["default", "tuned"]].to_numpy(), "o-", color="tab:blue", alpha=0.6)
            ax.set_xticks([0, 1], ["default", "tuned"])
            ax.set_xlim(-0.4, 1.4)
            ax.set_ylabel(f"{m}" + (" (%)" if scale == 100 else "") + ", one line per seed")
            p = paired[m].iloc[0]
            spread = f" ± {scale * p.diff_se:.2g}" if p.n > 1 and np.isfinite(p.diff_se) else ""
            ax.set_title(f"tuned - default: {scale * p.diff_mean:+.3g}{spread}{unit} (n={int(p.n)})", fontsize=9)
            ax.grid(alpha=0.3)
    fig.suptitle(f"{len(trials)} trials; best {OBJECTIVE} {best[OBJECTIVE]:.4f}", fontsize=10)
    fig.tight_layout()
    write_figure(fig, out / "tune")


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, (float, np.floating)) else str(v)


def _words(study, trials, ok, best, default, searched, summary, paired, tuning_seed) -> str:
    lines = [f"# {study}: tuning by validation", "",
             f"{len(trials)} trials with seed {tuning_seed} ({len(ok)} finished with a finite {OBJECTIVE}), "
             f"objective: {OBJECTIVE} after the last epoch.", "",
             "| key | searched | best | preset default |", "|---|---|---:|---:|"]
    lines += [f"| {k} | `{rng}` | {_fmt(best[k])} | {_fmt(default[k])} |" for k, rng in searched.items()]
    lines += ["", f"Best trial: started = {int(best['started'])} in trials.md, {OBJECTIVE} {best[OBJECTIVE]:.4f}.", ""]
    if paired is None:
        lines.append("Not evaluated on other seeds yet (hydra.sweeper.evaluate.seeds).")
    else:
        s = summary.set_index("arm")
        lines.append("Over the evaluation seeds, tuned vs default (the preset's values), mean ± SE:")
        lines.append("")
        for m, scale, unit, points, digits in (("test/err", 100, "%", " points", 1), ("test/loss", 1, "", "", 3)):
            arm = {a: results.mean_se_text(s.loc[a, f"{m}_mean"], s.loc[a, f"{m}_se"], int(s.loc[a, "n"]), scale=scale,
                                           digits=digits, unit=unit) for a in ("tuned", "default")}
            lines.append(f"- {m}: tuned {arm['tuned']}, default {arm['default']}; paired by seed, tuned - default = "
                         f"{results.diff_text(paired[m].iloc[0], scale, digits, points)}.")
    return "\n".join(lines) + "\n"


def _headline(client, parent, best, summary, paired) -> None:
    """summary/* metrics on the parent; values it holds already are not written again (a rerun adds nothing)."""
    values = {"summary/best_val_loss": float(best[OBJECTIVE])}
    if paired is not None:
        s = summary.set_index("arm")
        for m, diff in paired.items():
            name, p = m.replace("/", "_"), diff.iloc[0]
            values.update({f"summary/{name}_tuned_mean": float(s.loc["tuned", f"{m}_mean"]),
                           f"summary/{name}_default_mean": float(s.loc["default", f"{m}_mean"]),
                           f"summary/{name}_diff_mean": float(p.diff_mean), f"summary/{name}_diff_se": float(p.diff_se),
                           "summary/eval_seeds": float(p.n)})
    for k, v in values.items():
        if math.isfinite(v) and parent.data.metrics.get(k) != v:
            client.log_metric(parent.info.run_id, k, v)
