"""What Ctrl-C tells the user: what a running command has saved and how to resume it."""

from __future__ import annotations

from pathlib import Path

from ..training.runs import checkpoint_step, last_checkpoint

_interrupt_hint: str | None = None


def on_interrupt(hint: str | None) -> None:
    """Set what Ctrl-C should tell the user (what was saved and how to resume); None: nothing
    was saved yet. A running command updates it as it makes progress."""
    global _interrupt_hint
    _interrupt_hint = hint


def interrupt_hint() -> str | None:
    """What Ctrl-C should tell the user now (None: nothing was saved)."""
    return _interrupt_hint


def interrupt_callback(folder: Path, argv_hint: str):
    """A Trainer callback keeping the Ctrl-C line up to date: what is saved, how to resume."""
    from transformers import TrainerCallback  # deferred: transformers loads only when training

    def saved(step: int) -> None:
        on_interrupt(f"checkpoint of step {step} saved in {folder}; nothing was written to "
                     f"--out; to continue, rerun {argv_hint} with --resume")

    class InterruptHint(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            last = last_checkpoint(folder)
            if last is not None:  # a resumed run
                saved(checkpoint_step(last))
            else:
                on_interrupt(f"no checkpoint saved yet (--save-steps N saves one every N "
                             f"steps in {folder}); nothing was written")

        def on_save(self, args, state, control, **kwargs):
            saved(state.global_step)

    return InterruptHint()
