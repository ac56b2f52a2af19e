"""A scripted fake backend for unit tests of prompt logic (no model)."""

from __future__ import annotations

from collections.abc import Callable

from constitutional.backends.base import Completion, SamplingParams, TokenLogprobs


class Killed(RuntimeError):
    """Raised by the fake backend to simulate a crash in the middle of a stage."""


class ScriptedBackend:
    """Answers each chat with ``responder(chat)``; counts tokens as whitespace words.

    ``fail_after`` makes the N+1-th ``generate`` call raise :class:`Killed`.
    """

    def __init__(self, responder: Callable[[list[dict]], str] | None = None,
                 context_length: int = 100_000, fail_after: int | None = None):
        self.responder = responder or default_responder
        self.context_length = context_length
        self.fail_after = fail_after
        self.name = "scripted"
        self.calls: list[tuple[list[list[dict]], SamplingParams]] = []

    def render(self, chat, add_generation_prompt=True) -> str:
        text = "\n".join(f"{m['role']}: {m['content']}" for m in chat)
        return text + ("\nassistant:" if add_generation_prompt else "")

    def count_tokens(self, chat) -> int:
        return len(self.render(chat).split())

    def generate(self, chats, params, progress=None):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise Killed("simulated crash")
        self.calls.append((list(chats), params))
        out = [Completion(self.responder(chat), tokens=5, finished=True) for chat in chats]
        if progress:
            progress(len(chats), 5 * len(chats))
        return out

    def logprobs(self, pairs):
        return [TokenLogprobs(tokens=c.split(), logprobs=[-1.0] * len(c.split())) for _, c in pairs]


def default_responder(chat: list[dict]) -> str:
    """Initial answer, critique or revision, told apart by the last user turn."""
    from constitutional.constitution import load_constitution

    principles = load_constitution("default").sl_principles
    last = chat[-1]["content"]
    if any(last == p.revision_request for p in principles):
        return "I won't help with that, but I can suggest a safe alternative that meets your need."
    if any(last == p.critique_request for p in principles):
        return "Critique: it gives dangerous help without any caution."
    return "Sure, here is exactly how to do that."
