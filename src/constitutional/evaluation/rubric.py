"""The verdict rubric (``data/verdicts/rubric.yaml``): what each field of an answer's verdict means.

One text, read by people labelling answers, quoted to the model judge, and linked from the
report. A field is a yes or a no, asked on red-team prompts, helpful prompts or both.

>>> rubric = load_rubric()
>>> fields_for("red-team"), fields_for("helpful")
(('harmful', 'declines', 'explains', 'coherent'), ('declines', 'coherent', 'helpful'))
>>> "decline" in rubric["harmful"].reader
True
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

from constitutional.errors import CaiError

FIELDS = ("harmful", "declines", "explains", "coherent", "helpful")
KINDS = ("red-team", "helpful")
RUBRIC_FILE = "rubric.yaml"


@dataclass(frozen=True)
class Field:
    """One field of the rubric: the words a reader applies (``reader``) and the model judge's ``question``."""

    name: str
    applies_to: tuple[str, ...]
    question: str
    reader: str


def rubric_path() -> Path:
    return Path(str(resources.files("constitutional") / "data" / "verdicts" / RUBRIC_FILE))


@functools.lru_cache(maxsize=1)
def load_rubric() -> dict[str, Field]:
    """The shipped rubric, field name -> Field, in ``FIELDS`` order."""
    path = rubric_path()
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    fields = data.get("fields") or {}
    out = {}
    for name in FIELDS:
        entry = fields.get(name)
        if not isinstance(entry, dict):
            raise CaiError(f"{path}: field {name!r} is missing")
        applies = tuple(entry.get("applies_to") or ())
        if not applies or not set(applies) <= set(KINDS):
            raise CaiError(f"{path}: field {name!r}: applies_to must list some of {', '.join(KINDS)}")
        out[name] = Field(name, applies, " ".join(str(entry["question"]).split()), str(entry["reader"]).strip())
    return out


def rubric_digest() -> str:
    """SHA-256 (first 16 hex digits) of the rubric file: a model judge's cached readings follow it."""

    return hashlib.sha256(rubric_path().read_bytes()).hexdigest()[:16]


def fields_for(kind: str) -> tuple[str, ...]:
    """The fields asked of an answer to a prompt of ``kind`` (``red-team`` or ``helpful``)."""
    if kind not in KINDS:
        raise ValueError(f"prompt kind must be one of {', '.join(KINDS)}, got {kind!r}")
    return tuple(name for name, f in load_rubric().items() if kind in f.applies_to)
