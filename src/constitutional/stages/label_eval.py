"""``cai label-eval``: how far to trust a feedback model's labels, method by method.

Scores the shipped comparisons whose better answer is known (``data/eval/harmless_pairs.jsonl``:
a compliant harmful answer vs. a harmless, non-evasive one; ``data/eval/helpful_pairs.jsonl``:
a good answer vs. a poor or evasive one) with every labelling method of ``feedback.py`` and
reports, per method and data set: accuracy (P(chosen) > 0.5), mean confidence, expected
calibration error (ECE) and position bias (the share of pairs judged "A", whatever the
content; the better answer is option A in half the pairs, so an unbiased labeller is near
0.5). These pairs are for measurement only; nothing trains on them.

For the contrast method the temperature T is fitted on one half of the pairs and applied to
the other (two-fold), so its ECE is not measured on the pairs it was fitted on; the T fitted
on all pairs is reported for use as ``label.contrast_temperature``.

Run:
    cai label-eval --config configs/smollm2-cpu.yaml --out runs/demo
    cai label-eval --out runs/x --limit 40 --variants contrast-mean,mc-fewshot-both

Writes ``label_eval/results.json`` and prints a table.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from constitutional.backends import spec_name
from constitutional.config import PipelineConfig
from constitutional.constitution import load_constitution, sample_principles
from constitutional.errors import CaiError
from constitutional.records import iter_jsonl, write_json

STAGE_DIR = "label_eval"
EVAL_SETS = {"harmless": "harmless_pairs.jsonl", "helpful": "helpful_pairs.jsonl"}


@dataclass(frozen=True)
class Variant:
    name: str
    method: str
    fewshot: bool = False
    both_orders: bool = False
    reduce: str = "mean"


VARIANTS = (
    Variant("mc-zeroshot-one", "multiple_choice"),
    Variant("mc-zeroshot-both", "multiple_choice", both_orders=True),
    Variant("mc-fewshot-one", "multiple_choice", fewshot=True),
    Variant("mc-fewshot-both", "multiple_choice", fewshot=True, both_orders=True),
    Variant("cot", "cot"),
    Variant("contrast-mean", "contrast", reduce="mean"),
    Variant("contrast-sum", "contrast", reduce="sum"),
)


def load_eval_pairs(name: str, limit: int | None = None) -> list[dict]:
    """A shipped eval set; option A is the better answer in every other pair."""
    path = Path(str(resources.files("constitutional") / "data" / "eval" / EVAL_SETS[name]))
    rows = []
    for i, row in enumerate(iter_jsonl(path)):
        chosen_is_a = i % 2 == 0
        rows.append({
            "id": row["id"], "prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"],
            "a": row["chosen"] if chosen_is_a else row["rejected"],
            "b": row["rejected"] if chosen_is_a else row["chosen"],
            "chosen_is_a": chosen_is_a,
        })
    return rows[:limit] if limit else rows


def summarise(p_a: list[float], chosen_is_a: list[bool]) -> dict:
    """Accuracy, mean confidence, ECE and position bias of P(A) judgements on known pairs.

    >>> summarise([0.9, 0.2], [True, False])["accuracy"]
    1.0
    >>> summarise([0.9, 0.8], [True, False])["position_bias"]
    1.0
    """
    from constitutional.feedback import expected_calibration_error

    p_chosen = [p if a else 1 - p for p, a in zip(p_a, chosen_is_a, strict=True)]
    n = len(p_chosen)
    return {
        "n": n,
        "accuracy": round(sum(1.0 if p > 0.5 else 0.5 if p == 0.5 else 0.0 for p in p_chosen) / n, 4),
        "mean_confidence": round(sum(max(p, 1 - p) for p in p_chosen) / n, 4),
        "ece": round(expected_calibration_error(p_chosen), 4),
        "position_bias": round(sum(1 for p in p_a if p > 0.5) / n, 4),
    }


def run(config: PipelineConfig, out_dir: str | Path, variants: list[str] | None = None,
        limit: int | None = None, backend=None) -> dict:
    from constitutional import feedback

    cfg = config.label
    known = {v.name: v for v in VARIANTS}
    chosen = [known[n] for n in variants] if variants else list(VARIANTS)
    constitution = load_constitution(config.constitution)
    principles = {kind: [p for p in constitution.feedback_principles if p.kind == kind] for kind in EVAL_SETS}
    for kind, items in principles.items():
        if not items:
            raise CaiError(f"constitution has no feedback principles of kind {kind!r}")
    if any(v.method == "contrast" for v in chosen):
        for items in principles.values():
            feedback.check_contrast_principles(items)
    fewshot = feedback.load_label_fewshot(cfg.fewshot_file)[:cfg.fewshot]
    data = {name: load_eval_pairs(name, limit) for name in EVAL_SETS}

    model_spec = cfg.feedback_model or config.critique_revise.model
    if backend is None:
        from constitutional.backends import load_backend

        backend = load_backend(model_spec, batch_size=cfg.batch_size, device=cfg.device)

    results: dict = {"feedback_model": spec_name(model_spec), "fewshot": len(fewshot), "variants": {}}
    contrast_cache: dict = {}  # both contrast reductions share the same forward passes
    for variant in chosen:
        entry: dict = {}
        start = time.time()
        for name, pairs in data.items():
            picked = [sample_principles(principles[name], 1, config.seed, row["id"])[0] for row in pairs]
            truth = [row["chosen_is_a"] for row in pairs]
            items = [(r["prompt"], p, r["a"], r["b"]) for r, p in zip(pairs, picked, strict=True)]
            if variant.method != "contrast":
                judged = feedback.judge(backend, variant.method, items, fewshot=fewshot if variant.fewshot else (),
                                        both_orders=variant.both_orders, cot_max_new_tokens=cfg.cot_max_new_tokens,
                                        cot_min=cfg.cot_min, cot_max=cfg.cot_max)
                entry[name] = summarise([j.p_a for j in judged], truth)
            else:
                if name not in contrast_cache:
                    flat = [(p, pr, x) for p, pr, a, b in items for x in (a, b)]
                    contrast_cache[name] = feedback.contrast_token_logprobs(backend, flat)
                judged = feedback.judge_contrast(backend, items, temperature=1.0, reduce=variant.reduce,
                                                 token_logprobs=contrast_cache[name])
                diffs = [(j.scores["s_a"] - j.scores["s_b"]) * (1 if a else -1) for j, a in zip(judged, truth,
                                                                                                 strict=True)]
                entry[name] = _cross_fitted(judged, truth, diffs)
                entry[name]["diffs"] = [round(d, 5) for d in diffs]
            _log(f"{variant.name} on {name}: accuracy {entry[name]['accuracy']:.3f}, ECE {entry[name]['ece']:.3f}, "
                 f"position bias {entry[name]['position_bias']:.3f}")
        if variant.method == "contrast":
            all_diffs = [d for name in EVAL_SETS for d in entry[name].pop("diffs")]
            entry["temperature_all_pairs"] = round(feedback.fit_temperature(all_diffs), 5)
        entry["seconds"] = round(time.time() - start, 1)
        results["variants"][variant.name] = entry
        write_json(Path(out_dir) / STAGE_DIR / "results.json", results)  # after each variant
    print(table(results))
    return results


def _cross_fitted(judged, truth: list[bool], diffs: list[float]) -> dict:
    """Two-fold: T fitted on the even pairs labels the odd ones, and the other way round."""
    from constitutional.feedback import contrast_p_a, fit_temperature

    p_a = [0.0] * len(judged)
    for fold in (0, 1):
        fit_on = [d for i, d in enumerate(diffs) if i % 2 != fold]
        t = fit_temperature(fit_on) if fit_on else 1.0
        for i, j in enumerate(judged):
            if i % 2 == fold:
                p_a[i] = contrast_p_a(j.scores["s_a"], j.scores["s_b"], t)
    summary = summarise(p_a, truth)
    summary["temperature"] = round(fit_temperature(diffs), 5)
    return summary


def table(results: dict) -> str:
    lines = [f"label-eval, feedback model {results['feedback_model']}",
             "| method | harmless acc | ECE | pos. bias | helpful acc | ECE | pos. bias | s |",
             "|---|---|---|---|---|---|---|---|"]
    for name, entry in results["variants"].items():
        h, g = entry.get("harmless", {}), entry.get("helpful", {})
        lines.append(f"| {name} | {h.get('accuracy', float('nan')):.3f} | {h.get('ece', float('nan')):.3f} | "
                     f"{h.get('position_bias', float('nan')):.3f} | {g.get('accuracy', float('nan')):.3f} | "
                     f"{g.get('ece', float('nan')):.3f} | {g.get('position_bias', float('nan')):.3f} | "
                     f"{entry['seconds']:.0f} |")
    return "\n".join(lines)


def _log(message: str) -> None:
    print(f"[cai] {message}", file=sys.stderr, flush=True)
