"""Same seed and config -> bit-identical metrics: always on the CPU; on a GPU with trainer.deterministic=true
(conf/trainer/gpu.yaml's default; docs/reliability.md says what holds there). Every random source of a run is in
play: weight init, batch order, the validation split, label noise, dropout masks and augmentation."""

from __future__ import annotations

import pytest
import torch

from conftest import compose, quick
from train_cli import TINY

RANDOM_EVERYWHERE = [*TINY, "regularization=[dropout]", "data.label_noise=0.2", "augmentation=digits_safe",
                     "trainer.max_epochs=3", "callbacks.early_stopping=null"]


def run_metrics(root, *overrides: str) -> dict[str, float]:
    from reglab import train

    return train.run(compose(quick(root, *RANDOM_EVERYWHERE, *overrides)))


def test_same_seed_gives_bit_identical_metrics_on_cpu(tmp_path):
    first = run_metrics(tmp_path / "a")
    again = run_metrics(tmp_path / "b")
    assert first == again  # exact float equality, every metric
    other_seed = run_metrics(tmp_path / "c", "seed=1")
    assert other_seed["val/loss"] != first["val/loss"] and other_seed["train/loss"] != first["train/loss"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_same_seed_gives_bit_identical_metrics_on_gpu(tmp_path):
    # cuDNN autotuning (benchmark) may pick a different algorithm per run even among deterministic ones: off.
    gpu = ["trainer=gpu", "trainer.deterministic=true", "trainer.benchmark=false"]
    first = run_metrics(tmp_path / "a", *gpu)
    again = run_metrics(tmp_path / "b", *gpu)
    assert first == again


def test_a_resumed_fit_draws_what_the_uninterrupted_fit_drew(tmp_path):
    """Lightning's checkpoints hold no random-generator state: a fit resumed at epoch 2 replayed the dropout masks
    of epochs 0 and 1 (and the augmentation draws). Each epoch's draws now come from (seed, epoch, rank), so the
    resumed fit ends with the uninterrupted fit's weights, bit for bit."""
    import lightning as L

    from reglab.train import build_data, build_module

    cfg = compose(quick(tmp_path, *RANDOM_EVERYWHERE))

    def fit(epochs: int, ckpt: str | None = None):
        L.seed_everything(cfg.seed, verbose=False)
        dm = build_data(cfg)
        dm.setup()
        module = build_module(cfg, dm)
        trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                            deterministic=True)
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt, weights_only=True)
        return trainer, module.net.state_dict()

    _, whole = fit(4)
    first, _ = fit(2)
    first.save_checkpoint(tmp_path / "epoch2.ckpt", weights_only=False)
    _, resumed = fit(4, str(tmp_path / "epoch2.ckpt"))
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


@pytest.mark.parametrize(("args", "words"), [(["model=mlpx"], "error: model=mlpx: there is no conf/model/mlpx.yaml"),
                                             (["--runs", "1"], "--runs=1: comparing needs at least 2 runs"),
                                             (["+exp=polynomial"], "runner._target_=reglab.studies.polynomial.run")])
def test_check_determinism_script_refuses_bad_input_in_one_line(tmp_path, args, words):
    from pathlib import Path

    from train_cli import train_cli

    script = Path(__file__).resolve().parents[1] / "scripts" / "check_determinism.py"
    out = train_cli(*args, script=script, cwd=tmp_path)
    assert out.returncode == 2 and words in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]



def test_check_determinism_script_checks_one_configuration_of_a_study_preset(tmp_path):
    """A study's children live in MLflow: the script ran the preset with logger=none and stopped at 'this needs
    logger=mlflow'; it now checks the preset's configuration as a solo run."""
    from pathlib import Path

    from train_cli import train_cli

    script = Path(__file__).resolve().parents[1] / "scripts" / "check_determinism.py"
    out = train_cli("+exp=double_descent_mnist1d", "model.width=4", "trainer.max_epochs=2", "data.train_samples=200",
                    script=script, cwd=tmp_path, timeout=300)
    assert out.returncode == 0 and out.stdout.rstrip().endswith("bit-identical"), out.stderr[-2000:]
