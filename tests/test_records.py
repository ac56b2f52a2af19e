import json

import pytest

from constitutional.errors import CaiError
from constitutional.records import JsonlAppender, read_jsonl


def test_append_and_reopen_knows_ids(tmp_path):
    path = tmp_path / "rows.jsonl"
    with JsonlAppender(path) as out:
        out.append({"id": "a"})
        out.append({"id": "b"})
        with pytest.raises(ValueError, match="already written"):
            out.append({"id": "a"})
    assert JsonlAppender(path).done_ids == {"a", "b"}
    assert [r["id"] for r in read_jsonl(path)] == ["a", "b"]


@pytest.mark.parametrize("tail", ['{"id": "c", "x": [1, 2', '{"id": "c"', "garbage\n"])
def test_torn_last_line_is_cut(tmp_path, tail):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"id": "a"}) + "\n" + json.dumps({"id": "b"}) + "\n" + tail)
    out = JsonlAppender(path)
    assert out.repaired_bytes == len(tail)
    assert out.done_ids == {"a", "b"}
    out.append({"id": "c"})
    out.close()
    assert [r["id"] for r in read_jsonl(path)] == ["a", "b", "c"]


def test_bad_line_in_the_middle_names_the_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(CaiError, match="line 2"):
        read_jsonl(path)


def test_resume_settings_follow_a_copied_run_directory(tmp_path):
    """A stage's recorded paths inside its run directory still match after the directory is copied;
    another model does not."""
    import shutil

    from constitutional.records import check_resume_settings

    first = tmp_path / "a"
    check_resume_settings(first / "rl", {"policy": str(first / "sft" / "model"), "steps": 8}, free={"steps"})
    second = tmp_path / "b"
    shutil.copytree(first, second)
    check_resume_settings(second / "rl", {"policy": str(second / "sft" / "model"), "steps": 12}, free={"steps"})
    with pytest.raises(CaiError, match=r"other settings \(policy\)"):
        check_resume_settings(second / "rl", {"policy": str(first / "sft" / "model")})
