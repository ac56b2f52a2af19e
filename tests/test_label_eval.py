"""label-eval's measurements, with a fake feedback model whose failure is known."""

import json

import pytest

from constitutional.config import load_config
from constitutional.stages import label_eval
from tests.test_feedback import LetterBiasedJudge


def test_shipped_eval_sets_are_large_balanced_and_unseen_in_training():
    from constitutional.datasets import load_prompts

    harmless = label_eval.load_eval_pairs("harmless")
    helpful = label_eval.load_eval_pairs("helpful")
    assert len(harmless) >= 150 and len(helpful) >= 50
    for pairs in (harmless, helpful):
        assert abs(sum(r["chosen_is_a"] for r in pairs) - len(pairs) / 2) <= 1  # better answer in A half the time
        longer_chosen = sum(len(r["chosen"]) > len(r["rejected"]) for r in pairs)
        assert 0.35 < longer_chosen / len(pairs) < 0.65  # length does not give the answer away
    train_prompts = {p.prompt for name in ("red-team", "helpful") for p in load_prompts(name, "all")}
    assert not train_prompts & {r["prompt"] for r in harmless + helpful}


def test_letter_bias_shows_as_position_bias_and_both_orders_remove_it(tmp_path):
    config = load_config(None, ["label.fewshot=2"])
    results = label_eval.run(config, tmp_path, ["mc-zeroshot-one", "mc-fewshot-both"], limit=20,
                             backend=LetterBiasedJudge())
    one = results["variants"]["mc-zeroshot-one"]["harmless"]
    both = results["variants"]["mc-fewshot-both"]["harmless"]
    assert one["position_bias"] == 1.0 and one["accuracy"] == 0.5 and one["mean_confidence"] == pytest.approx(0.9)
    assert one["ece"] == pytest.approx(0.4)
    assert both["position_bias"] == 0.0 and both["accuracy"] == 0.5  # every pair a 0.5 tie
    saved = json.loads((tmp_path / "label_eval" / "results.json").read_text())
    assert saved["variants"]["mc-zeroshot-one"]["helpful"]["n"] == 20


def test_summarise():
    s = label_eval.summarise([0.9, 0.3, 0.6, 0.5], [True, True, False, False])
    assert s["accuracy"] == pytest.approx((1 + 0 + 0 + 0.5) / 4)
    assert s["position_bias"] == 0.5
