"""PPO for stage 5, as in the paper: the loop around ``constitutional/ppo.py`` (value head, per-token KL
penalty against the SL-CAI model folded into the reward, GAE, clipped policy and value losses), with
its own safetensors checkpoints so that a killed run resumes at the last saved step."""

from __future__ import annotations

import json
import time
from pathlib import Path

from constitutional import progress
from constitutional.config import RlConfig
from constitutional.progress import log
from constitutional.stages.rl.common import (
    MetricsLog,
    RewardFn,
    as_chat,
    encode_prompt,
    last_checkpoint,
    save_checkpoint,
    step_prompts,
)
from constitutional.training import lora_config


def run_ppo(cfg: RlConfig, seed: int, policy_path: str, tokenizer, red_team, helpful, reward_fn: RewardFn,
             stage_dir: Path, device: str, metrics_log: MetricsLog, on_step) -> tuple[object, int | None]:
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from constitutional import ppo

    def load(path):
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)

    last = last_checkpoint(stage_dir / "checkpoints", need="optimizer.safetensors")
    ref_model = None
    if cfg.lora:
        from peft import PeftModel, get_peft_model

        base = load(policy_path)
        if last:
            policy = PeftModel.from_pretrained(base, last / "adapter", is_trainable=True)
        else:
            policy = get_peft_model(base, lora_config(cfg, all_linear=False))
    else:
        policy = load(last if last else policy_path)
        ref_model = load(policy_path).eval().requires_grad_(False)
    policy.eval()  # dropout off: the rollout and the update see the same function
    value_head = ppo.ValueHead(policy.config.hidden_size).to(device)
    trainable = [p for p in policy.parameters() if p.requires_grad] + list(value_head.parameters())
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate)
    done = 0
    if last:
        state = json.loads((last / "state.json").read_text())
        value_head.load_state_dict(load_file(last / "value_head.safetensors"))
        ppo.load_optimizer_tensors(optimizer, load_file(last / "optimizer.safetensors"), state["param_groups"])
        done = state["step"]
        log(f"resuming from {last}")
    metrics_log.keep_steps_up_to(done)

    settings = ppo.PpoSettings.of(cfg)
    bar = progress.bar(cfg.steps, "rl (ppo)", "step", initial=done)
    for step in range(done + 1, cfg.steps + 1):
        t0 = time.time()
        torch.manual_seed(seed * 1_000_003 + step)  # sampling and minibatch order: a function of the step
        prompts = step_prompts(red_team, helpful, step, cfg.prompts_per_step, cfg.helpful_share, seed)
        queries = [encode_prompt(tokenizer, p) for p in prompts]

        def score(responses: list[list[int]], prompts=prompts) -> list[float]:
            texts = [tokenizer.decode(r, skip_special_tokens=True) for r in responses]
            return reward_fn([as_chat(p) for p in prompts], texts)

        stats = ppo.ppo_step(policy, value_head, ref_model, optimizer, tokenizer, queries, score, settings)
        row = {"step": step, **stats, "seconds": round(time.time() - t0, 3)}
        metrics_log.write(row)
        bar.set_postfix(reward=f"{row['reward']:.3f}", kl=f"{row['kl']:.4f}")
        if step % cfg.save_steps == 0 or step == cfg.steps:
            tensors, groups = ppo.optimizer_tensors(optimizer)

            def extra(tmp: Path, tensors=tensors, groups=groups, step=step) -> None:
                save_file({k: v.detach().cpu().contiguous() for k, v in value_head.state_dict().items()},
                          tmp / "value_head.safetensors")
                save_file(tensors, tmp / "optimizer.safetensors")
                if cfg.lora:
                    policy.save_pretrained(tmp / "adapter")
                (tmp / "state.json").write_text(json.dumps({"step": step, "param_groups": groups}))

            save_checkpoint(policy, tokenizer, stage_dir / "checkpoints", step, extra)
        if on_step:
            on_step(step, row)
        bar.update(1)
    bar.close()
    final = policy.merge_and_unload() if cfg.lora else policy
    return final, (done or None)
