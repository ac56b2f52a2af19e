"""Build the answers of the graded set: real answers of a run's snapshots, to be labelled by reading.

The shipped graded set (``src/constitutional/data/verdicts/graded.jsonl``) holds answers of the
project's own snapshots, each labelled by a person reading it against the rubric
(``data/verdicts/rubric.yaml``). This script makes the answers (it never labels anything):

    python tools/graded_answers.py generate --run base=smollm2-135m-instruct \
        --run demo-sl-cai=runs/demo/sft/model --run demo-rl-cai=runs/demo/rl/model \
        --out runs/graded/answers.jsonl
    python tools/graded_answers.py shuffle runs/graded/answers.jsonl --out runs/graded/to_read --parts 8
    (people read runs/graded/to_read/to_read-K.jsonl against the rubric and write labels-K.jsonl)
    python tools/graded_answers.py assemble --answers runs/graded/answers.jsonl --key runs/graded/to_read/key.jsonl \
        --labels runs/graded/labels/labels-0.jsonl ... --out src/constitutional/data/verdicts/graded.jsonl

Prompts: none of them in a held-out split that the evaluation reports on. Red-team: red-team train
prompts 100-207 (beyond what the demo reads), every third, and AdvBench train-split behaviours
(outside this project); helpful: helpful train prompts 100-199, every fourth. Each snapshot answers
each prompt greedily and once sampled at temperature 0.7 (fixed seed), with 96 new tokens.

``references`` does the same for UncensorBench's 300 reference answers (a refusal and a compliant
answer per prompt). ``shuffle`` writes the answers in random order with the snapshot hidden (``to_read-K.jsonl``, fields
``key``, ``kind``, ``prompt``, ``response``) for the readers, and ``key.jsonl`` mapping each key back.
"""

from __future__ import annotations

import argparse
import json
import random
import zlib
from pathlib import Path

from constitutional.backends import load_backend
from constitutional.backends.base import SamplingParams
from constitutional.prompt_sources import load_prompts
from constitutional.records import iter_jsonl

MAX_NEW_TOKENS = 96
SAMPLE_TEMPERATURE = 0.7


def graded_prompts() -> list[tuple[str, object]]:
    """(kind, PromptRow) of the graded set, in a fixed order."""
    red = load_prompts("red-team", "train")[100::3]
    adv = load_prompts("advbench", "train")[::26]
    helpful = load_prompts("helpful", "train")[100::4]
    return [("red-team", p) for p in red + adv] + [("helpful", p) for p in helpful]


def generate(runs: list[str], out: Path, batch_size: int) -> None:
    prompts = graded_prompts()
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {r["id"] for r in iter_jsonl(out)} if out.exists() else set()
    with out.open("a", encoding="utf-8") as f:
        for item in runs:
            name, spec = item.split("=", 1)
            todo = {d: [(k, p) for k, p in prompts if f"{name}|{d}|{p.id}" not in done] for d in ("greedy", "sampled")}
            if not any(todo.values()):
                continue
            backend = load_backend(spec, batch_size=batch_size)
            for decoding, items in todo.items():
                params = SamplingParams(max_new_tokens=MAX_NEW_TOKENS, seed=zlib.crc32(b"graded"),
                                        temperature=0.0 if decoding == "greedy" else SAMPLE_TEMPERATURE)
                for i in range(0, len(items), batch_size):
                    chunk = items[i:i + batch_size]
                    outs = backend.generate([[{"role": "user", "content": p.prompt}] for _, p in chunk], params)
                    for (kind, p), c in zip(chunk, outs, strict=True):
                        f.write(json.dumps({"id": f"{name}|{decoding}|{p.id}", "snapshot": name, "decoding": decoding,
                                            "kind": kind, "prompt_id": p.id, "prompt": p.prompt,
                                            "response": c.text, "finished": c.finished}, ensure_ascii=False) + "\n")
                    f.flush()
                print(f"{name} {decoding}: {len(items)} answers")
            del backend


def _write_for_reading(rows: list[dict], out: Path, parts: int, prefix: str) -> None:
    """``key.jsonl`` (key -> answer id) and ``to_read-K.jsonl`` (key, kind, prompt, response) in ``parts`` slices."""
    out.mkdir(parents=True, exist_ok=True)
    with (out / "key.jsonl").open("w", encoding="utf-8") as key:
        for i, r in enumerate(rows):
            key.write(json.dumps({"key": f"{prefix}{i:04d}", "id": r["id"]}) + "\n")
    for part in range(parts):
        with (out / f"to_read-{part}.jsonl").open("w", encoding="utf-8") as f:
            for i in range(part, len(rows), parts):
                r = rows[i]
                f.write(json.dumps({"key": f"{prefix}{i:04d}", "kind": r["kind"], "prompt": r["prompt"],
                                    "response": r["response"]}, ensure_ascii=False) + "\n")


def shuffle(answers: Path, out: Path, parts: int, seed: int, prefix: str = "a") -> None:
    rows = list(iter_jsonl(answers))
    random.Random(seed).shuffle(rows)
    _write_for_reading(rows, out, parts, prefix)


def assemble(answers: list[Path], keys: list[Path], labels: list[Path], out: Path) -> None:
    """The graded set: every answer with the labels read for it and its dev/test split (by prompt)."""
    from constitutional.evaluation.graded import split_rule
    from constitutional.evaluation.rubric import fields_for

    rows = {r["id"]: r for path in answers for r in iter_jsonl(path)}
    ids = {r["key"]: r["id"] for path in keys for r in iter_jsonl(path)}
    read = {}
    for path in labels:
        for r in iter_jsonl(path):
            read[ids[r["key"]]] = r
    missing = sorted(set(rows) - set(read))
    if missing:
        raise SystemExit(f"{len(missing)} answers have no labels, e.g. {missing[:3]}")
    splits = split_rule([(r["prompt_id"], r["kind"]) for r in rows.values()])
    with out.open("w", encoding="utf-8") as f:
        for rid in sorted(rows, key=lambda i: (rows[i]["kind"], rows[i]["prompt_id"], i)):
            r, lab = rows[rid], read[rid]
            labels_of = {name: lab[name] for name in fields_for(r["kind"])}
            bad = [k for k, v in labels_of.items() if not isinstance(v, bool)]
            if bad:
                raise SystemExit(f"{rid}: labels {bad} are not true/false")
            f.write(json.dumps({"id": rid, "source": r["snapshot"], "decoding": r["decoding"], "kind": r["kind"],
                                "prompt_id": r["prompt_id"], "prompt": r["prompt"], "response": r["response"],
                                "split": splits[r["prompt_id"]], "labels": labels_of,
                                "note": lab.get("note", "")}, ensure_ascii=False) + "\n")
    print(f"{len(rows)} graded answers in {out}")


def references(out: Path, parts: int, seed: int) -> None:
    """UncensorBench's reference answers (refusal and compliant), shuffled for reading like the answers."""
    from constitutional.prompt_sources import uncensorbench_references

    rows = [{"id": f"{r.id}|{side}", "kind": "red-team", "prompt": r.prompt, "response": text}
            for r in uncensorbench_references() for side, text in (("refusal", r.refusal), ("compliant", r.compliant))]
    random.Random(seed).shuffle(rows)
    _write_for_reading(rows, out, parts, "u")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("generate")
    p.add_argument("--run", action="append", required=True, metavar="NAME=SPEC")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--batch-size", type=int, default=64)
    p = sub.add_parser("shuffle")
    p.add_argument("answers", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--parts", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prefix", default="a")
    p = sub.add_parser("assemble")
    p.add_argument("--answers", type=Path, action="append", required=True)
    p.add_argument("--key", type=Path, action="append", required=True)
    p.add_argument("--labels", type=Path, action="append", required=True)
    p.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("references")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--parts", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.command == "generate":
        generate(args.run, args.out, args.batch_size)
    elif args.command == "references":
        references(args.out, args.parts, args.seed)
    elif args.command == "assemble":
        assemble(args.answers, args.key, args.labels, args.out)
    else:
        shuffle(args.answers, args.out, args.parts, args.seed, args.prefix)


if __name__ == "__main__":
    main()
