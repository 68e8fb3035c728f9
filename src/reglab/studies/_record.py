"""Where a study runner's outputs go: `<paths.root>/results/<study>/` (figures as PNG, tables as CSV + Markdown)
and, unless `logger.backend=none`, MLflow: one parent run per study (found again by a hash of the study's
config, so a rerun reuses it), one child run per configuration (skipped when the parent already has a child
with the same key: same study config and seed = same numbers), the results folder as the parent's artifacts.

Underscore module: not a runner (reglab.train.study_runners skips it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from reglab import tracking  # noqa: E402
from reglab.errors import ConfigError  # noqa: E402

log = logging.getLogger(__name__)


def config_key(node: Any) -> str:
    return hashlib.sha256(json.dumps(node, sort_keys=True, default=str).encode()).hexdigest()


def parent_config(client, parent, out: Path) -> dict:
    """The study config a sweep's parent run holds as `config.yaml` ({} for a parent without one: a report then
    says less, nothing breaks)."""
    import yaml

    try:
        path = client.download_artifacts(parent.info.run_id, "config.yaml", str(out))
    except Exception:
        return {}
    return yaml.safe_load(Path(path).read_text()) or {}


def markdown_table(df: pd.DataFrame, floatfmt: str = ".4g") -> str:
    def cell(v):
        if isinstance(v, float):
            if math.isnan(v):
                return ""  # e.g. w_j for j > M in Bishop's Table 1.1
            return "−∞" if v == -math.inf else format(v + 0.0, floatfmt)  # + 0.0: no "-0"
        return str(v)

    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---:" for _ in cols) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


class StudyRecorder:
    def __init__(self, cfg: DictConfig, study: str):
        if study not in cfg:
            raise ConfigError(f"{study}: missing config node; run the preset with +exp={study}")
        self.study = study
        self.dir = Path(cfg.paths.root) / "results" / study
        self.dir.mkdir(parents=True, exist_ok=True)
        node = OmegaConf.to_container(cfg[study], resolve=True)
        self.client = self.parent = None
        self._children: set[str] = set()
        backend = cfg.logger.get("backend", "none")
        if backend not in ("mlflow", "none"):
            raise ConfigError(f"logger.backend={backend!r} is not one of mlflow, none")
        if backend == "mlflow":
            self.client, self.experiment_id = tracking.client_and_experiment(
                cfg.logger.get("tracking_uri"), cfg.paths.root, cfg.logger.experiment)
            params = {"seed": cfg.seed, **tracking.flatten(node, f"{study}.")}
            self.parent = tracking.study_parent(self.client, self.experiment_id, study,
                                                config_key({"seed": cfg.seed, study: node}), params)
            self.client.log_text(self.parent, OmegaConf.to_yaml(cfg[study], resolve=True), "config.yaml")
            found = self.client.search_runs([self.experiment_id], f"tags.mlflow.parentRunId = '{self.parent}'",
                                            max_results=5000)
            self._children = {r.data.tags.get("reglab.child_key") for r in found}

    def child(self, name: str, params: dict[str, Any], metrics: dict[str, float],
              curves: dict[str, list[tuple[int, float]]] | None = None) -> None:
        """One MLflow child run: params, final metrics, and optional per-step curves {name: [(step, value)]}."""
        if self.client is None:
            return
        key = config_key(params)[:16]
        if key in self._children:
            return
        from mlflow.entities import Metric, Param

        run = self.client.create_run(self.experiment_id, run_name=name,
                                     tags={**tracking.child_tags(self.parent, self.study), "reglab.child_key": key})
        now = int(1000 * pd.Timestamp.now().timestamp())
        ms = [Metric(k, float(v), now, 0) for k, v in metrics.items() if math.isfinite(v)]
        for k, points in (curves or {}).items():
            ms += [Metric(k, float(v), now, int(s)) for s, v in points if math.isfinite(v)]
        ps = [Param(k, str(v)) for k, v in params.items()]
        for i in range(0, max(len(ms), 1), 1000):  # log_batch takes at most 1000 metrics
            self.client.log_batch(run.info.run_id, metrics=ms[i:i + 1000], params=ps if i == 0 else [])
        self.client.set_terminated(run.info.run_id)
        self._children.add(key)

    def table(self, df: pd.DataFrame, name: str, floatfmt: str = ".4g") -> Path:
        df.to_csv(self.dir / f"{name}.csv", index=False)
        path = self.dir / f"{name}.md"
        path.write_text(markdown_table(df, floatfmt))
        return path

    def figure(self, fig, name: str) -> Path:
        path = self.dir / f"{name}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        return path

    def finish(self, metrics: dict[str, float], failed: bool = False) -> None:
        if self.client is None:
            return
        for k, v in metrics.items():
            if math.isfinite(v):
                self.client.log_metric(self.parent, k, float(v))
        self.client.log_artifacts(self.parent, str(self.dir))
        self.client.set_terminated(self.parent, "FAILED" if failed else "FINISHED")

    def run(self, body, threads: int) -> dict[str, float]:
        """body(self) -> metrics with torch on `threads` intra-op threads (tiny tensors: more threads only add
        synchronisation; on a shared 2-core machine they made small steps 10-40x slower, measured), restored
        afterwards; the parent run is finished (FAILED if body raises) and the wall time recorded."""
        import torch

        start, before = time.time(), torch.get_num_threads()
        torch.set_num_threads(int(threads))
        try:
            metrics = body(self)
        except BaseException:
            self.finish({}, failed=True)
            raise
        finally:
            torch.set_num_threads(before)
        metrics["study/seconds"] = time.time() - start
        self.finish(metrics)
        log.info("%s: results in %s (%.1f s)", self.study, self.dir, metrics["study/seconds"])
        return metrics
