"""What the training stages (sft, pm, rl) share: the trainer arguments every stage sets alike, the LoRA
adapter's config, where a trainer resumes, and removing trainer checkpoints once a stage's model is saved.
(RL's own step snapshots, their tidying and its metrics callback are in ``stages/rl/common.py``: only RL
has them.)

Each stage still reads top to bottom on its own; only these small pieces, which must behave the same
in every stage, live here.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from constitutional.progress import log


def trainer_defaults(device: str, seed: int) -> dict:
    """The transformers/TRL trainer arguments every training stage sets the same way: float32 (bfloat16 matmuls
    are hundreds of times slower on a CPU), the CPU when asked, no gradient checkpointing (a small model fits
    without it, and recomputing costs a third more time), no trainer progress bar or report (``progress``
    shows the steps), a loss logged every step, data loaded in the main process."""
    return {"use_cpu": device == "cpu", "bf16": False, "fp16": False, "gradient_checkpointing": False,
            "report_to": "none", "disable_tqdm": True, "logging_steps": 1, "dataloader_num_workers": 0, "seed": seed}


def lora_config(section, task_type: str = "CAUSAL_LM", all_linear: bool = True):
    """PEFT's ``LoraConfig`` from a config section's ``lora_r``, ``lora_alpha`` and ``lora_dropout``.

    ``all_linear``: adapt every linear layer (sft, pm); False: PEFT's default modules for the architecture
    (rl, as it always did). ``task_type`` ``SEQ_CLS`` for the preference model.
    """
    from peft import LoraConfig

    extra = {"target_modules": "all-linear"} if all_linear else {}
    return LoraConfig(r=section.lora_r, lora_alpha=section.lora_alpha, lora_dropout=section.lora_dropout,
                      task_type=task_type, **extra)


def last_trainer_checkpoint(checkpoint_dir: Path) -> tuple[str | None, int]:
    """(the last ``checkpoint-N`` a transformers trainer saved in ``checkpoint_dir``, N), or (None, 0);
    says so on stderr when there is one to resume from."""
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(str(checkpoint_dir)) if checkpoint_dir.is_dir() else None
    if last:
        log(f"resuming from {last}")
    return last, int(last.rsplit("-", 1)[1]) if last else 0


def drop_checkpoints(checkpoint_dir: Path) -> None:
    """Remove a finished stage's trainer checkpoints (weights + optimizer state: gigabytes for a
    135M model); the model directory is then the only copy of the weights."""
    if checkpoint_dir.is_dir():
        shutil.rmtree(checkpoint_dir)
