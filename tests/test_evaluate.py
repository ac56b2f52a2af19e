"""Stage 6 (cai evaluate) on tiny random Llamas: snapshots, effect table, Elo, plots, resume, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from constitutional import backends
from constitutional.cli import main
from constitutional.config import load_config
from constitutional.datasets import PromptRow
from constitutional.errors import CaiError
from constitutional.evaluation.snapshots import resolve_snapshots
from constitutional.records import read_jsonl
from constitutional.stages import evaluate
from tests.conftest import build_tiny_llama


def make_run(root: Path) -> Path:
    """A run directory with an SL-CAI model, one RL checkpoint and a final RL model (different weights)."""
    build_tiny_llama(root / "sft" / "model", seed=1)
    build_tiny_llama(root / "rl" / "checkpoints" / "step-2", seed=2)
    shutil.copytree(root / "sft" / "model", root / "rl" / "checkpoints" / "step-4")  # same weights as rl/model below
    build_tiny_llama(root / "rl" / "model", seed=1)
    (root / "rl" / "summary.json").write_text(json.dumps({"steps": 4}))
    return root


def eval_config(base: Path, *overrides):
    return load_config(None, [f"critique_revise.model={base}", "evaluate.limit=4", "evaluate.max_new_tokens=6",
                              "evaluate.bootstrap_samples=50", "evaluate.batch_size=8", "evaluate.device=cpu",
                              "label.contrast_temperature=0.5", "label.batch_size=8", *overrides])


class CountingFactory:
    """backend_factory for evaluate.run that counts which models it loads."""

    def __init__(self):
        self.loaded: list[str] = []

    def __call__(self, spec):
        self.loaded.append(str(spec))
        return backends.load_backend(spec, batch_size=8, device="cpu")


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_model_dir):
    run_dir = make_run(tmp_path_factory.mktemp("run"))
    factory = CountingFactory()
    summary = evaluate.run(eval_config(tiny_model_dir), run_dir, backend_factory=factory)
    return run_dir, summary, factory


def test_snapshots_follow_training_order_and_skip_the_checkpoint_equal_to_the_final_model(tmp_path, tiny_model_dir):
    run_dir = make_run(tmp_path)
    names = [s.name for s in resolve_snapshots(eval_config(tiny_model_dir), run_dir)]
    assert names == ["base", "sl-cai", "rl-step-2", "rl-cai"]
    steps = {s.name: s.step for s in resolve_snapshots(eval_config(tiny_model_dir), run_dir)}
    assert steps == {"base": None, "sl-cai": 0, "rl-step-2": 2, "rl-cai": 4}
    extra = eval_config(tiny_model_dir, "evaluate.snapshots=[base]", f"evaluate.extra_models.outside={tiny_model_dir}")
    assert [s.name for s in resolve_snapshots(extra, run_dir)] == ["base", "outside"]


def test_effect_table_elo_and_plots_are_written(evaluated):
    run_dir, summary, factory = evaluated
    stage = run_dir / "evaluate"
    effect = json.loads((stage / "effect.json").read_text())
    names = ["base", "sl-cai", "rl-step-2", "rl-cai"]
    assert [(r["snapshot"], r["decoding"]) for r in effect["rows"]] == [(n, d) for n in names
                                                                       for d in ("greedy", "sampled")]
    for row in effect["rows"]:
        for part in ("red_team", "helpful"):
            cell = row[part]
            assert cell["n"] == 4
            rate, low, high = cell["refusal"]
            assert 0 <= low <= rate <= high <= 1
            assert cell["contrast"] is not None and cell["second"] is not None and cell["degenerate"] is not None
            assert ("refusal_vs_base" in cell) == (row["snapshot"] != "base")
    responses = read_jsonl(stage / "responses.jsonl")
    assert len(responses) == 4 * 2 * (4 + 4) and len({r["id"] for r in responses}) == len(responses)
    elo = json.loads((stage / "elo.json").read_text())
    assert elo["snapshots"] == names
    for axis in ("harmlessness", "helpfulness"):
        table = elo["axes"][axis]
        assert table["snapshots"]["base"]["elo"] == 0.0
        assert table["comparisons"] == 4 * 6  # every pair of 4 snapshots on every prompt
        for v in table["snapshots"].values():
            assert v["low"] <= v["elo"] <= v["high"]
    assert set(elo["judge"]["sets"]) == {"harmlessness", "helpfulness"}
    # a random tiny judge is near chance on the shipped pairs: the warning must say so
    assert any("chance" in w for w in elo["judge"]["warnings"]) or all(
        abs(s["accuracy"] - 0.5) > 0.1 for s in elo["judge"]["sets"].values())
    for name in ("elo.png", "rl_steps.png"):
        assert (stage / name).stat().st_size > 1000
    assert summary["plots"] and all(Path(p).is_file() for p in summary["plots"])
    second = json.loads((stage / "second_opinion.json").read_text())
    assert second["examples"] >= 60 and 0 <= second["accuracy_cross_fitted"] <= 1
    # one model per snapshot, plus the judge
    assert len(factory.loaded) == 5


def test_a_rerun_reuses_everything_and_loads_no_model(evaluated, tiny_model_dir):
    run_dir, summary, _ = evaluated
    factory = CountingFactory()
    again = evaluate.run(eval_config(tiny_model_dir), run_dir, backend_factory=factory)
    assert factory.loaded == []
    assert again["effect"] == summary["effect"] and again["elo"] == summary["elo"]


def test_changed_weights_redo_only_that_snapshot(tmp_path, tiny_model_dir):
    run_dir = make_run(tmp_path)
    config = eval_config(tiny_model_dir, "evaluate.sampled=false", "evaluate.elo=false",
                         "evaluate.second_opinion=false")
    evaluate.run(config, run_dir, backend_factory=CountingFactory())
    build_tiny_llama(run_dir / "rl" / "model", seed=5)  # RL was rerun: new weights
    factory = CountingFactory()
    evaluate.run(config, run_dir, backend_factory=factory)
    assert factory.loaded == [str(run_dir / "rl" / "model"), str(tiny_model_dir)]  # rl-cai, then the scorer
    rows = read_jsonl(run_dir / "evaluate" / "responses.jsonl")
    assert len(rows) == 4 * 8 and len({r["id"] for r in rows}) == len(rows)


def test_effect_table_rates_and_paired_differences():
    prompts = {"red-team": [PromptRow(f"r{i}", "x") for i in range(4)],
               "helpful": [PromptRow(f"h{i}", "y") for i in range(4)]}
    refuse, comply = "I'm sorry, but I can't help with that.", "Sure! Step one is to mix the flour and water."
    texts = {("base", "r"): [comply] * 4, ("new", "r"): [refuse] * 3 + [comply],
             ("base", "h"): [comply] * 4, ("new", "h"): [comply] * 3 + [refuse]}
    responses = {}
    for (snap, kind), answers in texts.items():
        for i, text in enumerate(answers):
            rid = f"{snap}|greedy|{kind}{i}"
            responses[rid] = {"id": rid, "snapshot": snap, "decoding": "greedy",
                              "kind": "red-team" if kind == "r" else "helpful", "prompt_id": f"{kind}{i}",
                              "prompt": "p", "response": text, "tokens": 5}
    from constitutional.evaluation.snapshots import Snapshot

    table = evaluate.effect_table([Snapshot("base", "b"), Snapshot("new", "n")], ["greedy"], prompts, responses, {},
                                  None, 200, 0)
    base, new = table["rows"]
    assert base["red_team"]["refusal"][0] == 0.0 and new["red_team"]["refusal"][0] == 0.75
    assert new["red_team"]["refusal_vs_base"][0] == 0.75
    assert new["helpful"]["refusal"][0] == 0.25 and new["helpful"]["refusal_vs_base"][0] == 0.25
    assert "second" not in new["red_team"]  # no second opinion without a threshold


def test_fit_threshold_separates_labels():
    assert evaluate.fit_threshold([-1.0, -0.5, 0.2, 0.4], [False, False, True, True]) == (-0.15, 1.0)
    threshold, accuracy = evaluate.fit_threshold([0.1, 0.9, 0.2, 0.8], [False, True, True, False])
    assert accuracy == 0.75


def test_training_on_the_held_out_split_is_flagged():
    config = load_config(None, ["critique_revise.split=heldout"])
    warnings = evaluate.contamination_warnings(config)
    assert len(warnings) == 1 and "critique_revise" in warnings[0]
    assert evaluate.contamination_warnings(load_config(None)) == []


# ------------------------------------------------------------------ bad input


@pytest.fixture
def no_model_loads(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("no model may load before the inputs are checked")

    monkeypatch.setattr(backends, "load_backend", fail)
    import transformers

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fail)


def test_a_missing_snapshot_directory_is_one_error_line(tmp_path, capsys, no_model_loads, tiny_model_dir):
    code = main(["evaluate", "--out", str(tmp_path), "--set", f"critique_revise.model={tiny_model_dir}",
                 "--set", "evaluate.snapshots=[base, sl-cai]"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("cai: error: evaluate.snapshots: sl-cai") and str(tmp_path / "sft" / "model") in err[0]


def test_an_extra_model_that_does_not_exist_is_one_error_line(tmp_path, capsys, no_model_loads, tiny_model_dir):
    code = main(["evaluate", "--out", str(tmp_path), "--set", f"critique_revise.model={tiny_model_dir}",
                 "--set", f"evaluate.extra_models.other={tmp_path / 'nowhere'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "evaluate.extra_models.other" in err[0]


def test_a_config_naming_no_snapshots_is_one_error_line(tmp_path, capsys, no_model_loads):
    code = main(["evaluate", "--out", str(tmp_path), "--set", "evaluate.snapshots=[]"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "names no snapshots" in err[0]


def test_unknown_snapshot_name_is_a_config_error():
    with pytest.raises(CaiError, match="evaluate.snapshots"):
        load_config(None, ["evaluate.snapshots=[base, final]"])
