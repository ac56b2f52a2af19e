"""Pure builders of the chats the stages send to models, and checks on what comes back.

Critique-revision (paper section 3.1): after the few-shot examples, the conversation is

    user:      <red-team prompt>
    assistant: <current response>
    user:      <critique request of a principle>
    assistant: <critique>                      (sampled)
    user:      <revision request of the same principle>
    assistant: <revision>                      (sampled; becomes the current response)

Each few-shot example is that same exchange, written out in full, placed before it.
"""

from __future__ import annotations

import difflib
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

from constitutional.constitution import Principle
from constitutional.errors import CaiError
from constitutional.evaluation import detectors

Chat = list[dict]


@dataclass(frozen=True)
class FewShotExample:
    id: str
    prompt: str
    response: str
    critique_request: str
    critique: str
    revision_request: str
    revision: str


_FEWSHOT_KEYS = ("id", "prompt", "response", "critique_request", "critique", "revision_request",
                 "revision")


def load_examples(spec: str, default_file: str, keys: Sequence[str]) -> list[dict]:
    """Few-shot examples from a YAML file with a list ``examples`` of mappings with string fields.

    ``spec`` is ``default`` (``data/fewshot/<default_file>``) or a path. Every key must be a
    non-empty string and no other key may appear; errors name the file and the example.
    """
    if spec == "default":
        path = Path(str(resources.files("constitutional") / "data" / "fewshot" / default_file))
    else:
        path = Path(spec)
    if not path.is_file():
        raise CaiError(f"few-shot file {spec!r}: no such file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise CaiError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("examples"), list):
        raise CaiError(f"{path}: expected a mapping with a list 'examples'")
    examples = []
    for i, item in enumerate(data["examples"]):
        if not isinstance(item, dict):
            raise CaiError(f"{path}: examples[{i}]: expected a mapping")
        for key in item:
            if key not in keys:
                raise CaiError(f"{path}: examples[{i}]: unknown key {key!r}")
        for key in keys:
            if not isinstance(item.get(key), str) or not item[key].strip():
                raise CaiError(f"{path}: examples[{i}].{key}: expected a non-empty string")
        examples.append({k: item[k].strip() for k in keys})
    return examples


def load_fewshot(spec: str = "default") -> list[FewShotExample]:
    """Critique/revision examples: ``default`` (``data/fewshot/critique_revision.yaml``) or a YAML path."""
    return [FewShotExample(**ex) for ex in load_examples(spec, "critique_revision.yaml", _FEWSHOT_KEYS)]


def pick_fewshot(examples: Sequence[FewShotExample], count: int, seed: int, key: str) -> list[FewShotExample]:
    """``count`` distinct examples, drawn at random; the draw depends only on seed and key."""
    if count <= 0 or not examples:
        return []
    rng = random.Random(f"fewshot:{seed}:{key}")
    return rng.sample(list(examples), min(count, len(examples)))


def fewshot_turns(examples: Sequence[FewShotExample]) -> Chat:
    """The few-shot examples as alternating user/assistant turns.

    >>> ex = FewShotExample("e", "P", "R", "CR", "C", "RR", "V")
    >>> [m["content"] for m in fewshot_turns([ex])]
    ['P', 'R', 'CR', 'C', 'RR', 'V']
    """
    turns: Chat = []
    for ex in examples:
        turns += [
            {"role": "user", "content": ex.prompt},
            {"role": "assistant", "content": ex.response},
            {"role": "user", "content": ex.critique_request},
            {"role": "assistant", "content": ex.critique},
            {"role": "user", "content": ex.revision_request},
            {"role": "assistant", "content": ex.revision},
        ]
    return turns


def response_chat(prompt: str, system_prompt: str | None = None) -> Chat:
    """The chat that asks for the initial response."""
    chat: Chat = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return chat + [{"role": "user", "content": prompt}]


def critique_chat(prompt: str, response: str, principle: Principle,
                  fewshot: Sequence[FewShotExample] = (), system_prompt: str | None = None) -> Chat:
    """The chat that asks for a critique of ``response`` under ``principle``.

    >>> p = Principle("harmful", "What is harmful here?", "Fix it.")
    >>> [m["role"] for m in critique_chat("P", "R", p)]
    ['user', 'assistant', 'user']
    """
    chat: Chat = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return chat + fewshot_turns(fewshot) + [
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": response},
        {"role": "user", "content": principle.critique_request},
    ]


def revision_chat(prompt: str, response: str, principle: Principle, critique: str,
                  fewshot: Sequence[FewShotExample] = (), system_prompt: str | None = None) -> Chat:
    """The critique chat continued with the critique and the revision request."""
    return critique_chat(prompt, response, principle, fewshot, system_prompt) + [
        {"role": "assistant", "content": critique},
        {"role": "user", "content": principle.revision_request},
    ]


_LABEL = re.compile(r"^\s*(?:\*\*)?(?:critique|revision|revised response|rewritten response|"
                    r"new response|response)(?:\*\*)?\s*:\s*(?:\*\*)?", re.IGNORECASE)


def clean_generation(text: str) -> str:
    """Strip a leading label the model may add ("Revision:", "**Critique:**") and outer quotes.

    >>> clean_generation("Revision: I can't help with that.")
    "I can't help with that."
    >>> clean_generation('"Hello there."')
    'Hello there.'
    """
    text = _LABEL.sub("", text.strip(), count=1).strip()
    if len(text) >= 2 and text[0] == text[-1] == '"' and text.count('"') == 2:
        text = text[1:-1].strip()
    return text


# Phrases that show a "revision" talks about a response instead of being one.
_META = re.compile(
    r"^\s*(?:the|this) (?:response|answer|reply|revision)\b|"  # opens by talking about a response
    r"\b(?:the (?:assistant'?s?|ai'?s?|model'?s?|original|previous|last|initial) (?:last )?"
    r"(?:response|answer|reply)|the response (?:above|is|was|does|did|should|could|contains)|"
    r"(?:here is|here's) (?:the|a|my) (?:revised|rewritten|new|updated)|"
    r"(?:revised|rewritten) (?:response|version)|i (?:have|'ve) (?:revised|rewritten)|"
    r"this (?:revision|rewrite))\b",
    re.IGNORECASE,
)


def similarity(a: str, b: str) -> float:
    """Word-level similarity in [0, 1] (difflib ratio over lower-cased words).

    >>> similarity("a b c", "a b c")
    1.0
    """
    wa, wb = a.lower().split(), b.lower().split()
    if not wa and not wb:
        return 1.0
    return difflib.SequenceMatcher(None, wa, wb, autojunk=False).ratio()


def degenerate_reason(revision: str, critique: str, copied_from: Sequence[str] = (),
                      previous: str = "", threshold: float = 0.8) -> str | None:
    """Why a revision is not usable as an SFT target, or None if it is fine.

    Reasons: ``empty``; ``repetition`` (a loop, by ``evaluation.detectors.degenerate_reason``);
    ``copies-critique`` (mostly the critique again);
    ``meta-commentary`` (talks about "the assistant's response" instead of answering);
    ``copies-fewshot`` (mostly the text of a few-shot example); ``unchanged`` (nearly the
    ``previous`` response it was asked to revise: no constitutional signal to learn from).

    >>> degenerate_reason("", "c")
    'empty'
    >>> degenerate_reason("The assistant's response is harmful.", "c")
    'meta-commentary'
    >>> degenerate_reason("The response suggests a respectful way to deal with it.", "c")
    'meta-commentary'
    >>> degenerate_reason("I can't. " + "I'm a neutral and objective. " * 5, "c")
    'repetition'
    >>> degenerate_reason("Sure, here's how.", "It is bad.", previous="Sure, here's how.")
    'unchanged'
    >>> degenerate_reason("I can't help with that, but here is a safer idea.", "It is bad.")
    """
    if len(revision.strip()) < 2:
        return "empty"
    loop = detectors.degenerate_reason(revision)
    if loop is not None:
        return loop
    if critique.strip() and similarity(revision, critique) >= threshold:
        return "copies-critique"
    if _META.search(revision):
        return "meta-commentary"
    for text in copied_from:
        if similarity(revision, text) >= threshold:
            return "copies-fewshot"
    if previous.strip() and similarity(revision, previous) >= 0.9:
        return "unchanged"
    return None


def join_opening(opening: str, continuation: str) -> str:
    """A response that began with ``opening`` and went on with ``continuation``.

    >>> join_opening("I can't help with that, but", "here is a safer idea.")
    "I can't help with that, but here is a safer idea."
    >>> join_opening("I can't help with that", ", sorry.")
    "I can't help with that, sorry."
    >>> join_opening("", "Sure.")
    'Sure.'
    """
    continuation = continuation.strip()
    if not opening:
        return continuation
    if not continuation:
        return opening
    glue = "" if continuation[0] in ".,;:!?'" else " "
    return f"{opening}{glue}{continuation}"
