"""How far a judge agrees with people's reading: accuracy, precision, recall, F1 and Cohen's kappa.

Pure functions over paired yes/no labels (the judge's, the reader's). ``cai judge-eval`` reports
them per judge and field on the graded answers and on the UncensorBench reference answers.

>>> s = binary_agreement([True, True, False, False], [True, False, False, False])
>>> s["accuracy"], s["precision"], s["recall"], s["kappa"]
(0.75, 0.5, 1.0, 0.5)
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def cohen_kappa(judge: Sequence[bool], reader: Sequence[bool]) -> float:
    """Cohen's kappa of two yes/no labellings: agreement beyond what their base rates give by chance.

    1 is perfect, 0 is chance; NaN when chance agreement is already 1 (both said the same thing always).

    >>> cohen_kappa([True, False, True, False], [True, False, True, False])
    1.0
    >>> cohen_kappa([True, True, False, False], [True, False, True, False])
    0.0
    """
    n = len(judge)
    if n == 0 or n != len(reader):
        raise ValueError("kappa needs two labellings of the same non-empty items")
    observed = sum(a == b for a, b in zip(judge, reader, strict=True)) / n
    p_judge, p_reader = sum(judge) / n, sum(reader) / n
    chance = p_judge * p_reader + (1 - p_judge) * (1 - p_reader)
    if chance >= 1:
        return math.nan
    return round((observed - chance) / (1 - chance), 4)


def binary_agreement(judge: Sequence[bool], reader: Sequence[bool]) -> dict:
    """Accuracy, precision, recall and F1 of "yes", Cohen's kappa, counts; the reader is the reference.

    Precision (recall) is NaN when the judge (the reader) never says yes.
    """
    n = len(judge)
    if n != len(reader):
        raise ValueError(f"{n} judge labels against {len(reader)} reader labels")
    if n == 0:
        return {"n": 0}
    tp = sum(a and b for a, b in zip(judge, reader, strict=True))
    fp = sum(a and not b for a, b in zip(judge, reader, strict=True))
    fn = sum(b and not a for a, b in zip(judge, reader, strict=True))
    precision = tp / (tp + fp) if tp + fp else math.nan
    recall = tp / (tp + fn) if tp + fn else math.nan
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else math.nan
    return {"n": n, "accuracy": round(sum(a == b for a, b in zip(judge, reader, strict=True)) / n, 4),
            "precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4),
            "kappa": cohen_kappa(judge, reader), "judge_yes": sum(judge), "reader_yes": sum(reader)}


def field_agreement(judged: Sequence[dict], read: Sequence[dict], fields: Sequence[str]) -> dict[str, dict]:
    """``binary_agreement`` per field, over the items where both the judge and the reader give the field."""
    out = {}
    for field in fields:
        pairs = [(bool(j[field]), bool(r[field])) for j, r in zip(judged, read, strict=True)
                 if j.get(field) is not None and r.get(field) is not None]
        if pairs:
            out[field] = binary_agreement([a for a, _ in pairs], [b for _, b in pairs])
    return out
