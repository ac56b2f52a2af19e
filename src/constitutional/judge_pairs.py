"""The labelled answer pairs that measure a feedback model, and what is read from them.

Shipped in ``data/eval/`` (see ``stages/label_eval.py`` for what each file holds): pairs whose better
answer is known, halved into ``dev`` (choose and fit on it) and ``test`` (report on it). ``cai label-eval``
scores every labelling method on them; ``cai label`` and ``cai evaluate`` fit the contrast method's
temperature on the dev half (``fit_contrast_temperature``); the PM stage reports its accuracy on them.
Nothing trains on them.
"""

from __future__ import annotations

import zlib
from importlib import resources
from pathlib import Path

from constitutional import feedback
from constitutional.constitution import sample_principles
from constitutional.errors import CaiError
from constitutional.prompt_sources import uncensorbench_references
from constitutional.records import iter_jsonl

# data set -> its files; the first file of each set is split by split_rule, later ones are test-only
EVAL_SETS = {"harmless": ("harmless_pairs.jsonl", "harmless_styles.jsonl"), "helpful": ("helpful_pairs.jsonl",)}
# Pairs written outside this project (test half only), by name -> the principle kind that judges them.
OUTSIDE_SETS = {"uncensorbench": "harmless"}
HALVES = ("dev", "test", "all")


def split_rule(rows: list[dict]) -> list[str]:
    """The dev/test half of each row of an eval file (rows in file order).

    Rows sorted by (position of the better answer = row parity, ``longer``, ``category``,
    CRC-32 of ``id``) are dealt alternately to dev and test: every such group is halved to
    within one row, and the result depends on nothing but the rows.

    >>> rows = [{"id": f"x-{i}", "longer": "chosen" if i < 2 else "rejected", "category": "c"} for i in range(4)]
    >>> split_rule(rows)
    ['dev', 'dev', 'test', 'test']
    """
    order = sorted(range(len(rows)), key=lambda i: (i % 2, rows[i]["longer"], rows[i]["category"],
                                                    zlib.crc32(rows[i]["id"].encode())))
    out = [""] * len(rows)
    for k, i in enumerate(order):
        out[i] = "dev" if k % 2 == 0 else "test"
    return out


def eval_path(file: str) -> Path:
    return Path(str(resources.files("constitutional") / "data" / "eval" / file))


def load_eval_pairs(name: str, limit: int | None = None, half: str = "all") -> list[dict]:
    """The pairs of a shipped eval set in one half (``dev``, ``test`` or ``all``).

    Option A is the better answer in every other row of each file (by row index in the file,
    whatever the half). Each row says which file it came from (``source``) and its ``split``.
    """
    if half not in HALVES:
        raise CaiError(f"eval half {half!r}: expected one of {', '.join(HALVES)}")
    rows = []
    for file in EVAL_SETS[name]:
        for i, row in enumerate(iter_jsonl(eval_path(file))):
            if half != "all" and row["split"] != half:
                continue
            chosen_is_a = i % 2 == 0
            rows.append({
                "id": row["id"], "prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"],
                "a": row["chosen"] if chosen_is_a else row["rejected"],
                "b": row["rejected"] if chosen_is_a else row["chosen"],
                "chosen_is_a": chosen_is_a, "split": row["split"], "source": file.rsplit(".", 1)[0],
                "category": row.get("category"), "style": row.get("style"),
            })
    return rows[:limit] if limit else rows


def load_outside_pairs(name: str, limit: int | None = None) -> list[dict]:
    """Pairs written outside this project, in the same row format as ``load_eval_pairs`` (all ``test``).

    ``uncensorbench``: each of UncensorBench's 150 harmful requests with its two reference answers; the
    refusal is the better one under a harmless principle. Option A is the refusal in every other pair.
    """
    if name not in OUTSIDE_SETS:
        raise CaiError(f"unknown outside pair set {name!r} (known: {', '.join(OUTSIDE_SETS)})")
    rows = []
    for i, ref in enumerate(uncensorbench_references()):
        chosen_is_a = i % 2 == 0
        rows.append({"id": ref.id, "prompt": ref.prompt, "chosen": ref.refusal, "rejected": ref.compliant,
                     "a": ref.refusal if chosen_is_a else ref.compliant,
                     "b": ref.compliant if chosen_is_a else ref.refusal, "chosen_is_a": chosen_is_a,
                     "split": "test", "source": name, "category": ref.topic, "style": None})
    return rows[:limit] if limit else rows


# ------------------------------------------------------------------ metrics


def summarise(p_a: list[float], chosen_is_a: list[bool]) -> dict:
    """Accuracy, mean confidence, ECE and position bias of P(A) judgements on known pairs.

    >>> summarise([0.9, 0.2], [True, False])["accuracy"]
    1.0
    >>> summarise([0.9, 0.8], [True, False])["position_bias"]
    1.0
    """
    p_chosen = [p if a else 1 - p for p, a in zip(p_a, chosen_is_a, strict=True)]
    n = len(p_chosen)
    if not n:
        return {"n": 0}
    return {
        "n": n,
        "accuracy": round(sum(1.0 if p > 0.5 else 0.5 if p == 0.5 else 0.0 for p in p_chosen) / n, 4),
        "mean_confidence": round(sum(max(p, 1 - p) for p in p_chosen) / n, 4),
        "ece": round(feedback.expected_calibration_error(p_chosen), 4),
        "position_bias": round(sum(1 for p in p_a if p > 0.5) / n, 4),
    }


def ensemble_p_a(member_diffs: list[list[float]], temperature: float) -> list[float]:
    """P(A) of each pair: the mean over ensemble members of sigmoid((s_A - s_B) / T).

    ``member_diffs[k][i]`` is member k's s_A - s_B on pair i (what ``cai label`` averages).

    >>> [round(p, 4) for p in ensemble_p_a([[1.0, 0.0], [-1.0, 2.0]], 1.0)]
    [0.5, 0.6904]
    """
    k = len(member_diffs)
    return [sum(feedback.sigmoid(d[i] / temperature) for d in member_diffs) / k for i in range(len(member_diffs[0]))]


# ------------------------------------------------------------------ the judge's settings


def judge_settings(cfg, fewshot, temperature) -> dict:
    """The ``feedback.judge`` keyword settings of a ``label`` config section."""
    contrast = feedback.ContrastSettings.of(cfg)
    return {"fewshot": fewshot, "both_orders": cfg.both_orders, "temperature": temperature,
            "reduce": contrast.reduce, "cot_max_new_tokens": cfg.cot_max_new_tokens,
            "cot_min": cfg.cot_min, "cot_max": cfg.cot_max, "contrast_context": contrast.context,
            "contrast_demos": feedback.contrast_demos(contrast.demos_file, contrast.demos),
            "contrast_max_tokens": contrast.max_tokens}


def fit_contrast_temperature(backend, pools, seed: int, cfg) -> float:
    """Fit the contrast temperature on the dev half of the shipped eval pairs (measurement data, not training)."""
    diffs = []
    for name in EVAL_SETS:
        pairs = load_eval_pairs(name, half="dev")
        items = [(r["prompt"], sample_principles(pools[name], 1, seed, r["id"])[0], r["chosen"], r["rejected"])
                 for r in pairs]
        settings = {**judge_settings(cfg, [], 1.0), "fewshot": ()}
        diffs += [j.scores["s_a"] - j.scores["s_b"] for j in feedback.judge(backend, "contrast", items, **settings)]
    return feedback.fit_temperature(diffs)
