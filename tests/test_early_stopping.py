"""What follows early stopping (`stopping.after_stop`): best step and loss read from the run, `retrain` re-initializes
and trains on train+validation for exactly i* steps, `continue` resumes from theta*, and all land in MLflow."""

import math

import pytest
import torch
from conftest import compose, quick

from reglab.early_stopping import merge_validation
from reglab.errors import ConfigError

LEAN = ("model.width=32", "optim.lr=0.01", "trainer.max_epochs=6", "callbacks.early_stopping.patience=1")


def test_bad_strategy_fails_before_training(tmp_root):
    from reglab.train import run

    with pytest.raises(ConfigError, match=r"^stopping\.after_stop='restart' is not one of none, retrain, continue$"):
        run(compose(quick(tmp_root, "stopping.after_stop=restart")))


def test_retrain_needs_the_best_checkpoint_and_says_so_at_start(tmp_root):
    from reglab.train import run

    with pytest.raises(ConfigError, match="callbacks.checkpoint"):
        run(compose(quick(tmp_root, *LEAN, "stopping.after_stop=retrain", "callbacks.checkpoint=null")))


def test_merge_validation_moves_clean_validation_labels_into_training():
    from reglab.data import DigitsDataModule

    dm = DigitsDataModule(seed=0, label_noise=0.3)
    dm.setup()
    n_train, n_val = len(dm.train_y), len(dm.val_y)
    val_y = dm.val_y.clone()
    merge_validation(dm)
    assert len(dm.train_y) == n_train + n_val and len(dm.val_y) == 0
    assert torch.equal(dm.train_y[n_train:], val_y) and torch.equal(dm.clean_train_y[n_train:], val_y)


def test_retrain_trains_best_step_count_on_train_plus_val_and_logs_it(tmp_root, mlflow_uri):
    import mlflow

    from reglab.train import run

    m = run(compose(quick(tmp_root, *LEAN, "stopping.after_stop=retrain", "logger=mlflow",
                          f"logger.tracking_uri={mlflow_uri}", "logger.experiment=es")))
    client = mlflow.MlflowClient(mlflow_uri)
    run_id = client.search_runs([client.get_experiment_by_name("es").experiment_id])[0].info.run_id
    val = client.get_metric_history(run_id, "val/loss")
    best = min(val, key=lambda h: h.value)
    batches = math.ceil(1294 / 128)  # digits: 1437 train+val images, 10% validation -> 1294 training, 10 batches
    # i* = the optimizer steps taken by the end of the best epoch; best_val_loss = the minimum of the history.
    assert m["early_stopping/best_epoch"] == best.step
    assert m["early_stopping/best_step"] == (best.step + 1) * batches
    assert m["early_stopping/best_val_loss"] == pytest.approx(best.value, rel=1e-5)
    assert m["early_stopping/steps"] == m["early_stopping/best_step"]  # retrained for exactly i* steps
    assert m["early_stopping/test/acc"] > 0.5
    logged = client.get_run(run_id).data.metrics
    for k in ("early_stopping/best_step", "early_stopping/best_val_loss", "early_stopping/test/acc"):
        assert logged[k] == pytest.approx(m[k])


def test_retrain_starts_from_the_same_initialization(tmp_root, monkeypatch):
    from reglab import early_stopping
    from reglab.train import run

    inits = []
    orig_fit = early_stopping.L.Trainer.fit

    def fit(self, model, *a, **k):
        inits.append([p.detach().clone() for p in model.parameters()])
        return orig_fit(self, model, *a, **k)

    monkeypatch.setattr(early_stopping.L.Trainer, "fit", fit)
    run(compose(quick(tmp_root, *LEAN, "trainer.max_epochs=2", "stopping.after_stop=retrain")))
    # Two fits: the first run and the retrain; both start from theta_0 of the same seed.
    assert len(inits) == 2
    assert all(torch.equal(a, b) for a, b in zip(*inits))


def test_continue_resumes_from_theta_star(tmp_root):
    from reglab.train import run

    m = run(compose(quick(tmp_root, *LEAN, "stopping.after_stop=continue")))
    batches = math.ceil((1294 + 144) / 128)  # train + validation
    assert 0 < m["early_stopping/steps"] <= (m["early_stopping/best_epoch"] + 1) * batches
    assert m["early_stopping/continue_target_loss"] > 0
    # Resuming from theta* (already better than chance) and training on more data does not undo it.
    assert m["early_stopping/test/acc"] > m["test/acc"] - 0.05
    none = run(compose(quick(tmp_root, *LEAN, "stopping.after_stop=none")))
    assert "early_stopping/test/acc" not in none and none["early_stopping/best_step"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_catalogue_on_gpu(tmp_root):
    # GPU-resident data: the Albumentations path copies each batch to the CPU and back; masks are drawn on the
    # device; after_stop evaluates and merges tensors on the device; bf16 autocast (conf/trainer/gpu.yaml).
    from reglab.train import run

    m = run(compose(quick(tmp_root, "trainer=gpu", *LEAN, "regularization=[awd_lstm_style,max_norm]",
                          "augmentation=digits_safe", "stopping.after_stop=continue")))
    assert m["val/acc"] > 0.4 and math.isfinite(m["early_stopping/test/loss"])
    m = run(compose(quick(tmp_root, "trainer=gpu", "model=resnet18", "model.width=4", "trainer.max_epochs=3",
                          "regularization=[spatial_dropout,dropout_classic,l1_proximal]",
                          "stopping.after_stop=retrain")))
    assert m["early_stopping/steps"] == m["early_stopping/best_step"] and math.isfinite(m["params/l1"])
