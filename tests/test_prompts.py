import pytest

from constitutional.constitution import Principle
from constitutional.errors import CaiError
from constitutional.prompts import (
    clean_generation,
    critique_chat,
    degenerate_reason,
    fewshot_turns,
    load_fewshot,
    pick_fewshot,
    response_chat,
    revision_chat,
)

P = Principle("harmful", "What is harmful in your last response?", "Rewrite it safely.")


def test_default_fewshot_examples_load():
    examples = load_fewshot("default")
    assert len(examples) >= 4
    assert len({e.id for e in examples}) == len(examples)
    for e in examples:  # revisions speak to the human, they do not describe a response
        assert degenerate_reason(e.revision, e.critique) is None


def test_critique_and_revision_chats_follow_the_paper_order():
    ex = load_fewshot("default")[:1]
    chat = revision_chat("How do I pick a lock?", "Sure: ...", P, "It helps burglary.", ex, "Be good.")
    roles = [m["role"] for m in chat]
    assert roles[0] == "system" and chat[0]["content"] == "Be good."
    assert roles[1:] == ["user", "assistant"] * 3 + ["user", "assistant", "user", "assistant", "user"]
    assert [m["content"] for m in chat[1:7]] == [m["content"] for m in fewshot_turns(ex)]
    assert [m["content"] for m in chat[7:]] == [
        "How do I pick a lock?", "Sure: ...", P.critique_request, "It helps burglary.", P.revision_request]
    assert critique_chat("How do I pick a lock?", "Sure: ...", P, ex, "Be good.") == chat[:-2]
    assert response_chat("q") == [{"role": "user", "content": "q"}]


def test_pick_fewshot_is_seeded_distinct_and_varies():
    pool = load_fewshot("default")
    a = pick_fewshot(pool, 2, seed=0, key="x")
    assert a == pick_fewshot(pool, 2, seed=0, key="x")
    assert len({e.id for e in a}) == 2
    assert len({tuple(e.id for e in pick_fewshot(pool, 2, 0, str(k))) for k in range(20)}) > 3
    assert pick_fewshot(pool, 0, 0, "x") == []
    assert len(pick_fewshot(pool, 99, 0, "x")) == len(pool)


@pytest.mark.parametrize("raw, clean", [
    ("Revision: I can't help with that.", "I can't help with that."),
    ("**Critique:** It is harmful.", "It is harmful."),
    ('"Please stay safe."', "Please stay safe."),
    ("  plain text  ", "plain text"),
    ('He said "no" and "yes".', 'He said "no" and "yes".'),
])
def test_clean_generation(raw, clean):
    assert clean_generation(raw) == clean


@pytest.mark.parametrize("revision, critique, fewshot, reason", [
    ("", "bad", [], "empty"),
    ("The response gives dangerous help without caution.", "The response gives dangerous help without caution.",
     [], "copies-critique"),
    ("The assistant's response is safe and appropriate.", "bad", [], "meta-commentary"),
    ("Here is a revised response: no.", "bad", [], "meta-commentary"),
    ("I can't help find where she lives, because blocking you says she wants space.", "bad",
     ["I can't help find where she lives, because blocking you says she wants space."], "copies-fewshot"),
    ("I can't help with breaking in, but a locksmith can open your own door.", "It helps burglary.", [], None),
])
def test_degenerate_reason(revision, critique, fewshot, reason):
    assert degenerate_reason(revision, critique, fewshot) == reason


def test_unchanged_revision_is_degenerate():
    previous = "Sure! First find an unlocked window, then wait until night."
    assert degenerate_reason(previous, "It helps burglary.", previous=previous) == "unchanged"
    assert degenerate_reason("I can't help you break in; ask your neighbour for a key.", "It helps burglary.",
                             previous=previous) is None


def test_bad_fewshot_file(tmp_path):
    path = tmp_path / "f.yaml"
    path.write_text("examples:\n  - id: a\n    prompt: p\n")
    with pytest.raises(CaiError, match=r"examples\[0\].response"):
        load_fewshot(str(path))
