"""Stage 5: RL from AI feedback: the SL-CAI policy optimised against the preference model.

Paper: Bai et al. 2022, section 4 ("RL-CAI"). The policy starts from the SL-CAI model; its
reward is the preference model's score, normalised with the mean and standard deviation the
PM stage measured (``pm/metrics.json``); a KL penalty keeps it close to a frozen copy of the
SL-CAI model. Each step draws prompts from the red-team train split mixed with helpful
prompts (``helpful_share``), since the paper trained on both.

Rewards (``rl.reward``): ``pm``, the preference model as in the paper; or ``direct``, the
feedback model's contrast score of each response under a principle drawn per prompt (harmless
principles for red-team prompts, helpful ones for helpful prompts), normalised within each batch:
the "direct RLAIF" of Lee et al. 2023 ("RLAIF vs. RLHF"), with no PM in between. Beyond the paper,
``rl.verdict_weight`` adds the content-level verdict term (``rewards.verdict_term``): a loop or
"I can't help with that, but here's how ..." loses reward, a decline with a reason gains it, so the
policy cannot climb a weak feedback model's score with a form a reader would call broken.

Algorithms (``rl.algo``):
- ``ppo``, as in the paper, written here (the maths in ``constitutional/ppo.py``, the loop in
  ``rl/ppo.py``): a value head on the policy, per-token KL penalty folded into the reward, GAE,
  clipped policy and value losses, several epochs over minibatches of each batch of rollouts.
- ``rloo``: TRL's ``RLOOTrainer`` (Ahmadian et al. 2024): ``rloo_generations`` responses per
  prompt, each one's baseline the mean reward of the others; no value head, so it is cheaper.
  The PM sits behind ``reward_funcs`` as a function of text, so the PM may use another tokenizer.
- ``dpo``: offline DPO (Rafailov et al. 2023) on the labelled comparisons through TRL's
  ``DPOTrainer``, the reference being the starting policy. No reward model and no sampling. With
  ``dpo_loss: soft`` each row's soft label is the target: TRL's EXO pair loss with a per-row label
  smoothing of 1 - p_chosen, whose minimum is at sigmoid(beta * margin) = p_chosen; ``hard`` is
  the usual loss on chosen over rejected. ``dpo_sft_weight`` adds a negative log-likelihood term
  on the chosen answers (RPO, Pang et al. 2024; TRL's ``sft`` loss type), so that training does not
  lower the chosen answers together with the rejected ones.

The package: this module is the stage (inputs checked, reward built, the algorithm run, the summary);
``ppo.py``, ``rloo.py`` and ``dpo.py`` one algorithm each; ``common.py`` what they share (prompt
schedule, checkpoints, metrics log). The reward functions are in ``constitutional/rewards.py`` (the
evaluation reads the PM too); LoRA, trainer defaults and resume in ``constitutional/training.py``.

Run:
    cai rl --config configs/smollm2-cpu.yaml --out runs/demo
    cai rl --config configs/smollm2-cpu.yaml --out runs/rloo --set rl.algo=rloo \\
        --set rl.policy=runs/demo/sft/model --set rl.reward_model=runs/demo/pm/model

Writes ``rl/metrics.jsonl`` (a row a step: mean reward, KL, entropy, response length, clip
fraction), ``rl/checkpoints/step-N/`` every ``save_steps`` steps (plain transformers
directories, for reward- and Elo-against-step plots), ``rl/model/`` at the end,
``rl/summary.json`` (the mean reward, from the PM or the direct contrast score, on held-out
red-team prompts before and after, the final KL, wall time), ``rl/samples.jsonl`` (those held-out
responses before and after) and ``rl/reward.png``. A rerun after a kill resumes from the last
checkpoint; metric rows written after it are dropped and written again, so no step appears twice.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from constitutional.config import PipelineConfig, RlConfig
from constitutional.distributed import is_main, world_size
from constitutional.errors import CaiError
from constitutional.models import check_model_spec, resolve_model
from constitutional.progress import log
from constitutional.prompt_sources import PromptRow, load_prompts
from constitutional.records import check_resume_settings, iter_jsonl, load_comparisons, write_json
from constitutional.rewards import DirectReward, PMReward, VerdictReward, normalise_batch, reward_stats
from constitutional.stages.rl.common import (
    MetricsLog,
    RewardFn,
    as_chat,
    encode_prompt,
    plot_metrics,
    save_snapshot,
    step_prompts,
    tidy_checkpoints,
)
from constitutional.stages.rl.dpo import run_dpo
from constitutional.stages.rl.ppo import run_ppo
from constitutional.stages.rl.rloo import run_rloo

__all__ = ["STAGE_DIR", "DirectReward", "PMReward", "RewardFn", "VerdictReward", "check_processes",
           "check_reward_model", "normalise_batch", "reward_stats", "run", "step_prompts"]

STAGE_DIR = "rl"
# settings that may change between runs into the same directory: the stage takes up where it stopped
FREE_SETTINGS = {"steps", "save_steps", "eval_prompts", "tensorboard", "device"}


def check_reward_model(cfg: RlConfig, pm_dir: Path) -> None:
    """The preference model a PM-rewarded online algorithm needs (not DPO, not ``reward: direct``)."""
    if cfg.reward == "pm" and cfg.algo != "dpo" and not (pm_dir / "config.json").is_file():
        what = "does not exist" if not pm_dir.exists() else "has no config.json"
        raise CaiError(f"rl.reward_model: preference model directory {pm_dir} {what} "
                       f"(run `cai train-pm` first, set rl.reward_model, or use rl.reward: direct)")


def check_processes(cfg: RlConfig) -> None:
    """PPO (``ppo.py``) runs in one process; refuse a multi-process launch before anything starts."""
    if cfg.algo == "ppo" and world_size() > 1:
        raise CaiError(f"rl.algo ppo runs in one process (ppo.py shards nothing), not {world_size()}: "
                       f"under accelerate launch or torchrun use rl.algo=rloo (TRL's trainer)")


def run(config: PipelineConfig, out_dir: str | Path, reward_fn: RewardFn | None = None,
        on_step: Callable[[int, dict], None] | None = None) -> dict:
    """Run stage 5. ``reward_fn`` replaces the PM (tests use a synthetic reward); ``on_step(step,
    metrics)`` is called after each step's metrics are written."""
    cfg = config.rl
    cfg.check()
    check_processes(cfg)
    out_dir = Path(out_dir)
    stage_dir = out_dir / STAGE_DIR
    # Check every input before loading a model.
    policy_spec = config.run_models(out_dir).rl_policy
    check_model_spec(policy_spec, "rl.policy")
    pm_dir = Path(config.run_models(out_dir).reward_model)
    pm_found = (pm_dir / "config.json").is_file()
    if reward_fn is None:
        check_reward_model(cfg, pm_dir)
    feedback_spec = config.run_models(out_dir).direct_feedback
    if reward_fn is None and cfg.reward == "direct":
        check_model_spec(feedback_spec, "rl.feedback_model")
    comparisons = None
    if cfg.algo == "dpo":
        comparisons = load_comparisons(Path(cfg.comparisons) if cfg.comparisons
                                       else out_dir / "label" / "comparisons.jsonl")
    red_team = load_prompts(cfg.prompts, "train", cfg.limit)
    helpful = load_prompts(cfg.helpful_prompts, "train") if cfg.helpful_prompts and cfg.helpful_share > 0 else []
    eval_prompts = load_prompts(cfg.prompts, "heldout", cfg.eval_prompts) if cfg.eval_prompts else []
    if not red_team:
        raise CaiError(f"rl.prompts {cfg.prompts!r}: no prompts in the train split")
    check_resume_settings(stage_dir, {**asdict(cfg), "policy": policy_spec, "reward_model": str(pm_dir),
                                      "feedback_model": feedback_spec, "seed": config.seed},
                          free=FREE_SETTINGS)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from constitutional.backends.hf import pick_device

    start = time.time()
    device = pick_device(cfg.device)
    policy_path = resolve_model(policy_spec)
    tokenizer = AutoTokenizer.from_pretrained(policy_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if reward_fn is None and cfg.reward == "direct":
        reward_fn = DirectReward.from_config(config, feedback_spec, device, helpful)
    elif reward_fn is None and pm_found:
        reward_fn = PMReward(pm_dir, device)
        if reward_fn.stats_source is None:
            log(f"no metrics.json beside {pm_dir}: PM rewards are used unnormalised")
    if reward_fn is not None and cfg.verdict_weight > 0 and cfg.algo != "dpo":
        reward_fn = VerdictReward(reward_fn, cfg.verdict_weight, {p.prompt for p in helpful})
    if reward_fn is None and eval_prompts:
        log("dpo without a preference model: no held-out reward before and after (cai evaluate measures the effect)")
        eval_prompts = []
    stats_source = getattr(reward_fn, "stats_source", None)

    # The PM's verdict on held-out red-team prompts, greedy, before any RL (kept across resumes).
    samples_path = stage_dir / "samples.jsonl"
    before_path = stage_dir / "eval_before.json"
    eval_ids = [p.id for p in eval_prompts]
    if eval_prompts and (not before_path.is_file() or json.loads(before_path.read_text()).get("ids") != eval_ids):
        model = AutoModelForCausalLM.from_pretrained(policy_path, dtype=torch.float32).to(device).eval()
        write_json(before_path, {"ids": eval_ids, **_evaluate(model, tokenizer, eval_prompts, reward_fn, cfg)})
        del model

    metrics_log = MetricsLog(stage_dir, cfg.tensorboard)
    if cfg.algo == "ppo":
        final_model, resumed = run_ppo(cfg, config.seed, policy_path, tokenizer, red_team, helpful, reward_fn,
                                        stage_dir, device, metrics_log, on_step)
    elif cfg.algo == "rloo":
        final_model, resumed = run_rloo(cfg, config.seed, policy_path, tokenizer, red_team, helpful, reward_fn,
                                         stage_dir, device, metrics_log, on_step)
    else:
        final_model, resumed = run_dpo(cfg, config.seed, policy_path, tokenizer, comparisons, stage_dir, device,
                                        metrics_log, on_step)
    metrics_log.close()
    final_dir = save_snapshot(final_model, tokenizer, stage_dir / "model")
    last_row = list(iter_jsonl(metrics_log.path))[-1:] if metrics_log.path.exists() else []
    if not config.keep_optimizer_state and is_main():
        tidy_checkpoints(stage_dir, last_row[0]["step"] if last_row else None)

    summary: dict = {"algo": cfg.algo, "reward": cfg.reward if cfg.algo != "dpo" else None, "policy": policy_spec,
                     "reward_model": str(pm_dir) if cfg.reward == "pm" and pm_found else None,
                     "feedback_model": feedback_spec if cfg.reward == "direct" else None,
                     "reward_normalised_with": stats_source, "output": str(final_dir), "resumed_from_step": resumed}
    rows = list(iter_jsonl(metrics_log.path))
    if rows:
        summary["steps"] = rows[-1]["step"]
        quarter = max(1, len(rows) // 4)
        summary["reward_first_steps"] = _mean(r.get("reward") for r in rows[:quarter])
        summary["reward_last_steps"] = _mean(r.get("reward") for r in rows[-quarter:])
        summary["final_kl"] = _mean(r.get("kl") for r in rows[-quarter:])
    if eval_prompts:
        before = json.loads(before_path.read_text())
        after = _evaluate(final_model.eval(), tokenizer, eval_prompts, reward_fn, cfg)
        summary["heldout_prompts"] = len(eval_prompts)
        summary["heldout_reward_before"] = before["mean_reward"]
        summary["heldout_reward_after"] = after["mean_reward"]
        if is_main():
            with open(samples_path, "w", encoding="utf-8") as f:
                for p, b, a in zip(eval_prompts, before["rows"], after["rows"], strict=True):
                    f.write(json.dumps({"id": p.id, "prompt": p.prompt, "before": b["response"], "reward_before":
                                        b["reward"], "after": a["response"], "reward_after": a["reward"]}) + "\n")
    summary["seconds"] = round(time.time() - start, 2)
    write_json(stage_dir / "summary.json", summary)
    if rows and is_main():
        plot_metrics(rows, stage_dir / "reward.png")
    parts = [f"rl ({cfg.algo}): {summary.get('steps', 0)} steps"]
    if eval_prompts:
        source = "contrast" if cfg.reward == "direct" else "PM"
        parts.append(f"held-out {source} reward {summary['heldout_reward_before']:.3f} -> "
                     f"{summary['heldout_reward_after']:.3f}")
    if rows and summary["final_kl"] is not None:
        parts.append(f"final KL/token {summary['final_kl']:.4f}")
    log(", ".join(parts) + f"; {summary['seconds']:.0f} s")
    return summary


def _mean(values) -> float | None:
    """Mean of the numbers among ``values`` (None where a metric was not measured), or None."""
    numbers = [v for v in values if isinstance(v, int | float) and not math.isnan(v)]
    return sum(numbers) / len(numbers) if numbers else None


def _evaluate(model, tokenizer, prompts: list[PromptRow], reward_fn: RewardFn, cfg: RlConfig) -> dict:
    from constitutional import ppo

    queries = [encode_prompt(tokenizer, p) for p in prompts]
    responses = ppo.sample(model, tokenizer, queries, cfg.max_new_tokens, greedy=True)
    texts = [tokenizer.decode(r, skip_special_tokens=True) for r in responses]
    score = getattr(reward_fn, "raw", reward_fn)  # unnormalised: per-batch normalisation would hide the change
    rewards = score([as_chat(p) for p in prompts], texts)
    return {"mean_reward": sum(rewards) / len(rewards),
            "rows": [{"response": t, "reward": r} for t, r in zip(texts, rewards, strict=True)]}
