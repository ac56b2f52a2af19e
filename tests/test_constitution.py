import json

import pytest

from constitutional.cli import main
from constitutional.constitution import load_constitution, sample_principles
from constitutional.errors import CaiError


def test_default_constitution_has_enough_principles_of_each_kind():
    c = load_constitution("default")
    assert len(c.sl_principles) >= 16
    harmless = [p for p in c.feedback_principles if p.kind == "harmless"]
    assert len(harmless) >= 16
    assert any(p.kind == "helpful" for p in c.feedback_principles)
    ids = [p.id for p in c.sl_principles]
    assert len(ids) == len(set(ids))
    for needed in ("harmful", "unethical", "racist", "sexist", "toxic", "dangerous", "illegal"):
        assert needed in ids
    # the contrast method needs both system prompts on every feedback principle
    assert all(p.follows and p.violates for p in c.feedback_principles)


def test_anthropic_sl_json_object(tmp_path):
    path = tmp_path / "sl.json"
    path.write_text(json.dumps({
        "harmful1": {"prompt": ["Identify harmful content."], "edit_request": "Remove it."},
        "harmful2": {"prompt": "Is it toxic?", "edit_request": "Make it kind."},
    }))
    c = load_constitution(path)
    assert [p.id for p in c.sl_principles] == ["harmful1", "harmful2"]
    assert c.sl_principles[0].critique_request == "Identify harmful content."
    assert c.sl_principles[1].revision_request == "Make it kind."
    assert c.feedback_principles == ()


def test_anthropic_feedback_json_list_and_merge(tmp_path):
    sl = tmp_path / "sl.json"
    sl.write_text(json.dumps({"a": {"prompt": ["Critique."], "edit_request": "Revise."}}))
    fb = tmp_path / "rl.json"
    fb.write_text(json.dumps(["Which response is less harmful?", "Which is more ethical?"]))
    c = load_constitution([sl, fb])
    assert len(c.sl_principles) == 1
    assert [p.text for p in c.feedback_principles] == ["Which response is less harmful?",
                                                      "Which is more ethical?"]
    assert [p.id for p in c.feedback_principles] == ["rl-0", "rl-1"]


@pytest.mark.parametrize("content, fragment", [
    ("sl_principles:\n  - id: a\n    critique_request: x\n", "sl_principles[0]: missing key 'revision_request'"),
    ("sl_principles:\n  - id: a\n    critique_request: x\n    revision_request: y\n    colour: z\n",
     "sl_principles[0]: unknown key 'colour'"),
    ("feedback_principles:\n  - id: a\n    text: ''\n", "feedback_principles[0].text"),
    ("feedback_principles:\n  - id: a\n    text: q\n    kind: funny\n", "feedback_principles[0].kind"),
    ("sl_principles:\n  - id: a\n    critique_request: x\n    revision_request: y\n"
     "  - id: a\n    critique_request: x\n    revision_request: y\n", "duplicate id 'a'"),
    ("sl_principles: [unclosed\n", "not valid YAML"),
    ("name: only-a-name\n", "needs sl_principles or feedback_principles"),
])
def test_bad_yaml_constitution_names_file_and_key(tmp_path, content, fragment):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(CaiError) as err:
        load_constitution(path)
    assert str(path) in str(err.value)
    assert fragment in str(err.value)


@pytest.mark.parametrize("data, fragment", [
    ({"a": {"prompt": ["x"]}}, "['a']: missing key 'edit_request'"),
    ([], "holds no principles"),
    (["fine", 3], "[1]: expected a non-empty string"),
    ("just a string", "expected an object"),
])
def test_bad_anthropic_json(tmp_path, data, fragment):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(CaiError, match="bad.json") as err:
        load_constitution(path)
    assert fragment in str(err.value)


def test_missing_constitution_file():
    with pytest.raises(CaiError, match="no such file"):
        load_constitution("nowhere.yaml")


def test_cli_bad_constitution_is_one_line_and_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sl_principles:\n  - id: a\n")
    code = main(["critique-revise", "--out", str(tmp_path / "run"), "--set", f"constitution={bad}"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0
    assert err.startswith("cai: error:") and "bad.yaml" in err and "missing key" in err


def test_principle_sampling_is_seeded_and_covers_all():
    principles = load_constitution("default").sl_principles
    a = sample_principles(principles, 4, seed=1, key="rt-0001")
    assert a == sample_principles(principles, 4, seed=1, key="rt-0001")
    draws = [tuple(sample_principles(principles, 4, seed=s, key="rt-0001")) for s in range(5)]
    assert len(set(draws)) > 1  # another seed, another draw
    seen = {p.id for k in range(400) for p in sample_principles(principles, 1, seed=0, key=str(k))}
    assert seen == {p.id for p in principles}  # uniform draw reaches every principle


def test_contrast_base_prefixes_each_principles_system_prompts(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "contrast_base:\n  harmless: {follows: 'Be safe.', violates: 'Help with anything.'}\n"
        "feedback_principles:\n"
        "  - {id: a, text: 'Which is less harmful?', follows: 'Mind privacy.', violates: 'Leak data.'}\n"
        "  - {id: b, text: 'Which is less toxic?'}\n"
        "  - {id: c, kind: helpful, text: 'Which is more useful?'}\n")
    a, b, c = load_constitution(path).feedback_principles
    assert (a.follows, a.violates) == ("Be safe. Mind privacy.", "Help with anything. Leak data.")
    assert (b.follows, b.violates) == ("Be safe.", "Help with anything.")  # the stance alone
    assert c.follows is None  # no base for its kind
    path.write_text("contrast_base:\n  funny: {follows: x, violates: y}\nfeedback_principles: []\n")
    with pytest.raises(CaiError, match="contrast_base.funny: unknown kind"):
        load_constitution(path)


def test_sl_principles_name_the_feedback_principle_that_scores_them(tmp_path):
    default = load_constitution("default")
    ids = {p.id for p in default.feedback_principles}
    assert all(p.feedback in ids for p in default.sl_principles)
    path = tmp_path / "c.yaml"
    path.write_text("sl_principles:\n  - {id: a, critique_request: c, revision_request: r, feedback: missing}\n"
                    "feedback_principles:\n  - {id: b, text: t}\n")
    with pytest.raises(CaiError, match=r"sl_principles\[0\]\.feedback: no feedback principle with id 'missing'"):
        load_constitution(path)


def test_a_reason_slot_needs_reasons_and_stands_only_in_a_harmless_opening(tmp_path):
    path = tmp_path / "c.yaml"
    head = "feedback_principles:\n  - {id: b, text: t}\n"
    path.write_text(head + "openings:\n  harmless: ['No, because {reason}.']\nreasons: ['it is a crime']\n")
    c = load_constitution(path)
    assert c.openings["harmless"] == ("No, because {reason}.",) and c.reasons == ("it is a crime",)
    path.write_text(head + "openings:\n  harmless: ['No, because {reason}.']\n")
    with pytest.raises(CaiError, match=r"openings\.harmless\[0\]: has a \{reason\} slot but the file lists no reasons"):
        load_constitution(path)
    path.write_text(head + "violates_openings:\n  helpful: ['No, because {reason}.']\nreasons: [x]\n")
    with pytest.raises(CaiError, match=r"violates_openings\.helpful\[0\]: a \{reason\} slot is only allowed"):
        load_constitution(path)
    path.write_text(head + "reasons: 'it is a crime'\n")
    with pytest.raises(CaiError, match="reasons: expected a non-empty list of strings"):
        load_constitution(path)
    assert load_constitution("default").reasons  # the shipped openings' slots have reasons to fill them
