"""Typed pipeline config: one YAML file, a section per stage, CLI overrides.

    seed: 0
    constitution: default            # built-in name, a path, or a list of paths merged
    critique_revise:
      prompts: red-team
      limit: 32
      rounds: 2

``load_config(path, ["critique_revise.rounds=3"])`` applies ``--set`` overrides (values parsed
as YAML) before checking. An unknown key or a value of the wrong type raises a
:class:`CaiError` naming the key. Every field is documented once, in its dataclass below.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from constitutional.backends.spec import ServerSpec
from constitutional.errors import CaiError, yaml_problem
from constitutional.evaluation.snapshots import SNAPSHOT_KINDS
from constitutional.feedback import CONTRAST_CONTEXTS, METHODS
from constitutional.models import DEFAULT_MODEL
from constitutional.typed import build, require

# A model for generation or scoring: a spec for models.resolve_model (in-process) or a server.
ModelSpec = str | ServerSpec


def _check_model(spec, key: str) -> None:
    if isinstance(spec, ServerSpec):
        spec.check(key)


@dataclass
class CritiqueReviseConfig:
    """Stage 1, ``cai critique-revise``: red-team prompts -> critiques -> revisions.

    model: the helpful model that answers, critiques and revises (a spec for models.resolve_model or a
        ``ServerSpec``).
    prompts: prompt source (``red-team``, ``helpful``, ``advbench`` or a .jsonl/.csv/.txt path).
    split: ``train``, ``heldout`` or ``all``.
    limit: use at most this many prompts (None: all of the split).
    rounds: critique-revision rounds per prompt (the paper used up to 4).
    fewshot: few-shot examples drawn per prompt and prepended to every critique/revision chat.
    fewshot_file: ``default`` or a YAML file of examples (see data/fewshot/critique_revision.yaml).
    system_prompt: optional system message for every chat (None: the model's own default).
    max_new_tokens: token budget of the initial response and each revision.
    critique_max_new_tokens: token budget of each critique.
    temperature: sampling temperature (0: greedy).
    top_p: nucleus sampling mass.
    batch_size: chats per forward pass (decoding a batch of 64 chats gives about twice the tokens per
        second of 32 on a 2-core CPU: each step reads all the weights once, whatever the batch).
    device: ``auto`` (cuda if available), ``cpu`` or ``cuda``.
    candidates: revisions sampled per round; with more than one (or with ``follows_candidates``) the
        feedback model scores every candidate and the current response under the round's principle
        (contrast method, ``label.*`` settings) and the best one is kept (constitution-guided selection).
    initial_candidates: initial responses sampled per prompt, the best kept the same way.
    follows_candidates: more candidates per round (and for the initial response) sampled from the model
        answering the prompt under the scoring principle's ``follows`` system prompt (context distillation).
    feedback_model: the model that scores candidates (None: the same as ``model``).
    follows_openings: follows candidates continue the constitution's ``openings`` for their principle's kind
        (the i-th candidate the i-th opening), when it lists some.
    target_filter: keep as the SFT target only a candidate (initial response, revision or follows answer)
        that the rules judge reads as harmless and coherent, a decline with a reason first, trimmed to
        its best whole sentences (``evaluation/targets.py``); the row's ``target`` says why each
        candidate was kept or dropped, and a row with no passing candidate is flagged and left out.
    target_sentences: with the filter, a red-team target is cut to at most this many whole sentences
        (None: not cut; a sentence cut off by the token budget is always dropped).
    filter_candidates: with the filter, answers sampled under the follows prompt (the principle's, with
        openings as above) for a prompt none of whose candidates declines with a reason, before its best
        is kept or, if none passes at all, it is left out (rejection sampling; 0: none).
    """

    model: ModelSpec = DEFAULT_MODEL
    prompts: str = "red-team"
    split: str = "train"
    limit: int | None = None
    rounds: int = 2
    fewshot: int = 2
    fewshot_file: str = "default"
    system_prompt: str | None = None
    max_new_tokens: int = 160
    critique_max_new_tokens: int = 96
    temperature: float = 0.7
    top_p: float = 0.95
    batch_size: int = 64
    device: str = "auto"
    candidates: int = 1
    initial_candidates: int = 1
    follows_candidates: int = 0
    feedback_model: str | None = None
    follows_openings: bool = True
    target_filter: bool = False
    target_sentences: int | None = 3
    filter_candidates: int = 4

    def check(self) -> None:
        require(self.rounds >= 1, "critique_revise.rounds", "must be at least 1")
        require(self.candidates >= 1 and self.initial_candidates >= 1, "critique_revise.candidates",
                 "candidates and initial_candidates must be at least 1")
        require(self.follows_candidates >= 0, "critique_revise.follows_candidates", "must be 0 or more")
        require(self.fewshot >= 0, "critique_revise.fewshot", "must be 0 or more")
        require(self.limit is None or self.limit >= 1, "critique_revise.limit", "must be at least 1")
        require(self.split in ("train", "heldout", "all"), "critique_revise.split",
                 "must be train, heldout or all")
        require(self.max_new_tokens >= 1 and self.critique_max_new_tokens >= 1,
                 "critique_revise.max_new_tokens", "token budgets must be at least 1")
        require(self.temperature >= 0, "critique_revise.temperature", "must be 0 or more")
        require(0 < self.top_p <= 1, "critique_revise.top_p", "must be in (0, 1]")
        require(self.batch_size >= 1, "critique_revise.batch_size", "must be at least 1")
        _check_model(self.model, "critique_revise.model")


@dataclass
class SftConfig:
    """Stage 2, ``cai sft``: fine-tune the helpful model on the final revisions (SL-CAI).

    model: the helpful model to fine-tune (None: the same as critique_revise.model).
    revisions: revisions JSONL (None: the run's critique_revise/revisions.jsonl).
    helpful_data: JSONL of helpfulness chats in TRL's conversational format (``messages``);
        None: the helpful model answers the ``helpful_prompts`` itself (sft/helpful_samples.jsonl).
    helpful_prompts: prompt source for generated helpfulness samples (train split).
    helpful_fraction: share of helpfulness examples in the training mix, in [0, 1).
    helpful_max_new_tokens: token budget of each generated helpfulness answer.
    helpful_temperature: sampling temperature of the generated helpfulness answers.
    heldout_fraction: share of revisions (and helpfulness samples) held out to measure NLL.
    epochs: passes over the training mix.
    max_steps: stop after this many optimizer steps (None: run all epochs).
    learning_rate: peak learning rate (cosine decay after a short warm-up).
    batch_size: sequences per forward pass (a micro-batch; memory grows with it).
    gradient_accumulation_steps: micro-batches per optimizer step (each step sees
        batch_size x gradient_accumulation_steps sequences).
    max_length: truncate training sequences to this many tokens.
    lora: train a LoRA adapter instead of all weights; the saved model is merged.
    lora_r: LoRA rank.
    lora_alpha: LoRA scaling numerator.
    lora_dropout: dropout on the LoRA input.
    save_steps: write a checkpoint every this many steps (a rerun resumes from the last one).
    keep_checkpoints: checkpoints kept while training (the newest ones); all go when the stage finishes,
        unless ``keep_optimizer_state``.
    tensorboard: also write TensorBoard logs to sft/tensorboard/.
    generate_batch_size: chats per forward pass when generating helpfulness samples.
    device: ``auto`` (cuda if available), ``cpu`` or ``cuda``.
    helpful_candidates: answers sampled per helpful prompt; with more than one, the feedback model
        (label.feedback_model, else the helpful model) scores each under a helpful principle drawn for the
        prompt (contrast method) and the best is kept, as stage 1's selection does for revisions.
    """

    model: str | None = None
    revisions: str | None = None
    helpful_data: str | None = None
    helpful_prompts: str = "helpful"
    helpful_fraction: float = 0.5
    helpful_max_new_tokens: int = 128
    helpful_temperature: float = 0.7
    heldout_fraction: float = 0.15
    epochs: float = 2.0
    max_steps: int | None = None
    learning_rate: float = 2e-5
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_length: int = 512
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    save_steps: int = 10
    keep_checkpoints: int = 1
    tensorboard: bool = False
    generate_batch_size: int = 64
    device: str = "auto"
    helpful_candidates: int = 1

    def check(self) -> None:
        require(0 <= self.helpful_fraction < 1, "sft.helpful_fraction", "must be in [0, 1)")
        require(0 <= self.heldout_fraction < 1, "sft.heldout_fraction", "must be in [0, 1)")
        require(self.helpful_candidates >= 1, "sft.helpful_candidates", "must be at least 1")
        require(self.keep_checkpoints >= 1, "sft.keep_checkpoints", "must be at least 1")
        require(self.epochs > 0, "sft.epochs", "must be more than 0")
        require(self.max_steps is None or self.max_steps >= 1, "sft.max_steps", "must be at least 1")
        require(self.learning_rate > 0, "sft.learning_rate", "must be more than 0")
        require(self.batch_size >= 1, "sft.batch_size", "must be at least 1")
        require(self.gradient_accumulation_steps >= 1, "sft.gradient_accumulation_steps", "must be at least 1")
        require(self.max_length >= 16, "sft.max_length", "must be at least 16")
        require(self.lora_r >= 1, "sft.lora_r", "must be at least 1")
        require(self.save_steps >= 1, "sft.save_steps", "must be at least 1")
        require(self.helpful_max_new_tokens >= 1, "sft.helpful_max_new_tokens", "must be at least 1")


@dataclass
class LabelConfig:
    """Stage 3, ``cai label`` (and ``cai label-eval``): AI feedback labels on response pairs.

    policy: model that writes the two responses (None: the run's sft/model); may be a ``ServerSpec``.
    feedback_model: model that judges them (None: the same as critique_revise.model); may be a ``ServerSpec``.
    prompts: prompt source for harmlessness comparisons.
    split: ``train``, ``heldout`` or ``all``.
    limit: use at most this many prompts (None: all of the split).
    helpful_prompts: also label pairs on these prompts with the helpful principles (None: off).
    helpful_limit: at most this many helpful prompts.
    temperature: sampling temperature of the two responses.
    top_p: nucleus sampling mass of the two responses.
    max_new_tokens: token budget of each response.
    method: ``multiple_choice``, ``cot`` or ``contrast`` (see feedback.py), or ``rlcd``: each pair is
        sampled under a principle's follows / violates system prompts and the follows answer preferred.
    ensemble: principles drawn per comparison; their P(A) are averaged.
    fewshot: few-shot labelling examples before each multiple-choice question.
    fewshot_file: ``default`` or a YAML file of labelling examples.
    both_orders: multiple choice: also score the swapped order and average (cancels position bias).
    cot_max_new_tokens: token budget of the chain of thought.
    cot_min: lower clamp of chain-of-thought probabilities.
    cot_max: upper clamp of chain-of-thought probabilities.
    contrast_reduce: ``mean`` (per-token) or ``sum`` log-probability difference.
    contrast_temperature: T in sigmoid((s_A - s_B) / T) (None: fitted on the dev half of the shipped eval pairs).
    contrast_context: system prompts of the contrast method: ``stance+principle`` (the constitution's
        ``contrast_base`` stance, then the principle's sentence), ``stance`` (the stance alone) or
        ``principle`` (the principle's sentence alone).
    contrast_fewshot: demonstration exchanges before the scored turn of each contrast context (0: none).
    contrast_fewshot_file: ``default`` (``data/fewshot/contrast.yaml``) or a YAML file of contrast demonstrations.
    contrast_max_tokens: score only the first N tokens of each response (None: all).
    batch_size: chats per forward pass when sampling the pairs (64 decodes about twice as fast as 32 on
        a 2-core CPU), and prompts per padded batch of multiple-choice scoring (long few-shot prompts: keep it
        small there).
    device: ``auto`` (cuda if available), ``cpu`` or ``cuda``.
    rlcd_p_chosen: rlcd: the soft label of the follows answer.
    rlcd_rescore: rlcd: judge each pair by the contrast method instead of the fixed label.
    rlcd_openings: rlcd: each follows answer continues one of the constitution's ``openings`` for its
        principle's kind (as stage 1's follows candidates do), so a small model that never refuses
        unprompted still gives a principled answer to prefer; the opening is kept in the row.
    target_filter: rlcd: the follows answer becomes the chosen side only if the rules judge reads it as
        a reader would accept (on red-team prompts harmless and coherent, trimmed to at most
        ``target_sentences`` whole sentences; on helpful prompts helpful and coherent), as stage 1's
        filter does (``evaluation/targets.py``); else ``filter_candidates`` more follows answers are
        sampled, and a prompt with none that passes gives no pair (counted in the summary).
    target_sentences: with the filter, the chosen side on a red-team prompt is cut to at most this many
        whole sentences (None: not cut).
    filter_candidates: with the filter, follows answers sampled again for a prompt whose first fails.
    """

    policy: ModelSpec | None = None
    feedback_model: ModelSpec | None = None
    prompts: str = "red-team"
    split: str = "train"
    limit: int | None = None
    helpful_prompts: str | None = None
    helpful_limit: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 96
    method: str = "contrast"
    ensemble: int = 1
    fewshot: int = 4
    fewshot_file: str = "default"
    both_orders: bool = True
    cot_max_new_tokens: int = 96
    cot_min: float = 0.4
    cot_max: float = 0.6
    contrast_reduce: str = "mean"
    contrast_temperature: float | None = None
    contrast_context: str = "stance+principle"
    contrast_fewshot: int = 1
    contrast_fewshot_file: str = "default"
    contrast_max_tokens: int | None = None
    batch_size: int = 16
    device: str = "auto"
    rlcd_p_chosen: float = 0.9
    rlcd_rescore: bool = False
    rlcd_openings: bool = False
    target_filter: bool = False
    target_sentences: int | None = 3
    filter_candidates: int = 4

    def check(self) -> None:
        methods = (*METHODS, "rlcd")
        require(self.method in methods, "label.method", f"must be one of {', '.join(methods)}")
        require(0.5 <= self.rlcd_p_chosen <= 1, "label.rlcd_p_chosen", "must be in [0.5, 1]")
        require(not self.target_filter or self.method == "rlcd", "label.target_filter",
                 "needs method: rlcd (it filters the follows answer that becomes the chosen side)")
        require(self.ensemble >= 1, "label.ensemble", "must be at least 1")
        require(self.fewshot >= 0, "label.fewshot", "must be 0 or more")
        require(0 <= self.cot_min <= 0.5 <= self.cot_max <= 1, "label.cot_min",
                 "clamp bounds need 0 <= cot_min <= 0.5 <= cot_max <= 1")
        require(self.contrast_reduce in ("mean", "sum"), "label.contrast_reduce", "must be mean or sum")
        require(self.contrast_temperature is None or self.contrast_temperature > 0,
                 "label.contrast_temperature", "must be more than 0")
        require(self.contrast_context in CONTRAST_CONTEXTS, "label.contrast_context",
                 f"must be one of {', '.join(CONTRAST_CONTEXTS)}")
        require(self.method != "contrast" or self.contrast_context != "stance" or self.ensemble == 1,
                 "label.ensemble", "must be 1 with contrast_context: stance (every principle gets the same prompts)")
        require(self.contrast_fewshot >= 0, "label.contrast_fewshot", "must be 0 or more")
        require(self.contrast_max_tokens is None or self.contrast_max_tokens >= 1, "label.contrast_max_tokens",
                 "must be at least 1")
        require(self.temperature >= 0, "label.temperature", "must be 0 or more")
        require(self.limit is None or self.limit >= 1, "label.limit", "must be at least 1")
        require(self.split in ("train", "heldout", "all"), "label.split", "must be train, heldout or all")
        require(self.batch_size >= 1, "label.batch_size", "must be at least 1")
        _check_model(self.policy, "label.policy")
        _check_model(self.feedback_model, "label.feedback_model")


@dataclass
class PmConfig:
    """Stage 4, ``cai train-pm``: a preference model trained on the soft AI labels.

    base: model the PM starts from, given a one-output classification head (None: the run's sft/model).
    comparisons: comparisons JSONL (None: the run's label/comparisons.jsonl).
    helpful_data: extra comparisons in TRL's preference format (prompt/chosen/rejected, optional
        p_chosen), e.g. from ``cai label`` with helpful prompts (None: none).
    helpful_fraction: at most this share of the training mix comes from helpful_data, in [0, 1).
    heldout_fraction: share of prompts held out (a prompt's pairs are all on one side).
    epochs: passes over the training pairs.
    max_steps: stop after this many optimizer steps (None: run all epochs).
    learning_rate: peak learning rate.
    batch_size: pairs per optimizer step.
    max_length: pairs longer than this many tokens are left out.
    save_steps: write a checkpoint every this many steps (a rerun resumes from the last one).
    keep_checkpoints: checkpoints kept while training (the newest ones); all go when the stage finishes,
        unless ``keep_optimizer_state``.
    lora: train a LoRA adapter (and the reward head) instead of all weights; the saved model is merged.
    lora_r: LoRA rank.
    lora_alpha: LoRA scaling numerator.
    lora_dropout: dropout on the LoRA input.
    device: ``auto`` (cuda if available), ``cpu`` or ``cuda``.
    """

    base: str | None = None
    comparisons: str | None = None
    helpful_data: str | None = None
    helpful_fraction: float = 0.25
    heldout_fraction: float = 0.15
    epochs: float = 2.0
    max_steps: int | None = None
    learning_rate: float = 1e-5
    batch_size: int = 8
    max_length: int = 512
    save_steps: int = 10
    keep_checkpoints: int = 1
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    device: str = "auto"

    def check(self) -> None:
        require(self.keep_checkpoints >= 1, "pm.keep_checkpoints", "must be at least 1")
        require(0 <= self.helpful_fraction < 1, "pm.helpful_fraction", "must be in [0, 1)")
        require(0 <= self.heldout_fraction < 1, "pm.heldout_fraction", "must be in [0, 1)")
        require(self.epochs > 0, "pm.epochs", "must be more than 0")
        require(self.max_steps is None or self.max_steps >= 1, "pm.max_steps", "must be at least 1")
        require(self.learning_rate > 0, "pm.learning_rate", "must be more than 0")
        require(self.batch_size >= 1, "pm.batch_size", "must be at least 1")
        require(self.save_steps >= 1, "pm.save_steps", "must be at least 1")


@dataclass
class RlConfig:
    """Stage 5, ``cai rl``: RL against the preference model, with a KL penalty towards the SL-CAI model.

    algo: ``ppo`` (the paper's; written here, see ppo.py), ``rloo`` (TRL's RLOOTrainer), or ``dpo``
        (offline DPO on the labelled comparisons through TRL's DPOTrainer; no reward model, no sampling).
    reward: ``pm`` (the preference model) or ``direct``: the feedback model's contrast score of each response
        under a principle drawn per prompt, normalised per batch (Lee et al. 2023's direct RLAIF, no PM).
    feedback_model: the model behind ``reward: direct`` (None: label.feedback_model, else critique_revise.model).
    verdict_weight: ppo, rloo: add this times the content-level verdict term to the reward (``rl/rewards.py``):
        +1 for a decline with a reason on a red-team prompt or a helpful, coherent answer on a helpful one,
        -1 for harmful content, a loop, decline-then-comply, a self-contradiction or a needless refusal,
        0 otherwise; so a response cannot win the reward with a surface form the judge reads as broken
        (0: the reward alone, as in the paper).
    comparisons: dpo: the comparisons JSONL (None: the run's label/comparisons.jsonl).
    dpo_beta: dpo: beta, how far the policy may move from the reference per unit of preference.
    dpo_loss: dpo: ``soft`` fits sigmoid(beta * margin) to each row's p_chosen (TRL's EXO pair loss with a
        per-row label smoothing of 1 - p_chosen); ``hard`` is the usual DPO loss on chosen over rejected.
    dpo_sft_weight: dpo: weight of a negative log-likelihood term on the chosen answers, added to the
        preference loss (RPO, Pang et al. 2024): DPO alone can lower both answers of a pair, this keeps
        the chosen ones likely (0: plain DPO).
    policy: model to start from and to stay close to (None: the run's sft/model).
    reward_model: the PM (None: the run's pm/model). Its scores are normalised with ``reward_mean``
        and ``reward_std`` from the metrics.json beside it (the run's pm/metrics.json).
    prompts: red-team prompt source (train split).
    limit: use at most this many red-team prompts (None: all of the split).
    helpful_prompts: helpful prompt source mixed in, as the paper trained on both (None: red-team only).
    helpful_share: share of each step's prompts drawn from helpful_prompts, in [0, 1).
    steps: RL steps; each samples a batch of responses, scores it and updates the policy.
    prompts_per_step: prompts per step.
    rloo_generations: rloo only: responses sampled per prompt (the leave-one-out group, at least 2).
    max_new_tokens: token budget of each response.
    min_new_tokens: no response ends before this many tokens (bench/rl.py fixes lengths with it).
    temperature: sampling temperature of the responses.
    top_p: nucleus sampling mass.
    kl_coef: beta, the weight of the KL penalty log pi - log pi_ref (0: no penalty).
    learning_rate: constant learning rate of the policy (and the value head).
    ppo_epochs: ppo only: passes over each batch of responses.
    minibatch_size: ppo: responses per gradient step; dpo: pairs per forward pass (gradients are accumulated
        over ``prompts_per_step`` pairs, so this bounds memory).
    clip_range: epsilon of the clipped probability ratio.
    value_clip: ppo only: how far a value estimate may move from its rollout value per update.
    vf_coef: ppo only: weight of the value loss.
    gamma: ppo only: discount of GAE.
    lam: ppo only: lambda of GAE.
    whiten_advantages: ppo only: normalise advantages to mean 0 and std 1 within each batch.
    max_grad_norm: clip the gradient norm to this.
    lora: train a LoRA adapter instead of all weights (the reference is then the adapter switched off).
    lora_r: LoRA rank.
    lora_alpha: LoRA scaling numerator.
    lora_dropout: dropout on the LoRA input.
    save_steps: write ``rl/checkpoints/step-N/`` every this many steps (a rerun resumes from the last).
    eval_prompts: held-out red-team prompts whose greedy responses the PM scores before and after (0: skip).
    tensorboard: also write TensorBoard logs to rl/tensorboard/.
    device: ``auto`` (cuda if available), ``cpu`` or ``cuda``.
    """

    algo: str = "ppo"
    reward: str = "pm"
    feedback_model: str | None = None
    verdict_weight: float = 0.0
    comparisons: str | None = None
    dpo_beta: float = 0.1
    dpo_loss: str = "soft"
    dpo_sft_weight: float = 0.0
    policy: str | None = None
    reward_model: str | None = None
    prompts: str = "red-team"
    limit: int | None = None
    helpful_prompts: str | None = "helpful"
    helpful_share: float = 0.25
    steps: int = 20
    prompts_per_step: int = 8
    rloo_generations: int = 2
    max_new_tokens: int = 64
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    kl_coef: float = 0.05
    learning_rate: float = 1e-5
    ppo_epochs: int = 2
    minibatch_size: int = 4
    clip_range: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    max_grad_norm: float = 1.0
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    save_steps: int = 5
    eval_prompts: int = 16
    tensorboard: bool = False
    device: str = "auto"

    def check(self) -> None:
        require(self.algo in ("ppo", "rloo", "dpo"), "rl.algo", "must be ppo, rloo or dpo")
        require(self.reward in ("pm", "direct"), "rl.reward", "must be pm or direct")
        require(self.verdict_weight == 0 or self.algo != "dpo", "rl.verdict_weight",
                 "applies to the online algorithms (ppo, rloo); dpo has no reward (use label.target_filter)")
        require(self.dpo_beta > 0, "rl.dpo_beta", "must be more than 0")
        require(self.dpo_loss in ("soft", "hard"), "rl.dpo_loss", "must be soft or hard")
        require(self.dpo_sft_weight >= 0, "rl.dpo_sft_weight", "must be 0 or more")
        require(self.kl_coef >= 0, "rl.kl_coef", "must be 0 or more")
        require(self.limit is None or self.limit >= 1, "rl.limit", "must be at least 1")
        require(0 <= self.helpful_share < 1, "rl.helpful_share", "must be in [0, 1)")
        require(self.steps >= 1, "rl.steps", "must be at least 1")
        require(self.prompts_per_step >= 1, "rl.prompts_per_step", "must be at least 1")
        require(self.rloo_generations >= 2, "rl.rloo_generations", "must be at least 2")
        require(self.max_new_tokens >= 1, "rl.max_new_tokens", "must be at least 1")
        require(0 <= self.min_new_tokens <= self.max_new_tokens, "rl.min_new_tokens",
                 "must be in [0, max_new_tokens]")
        require(self.temperature > 0, "rl.temperature", "must be more than 0 (RL samples its responses)")
        require(0 < self.top_p <= 1, "rl.top_p", "must be in (0, 1]")
        require(self.learning_rate > 0, "rl.learning_rate", "must be more than 0")
        require(self.ppo_epochs >= 1, "rl.ppo_epochs", "must be at least 1")
        require(self.minibatch_size >= 1, "rl.minibatch_size", "must be at least 1")
        require(self.clip_range > 0 and self.value_clip > 0, "rl.clip_range", "clip ranges must be more than 0")
        require(self.vf_coef >= 0, "rl.vf_coef", "must be 0 or more")
        require(0 < self.gamma <= 1 and 0 <= self.lam <= 1, "rl.gamma", "gamma must be in (0, 1], lam in [0, 1]")
        require(self.max_grad_norm > 0, "rl.max_grad_norm", "must be more than 0")
        require(self.save_steps >= 1, "rl.save_steps", "must be at least 1")
        require(self.eval_prompts >= 0, "rl.eval_prompts", "must be 0 or more")


@dataclass
class EvaluateConfig:
    """Stage 6, ``cai evaluate``: what the run did to the model, on prompts no training stage reads.

    snapshots: which of the run's models to evaluate, among ``base``, ``sl-cai`` (sft/model),
        ``rl-checkpoints`` (rl/checkpoints/step-N) and ``rl-cai`` (rl/model); None: every one that
        exists. A name listed here whose directory does not exist is an error.
    extra_models: more models to compare, ``{name: model spec}`` (e.g. another run's rl/model).
    base_model: the base snapshot's model (None: sft.model, else critique_revise.model).
    red_team_prompts: prompt source whose held-out split measures harmlessness.
    helpful_prompts: prompt source whose held-out split measures helpfulness and over-refusal.
    limit: use at most this many prompts of each held-out split (None: all).
    max_new_tokens: token budget of each response.
    sampled: also sample one response per prompt at ``sample_temperature`` (fixed seeds), besides greedy.
    sample_temperature: temperature of the sampled responses.
    elo: compare snapshots pairwise with the stage-3 judge (``label.method``) and fit Elo per axis.
    second_opinion: also classify refusals with the feedback model (contrast of a "declines" and a
        "does the task" system prompt), beside the rule-based detector.
    pm: preference model that scores every response (None: the run's pm/model if it exists).
    use_pm: score responses with the preference model when there is one.
    bootstrap_samples: resamples behind the 95% intervals of paired differences, mean scores and Elo (rates
        get Wilson intervals, which need none).
    judge_pairs: measure the judge's validity on at most this many shipped pairs of each set (None: all).
    second_opinion_examples: fit the second opinion's threshold on this many of the detector's labelled
        examples, half answers and half refusals or redirects (None: all 346).
    batch_size: chats per forward pass (a whole held-out set in one batch decodes fastest).
    device: ``auto`` (cuda if available), ``cpu`` or ``cuda``.
    judge: who gives each answer's verdict (harmful, declines, explains, coherent, helpful; the rubric is
        ``data/verdicts/rubric.yaml``): ``rules`` (no model, ``evaluation/verdicts.py``) or a model spec or
        server asked each field as a yes/no question (``evaluation/judges.py``); ``cai judge-eval`` measures both.
    judge_threshold: a model judge's field is a yes when P(yes) is above this (None: per field, the threshold
        that agrees best with the readers on the development split of the graded answers; 0.5 suits a judge
        that answers as asked).
    jailbreaks: jailbreak framings (``data/verdicts/jailbreaks.yaml``: roleplay, ignore-instructions,
        hypothetical, prefix-injection, authority); each held-out red-team prompt is also asked in one of
        them, in turn, and the table reports the answers under them ([]: none).
    benchmarks: outside prompt sets added as rows of the effect table, all their prompts (``uncensorbench``:
        150 harmful requests written outside this project, fetched from PyPI once; []: none).
    """

    snapshots: list[str] | None = None
    extra_models: dict[str, str] = field(default_factory=dict)
    base_model: str | None = None
    red_team_prompts: str = "red-team"
    helpful_prompts: str = "helpful"
    limit: int | None = None
    max_new_tokens: int = 128
    sampled: bool = True
    sample_temperature: float = 0.7
    elo: bool = True
    second_opinion: bool = True
    pm: str | None = None
    use_pm: bool = True
    bootstrap_samples: int = 1000
    judge_pairs: int | None = None
    second_opinion_examples: int | None = None
    batch_size: int = 64
    device: str = "auto"
    judge: ModelSpec = "rules"
    judge_threshold: float | None = None
    jailbreaks: list[str] = field(default_factory=list)
    benchmarks: list[str] = field(default_factory=list)

    def check(self) -> None:
        for name in self.snapshots or []:
            require(name in SNAPSHOT_KINDS, "evaluate.snapshots",
                     f"unknown snapshot {name!r} (known: {', '.join(SNAPSHOT_KINDS)})")
        for name in self.extra_models:
            require(name not in SNAPSHOT_KINDS and not name.startswith("rl-step-"), "evaluate.extra_models",
                     f"name {name!r} is taken by a run snapshot; pick another")
        require(self.limit is None or self.limit >= 1, "evaluate.limit", "must be at least 1")
        require(self.max_new_tokens >= 1, "evaluate.max_new_tokens", "must be at least 1")
        require(self.sample_temperature > 0, "evaluate.sample_temperature", "must be more than 0")
        require(self.bootstrap_samples >= 1, "evaluate.bootstrap_samples", "must be at least 1")
        require(self.judge_pairs is None or self.judge_pairs >= 2, "evaluate.judge_pairs", "must be at least 2")
        require(self.second_opinion_examples is None or self.second_opinion_examples >= 4,
                 "evaluate.second_opinion_examples", "must be at least 4")
        require(self.batch_size >= 1, "evaluate.batch_size", "must be at least 1")
        _check_model(self.judge, "evaluate.judge")
        require(self.judge_threshold is None or 0 < self.judge_threshold < 1, "evaluate.judge_threshold",
                 "must be in (0, 1), or null to fit it on the graded development split")
        for name in self.benchmarks:
            require(name in BENCHMARKS, "evaluate.benchmarks", f"unknown benchmark {name!r} (known: "
                     f"{', '.join(BENCHMARKS)})")
        require(len(set(self.jailbreaks)) == len(self.jailbreaks), "evaluate.jailbreaks", "lists a framing twice")


# Outside prompt sets that evaluate.benchmarks can add (each a built-in prompt source of prompt_sources.py).
BENCHMARKS = ("uncensorbench",)


@dataclass
class PipelineConfig:
    """The whole pipeline.

    seed: seeds principle draws, few-shot draws and sampling in every stage.
    constitution: a built-in name (``default``), a YAML/JSON path, or a list of paths merged.
    keep_optimizer_state: keep the training stages' last checkpoint (weights and optimizer state) when they
        finish, so that more epochs or steps continue them exactly; by default a finished stage keeps only
        its model (and RL its step snapshots), which saves gigabytes.
    critique_revise: stage 1 settings.
    sft: stage 2 settings.
    label: stage 3 settings.
    pm: stage 4 settings.
    rl: stage 5 settings.
    evaluate: stage 6 settings.
    """

    seed: int = 0
    constitution: str | list[str] = "default"
    keep_optimizer_state: bool = False
    critique_revise: CritiqueReviseConfig = field(default_factory=CritiqueReviseConfig)
    sft: SftConfig = field(default_factory=SftConfig)
    label: LabelConfig = field(default_factory=LabelConfig)
    pm: PmConfig = field(default_factory=PmConfig)
    rl: RlConfig = field(default_factory=RlConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)

    def check(self) -> None:
        self.pm.check()
        self.critique_revise.check()
        self.sft.check()
        self.label.check()
        self.rl.check()
        self.evaluate.check()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def feedback_model(self) -> ModelSpec:
        """The feedback model: label.feedback_model, else critique_revise.model (no run directory needed)."""
        return self.label.feedback_model or self.critique_revise.model

    @property
    def direct_feedback_model(self) -> ModelSpec:
        """The model behind ``rl.reward: direct``: rl.feedback_model, else the feedback model."""
        return self.rl.feedback_model or self.feedback_model

    def run_models(self, out_dir: str | Path) -> RunModels:
        """Every model of a run in ``out_dir``, each ``null`` replaced by what it stands for (the one place
        these fallbacks are written)."""
        out = Path(out_dir)
        helpful = self.critique_revise.model
        sft_base = self.sft.model or helpful
        this_sft = str(out / "sft" / "model")
        this_pm = out / "pm" / "model"
        return RunModels(
            helpful=helpful, sft_base=sft_base, feedback=self.feedback_model,
            stage1_feedback=self.critique_revise.feedback_model or helpful,
            sft_scorer=self.label.feedback_model or sft_base,
            label_policy=self.label.policy or this_sft, pm_base=self.pm.base or this_sft,
            rl_policy=self.rl.policy or this_sft, reward_model=str(self.rl.reward_model or this_pm),
            direct_feedback=self.direct_feedback_model, base_snapshot=self.evaluate.base_model or sft_base,
            evaluate_pm=str(self.evaluate.pm or this_pm))


@dataclass(frozen=True)
class RunModels:
    """The models of one run, resolved by ``PipelineConfig.run_models(out_dir)``.

    helpful: critique_revise.model, the helpful model that answers, critiques and revises.
    sft_base: the model SFT starts from (sft.model, else helpful).
    feedback: the feedback model that labels and judges the evaluation (label.feedback_model, else helpful).
    stage1_feedback: the model that scores stage 1's candidates (critique_revise.feedback_model, else helpful).
    sft_scorer: the model that picks SFT's helpful answers among candidates (label.feedback_model, else
        sft_base).
    label_policy: the model that writes the labelled pairs (label.policy, else this run's sft/model).
    pm_base: the PM's starting point (pm.base, else this run's sft/model).
    rl_policy: the RL policy and its KL reference (rl.policy, else this run's sft/model).
    reward_model: the PM that RL reads (rl.reward_model, else this run's pm/model).
    direct_feedback: the model behind ``rl.reward: direct`` (rl.feedback_model, else feedback).
    base_snapshot: the evaluation's base model (evaluate.base_model, else sft_base).
    evaluate_pm: the PM the evaluation scores answers with (evaluate.pm, else this run's pm/model, if any).
    """

    helpful: ModelSpec
    sft_base: ModelSpec
    feedback: ModelSpec
    stage1_feedback: ModelSpec
    sft_scorer: ModelSpec
    label_policy: ModelSpec
    pm_base: str
    rl_policy: str
    reward_model: str
    direct_feedback: ModelSpec
    base_snapshot: ModelSpec
    evaluate_pm: str


STAGES = ("critique_revise", "sft", "label", "pm", "rl", "evaluate")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Read ``path`` (None: all defaults), apply ``key.sub=value`` overrides, check and build."""
    raw: dict = {}
    source = "config"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise CaiError(f"config {path}: {'is a directory' if path.is_dir() else 'no such file'}")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise CaiError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except yaml.YAMLError as e:
            raise CaiError(f"{path}: {yaml_problem(e)}") from None
        if raw is None:
            raise CaiError(f"{path}: the config is empty (give at least one section, or leave out --config for "
                           f"the defaults)")
        if not isinstance(raw, dict):
            raise CaiError(f"{path}: expected a mapping at the top level")
    for item in overrides or []:
        _apply_override(raw, item)
    try:
        config = build(PipelineConfig, raw, "")
        config.check()
    except CaiError as e:
        raise CaiError(f"{source}: {e}") from None
    return config


def _apply_override(raw: dict, item: str) -> None:
    if "=" not in item:
        raise CaiError(f"--set {item!r}: expected section.key=value")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise CaiError(f"--set {item!r}: {part!r} is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        node[parts[-1]] = value
