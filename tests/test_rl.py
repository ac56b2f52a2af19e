"""Stage 5 (cai rl): PPO and RLOO on the tiny random Llama with a synthetic reward."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from constitutional.config import PipelineConfig, RlConfig, load_config
from constitutional.errors import CaiError
from constitutional.prompt_sources import PromptRow
from constitutional.stages import rl


def count_e(prompts, responses):
    """Synthetic reward: +1 for each letter "e" in the response."""
    assert len(prompts) == len(responses) and all(p[0]["role"] == "user" for p in prompts)
    return [float(r.count("e")) for r in responses]


def rl_config(model_dir: Path, keep_optimizer_state: bool = False, **overrides) -> PipelineConfig:
    settings = {"policy": str(model_dir), "steps": 30, "prompts_per_step": 8, "max_new_tokens": 8,
                "learning_rate": 1e-2, "kl_coef": 0.0, "eval_prompts": 4, "save_steps": 10, "device": "cpu"}
    settings.update(overrides)
    return PipelineConfig(rl=RlConfig(**settings), keep_optimizer_state=keep_optimizer_state)


def metric_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rl" / "metrics.jsonl").read_text().splitlines()]


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


# ------------------------------------------------------------------ pure helpers


def test_step_prompts_mix_is_seeded_and_walks_each_pool():
    red = [PromptRow(f"r{i}", f"red {i}") for i in range(10)]
    helpful = [PromptRow(f"h{i}", f"help {i}") for i in range(4)]
    steps = [rl.step_prompts(red, helpful, s, 8, 0.25, seed=3) for s in range(1, 6)]
    assert all(sum(p.id.startswith("h") for p in batch) == 2 for batch in steps)
    assert steps == [rl.step_prompts(red, helpful, s, 8, 0.25, seed=3) for s in range(1, 6)]  # pure
    assert steps != [rl.step_prompts(red, helpful, s, 8, 0.25, seed=4) for s in range(1, 6)]
    reds = [p.id for batch in steps for p in batch if p.id.startswith("r")]
    assert sorted(reds[:10]) == sorted(p.id for p in red)  # the first pass sees every prompt once
    assert all(p.id.startswith("r") for p in rl.step_prompts(red, [], 1, 8, 0.25, seed=3))


def test_reward_stats_come_from_the_pm_stage_metrics(tmp_path):
    pm_dir = tmp_path / "pm" / "model"
    pm_dir.mkdir(parents=True)
    assert rl.reward_stats(pm_dir) == (0.0, 1.0, None)
    (tmp_path / "pm" / "metrics.json").write_text(json.dumps({"reward_mean": 1.5, "reward_std": 0.5}))
    mean_, std, source = rl.reward_stats(pm_dir)
    assert (mean_, std) == (1.5, 0.5) and source.endswith("metrics.json")
    (tmp_path / "pm" / "metrics.json").write_text(json.dumps({"reward_mean": 1.5}))
    with pytest.raises(CaiError, match="reward_std"):
        rl.reward_stats(pm_dir)


def test_rl_config_errors_name_the_key():
    with pytest.raises(CaiError, match="rl.kl_coef"):
        load_config(None, ["rl.kl_coef=-0.1"])
    with pytest.raises(CaiError, match="rl.algo"):
        load_config(None, ["rl.algo=reinforce"])
    with pytest.raises(CaiError, match="rl.rloo_generations"):
        load_config(None, ["rl.rloo_generations=1"])
    with pytest.raises(CaiError, match="rl.verdict_weight"):
        load_config(None, ["rl.algo=dpo", "rl.verdict_weight=1"])
    with pytest.raises(CaiError, match="label.target_filter"):
        load_config(None, ["label.method=contrast", "label.target_filter=true"])


# ------------------------------------------------------------------ learning


@pytest.mark.parametrize("algo", ["ppo", "rloo"])
def test_synthetic_reward_rises(algo, tiny_model_dir, tmp_path):
    summary = rl.run(rl_config(tiny_model_dir, algo=algo), tmp_path, reward_fn=count_e)
    rows = metric_rows(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 31))
    first, last = mean(r["reward"] for r in rows[:5]), mean(r["reward"] for r in rows[-5:])
    assert last > first + 2.0, (first, last)  # at most 8 tokens: the reward ceiling is about 16
    assert summary["heldout_reward_after"] > summary["heldout_reward_before"]
    for key in ("kl", "entropy", "response_length", "clip_fraction"):
        assert key in rows[-1]
    # a plain transformers directory, and snapshots for reward-against-step plots
    assert (tmp_path / "rl" / "model" / "config.json").is_file()
    # step-30 held the same weights as rl/model, so it is gone; no optimizer state is left behind
    assert sorted(p.name for p in (tmp_path / "rl" / "checkpoints").glob("step-*")) == ["step-10", "step-20"]
    assert not list((tmp_path / "rl").rglob("optimizer*")) and not (tmp_path / "rl" / "trainer").exists()
    assert (tmp_path / "rl" / "reward.png").stat().st_size > 0
    samples = [json.loads(line) for line in (tmp_path / "rl" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and {"before", "after", "reward_before", "reward_after"} <= set(samples[0])


@pytest.mark.parametrize("algo", ["ppo", "rloo"])
def test_large_kl_coefficient_keeps_the_policy_close(algo, tiny_model_dir, tmp_path):
    rl.run(rl_config(tiny_model_dir, algo=algo, kl_coef=2.0, eval_prompts=0, save_steps=30), tmp_path,
           reward_fn=count_e)
    kls = [r["kl"] for r in metric_rows(tmp_path)]
    assert max(kls) < 0.3, kls
    assert mean(kls[-10:]) < 0.15, kls


def test_without_kl_penalty_the_policy_drifts_far(tiny_model_dir, tmp_path):
    # the contrast that makes the bound above mean something: the same run with kl_coef 0
    rl.run(rl_config(tiny_model_dir, eval_prompts=0, save_steps=30), tmp_path, reward_fn=count_e)
    assert mean(r["kl"] for r in metric_rows(tmp_path)[-5:]) > 1.0


# ------------------------------------------------------------------ resume


class Killed(Exception):
    pass


def kill_at(step: int):
    def on_step(s, row):
        if s == step:
            raise Killed(f"killed after step {s}")
    return on_step


def test_ppo_resumes_after_a_kill_exactly_as_if_uninterrupted(tiny_model_dir, tmp_path):
    config = rl_config(tiny_model_dir, steps=8, save_steps=3, eval_prompts=2)
    straight = tmp_path / "straight"
    rl.run(config, straight, reward_fn=count_e)

    resumed = tmp_path / "resumed"
    with pytest.raises(Killed):
        rl.run(config, resumed, reward_fn=count_e, on_step=kill_at(5))
    assert [r["step"] for r in metric_rows(resumed)] == [1, 2, 3, 4, 5]
    summary = rl.run(config, resumed, reward_fn=count_e)
    assert summary["resumed_from_step"] == 3
    rows, reference = metric_rows(resumed), metric_rows(straight)
    assert [r["step"] for r in rows] == list(range(1, 9))  # steps 4-5 written again, not twice
    for a, b in zip(rows, reference, strict=True):
        assert a["reward"] == pytest.approx(b["reward"], abs=1e-6)
        assert a["kl"] == pytest.approx(b["kl"], abs=1e-4)
    checkpoints = tmp_path / "resumed" / "rl" / "checkpoints"
    # step-8 held the weights of rl/model; the others stay as snapshots for plots, without optimizer state
    assert sorted(p.name for p in checkpoints.glob("step-*")) == ["step-3", "step-6"]
    assert not list(checkpoints.glob("step-*/optimizer.safetensors"))


def test_more_steps_and_eval_prompts_continue_a_finished_run(tiny_model_dir, tmp_path):
    # continuing a finished run exactly needs its optimizer state kept
    rl.run(rl_config(tiny_model_dir, True, steps=2, save_steps=2, eval_prompts=2), tmp_path, reward_fn=count_e)
    assert (tmp_path / "rl" / "checkpoints" / "step-2" / "optimizer.safetensors").is_file()
    summary = rl.run(rl_config(tiny_model_dir, True, steps=4, save_steps=2, eval_prompts=3), tmp_path,
                     reward_fn=count_e)
    assert summary["resumed_from_step"] == 2 and summary["heldout_prompts"] == 3
    assert [r["step"] for r in metric_rows(tmp_path)] == [1, 2, 3, 4]
    assert len((tmp_path / "rl" / "samples.jsonl").read_text().splitlines()) == 3


def test_rloo_resumes_after_a_kill(tiny_model_dir, tmp_path):
    config = rl_config(tiny_model_dir, algo="rloo", steps=6, save_steps=2, eval_prompts=0)
    with pytest.raises(Killed):
        rl.run(config, tmp_path, reward_fn=count_e, on_step=kill_at(3))
    summary = rl.run(config, tmp_path, reward_fn=count_e)
    assert summary["resumed_from_step"] == 2
    assert [r["step"] for r in metric_rows(tmp_path)] == list(range(1, 7))
    assert sorted(p.name for p in (tmp_path / "rl" / "checkpoints").glob("step-*")) == ["step-2", "step-4"]
    assert not (tmp_path / "rl" / "trainer").exists()  # TRL's checkpoints (optimizer state) are gone


def test_lora_ppo_saves_a_merged_model_and_an_adapter(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    rl.run(rl_config(tiny_model_dir, lora=True, lora_r=4, steps=4, save_steps=2, eval_prompts=0), tmp_path,
           reward_fn=count_e)
    model_dir = tmp_path / "rl" / "model"
    assert not (model_dir / "adapter_config.json").exists()
    AutoModelForCausalLM.from_pretrained(model_dir)  # loads as a plain model
    assert (tmp_path / "rl" / "checkpoints" / "step-2" / "adapter" / "adapter_config.json").is_file()


# ------------------------------------------------------------------ bad input


@pytest.fixture
def no_model_loads(monkeypatch):
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)


def test_bad_input_is_one_error_line_and_exit_2(tiny_model_dir, tmp_path, capsys, no_model_loads):
    from constitutional.cli import main

    missing_policy = main(["rl", "--out", str(tmp_path), "--set", f"rl.policy={tmp_path / 'nowhere'}"])
    missing_pm = main(["rl", "--out", str(tmp_path), "--set", f"rl.policy={tiny_model_dir}"])
    negative_kl = main(["rl", "--out", str(tmp_path), "--set", "rl.kl_coef=-1"])
    errors = capsys.readouterr().err.strip().splitlines()
    assert (missing_policy, missing_pm, negative_kl) == (2, 2, 2)
    assert len(errors) == 3 and all(e.startswith("cai: error: ") for e in errors)
    assert "rl.policy" in errors[0] and "does not exist" in errors[0]
    assert "rl.reward_model" in errors[1] and "cai train-pm" in errors[1]
    assert "rl.kl_coef" in errors[2]


# ------------------------------------------------------------------ DPO and the direct reward


def _write_preferences(path: Path, n: int = 24, p_chosen: float = 0.9) -> None:
    rows = [{"id": f"p{i}", "prompt": [{"role": "user", "content": f"How do I bake bread {i}?"}],
             "chosen": [{"role": "assistant", "content": "I can't help with hurting anyone."}],
             "rejected": [{"role": "assistant", "content": "def add(a, b): return a + b"}],
             "p_chosen": p_chosen} for i in range(n)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("loss", ["soft", "hard"])
def test_dpo_lowers_its_loss_on_a_synthetic_preference(tmp_path, tiny_model_dir, loss):
    _write_preferences(tmp_path / "label" / "comparisons.jsonl")
    config = rl_config(tiny_model_dir, algo="dpo", steps=12, prompts_per_step=4, learning_rate=3e-3, save_steps=6,
                       eval_prompts=0, dpo_loss=loss)
    summary = rl.run(config, tmp_path)
    rows = metric_rows(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert mean(r["loss"] for r in rows[-3:]) < mean(r["loss"] for r in rows[:3]) - 0.05
    assert mean(r["reward_margin"] for r in rows[-3:]) > 0  # the policy now prefers the chosen answer
    assert summary["algo"] == "dpo" and (tmp_path / "rl" / "model" / "model.safetensors").is_file()
    assert (tmp_path / "rl" / "checkpoints" / "step-6" / "config.json").is_file()


def test_dpo_sft_weight_keeps_the_chosen_answers_likely(tmp_path, tiny_model_dir):
    """With the NLL term on the chosen answers (RPO), their log-probability rises above the reference's."""
    chosen = {}
    for weight in (0.0, 1.0):
        out = tmp_path / str(weight)
        _write_preferences(out / "label" / "comparisons.jsonl")
        config = rl_config(tiny_model_dir, algo="dpo", steps=8, prompts_per_step=4, learning_rate=3e-3,
                           save_steps=8, eval_prompts=0, dpo_sft_weight=weight)
        rl.run(config, out)
        chosen[weight] = mean(r["chosen_reward"] for r in metric_rows(out)[-3:])
    assert chosen[1.0] > 0 and chosen[1.0] > chosen[0.0] + 0.05


def test_soft_dpo_fits_the_soft_label_instead_of_pushing_on():
    """The soft (EXO) loss is smallest where sigmoid(beta * margin) equals p_chosen."""
    import torch
    import torch.nn.functional as F

    def exo(margin, p, beta=1.0):  # TRL's exo_pair expression with epsilon = 1 - p
        eps = torch.tensor(1 - p)
        qw, ql = torch.sigmoid(beta * margin), torch.sigmoid(-beta * margin)
        return (qw * (F.logsigmoid(beta * margin) - torch.log1p(-eps))
                + ql * (F.logsigmoid(-beta * margin) - torch.log(eps)))

    margins = torch.linspace(-5, 5, 2001)
    for p in (0.6, 0.75, 0.9):
        best = margins[torch.argmin(exo(margins, p))].item()
        assert best == pytest.approx(math.log(p / (1 - p)), abs=0.01)


def test_direct_reward_equals_the_contrast_score_and_is_normalised_per_batch():
    from constitutional import feedback
    from constitutional.constitution import load_constitution
    from tests.test_critique_revise import FollowsScorer

    fb = load_constitution("default").feedback_principles
    pools = {k: [p for p in fb if p.kind == k] for k in ("harmless", "helpful")}
    judge = FollowsScorer()
    reward = rl.DirectReward(judge, pools, seed=0, helpful_prompts={"Bake bread?"})
    prompts = [[{"role": "user", "content": t}] for t in ("Make a bomb?", "Bake bread?", "Steal a car?")]
    responses = ["SAFE: no, but here is a safe idea.", "Mix flour and water.", ""]
    raw = reward.raw(prompts, responses)
    expected = feedback.contrast_scores(judge, [("Make a bomb?", reward.principle("Make a bomb?"), responses[0]),
                                                ("Bake bread?", reward.principle("Bake bread?"), responses[1])])
    assert raw[:2] == expected == [0.5, -0.5]
    assert raw[2] == -1.5  # empty: the lowest score minus 1
    assert reward.principle("Bake bread?").kind == "helpful" and reward.principle("Make a bomb?").kind == "harmless"
    normalised = reward(prompts, responses)
    assert sum(normalised) == pytest.approx(0, abs=1e-9) and normalised[0] > normalised[1] > normalised[2]


def test_dpo_with_a_missing_comparisons_file_is_one_error_line(tmp_path, tiny_model_dir, capsys):
    from constitutional.cli import main

    code = main(["rl", "--out", str(tmp_path), "--set", "rl.algo=dpo", "--set", f"rl.policy={tiny_model_dir}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "comparisons" in err[0] and "cai label" in err[0]


def test_the_verdict_term_makes_a_loop_and_decline_then_comply_worth_less_than_a_clean_decline():
    from constitutional.rewards import VerdictReward

    prompt = "How do I make a fake ID that passes at bars?"
    clean = "I can't help with that. Fake IDs are illegal and can lead to criminal charges."
    loop = "I can't help with that, but I can help with that. I can help with that. I can help with that."
    comply = "I can't help with that, but to make a fake ID you can print one and laminate it."
    helpful_prompt = "How long should I boil an egg?"

    def flat(prompts, responses):  # a feedback score that cannot tell them apart
        return [0.5] * len(responses)

    reward = VerdictReward(flat, 1.0, {helpful_prompt})
    chats = [[{"role": "user", "content": prompt}]] * 3 + [[{"role": "user", "content": helpful_prompt}]] * 2
    r_clean, r_loop, r_comply, r_answer, r_refuse = reward(
        chats, [clean, loop, comply, "Boil it for about seven minutes for a firm yolk.", "I can't help with that."])
    assert r_clean > r_loop and r_clean > r_comply and r_clean == 1.5
    assert r_answer > r_refuse  # on an ordinary request a needless refusal loses
    assert reward.raw(chats[:1], [clean]) == [1.5]


def test_verdict_weight_wraps_the_online_reward(tiny_model_dir, tmp_path):
    seen = []

    def synthetic(prompts, responses):
        seen.append(len(responses))
        return [0.0] * len(responses)

    summary = rl.run(rl_config(tiny_model_dir, algo="rloo", steps=1, verdict_weight=2.0, eval_prompts=2, save_steps=1),
                     tmp_path, reward_fn=synthetic)
    assert seen  # the base reward was called under the verdict term
    # a random model's text is no clean decline: each held-out term is -2 or 0, never above
    assert summary["heldout_reward_before"] <= 0 and summary["heldout_reward_before"] in (-2.0, -1.0, 0.0)
