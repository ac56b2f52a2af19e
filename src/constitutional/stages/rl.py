"""Stage 5: RL from AI feedback: the SL-CAI policy optimised against the preference model.

Paper: Bai et al. 2022, section 4 ("RL-CAI"). The policy starts from the SL-CAI model; its
reward is the preference model's score, normalised with the mean and standard deviation the
PM stage measured (``pm/metrics.json``); a KL penalty keeps it close to a frozen copy of the
SL-CAI model. Each step draws prompts from the red-team train split mixed with helpful
prompts (``helpful_share``), since the paper trained on both.

Rewards (``rl.reward``): ``pm``, the preference model as in the paper; or ``direct``, the
feedback model's contrast score of each response under a principle drawn per prompt (harmless
principles for red-team prompts, helpful ones for helpful prompts), normalised within each batch:
the "direct RLAIF" of Lee et al. 2023 ("RLAIF vs. RLHF"), with no PM in between.

Algorithms (``rl.algo``):
- ``ppo``, as in the paper, written here (``ppo.py``): a value head on the policy, per-token
  KL penalty folded into the reward, GAE, clipped policy and value losses, several epochs over
  minibatches of each batch of rollouts.
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

import copy
import json
import math
import random
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from constitutional import progress
from constitutional.config import PipelineConfig, RlConfig
from constitutional.datasets import PromptRow, load_prompts
from constitutional.distributed import is_main, world_size
from constitutional.errors import CaiError
from constitutional.feedback import ContrastSettings
from constitutional.models import check_model_spec
from constitutional.records import check_resume_settings, iter_jsonl, write_json

STAGE_DIR = "rl"
# settings that may change between runs into the same directory: the stage takes up where it stopped
FREE_SETTINGS = {"steps", "save_steps", "eval_prompts", "tensorboard", "device"}

# reward_fn(prompts as chats, responses as text) -> one reward per response
RewardFn = Callable[[list[list[dict]], list[str]], list[float]]


# ------------------------------------------------------------------ pure helpers


def step_prompts(red_team: list[PromptRow], helpful: list[PromptRow], step: int, per_step: int,
                 helpful_share: float, seed: int) -> list[PromptRow]:
    """The prompts of RL step ``step`` (1-based): ``round(per_step * helpful_share)`` helpful ones,
    the rest red-team. Each pool is walked in a seeded order, reshuffled on every pass, so the
    schedule is a pure function of the step and a resumed run sees the same prompts.

    >>> red = [PromptRow(f"r{i}", "x") for i in range(3)]
    >>> help = [PromptRow(f"h{i}", "y") for i in range(2)]
    >>> [p.id[0] for p in step_prompts(red, help, 1, 4, 0.25, 0)]
    ['r', 'r', 'r', 'h']
    >>> len({p.id for p in step_prompts(red, help, 1, 3, 0.0, 0)})  # one pass covers the pool
    3
    """
    n_helpful = round(per_step * helpful_share) if helpful else 0

    def take(pool: list[PromptRow], count: int, salt: str) -> list[PromptRow]:
        out = []
        for k in range((step - 1) * count, step * count):
            epoch, i = divmod(k, len(pool))
            order = list(range(len(pool)))
            random.Random(f"{seed}:{salt}:{epoch}").shuffle(order)
            out.append(pool[order[i]])
        return out

    return take(red_team, per_step - n_helpful, "red") + (take(helpful, n_helpful, "helpful") if n_helpful else [])


def as_chat(prompt: PromptRow) -> list[dict]:
    return [{"role": "user", "content": prompt.prompt}]


def reward_stats(pm_dir: Path) -> tuple[float, float, str | None]:
    """(mean, std, source) of the PM's rewards, from the metrics.json the PM stage wrote beside
    ``pm/model/`` (or inside the PM directory); (0, 1, None) if there is none."""
    for path in (pm_dir.parent / "metrics.json", pm_dir / "metrics.json"):
        if path.is_file():
            try:
                data = json.loads(path.read_text())
                mean, std = float(data["reward_mean"]), float(data["reward_std"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise CaiError(f"{path}: no usable reward_mean/reward_std ({e})") from None
            return mean, (std if std > 0 else 1.0), str(path)
    return 0.0, 1.0, None


class PMReward:
    """The PM's score of each (prompt, response), normalised: (r - mean) / std."""

    def __init__(self, pm_dir: Path, device: str, batch_size: int = 16):
        from constitutional.stages.pm import PreferenceModel

        self.mean, self.std, self.stats_source = reward_stats(pm_dir)
        self.pm = PreferenceModel(pm_dir, device=device, batch_size=batch_size)

    def __call__(self, prompts: list[list[dict]], responses: list[str]) -> list[float]:
        return [(r - self.mean) / self.std for r in self.pm.score(prompts, responses)]


class DirectReward:
    """The feedback model's contrast score of each response, the reward without a PM (Lee et al. 2023).

    Each prompt is judged under a principle drawn for it once (harmless principles for red-team
    prompts, helpful ones for helpful prompts): s = log P(response | follows) - log P(response |
    violates), per token. ``raw`` gives s; calling the object gives s normalised within the batch
    (mean 0, std 1), so the reward scale does not depend on the principle or the feedback model.
    An empty response gets the batch's lowest score minus 1 (it cannot be scored, and it is no answer).
    """

    def __init__(self, backend, pools: dict[str, list], seed: int, contrast: ContrastSettings | None = None,
                 helpful_prompts: set[str] = frozenset()):
        self.backend, self.pools, self.seed = backend, pools, seed
        self.contrast = contrast or ContrastSettings()
        self.helpful_prompts = set(helpful_prompts)

    @classmethod
    def from_config(cls, config: PipelineConfig, spec: str, device: str, helpful: list[PromptRow]) -> DirectReward:
        from constitutional import feedback
        from constitutional.backends import load_backend
        from constitutional.constitution import load_constitution

        constitution = load_constitution(config.constitution)
        pools = {kind: [p for p in constitution.feedback_principles if p.kind == kind]
                 for kind in ("harmless", "helpful")}
        if not pools["harmless"]:
            raise CaiError(f"rl.reward: direct needs feedback principles of kind 'harmless' in {constitution.name!r}")
        feedback.check_contrast_principles(constitution.feedback_principles)
        backend = load_backend(spec, batch_size=16, device=device)
        return cls(backend, pools, config.seed, ContrastSettings.of(config.label), {p.prompt for p in helpful})

    def principle(self, prompt_text: str):
        from constitutional.constitution import sample_principles

        kind = "helpful" if prompt_text in self.helpful_prompts and self.pools["helpful"] else "harmless"
        return sample_principles(self.pools[kind], 1, self.seed, f"direct:{prompt_text}")[0]

    def raw(self, prompts: list[list[dict]], responses: list[str]) -> list[float]:
        texts = [next(m["content"] for m in reversed(p) if m["role"] == "user") for p in prompts]
        scored = [i for i, r in enumerate(responses) if r.strip()]
        values = self.contrast.scores(self.backend, [(texts[i], self.principle(texts[i]), responses[i])
                                                     for i in scored])
        out: list[float | None] = [None] * len(responses)
        for i, v in zip(scored, values, strict=True):
            out[i] = v
        floor = min(values) - 1.0 if values else -1.0
        return [floor if v is None else v for v in out]

    def __call__(self, prompts: list[list[dict]], responses: list[str]) -> list[float]:
        return normalise_batch(self.raw(prompts, responses))


def normalise_batch(values: list[float]) -> list[float]:
    """(x - mean) / std within the batch; all zeros when the batch has no spread.

    >>> normalise_batch([1.0, 3.0])
    [-1.0, 1.0]
    >>> normalise_batch([2.0, 2.0])
    [0.0, 0.0]
    """
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    if std < 1e-8:
        return [0.0 for _ in values]
    return [(v - mean) / std for v in values]


# ------------------------------------------------------------------ the stage


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
    policy_spec = cfg.policy or str(out_dir / "sft" / "model")
    check_model_spec(policy_spec, "rl.policy")
    pm_dir = Path(cfg.reward_model or out_dir / "pm" / "model")
    pm_found = (pm_dir / "config.json").is_file()
    if reward_fn is None:
        check_reward_model(cfg, pm_dir)
    feedback_spec = cfg.feedback_model or config.label.feedback_model or config.critique_revise.model
    if reward_fn is None and cfg.reward == "direct":
        check_model_spec(feedback_spec, "rl.feedback_model")
    comparisons = None
    if cfg.algo == "dpo":
        from constitutional.stages.pm import load_comparisons

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
    from constitutional.models import resolve_model

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
            _log(f"no metrics.json beside {pm_dir}: PM rewards are used unnormalised")
    if reward_fn is None and eval_prompts:
        _log("dpo without a preference model: no held-out reward before and after (cai evaluate measures the effect)")
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
        final_model, resumed = _run_ppo(cfg, config.seed, policy_path, tokenizer, red_team, helpful, reward_fn,
                                        stage_dir, device, metrics_log, on_step)
    elif cfg.algo == "rloo":
        final_model, resumed = _run_rloo(cfg, config.seed, policy_path, tokenizer, red_team, helpful, reward_fn,
                                         stage_dir, device, metrics_log, on_step)
    else:
        final_model, resumed = _run_dpo(cfg, config.seed, policy_path, tokenizer, comparisons, stage_dir, device,
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
    _log(", ".join(parts) + f"; {summary['seconds']:.0f} s")
    return summary


def _mean(values) -> float | None:
    """Mean of the numbers among ``values`` (None where a metric was not measured), or None."""
    numbers = [v for v in values if isinstance(v, int | float) and not math.isnan(v)]
    return sum(numbers) / len(numbers) if numbers else None


def _evaluate(model, tokenizer, prompts: list[PromptRow], reward_fn: RewardFn, cfg: RlConfig) -> dict:
    from constitutional import ppo

    queries = [_encode_prompt(tokenizer, p) for p in prompts]
    responses = ppo.sample(model, tokenizer, queries, cfg.max_new_tokens, greedy=True)
    texts = [tokenizer.decode(r, skip_special_tokens=True) for r in responses]
    score = getattr(reward_fn, "raw", reward_fn)  # unnormalised: per-batch normalisation would hide the change
    rewards = score([as_chat(p) for p in prompts], texts)
    return {"mean_reward": sum(rewards) / len(rewards),
            "rows": [{"response": t, "reward": r} for t, r in zip(texts, rewards, strict=True)]}


def _encode_prompt(tokenizer, prompt: PromptRow) -> list[int]:
    text = tokenizer.apply_chat_template(as_chat(prompt), tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------ PPO (ppo.py)


def _run_ppo(cfg: RlConfig, seed: int, policy_path: str, tokenizer, red_team, helpful, reward_fn: RewardFn,
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
            policy = get_peft_model(base, _lora_config(cfg))
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
        _log(f"resuming from {last}")
    metrics_log.keep_steps_up_to(done)

    bar = progress.bar(cfg.steps, "rl (ppo)", "step", initial=done)
    for step in range(done + 1, cfg.steps + 1):
        t0 = time.time()
        torch.manual_seed(seed * 1_000_003 + step)  # sampling and minibatch order: a function of the step
        prompts = step_prompts(red_team, helpful, step, cfg.prompts_per_step, cfg.helpful_share, seed)
        queries = [_encode_prompt(tokenizer, p) for p in prompts]

        def score(responses: list[list[int]], prompts=prompts) -> list[float]:
            texts = [tokenizer.decode(r, skip_special_tokens=True) for r in responses]
            return reward_fn([as_chat(p) for p in prompts], texts)

        stats = ppo.ppo_step(policy, value_head, ref_model, optimizer, tokenizer, queries, score, cfg)
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


# ------------------------------------------------------------------ RLOO (TRL)


def _run_rloo(cfg: RlConfig, seed: int, policy_path: str, tokenizer, red_team, helpful, reward_fn: RewardFn,
              stage_dir: Path, device: str, metrics_log: MetricsLog, on_step) -> tuple[object, int | None]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from transformers.trainer_utils import get_last_checkpoint
    from trl import RLOOConfig, RLOOTrainer

    schedule = [p for step in range(1, cfg.steps + 1)
                for p in step_prompts(red_team, helpful, step, cfg.prompts_per_step, cfg.helpful_share, seed)]
    dataset = Dataset.from_list([{"prompt": as_chat(p)} for p in schedule])

    def pm_reward(prompts, completions, **_) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return reward_fn(prompts, texts)

    trainer_dir = stage_dir / "trainer"
    last = get_last_checkpoint(str(trainer_dir)) if trainer_dir.is_dir() else None
    done = int(last.rsplit("-", 1)[1]) if last else 0
    metrics_log.keep_steps_up_to(done)

    class Log(TrainerCallback):
        step_start = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self.step_start = time.time()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs:
                return
            row = {"step": state.global_step,
                   "reward": logs.get("rewards/pm_reward/mean"),
                   "kl": logs.get("kl"),  # absent when kl_coef is 0: TRL then keeps no reference model
                   "entropy": logs.get("entropy"),
                   "response_length": logs.get("completions/mean_length"),
                   "clip_fraction": logs.get("clip_ratio/region_mean"),
                   "loss": logs["loss"],
                   "seconds": round(time.time() - self.step_start, 3)}
            metrics_log.write(row)
            if on_step:
                on_step(state.global_step, row)

        def on_save(self, args, state, control, model=None, **kwargs):
            save_checkpoint(model, tokenizer, stage_dir / "checkpoints", state.global_step)

    args = RLOOConfig(
        output_dir=str(trainer_dir), max_steps=cfg.steps, learning_rate=cfg.learning_rate,
        lr_scheduler_type="constant", warmup_steps=0,
        per_device_train_batch_size=cfg.prompts_per_step * cfg.rloo_generations,
        num_generations=cfg.rloo_generations, max_completion_length=cfg.max_new_tokens, temperature=cfg.temperature,
        top_p=cfg.top_p, beta=cfg.kl_coef, epsilon=cfg.clip_range, max_grad_norm=cfg.max_grad_norm,
        shuffle_dataset=False, disable_dropout=True, logging_steps=1, save_steps=cfg.save_steps,
        save_total_limit=1, report_to="none", use_cpu=device == "cpu", bf16=False, fp16=False, seed=seed,
        dataloader_num_workers=0, log_completions=False, gradient_checkpointing=False, disable_tqdm=True,
        generation_kwargs={"min_new_tokens": cfg.min_new_tokens} if cfg.min_new_tokens else None,
    )
    model = AutoModelForCausalLM.from_pretrained(policy_path, dtype=torch.float32)
    trainer = RLOOTrainer(model=model, reward_funcs=[pm_reward], args=args, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[progress.trainer_bar("rl (rloo)"), Log()],
                          peft_config=_lora_config(cfg) if cfg.lora else None)
    progress.quiet_trainer(trainer)
    if last:
        _log(f"resuming from {last}")
    trainer.train(resume_from_checkpoint=last)
    final = trainer.model
    if cfg.lora:
        final = final.merge_and_unload()
    return final, (done or None)


def _run_dpo(cfg: RlConfig, seed: int, policy_path: str, tokenizer, comparisons: list[dict], stage_dir: Path,
             device: str, metrics_log: MetricsLog, on_step) -> tuple[object, int | None]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from transformers.trainer_utils import get_last_checkpoint
    from trl import DPOConfig

    dataset = Dataset.from_list([{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"],
                                  "p_chosen": min(max(r["p_chosen"], 0.5), 0.999)} for r in comparisons])
    trainer_dir = stage_dir / "trainer"
    last = get_last_checkpoint(str(trainer_dir)) if trainer_dir.is_dir() else None
    done = int(last.rsplit("-", 1)[1]) if last else 0
    metrics_log.keep_steps_up_to(done)

    class Log(TrainerCallback):
        step_start = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self.step_start = time.time()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs:
                return
            row = {"step": state.global_step, "loss": logs["loss"],
                   "reward_margin": logs.get("rewards/margins"), "accuracy": logs.get("rewards/accuracies"),
                   "chosen_reward": logs.get("rewards/chosen"), "rejected_reward": logs.get("rewards/rejected"),
                   "seconds": round(time.time() - self.step_start, 3)}
            metrics_log.write(row)
            if on_step:
                on_step(state.global_step, row)

        def on_save(self, args, state, control, model=None, **kwargs):
            save_checkpoint(model, tokenizer, stage_dir / "checkpoints", state.global_step)

    # prompts_per_step pairs an optimizer step, in micro-batches of minibatch_size: the logits of a pair
    # batch (4 sequences x tokens x vocabulary, in float32) are what fills memory
    micro = math.gcd(cfg.prompts_per_step, min(cfg.minibatch_size, cfg.prompts_per_step))
    args = DPOConfig(
        output_dir=str(trainer_dir), max_steps=cfg.steps, learning_rate=cfg.learning_rate,
        lr_scheduler_type="constant", warmup_steps=0, per_device_train_batch_size=micro,
        gradient_accumulation_steps=cfg.prompts_per_step // micro,
        beta=cfg.dpo_beta, **dpo_losses(cfg.dpo_loss, cfg.dpo_sft_weight),
        max_grad_norm=cfg.max_grad_norm, logging_steps=1, save_steps=cfg.save_steps, save_total_limit=1,
        report_to="none", use_cpu=device == "cpu", bf16=False, fp16=False, seed=seed, dataloader_num_workers=0,
        gradient_checkpointing=False, max_length=1024, disable_tqdm=True,
        # the reference log-probabilities of every pair computed once, before training, by the policy itself
        # (it is the reference then): no second model in memory and no reference pass in each step
        precompute_ref_log_probs=True, precompute_ref_batch_size=max(micro, 4),
        label_smoothing=0.1 if cfg.dpo_loss == "soft" else 0.0,  # replaced row by row (EXO needs it above 0)
    )
    model = AutoModelForCausalLM.from_pretrained(policy_path, dtype=torch.float32)
    _log(f"reference log-probabilities of {len(dataset)} pairs")
    with progress.library_bars_off():
        trainer = _soft_dpo_trainer_class()(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                                            callbacks=[progress.trainer_bar("rl (dpo)"), Log()],
                                            peft_config=_lora_config(cfg) if cfg.lora else None)
    progress.quiet_trainer(trainer)
    if last:
        _log(f"resuming from {last}")
    trainer.train(resume_from_checkpoint=last)
    final = trainer.model
    if cfg.lora:
        final = final.merge_and_unload()
    return final, (done or None)


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
    import warnings

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


def _lora_config(cfg: RlConfig):
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, task_type="CAUSAL_LM")


# ------------------------------------------------------------------ files


class MetricsLog:
    """``rl/metrics.jsonl``, a row a step, plus the same scalars in TensorBoard if asked for."""

    def __init__(self, stage_dir: Path, tensorboard: bool):
        stage_dir.mkdir(parents=True, exist_ok=True)
        self.path = stage_dir / "metrics.jsonl"
        self.writer = None
        if tensorboard and is_main():
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise CaiError("rl.tensorboard needs the tensorboard package: "
                               "pip install 'constitutional[tensorboard]'") from None
            self.writer = SummaryWriter(log_dir=str(stage_dir / "tensorboard"))

    def keep_steps_up_to(self, step: int) -> None:
        """Drop rows after ``step`` (written after the checkpoint a resumed run starts from)."""
        if not self.path.exists() or not is_main():
            return
        rows = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line torn by the kill
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
                rows.append(row)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        tmp.replace(self.path)

    def write(self, row: dict) -> None:
        if not is_main():  # several processes: the main one writes the metrics
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, int | float):
                    self.writer.add_scalar(f"rl/{key}", value, row["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def save_snapshot(model, tokenizer, dest: Path) -> Path:
    """A plain transformers directory of the policy (a LoRA policy is saved merged, from a copy)."""
    from constitutional.models import save_model_dir

    if hasattr(model, "merge_and_unload"):
        model = copy.deepcopy(model).merge_and_unload()
    return save_model_dir(model, tokenizer, dest)


def save_checkpoint(model, tokenizer, checkpoints: Path, step: int, extra=None) -> Path:
    """``checkpoints/step-N/``: the policy as a plain model directory, plus ``extra(tmp_dir)`` files.

    Written beside its final name and moved into place. Only the newest checkpoint keeps
    ``optimizer.safetensors`` (the older ones stay as snapshots for plots and evaluation).
    """
    dest = checkpoints / f"step-{step}"
    tmp = save_snapshot(model, tokenizer, checkpoints / f"step-{step}.partial")
    if not is_main():  # several processes: the main one saved the snapshot and finishes the checkpoint
        return dest
    if extra:
        extra(tmp)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.replace(dest)
    for older in checkpoints.glob("step-*"):
        if older != dest and (older / "optimizer.safetensors").exists():
            (older / "optimizer.safetensors").unlink()
    return dest


def tidy_checkpoints(stage_dir: Path, final_step: int | None) -> None:
    """When the stage is done: drop the optimizer state (``optimizer.safetensors``, the value head,
    TRL's ``trainer/`` checkpoints) and the step snapshot that holds the same weights as ``rl/model``.
    The other ``checkpoints/step-N`` stay, as plain models for the evaluation against RL step."""
    shutil.rmtree(stage_dir / "trainer", ignore_errors=True)
    for d in (stage_dir / "checkpoints").glob("step-*"):
        if final_step is not None and d.name == f"step-{final_step}":
            shutil.rmtree(d)
            continue
        for name in ("optimizer.safetensors", "value_head.safetensors", "state.json"):
            (d / name).unlink(missing_ok=True)


def last_checkpoint(checkpoints: Path, need: str) -> Path | None:
    """The newest complete ``step-N`` directory (one holding ``need``), or None."""
    found = [d for d in checkpoints.glob("step-*") if d.name[5:].isdigit() and (d / need).is_file()]
    return max(found, key=lambda d: int(d.name[5:]), default=None)


def plot_metrics(rows: list[dict], path: Path) -> None:
    """Reward and KL per step (PPO, RLOO), or loss and implicit reward margin per step (DPO)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dpo = "reward_margin" in rows[0]
    top_key, top_label, title = (("loss", "DPO loss", "DPO on the AI labels") if dpo else
                                 ("reward", "reward (normalised)", "RL against the AI feedback reward"))
    bottom_key, bottom_label = (("reward_margin", "chosen - rejected implicit reward") if dpo else
                                ("kl", "KL to SL-CAI, per token"))
    steps = [r["step"] for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 5), sharex=True)
    top.plot(steps, [math.nan if r.get(top_key) is None else r[top_key] for r in rows], marker=".")
    top.set_ylabel(top_label)
    top.set_title(title)
    bottom.plot(steps, [math.nan if r.get(bottom_key) is None else r[bottom_key] for r in rows], marker=".",
                color="tab:red")
    bottom.set_ylabel(bottom_label)
    bottom.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _log(message: str) -> None:
    print(f"[cai] {message}", file=sys.stderr, flush=True)
