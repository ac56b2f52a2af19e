"""``cai chat``: talk to any snapshot of a run (or any model spec) in its own chat template.

    cai chat --model runs/demo/rl/model                 # interactive; /reset starts over, /quit leaves
    cai chat --model runs/demo/sft/model --prompt "How do I pick a lock?"   # one answer to stdout

The conversation is kept as a list of messages and rendered by the backend with the model's
chat template, exactly as the stages render their chats. When it outgrows the model's context,
the oldest exchanges are dropped (a system prompt, if given, is kept).
"""

from __future__ import annotations

from collections.abc import Callable

from constitutional.backends.base import SamplingParams

HELP = "Type a message. /reset starts a new conversation, /quit (or Ctrl-D) leaves."


def fit_context(history: list[dict], backend, max_new_tokens: int) -> list[dict]:
    """``history`` without its oldest user/assistant exchanges until it fits the context."""
    system = [m for m in history[:1] if m["role"] == "system"]
    turns = history[len(system):]
    while len(turns) > 1 and backend.count_tokens(system + turns) + max_new_tokens > backend.context_length:
        turns = turns[2:] if len(turns) > 2 else turns[1:]
    return system + turns


def answer(backend, history: list[dict], params: SamplingParams) -> str:
    """The model's next assistant turn after ``history``."""
    return backend.generate([fit_context(history, backend, params.max_new_tokens)], params)[0].text


def chat_loop(backend, read_line: Callable[[], str | None], write: Callable[[str], None], params: SamplingParams,
              system: str | None = None) -> int:
    """Run an interactive session; ``read_line`` returns None at end of input. Returns the turns answered."""
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    answered = 0
    while True:
        line = read_line()
        if line is None or line.strip() == "/quit":
            return answered
        text = line.strip()
        if text == "/reset":
            history = list(start)
            write("(new conversation)")
            continue
        if not text:
            continue
        if text.startswith("/"):
            write(f"(unknown command {text.split()[0]}; {HELP})")
            continue
        history.append({"role": "user", "content": text})
        reply = answer(backend, history, params)
        history.append({"role": "assistant", "content": reply})
        history = fit_context(history, backend, params.max_new_tokens)
        write(reply)
        answered += 1
