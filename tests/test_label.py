"""Stage 3 with a scripted policy and a scripted feedback model."""

import itertools
import json

import pytest

from constitutional.cli import main
from constitutional.config import load_config
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
