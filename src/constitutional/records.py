"""Row dataclasses and append-only, resumable JSONL files.

Long stages write each finished row at once (``JsonlAppender.append`` flushes and fsyncs),
so a crash loses at most the rows in flight. On reopening, a torn last line (the process
was killed mid-write) is cut off and the ids already written are known, so a rerun skips
them: nothing is lost and nothing is written twice.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from constitutional.distributed import is_main
from constitutional.errors import CaiError


@dataclass
class Round:
    """One critique-revision round of stage 1."""

    principle_id: str
    critique_request: str
    critique: str
    revision_request: str
    revision: str
    degenerate: str | None = None  # why the revision was not usable, or None
    # constitution-guided selection: every candidate ({text, source, score, degenerate}) and the kept one
    candidates: list[dict] | None = None
    selected: int | None = None


@dataclass
class RevisionRow:
    """One row of ``critique_revise/revisions.jsonl``.

    ``messages`` is TRL's conversational SFT format: the user prompt and the final usable
    revision. ``degenerate`` names the reason when no round gave a usable revision; such rows
    are kept (for the audit trail) but later stages leave them out.
    """

    id: str
    prompt: str
    initial_response: str
    rounds: list[Round]
    messages: list[dict]
    model: str
    principle_ids: list[str] = field(default_factory=list)
    category: str | None = None
    degenerate: str | None = None
    initial_candidates: list[dict] | None = None  # with initial selection: every candidate and its score
    target: dict | None = None  # with the target filter: what was kept and why each candidate was dropped

    def to_dict(self) -> dict:
        return asdict(self)


def read_jsonl(path: str | Path) -> list[dict]:
    """Read a JSONL file; a malformed line is an error naming the file and line number."""
    return list(iter_jsonl(path))


def iter_jsonl(path: str | Path) -> Iterator[dict]:
    path = Path(path)
    if not path.is_file():
        raise CaiError(f"{path}: no such file")
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise CaiError(f"{path}: line {lineno}: not UTF-8 text ({e.reason} at byte {e.start}; a line cut "
                               f"off inside a character?)") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise CaiError(f"{path}: line {lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise CaiError(f"{path}: line {lineno}: expected a JSON object")
            yield row


def write_json(path: str | Path, data) -> None:
    """Write JSON atomically (temp file + rename), so a reader never sees half a file.

    In a multi-process training launch only the main process writes (see ``distributed.py``).
    """
    if not is_main():
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


class JsonlAppender:
    """An append-only JSONL file keyed by ``id``, safe to reopen after a crash.

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "rows.jsonl"
    >>> with JsonlAppender(p) as out:
    ...     out.append({"id": "a", "x": 1})
    >>> JsonlAppender(p).done_ids
    {'a'}
    """

    def __init__(self, path: str | Path, key: str = "id"):
        self.path = Path(path)
        self.key = key
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.repaired_bytes = _cut_torn_tail(self.path)
        self.done_ids: set[str] = set()
        if self.path.exists():
            for row in iter_jsonl(self.path):
                self.done_ids.add(str(row[self.key]))
        self._file = None

    def append(self, row: dict) -> None:
        row_id = str(row[self.key])
        if row_id in self.done_ids:
            raise ValueError(f"{self.path}: id {row_id!r} is already written")
        if not is_main():  # a multi-process launch: the main process writes the rows
            self.done_ids.add(row_id)
            return
        if self._file is None:
            self._file = self.path.open("a", encoding="utf-8")
        self._file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.done_ids.add(row_id)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _cut_torn_tail(path: Path) -> int:
    """Truncate a last line that has no newline or is not valid JSON; return bytes removed."""
    if not path.exists() or path.stat().st_size == 0:
        return 0
    data = path.read_bytes()
    keep = len(data)
    if not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
    else:
        last_start = data.rfind(b"\n", 0, len(data) - 1) + 1
        try:
            json.loads(data[last_start:])
        except json.JSONDecodeError:
            keep = last_start
    if keep < len(data):
        with path.open("r+b") as f:
            f.truncate(keep)
    return len(data) - keep


def portable_path(spec: str, out_dir: str | Path) -> str:
    """A model spec or file as a run directory's records keep it: a path inside the run directory is
    made relative to it, so a copied or moved run still matches what it recorded.

    >>> portable_path("/runs/a/sft/model", "/runs/a"), portable_path("smollm2-135m-instruct", "/runs/a")
    ('sft/model', 'smollm2-135m-instruct')
    """
    try:
        return Path(spec).relative_to(out_dir).as_posix()
    except ValueError:
        return spec


def check_resume_settings(stage_dir: str | Path, settings: dict, free: set[str] = frozenset()) -> None:
    """Refuse to resume a stage whose existing output was made with other settings.

    ``settings`` is what the outputs depend on (the stage's config section, the seed, the
    constitution); keys in ``free`` may change between runs (``limit``, ``batch_size``, ...).
    The first run records them in ``settings.json``; a later run with different values stops
    with an error naming the keys, instead of mixing outputs of two configs in one file.
    Paths inside the run directory are compared relative to it (``portable_path``), so a
    copied or moved run directory resumes.
    """
    path = Path(stage_dir) / "settings.json"
    run_dir = Path(stage_dir).parent

    def portable(values: dict) -> dict:
        return {k: portable_path(v, run_dir) if isinstance(v, str) else v for k, v in values.items()}

    current = portable({k: v for k, v in settings.items() if k not in free})
    if path.exists():
        try:
            before = json.loads(path.read_text())
        except json.JSONDecodeError:
            before = None
        if isinstance(before, dict):
            before = portable(before)  # settings written before paths were recorded relative
            if before != current:
                changed = sorted(k for k in set(before) | set(current) if before.get(k) != current.get(k))
                raise CaiError(f"{stage_dir}: existing output was made with other settings ({', '.join(changed)}); "
                               f"use another --out, or delete {stage_dir} to start the stage again")
    write_json(path, current)


# ------------------------------------------------------------------ preference rows


def _as_messages(value, role: str, path: Path, lineno: int, key: str) -> list[dict]:
    if isinstance(value, str) and value.strip():
        return [{"role": role, "content": value}]
    if isinstance(value, list) and value and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                 and m.get("role") in ("system", "user", "assistant") for m in value):
        return value
    raise CaiError(f"{path}: line {lineno}: '{key}' must be a string or a list of role/content messages")


def load_comparisons(path: Path) -> list[dict]:
    """Validated preference rows: prompt/chosen/rejected as messages, p_chosen in [0, 1] (default 1)."""
    if not path.is_file():
        raise CaiError(f"comparisons file {path}: no such file (run `cai label` first)")
    rows = []
    for lineno, row in enumerate(iter_jsonl(path), 1):
        for key in ("prompt", "chosen", "rejected"):
            if key not in row:
                raise CaiError(f"{path}: line {lineno}: missing '{key}'")
        p = row.get("p_chosen", 1.0)
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
            raise CaiError(f"{path}: line {lineno}: p_chosen must be a number in [0, 1], got {p!r}")
        prompt = _as_messages(row["prompt"], "user", path, lineno, "prompt")
        rows.append({
            "prompt": prompt,
            "chosen": _as_messages(row["chosen"], "assistant", path, lineno, "chosen"),
            "rejected": _as_messages(row["rejected"], "assistant", path, lineno, "rejected"),
            "p_chosen": float(p),
            "key": "\n".join(m["content"] for m in prompt),
        })
    if not rows:
        raise CaiError(f"comparisons file {path}: empty")
    return rows
