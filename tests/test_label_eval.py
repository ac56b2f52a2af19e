"""label-eval: the shipped pairs and their dev/test split, and its measurements with fake and tiny feedback models."""

import json
import math

import pytest

from constitutional import feedback, judge_pairs
from constitutional.cli import main
from constitutional.config import load_config
from constitutional.constitution import load_constitution, sample_principles
from constitutional.errors import CaiError
from constitutional.records import iter_jsonl
from constitutional.stages import label_eval
from tests.test_feedback import LetterBiasedJudge

STYLES = {"long-harmful", "short-harmful", "partial-compliance", "disclaimer-wrapped", "lecturing-refusal",
          "polite-harmful"}


def _raw(file: str) -> list[dict]:
    return list(iter_jsonl(judge_pairs.eval_path(file)))


class TruthContrastFake:
    """Knows every eval pair's better answer: -0.5 a token for it under a follows system prompt (in any
    contrast context) and for the worse answer under a violates one, -1.0 otherwise. Records the heads it saw."""

    name = "truth"

    def __init__(self):
        rows = [r for files in judge_pairs.EVAL_SETS.values() for f in files for r in _raw(f)]
        self.better = {r["chosen"] for r in rows}
        self.follows = {feedback.contrast_system_prompts(p, context)[0]
                        for p in load_constitution("default").feedback_principles
                        for context in feedback.CONTRAST_CONTEXTS}
        self.heads: list[str] = []

    def render(self, chat, add_generation_prompt=True):
        text = "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in chat)
        return text + ("<assistant>" if add_generation_prompt and chat[-1]["role"] != "assistant" else "")

    def logprobs(self, pairs):
        from constitutional.backends.base import TokenLogprobs

        out = []
        for head, cont in pairs:
            self.heads.append(head)
            response = cont.removesuffix("</assistant>")
            follows = any(f"<system>{f}</system>" in head for f in self.follows)
            words = cont.split()
            out.append(TokenLogprobs(words, [-0.5 if follows == (response in self.better) else -1.0] * len(words)))
        return out


# ------------------------------------------------------------------ the shipped pairs


def test_shipped_eval_sets_are_large_balanced_and_unseen_in_training():
    from constitutional.prompt_sources import load_prompts

    harmless = judge_pairs.load_eval_pairs("harmless")
    helpful = judge_pairs.load_eval_pairs("helpful")
    assert len(harmless) >= 165 + 100 and len(helpful) >= 50
    for pairs in (harmless, helpful):
        assert abs(sum(r["chosen_is_a"] for r in pairs) - len(pairs) / 2) <= 1  # better answer in A half the time
        longer_chosen = sum(len(r["chosen"]) > len(r["rejected"]) for r in pairs)
        assert 0.35 < longer_chosen / len(pairs) < 0.65  # length does not give the answer away
    train_prompts = {p.prompt for name in ("red-team", "helpful") for p in load_prompts(name, "all")}
    assert not train_prompts & {r["prompt"] for r in harmless + helpful}


def test_split_is_the_documented_rule_disjoint_and_balanced():
    for name, files in judge_pairs.EVAL_SETS.items():
        rows = _raw(files[0])
        assert [r["split"] for r in rows] == judge_pairs.split_rule(rows)  # the field is what the rule writes
        dev = judge_pairs.load_eval_pairs(name, half="dev")
        test = [r for r in judge_pairs.load_eval_pairs(name, half="test") if r["source"] == files[0].split(".")[0]]
        assert not {r["id"] for r in dev} & {r["id"] for r in test}
        assert {r["id"] for r in dev} | {r["id"] for r in test} == {r["id"] for r in rows}
        assert abs(len(dev) - len(test)) <= 1
        for half in (dev, test):
            for position in (True, False):
                for longer in ("chosen", "rejected"):
                    group = [r for r in rows if r["id"] in {h["id"] for h in half}
                             and (rows.index(r) % 2 == 0) == position and r["longer"] == longer]
                    everywhere = [r for i, r in enumerate(rows) if (i % 2 == 0) == position and r["longer"] == longer]
                    assert abs(2 * len(group) - len(everywhere)) <= 1  # every (position, longer) group halved
            assert {r["chosen_is_a"] for r in half} == {True, False}
    assert judge_pairs.split_rule(_raw("helpful_pairs.jsonl")) == judge_pairs.split_rule(_raw("helpful_pairs.jsonl"))
    with pytest.raises(CaiError, match="eval half 'train'"):
        judge_pairs.load_eval_pairs("harmless", half="train")


def test_new_style_pairs_are_test_only_new_prompts_with_a_schema():
    import yaml

    from constitutional.prompt_sources import load_prompts

    rows = _raw("harmless_styles.jsonl")
    assert len(rows) >= 100
    keys = {"id", "prompt", "chosen", "rejected", "category", "longer", "style", "split"}
    old = _raw("harmless_pairs.jsonl") + _raw("helpful_pairs.jsonl")
    categories = {r["category"] for r in _raw("harmless_pairs.jsonl")}
    for r in rows:
        assert set(r) == keys and all(isinstance(r[k], str) and r[k].strip() for k in keys)
        assert r["split"] == "test" and r["style"] in STYLES and r["category"] in categories
        assert r["longer"] == ("chosen" if len(r["chosen"]) > len(r["rejected"]) else "rejected")
        assert r["chosen"] != r["rejected"]
    ids = [r["id"] for r in rows + old]
    assert len(ids) == len(set(ids))
    prompts = [r["prompt"] for r in rows]
    assert len(prompts) == len(set(prompts))
    builtin = {p.prompt for name in ("red-team", "helpful") for p in load_prompts(name, "all")}
    shots = set()
    for file in ("labels.yaml", "critique_revision.yaml", "contrast.yaml"):
        path = judge_pairs.eval_path("x").parents[1] / "fewshot" / file
        shots |= {e["prompt"] for e in yaml.safe_load(path.read_text())["examples"]}
    assert not set(prompts) & (builtin | shots | {r["prompt"] for r in old})
    assert {r["style"] for r in rows} == STYLES
    assert 0.4 < sum(r["longer"] == "chosen" for r in rows) / len(rows) < 0.6
    pairs = judge_pairs.load_eval_pairs("harmless", half="test")
    new = [r for r in pairs if r["source"] == "harmless_styles"]
    assert len(new) == len(rows) and abs(sum(r["chosen_is_a"] for r in new) - len(new) / 2) <= 1
    assert not [r for r in judge_pairs.load_eval_pairs("harmless", half="dev") if r["source"] == "harmless_styles"]


# ------------------------------------------------------------------ running


def test_letter_bias_shows_as_position_bias_and_both_orders_remove_it(tmp_path):
    config = load_config(None, ["label.fewshot=2"])
    results = label_eval.run(config, tmp_path, ["mc-zeroshot-one", "mc-fewshot-both"], limit=20,
                             backend=LetterBiasedJudge(), half="all")
    one = results["variants"]["mc-zeroshot-one"]["harmless"]
    both = results["variants"]["mc-fewshot-both"]["harmless"]
    assert one["position_bias"] == 1.0 and one["accuracy"] == 0.5 and one["mean_confidence"] == pytest.approx(0.9)
    assert one["ece"] == pytest.approx(0.4)
    assert both["position_bias"] == 0.0 and both["accuracy"] == 0.5  # every pair a 0.5 tie
    saved = json.loads((tmp_path / "label_eval" / "results-all.json").read_text())
    assert saved["variants"]["mc-zeroshot-one"]["helpful"]["n"] == 20 and saved["half"] == "all"


@pytest.mark.parametrize("half", ["dev", "test"])
def test_half_selects_its_pairs_and_the_temperature_comes_from_dev(tmp_path, half):
    fake = TruthContrastFake()
    results = label_eval.run(load_config(None, []), tmp_path, ["contrast-mean", "mc-zeroshot-one"],
                             backend=fake, half=half)
    entry = results["variants"]["contrast-mean"]
    for name in judge_pairs.EVAL_SETS:
        want = judge_pairs.load_eval_pairs(name, half=half)
        assert set(entry[name]["p_a"]) == {r["id"] for r in want} == set(
            results["variants"]["mc-zeroshot-one"][name]["p_a"])
        assert entry[name]["n"] == len(want) == results["pairs"][name]
        assert entry[name]["accuracy"] == 1.0  # the fake knows the answers
    assert results["half"] == half
    if half == "test":  # dev scored too, for T; the parts of the harmless set are reported apart
        assert set(entry["harmless"]["parts"]) == {"harmless_pairs", "harmless_styles"}
        dev_prompts = {r["prompt"] for r in judge_pairs.load_eval_pairs("harmless", half="dev")}
        assert any(p in h for h in fake.heads for p in dev_prompts)
    else:  # the test half is never read
        test_prompts = {r["prompt"] for r in judge_pairs.load_eval_pairs("harmless", half="test")}
        assert not any(f"<user>{p}</user>" in h for h in fake.heads for p in test_prompts)
    assert entry["temperature_dev"] == pytest.approx(0.01, rel=0.1)  # separable dev diffs: T at its bound
    assert entry["tokens_per_comparison"] > 0
    assert f"on the {half} half" in label_eval.table(results)


def test_label_fits_its_temperature_on_the_dev_half_only():
    fake = TruthContrastFake()
    constitution = load_constitution("default")
    pools = {k: [p for p in constitution.feedback_principles if p.kind == k] for k in ("harmless", "helpful")}
    t = judge_pairs.fit_contrast_temperature(fake, pools, 0, load_config(None, []).label)
    assert t == pytest.approx(0.01, rel=0.1)
    seen = {h.split("<user>")[-1].split("</user>")[0] for h in fake.heads}
    dev = {r["prompt"] for name in judge_pairs.EVAL_SETS for r in judge_pairs.load_eval_pairs(name, half="dev")}
    assert seen == dev


def test_ensemble_is_the_mean_of_single_principle_p_a_at_the_dev_temperature(tmp_path, tiny_backend):
    config = load_config(None, [])
    results = label_eval.run(config, tmp_path, ["contrast-ens3"], limit=2, backend=tiny_backend, half="test")
    entry = results["variants"]["contrast-ens3"]
    pools = {k: [p for p in load_constitution("default").feedback_principles if p.kind == k]
             for k in judge_pairs.EVAL_SETS}
    # T by hand: member 0's s_better - s_worse on the dev pairs of both sets
    signed = []
    for name in judge_pairs.EVAL_SETS:
        rows = judge_pairs.load_eval_pairs(name, 2, "dev")
        items = [(r["prompt"], sample_principles(pools[name], 1, config.seed, r["id"])[0], r["chosen"], r["rejected"])
                 for r in rows]
        signed += [j.scores["s_a"] - j.scores["s_b"] for j in feedback.judge_contrast(tiny_backend, items, 1.0)]
    t = feedback.fit_temperature(signed)
    assert entry["temperature_dev"] == pytest.approx(t, rel=1e-3)
    for name in judge_pairs.EVAL_SETS:
        rows = judge_pairs.load_eval_pairs(name, 2, "test")
        draws = [sample_principles(pools[name], 3, config.seed, r["id"]) for r in rows]
        members = [feedback.judge_contrast(tiny_backend, [(r["prompt"], d[k], r["a"], r["b"])
                                                          for r, d in zip(rows, draws, strict=True)], t)
                   for k in range(3)]
        for i, r in enumerate(rows):
            assert entry[name]["p_a"][r["id"]] == pytest.approx(sum(m[i].p_a for m in members) / 3, abs=1e-4)


def test_configured_variant_follows_the_label_section(tmp_path):
    config = load_config(None, ["label.contrast_context=principle", "label.contrast_fewshot=1",
                                "label.contrast_max_tokens=8", "label.ensemble=2"])
    v = label_eval.configured_variant(config.label)
    assert (v.context, v.demos, v.max_tokens, v.ensemble) == ("principle", 1, 8, 2)
    fake = TruthContrastFake()
    label_eval.run(config, tmp_path, ["configured"], limit=2, backend=fake)
    demo = feedback.load_contrast_fewshot()["harmless"][0]
    assert any(f"<user>{demo.prompt}</user><assistant>{demo.follows}</assistant>" in h for h in fake.heads)


def test_bad_settings_are_one_clear_error(tmp_path):
    with pytest.raises(CaiError, match="label.contrast_context"):
        load_config(None, ["label.contrast_context=vibes"])
    with pytest.raises(CaiError, match="label.contrast_max_tokens"):
        load_config(None, ["label.contrast_max_tokens=0"])
    with pytest.raises(CaiError, match="'label.ensemble': must be 1 with contrast_context: stance"):
        load_config(None, ["label.contrast_context=stance", "label.ensemble=3"])
    with pytest.raises(CaiError, match="unknown label-eval variant 'nope'"):
        label_eval.run(load_config(None, []), tmp_path, ["nope"], backend=TruthContrastFake())
    with pytest.raises(CaiError, match="demonstrations asked"):
        label_eval.run(load_config(None, ["label.contrast_fewshot=99"]), tmp_path, ["configured"],
                       backend=TruthContrastFake())
    with pytest.raises(CaiError, match="--half 'train'"):
        label_eval.run_halves(load_config(None, []), tmp_path, halves="dev,train", backend=TruthContrastFake())
    assert main(["label-eval", "--out", str(tmp_path), "--half", "train"]) == 2


def test_summarise_and_ensemble_maths():
    s = judge_pairs.summarise([0.9, 0.3, 0.6, 0.5], [True, True, False, False])
    assert s["accuracy"] == pytest.approx((1 + 0 + 0 + 0.5) / 4)
    assert s["position_bias"] == 0.5
    p = judge_pairs.ensemble_p_a([[2.0, -1.0], [0.0, 3.0]], 2.0)
    assert p[0] == pytest.approx((1 / (1 + math.exp(-1)) + 0.5) / 2)
    assert p[1] == pytest.approx((1 / (1 + math.exp(0.5)) + 1 / (1 + math.exp(-1.5))) / 2)


def test_uncensorbench_is_an_outside_test_set_with_the_refusal_preferred(tmp_path):
    """Pairs written outside the project: the refusal is the better answer; test half only, reported apart."""
    from constitutional.prompt_sources import uncensorbench_references

    pairs = judge_pairs.load_outside_pairs("uncensorbench")
    refs = uncensorbench_references()
    assert len(pairs) == 150 and all(p["split"] == "test" for p in pairs)
    assert [p["chosen_is_a"] for p in pairs[:4]] == [True, False, True, False]
    assert all(p["chosen"] == r.refusal and p["rejected"] == r.compliant for p, r in zip(pairs, refs, strict=True))
    fake = TruthContrastFake()
    fake.better |= {r.refusal for r in refs}
    results = label_eval.run(load_config(None, []), tmp_path, ["contrast-mean"], backend=fake, half="test")
    assert results["pairs"]["uncensorbench"] == 150
    assert results["variants"]["contrast-mean"]["uncensorbench"]["accuracy"] == 1.0
    assert "uncensorbench (outside) acc" in label_eval.table(results)
    dev = label_eval.run(load_config(None, []), tmp_path, ["contrast-mean"], backend=fake, half="dev")
    assert "uncensorbench" not in dev["pairs"]
