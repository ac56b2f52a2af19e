"""Offline DPO for stage 5 through TRL's ``DPOTrainer`` (Rafailov et al. 2023) on the labelled comparisons:
no reward model and no sampling; the reference is the starting policy, its log-probabilities computed
once before training. ``dpo_loss: soft`` makes each row's soft label the target (TRL's EXO pair loss
with a per-row label smoothing of 1 - p_chosen); ``dpo_sft_weight`` adds RPO's likelihood term on the
chosen answers."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

from constitutional import progress
from constitutional.config import RlConfig
from constitutional.progress import log
from constitutional.stages.rl.common import (
    MetricsLog,
    metrics_callback,
    train_from,
    trainer_resume_point,
)
from constitutional.training import lora_config, trainer_defaults


def run_dpo(cfg: RlConfig, seed: int, policy_path: str, tokenizer, comparisons: list[dict], stage_dir: Path,
             device: str, metrics_log: MetricsLog, on_step) -> tuple[object, int | None]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig

    dataset = Dataset.from_list([{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"],
                                  "p_chosen": min(max(r["p_chosen"], 0.5), 0.999)} for r in comparisons])
    last, done = trainer_resume_point(stage_dir, metrics_log)
    log_metrics = metrics_callback(metrics_log, on_step, tokenizer, stage_dir, lambda logs: {
        "loss": logs["loss"], "reward_margin": logs.get("rewards/margins"),
        "accuracy": logs.get("rewards/accuracies"), "chosen_reward": logs.get("rewards/chosen"),
        "rejected_reward": logs.get("rewards/rejected")})

    # prompts_per_step pairs an optimizer step, in micro-batches of minibatch_size: the logits of a pair
    # batch (4 sequences x tokens x vocabulary, in float32) are what fills memory
    micro = math.gcd(cfg.prompts_per_step, min(cfg.minibatch_size, cfg.prompts_per_step))
    args = DPOConfig(
        output_dir=str(stage_dir / "trainer"), max_steps=cfg.steps, learning_rate=cfg.learning_rate,
        lr_scheduler_type="constant", warmup_steps=0, per_device_train_batch_size=micro,
        gradient_accumulation_steps=cfg.prompts_per_step // micro,
        beta=cfg.dpo_beta, **dpo_losses(cfg.dpo_loss, cfg.dpo_sft_weight),
        max_grad_norm=cfg.max_grad_norm, save_steps=cfg.save_steps, save_total_limit=1, max_length=1024,
        **trainer_defaults(device, seed),
        # the reference log-probabilities of every pair computed once, before training, by the policy itself
        # (it is the reference then): no second model in memory and no reference pass in each step
        precompute_ref_log_probs=True, precompute_ref_batch_size=max(micro, 4),
        label_smoothing=0.1 if cfg.dpo_loss == "soft" else 0.0,  # replaced row by row (EXO needs it above 0)
    )
    model = AutoModelForCausalLM.from_pretrained(policy_path, dtype=torch.float32)
    log(f"reference log-probabilities of {len(dataset)} pairs")
    with progress.library_bars_off():
        trainer = _soft_dpo_trainer_class()(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                                            callbacks=[progress.trainer_bar("rl (dpo)"), log_metrics],
                                            peft_config=lora_config(cfg, all_linear=False) if cfg.lora else None)
    return train_from(trainer, last, done, cfg.lora)


def dpo_losses(loss: str, sft_weight: float) -> dict:
    """TRL's ``loss_type`` and ``loss_weights`` for ``rl.dpo_loss`` and ``rl.dpo_sft_weight``.

    >>> dpo_losses("soft", 0.0)
    {'loss_type': ['exo_pair'], 'loss_weights': None}
    >>> dpo_losses("hard", 0.5)
    {'loss_type': ['sigmoid', 'sft'], 'loss_weights': [1.0, 0.5]}
    """
    preference = "exo_pair" if loss == "soft" else "sigmoid"
    if sft_weight > 0:
        return {"loss_type": [preference, "sft"], "loss_weights": [1.0, sft_weight]}
    return {"loss_type": [preference], "loss_weights": None}


def _soft_dpo_trainer_class():
    """TRL's DPOTrainer with each row's ``p_chosen`` carried into the batch and used as its label:
    the EXO pair loss reads ``label_smoothing`` as the probability that the rejected answer is the
    better one, so it is set to 1 - p_chosen row by row (a "hard" run ignores it)."""

    import torch
    from trl import DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    class SoftLabelCollator(DataCollatorForPreference):
        def torch_call(self, examples):
            out = super().torch_call(examples)
            out["p_chosen"] = torch.tensor([float(e["p_chosen"]) for e in examples])
            return out

    class SoftLabelDPOTrainer(DPOTrainer):
        def __init__(self, *args, **kwargs):
            dpo_args, tokenizer = kwargs["args"], kwargs["processing_class"]
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            kwargs["data_collator"] = SoftLabelCollator(pad_token_id=pad, max_length=dpo_args.max_length,
                                                        truncation_mode=dpo_args.truncation_mode)
            super().__init__(*args, **kwargs)

        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            if "p_chosen" not in self._signature_columns:
                self._signature_columns = [*self._signature_columns, "p_chosen"]

        def _compute_loss(self, model, inputs, return_outputs):
            p_chosen = inputs.pop("p_chosen", None)
            if p_chosen is None or "exo_pair" not in self.loss_types:
                return super()._compute_loss(model, inputs, return_outputs)
            saved = self.label_smoothing
            self.label_smoothing = (1 - p_chosen.float()).clamp(1e-3, 0.5)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)  # TRL wraps it in torch.tensor()
                    return super()._compute_loss(model, inputs, return_outputs)
            finally:
                self.label_smoothing = saved

    return SoftLabelDPOTrainer
