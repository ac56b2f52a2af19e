"""cai chat: the interactive loop and the one-shot answer, on the tiny random Llama."""

from __future__ import annotations

from constitutional.backends.base import SamplingParams
from constitutional.chat import chat_loop, fit_context
from constitutional.cli import main
from tests.fakes import ScriptedBackend


def test_loop_keeps_history_resets_and_quits():
    seen = []

    def responder(chat):
        seen.append([m["content"] for m in chat])
        return f"reply {len(seen)}"

    backend = ScriptedBackend(responder)
    lines = iter(["hello", "", "more", "/reset", "again", "/nope", "/quit", "never read"])
    out: list[str] = []
    answered = chat_loop(backend, lambda: next(lines), out.append, SamplingParams(max_new_tokens=8), system="Be kind.")
    assert answered == 3
    assert out == ["reply 1", "reply 2", "(new conversation)", "reply 3", out[4]] and "unknown command" in out[4]
    assert seen[0] == ["Be kind.", "hello"]
    assert seen[1] == ["Be kind.", "hello", "reply 1", "more"]
    assert seen[2] == ["Be kind.", "again"]  # /reset forgot the first exchanges but kept the system prompt


def test_loop_ends_at_end_of_input():
    lines = iter(["hi", None])
    assert chat_loop(ScriptedBackend(lambda chat: "ok"), lambda: next(lines), lambda text: None,
                     SamplingParams(max_new_tokens=4)) == 1


def test_history_is_trimmed_to_the_context_keeping_the_system_prompt():
    backend = ScriptedBackend(context_length=40)
    history = [{"role": "system", "content": "sys"}]
    for i in range(10):
        history += [{"role": "user", "content": f"question {i} " * 3}, {"role": "assistant", "content": "answer " * 3}]
    trimmed = fit_context(history, backend, max_new_tokens=8)
    assert trimmed[0]["content"] == "sys" and trimmed[-1] == history[-1]
    assert backend.count_tokens(trimmed) + 8 <= 40 < backend.count_tokens(history)


def test_one_shot_answer_on_a_real_model(tiny_model_dir, capsys):
    assert main(["chat", "--model", str(tiny_model_dir), "--prompt", "How do I bake bread?",
                 "--max-new-tokens", "5", "--device", "cpu"]) == 0
    first = capsys.readouterr().out
    assert main(["chat", "--model", str(tiny_model_dir), "--prompt", "How do I bake bread?",
                 "--max-new-tokens", "5", "--device", "cpu"]) == 0
    assert capsys.readouterr().out == first  # greedy by default: the same answer twice
    assert first.endswith("\n") and first.count("\n") >= 1


def test_chat_with_a_missing_model_is_one_error_line(tmp_path, capsys):
    assert main(["chat", "--model", str(tmp_path / "nope"), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--model" in err[0]
