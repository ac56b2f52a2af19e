"""The constitution: the written principles that steer critique, revision and feedback.

Two kinds of principle, as in the paper:

* SL principles (:class:`Principle`) drive stage 1: a *critique request* asks the model to
  find what is wrong with its last answer, a *revision request* asks it to rewrite it.
* Feedback principles (:class:`FeedbackPrinciple`) drive stage 3: a multiple-choice question
  ("Which of these responses is less harmful?"). For the contrast method each one also
  carries a short system prompt that ``follows`` the principle and one that ``violates`` it.

Files this module reads:

* this project's YAML (``data/constitutions/default.yaml`` is the shipped one)::

      name: default
      sl_principles:
        - {id: harmful, critique_request: "...", revision_request: "..."}
      feedback_principles:
        - {id: less-harmful, kind: harmless, text: "...", follows: "...", violates: "..."}

* An optional top-level ``contrast_base: {harmless: {follows, violates}, helpful: {...}}`` is a
shared stance put before every feedback principle's own ``follows``/``violates`` prompt of that
kind (on the embedded model, describing the behaviour itself, "refuses and offers a safe
alternative" vs. "helps with anything and never refuses", is what makes contrast labels work).

* An optional top-level ``openings: {harmless: [...], helpful: [...]}`` lists how a response that
follows the principles of that kind may begin ("I can't help with that, but ..."). Stage 1's
``follows_candidates`` continue them under a principle's ``follows`` system prompt, so that a small
model proposes candidates it would rarely write unprompted; whether one is kept is still decided by
the feedback model's score under the round's principle. An optional ``violates_openings`` of the
same shape lists how a response that violates the principles of a kind may begin (for ``helpful``,
a needless refusal): RLCD pairs (``label.rlcd_openings``) start their violates answer with one, so
that DPO learns that an ordinary request deserves an answer, not a refusal.

* An optional top-level ``reasons: [...]`` lists why a response that follows the harmless principles
declines ("it would invade someone's privacy"). A harmless opening may hold a ``{reason}`` slot
("I won't help with this, because {reason}."); it is filled, per request, with the reason the feedback
model finds most relevant to it (``feedback.pick_reasons``), so the answers a small model is trained on
say why they decline, in words written down here.

* Anthropic's published JSON: an object ``{name: {"prompt": [critique], "edit_request": revision}}``
  for SL principles, or a list of strings for feedback principles.

Several files can be merged (``load_constitution(["sl.json", "feedback.json"])``). Any error
names the file and the offending key or index and is raised as :class:`CaiError`.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from constitutional.errors import CaiError, yaml_problem

FEEDBACK_KINDS = ("harmless", "helpful")


@dataclass(frozen=True)
class Principle:
    """One SL principle: a critique request and the matching revision request.

    ``feedback`` optionally names the feedback principle that judges the same value, so that
    constitution-guided selection in stage 1 can score candidate revisions under it.
    """

    id: str
    critique_request: str
    revision_request: str
    feedback: str | None = None


@dataclass(frozen=True)
class FeedbackPrinciple:
    """One feedback principle: the question a feedback model answers about two responses."""

    id: str
    text: str
    kind: str = "harmless"
    follows: str | None = None
    violates: str | None = None
    # the constitution's shared stance (``contrast_base``) that starts follows / violates, if any
    base_follows: str | None = None
    base_violates: str | None = None


@dataclass(frozen=True)
class Constitution:
    name: str
    sl_principles: tuple[Principle, ...] = ()
    feedback_principles: tuple[FeedbackPrinciple, ...] = ()
    sources: tuple[str, ...] = field(default=())
    # kind -> openings of a response that follows the principles of that kind (optional; see module doc)
    openings: dict = field(default_factory=dict)
    # kind -> openings of a response that violates the principles of that kind (optional)
    violates_openings: dict = field(default_factory=dict)
    # why a response that follows the harmless principles declines: fills an opening's {reason} slot
    reasons: tuple[str, ...] = ()

    def require_sl(self) -> None:
        if not self.sl_principles:
            raise CaiError(f"constitution {self.name!r} has no sl_principles (needed for critique-revise)")


def sample_principles(principles: Sequence, count: int, seed: int, key: str) -> list:
    """Draw ``count`` principles uniformly at random, with replacement, as the paper does.

    The draw depends only on ``seed`` and ``key`` (a prompt id), not on batch order, so a
    resumed run draws the same principles for the same prompt.

    >>> ps = ["a", "b", "c"]
    >>> sample_principles(ps, 4, seed=0, key="rt-0001") == sample_principles(ps, 4, 0, "rt-0001")
    True
    """
    if not principles:
        raise ValueError("no principles to sample from")
    rng = random.Random(f"{seed}:{key}")
    return [principles[rng.randrange(len(principles))] for _ in range(count)]


# ---------------------------------------------------------------- loading


def builtin_constitutions() -> list[str]:
    folder = resources.files("constitutional") / "data" / "constitutions"
    return sorted(p.name.rsplit(".", 1)[0] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _builtin_path(name: str) -> Path:
    return Path(str(resources.files("constitutional") / "data" / "constitutions" / f"{name}.yaml"))


def load_constitution(spec: str | Path | Sequence[str | Path]) -> Constitution:
    """Load a built-in name (``default``), a file path, or a list of them merged in order."""
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise CaiError("constitution: an empty list names no file")
        parts = [load_constitution(s) for s in spec]
        return _merge(parts)
    spec = str(spec)
    path = Path(spec)
    if not path.exists() and spec in builtin_constitutions():
        path = _builtin_path(spec)
    if not path.exists():
        known = ", ".join(builtin_constitutions())
        raise CaiError(f"constitution {spec!r}: no such file (built-in constitutions: {known})")
    if path.is_dir():
        raise CaiError(f"constitution {spec!r}: is a directory (give a YAML or JSON file)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CaiError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise CaiError(f"{path}: not valid JSON: {e.msg} at line {e.lineno}") from None
        return _from_anthropic_json(data, path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise CaiError(f"{path}: {yaml_problem(e)}") from None
    return _from_yaml(data, path)


def _merge(parts: list[Constitution]) -> Constitution:
    sl: list[Principle] = []
    fb: list[FeedbackPrinciple] = []
    for part in parts:
        for p in part.sl_principles:
            if any(q.id == p.id for q in sl):
                raise CaiError(f"{part.sources[0]}: sl principle id {p.id!r} is already defined")
            sl.append(p)
        for p in part.feedback_principles:
            if any(q.id == p.id for q in fb):
                raise CaiError(f"{part.sources[0]}: feedback principle id {p.id!r} is already defined")
            fb.append(p)
    sources = tuple(s for part in parts for s in part.sources)
    openings: dict = {}
    violates: dict = {}
    reasons: tuple[str, ...] = ()
    for part in parts:
        reasons += part.reasons
        for kind, items in part.openings.items():
            openings[kind] = openings.get(kind, ()) + items
        for kind, items in part.violates_openings.items():
            violates[kind] = violates.get(kind, ()) + items
    return Constitution("+".join(p.name for p in parts), tuple(sl), tuple(fb), sources, openings, violates, reasons)


def _text(value, path: Path, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise CaiError(f"{path}: {where}: expected a non-empty string, got {value!r}")
    return " ".join(value.split()) if "\n" in value.strip() else value.strip()


def _check_keys(item, allowed: set[str], required: set[str], path: Path, where: str) -> None:
    if not isinstance(item, dict):
        raise CaiError(f"{path}: {where}: expected a mapping, got {type(item).__name__}")
    for key in item:
        if key not in allowed:
            raise CaiError(f"{path}: {where}: unknown key {key!r} (allowed: {', '.join(sorted(allowed))})")
    for key in sorted(required):
        if key not in item:
            raise CaiError(f"{path}: {where}: missing key {key!r}")


def _from_yaml(data, path: Path) -> Constitution:
    top = {"name", "version", "description", "sl_principles", "feedback_principles", "contrast_base", "openings",
           "violates_openings", "reasons"}
    _check_keys(data, top, set(), path, "top level")
    base = _contrast_base(data.get("contrast_base"), path)
    if "sl_principles" not in data and "feedback_principles" not in data:
        raise CaiError(f"{path}: top level: needs sl_principles or feedback_principles")
    sl: list[Principle] = []
    for i, item in enumerate(data.get("sl_principles") or []):
        where = f"sl_principles[{i}]"
        _check_keys(item, {"id", "critique_request", "revision_request", "feedback"},
                    {"id", "critique_request", "revision_request"}, path, where)
        p = Principle(
            id=_text(item["id"], path, f"{where}.id"),
            critique_request=_text(item["critique_request"], path, f"{where}.critique_request"),
            revision_request=_text(item["revision_request"], path, f"{where}.revision_request"),
            feedback=_text(item["feedback"], path, f"{where}.feedback") if "feedback" in item else None,
        )
        if any(q.id == p.id for q in sl):
            raise CaiError(f"{path}: {where}.id: duplicate id {p.id!r}")
        sl.append(p)
    fb: list[FeedbackPrinciple] = []
    for i, item in enumerate(data.get("feedback_principles") or []):
        where = f"feedback_principles[{i}]"
        _check_keys(item, {"id", "kind", "text", "follows", "violates"}, {"id", "text"}, path, where)
        kind = item.get("kind", "harmless")
        if kind not in FEEDBACK_KINDS:
            raise CaiError(f"{path}: {where}.kind: expected one of {', '.join(FEEDBACK_KINDS)}, got {kind!r}")
        follows = _text(item["follows"], path, f"{where}.follows") if "follows" in item else None
        violates = _text(item["violates"], path, f"{where}.violates") if "violates" in item else None
        if kind in base:  # the shared stance first, then what this principle adds
            follows = " ".join(x for x in (base[kind][0], follows) if x)
            violates = " ".join(x for x in (base[kind][1], violates) if x)
        p = FeedbackPrinciple(
            id=_text(item["id"], path, f"{where}.id"),
            text=_text(item["text"], path, f"{where}.text"),
            kind=kind,
            follows=follows,
            violates=violates,
            base_follows=base[kind][0] if kind in base else None,
            base_violates=base[kind][1] if kind in base else None,
        )
        if any(q.id == p.id for q in fb):
            raise CaiError(f"{path}: {where}.id: duplicate id {p.id!r}")
        fb.append(p)
    for key in ("sl_principles", "feedback_principles"):
        if key in data and not isinstance(data[key], list):
            raise CaiError(f"{path}: {key}: expected a list, got {type(data[key]).__name__}")
    fb_ids = {q.id for q in fb}
    for i, p in enumerate(sl):
        if p.feedback is not None and p.feedback not in fb_ids:
            raise CaiError(f"{path}: sl_principles[{i}].feedback: no feedback principle with id {p.feedback!r}")
    openings = _openings(data.get("openings"), path)
    violates = _openings(data.get("violates_openings"), path, "violates_openings")
    reasons = _reasons(data.get("reasons"), openings, violates, path)
    name = str(data.get("name") or path.stem)
    return Constitution(name, tuple(sl), tuple(fb), (str(path),), openings, violates, reasons)


def _openings(data, path: Path, key: str = "openings") -> dict[str, tuple[str, ...]]:
    """``openings: {kind: [text, ...]}`` -> {kind: (text, ...)} (also ``violates_openings``)."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CaiError(f"{path}: {key}: expected a mapping of kind -> list of openings")
    out = {}
    for kind, items in data.items():
        if kind not in FEEDBACK_KINDS:
            raise CaiError(f"{path}: {key}.{kind}: unknown kind (kinds: {', '.join(FEEDBACK_KINDS)})")
        if not isinstance(items, list) or not items:
            raise CaiError(f"{path}: {key}.{kind}: expected a non-empty list of strings")
        out[kind] = tuple(_text(t, path, f"{key}.{kind}[{i}]") for i, t in enumerate(items))
    return out


def _reasons(data, openings: dict, violates: dict, path: Path) -> tuple[str, ...]:
    """``reasons: [text, ...]``; a ``{reason}`` slot may only stand in a harmless opening, and needs reasons."""
    if data is not None and (not isinstance(data, list) or not data):
        raise CaiError(f"{path}: reasons: expected a non-empty list of strings")
    reasons = tuple(_text(t, path, f"reasons[{i}]") for i, t in enumerate(data or []))
    for key, table in (("openings", openings), ("violates_openings", violates)):
        for kind, items in table.items():
            for i, text in enumerate(items):
                if "{reason}" not in text:
                    continue
                if key != "openings" or kind != "harmless":
                    raise CaiError(f"{path}: {key}.{kind}[{i}]: a {{reason}} slot is only allowed in openings.harmless")
                if not reasons:
                    raise CaiError(f"{path}: {key}.{kind}[{i}]: has a {{reason}} slot but the file lists no reasons")
    return reasons


def _contrast_base(data, path: Path) -> dict[str, tuple[str, str]]:
    """``contrast_base: {harmless: {follows, violates}, helpful: {...}}`` -> {kind: (follows, violates)}."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CaiError(f"{path}: contrast_base: expected a mapping of kind -> follows/violates")
    out = {}
    for kind, item in data.items():
        if kind not in FEEDBACK_KINDS:
            raise CaiError(f"{path}: contrast_base.{kind}: unknown kind (kinds: {', '.join(FEEDBACK_KINDS)})")
        _check_keys(item, {"follows", "violates"}, {"follows", "violates"}, path, f"contrast_base.{kind}")
        out[kind] = (_text(item["follows"], path, f"contrast_base.{kind}.follows"),
                     _text(item["violates"], path, f"contrast_base.{kind}.violates"))
    return out


def _from_anthropic_json(data, path: Path) -> Constitution:
    """Anthropic's formats: SL pairs as an object, feedback principles as a list of strings."""
    if isinstance(data, dict):
        sl: list[Principle] = []
        for name, item in data.items():
            where = f"[{name!r}]"
            _check_keys(item, {"prompt", "edit_request"}, {"prompt", "edit_request"}, path, where)
            critique = item["prompt"]
            if isinstance(critique, list):
                if len(critique) != 1:
                    raise CaiError(f"{path}: {where}.prompt: expected a list of one critique request")
                critique = critique[0]
            sl.append(Principle(
                id=_text(name, path, f"{where} (name)"),
                critique_request=_text(critique, path, f"{where}.prompt"),
                revision_request=_text(item["edit_request"], path, f"{where}.edit_request"),
            ))
        if not sl:
            raise CaiError(f"{path}: the object holds no principles")
        return Constitution(path.stem, tuple(sl), (), (str(path),))
    if isinstance(data, list):
        if not data:
            raise CaiError(f"{path}: the list holds no principles")
        fb = [
            FeedbackPrinciple(id=f"{path.stem}-{i}", text=_text(text, path, f"[{i}]"))
            for i, text in enumerate(data)
        ]
        return Constitution(path.stem, (), tuple(fb), (str(path),))
    raise CaiError(f"{path}: expected an object of SL principles or a list of feedback principles, "
                   f"got {type(data).__name__}")
