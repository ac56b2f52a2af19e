"""Does a refactor change behaviour? Run the same fixed-seed tiny pipeline at two git revisions and compare
every row, metric and the report's text.

    .venv/bin/python bench/compare_revisions.py BEFORE [AFTER]      # AFTER: the working tree

Each revision is checked out into a temporary git worktree (the working tree for AFTER if it is not given)
and runs ``cai run configs/smollm2-cpu.yaml`` with the tiny random Llama of the tests and the test suite's
tiny settings (the paper's loop: contrast labels, a PM and PPO, so every stage runs), in float32 on the
CPU, into its own run directory. Then every ``.json`` and ``.jsonl`` file of the two runs is compared
value by value, with wall times, rates of tokens per second, absolute paths and version strings left out,
and so is the visible text of ``report.html``. Prints each difference (file, row, key: before -> after)
and exits 1 if there is any.
Takes about two minutes on 2 CPU cores.
"""

from __future__ import annotations

import html
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import build_tiny_llama  # noqa: E402
from tests.test_pipeline import tiny_overrides  # noqa: E402

VOLATILE = re.compile(r"seconds|per_second|_time$|^time|started|finished|elapsed|versions|^python$|wall|date")


def run(source: Path, model: Path, out: Path) -> None:
    cmd = [sys.executable, "-m", "constitutional.cli", "run", "configs/smollm2-cpu.yaml", "--out", str(out),
           *tiny_overrides(model)]
    env = {**os.environ, "PYTHONPATH": str(source / "src"), "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(cmd, cwd=source, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"cai run failed at {source}:\n{done.stderr[-3000:]}")


def normalise(value, run_dir: str):
    if isinstance(value, dict):
        return {k: normalise(v, run_dir) for k, v in value.items() if not VOLATILE.search(k)}
    if isinstance(value, list):
        return [normalise(v, run_dir) for v in value]
    if isinstance(value, str):  # the run directory and the source tree a run came from
        return re.sub(r"\S*/tree-\d/", "<src>/", value.replace(run_dir, "<run>"))
    return value


def load(path: Path, run_dir: Path):
    text = path.read_text()
    if path.suffix == ".jsonl":
        return [normalise(json.loads(line), str(run_dir)) for line in text.splitlines() if line.strip()]
    return normalise(json.loads(text), str(run_dir))


def differences(a, b, where: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            out += differences(a.get(key, "<missing>"), b.get(key, "<missing>"), f"{where}.{key}")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [f"{where}: {json.dumps(a)[:120]} -> {json.dumps(b)[:120]}"]


def visible_text(page: str) -> str:
    """The page's text, less wall times and tokens per second (the stages table)."""
    page = re.sub(r"<style>.*?</style>", "", page, flags=re.S)
    page = re.sub(r"<img [^>]*>", "[image]", page)
    text = " ".join(html.unescape(re.sub(r"<[^>]+>", " ", page)).split())
    return re.sub(r"tokens_per_second: [\d.]+|\b(done|failed) \d+ s\b", "", text)


def main() -> int:
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    work = Path(tempfile.mkdtemp(prefix="cai-compare-"))
    model = build_tiny_llama(work / "tiny")
    sources = []
    for k, rev in enumerate(sys.argv[1:3]):
        tree = work / f"tree-{k}"
        subprocess.run(["git", "worktree", "add", "--detach", "-f", str(tree), rev], cwd=ROOT, check=True,
                       capture_output=True)
        sources.append(tree)
    if len(sources) == 1:
        sources.append(ROOT)
    runs = []
    try:
        for k, source in enumerate(sources):
            out = work / f"run-{k}" / "run"
            out.parent.mkdir()
            run(source, model, out)
            runs.append(out)
    finally:
        for source in sources:
            if source != ROOT:
                subprocess.run(["git", "worktree", "remove", "--force", str(source)], cwd=ROOT, capture_output=True)
    before, after = runs
    found = []
    names = sorted({p.relative_to(before) for p in before.rglob("*") if p.suffix in (".json", ".jsonl")}
                   | {p.relative_to(after) for p in after.rglob("*") if p.suffix in (".json", ".jsonl")})
    for name in names:
        if not (before / name).is_file() or not (after / name).is_file():
            found.append(f"{name}: only in {'after' if (after / name).is_file() else 'before'}")
            continue
        found += differences(load(before / name, before), load(after / name, after), str(name))
    text_a, text_b = (visible_text((r / "report.html").read_text()).replace(str(r), "<run>") for r in runs)
    if text_a != text_b:
        words_a, words_b = text_a.split(), text_b.split()
        pairs = enumerate(zip(words_a, words_b, strict=False))
        at = next((i for i, (x, y) in pairs if x != y), min(len(words_a), len(words_b)))
        found.append(f"report.html text differs at word {at}: {' '.join(words_a[at - 6:at + 10])!r} -> "
                     f"{' '.join(words_b[at - 6:at + 10])!r}")
    print(f"compared {len(names)} files and report.html of {sys.argv[1]} and "
          f"{sys.argv[2] if len(sys.argv) > 2 else 'the working tree'}")
    for line in found:
        print("  " + line)
    print("identical" if not found else f"{len(found)} differences")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
