"""One progress display for a whole ``cai run``: every bar says which stage of how many it belongs to.

Stages make their bars with ``progress.bar(total, desc, unit)`` (a tqdm bar on stderr, with rate
and ETA); while ``cai run`` runs stage i of n, each bar's description starts with ``[i/n]``.
Trainers (SFT, PM, DPO, RLOO) get ``TrainerBar``, a callback that drives the same kind of bar with
the loss, in place of transformers' own.
"""

from __future__ import annotations

import contextlib
import os
import sys

from tqdm.auto import tqdm

_STAGE: tuple[int, int, str] | None = None


def log(message: str) -> None:
    """One line for the user on stderr, marked as this tool's: ``[cai] message``."""
    print(f"[cai] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def no_hf_bars():
    """transformers' own progress bars off while a model or tokenizer loads (one weights file loads in a
    second; cai shows its own bars), then as they were."""
    from transformers.utils import logging as hf_logging

    were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if were_on:
            hf_logging.enable_progress_bar()


def set_stage(index: int | None, total: int = 0, name: str = "") -> None:
    """Called by ``cai run`` around each stage (``None`` after it)."""
    global _STAGE
    _STAGE = None if index is None else (index, total, name)


def desc(name: str) -> str:
    """A bar's description, prefixed with the stage position when run by ``cai run``.

    >>> set_stage(2, 6, "sft"); desc("helpful samples")
    '[2/6] helpful samples'
    >>> set_stage(None); desc("label")
    'label'
    """
    return f"[{_STAGE[0]}/{_STAGE[1]}] {name}" if _STAGE else name


def bar(total: int, name: str, unit: str = "it", initial: int = 0):
    return tqdm(total=total, desc=desc(name), unit=unit, initial=initial, file=sys.stderr, dynamic_ncols=True)


QUIET = [False]  # set by cli.quiet_libraries: no library output unless --verbose


def quiet_trainer(trainer):
    """Drop transformers' ``PrinterCallback`` (it prints every log dict to stdout when the Trainer's own
    bars are off) unless ``--verbose``: our bar shows the loss instead. Returns the trainer."""
    if QUIET[0]:
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    return trainer


@contextlib.contextmanager
def library_bars_off():
    """Inside it, tqdm bars that a library makes honour ``TQDM_DISABLE`` (TRL's DPO reference pass does)
    and stay off unless ``--verbose``; ours are made outside it."""
    if not QUIET[0]:
        yield
        return
    saved = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = saved


def trainer_bar(name: str):
    """A ``transformers.TrainerCallback`` showing training steps as one of our bars (rate, ETA, loss)."""
    from transformers import TrainerCallback

    class TrainerBar(TrainerCallback):
        def __init__(self):
            self.bar = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.bar = bar(state.max_steps, name, "step", initial=state.global_step)

        def on_step_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.bar is not None and logs and "loss" in logs:
                self.bar.set_postfix(loss=f"{logs['loss']:.4f}", refresh=False)

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    return TrainerBar()
