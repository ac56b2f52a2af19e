"""The effect table: what each snapshot's answers say, per prompt set, with intervals and paired differences.

Input: every answer's verdict (``evaluation/verdicts.py``: from the rules or a model judge), the
rule-based refusal detector's reading of its opening (``detectors.py``), and the scores of the
evaluation stage (second opinion, contrast, PM). Output, per snapshot, decoding and prompt set:

* red-team prompt sets (the held-out red-team split, the same prompts under jailbreak framings,
  outside benchmarks such as UncensorBench): **harmless and coherent** (the headline), **declines
  and explains** (the paper's harmless but non-evasive), **harmful**, **degenerate** (not coherent);
* the helpful set (held-out helpful split): **helpful and coherent** (the headline), **declines**
  (over-refusal by content), **degenerate**;
* secondary, on both: **refusal** read from the opening by the rule-based detector (what the table
  used to headline), the second opinion, mean contrast and PM scores, mean tokens.

Each rate has a 95% Wilson score interval (it does not collapse to a point at 0% or 100%) and, for every
snapshot but the first (the base model), the paired difference from it on the same prompts, with a 95%
bootstrap interval over prompts; mean scores have bootstrap intervals. Degenerate rates are per set, never pooled. A few
verbatim answers per snapshot and verdict (``verdict_examples``) go into ``effect.json`` for the report.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from constitutional.evaluation import detectors
from constitutional.evaluation.elo import bootstrap_mean, bootstrap_paired_difference, wilson_rate
from constitutional.evaluation.verdicts import (
    AnswerVerdict,
    declines_and_explains,
    harmless_and_coherent,
    helpful_and_coherent,
)


@dataclass(frozen=True)
class PromptSet:
    """Prompts the evaluation answers: ``name`` (its key in the table), ``kind`` (``red-team`` or ``helpful``:
    which rubric fields apply) and the prompts (``prompt_sources.PromptRow``)."""

    name: str
    kind: str
    prompts: list


# name -> (kind it applies to, the per-answer flag)
RATES: dict[str, tuple[str, Callable[[AnswerVerdict], bool]]] = {
    "harmless_coherent": ("red-team", harmless_and_coherent),
    "declines_explains": ("red-team", declines_and_explains),
    "harmful": ("red-team", lambda v: bool(v.harmful)),
    "helpful_coherent": ("helpful", helpful_and_coherent),
    "declines": ("helpful", lambda v: bool(v.declines)),
    "degenerate": ("both", lambda v: not v.coherent),
}


def set_key(name: str) -> str:
    """A prompt set's key in ``effect.json`` rows: ``red-team`` -> ``red_team``."""
    return name.replace("-", "_")


def response_id(snapshot: str, decoding: str, prompt_id: str) -> str:
    return f"{snapshot}|{decoding}|{prompt_id}"


def answer_flags(kind: str, response: str, verdict: AnswerVerdict, score: dict, threshold: float | None) -> dict:
    """The per-answer flags the table averages: each rate of ``RATES`` for this kind, and the secondary ones."""
    flags = {name: fn(verdict) for name, (applies, fn) in RATES.items() if applies in (kind, "both")}
    flags["refusal"] = detectors.refuses_or_redirects(response)
    if threshold is not None:
        # an empty response has no score: not a refusal (it is counted as degenerate)
        flags["second"] = score.get("refusal_score") is not None and score["refusal_score"] > threshold
    flags["pm"] = score.get("pm")
    flags["contrast"] = score.get("contrast")
    return flags


def effect_table(snapshots: list[str], decodings: list[str], sets: list[PromptSet], responses: dict,
                 verdicts: dict, scores: dict, threshold: float | None, samples: int, seed: int) -> dict:
    """Per snapshot and decoding, per prompt set: rates with 95% Wilson intervals, and paired differences
    from the first snapshot (the base model) on the same prompts (95% bootstrap intervals).

    ``responses``, ``verdicts`` and ``scores`` are keyed by ``response_id``.
    """
    flags = {rid: answer_flags(r["kind"], r["response"], verdicts[rid], scores.get(rid, {}), threshold)
             for rid, r in responses.items() if rid in verdicts}
    base = snapshots[0]
    rows = []
    for snap in snapshots:
        for decoding in decodings:
            entry: dict = {"snapshot": snap, "decoding": decoding}
            for pset in sets:
                pairs = [(response_id(snap, decoding, p.id), response_id(base, decoding, p.id)) for p in pset.prompts]
                pairs = [(a, b) for a, b in pairs if a in flags and b in flags]
                own = [flags[a] for a, _ in pairs]
                ref = [flags[b] for _, b in pairs]
                part: dict = {"n": len(own), "kind": pset.kind}
                if not own:
                    entry[set_key(pset.name)] = part
                    continue
                for name in [*(n for n in RATES if n in own[0]), "refusal", "second"]:
                    if name not in own[0]:
                        continue
                    values = [float(f[name]) for f in own]
                    part[name] = list(wilson_rate(values))
                    if snap != base:
                        part[f"{name}_vs_base"] = list(bootstrap_paired_difference(
                            values, [float(f[name]) for f in ref], samples, seed))
                for name in ("pm", "contrast"):
                    values = [f[name] for f in own if f[name] is not None]
                    part[name] = list(bootstrap_mean(values, samples, seed)) if values else None
                part["tokens"] = round(sum(responses[a]["tokens"] for a, _ in pairs) / len(pairs), 1)
                entry[set_key(pset.name)] = part
            rows.append(entry)
    return {"base": base, "decodings": decodings, "sets": {set_key(s.name): {"name": s.name, "kind": s.kind,
                                                                               "prompts": len(s.prompts)}
                                                            for s in sets}, "rows": rows}


# What the report shows verbatim, per snapshot: (name, kind, which answers)
EXAMPLE_KINDS: tuple[tuple[str, str, Callable[[AnswerVerdict], bool]], ...] = (
    ("declines and explains", "red-team", declines_and_explains),
    ("harmless and coherent, no explanation", "red-team", lambda v: harmless_and_coherent(v)
     and not declines_and_explains(v)),
    ("harmful", "red-team", lambda v: bool(v.harmful)),
    ("degenerate", "red-team", lambda v: not v.coherent),
    ("helpful and coherent", "helpful", helpful_and_coherent),
    ("declines", "helpful", lambda v: bool(v.declines)),
    ("degenerate", "helpful", lambda v: not v.coherent),
)


def verdict_examples(responses: dict, verdicts: dict, snapshots: list[str], sets: list[PromptSet],
                     per_case: int = 2) -> list[dict]:
    """Up to ``per_case`` greedy answers per snapshot and verdict case, verbatim, from the first set of each kind."""
    first_set = {}
    for s in sets:
        first_set.setdefault(s.kind, s)
    out = []
    for snap in snapshots:
        for case, kind, pick in EXAMPLE_KINDS:
            pset = first_set.get(kind)
            if pset is None:
                continue
            found = 0
            for p in pset.prompts:
                rid = response_id(snap, "greedy", p.id)
                if rid not in verdicts or rid not in responses or not pick(verdicts[rid]):
                    continue
                out.append({"snapshot": snap, "case": case, "set": pset.name, "prompt": p.prompt,
                            "response": responses[rid]["response"], "verdict": verdicts[rid].as_dict()})
                found += 1
                if found >= per_case:
                    break
    return out


# ------------------------------------------------------------------ text


def fmt_rate(cell) -> str:
    """A rate as a percentage with its interval: ``[0.25, 0.125, 0.375]`` -> ``25% [12, 38]``."""
    if not cell or any(isinstance(x, float) and math.isnan(x) for x in cell):
        return "-"
    value, low, high = cell
    return f"{value:.0%} [{low * 100:.0f}, {high * 100:.0f}]"


def fmt_diff(cell) -> str:
    """A paired difference in points: ``[0.2, 0.1, 0.3]`` -> ``+20 [+10, +30]``."""
    if not cell or any(isinstance(x, float) and math.isnan(x) for x in cell):
        return "-"
    value, low, high = cell
    return f"{value * 100:+.0f} [{low * 100:+.0f}, {high * 100:+.0f}]"


def _score(cell) -> str:
    if not cell or any(isinstance(x, float) and math.isnan(x) for x in cell):
        return "-"
    return f"{cell[0]:.2f}"


def effect_text(effect: dict, judge: str = "rules") -> str:
    """The effect table as Markdown: the headline, then the other prompt sets, then the secondary columns."""
    rows = effect["rows"]
    lines = [f"Effect table: what the answers say (judge: {judge}; 95% Wilson intervals; 'vs base' = paired "
             f"difference in points on the same prompts, 95% bootstrap interval)",
             "| snapshot | decoding | harmless & coherent (red-team) | vs base | declines & explains | vs base "
             "| harmful | degenerate (red-team) | helpful & coherent (helpful) | vs base | degenerate (helpful) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        red, helpful = r.get("red_team", {}), r.get("helpful", {})
        lines.append(f"| {r['snapshot']} | {r['decoding']} | {fmt_rate(red.get('harmless_coherent'))} | "
                     f"{fmt_diff(red.get('harmless_coherent_vs_base'))} | {fmt_rate(red.get('declines_explains'))} | "
                     f"{fmt_diff(red.get('declines_explains_vs_base'))} | {fmt_rate(red.get('harmful'))} | "
                     f"{fmt_rate(red.get('degenerate'))} | {fmt_rate(helpful.get('helpful_coherent'))} | "
                     f"{fmt_diff(helpful.get('helpful_coherent_vs_base'))} | {fmt_rate(helpful.get('degenerate'))} |")
    others = [k for k, s in effect.get("sets", {}).items() if s["kind"] == "red-team" and k != "red_team"]
    for key in others:
        name = effect["sets"][key]["name"]
        lines += ["", f"{name} ({effect['sets'][key]['prompts']} prompts)",
                  "| snapshot | decoding | harmless & coherent | vs base | declines & explains | harmful "
                  "| degenerate |",
                  "|---|---|---|---|---|---|---|"]
        for r in rows:
            part = r.get(key, {})
            lines.append(f"| {r['snapshot']} | {r['decoding']} | {fmt_rate(part.get('harmless_coherent'))} | "
                         f"{fmt_diff(part.get('harmless_coherent_vs_base'))} | "
                         f"{fmt_rate(part.get('declines_explains'))} | {fmt_rate(part.get('harmful'))} | "
                         f"{fmt_rate(part.get('degenerate'))} |")
    lines += ["", "Secondary: refusal read from the opening (rule-based detector), second opinion, scores",
              "| snapshot | decoding | refusal by opening (red-team) | vs base | over-refusal by opening (helpful) "
              "| declines (helpful, by content) | 2nd opinion red-team / helpful | PM red-team | contrast red-team "
              "| tokens |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        red, helpful = r.get("red_team", {}), r.get("helpful", {})
        second = "-"
        if red.get("second") and helpful.get("second"):
            second = f"{red['second'][0]:.0%} / {helpful['second'][0]:.0%}"
        tokens = "-" if red.get("tokens") is None else f"{red['tokens']:.0f} / {helpful.get('tokens', 0):.0f}"
        lines.append(f"| {r['snapshot']} | {r['decoding']} | {fmt_rate(red.get('refusal'))} | "
                     f"{fmt_diff(red.get('refusal_vs_base'))} | {fmt_rate(helpful.get('refusal'))} | "
                     f"{fmt_rate(helpful.get('declines'))} | {second} | {_score(red.get('pm'))} | "
                     f"{_score(red.get('contrast'))} | {tokens} |")
    for w in effect.get("warnings", []):
        lines.append(f"WARNING: {w}")
    return "\n".join(lines)
