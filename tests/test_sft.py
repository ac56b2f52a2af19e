"""Stage 2 on a tiny random Llama; stage 1's rows come from the scripted fake backend."""

import json

import pytest
import torch
from transformers import TrainerCallback

from constitutional.cli import main
from constitutional.config import load_config
from constitutional.stages import critique_revise, sft
from tests.fakes import ScriptedBackend


class Crash(RuntimeError):
    pass


class CrashAfterFirstSave(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        raise Crash(f"killed after saving step {state.global_step}")


class FirstStep(TrainerCallback):
    def __init__(self):
        self.first = None

    def on_step_end(self, args, state, control, **kwargs):
        if self.first is None:
            self.first = state.global_step


def _run_dir(tmp_path, tiny_model_dir, *overrides, limit=24):
    config = load_config(None, [
        f"critique_revise.model={tiny_model_dir}", f"critique_revise.limit={limit}",
        "sft.learning_rate=2e-3", "sft.batch_size=4", "sft.helpful_max_new_tokens=8", "sft.device=cpu",
        "sft.save_steps=4", *overrides])
    critique_revise.run(config, tmp_path, backend=ScriptedBackend())
    return config


def test_sft_lowers_heldout_revision_nll(tmp_path, tiny_model_dir):
    config = _run_dir(tmp_path, tiny_model_dir, "sft.max_steps=12")
    metrics = sft.run(config, tmp_path)
    assert metrics["nll_after"]["revisions"] < metrics["nll_before"]["revisions"] - 0.1
    assert metrics["steps"] == 12 and len(metrics["loss_curve"]) == 12
    assert metrics["train_examples"]["helpful"] == metrics["train_examples"]["revisions"]  # fraction 0.5
    saved = json.loads((tmp_path / "sft" / "metrics.json").read_text())
    assert saved["nll_after"] == metrics["nll_after"]
    model_dir = tmp_path / "sft" / "model"
    assert (model_dir / "model.safetensors").is_file() and not list(model_dir.glob("*.bin"))
    helpful = [json.loads(line) for line in (tmp_path / "sft" / "helpful_samples.jsonl").open()]
    assert helpful and all(r["messages"][-1]["role"] == "assistant" for r in helpful)


def test_merged_lora_model_matches_the_adapter_model(tmp_path, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = _run_dir(tmp_path, tiny_model_dir, "sft.lora=true", "sft.max_steps=6", "sft.learning_rate=5e-2",
                      "sft.lora_r=4", "sft.lora_dropout=0.0")
    sft.run(config, tmp_path)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with_adapter = PeftModel.from_pretrained(base, tmp_path / "sft" / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "sft" / "model", dtype=torch.float32).eval()
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = torch.randint(3, merged.config.vocab_size, (2, 20))
    with torch.no_grad():
        a, m, p = with_adapter(ids).logits, merged(ids).logits, plain(ids).logits
    assert torch.allclose(a, m, atol=1e-4)
    assert (m - p).abs().max() > 1e-3  # the adapter did change the model


def test_killed_after_first_checkpoint_resumes_from_it(tmp_path, tiny_model_dir):
    config = _run_dir(tmp_path, tiny_model_dir, "sft.max_steps=8")
    with pytest.raises(Crash):
        sft.run(config, tmp_path, callbacks=[CrashAfterFirstSave()])
    assert (tmp_path / "sft" / "checkpoints" / "checkpoint-4").is_dir()
    first = FirstStep()
    metrics = sft.run(config, tmp_path, callbacks=[first])
    assert metrics["resumed_from_step"] == 4
    assert first.first == 5  # the rerun's first step is step 5, not step 1
    assert metrics["steps"] == 8
    assert [p["step"] for p in metrics["loss_curve"]] == list(range(1, 9))  # no step twice


@pytest.mark.parametrize("content, fragment", [
    (None, "no such file"),
    ("", "empty"),
    ('{"id": "a", "prompt": "x"}\n', "line 1: needs 'messages'"),
    ('{"id": "a", "messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]}\n',
     "line 1: the last message must be a non-empty assistant turn"),
])
def test_bad_revisions_fail_before_any_model_is_loaded(tmp_path, monkeypatch, capsys, content, fragment):
    import constitutional.backends
    import constitutional.models

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    for module in (constitutional.models, constitutional.backends, sft):  # defined there, called here
        monkeypatch.setattr(module, "resolve_model", no_model)
    path = tmp_path / "revisions.jsonl"
    if content is not None:
        path.write_text(content)
    code = main(["sft", "--out", str(tmp_path / "run"), "--set", f"sft.revisions={path}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and fragment in err and "revisions.jsonl" in err


def test_pure_helpers():
    assert sft.helpful_count(10, 0.5) == 10
    rows = [{"id": f"r{i}", "messages": []} for i in range(40)]
    train, held = sft.split_rows(rows, 0.2, seed=0)
    assert {r["id"] for r in train}.isdisjoint({r["id"] for r in held}) and len(train) + len(held) == 40
    assert held == sft.split_rows(rows, 0.2, seed=0)[1]
    assert sft.split_rows(rows[:2], 0.01, 0)[1] == [rows[1]]  # at least one held out
    assert sft.to_prompt_completion([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]) == {
        "prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant", "content": "a"}]}


def test_helpful_samples_keep_the_candidate_the_helpful_principle_prefers(tmp_path):
    import itertools

    from constitutional.config import load_config
    from constitutional.constitution import load_constitution
    from tests.fakes import ScriptedBackend
    from tests.test_critique_revise import FollowsScorer

    answers = itertools.cycle(["Not sure, look it up.", "SAFE: here is a clear, complete answer."])
    backend = ScriptedBackend(lambda chat: next(answers))
    cfg = load_config(None, ["sft.helpful_candidates=2", "sft.generate_batch_size=3"]).sft
    helpful = [p for p in load_constitution("default").feedback_principles if p.kind == "helpful"]
    rows = sft._helpful_samples(cfg, 0, backend, tmp_path, 5, FollowsScorer(), helpful)
    assert len(rows) == 7  # 5 to train on, plus the held-out share
    assert all(r["messages"][1]["content"].startswith("SAFE") for r in rows)
    stored = [json.loads(line) for line in (tmp_path / "helpful_samples.jsonl").open()]
    for row in stored:
        sel = row["selection"]
        assert sel["principle_id"] in {p.id for p in helpful}
        assert [c["score"] for c in sel["candidates"]] == [-0.5, 0.5]
    assert sum(len(chats) for chats, _ in backend.calls) == 14  # two answers sampled per prompt
