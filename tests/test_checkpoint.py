"""reglab.checkpoint.Checkpoint: last.ckpt is the latest epoch (Lightning >= 2.6 leaves it at the best one), an
improving epoch is written once (last.ckpt a hard link to best-<epoch>.ckpt), `last_every_s` spaces the writes of
non-improving epochs, and `callbacks.checkpoint=null` writes nothing at all."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import compose, quick

from reglab import checkpoint as ckpt_module
from reglab.train import run

# An MLP on digits at a learning rate that overfits fast: val/loss improves for a few epochs, then rises.
BASE = ("data=digits", "model=mlp", "model.width=64", "optim=adam", "optim.lr=0.05", "callbacks.early_stopping=null",
        "trainer.max_epochs=8")


def _files(cfg) -> dict[str, Path]:
    (folder,) = Path(cfg.paths.checkpoints).iterdir()
    return {p.name: p for p in folder.glob("*.ckpt")}


def _record_epochs(monkeypatch) -> list[dict]:
    """After each epoch's checkpoint hook: {name: (epoch in file, inode)} of the folder."""
    seen: list[dict] = []
    original = ckpt_module.Checkpoint._after_epoch

    def spy(self, trainer, on_train_epoch_end):
        original(self, trainer, on_train_epoch_end)
        if self._should_save_on_train_epoch_end(trainer) == on_train_epoch_end and self.dirpath \
                and Path(self.dirpath).exists():
            seen.append({"epoch": trainer.current_epoch, "best": trainer.checkpoint_callback.best_model_path,
                         "files": {p.name: (torch.load(p, weights_only=True)["epoch"], os.stat(p).st_ino)
                                   for p in Path(self.dirpath).glob("*.ckpt")}})
    monkeypatch.setattr(ckpt_module.Checkpoint, "_after_epoch", spy)
    return seen


def test_last_is_every_epoch_and_an_improving_epoch_is_written_once(tmp_root, monkeypatch):
    seen = _record_epochs(monkeypatch)
    cfg = compose(quick(tmp_root, *BASE, "callbacks.checkpoint.last_every_s=null"))
    run(cfg)
    improved = [s for s in seen if Path(s["best"]).name == f"best-{s['epoch']}.ckpt"]
    stale = [s for s in seen if s not in improved]
    assert improved and stale, "the run should both improve and overfit; pick another learning rate"
    for s in seen:
        assert s["files"]["last.ckpt"][0] == s["epoch"]  # the latest epoch, improving or not
    for s in improved:  # one file under two names
        assert s["files"]["last.ckpt"][1] == s["files"][f"best-{s['epoch']}.ckpt"][1]
    for s in stale:
        assert s["files"]["last.ckpt"][1] != s["files"][Path(s["best"]).name][1]


def test_last_every_s_spaces_writes_and_the_end_of_training_writes_the_final_weights(tmp_root, monkeypatch):
    seen = _record_epochs(monkeypatch)
    cfg = compose(quick(tmp_root, *BASE, "callbacks.checkpoint.last_every_s=3600"))
    run(cfg)
    for s in seen:  # during training, last.ckpt moves only with an improving epoch (a free link)
        best_epoch = int(Path(s["best"]).stem.split("-")[1])
        assert s["files"]["last.ckpt"][0] == best_epoch
    files = _files(cfg)
    last = torch.load(files["last.ckpt"], weights_only=True)
    assert last["epoch"] == cfg.trainer.max_epochs and last["global_step"] > 0  # written at the end of fit
    best = torch.load(next(p for n, p in files.items() if n.startswith("best")), weights_only=True)
    assert any(not torch.equal(last["state_dict"][k], best["state_dict"][k]) for k in best["state_dict"])


def test_resuming_from_last_continues_the_latest_epoch(tmp_root):
    """A run of 4 epochs resumed to 8 ends with the same weights as 8 epochs in one go (CPU, deterministic)."""
    full = compose(quick(tmp_root / "full", *BASE, "callbacks.checkpoint.last_every_s=null"))
    run(full)
    first = compose(quick(tmp_root / "part", *BASE, "callbacks.checkpoint.last_every_s=null", "trainer.max_epochs=4"))
    run(first)
    last = _files(first)["last.ckpt"]
    assert torch.load(last, weights_only=True)["epoch"] == 3  # saved at the end of epoch index 3

    import lightning as L
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from reglab.classifier import Classifier
    from reglab.train import build_data, build_model

    resumed_cfg = compose(quick(tmp_root / "part", *BASE))
    L.seed_everything(resumed_cfg.seed, workers=True, verbose=False)
    dm = build_data(resumed_cfg)
    dm.setup()
    module = Classifier(build_model(resumed_cfg, dm.input_shape, dm.num_classes),
                        optim=OmegaConf.to_container(resumed_cfg.optim, resolve=True))
    trainer = instantiate(resumed_cfg.trainer, logger=False, callbacks=[],
                          enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(module, datamodule=dm, ckpt_path=str(last), weights_only=True)
    reference = torch.load(_files(full)["last.ckpt"], weights_only=True)["state_dict"]
    for k, v in module.state_dict().items():
        assert torch.allclose(v, reference[k], atol=1e-6), k


def test_a_fit_removes_the_temporary_files_of_writes_a_kill_cut_short(tmp_path):
    """A kill during a checkpoint write leaves `<name>.<pid>.tmp` (a wide ResNet's: hundreds of MB) that nothing
    removed; the next fit in the folder (a resume) removes those of processes no longer alive, not a live one's."""
    import lightning as L

    from reglab.train import build_data, build_module

    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    stale = [tmp_path / f"last.ckpt.{pid_max + 1}.tmp", tmp_path / f"best-2.ckpt.{pid_max + 2}.link"]
    live = tmp_path / f"best-3.ckpt.{os.getpid()}.tmp"  # a process that is still writing it
    for f in (*stale, live):
        f.write_bytes(b"partial")
    cfg = compose(quick(tmp_path / "root", *BASE, "trainer.max_epochs=1"))
    dm = build_data(cfg)
    dm.setup()
    trainer = L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[ckpt_module.Checkpoint(dirpath=tmp_path, monitor=None, save_last=True)])
    trainer.fit(build_module(cfg, dm), datamodule=dm)
    assert not any(f.exists() for f in stale) and live.exists() and (tmp_path / "last.ckpt").exists()


def test_no_checkpoint_callback_writes_no_checkpoint(tmp_root):
    cfg = compose(quick(tmp_root, *BASE, "callbacks.checkpoint=null", "trainer.max_epochs=2"))
    run(cfg)
    written = list(Path(tmp_root).rglob("*.ckpt"))
    assert written == []  # Lightning would otherwise add its own ModelCheckpoint, writing every epoch


@pytest.mark.parametrize("stage", ["fit", "test"])
def test_a_sigterm_while_lightning_holds_the_signal_is_still_reglabs_stop(tmp_root, monkeypatch, stage):
    """Lightning takes SIGTERM over at the start of every fit and test, before reglab's Checkpoint takes it back; a
    SIGTERM in between reaches both handlers. The fit must still stop as reglab stops it (Preempted after the epoch,
    its last.ckpt written) and the test pass finish, never end in Lightning's SIGTERMException (seen in CI)."""
    import signal

    from lightning.pytorch.trainer.connectors.signal_connector import _SignalConnector

    from reglab import preemption

    register = _SignalConnector.register_signal_handlers

    def register_then_sigterm(self):
        register(self)
        if self.trainer.state.fn == stage:  # TrainerFn: "fit", "test"
            os.kill(os.getpid(), signal.SIGTERM)  # handled before this returns: Python runs handlers between bytecodes

    monkeypatch.setattr(_SignalConnector, "register_signal_handlers", register_then_sigterm)
    before = signal.getsignal(signal.SIGTERM)
    preemption.reset()
    preemption.install()  # as reglab.cli does for every job
    # Test batches of 64: Lightning's evaluation loop raises at a batch that is not the last.
    cfg = compose(quick(tmp_root, *BASE, "trainer.max_epochs=3", "+data.eval_batch_size=64"))
    try:
        if stage == "fit":
            with pytest.raises(preemption.Preempted, match="after epoch 0"):
                run(cfg)
            assert torch.load(_files(cfg)["last.ckpt"], weights_only=True)["epoch"] == 0
        else:
            assert run(cfg)["test/acc"] > 0.5  # trained 3 epochs and tested: the SIGTERM came in the test pass
            assert preemption.requested()
    finally:
        signal.signal(signal.SIGTERM, before)
        preemption.reset()
