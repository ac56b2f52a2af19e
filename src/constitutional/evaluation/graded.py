"""Answers that people labelled by reading them against the rubric: the yardstick for every judge.

Two sets, both for measuring judges only (nothing trains on them, and no judge is tuned on a test
split):

* ``data/verdicts/graded.jsonl``: answers of the project's own snapshots (the base model, and the
  SL-CAI and RL-CAI models of the demo and of the full config; greedy and sampled; red-team and
  helpful prompts from train splits and AdvBench, never a held-out split the evaluation reports
  on). Each row: ``id``, ``source`` (the snapshot), ``decoding``, ``kind``, ``prompt_id``,
  ``prompt``, ``response``, ``split`` (``dev`` or ``test``, by prompt: every answer to a prompt is
  on one side, see ``split_rule``), ``labels`` (the rubric's fields that apply to the kind) and
  ``note`` (the reader's few words). ``tools/graded_answers.py`` made the answers.
* ``data/verdicts/uncensorbench_labels.jsonl``: the labels of UncensorBench's reference answers (a
  refusal and a compliant answer per prompt, written outside this project and fetched from its
  wheel, ``datasets.uncensorbench_references``), read against the same rubric; its 150 requests are
  halved into ``dev`` and ``test`` by the same rule (the rules judge was written on the project's
  answers and first measured on all 300; since 2026-12-03 it may be tuned on the dev half only).
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from constitutional.errors import CaiError
from constitutional.evaluation.rubric import fields_for
from constitutional.prompt_sources import uncensorbench_references
from constitutional.records import iter_jsonl

GRADED_FILE = "graded.jsonl"
REFERENCE_LABELS_FILE = "uncensorbench_labels.jsonl"
SPLITS = ("dev", "test", "all")
TEST_SETS = ("graded", "uncensorbench")


@dataclass(frozen=True)
class GradedAnswer:
    id: str
    kind: str
    prompt_id: str
    prompt: str
    response: str
    split: str
    labels: dict = field(hash=False)
    source: str = ""
    note: str = ""


def _data_path(name: str) -> Path:
    return Path(str(resources.files("constitutional") / "data" / "verdicts" / name))


def prompt_group(prompt_id: str, kind: str) -> str:
    """The group a prompt is split within: its source set (``rt``, ``advbench``, ``hp``, ...) and kind."""
    return f"{kind}:{prompt_id.rsplit('-', 1)[0]}"


def split_rule(prompts: list[tuple[str, str]]) -> dict[str, str]:
    """dev or test for each (prompt id, kind): within each group, prompts sorted by CRC-32 of the id
    are dealt alternately to dev and test, so every group is halved (to within one).

    >>> split_rule([("rt-1", "red-team"), ("rt-2", "red-team"), ("hp-1", "helpful"), ("hp-2", "helpful")])
    {'hp-2': 'dev', 'hp-1': 'test', 'rt-2': 'dev', 'rt-1': 'test'}
    """
    groups: dict[str, list[str]] = defaultdict(list)
    for pid, kind in sorted(set(prompts)):
        groups[prompt_group(pid, kind)].append(pid)
    out = {}
    for group in sorted(groups):
        for i, pid in enumerate(sorted(groups[group], key=lambda p: (zlib.crc32(p.encode()), p))):
            out[pid] = "dev" if i % 2 == 0 else "test"
    return out


def _check_labels(path: Path, i: int, kind: str, labels) -> dict:
    if not isinstance(labels, dict):
        raise CaiError(f"{path}: row {i}: needs a 'labels' mapping")
    for name in fields_for(kind):
        if not isinstance(labels.get(name), bool):
            raise CaiError(f"{path}: row {i}: labels.{name} must be true or false for a {kind} answer")
    return {name: labels[name] for name in fields_for(kind)}


def load_graded(split: str = "test") -> list[GradedAnswer]:
    """The graded answers of the project's snapshots in ``split`` (``dev``, ``test`` or ``all``)."""
    if split not in SPLITS:
        raise CaiError(f"graded split {split!r}: expected one of {', '.join(SPLITS)}")
    path = _data_path(GRADED_FILE)
    rows = []
    for i, row in enumerate(iter_jsonl(path), 1):
        for key in ("id", "kind", "prompt_id", "prompt", "response", "split"):
            if not isinstance(row.get(key), str):
                raise CaiError(f"{path}: row {i}: needs a string {key!r}")
        if row["kind"] not in ("red-team", "helpful") or row["split"] not in ("dev", "test"):
            raise CaiError(f"{path}: row {i}: kind must be red-team or helpful, split dev or test")
        labels = _check_labels(path, i, row["kind"], row.get("labels"))
        if split in ("all", row["split"]):
            rows.append(GradedAnswer(row["id"], row["kind"], row["prompt_id"], row["prompt"], row["response"],
                                     row["split"], labels, row.get("source", ""), row.get("note", "")))
    return rows


def load_reference_answers(split: str = "test") -> list[GradedAnswer]:
    """UncensorBench's reference answers in ``split`` (``dev``, ``test`` or ``all``: 300), with the labels
    read for them. The 150 requests are halved by ``split_rule``, both answers of a request on one side.

    Their text comes from the benchmark's wheel (fetched once into the cache); the labels from the package.
    """
    if split not in SPLITS:
        raise CaiError(f"graded split {split!r}: expected one of {', '.join(SPLITS)}")

    path = _data_path(REFERENCE_LABELS_FILE)
    labels = {}
    for i, row in enumerate(iter_jsonl(path), 1):
        if not isinstance(row.get("id"), str) or "|" not in row["id"]:
            raise CaiError(f"{path}: row {i}: needs an 'id' like ub-cyber_001|refusal")
        labels[row["id"]] = (_check_labels(path, i, "red-team", row.get("labels")), row.get("note", ""))
    refs = uncensorbench_references()
    sides = split_rule([(ref.id, "red-team") for ref in refs])
    out = []
    for ref in refs:
        if split not in ("all", sides[ref.id]):
            continue
        for side, text in (("refusal", ref.refusal), ("compliant", ref.compliant)):
            key = f"{ref.id}|{side}"
            if key not in labels:
                raise CaiError(f"{path}: no labels for {key}")
            out.append(GradedAnswer(key, "red-team", ref.id, ref.prompt, text, sides[ref.id], labels[key][0],
                                    f"uncensorbench-{side}", labels[key][1]))
    return out


def load_test_set(name: str, split: str = "test") -> list[GradedAnswer]:
    """A test set by name, ``graded`` or ``uncensorbench``, in ``split``."""
    if name == "graded":
        return load_graded(split)
    if name == "uncensorbench":
        return load_reference_answers(split)
    raise CaiError(f"unknown graded set {name!r} (known: {', '.join(TEST_SETS)})")
