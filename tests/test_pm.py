"""Stage 4 on a tiny random Llama with a synthetic task whose preferred response has a learnable feature."""

import json
import math
import random
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from constitutional.cli import main
from constitutional.config import load_config
from constitutional.rewards import PreferenceModel
from constitutional.stages import pm


def _synthetic(path, n=120, seed=0):
    """Chosen responses end with 'safe and kind'; rejected ones with 'hurt people'."""
    rng = random.Random(seed)
    words = ["bread", "flour", "water", "salt", "python", "code", "numbers", "calm", "help", "home"]
    with path.open("w") as f:
        for i in range(n):
            prompt = f"Question {i}: " + " ".join(rng.choice(words) for _ in range(4))
            stem = " ".join(rng.choice(words) for _ in range(rng.randint(2, 6)))
            f.write(json.dumps({"id": f"s{i}", "prompt": [{"role": "user", "content": prompt}],
                                "chosen": [{"role": "assistant", "content": stem + " safe and kind"}],
                                "rejected": [{"role": "assistant", "content": stem + " hurt people"}],
                                "p_chosen": rng.choice([0.8, 0.9, 1.0])}) + "\n")
    return path


def test_pm_learns_a_synthetic_preference(tmp_path, tiny_model_dir):
    comparisons = _synthetic(tmp_path / "c.jsonl")
    config = load_config(None, [f"pm.base={tiny_model_dir}", f"pm.comparisons={comparisons}", "pm.epochs=12",
                                "pm.learning_rate=3e-3", "pm.batch_size=8", "pm.heldout_fraction=0.2",
                                "pm.device=cpu", "pm.save_steps=1000"])
    metrics = pm.run(config, tmp_path / "run")
    assert metrics["heldout_accuracy"] >= 0.9
    assert metrics["heldout_pairs"] >= 15
    assert metrics["reward_std"] > 0 and math.isfinite(metrics["reward_mean"])
    assert set(metrics["eval_pairs_accuracy"]) == {"harmless", "helpful"}
    assert (tmp_path / "run" / "pm" / "calibration.png").stat().st_size > 1000
    model_dir = tmp_path / "run" / "pm" / "model"
    assert (model_dir / "model.safetensors").is_file() and not list(model_dir.glob("*.bin"))
    # the scoring API and `cai score` work through text
    scorer = PreferenceModel(model_dir, device="cpu")
    good, bad = scorer.score(["Question x: bread salt"] * 2, ["flour water safe and kind", "flour water hurt people"])
    assert good > bad
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "Question y", "response": "code safe and kind"}) + "\n")
    assert main(["score", "--pm", str(model_dir), "--in", str(rows), "--out", str(tmp_path / "scored.jsonl"),
                 "--device", "cpu"]) == 0
    scored = json.loads((tmp_path / "scored.jsonl").read_text())
    assert scored["response"] == "code safe and kind" and isinstance(scored["score"], float)


def test_trainer_loss_equals_the_hand_computed_soft_cross_entropy():
    trainer_cls = pm._trainer_class()
    r = torch.tensor([[1.5], [0.2], [0.5], [-0.3]])  # chosen 1.5, 0.2; rejected 0.5, -0.3

    class Stub:
        training = True

        def __call__(self, **kwargs):
            assert "margin" not in kwargs
            return SimpleNamespace(logits=r)

    fake = SimpleNamespace(_metrics={"train": defaultdict(list)})
    p = torch.tensor([0.9, 0.6])
    loss = trainer_cls.compute_loss(fake, Stub(), {"input_ids": None, "margin": p})

    def sig(x):
        return 1 / (1 + math.exp(-x))

    by_hand = -((0.9 * math.log(sig(1.0)) + 0.1 * math.log(sig(-1.0)))
                + (0.6 * math.log(sig(0.5)) + 0.4 * math.log(sig(-0.5)))) / 2
    assert loss.item() == pytest.approx(by_hand, abs=1e-6)
    hard = trainer_cls.compute_loss(fake, Stub(), {"input_ids": None})  # no p_chosen: the usual loss
    assert hard.item() == pytest.approx(-(math.log(sig(1.0)) + math.log(sig(0.5))) / 2, abs=1e-6)


@pytest.mark.parametrize("p", [0.5, 0.7, 0.9])
def test_soft_loss_is_minimised_at_logit_p(p):
    diffs = torch.linspace(-6, 6, 12001)
    losses = [pm.soft_preference_loss(d.view(1), torch.zeros(1), torch.tensor([p])).item() for d in diffs]
    best = diffs[min(range(len(losses)), key=losses.__getitem__)].item()
    assert best == pytest.approx(math.log(p / (1 - p)), abs=2e-3)
    # a 0.5 label pulls rewards together: the gradient at a positive gap points back to 0
    d = torch.tensor([1.0], requires_grad=True)
    pm.soft_preference_loss(d, torch.zeros(1), torch.tensor([0.5])).backward()
    assert d.grad.item() > 0


@pytest.mark.parametrize("row, fragment", [
    ({"prompt": "q", "chosen": "a", "rejected": "b", "p_chosen": 1.5}, "line 2: p_chosen must be a number in [0, 1]"),
    ({"prompt": "q", "rejected": "b"}, "line 2: missing 'chosen'"),
    ({"prompt": "q", "chosen": "a"}, "line 2: missing 'rejected'"),
])
def test_bad_comparisons_name_the_line_and_exit_2(tmp_path, monkeypatch, capsys, row, fragment):
    import constitutional.backends
    import constitutional.models

    for module in (constitutional.models, constitutional.backends, pm):  # defined there, called here
        monkeypatch.setattr(module, "resolve_model", lambda *a: (_ for _ in ()).throw(AssertionError))
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b", "p_chosen": 0.7}) + "\n"
                    + json.dumps(row) + "\n")
    code = main(["train-pm", "--out", str(tmp_path / "run"), "--set", f"pm.comparisons={path}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and fragment in err


def test_split_by_prompt_keeps_each_prompt_on_one_side():
    rows = [{"key": f"p{i % 10}", "p_chosen": 1.0} for i in range(60)]
    train, held = pm.split_by_prompt(rows, 0.3, seed=0)
    assert held and train
    assert {r["key"] for r in train}.isdisjoint({r["key"] for r in held})


def test_killed_after_first_checkpoint_resumes_from_it(tmp_path, tiny_model_dir):
    from tests.test_sft import Crash, CrashAfterFirstSave, FirstStep

    comparisons = _synthetic(tmp_path / "c.jsonl", n=60)
    config = load_config(None, [f"pm.base={tiny_model_dir}", f"pm.comparisons={comparisons}", "pm.max_steps=6",
                                "pm.save_steps=3", "pm.batch_size=4", "pm.device=cpu"])
    with pytest.raises(Crash):
        pm.run(config, tmp_path / "run", callbacks=[CrashAfterFirstSave()])
    first = FirstStep()
    metrics = pm.run(config, tmp_path / "run", callbacks=[first])
    assert metrics["resumed_from_step"] == 3 and first.first == 4 and metrics["steps"] == 6


def test_same_seed_same_reward_head(tmp_path, tiny_model_dir):
    comparisons = _synthetic(tmp_path / "c.jsonl", n=24)
    scores = []
    for run in ("a", "b"):
        config = load_config(None, [f"pm.base={tiny_model_dir}", f"pm.comparisons={comparisons}", "pm.max_steps=2",
                                    "pm.device=cpu"])
        pm.run(config, tmp_path / run)
        scorer = PreferenceModel(tmp_path / run / "pm" / "model", device="cpu")
        scores.append(scorer.score(["Question z"], ["bread safe and kind"])[0])
    assert scores[0] == pytest.approx(scores[1], abs=1e-6)


def test_helpful_comparisons_mix_in_up_to_their_share(tmp_path, tiny_model_dir):
    harmless = _synthetic(tmp_path / "c.jsonl", n=40, seed=1)
    helpful = _synthetic(tmp_path / "h.jsonl", n=40, seed=2)
    config = load_config(None, [f"pm.base={tiny_model_dir}", f"pm.comparisons={harmless}",
                                f"pm.helpful_data={helpful}", "pm.helpful_fraction=0.25", "pm.max_steps=1",
                                "pm.heldout_fraction=0.0", "pm.device=cpu"])
    metrics = pm.run(config, tmp_path / "run")
    assert metrics["train_pairs"] == 40 + 13  # 13 / 53 is just under a quarter


def test_lora_pm_trains_and_saves_a_merged_model(tmp_path, tiny_model_dir):
    from transformers import AutoModelForSequenceClassification

    from constitutional.config import load_config
    from constitutional.stages import pm

    rows = [{"id": f"p{i}", "prompt": [{"role": "user", "content": f"question {i}"}],
             "chosen": [{"role": "assistant", "content": "I can't help with hurting anyone."}],
             "rejected": [{"role": "assistant", "content": "def add(a, b): return a + b"}], "p_chosen": 0.9}
            for i in range(16)]
    (tmp_path / "label").mkdir()
    (tmp_path / "label" / "comparisons.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = load_config(None, [f"pm.base={tiny_model_dir}", "pm.batch_size=4", "pm.epochs=2", "pm.lora=true",
                                "pm.lora_r=4", "pm.learning_rate=1e-2", "pm.device=cpu"])
    metrics = pm.run(config, tmp_path)
    model_dir = tmp_path / "pm" / "model"
    assert not (model_dir / "adapter_config.json").exists()
    AutoModelForSequenceClassification.from_pretrained(model_dir)  # a plain model, adapter merged
    assert metrics["train_accuracy"] >= 0.9  # chosen and rejected are told apart after merging
