"""Is this setup deterministic? Trains the same config N times (logger off) and compares every final metric bit for
bit. Prints one markdown row per metric, then the verdict; exit status 1 when any metric differs.

    python scripts/check_determinism.py                                   # defaults: digits MLP on the CPU
    python scripts/check_determinism.py --runs 3 trainer=gpu trainer.deterministic=false model=resnet18 data=synthetic
    python scripts/check_determinism.py +exp=double_descent_mnist1d model.width=48 trainer.max_epochs=20

A study preset (+exp=...) is checked on one configuration of its grid (its values, or those given), as a solo run.

The numbers in docs/reliability.md (Determinism) come from this script.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import reglab  # noqa: F401  (no-network environment first)

CONF = Path(__file__).resolve().parents[1] / "conf"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for scripts/train.py")
    args = parser.parse_args()
    if args.runs < 2:
        parser.error(f"--runs={args.runs}: comparing needs at least 2 runs")

    from hydra import compose, initialize_config_dir

    from reglab import cli
    from reglab.train import run

    results = []
    # A study's children and report live in MLflow; one configuration of it is a solo run (logger off).
    solo = ["study=null"] if any(o.lstrip("+").startswith("exp=") for o in args.overrides) else []
    with tempfile.TemporaryDirectory() as tmp, initialize_config_dir(str(CONF), version_base="1.3"):
        for i in range(args.runs):
            try:
                cfg = compose("train", [*args.overrides, *solo, "logger=none", f"paths.root={tmp}/{i}"])
                if cfg.runner._target_ != "reglab.train.run":
                    print(f"error: runner._target_={cfg.runner._target_}: this script compares classifier fits "
                          "(reglab.train.run); that study is deterministic by its own tests", file=sys.stderr)
                    return cli.EXIT_USER_ERROR
                results.append(run(cfg))
            except Exception as e:  # a user's mistake: one line, as train.py
                return cli.script_error(e, CONF)
    keys = sorted(k for k in results[0] if k.startswith(("train/", "val/", "test/")))
    print(f"config: {' '.join(args.overrides) or '(defaults)'}; {args.runs} runs\n")
    print("| metric | " + " | ".join(f"run {i}" for i in range(args.runs)) + " | identical |")
    print("|---" * (args.runs + 2) + "|")
    differ = []
    for k in keys:
        values = [r[k] for r in results]
        same = all(v == values[0] for v in values)
        differ += [] if same else [k]
        print(f"| {k} | " + " | ".join(repr(v) for v in values) + f" | {'yes' if same else 'NO'} |")
    print(f"\n{'bit-identical' if not differ else 'NOT identical: ' + ', '.join(differ)}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
