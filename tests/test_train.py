"""End to end through reglab.train.run: the model learns, seeds reproduce, and the run lands in MLflow."""

import copy
import signal
from pathlib import Path

import mlflow
import pytest
import torch

from conftest import compose, quick
from reglab import train as train_mod
from reglab.train import run


def test_mlp_learns_digits_and_parameters_move(tmp_root, monkeypatch):
    captured = {}
    real = train_mod.Classifier

    def spy(net, **kw):
        captured["before"] = copy.deepcopy(net.state_dict())
        captured["net"] = net
        return real(net, **kw)

    monkeypatch.setattr(train_mod, "Classifier", spy)
    metrics = run(compose(quick(tmp_root, "trainer.max_epochs=10", "callbacks.early_stopping=null")))
    assert metrics["val/acc"] >= 0.90
    assert metrics["test/acc"] >= 0.90
    assert metrics["train/loss"] < 0.5
    after = captured["net"].state_dict()
    for k, v in captured["before"].items():
        assert not torch.equal(v, after[k]), f"{k} did not move"


def test_an_in_process_fit_leaves_a_python_callers_ctrl_c_alone(tmp_root, monkeypatch):
    """Only the CLI turns Ctrl-C into checkpoint-and-stop for its jobs: in a fit called from Python it set
    reglab's flag, and every later run of the process was refused as "asked to stop"."""
    seen = []
    real = train_mod.Classifier.on_train_epoch_end

    def spy(self):
        seen.append(signal.getsignal(signal.SIGINT))
        real(self)

    monkeypatch.setattr(train_mod.Classifier, "on_train_epoch_end", spy)
    sigint = signal.getsignal(signal.SIGINT)
    run(compose(quick(tmp_root, "trainer.max_epochs=2", "callbacks.early_stopping=null")))
    assert len(seen) == 2 and all(handler is sigint for handler in seen)


def _val_losses(tmp_root, uri, name):
    run(compose(quick(tmp_root, "logger=mlflow", f"logger.tracking_uri={uri}", f"logger.experiment={name}",
                      "trainer.max_epochs=3", "callbacks.checkpoint=null")))
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    (r,) = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)
    return r, [m.value for m in sorted(client.get_metric_history(r.info.run_id, "val/loss"), key=lambda m: m.step)]


def test_same_seed_gives_identical_val_loss_sequence(tmp_root, mlflow_uri):
    _, a = _val_losses(tmp_root, mlflow_uri, "determinism-a")
    _, b = _val_losses(tmp_root, mlflow_uri, "determinism-b")
    assert len(a) == 3 and a == b


def test_run_lands_in_mlflow_with_metrics_params_and_config(tmp_root, mlflow_uri):
    cfg = compose(quick(tmp_root, "logger=mlflow", f"logger.tracking_uri={mlflow_uri}",
                        "logger.experiment=landing", "data.label_noise=0.2", "trainer.max_epochs=2"))
    run(cfg)
    client = mlflow.MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("landing")
    (r,) = client.search_runs([exp.experiment_id])
    assert r.info.status == "FINISHED" and r.info.run_name == "mlp-w512-s0"
    names = {f"{s}/{m}" for s in ("train", "val", "test") for m in ("loss", "acc", "err")}
    assert names | {"model/params", "data/label_noise_realized"} <= set(r.data.metrics)
    assert len(client.get_metric_history(r.info.run_id, "train/loss")) == 2  # one point per epoch
    assert r.data.metrics["model/params"] == 64 * 512 + 512 + 512 * 512 + 512 + 512 * 10 + 10
    assert abs(r.data.metrics["data/label_noise_realized"] - 0.2) < 0.05
    assert r.data.params["model.width"] == "512" and r.data.params["seed"] == "0"
    assert r.data.tags["fingerprint"] and "version.torch" in r.data.tags and "git_commit" in r.data.tags
    artifacts = {a.path for a in client.list_artifacts(r.info.run_id)}
    assert "config.yaml" in artifacts
    text = Path(client.download_artifacts(r.info.run_id, "config.yaml", str(tmp_root))).read_text()
    assert "label_noise: 0.2" in text
    assert any(a.startswith("best") for a in artifacts), artifacts  # the best checkpoint uploaded (logger.log_model)


def test_resnet18_learns_digits(tmp_root):
    from reglab.models import ResNet18

    metrics = run(compose(quick(tmp_root, "model=resnet18", "model.width=4", "trainer.max_epochs=10",
                                "data.train_size=512", "data.batch_size=64", "callbacks.early_stopping=null")))
    assert metrics["model/params"] == ResNet18((1, 8, 8), 10, width=4).num_params  # 8x8x1 input, no code change
    assert metrics["test/acc"] > 0.7  # observed 0.89; chance is 0.1


@pytest.mark.parametrize("override,key", [
    ("model.width=0", "model.width"),
    ("data.label_noise=1.0", "data.label_noise"),
    ("data.batch_size=0", "data.batch_size"),
])
def test_invalid_values_name_their_key(tmp_root, override, key):
    from reglab.errors import ConfigError

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        run(compose(quick(tmp_root, override)))


def test_runner_is_the_function_its_target_names(tmp_root):
    from reglab import cli
    from reglab.errors import ConfigError
    from reglab.studies import polynomial

    assert cli.runner(compose(quick(tmp_root))) is run  # conf/train.yaml: one Classifier fit
    assert cli.runner(compose(["+exp=polynomial"])) is polynomial.run  # a study preset names its own
    # double_descent has a report(), no run(): one line naming the key (the CLI rows are in test_bad_input.py)
    with pytest.raises(ConfigError, match=r"^runner\._target_='reglab\.studies\.double_descent\.run': [^\n]*$"):
        cli.runner(compose(quick(tmp_root, "runner._target_=reglab.studies.double_descent.run")))


class BuggyNet(torch.nn.Module):
    """A model whose constructor has a bug (not a wrong value in the config)."""

    def __init__(self, input_shape, num_classes, **arguments):
        super().__init__()
        raise RuntimeError("a bug in the model's code")


def test_a_wrong_argument_is_one_line_naming_the_key_and_a_bug_keeps_its_traceback():
    from reglab import cli
    from reglab.errors import ConfigError, ReglabError
    from reglab.train import build_model, build_regularizers

    with pytest.raises(ConfigError, match=r"^model: .*model\.width[^\n]*$"):  # the constructor's ValueError
        build_model(compose(["model.width=0"]), (1, 8, 8), 10)
    with pytest.raises(ConfigError, match=r"^model: .*unexpected keyword argument 'widht'[^\n]*$"):  # a TypeError
        build_model(compose(["+model.widht=4"]), (1, 8, 8), 10)
    # reglab's own error passes through as raised (the CLI's validate() names the full key before this runs)
    with pytest.raises(ConfigError, match=r"^keep_prob=1\.5 must be a probability"):
        build_regularizers(compose(["regularization=[dropout]", "regularization.dropout.keep_prob=1.5"]))

    cfg = compose([])
    cfg.model._target_ = f"{__name__}.BuggyNet"
    with pytest.raises(RuntimeError, match="a bug in the model's code") as bug:
        build_model(cfg, (1, 8, 8), 10)
    assert not isinstance(bug.value, ReglabError) and bug.traceback[-1].name == "__init__"  # raised where it was
    assert cli.one_line(bug.value, Path("conf")) is None  # so the CLI shows the traceback, not an `error:` line


def test_importing_reglab_train_changes_no_process_wide_setting():
    """Logging levels, warning filters and environment variables are the CLI's to set, per job
    (reglab.cli.quiet_libraries), never an import's. The libraries reglab imports at module level are imported first:
    what they do on import is theirs."""
    import ast
    import json
    import subprocess
    import sys

    src = Path(__file__).resolve().parents[1] / "src" / "reglab"
    imports = sorted({ast.unparse(node) for path in src.rglob("*.py") for node in ast.parse(path.read_text()).body
                      if isinstance(node, ast.Import) and not any(a.name.startswith("reglab") for a in node.names)
                      or isinstance(node, ast.ImportFrom) and node.level == 0
                      and not (node.module or "").startswith(("reglab", "__future__"))})
    code = "\n".join([
        "import json, logging, os, warnings",
        "import reglab  # its no-network variables (tests/test_security.py), set before any library loads",
        *imports,
        "def state():",
        "    loggers = logging.root.manager.loggerDict.items()",
        "    levels = {n: l.level for n, l in loggers if isinstance(l, logging.Logger)}",
        "    return {'levels': {**levels, 'root': logging.root.level}, 'filters': [repr(f) for f in warnings.filters],",
        "            'environ': dict(os.environ)}",
        "before = state()",
        "import reglab.cli, reglab.train, reglab.runs.logger, reglab.runs.study",
        "after = state()",
        "print(json.dumps({k: [before[k], after[k]] for k in before if before[k] != after[k]}))",
    ])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    changed = json.loads(out.stdout.strip().splitlines()[-1])
    if "levels" in changed:  # loggers created by the import start at NOTSET; only a changed level counts
        before, after = changed.pop("levels")
        assert {k: v for k, v in after.items() if before.get(k, 0) != v} == {}
    assert changed == {}


def test_train_eval_is_logged_at_the_last_epoch_and_heavy_dropout_makes_train_err_higher(tmp_root, mlflow_uri):
    """train_eval/{err,loss}: the final weights in evaluation mode on the whole training split. With dropout keeping
    25% of the units, training-mode train/err (masks on, weights still moving) is far above it."""
    metrics = run(compose(quick(tmp_root, "logger=mlflow", f"logger.tracking_uri={mlflow_uri}",
                                "logger.experiment=train-eval", "model.width=128", "regularization=[dropout]",
                                "regularization.dropout.keep_prob=0.25", "trainer.max_epochs=3",
                                "callbacks.checkpoint=null", "callbacks.early_stopping=null")))
    client = mlflow.MlflowClient(mlflow_uri)
    (r,) = client.search_runs([client.get_experiment_by_name("train-eval").experiment_id])
    for key in ("train_eval/err", "train_eval/loss"):
        (point,) = client.get_metric_history(r.info.run_id, key)
        assert point.step == 2 and point.value == pytest.approx(metrics[key])  # step = the last epoch's index
    assert metrics["train_eval/err"] < metrics["train/err"] - 0.05, metrics
    assert metrics["train_eval/loss"] < metrics["train/loss"]


def test_train_eval_scores_the_labels_trained_on_in_eval_mode():
    """evaluate_training_set reads dm.train_y (noisy labels where label noise is on), not the clean ones, with
    dropout off: a second call gives the same numbers."""
    import torch.nn.functional as F

    from reglab.train import build_data, build_module, evaluate_training_set

    cfg = compose(["data.label_noise=0.4", "data.train_size=300", "model.width=16", "regularization=[dropout]"])
    dm = build_data(cfg)
    dm.setup()
    torch.manual_seed(0)  # the weights (left to the tests before, one init scored alike on both label sets)
    net = build_module(cfg, dm).net.train()
    got = evaluate_training_set(net, dm)
    assert net.training  # left as it was
    assert torch.equal(evaluate_training_set(net, dm)["train_eval/loss"], got["train_eval/loss"])  # no dropout
    logits = net.eval()(dm.normalize(dm.train_x))
    for labels, same in ((dm.train_y, True), (dm.clean_train_y, False)):
        err = (logits.argmax(1) != labels).float().mean()
        assert (abs(got["train_eval/err"] - err) < 1e-6) == same
    torch.testing.assert_close(got["train_eval/loss"], F.cross_entropy(logits, dm.train_y), rtol=1e-5, atol=1e-6)


def test_grouping_a_sweep_into_populations_imports_neither_torch_nor_lightning():
    """The sweep's launching process plans the populations from configs alone; torch and Lightning (~5 s here) are
    each job's to import."""
    import subprocess
    import sys

    code = ("import sys, reglab.population.sweeper, hydra_plugins.reglab_population.population_sweeper\n"
            "print(sorted(m for m in ('torch', 'lightning', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_cli_process_freezes_its_heap_before_the_exit_handlers_run():
    """reglab.cli.exit_quickly: the interpreter's last collections over torch's, Lightning's and MLflow's objects
    are skipped (gc.freeze as the first exit handler); registered once however often it is called."""
    import subprocess
    import sys

    code = ("import atexit, gc\n"
            "atexit.register(lambda: print('frozen' if gc.get_freeze_count() else 'not frozen'))\n"
            "from reglab import cli\n"
            "cli.exit_quickly(); cli.exit_quickly()\n"
            "print(len(cli._EXIT_QUICKLY))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1", "frozen"]
