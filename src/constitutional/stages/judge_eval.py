"""``cai judge-eval``: how far each verdict judge agrees with people who read the answers.

The effect table is only as good as the judge behind its verdicts. This command measures every
judge against answers labelled by reading them against the rubric (``data/verdicts/rubric.yaml``,
``evaluation/graded.py``):

* ``graded``: answers of the project's own snapshots, split by prompt into ``dev`` and ``test``;
  report on ``test`` (the default), choose anything on ``dev``;
* ``uncensorbench``: UncensorBench's reference answers (a refusal and a compliant answer to each of
  150 harmful requests, written outside this project), halved by request into ``dev`` and ``test``.

Judges: ``rules`` (``evaluation/verdicts.py``) and ``model``, the model judge of
``evaluation/judges.py`` on ``evaluate.judge`` when that names a model, else on the run's feedback
model (``label.feedback_model``, else ``critique_revise.model``). The model judge is reported twice: with
P(yes) > 0.5 (the question answered as asked) and with per-field thresholds fitted on the graded dev
split (``dev-fitted``; what ``cai evaluate`` uses unless ``evaluate.judge_threshold`` is set).

Per judge, test set and field: accuracy, precision, recall and F1 of "yes", and Cohen's kappa.

Run:
    cai judge-eval --out runs/judge-eval                            # rules and the embedded model, test split
    cai judge-eval --out runs/judge-eval --judges rules --split dev
    cai judge-eval --out runs/x --set 'evaluate.judge={backend: openai, base_urls: [http://host:8000/v1], model: m}'

Writes ``judge_eval/results-<split>.json`` (every answer's verdict included) and prints a table.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from constitutional import progress
from constitutional.backends import load_backend, spec_name
from constitutional.config import PipelineConfig
from constitutional.errors import CaiError
from constitutional.evaluation.agreement import field_agreement
from constitutional.evaluation.graded import TEST_SETS, load_graded, load_test_set
from constitutional.evaluation.judges import ModelJudge, RulesJudge, fit_thresholds
from constitutional.evaluation.rubric import FIELDS, fields_for
from constitutional.models import check_model_spec
from constitutional.progress import log
from constitutional.records import write_json

STAGE_DIR = "judge_eval"
JUDGES = ("rules", "model")
SPLITS = ("dev", "test")


def model_spec(config: PipelineConfig):
    """The model the ``model`` judge runs on: ``evaluate.judge`` if it names one, else the feedback model."""
    if config.evaluate.judge != "rules":
        return config.evaluate.judge
    return config.feedback_model


def run(config: PipelineConfig, out_dir: str | Path, judges: list[str] | None = None, split: str = "test",
        sets: list[str] | None = None, limit: int | None = None, backend=None) -> dict:
    """Measure ``judges`` on ``sets`` (default: both) in ``split``; write and print the table."""
    judges = judges or list(JUDGES)
    sets = sets or list(TEST_SETS)
    for j in judges:
        if j not in JUDGES:
            raise CaiError(f"--judges: unknown judge {j!r} (known: {', '.join(JUDGES)})")
    for s in sets:
        if s not in TEST_SETS:
            raise CaiError(f"--sets: unknown set {s!r} (known: {', '.join(TEST_SETS)})")
    if split not in SPLITS:
        raise CaiError(f"--split {split!r}: expected dev or test")
    data = {name: spread(load_test_set(name, split), limit) for name in sets}
    results: dict = {"split": split, "answers": {name: len(rows) for name, rows in data.items()}, "judges": {}}

    if "rules" in judges:
        start = time.time()
        entry: dict = {"seconds": 0.0}
        for name, rows in data.items():
            verdicts = RulesJudge().verdicts([(a.prompt, a.response, a.kind) for a in rows])
            entry[name] = _measured(rows, [v.as_dict() for v in verdicts])
        entry["seconds"] = round(time.time() - start, 2)
        results["judges"]["rules"] = entry
        log(_line("rules", entry))

    if "model" in judges:
        spec = model_spec(config)
        if backend is None:
            check_model_spec(spec, "evaluate.judge")
            backend = load_backend(spec, batch_size=config.evaluate.batch_size, device=config.evaluate.device)
        judge = ModelJudge(backend, spec_name(spec), batch_size=config.evaluate.batch_size)
        start = time.time()
        dev = spread(load_graded("dev"), limit)
        to_score = [dev] + [rows for name, rows in data.items() if not (split == "dev" and name == "graded")]
        bar = progress.bar(sum(len(fields_for(a.kind)) for rows in to_score for a in rows), "judge-eval", "question")
        dev_p = judge.probabilities([(a.prompt, a.response, a.kind) for a in dev], progress=bar.update)
        fitted = fit_thresholds(dev_p, [a.labels for a in dev])
        probabilities = {name: (dev_p if split == "dev" and name == "graded" else
                                judge.probabilities([(a.prompt, a.response, a.kind) for a in rows],
                                                    progress=bar.update))
                         for name, rows in data.items()}
        bar.close()
        seconds = round(time.time() - start, 1)
        for label, thresholds in (("model", {}), ("model, dev-fitted", fitted)):
            judge.thresholds = thresholds
            entry = {"model": judge.name, "thresholds": thresholds or dict.fromkeys(FIELDS, 0.5),
                     "seconds": seconds}
            for name, rows in data.items():
                verdicts = [judge.decide(p, a.kind).as_dict() for p, a in zip(probabilities[name], rows, strict=True)]
                entry[name] = _measured(rows, verdicts, probabilities[name])
            results["judges"][label] = entry
            log(_line(label, entry))
        if split == "dev":
            results["note"] = "dev split: the dev-fitted thresholds were fitted on these answers (in sample)"
    write_json(Path(out_dir) / STAGE_DIR / f"results-{split}.json", results)
    print(table(results))
    return results


def spread(rows: list, limit: int | None) -> list:
    """``limit`` rows taken evenly across ``rows`` (all of them when None), so a sample of a set that is
    stored by snapshot and kind still covers every snapshot and kind.

    >>> spread(list(range(10)), 4)
    [0, 2, 5, 7]
    """
    if limit is None or limit >= len(rows):
        return list(rows)
    return [rows[i * len(rows) // limit] for i in range(limit)]


def _measured(rows, verdicts: list[dict], probabilities: list[dict] | None = None) -> dict:
    """Agreement per field, and every answer's verdict beside the reader's labels (for reading the misses)."""
    out = {"fields": field_agreement(verdicts, [a.labels for a in rows], FIELDS), "answers": []}
    for i, (a, v) in enumerate(zip(rows, verdicts, strict=True)):
        item = {"id": a.id, "labels": a.labels, "verdict": {k: v.get(k) for k in FIELDS if v.get(k) is not None},
                "reasons": v.get("reasons", [])}
        if probabilities is not None:
            item["p_yes"] = probabilities[i]
        out["answers"].append(item)
    return out


def _line(label: str, entry: dict) -> str:
    parts = []
    for name in TEST_SETS:
        fields = entry.get(name, {}).get("fields", {})
        if fields:
            harmful = fields.get("harmful", {})
            coherent = fields.get("coherent", {})
            parts.append(f"{name}: harmful F1 {_fmt(harmful.get('f1'))}, coherent accuracy "
                         f"{_fmt(coherent.get('accuracy'))}")
    return f"judge-eval {label}: " + "; ".join(parts)


def _fmt(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def table(results: dict) -> str:
    """The results as Markdown: per judge, set and field, accuracy, precision, recall, F1, kappa."""
    lines = [f"judge-eval on the {results['split']} split (" + ", ".join(f"{k}: {v} answers"
                                                                        for k, v in results["answers"].items()) + ")",
             "| judge | set | field | n | reader yes | judge yes | accuracy | precision | recall | F1 | kappa |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, entry in results["judges"].items():
        for name in results["answers"]:
            for field, s in entry.get(name, {}).get("fields", {}).items():
                lines.append(f"| {label} | {name} | {field} | {s['n']} | {s['reader_yes']} | {s['judge_yes']} | "
                             f"{_fmt(s['accuracy'])} | {_fmt(s['precision'])} | {_fmt(s['recall'])} | "
                             f"{_fmt(s['f1'])} | {_fmt(s['kappa'])} |")
    if results.get("note"):
        lines.append(f"NOTE: {results['note']}")
    return "\n".join(lines)
