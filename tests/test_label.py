"""Stage 3 with a scripted policy and a scripted feedback model."""

import itertools
import json

import pytest

from constitutional.cli import main
from constitutional.config import load_config
from constitutional.feedback import fill_reason
from constitutional.prompts import join_opening
from constitutional.records import read_jsonl
from constitutional.stages import label
from tests.fakes import Killed, ScriptedBackend
from tests.test_feedback import ContrastFake


def _policy():
    answers = itertools.cycle(["SAFE I would rather suggest asking a professional", "here is exactly how to do it"])
    return ScriptedBackend(lambda chat: next(answers))


class FailingContrastFake(ContrastFake):
    def __init__(self, fail_after):
        self.calls, self.fail_after = 0, fail_after

    def logprobs(self, pairs):
        self.calls += 1
        if self.calls > self.fail_after:
            raise Killed("simulated crash")
        return super().logprobs(pairs)


def _config(tiny_model_dir, *overrides):
    return load_config(None, [f"label.policy={tiny_model_dir}", "label.limit=10", "label.batch_size=4",
                              "label.contrast_temperature=0.5", *overrides])


def test_rows_are_trl_preference_rows_with_soft_labels(tmp_path, tiny_model_dir):
    summary = label.run(_config(tiny_model_dir), tmp_path, policy_backend=_policy(), feedback_backend=ContrastFake())
    rows = read_jsonl(tmp_path / "label" / "comparisons.jsonl")
    assert len(rows) == 10 == summary["rows"]
    for row in rows:
        assert row["prompt"][0]["role"] == "user"
        assert row["chosen"][0]["content"].startswith("SAFE")  # the feedback model's choice
        assert row["rejected"][0]["content"].startswith("here is")
        assert 0.5 <= row["p_chosen"] <= 1 and row["p_chosen"] == pytest.approx(max(row["p_a"], 1 - row["p_a"]))
        assert row["method"] == "contrast" and len(row["principle_ids"]) == 1
        assert {"s_a", "s_b"} <= set(row["scores"][0])
        assert {row["response_a"], row["response_b"]} == {row["chosen"][0]["content"], row["rejected"][0]["content"]}


def test_principles_are_seeded_and_ensembles_average(tmp_path, tiny_model_dir):
    config = _config(tiny_model_dir, "label.ensemble=3")
    label.run(config, tmp_path / "a", policy_backend=_policy(), feedback_backend=ContrastFake())
    label.run(config, tmp_path / "b", policy_backend=_policy(), feedback_backend=ContrastFake())
    a = read_jsonl(tmp_path / "a" / "label" / "comparisons.jsonl")
    b = read_jsonl(tmp_path / "b" / "label" / "comparisons.jsonl")
    assert [r["principle_ids"] for r in a] == [r["principle_ids"] for r in b]
    assert all(len(r["principle_ids"]) == 3 and len(r["scores"]) == 3 for r in a)
    assert len({tuple(r["principle_ids"]) for r in a}) > 1
    from constitutional.feedback import contrast_p_a

    row = a[0]
    expected = sum(contrast_p_a(s["s_a"], s["s_b"], 0.5) for s in row["scores"]) / 3
    assert row["p_a"] == pytest.approx(expected, abs=1e-6)


def test_identical_pairs_are_skipped(tmp_path, tiny_model_dir):
    summary = label.run(_config(tiny_model_dir), tmp_path, policy_backend=ScriptedBackend(lambda c: "same"),
                        feedback_backend=ContrastFake())
    assert summary["rows"] == 0 and summary["identical_pairs_skipped"] == 10


def test_resume_after_a_crash(tmp_path, tiny_model_dir):
    config = _config(tiny_model_dir)
    with pytest.raises(Killed):
        label.run(config, tmp_path, policy_backend=_policy(), feedback_backend=FailingContrastFake(fail_after=1))
    path = tmp_path / "label" / "comparisons.jsonl"
    assert len(read_jsonl(path)) == 4
    label.run(config, tmp_path, policy_backend=_policy(), feedback_backend=ContrastFake())
    ids = [r["id"] for r in read_jsonl(path)]
    assert len(ids) == len(set(ids)) == 10


def test_multiple_choice_method_runs_through_the_stage(tmp_path, tiny_model_dir):
    from tests.test_feedback import ContentJudge

    config = _config(tiny_model_dir, "label.method=multiple_choice", "label.fewshot=2")
    label.run(config, tmp_path, policy_backend=_policy(), feedback_backend=ContentJudge())
    rows = read_jsonl(tmp_path / "label" / "comparisons.jsonl")
    assert all(r["chosen"][0]["content"].startswith("SAFE") for r in rows)
    assert all(r["p_chosen"] == pytest.approx(0.8) for r in rows)
    assert {"p_a_ab", "p_a_ba"} <= set(rows[0]["scores"][0])


@pytest.mark.parametrize("setup, fragment", [
    ("no-feedback", "feedback principle list is empty"),
    ("bare-contrast", "needs both 'follows' and 'violates'"),
    ("no-policy", "model directory"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, tiny_model_dir, capsys, setup, fragment):
    args = ["label", "--out", str(tmp_path / "run"), "--set", f"label.policy={tiny_model_dir}"]
    if setup == "no-feedback":
        path = tmp_path / "c.yaml"
        path.write_text("sl_principles:\n  - {id: a, critique_request: x, revision_request: y}\n")
        args += ["--set", f"constitution={path}"]
    elif setup == "bare-contrast":
        path = tmp_path / "c.json"
        path.write_text(json.dumps(["Which response is less harmful?"]))
        args += ["--set", f"constitution={path}"]
    else:
        args += ["--set", f"label.policy={tmp_path / 'missing'}"]
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and fragment in err


def test_rlcd_rows_carry_the_system_prompts_they_were_sampled_under(tmp_path, tiny_model_dir):
    from constitutional.constitution import load_constitution

    fb = load_constitution("default").feedback_principles
    follows = {p.follows for p in fb}

    def respond(chat):
        assert chat[0]["role"] == "system"  # every rlcd answer is sampled under a system prompt
        return "SAFE I would rather not, but here is a safe option" if chat[0]["content"] in follows \
            else "here is exactly how to do it"

    policy = ScriptedBackend(respond)
    config = _config(tiny_model_dir, "label.method=rlcd", "label.limit=6")
    summary = label.run(config, tmp_path, policy_backend=policy, feedback_backend=ContrastFake())
    rows = read_jsonl(tmp_path / "label" / "comparisons.jsonl")
    assert len(rows) == 6 == summary["rows"]
    by_id = {p.id: p for p in fb}
    for row in rows:
        (pid,) = row["principle_ids"]
        assert row["system_prompts"] == {"response_a": by_id[pid].follows, "response_b": by_id[pid].violates}
        assert row["response_a"].startswith("SAFE") and row["chosen"][0]["content"] == row["response_a"]
        assert row["p_chosen"] == 0.9 and row["method"] == "rlcd" and row["rescored"] is False
    sampled = [chat[0]["content"] for chats, _ in policy.calls for chat in chats]
    assert sampled[0::2] == [by_id[r["principle_ids"][0]].follows for r in rows]  # follows, violates, ...


def test_rlcd_openings_start_only_the_follows_answer(tmp_path, tiny_model_dir):
    from constitutional.constitution import load_constitution

    default = load_constitution("default")
    openings = {fill_reason(o, r) for o in default.openings["harmless"] for r in default.reasons}

    def respond(chat):
        if chat[-1]["role"] == "assistant":  # an open assistant turn: the model continues it
            return "here is a safer idea."
        return "here is exactly how to do it"

    policy = ScriptedBackend(respond)
    config = _config(tiny_model_dir, "label.method=rlcd", "label.limit=6", "label.rlcd_openings=true")
    label.run(config, tmp_path, policy_backend=policy, feedback_backend=ContrastFake())
    rows = read_jsonl(tmp_path / "label" / "comparisons.jsonl")
    assert len(rows) == 6
    for row in rows:
        assert row["opening"] in openings
        assert row["response_a"] == join_opening(row["opening"], "here is a safer idea.")
        assert row["response_b"] == "here is exactly how to do it" and row["chosen"][0]["content"] == row["response_a"]
    chats = [chat for calls, _ in policy.calls for chat in calls]
    assert all(c[-1]["role"] == "assistant" for c in chats[0::2]) and all(c[-1]["role"] == "user" for c in chats[1::2])
    assert len({r["opening"] for r in rows}) > 1  # the openings are taken in turn, not always the first
    assert all(r["violates_opening"] is None for r in rows)  # no violates openings for harmless principles


def test_rlcd_violates_openings_start_the_helpful_violates_answer(tmp_path, tiny_model_dir):
    from constitutional.constitution import load_constitution

    refusals = load_constitution("default").violates_openings["helpful"]
    policy = ScriptedBackend(lambda chat: "and that is all." if chat[-1]["role"] == "assistant" else "Paris.")
    config = _config(tiny_model_dir, "label.method=rlcd", "label.limit=1", "label.helpful_prompts=helpful",
                     "label.helpful_limit=4", "label.rlcd_openings=true")
    label.run(config, tmp_path, policy_backend=policy, feedback_backend=ContrastFake())
    helpful = [r for r in read_jsonl(tmp_path / "label" / "comparisons.jsonl") if r["kind"] == "helpful"]
    assert len(helpful) == 4
    for row in helpful:  # the answer is preferred to a needless refusal
        assert row["opening"] is None and row["violates_opening"] in refusals
        assert row["chosen"][0]["content"] == "Paris."
        assert row["rejected"][0]["content"].startswith(row["violates_opening"])


def test_rlcd_rescored_pairs_are_judged_by_contrast(tmp_path, tiny_model_dir):
    policy = ScriptedBackend(lambda chat: "here is how" if "never refuse" in chat[0]["content"] else "SAFE no")
    config = _config(tiny_model_dir, "label.method=rlcd", "label.limit=4", "label.rlcd_rescore=true")
    from tests.test_critique_revise import FollowsScorer

    label.run(config, tmp_path, policy_backend=policy, feedback_backend=FollowsScorer())
    rows = read_jsonl(tmp_path / "label" / "comparisons.jsonl")
    assert len(rows) == 4
    for row in rows:  # contrast scores +0.5 vs -0.5 at T = 0.5: p = sigmoid(2)
        assert row["rescored"] is True and row["p_chosen"] == pytest.approx(0.880797, abs=1e-5)
        assert row["chosen"][0]["content"] == "SAFE no" and row["scores"][0]["s_a"] == 0.5


def test_the_target_filter_resamples_a_follows_answer_that_loops_and_trims_the_chosen_side(tmp_path, tiny_model_dir):
    from constitutional.constitution import load_constitution

    follows = {p.follows for p in load_constitution("default").feedback_principles}
    loop = "I can't help with that, but I can help you with that. I can help you with that. I can help you with that."
    clean = "I won't help with that. It is illegal and could hurt someone. Please talk to someone you trust. And"
    seen = {"follows": 0}

    def respond(chat):
        if chat[0]["content"] in follows:
            seen["follows"] += 1
            return loop if seen["follows"] <= 3 else clean  # the first answer of each of 3 prompts loops
        return "Sure. First you buy the parts, then you put them together."

    config = _config(tiny_model_dir, "label.method=rlcd", "label.limit=3", "label.target_filter=true")
    summary = label.run(config, tmp_path, policy_backend=ScriptedBackend(respond), feedback_backend=ContrastFake())
    rows = read_jsonl(tmp_path / "label" / "comparisons.jsonl")
    assert len(rows) == 3 and summary["filtered_prompts_skipped"] == 0
    for row in rows:
        assert row["chosen"][0]["content"] == "I won't help with that. It is illegal and could hurt someone."
        first, *again = row["target"]["candidates"]
        assert first["tier"] is None and "loop" in first["reasons"] and len(again) == 4
        assert row["target"]["kept"]["source"] == "filter-follows"
    # nothing passes: no pair for the prompt, counted
    summary = label.run(_config(tiny_model_dir, "label.method=rlcd", "label.limit=2", "label.target_filter=true"),
                        tmp_path / "none", policy_backend=ScriptedBackend(lambda chat: loop),
                        feedback_backend=ContrastFake())
    assert summary["filtered_prompts_skipped"] == 2 and summary["rows"] == 0
