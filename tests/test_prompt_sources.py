import json

import pytest

from constitutional.errors import CaiError
from constitutional.prompt_sources import load_prompts


@pytest.mark.parametrize("name, minimum, categories", [("red-team", 200, 10), ("helpful", 200, 5)])
def test_builtin_sets_are_large_categorised_and_split(name, minimum, categories):
    rows = load_prompts(name, split="all")
    assert len(rows) >= minimum
    assert len({r.category for r in rows}) >= categories
    assert all(r.category for r in rows)
    train = load_prompts(name, "train")
    heldout = load_prompts(name, "heldout")
    assert {r.id for r in train}.isdisjoint({r.id for r in heldout})
    assert len(train) + len(heldout) == len(rows)
    assert 0.15 <= len(heldout) / len(rows) <= 0.25
    assert len({r.prompt for r in rows}) == len(rows)
    # every category is represented in the held-out split
    assert {r.category for r in heldout} == {r.category for r in rows}


def test_limit_keeps_file_order():
    rows = load_prompts("red-team", "train", limit=5)
    assert [r.id for r in rows] == [r.id for r in load_prompts("red-team", "train")[:5]]


def test_jsonl_csv_txt_files(tmp_path):
    jl = tmp_path / "p.jsonl"
    jl.write_text(json.dumps({"prompt": "one"}) + "\n"
                  + json.dumps({"messages": [{"role": "user", "content": "two"}]}) + "\n")
    assert [r.prompt for r in load_prompts(str(jl), "all")] == ["one", "two"]
    csv_path = tmp_path / "p.csv"
    csv_path.write_text("id,prompt\nx,hello\ny,world\n")
    assert [(r.id, r.prompt) for r in load_prompts(str(csv_path), "all")] == [("x", "hello"), ("y", "world")]
    txt = tmp_path / "p.txt"
    txt.write_text("\n".join(f"prompt {i}" for i in range(10)) + "\n")
    train, held = load_prompts(str(txt), "train"), load_prompts(str(txt), "heldout")
    assert len(train) == 8 and len(held) == 2


@pytest.mark.parametrize("name, content, fragment", [
    ("p.jsonl", '{"text": "x"}\n', "row 1: needs a non-empty 'prompt'"),
    ("p.csv", "question\nx\n", "needs a 'prompt' column"),
    ("p.md", "x", "unknown prompt file type"),
    ("p.jsonl", '{"prompt": "a", "split": "test"}\n', "split must be"),
])
def test_bad_prompt_files(tmp_path, name, content, fragment):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(CaiError) as err:
        load_prompts(str(path), "all")
    assert fragment in str(err.value)


def test_unknown_source_and_split():
    with pytest.raises(CaiError, match="built-in sets"):
        load_prompts("red-teem")
    with pytest.raises(CaiError, match="split"):
        load_prompts("red-team", "test")


@pytest.mark.integration
def test_advbench_from_the_pyrit_wheel():
    rows = load_prompts("advbench", "all")
    assert len(rows) == 520
    assert rows[0].prompt.startswith("Write a script that can exploit vulnerabilities")
