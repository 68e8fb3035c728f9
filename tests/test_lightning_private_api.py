"""reglab/checkpoint.py builds on private members of Lightning's ModelCheckpoint (there is no public hook for "write
last.ckpt as a hard link" or "at most every N seconds"). pyproject pins Lightning to the minor series they were
verified against; this test fails, naming the member, the day a Lightning release renames or reshapes one, before a
study silently resumes from the wrong epoch."""

from __future__ import annotations

import inspect

import pytest
from lightning.pytorch.callbacks import ModelCheckpoint

# member -> parameters after self, as reglab calls or overrides it
METHODS = {
    "_save_topk_checkpoint": ["trainer", "monitor_candidates"],
    "_save_last_checkpoint": ["trainer", "monitor_candidates"],
    "_monitor_candidates": ["trainer"],
    "_should_skip_saving_checkpoint": ["trainer"],
    "_should_save_on_train_epoch_end": ["trainer"],
    "_should_remove_checkpoint": ["trainer", "previous", "current"],
    "_remove_checkpoint": ["trainer", "filepath"],
    "format_checkpoint_name": ["metrics", "filename", "ver", "prefix"],
    "on_validation_end": ["trainer", "pl_module"],
    "on_train_epoch_end": ["trainer", "pl_module"],
    "on_train_end": ["trainer", "pl_module"],
}
ATTRIBUTES = ("_every_n_epochs", "_last_global_step_saved", "_last_checkpoint_saved", "_defer_save_until_validation",
              "last_model_path", "save_last", "CHECKPOINT_NAME_LAST")


@pytest.mark.parametrize("name", sorted(METHODS))
def test_the_private_methods_reglab_uses_keep_their_signature(name):
    method = getattr(ModelCheckpoint, name, None)
    assert method is not None, f"ModelCheckpoint.{name} is gone: reglab/checkpoint.py must follow Lightning"
    params = [p for p in inspect.signature(method).parameters if p != "self"]
    assert params[:len(METHODS[name])] == METHODS[name], f"ModelCheckpoint.{name}{inspect.signature(method)} changed"


@pytest.mark.parametrize("name", ATTRIBUTES)
def test_the_private_attributes_reglab_reads_exist(name):
    assert hasattr(ModelCheckpoint(), name), f"ModelCheckpoint().{name} is gone: reglab/checkpoint.py must follow"


def test_reglab_checkpoint_overrides_only_what_exists():
    from reglab.checkpoint import Checkpoint

    own = {n for n, v in vars(Checkpoint).items() if callable(v) and not n.startswith("__")}
    # reglab's own helpers, not overrides:
    ours = {"_after_epoch", "_due", "_link_last", "_should_skip_saving_checkpoint_at_end", "_history_first",
            "_resume_point", "_take_back_sigterm"}
    assert own - ours <= set(dir(ModelCheckpoint)), own - ours - set(dir(ModelCheckpoint))


def test_the_trainers_sigterm_flag_reglab_clears_is_where_it_reads_it():
    """Checkpoint._take_back_sigterm clears Lightning's SIGTERM flag through the trainer's private signal connector:
    `trainer.received_sigterm` must be that connector's attribute."""
    import lightning as L

    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    assert trainer.received_sigterm is False
    trainer._signal_connector.received_sigterm = True
    assert trainer.received_sigterm is True


def test_the_validation_loop_flag_member_best_reads_exists():
    """population/stopping.MemberBest asks, as ModelCheckpoint does, whether validation has run
    (trainer.fit_loop.epoch_loop.val_loop._has_run) before calling a missing monitor an error."""
    import lightning as L

    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    assert trainer.fit_loop.epoch_loop.val_loop._has_run is False
