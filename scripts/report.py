"""Write a study's report from MLflow:  python scripts/report.py study=NAME [paths.root=DIR] [logger.tracking_uri=URI]

Reads the parent run tagged study=NAME in the experiment the study logs to (the preset conf/exp/NAME.yaml names it;
logger.experiment=... overrides) whose configuration is the preset's with the overrides given here (other than the
swept keys; the newest such parent, else the newest, with a warning), and writes figures and tables to
<paths.results>/NAME/ and to the parent run's artifacts. A sweep writes its report itself when it ends; this
reruns it, e.g. after an interrupted sweep.
"""

from __future__ import annotations

import sys
from pathlib import Path

import reglab  # noqa: F401  (no-network environment first)
from reglab.errors import ReglabError

CONF = Path(__file__).resolve().parents[1] / "conf"


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    study = next((o.split("=", 1)[1] for o in overrides if o.startswith("study=")), None)
    if not study:
        raise ReglabError("study=NAME is required, e.g. python scripts/report.py study=double_descent_mnist1d")
    preset = [f"+exp={study}"] if (CONF / "exp" / f"{study}.yaml").exists() else []
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=preset + overrides)


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip())
        return 0
    from reglab import cli
    from reglab.runs.study import write_report

    try:
        out = write_report(compose(argv))
    except Exception as e:  # a user's mistake (unknown option or key, unreachable server): one line, as train.py
        return cli.script_error(e, CONF)
    print(f"report: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
