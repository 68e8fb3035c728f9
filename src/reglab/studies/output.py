"""What a study writes besides MLflow: tables as CSV + Markdown and figures as PNG, and the study config a parent
run holds (for reports)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402


def parent_config(client, parent, out: Path) -> dict:
    """The study config a sweep's parent run holds as `config.yaml` ({} for a parent without one: a report then
    says less, nothing breaks)."""
    import yaml
    from mlflow.exceptions import MlflowException

    try:
        path = Path(client.download_artifacts(parent.info.run_id, "config.yaml", str(out)))
    except (MlflowException, OSError):
        return {}
    # Written now: the copy keeps the artifact's modification time, which is the one the previous report's file had
    # when it was uploaded, and runs.study.drop_unwritten removed it as a file this report did not write.
    path.touch()
    return yaml.safe_load(path.read_text()) or {}


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


def write_table(df: pd.DataFrame, stem: Path, floatfmt: str = ".4g") -> Path:
    """<stem>.csv and <stem>.md; returns the Markdown file."""
    df.to_csv(stem.with_suffix(".csv"), index=False)
    path = stem.with_suffix(".md")
    path.write_text(markdown_table(df, floatfmt))
    return path


def write_figure(fig, stem: Path) -> Path:
    path = stem.with_suffix(".png")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
