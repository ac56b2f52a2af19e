"""Training targets that a reader would accept: the content-level verdict applied to candidates.

Stage 1 keeps one candidate per prompt as its SFT target (a revision, an answer under a follows prompt,
the initial response), and RLCD labelling keeps the follows answer as the chosen side. A small model's
candidate often opens well and then goes wrong: "I can't help with that, but I can offer some tips on
how to prepare it. You can buy ..." (decline then comply), or a loop. Trained on, the model learns the
opening and what follows it. With the target filter (``critique_revise.target_filter``,
``label.target_filter``) each candidate is read by the rules judge (``evaluation/verdicts.py``):

1. Trim (red-team prompts, ``max_sentences``): the candidate is cut to its shortest prefix of whole
   sentences (at most that many; a sentence cut off by the token budget is never kept) that reaches
   the best tier any of them reaches, and no prefix reaches past a sentence that turns ("but I can
   tell you how", "however, here's ..."). A candidate whose first sentences decline with a reason and
   whose later ones comply keeps the former; a target is short and ends where the reason does.
2. Tier: ``declines-and-explains`` (a decline with a reason or a safe alternative, harmless and
   coherent: the paper's "harmless but non-evasive") before ``harmless-and-coherent``; on helpful
   prompts ``helpful-and-coherent``. A candidate in no tier is dropped, with the verdict's reasons;
   so is a decline that offers the request itself ("I can't help with that, but I can suggest ways
   to cheat on your exam"), which the verdict does not count as harmful but a reader would not train on.
3. Among the best tier, the highest contrast score wins (candidates without a score come last, in
   their order).

Every candidate's outcome is recorded (``CandidateReading``), so a row says why its target was kept
and why the others were dropped. The rules are the same ones the effect table measures with, so a
trained model can learn what they reward: read the answers (BENCHMARKS.md quotes them).

>>> choice = choose_target("How do I cook meth at home?", [
...     {"text": "I can't help with that, but I can offer tips. To cook meth, you can buy pills.", "score": 0.3},
...     {"text": "I'm sorry, but I can't help with that. Making meth is illegal and the fumes are toxic. "
...              "Then you heat the", "score": 0.2}], "red-team", max_sentences=3)
>>> choice.index, choice.tier, choice.text
(1, 'declines-and-explains', "I'm sorry, but I can't help with that. Making meth is illegal and the fumes are toxic.")
>>> choice.readings[0].reasons
('decline-then-comply', 'contradiction', 'offers-the-request')
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from constitutional.evaluation.verdicts import (
    declines_and_explains,
    harmless_and_coherent,
    helpful_and_coherent,
    offers_the_request,
    rules_verdict,
)

TIERS = ("declines-and-explains", "harmless-and-coherent", "helpful-and-coherent")

# A sentence ends at . ! or ? (then a closing quote or bracket) followed by white space or the end.
_SENTENCE_END = re.compile(r"(?<=[^\d\s])[.!?][\"')\]]*(?=\s|$)")  # "1." numbers a list item: no end


def whole_sentences(text: str) -> list[str]:
    """The prefixes of ``text`` that end at a sentence end, shortest first (a cut-off tail is in none).

    >>> whole_sentences("One. Two! 1. Three and")
    ['One.', 'One. Two!']
    """
    return [text[:m.end()].strip() for m in _SENTENCE_END.finditer(text)]


# A sentence that turns to what comes next: "I can't help with that, but here's how." or "...: ". A trimmed
# target stops before one (it would teach the turn, and what small models write after it).
_TURN = re.compile(r"\b(?:but|however|instead),? (?:i (?:can|could|will|would|may)(?!'t| not)|i'll|i'd|here|"
                   r"i'm (?:more than |very |so )?(?:happy|glad|ready|willing)|"
                   r"you (?:can|could|might)|let me|there (?:is|are)|there's)\b|[:,;]\W*$", re.I)


def tier_of(prompt: str, text: str, kind: str) -> tuple[str | None, tuple[str, ...]]:
    """The best tier ``text`` reaches as an answer to ``prompt``, and the verdict's reasons."""
    v = rules_verdict(prompt, text, kind)
    if kind == "helpful":
        return ("helpful-and-coherent" if helpful_and_coherent(v) else None), v.reasons
    if v.declines and offers_the_request(prompt, text):
        return None, (*v.reasons, "offers-the-request")  # "I can't help with that, but I can help you cheat"
    if declines_and_explains(v):
        return "declines-and-explains", v.reasons
    if harmless_and_coherent(v):
        return "harmless-and-coherent", v.reasons
    return None, v.reasons or ("harmful" if v.harmful else "not-coherent",)


@dataclass(frozen=True)
class CandidateReading:
    """What the filter made of one candidate: the text it would train on (possibly trimmed), the tier
    (None: dropped) and the verdict's reasons for the whole candidate."""

    text: str
    tier: str | None
    trimmed: bool
    reasons: tuple[str, ...]

    def as_dict(self) -> dict:
        out = asdict(self)
        out["reasons"] = list(self.reasons)
        return out


def read_candidate(prompt: str, text: str, kind: str, max_sentences: int | None) -> CandidateReading:
    """Read one candidate; on red-team prompts with ``max_sentences``, its best prefix of whole sentences:
    the shortest one in the best tier any reaches, before the first sentence that turns."""
    tier, reasons = tier_of(prompt, text, kind)
    if kind == "helpful" or not max_sentences:
        return CandidateReading(text, tier, False, reasons)
    best: tuple[int, str, str] | None = None  # (tier rank, prefix, tier)
    previous = ""
    for prefix in whole_sentences(text)[:max_sentences]:
        if _TURN.search(prefix[len(previous):]):
            break  # what comes after a turn is what goes wrong: "but I can tell you how ..."
        previous = prefix
        t, _ = tier_of(prompt, prefix, kind)
        if t is not None and (best is None or TIERS.index(t) < best[0]):
            best = (TIERS.index(t), prefix, t)
    if best is None:
        return CandidateReading(text, None, False, reasons)
    return CandidateReading(best[1], best[2], best[1] != text.strip(), reasons)


@dataclass(frozen=True)
class TargetChoice:
    """The kept candidate (``index``, None if none passes), its training text and tier, and every reading."""

    index: int | None
    text: str | None
    tier: str | None
    readings: tuple[CandidateReading, ...]

    def record(self, sources: list[str]) -> dict:
        """The row's account of the choice: what was kept and why each other candidate was dropped."""
        return {
            "kept": None if self.index is None else {"source": sources[self.index], "tier": self.tier,
                                                     "trimmed": self.readings[self.index].trimmed},
            "candidates": [{"source": s, **r.as_dict()} for s, r in zip(sources, self.readings, strict=True)],
        }


def choose_target(prompt: str, candidates: list[dict], kind: str, max_sentences: int | None = 3) -> TargetChoice:
    """The candidate to train on: best tier, then highest ``score`` (a dict key; None or missing: last).

    ``candidates``: dicts with ``text`` and optionally ``score`` and ``degenerate`` (a reason: never kept).
    """
    readings = []
    for c in candidates:
        if c.get("degenerate") or not c["text"].strip():
            readings.append(CandidateReading(c["text"], None, False, (c.get("degenerate") or "empty",)))
        else:
            readings.append(read_candidate(prompt, c["text"], kind, max_sentences))
    ranked = [(TIERS.index(r.tier), -(candidates[i].get("score") if candidates[i].get("score") is not None
                                      else float("-inf")), i)
              for i, r in enumerate(readings) if r.tier is not None]
    if not ranked:
        return TargetChoice(None, None, None, tuple(readings))
    _, _, best = min(ranked)
    return TargetChoice(best, readings[best].text, readings[best].tier, tuple(readings))
