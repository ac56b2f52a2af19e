"""Integration tests on the embedded SmolLM2-135M-Instruct (built once into the real cache)."""

import json

import pytest

from constitutional import models, wheels
from constitutional.cli import main
from constitutional.records import read_jsonl

pytestmark = pytest.mark.integration


def test_embedded_model_resolves_to_float32_safetensors_and_second_resolve_downloads_nothing(monkeypatch):
    path = models.resolve_model("smollm2-135m-instruct")
    config = json.loads((models.Path(path) / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    assert (models.Path(path) / "model.safetensors").is_file()
    assert not list(models.Path(path).glob("*.bin"))  # safetensors only, nothing to unpickle

    def no_download(*args, **kwargs):
        raise AssertionError("a second resolve must not download")

    monkeypatch.setattr(models, "fetch_wheel_member", no_download)
    monkeypatch.setattr(wheels.subprocess, "run", no_download)
    assert models.resolve_model("smollm2-135m-instruct") == path


def test_critique_revise_on_the_embedded_model(tmp_path):
    code = main(["critique-revise", "--config", "configs/smollm2-cpu.yaml", "--out", str(tmp_path),
                 "--set", "critique_revise.limit=2", "--set", "critique_revise.rounds=1",
                 "--set", "critique_revise.max_new_tokens=48",
                 "--set", "critique_revise.critique_max_new_tokens=32"])
    assert code == 0
    rows = read_jsonl(tmp_path / "critique_revise" / "revisions.jsonl")
    assert len(rows) == 2
    for row in rows:
        assert row["initial_response"] and row["rounds"][0]["critique"]
        assert row["model"] == "smollm2-135m-instruct"
        assert row["messages"][0] == {"role": "user", "content": row["prompt"]}
    summary = json.loads((tmp_path / "critique_revise" / "summary.json").read_text())
    assert summary["rows"] == 2 and summary["tokens_generated_this_run"] > 0


def test_option_tokens_on_the_embedded_tokenizer():
    """' (A)' / ' (B)' after 'The answer is:' differ in exactly one token that reads A / B."""
    from constitutional.backends.hf import HFBackend
    from constitutional.feedback import OPTIONS, mc_prompt

    backend = HFBackend(models.resolve_model("smollm2-135m-instruct"), device="cpu")
    prompt = mc_prompt("Hi?", "Which is kinder?", "Hello!", "Go away.")
    shared, firsts = backend.option_tokens(prompt, OPTIONS)
    tok = backend.tokenizer
    assert [tok.decode([t]).strip() for t in firsts] == ["A", "B"]
    assert tok.decode(shared).strip() == "("
    # the one-pass reading equals the full-continuation score of that token
    (la, lb), = backend.option_logprobs([prompt], OPTIONS)
    full_a, full_b = backend.logprobs([(prompt, OPTIONS[0]), (prompt, OPTIONS[1])])
    assert la == pytest.approx(full_a.logprobs[len(shared)], abs=1e-4)
    assert lb == pytest.approx(full_b.logprobs[len(shared)], abs=1e-4)


def test_rl_ppo_on_the_embedded_model(tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    policy = models.resolve_model("smollm2-135m-instruct")
    pm_dir = tmp_path / "pm" / "model"
    torch.manual_seed(0)
    pm = AutoModelForSequenceClassification.from_pretrained(policy, num_labels=1, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(policy)
    pm.config.pad_token_id = tokenizer.pad_token_id
    pm.save_pretrained(pm_dir)
    tokenizer.save_pretrained(pm_dir)
    (tmp_path / "pm" / "metrics.json").write_text(json.dumps({"reward_mean": 0.5, "reward_std": 2.0}))
    (tmp_path / "manifest.json").write_text('{"stages": {}}')  # a run directory (the CLI refuses any other)

    code = main(["rl", "--config", "configs/smollm2-cpu.yaml", "--out", str(tmp_path),
                 "--set", f"rl.policy={policy}", "--set", "rl.algo=ppo", "--set", "rl.steps=2",
                 "--set", "rl.prompts_per_step=2",
                 "--set", "rl.minibatch_size=2", "--set", "rl.max_new_tokens=16", "--set", "rl.eval_prompts=2",
                 "--set", "rl.save_steps=1"])
    assert code == 0
    summary = json.loads((tmp_path / "rl" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["reward_normalised_with"].endswith("metrics.json")
    assert summary["heldout_reward_before"] != 0 and summary["heldout_reward_after"] != 0
    rows = read_jsonl(tmp_path / "rl" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and all(0 < r["response_length"] <= 16 for r in rows)
    assert (tmp_path / "rl" / "checkpoints" / "step-1" / "model.safetensors").is_file()
    assert (tmp_path / "rl" / "model" / "model.safetensors").is_file()
