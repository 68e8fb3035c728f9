"""Every row of docs/reliability.md's bad-input table, through the real CLI: one line `error: ...` on stderr naming
the key or file, exit status 2, and the results folder (a real MLflow store holding a run, and a checkpoint)
byte-for-byte untouched. Rows that fail in Hydra or validate() take ~0.5 s and never import Lightning; the rows run
as parallel processes, one per core."""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import with_store
from train_cli import train_cli

# (row id, arguments, words the error line must contain). {mnist_ok}, {mnist_truncated}, {mnist_garbled} and
# {empty} are folders made by the `datasets` fixture.
ROWS = [
    ("unknown-group-option", ["model=mlpx"], ["model=mlpx", "conf/model/mlpx.yaml", "mlp, resnet18"]),
    ("unknown-regularizer", ["regularization=[l3]"], ["conf/regularization/l3.yaml", "l2"]),
    ("misspelled-key", ["model.widht=64"], ["model.widht", "misspelled", "--cfg job"]),
    ("misspelled-group", ["modle.width=64"], ["modle.width", "no key 'modle'"]),
    # A group the defaults leave out is added with +: "misspelled?" sent the user looking for a typo.
    ("group-not-in-defaults", ["stopping=continue"], ["stopping: a config group the defaults do not include",
                                                      "+stopping=NAME", "best, continue, final, retrain"]),
    ("exp-does-not-exist", ["+exp=no_such_study"], ["exp=no_such_study", "conf/exp/no_such_study.yaml"]),
    ("unparsable-override", ["model.width=[1,"], ["model.width=[1,", "override_grammar"]),
    ("wrong-type-int", ["model.width=wide"], ["model.width='wide'", "an integer >= 1"]),
    ("wrong-type-float", ["optim.lr=fast"], ["optim.lr='fast'", "a number > 0"]),
    ("width-below-1", ["model.width=0"], ["model.width=0", "an integer >= 1"]),
    # null is not "not set": it reached the optimizer (weight decay), the MLP (width) or seeding as a traceback.
    ("explicit-null", ["optim.weight_decay=null"], ["optim.weight_decay=None", "a number >= 0"]),
    ("seed-out-of-range", ["seed=-1"], ["seed=-1", "[0, 2**32)"]),
    ("betas-outside", ["optim=adam", "optim.betas=[0.9,1.0]"], ["optim.betas=[0.9, 1.0]", "[0, 1)"]),
    ("nesterov-without-momentum", ["optim=sgd", "optim.nesterov=true", "optim.momentum=0"],
     ["optim.nesterov=true", "optim.momentum > 0"]),
    # Checked when the model is built (reglab.train.build_module), after Lightning loads.
    ("batch-norm-batch-of-one", ["data=digits", "model.norm=batch", "data.train_size=129", "data.val_fraction=0.0",
                                 "callbacks.early_stopping=null", "data.batch_size=128"], ["data.batch_size=128", "one example", "has 129"]),
    # The retrain after early stopping trains on train + validation: 1000 + 144 = 9 x 127 + 1 (a traceback after the
    # first run was logged and tested).
    ("batch-norm-retrain-batch-of-one", ["data=digits", "model.norm=batch", "data.train_size=1000",
                                         "stopping.after_stop=retrain", "data.batch_size=127"], ["data.batch_size=127", "one example", "1144"]),
    ("early-stopping-without-validation", ["data=digits", "data.val_fraction=0.0"],
     ["callbacks.early_stopping monitors val/loss", "data.val_fraction=0.0", "callbacks.early_stopping=null"]),
    ("keep-prob-above-1", ["regularization=[dropout]", "regularization.dropout.keep_prob=1.5"],
     ["regularization.dropout.keep_prob=1.5", "(0, 1]"]),
    ("keep-prob-zero", ["regularization=[dropout]", "regularization.dropout.keep_prob=0"],
     ["regularization.dropout.keep_prob=0", "(0, 1]"]),
    ("label-noise-1", ["data.label_noise=1.0"], ["data.label_noise=1.0", "[0, 1)"]),
    ("negative-patience", ["callbacks.early_stopping.patience=-3"],
     ["callbacks.early_stopping.patience=-3", "an integer >= 0"]),
    ("negative-strength", ["regularization=[l2]", "regularization.l2.strength=-1e-4"],
     ["regularization.l2.strength=-0.0001", ">= 0"]),
    ("negative-elastic-net", ["regularization=[elastic_net]", "regularization.elastic_net.l1_strength=-1"],
     ["regularization.elastic_net.l1_strength=-1", ">= 0"]),
    # w * (1 - 1e-8) == w in float32: efficientnet_style's weight decay did nothing this way until 2026-12-04.
    ("weight-decay-rounds-to-nothing", ["regularization=[weight_decay]", "regularization.weight_decay.strength=1e-5",
                                        "optim.lr=0.001"],
     ["regularization.weight_decay.strength=1e-05", "optim.lr=0.001", "exactly 1 in float32", "above 3e-05"]),
    ("adamw-decay-rounds-to-nothing", ["optim=adamw", "optim.weight_decay=1e-5"],
     ["optim.weight_decay=1e-05", "exactly 1 in float32", "optim=adam"]),
    # Checked by the regularizer class itself (reglab.regularization), after Lightning loads.
    ("regularizer-not-for-model", ["regularization=[spatial_dropout]"],
     ["regularization.spatial_dropout", "model=resnet18"]),
    ("unknown-augmentation", ["augmentation.transforms=[{name: HorizontalFlipp}]"],
     ["augmentation.transforms[0].name='HorizontalFlipp'", "HorizontalFlip"]),
    ("unknown-augmentation-argument", ["augmentation.transforms=[{name: Affine, rotation: 10}]"],
     ["augmentation.transforms[0]", "'rotation'", "rotate"]),
    ("target-not-allowed", ["model._target_=os.system", "+model.command=touch pwned"],
     ["model._target_='os.system'", "ALLOWED_TARGETS"]),
    ("runner-not-allowed", ["runner._target_=os.system", "+runner.command=touch pwned"],
     ["runner._target_='os.system'", "ALLOWED_TARGETS"]),
    # A report module, not a runner: no run() to call (reglab.cli.runner, before Lightning loads).
    ("runner-does-not-exist", ["runner._target_=reglab.studies.double_descent.run"],
     ["runner._target_='reglab.studies.double_descent.run'"]),
    ("missing-dataset", ["data=mnist", "data.root={empty}", "data.download=false"],
     ["mnist", "{empty}", "data.download=true"]),
    ("truncated-dataset-file", ["data=mnist", "data.root={mnist_truncated}", "data.download=false"],
     ["mnist", "{mnist_truncated}", "corrupted"]),
    ("garbled-dataset-file", ["data=mnist", "data.root={mnist_garbled}", "data.download=false"],
     ["mnist", "{mnist_garbled}", "corrupted"]),
]
if not torch.cuda.is_available():  # CI's machines: a GPU trainer where there is none
    ROWS.append(("gpu-trainer-without-a-gpu", ["trainer=gpu"], ["trainer.accelerator=gpu", "no CUDA GPU",
                                                                "trainer=cpu"]))


# Rows whose error comes after Lightning is imported (the regularizer class, the data module, the augmentation
# builder): every other row must fail before, in a fraction of a second.
LOADS_LIGHTNING = {"regularizer-not-for-model", "unknown-augmentation", "unknown-augmentation-argument",
                   "missing-dataset", "truncated-dataset-file", "garbled-dataset-file", "batch-norm-batch-of-one",
                   "batch-norm-retrain-batch-of-one", "early-stopping-without-validation", "gpu-trainer-without-a-gpu"}
# Put on the CLI's PYTHONPATH: at exit, the process writes the names of the modules it imported.
MODULES_AT_EXIT = """
import atexit, os, sys
atexit.register(lambda: open(os.environ["MODULES_AT_EXIT"], "w").write("\\n".join(sorted(sys.modules))))
"""


def _idx(path: Path, arr: np.ndarray, magic: int) -> None:
    """torchvision's MNIST on-disk format (LeCun's idx): magic, dims as big-endian int32, then the bytes."""
    with open(path, "wb") as f:
        f.write(magic.to_bytes(4, "big"))
        for d in arr.shape:
            f.write(int(d).to_bytes(4, "big"))
        f.write(arr.tobytes())


def _fake_mnist(root: Path) -> Path:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("t10k", 10)):
        _idx(raw / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), 2051)
        _idx(raw / f"{split}-labels-idx1-ubyte", rng.integers(0, 10, n, dtype=np.uint8), 2049)
    return raw


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, str]:
    base = tmp_path_factory.mktemp("datasets")
    truncated = _fake_mnist(base / "truncated") / "train-images-idx3-ubyte"
    truncated.write_bytes(truncated.read_bytes()[:1000])  # a download cut short
    garbled = _fake_mnist(base / "garbled") / "train-labels-idx1-ubyte"
    garbled.write_bytes(b"<html>proxy error</html>")  # a captive portal's page saved as the file
    (base / "empty").mkdir()
    return {"mnist_truncated": str(base / "truncated"), "mnist_garbled": str(base / "garbled"),
            "empty": str(base / "empty")}


@pytest.fixture(scope="module")
def results(tmp_path_factory, empty_store) -> Path:
    """A results folder in use: an MLflow store with one finished run, and a checkpoint."""
    from mlflow.tracking import MlflowClient

    root = with_store(tmp_path_factory.mktemp("results"), empty_store)
    client = MlflowClient(f"sqlite:///{root}/mlruns/mlflow.db")
    run = client.create_run(client.create_experiment("reglab"), run_name="earlier")
    client.log_metric(run.info.run_id, "val/loss", 0.5, step=0)
    client.set_terminated(run.info.run_id)
    ckpt = root / "outputs" / "checkpoints" / "earlier" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"checkpoint bytes")
    return root


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def outcomes(datasets, results, tmp_path_factory) -> dict[str, dict]:
    """Every row through the CLI, as many at once as there are cores; the results folder is hashed before the first
    and after the last. -> {row id: its expected words, process, imported modules and working folder}."""
    hook = tmp_path_factory.mktemp("hook")
    (hook / "sitecustomize.py").write_text(MODULES_AT_EXIT)

    def fill(text: str) -> str:
        for name, folder in datasets.items():
            text = text.replace(f"{{{name}}}", folder)
        return text

    def run(row) -> dict:
        row_id, args, expected = row
        cwd = tmp_path_factory.mktemp(row_id)
        # A row that must fail before Lightning loads runs in a new interpreter that lists what it imported; the
        # others in a fork of one that has Lightning already (tests/train_cli.py).
        hooked = {} if row_id in LOADS_LIGHTNING else {"PYTHONPATH": str(hook),
                                                        "MODULES_AT_EXIT": str(cwd / "modules.txt")}
        r = train_cli(*map(fill, args), f"paths.root={results}", cwd=cwd, **hooked)
        modules = set((cwd / "modules.txt").read_text().split()) if (cwd / "modules.txt").exists() else set()
        return {"expected": [fill(e) for e in expected], "process": r, "modules": modules, "cwd": cwd}

    before = snapshot(results)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        done = dict(zip([row[0] for row in ROWS], pool.map(run, ROWS)))
    return {"before": before, "after": snapshot(results), **done}


@pytest.mark.parametrize("row", [row[0] for row in ROWS])
def test_bad_input_is_one_line_and_writes_nothing(row, outcomes):
    r, expected = outcomes[row]["process"], outcomes[row]["expected"]
    assert r.returncode == 2, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
    for word in expected:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    assert "Traceback" not in r.stdout + r.stderr
    if row not in LOADS_LIGHTNING:  # fails fast where it can
        assert "hydra" in outcomes[row]["modules"] and "lightning" not in outcomes[row]["modules"]
    assert outcomes["after"] == outcomes["before"]  # no row wrote to the results folder
    assert not (outcomes[row]["cwd"] / "pwned").exists()


def test_resuming_from_another_models_checkpoint_is_one_line_and_touches_no_run(tmp_path, empty_store):
    """A study child was killed mid-run (MLflow: RUNNING) and its last.ckpt now holds another model's weights (a
    changed model definition, a copied file). Rerunning the study refuses to resume it, naming the file."""
    import torch
    from mlflow.tracking import MlflowClient

    study = ["+exp=double_descent_mnist1d", "hydra/launcher=basic", "++population.mode=off", "seed=0",
             "data.train_samples=500", "data.test_samples=200", "model.width=8", "trainer.max_epochs=1",
             f"paths.root={tmp_path}", f"hydra.sweep.dir={tmp_path}/sweep"]  # one job: the child's own last.ckpt
    first = train_cli(*study, cwd=with_store(tmp_path, empty_store))
    assert first.returncode == 0, first.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name("double_descent").experiment_id
    (child,) = client.search_runs([exp], "tags.`reglab.role` = 'child'")
    client.update_run(child.info.run_id, status="RUNNING")  # what kill -9 leaves behind
    (last,) = (tmp_path / "outputs" / "checkpoints").glob("*/last.ckpt")
    ckpt = torch.load(last, weights_only=True)
    key = next(k for k, v in ckpt["state_dict"].items() if v.dim() == 2)
    ckpt["state_dict"][key] = torch.zeros(16, ckpt["state_dict"][key].shape[1])  # a wider model's layer
    ckpt["epoch"] = 0  # as if written after the first epoch, before the kill: the rerun resumes from it
    torch.save(ckpt, last)
    before = client.get_run(child.info.run_id)

    r = train_cli(*study, cwd=tmp_path)

    assert r.returncode == 2 and "Traceback" not in r.stderr
    (job_error,) = [line for line in r.stderr.splitlines() if line.startswith("error: job")]
    assert f"{last} was saved by another model ({key} has shape (16," in job_error and "delete" in job_error
    after = client.get_run(child.info.run_id)
    assert after.info.status == "RUNNING" and after.data.metrics == before.data.metrics
    assert [c.info.run_id for c in client.search_runs([exp], "tags.`reglab.role` = 'child'")] == [child.info.run_id]
