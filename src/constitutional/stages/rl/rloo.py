"""RLOO for stage 5 through TRL's ``RLOOTrainer`` (Ahmadian et al. 2024): ``rloo_generations`` responses
a prompt, each one's baseline the mean reward of the others; no value head. The reward (PM, direct,
plus the verdict term) sits behind ``reward_funcs`` as a function of text."""

from __future__ import annotations

from pathlib import Path

from constitutional import progress
from constitutional.config import RlConfig
from constitutional.stages.rl.common import (
    MetricsLog,
    RewardFn,
    as_chat,
    metrics_callback,
    step_prompts,
    train_from,
    trainer_resume_point,
)
from constitutional.training import lora_config, trainer_defaults


def run_rloo(cfg: RlConfig, seed: int, policy_path: str, tokenizer, red_team, helpful, reward_fn: RewardFn,
              stage_dir: Path, device: str, metrics_log: MetricsLog, on_step) -> tuple[object, int | None]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import RLOOConfig, RLOOTrainer

    schedule = [p for step in range(1, cfg.steps + 1)
                for p in step_prompts(red_team, helpful, step, cfg.prompts_per_step, cfg.helpful_share, seed)]
    dataset = Dataset.from_list([{"prompt": as_chat(p)} for p in schedule])

    def pm_reward(prompts, completions, **_) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return reward_fn(prompts, texts)

    last, done = trainer_resume_point(stage_dir, metrics_log)
    log_metrics = metrics_callback(metrics_log, on_step, tokenizer, stage_dir, lambda logs: {
        "reward": logs.get("rewards/pm_reward/mean"),
        "kl": logs.get("kl"),  # absent when kl_coef is 0: TRL then keeps no reference model
        "entropy": logs.get("entropy"),
        "response_length": logs.get("completions/mean_length"),
        "clip_fraction": logs.get("clip_ratio/region_mean"),
        "loss": logs["loss"]})

    args = RLOOConfig(
        output_dir=str(stage_dir / "trainer"), max_steps=cfg.steps, learning_rate=cfg.learning_rate,
        lr_scheduler_type="constant", warmup_steps=0,
        per_device_train_batch_size=cfg.prompts_per_step * cfg.rloo_generations,
        num_generations=cfg.rloo_generations, max_completion_length=cfg.max_new_tokens, temperature=cfg.temperature,
        top_p=cfg.top_p, beta=cfg.kl_coef, epsilon=cfg.clip_range, max_grad_norm=cfg.max_grad_norm,
        shuffle_dataset=False, disable_dropout=True, save_steps=cfg.save_steps, save_total_limit=1,
        log_completions=False, **trainer_defaults(device, seed),
        generation_kwargs={"min_new_tokens": cfg.min_new_tokens} if cfg.min_new_tokens else None,
    )
    model = AutoModelForCausalLM.from_pretrained(policy_path, dtype=torch.float32)
    trainer = RLOOTrainer(model=model, reward_funcs=[pm_reward], args=args, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[progress.trainer_bar("rl (rloo)"), log_metrics],
                          peft_config=lora_config(cfg, all_linear=False) if cfg.lora else None)
    return train_from(trainer, last, done, cfg.lora)
