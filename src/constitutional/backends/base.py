"""The small protocol every backend implements.

Stages need two things from a model:

* ``generate``: sample one completion for each of many chats (lists of ``{"role", "content"}``
  messages), with given sampling parameters;
* ``logprobs``: the log-probability of each token of a given continuation after a given
  prompt text (the feedback stage scores answer options and whole responses this way).

``render`` turns a chat into the prompt text the model sees (its chat template), so that
prompt-building code can score continuations after a templated chat.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

Chat = list[dict]


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    seed: int | None = None
    min_new_tokens: int = 0  # forbid stopping earlier (benchmarks use it to fix lengths)


@dataclass(frozen=True)
class Completion:
    text: str
    tokens: int  # tokens generated, the stop token included if one was produced
    finished: bool  # True if the model stopped by itself, False if it hit max_new_tokens


@dataclass(frozen=True)
class TokenLogprobs:
    """Log-probabilities of a continuation's tokens, one per token."""

    tokens: list[str]
    logprobs: list[float]

    @property
    def total(self) -> float:
        return float(sum(self.logprobs))


# Called after each batch with (chats finished in this batch, tokens generated in this batch).
ProgressFn = Callable[[int, int], None]


@runtime_checkable
class Backend(Protocol):
    name: str  # a short description of the model, written into every row
    context_length: int  # prompt + generated tokens the model can attend to

    def render(self, chat: Chat, add_generation_prompt: bool = True) -> str: ...

    def count_tokens(self, chat: Chat) -> int:
        """Tokens of the rendered chat with the generation prompt."""
        ...

    def generate(self, chats: Sequence[Chat], params: SamplingParams,
                 progress: ProgressFn | None = None) -> list[Completion]: ...

    def logprobs(self, pairs: Sequence[tuple[str, str]]) -> list[TokenLogprobs]:
        """For each (prompt text, continuation text): the continuation's token log-probs."""
        ...
