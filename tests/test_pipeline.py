"""cai run end to end on the tiny random Llama: every stage, stage-level resume, --force, disk policy."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from constitutional import pipeline
from constitutional.cli import main
from constitutional.config import load_config
from constitutional.pipeline import _decide, packaged_data_digest, plan, stages_needed


def tiny_overrides(model: Path) -> list[str]:
    settings = {
        "critique_revise.model": model, "critique_revise.limit": 4, "critique_revise.rounds": 1,
        "critique_revise.fewshot": 1, "critique_revise.max_new_tokens": 8, "critique_revise.critique_max_new_tokens": 6,
        "critique_revise.batch_size": 4, "critique_revise.device": "cpu",
        "sft.epochs": 1, "sft.batch_size": 4, "sft.helpful_max_new_tokens": 8, "sft.save_steps": 1,
        "sft.device": "cpu", "sft.max_length": 128,
        "label.limit": 4, "label.max_new_tokens": 8, "label.batch_size": 4, "label.contrast_temperature": 0.5,
        "label.device": "cpu",
        "pm.epochs": 1, "pm.batch_size": 4, "pm.save_steps": 1, "pm.device": "cpu", "pm.max_length": 128,
        "rl.steps": 2, "rl.prompts_per_step": 2, "rl.minibatch_size": 2, "rl.max_new_tokens": 6, "rl.save_steps": 1,
        "rl.eval_prompts": 2, "rl.device": "cpu",
        "evaluate.limit": 3, "evaluate.max_new_tokens": 6, "evaluate.sampled": False, "evaluate.judge_pairs": 6,
        "evaluate.bootstrap_samples": 50, "evaluate.batch_size": 8, "evaluate.device": "cpu",
        "label.method": "contrast", "rl.algo": "ppo",  # the paper's pipeline (the demo config uses rlcd + dpo)
        "label.target_filter": False, "rl.dpo_sft_weight": 0.0,  # rlcd's and dpo's settings in the demo config
        "label.helpful_prompts": "null",
    }
    return [x for k, v in settings.items() for x in ("--set", f"{k}={v}")]


@pytest.fixture
def few_labelled_examples(monkeypatch):
    from constitutional.evaluation import detectors

    examples = detectors.load_refusal_examples()[:30]
    monkeypatch.setattr(detectors, "load_refusal_examples", lambda: examples)


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def started(err: str) -> list[str]:
    """Stages that ran (not skipped), from the run's progress lines."""
    return re.findall(r"\[\d+/\d+\] (\w+): started \(", err)


def test_full_run_then_skip_then_a_changed_label_setting_then_force(tmp_path, tiny_model_dir, capsys,
                                                                     few_labelled_examples):
    out = tmp_path / "run"
    args = ["run", "configs/smollm2-cpu.yaml", "--out", str(out), *tiny_overrides(tiny_model_dir)]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert started(captured.err) == ["critique_revise", "sft", "label", "pm", "rl", "evaluate"]
    assert "report: " in captured.out and (out / "report.html").is_file()
    # library noise stays behind --verbose: no Trainer log dicts, no weight-loading bars
    assert "{'loss'" not in captured.out + captured.err and "Loading weights" not in captured.err
    first = manifest(out)["stages"]
    assert all(first[s]["status"] == "done" for s in first)
    for path in ("sft/model/model.safetensors", "pm/model/model.safetensors", "rl/model/model.safetensors",
                 "evaluate/effect.json", "evaluate/elo.json"):
        assert (out / path).is_file(), path
    # no finished stage keeps optimizer state or trainer checkpoints by default
    assert not list(out.rglob("optimizer*")) and not list(out.rglob("checkpoint-*"))
    assert not (out / "sft" / "checkpoints").exists() and not (out / "pm" / "checkpoints").exists()

    # a second run skips every stage
    assert main(args) == 0
    err = capsys.readouterr().err
    assert started(err) == [] and err.count("unchanged since the last run, skipped") == 6
    assert {s: e["key"] for s, e in manifest(out)["stages"].items()} == {s: e["key"] for s, e in first.items()}

    # a dry run says what a changed label setting would do, and writes nothing
    assert main([*args, "--set", "label.temperature=0.9", "--dry-run"]) == 0
    said = capsys.readouterr().out
    assert "critique_revise: would skip" in said and "sft: would skip" in said
    assert "label: would restart: settings changed" in said and "pm: would restart: inputs changed" in said
    assert manifest(out)["stages"] == json.loads(json.dumps(manifest(out)["stages"]))
    assert {s: e["key"] for s, e in manifest(out)["stages"].items()} == {s: e["key"] for s, e in first.items()}

    # a changed label setting reruns label and everything after it, not stages 1-2
    sft_weights = (out / "sft" / "model" / "model.safetensors").stat().st_mtime_ns
    assert main([*args, "--set", "label.temperature=0.9"]) == 0
    err = capsys.readouterr().err
    assert started(err) == ["label", "pm", "rl", "evaluate"]
    assert "label: settings changed" in err
    assert (out / "sft" / "model" / "model.safetensors").stat().st_mtime_ns == sft_weights

    # --force sft reruns SFT and everything after it
    assert main([*args, "--set", "label.temperature=0.9", "--force", "sft"]) == 0
    assert started(capsys.readouterr().err) == ["sft", "label", "pm", "rl", "evaluate"]


def test_keys_chain_and_free_settings_do_not_change_what_a_stage_must_redo(tiny_model_dir):
    base = load_config(None, [f"critique_revise.model={tiny_model_dir}"])
    a = plan(base)
    more = plan(load_config(None, [f"critique_revise.model={tiny_model_dir}", "critique_revise.limit=99"]))
    assert more["critique_revise"]["key"] != a["critique_revise"]["key"]  # not skipped ...
    assert more["critique_revise"]["strict"] == a["critique_revise"]["strict"]  # ... but resumed in place
    assert more["sft"]["upstream"] != a["sft"]["upstream"]  # and everything after it is redone
    rounds = plan(load_config(None, [f"critique_revise.model={tiny_model_dir}", "critique_revise.rounds=3"]))
    assert rounds["critique_revise"]["strict"] != a["critique_revise"]["strict"]
    label = plan(load_config(None, [f"critique_revise.model={tiny_model_dir}", "label.temperature=0.5"]))
    assert [s for s in a if label[s]["key"] != a[s]["key"]] == ["label", "pm", "rl", "evaluate"]


def test_a_changed_input_file_reruns_the_stage_that_reads_it(tmp_path, tiny_model_dir):
    prompts = tmp_path / "p.txt"
    prompts.write_text("first prompt\nsecond prompt\n")
    overrides = [f"critique_revise.prompts={prompts}"]
    before = plan(load_config(None, overrides))
    prompts.write_text("first prompt\nanother prompt\n")
    after = plan(load_config(None, overrides))
    assert after["critique_revise"]["key"] != before["critique_revise"]["key"]
    assert after["critique_revise"]["strict"] != before["critique_revise"]["strict"]


def test_a_changed_builtin_constitution_reruns_every_stage(tmp_path, monkeypatch):
    """A config names the built-in constitution only as "default": its packaged file still counts."""
    import shutil
    from importlib import resources

    data = tmp_path / "data"
    shutil.copytree(Path(str(resources.files("constitutional") / "data")), data)
    monkeypatch.setattr(pipeline, "packaged_data_digest", lambda only=None: packaged_data_digest(data, only))
    config = load_config(None, ["constitution=default"])
    before = plan(config)
    assert plan(config) == before
    default = data / "constitutions" / "default.yaml"
    default.write_text(default.read_text().replace("I won't help with this, because", "I won't do this, because"))
    after = plan(config)
    assert all(after[s]["key"] != before[s]["key"] for s in before)
    assert after["critique_revise"]["upstream"] != before["critique_revise"]["upstream"]  # restarted, not resumed


def test_a_finished_stage_whose_directory_was_removed_runs_again(tiny_model_dir):
    k = plan(load_config(None, [f"critique_revise.model={tiny_model_dir}"]))["rl"]
    done = {"status": "done", **k}
    assert _decide("rl", done, k, set(), True, exists=True) == "skip"
    assert _decide("rl", done, k, set(), True, exists=False) == "run"


def test_dpo_runs_skip_the_preference_model():
    assert "pm" not in stages_needed(load_config(None, ["rl.algo=dpo"]))
    assert "pm" not in stages_needed(load_config(None, ["rl.reward=direct"]))
    assert "pm" in stages_needed(load_config(None))
    # the PM's settings then do not reach later stages
    a, b = plan(load_config(None, ["rl.algo=dpo"])), plan(load_config(None, ["rl.algo=dpo", "pm.epochs=5"]))
    assert a["rl"]["key"] == b["rl"]["key"]


def test_pm_killed_after_its_first_checkpoint_resumes_and_then_drops_it(tmp_path, tiny_model_dir):
    """Kill after the first checkpoint: the rerun resumes from it; once done, no checkpoint is left
    (SFT's test of the same is in test_sft.py, PPO's and RLOO's in test_rl.py)."""
    from transformers import TrainerCallback

    from constitutional.stages import pm

    class Kill(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            raise KeyboardInterrupt

    rows = [{"id": f"p{i}", "prompt": [{"role": "user", "content": f"question {i}"}],
             "chosen": [{"role": "assistant", "content": "I can't help with hurting anyone."}],
             "rejected": [{"role": "assistant", "content": "def add(a, b): return a + b"}], "p_chosen": 0.8}
            for i in range(16)]
    (tmp_path / "label").mkdir()
    (tmp_path / "label" / "comparisons.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = load_config(None, [f"pm.base={tiny_model_dir}", "pm.batch_size=4", "pm.save_steps=1", "pm.epochs=1",
                                "pm.device=cpu"])
    with pytest.raises(KeyboardInterrupt):
        pm.run(config, tmp_path, callbacks=[Kill()])
    assert [p.name for p in (tmp_path / "pm" / "checkpoints").glob("checkpoint-*")] == ["checkpoint-1"]
    metrics = pm.run(config, tmp_path)
    assert metrics["resumed_from_step"] == 1 and metrics["steps"] > 1
    assert not (tmp_path / "pm" / "checkpoints").exists()
    assert (tmp_path / "pm" / "model" / "model.safetensors").is_file()


def test_the_demo_recipe_runs_without_a_pm(tmp_path, tiny_model_dir, capsys, few_labelled_examples):
    """configs/smollm2-cpu.yaml as shipped (selection with openings, rlcd pairs, dpo): no stage 4."""
    out = tmp_path / "run"
    overrides = tiny_overrides(tiny_model_dir)
    recipe = {"label.method", "rl.algo", "label.helpful_prompts"}
    kept = [x for i in range(0, len(overrides), 2) for x in overrides[i:i + 2]
            if overrides[i + 1].split("=")[0] not in recipe]
    assert main(["run", "configs/smollm2-cpu.yaml", "--out", str(out), *kept, "--set", "label.helpful_limit=2"]) == 0
    err = capsys.readouterr().err
    assert started(err) == ["critique_revise", "sft", "label", "rl", "evaluate"]
    # DPO's reference pass (TRL's own tqdm bar) stays behind --verbose; our line says what it does
    assert "Computing reference log probs" not in err and "reference log-probabilities of" in err
    assert not (out / "pm").exists() and (out / "rl" / "model" / "model.safetensors").is_file()
    rows = [json.loads(line) for line in (out / "label" / "comparisons.jsonl").read_text().splitlines()]
    assert {r["method"] for r in rows} == {"rlcd"} and any(r["opening"] for r in rows)
    revisions = [json.loads(line) for line in (out / "critique_revise" / "revisions.jsonl").read_text().splitlines()]
    assert all(any(c["source"] == "follows" for c in r["rounds"][0]["candidates"]) for r in revisions)



def test_a_changed_rubric_or_graded_set_reruns_only_the_evaluation(tmp_path, monkeypatch):
    """Data only the evaluation reads (data/verdicts/) must not retrain the model."""
    import shutil
    from importlib import resources

    data = tmp_path / "data"
    shutil.copytree(Path(str(resources.files("constitutional") / "data")), data)
    monkeypatch.setattr(pipeline, "packaged_data_digest", lambda only=None: packaged_data_digest(data, only))
    config = load_config(None)
    before = plan(config)
    rubric = data / "verdicts" / "rubric.yaml"
    rubric.write_text(rubric.read_text() + "\n# a reader's note\n")
    after = plan(config)
    changed = [s for s in before if after[s]["key"] != before[s]["key"]]
    assert changed == ["evaluate"]
