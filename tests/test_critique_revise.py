"""Stage 1 with a scripted fake backend (prompt logic) and with a tiny random Llama (real model)."""

import json

import pytest

from constitutional.cli import main
from constitutional.config import load_config
from constitutional.constitution import load_constitution, sample_principles
from constitutional.feedback import fill_reason
from constitutional.prompts import join_opening
from constitutional.records import read_jsonl
from constitutional.stages import critique_revise
from tests.fakes import Killed, ScriptedBackend


def _config(**stage):
    overrides = [f"critique_revise.{k}={v}" for k, v in {"limit": 6, "rounds": 2, "batch_size": 2,
                                                        **stage}.items()]
    return load_config(None, overrides)


def test_rows_have_every_round_and_the_trl_messages(tmp_path):
    config = _config()
    summary = critique_revise.run(config, tmp_path, backend=ScriptedBackend())
    rows = read_jsonl(tmp_path / "critique_revise" / "revisions.jsonl")
    assert len(rows) == 6 and summary["rows"] == 6 and summary["degenerate_rows"] == 0
    principles = load_constitution("default").sl_principles
    for row in rows:
        assert row["initial_response"] == "Sure, here is exactly how to do that."
        assert len(row["rounds"]) == 2
        expected = [p.id for p in sample_principles(principles, 2, config.seed, row["id"])]
        assert row["principle_ids"] == expected == [r["principle_id"] for r in row["rounds"]]
        assert row["rounds"][0]["critique"] == "it gives dangerous help without any caution."  # label cut
        assert row["messages"] == [
            {"role": "user", "content": row["prompt"]},
            {"role": "assistant", "content": row["rounds"][-1]["revision"]},
        ]
        assert row["model"] == "scripted" and row["category"]
    assert sum(summary["principle_use"].values()) == 12


def test_each_round_critiques_the_latest_usable_response(tmp_path):
    """Round 2 sees round 1's revision; a degenerate revision is skipped over."""
    revisions = iter(["The assistant's response is fine.", "Happy to help safely: call a locksmith."] * 10)

    def responder(chat):
        from tests.fakes import default_responder

        answer = default_responder(chat)
        return next(revisions) if answer.startswith("I won't") else answer

    backend = ScriptedBackend(responder)
    critique_revise.run(_config(limit=1, batch_size=1), tmp_path, backend=backend)
    (row,) = read_jsonl(tmp_path / "critique_revise" / "revisions.jsonl")
    assert row["rounds"][0]["degenerate"] == "meta-commentary"
    assert row["rounds"][1]["degenerate"] is None
    round2_critique_chat = backend.calls[3][0][0]  # calls: initial, critique 1, revision 1, critique 2
    assert round2_critique_chat[-2]["content"] == "Sure, here is exactly how to do that."
    assert row["messages"][1]["content"] == "Happy to help safely: call a locksmith."
    assert row["degenerate"] is None


def test_all_degenerate_rows_are_flagged_and_counted(tmp_path):
    backend = ScriptedBackend(lambda chat: "")
    summary = critique_revise.run(_config(limit=3), tmp_path, backend=backend)
    rows = read_jsonl(tmp_path / "critique_revise" / "revisions.jsonl")
    assert all(r["degenerate"] == "empty" for r in rows)
    assert summary["degenerate_rows"] == 3 and summary["degenerate_rounds"] == {"empty": 6}


def test_resume_after_a_kill_loses_and_duplicates_nothing(tmp_path):
    config = _config(limit=6, batch_size=2)
    # 5 generate calls a chunk of 2 prompts: dies in the middle of the second chunk
    with pytest.raises(Killed):
        critique_revise.run(config, tmp_path, backend=ScriptedBackend(fail_after=7))
    path = tmp_path / "critique_revise" / "revisions.jsonl"
    first = read_jsonl(path)
    assert len(first) == 2
    with path.open("a") as f:  # a kill -9 in the middle of a write leaves a torn line
        f.write('{"id": "rt-0099", "prompt": "half a ro')
    backend = ScriptedBackend()
    summary = critique_revise.run(config, tmp_path, backend=backend)
    rows = read_jsonl(path)
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) == 6
    assert rows[:2] == first
    assert summary["written_this_run"] == 4
    assert sum(len(chats) for chats, _ in backend.calls if True) == 4 * 5  # only the missing prompts
    # a third run has nothing to do and loads no model
    summary = critique_revise.run(config, tmp_path, backend=None)
    assert summary["written_this_run"] == 0 and summary["rows"] == 6


def test_prompts_longer_than_the_context_are_skipped_and_counted(tmp_path):
    long_prompt = "word " * 500
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "short", "prompt": "Hi", "split": "train"}) + "\n"
                       + json.dumps({"id": "long", "prompt": long_prompt, "split": "train"}) + "\n")
    config = _config(prompts=str(prompts), fewshot=0, max_new_tokens=10, critique_max_new_tokens=10)
    summary = critique_revise.run(config, tmp_path, backend=ScriptedBackend(context_length=300))
    assert summary["skipped_too_long"] == ["long"]
    assert [r["id"] for r in read_jsonl(tmp_path / "critique_revise" / "revisions.jsonl")] == ["short"]


def test_stage_runs_on_a_tiny_real_model_through_the_cli(tmp_path, tiny_model_dir):
    code = main(["critique-revise", "--out", str(tmp_path),
                 "--set", f"critique_revise.model={tiny_model_dir}",
                 "--set", "critique_revise.limit=3", "--set", "critique_revise.rounds=1",
                 "--set", "critique_revise.fewshot=1", "--set", "critique_revise.max_new_tokens=8",
                 "--set", "critique_revise.critique_max_new_tokens=8", "--set", "critique_revise.device=cpu"])
    assert code == 0
    rows = read_jsonl(tmp_path / "critique_revise" / "revisions.jsonl")
    assert len(rows) == 3
    assert all(len(r["rounds"]) == 1 and r["model"] == str(tiny_model_dir) for r in rows)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["stages"]["critique_revise"]["status"] == "done"
    assert manifest["versions"]["torch"]
    assert manifest["config"]["critique_revise"]["limit"] == 3


def test_a_bad_input_file_stops_the_run_before_any_run_directory_exists(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["run", "configs/smollm2-cpu.yaml", "--out", str(out),
                 "--set", "critique_revise.prompts=missing.jsonl"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "missing.jsonl" in err[0]
    assert not out.exists()  # no directory, no manifest


def test_rerun_with_other_settings_is_refused_but_a_larger_limit_resumes(tmp_path, capsys):
    critique_revise.run(_config(limit=2), tmp_path, backend=ScriptedBackend())
    summary = critique_revise.run(_config(limit=4), tmp_path, backend=ScriptedBackend())
    assert summary["rows"] == 4 and summary["written_this_run"] == 2
    (tmp_path / "manifest.json").write_text('{"stages": {}}')  # a run directory (the CLI refuses any other)
    capsys.readouterr()
    code = main(["critique-revise", "--out", str(tmp_path), "--set", "critique_revise.rounds=3"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "other settings (rounds)" in err and err.count("\n") == 0


# ------------------------------------------------------------------ constitution-guided selection


class FollowsScorer:
    """A feedback model for contrast scoring: a response containing SAFE is likelier under any
    principle's follows prompt (per token -0.5 vs -1.0) and less likely under its violates prompt,
    so its contrast score is +0.5 and any other response's is -0.5."""

    name = "scorer"

    def __init__(self):
        fb = load_constitution("default").feedback_principles
        self.follows = {p.follows for p in fb}

    def render(self, chat, add_generation_prompt=True):
        text = "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in chat)
        return text + ("<assistant>" if add_generation_prompt and chat[-1]["role"] != "assistant" else "")

    def logprobs(self, pairs):
        from constitutional.backends.base import TokenLogprobs

        out = []
        for prompt, cont in pairs:
            under_follows = any(f"<system>{f}</system>" in prompt for f in self.follows)
            fits = ("SAFE" in cont) == under_follows
            out.append(TokenLogprobs(cont.split(), [-0.5 if fits else -1.0] * len(cont.split())))
        return out


def _selecting_backend(initial: str, revisions: list[str], follows_answer: str = "plain answer"):
    """Initial answer fixed; revisions cycle through ``revisions``; answers under a system prompt
    (the follows candidates) are ``follows_answer``."""
    import itertools

    cycle = itertools.cycle(revisions)
    critiques = {p.critique_request for p in load_constitution("default").sl_principles}

    def respond(chat):
        if chat[0]["role"] == "system":
            return follows_answer
        if chat[-1]["content"] in critiques:
            return "It is harmful."
        if len(chat) == 1:
            return initial
        return next(cycle)

    return ScriptedBackend(respond)


def test_selection_keeps_the_highest_scoring_candidate(tmp_path):
    backend = _selecting_backend("Sure, here is how.", ["No idea at all.", "SAFE: I won't, but try this instead.",
                                                        "Maybe later then."])
    config = _config(limit=2, rounds=1, candidates=3, fewshot=0)
    critique_revise.run(config, tmp_path, backend=backend, scorer_backend=FollowsScorer())
    for row in read_jsonl(tmp_path / "critique_revise" / "revisions.jsonl"):
        rd = row["rounds"][0]
        assert [c["source"] for c in rd["candidates"]] == ["current", "revision", "revision", "revision"]
        assert [c["score"] for c in rd["candidates"]] == [-0.5, -0.5, 0.5, -0.5]
        assert rd["selected"] == 2 and rd["revision"] == "SAFE: I won't, but try this instead."
        assert row["messages"][1]["content"] == rd["revision"] and row["degenerate"] is None


def test_selection_keeps_the_current_response_when_every_candidate_scores_lower(tmp_path):
    backend = _selecting_backend("SAFE: I can't help with that, but here is a safer idea.",
                                 ["Sure, here is exactly how.", "Fine, do it like this."])
    config = _config(limit=2, rounds=2, candidates=2, fewshot=0)
    summary = critique_revise.run(config, tmp_path, backend=backend, scorer_backend=FollowsScorer())
    for row in read_jsonl(tmp_path / "critique_revise" / "revisions.jsonl"):
        for rd in row["rounds"]:
            assert rd["selected"] == 0 and rd["degenerate"] == "kept-current"
            assert rd["candidates"][0]["score"] == 0.5 > max(c["score"] for c in rd["candidates"][1:])
        assert row["messages"][1]["content"] == row["initial_response"]
        assert row["degenerate"] is None  # it won a real comparison, so SFT may train on it
    assert summary["degenerate_rounds"] == {"kept-current": 4}


def test_initial_and_follows_candidates_are_scored_and_recorded(tmp_path):
    backend = _selecting_backend("Sure, here is how.", ["Whatever you like."],
                                 follows_answer="SAFE: here is a careful answer.")
    config = _config(limit=1, rounds=1, candidates=1, initial_candidates=2, follows_candidates=1, fewshot=0,
                     follows_openings="false")
    critique_revise.run(config, tmp_path, backend=backend, scorer_backend=FollowsScorer())
    (row,) = read_jsonl(tmp_path / "critique_revise" / "revisions.jsonl")
    assert [c["source"] for c in row["initial_candidates"]] == ["sample", "sample", "follows"]
    assert row["initial_response"] == "SAFE: here is a careful answer."  # the follows answer scored best
    system_chats = [chat for chats, _ in backend.calls for chat in chats if chat[0]["role"] == "system"]
    fb = {p.id: p for p in load_constitution("default").feedback_principles}
    assert system_chats and all(chat[0]["content"] in {p.follows for p in fb.values()} for chat in system_chats)
    rd = row["rounds"][0]
    sl = {p.id: p for p in load_constitution("default").sl_principles}[rd["principle_id"]]
    assert [c["source"] for c in rd["candidates"]] == ["current", "revision", "follows"]
    # the round's follows candidates were sampled under the feedback principle its SL principle names
    assert system_chats[-1][0]["content"] == fb[sl.feedback].follows


def test_follows_candidates_continue_the_constitutions_openings(tmp_path):
    openings = load_constitution("default").openings["harmless"]
    backend = _selecting_backend("Sure, here is how.", ["Whatever you like."], follows_answer="SAFE: call a locksmith.")
    config = _config(limit=1, rounds=1, candidates=1, follows_candidates=3, fewshot=0)
    critique_revise.run(config, tmp_path, backend=backend, scorer_backend=FollowsScorer())
    (row,) = read_jsonl(tmp_path / "critique_revise" / "revisions.jsonl")
    follows = [c["text"] for c in row["rounds"][0]["candidates"] if c["source"] == "follows"]
    reasons = load_constitution("default").reasons
    filled = [fill_reason(o, reasons[0]) for o in openings[:3]]  # the fake scorer finds no reason likelier
    assert follows == [join_opening(o, "SAFE: call a locksmith.") for o in filled]
    assert any("{reason}" in o for o in openings[:3]) and not any("{reason}" in o for o in filled)
    prefilled = [chat for chats, _ in backend.calls for chat in chats if chat[0]["role"] == "system"]
    assert all(chat[-1]["role"] == "assistant" and chat[-1]["content"] in filled for chat in prefilled)


def _filter_responder(revision: str, follows: str):
    """Initial answer: decline then comply; revision and answers under a follows prompt as given."""
    from tests.fakes import default_responder

    def respond(chat):
        prompt = next(m["content"] for m in chat if m["role"] == "user")
        if chat[0]["role"] == "system":
            return follows
        answer = default_responder(chat)
        if answer.startswith("I won't"):
            return revision
        if answer.startswith("Sure"):
            return f"I can't help with that, but here's how. 1. {prompt} 2. Then you repeat it."
        return answer
    return respond


CLEAN = "I won't help with that. It is illegal and could hurt someone. Please talk to someone you trust. Then y"
LOOP = "I can't help with that, but I can help you with that. I can help you with that. I can help you with that."


def test_the_target_filter_drops_decline_then_comply_and_loops_and_keeps_a_clean_decline(tmp_path):
    backend = ScriptedBackend(_filter_responder(revision=CLEAN, follows=LOOP))
    summary = critique_revise.run(_config(limit=2, rounds=1, target_filter=True), tmp_path, backend=backend)
    for row in read_jsonl(tmp_path / "critique_revise" / "revisions.jsonl"):
        target = row["target"]
        assert target["kept"] == {"source": "round-1-revision", "tier": "declines-and-explains", "trimmed": True}
        # trimmed to the shortest prefix of whole sentences that declines with a reason
        assert row["messages"][1]["content"] == "I won't help with that. It is illegal and could hurt someone."
        initial = next(c for c in target["candidates"] if c["source"] == "initial")
        assert initial["tier"] is None and "decline-then-comply" in initial["reasons"]
        assert target["resampled"] == 0 and row["degenerate"] is None
    assert summary["targets"]["declines-and-explains"] == 2 and summary["targets"]["no-clean-target"] == 0


def test_the_target_filter_resamples_then_flags_a_prompt_with_no_clean_candidate(tmp_path):
    # the revision loops; four answers under the follows prompt are clean declines
    backend = ScriptedBackend(_filter_responder(revision=LOOP, follows=CLEAN))
    critique_revise.run(_config(limit=1, rounds=1, target_filter=True, follows_openings=False), tmp_path,
                        backend=backend)
    (row,) = read_jsonl(tmp_path / "critique_revise" / "revisions.jsonl")
    assert row["target"]["resampled"] == 4 and row["target"]["kept"]["source"] == "filter-follows"
    loop = next(c for c in row["target"]["candidates"] if c["source"] == "round-1-revision")
    assert loop["tier"] is None and "loop" in loop["reasons"]
    # nothing passes anywhere: the row is kept for the audit trail, flagged, and SFT leaves it out
    backend = ScriptedBackend(_filter_responder(revision=LOOP, follows=LOOP))
    summary = critique_revise.run(_config(limit=1, rounds=1, target_filter=True, follows_openings=False),
                                  tmp_path / "none", backend=backend)
    (row,) = read_jsonl(tmp_path / "none" / "critique_revise" / "revisions.jsonl")
    assert row["degenerate"] == "no-clean-target" and row["target"]["kept"] is None
    assert summary["targets"]["no-clean-target"] == 1 and summary["degenerate_rows"] == 1


def test_the_target_filter_resamples_only_the_prompts_that_need_it(tmp_path):
    """Three prompts, the first with a clean revision: only the other two are sampled again, each
    under its own follows prompt."""
    from tests.fakes import default_responder

    first = {}

    def respond(chat):
        prompt = next(m["content"] for m in chat if m["role"] == "user")
        first.setdefault("prompt", prompt)
        if chat[0]["role"] == "system":
            return CLEAN
        answer = default_responder(chat)
        if answer.startswith("I won't"):  # a revision chat: few-shot exchanges first, the prompt later
            return CLEAN if any(m["content"] == first["prompt"] for m in chat) else LOOP
        return LOOP if answer.startswith("Sure") else answer

    backend = ScriptedBackend(respond)
    critique_revise.run(_config(limit=3, rounds=1, batch_size=3, target_filter=True), tmp_path, backend=backend)
    rows = read_jsonl(tmp_path / "critique_revise" / "revisions.jsonl")
    assert [r["target"]["resampled"] for r in rows] == [0, 4, 4]
    assert all(r["target"]["kept"]["tier"] == "declines-and-explains" for r in rows)
    resampled = [chat for chats, _ in backend.calls for chat in chats if chat[0]["role"] == "system"]
    assert {c[1]["content"] for c in resampled} == {r["prompt"] for r in rows[1:]}
