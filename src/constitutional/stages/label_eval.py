"""``cai label-eval``: how far to trust a feedback model's labels, method by method.

Scores comparisons whose better answer is known with every labelling method of ``feedback.py``
and reports, per method and data set: accuracy (P(better) > 0.5, a tie counts half), mean
confidence, expected calibration error (ECE), position bias (the share of pairs judged "A",
whatever the content: the better answer is option A in every other pair of a file, so an
unbiased labeller is near 0.5), the tokens the method reads per comparison and the seconds it
took. These pairs are for measurement only; nothing trains on them.

The pairs (``data/eval/``):

* ``harmless_pairs.jsonl`` (165) and ``helpful_pairs.jsonl`` (65): a compliant harmful answer vs.
  a harmless, non-evasive one; a good answer vs. a poor or evasive one.
* ``harmless_styles.jsonl`` (120, test half only): harmless pairs written in other styles (long
  and short harmful answers, partial compliance, harmful answers wrapped in disclaimers,
  refusals that lecture, polite harm vs. a blunt safe answer), on prompts of their own.
* ``uncensorbench`` (150, test half only, reported on its own): pairs written outside this project,
  UncensorBench's refusal and compliant reference answers to its 150 harmful requests (fetched from
  its PyPI wheel), the refusal preferred under a harmless principle. The files above were written by
  the same hands as the constitution's stances; this set was not.

Dev and test halves. Every row carries a ``split`` field. Choose prompts, stances, variants and
temperatures on ``dev`` only; ``test`` is for reporting. For the two original files the field was
written once by ``judge_pairs.split_rule`` (a test checks it still holds): rows sorted by (position of
the better answer, which answer is longer, category, CRC-32 of the id) are dealt alternately to
dev and test, so each half has both positions, both "longer" values and every category in equal
measure (to within one). ``harmless_styles.jsonl`` is all ``test``. ``cai label-eval`` reports
``--half dev`` unless told otherwise, so nobody tunes on the test half by accident.

Temperature of the contrast method: T is fitted on dev pairs only (both kinds pooled, one
principle a pair) and reported as ``temperature_dev`` (use it as ``label.contrast_temperature``).
On the test half the reported ECE uses that T, so it is out of sample. On the dev half (and on
``all``) ECE is two-fold cross-fitted: T fitted on one fold labels the other.

Variants: the paper's multiple choice and chain of thought, and the contrast method with the
options of ``feedback.py`` (system-prompt context, principle ensembles, few-shot demonstrations,
first-N-token scores); ``configured`` is the contrast method exactly as the ``label`` section of
the config sets it (what ``cai label`` runs).

Run:
    cai label-eval --config configs/smollm2-cpu.yaml --out runs/label-eval             # dev half
    cai label-eval --out runs/x --half dev,test --variants contrast-mean,contrast-stance
    cai label-eval --out runs/x --limit 40 --variants contrast-mean,mc-fewshot-both

Writes ``label_eval/results-<half>.json`` (every pair's P(A) included) and prints a table per half.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

from constitutional import feedback
from constitutional.backends import load_backend, spec_name
from constitutional.config import PipelineConfig
from constitutional.constitution import load_constitution, sample_principles
from constitutional.errors import CaiError
from constitutional.judge_pairs import (
    EVAL_SETS,
    HALVES,
    OUTSIDE_SETS,
    ensemble_p_a,
    load_eval_pairs,
    load_outside_pairs,
    summarise,
)
from constitutional.progress import log
from constitutional.records import write_json

STAGE_DIR = "label_eval"


@dataclass(frozen=True)
class Variant:
    """One labelling setting to measure. Contrast fields mirror the ``label.contrast_*`` config fields."""

    name: str
    method: str
    fewshot: bool = False
    both_orders: bool = False
    reduce: str = "mean"
    context: str = "stance+principle"
    ensemble: int = 1
    demos: int = 0
    max_tokens: int | None = None


VARIANTS = (
    Variant("mc-zeroshot-one", "multiple_choice"),
    Variant("mc-zeroshot-both", "multiple_choice", both_orders=True),
    Variant("mc-fewshot-one", "multiple_choice", fewshot=True),
    Variant("mc-fewshot-both", "multiple_choice", fewshot=True, both_orders=True),
    Variant("cot", "cot"),
    Variant("contrast-mean", "contrast", reduce="mean"),
    Variant("contrast-sum", "contrast", reduce="sum"),
    Variant("contrast-stance", "contrast", context="stance"),
    Variant("contrast-principle", "contrast", context="principle"),
    Variant("contrast-ens3", "contrast", ensemble=3),
    Variant("contrast-ens5", "contrast", ensemble=5),
    Variant("contrast-fewshot1", "contrast", demos=1),
    Variant("contrast-fewshot2", "contrast", demos=2),
    Variant("contrast-stance-fewshot2", "contrast", context="stance", demos=2),
    Variant("contrast-first16", "contrast", max_tokens=16),
    Variant("contrast-first32", "contrast", max_tokens=32),
    Variant("contrast-stance-first32", "contrast", context="stance", max_tokens=32),
)
CONFIGURED = "configured"  # the contrast method as the config's label section sets it


def configured_variant(cfg) -> Variant:
    """The contrast variant that ``cai label`` runs with this ``label`` config section."""
    return Variant(CONFIGURED, "contrast", reduce=cfg.contrast_reduce, context=cfg.contrast_context,
                   ensemble=cfg.ensemble, demos=cfg.contrast_fewshot, max_tokens=cfg.contrast_max_tokens)


def variant_names() -> list[str]:
    return [v.name for v in VARIANTS] + [CONFIGURED]


def _summary(rows: list[dict], p_a: list[float]) -> dict:
    """The summary of a set, of each of its source files if it has several, and every pair's P(A)."""
    out = summarise(p_a, [r["chosen_is_a"] for r in rows])
    sources = sorted({r["source"] for r in rows})
    if len(sources) > 1:
        out["parts"] = {s: summarise([p for p, r in zip(p_a, rows, strict=True) if r["source"] == s],
                                     [r["chosen_is_a"] for r in rows if r["source"] == s]) for s in sources}
    out["p_a"] = {r["id"]: round(p, 6) for r, p in zip(rows, p_a, strict=True)}
    return out


# ------------------------------------------------------------------ running


def run_halves(config: PipelineConfig, out_dir: str | Path, variants: list[str] | None = None,
               limit: int | None = None, halves: str = "dev", backend=None, outside: bool = True) -> dict:
    """``run`` on each of the comma-separated ``halves`` (e.g. ``dev,test``) with one model and shared scores."""
    names = [h.strip() for h in halves.split(",") if h.strip()]
    for h in names:
        if h not in HALVES:
            raise CaiError(f"--half {h!r}: expected one of {', '.join(HALVES)}")
    if backend is None:
        cfg = config.label
        backend = load_backend(config.run_models(out_dir).feedback, batch_size=cfg.batch_size,
                               device=cfg.device)
    cache: dict = {}
    return {h: run(config, out_dir, variants, limit, backend, h, cache, outside) for h in names}


def run(config: PipelineConfig, out_dir: str | Path, variants: list[str] | None = None,
        limit: int | None = None, backend=None, half: str = "dev", cache: dict | None = None,
        outside: bool = True) -> dict:
    """Measure ``variants`` (default: all) on one half of the shipped pairs; write and print the table.

    ``cache``: contrast token log-probs from an earlier call with the same model (``run_halves``).
    ``outside``: on the test half (and ``all``), also the pairs written outside this project (``OUTSIDE_SETS``).
    """

    cfg = config.label
    if half not in HALVES:
        raise CaiError(f"--half {half!r}: expected one of {', '.join(HALVES)}")
    known = {v.name: v for v in VARIANTS}
    known[CONFIGURED] = configured_variant(cfg)
    for name in variants or []:
        if name not in known:
            raise CaiError(f"unknown label-eval variant {name!r} (known: {', '.join(known)})")
    chosen = [known[n] for n in variants] if variants else list(known.values())
    constitution = load_constitution(config.constitution)
    principles = {kind: [p for p in constitution.feedback_principles if p.kind == kind] for kind in EVAL_SETS}
    for kind, items in principles.items():
        if not items:
            raise CaiError(f"constitution has no feedback principles of kind {kind!r}")
    principles.update({name: principles[kind] for name, kind in OUTSIDE_SETS.items()})
    contrast = [v for v in chosen if v.method == "contrast"]
    if contrast:
        for items in principles.values():
            feedback.check_contrast_principles(items)
            for v in contrast:
                feedback.contrast_system_prompts(items[0], v.context)  # a missing stance fails here, early
    all_demos = feedback.load_contrast_fewshot(cfg.contrast_fewshot_file)
    for v in contrast:
        for kind in EVAL_SETS:
            if v.demos > len(all_demos[kind]):
                raise CaiError(f"variant {v.name}: {v.demos} demonstrations asked, the contrast few-shot file has "
                               f"{len(all_demos[kind])} of kind {kind!r}")
    fewshot = feedback.load_label_fewshot(cfg.fewshot_file)[:cfg.fewshot]
    # The test half's contrast temperature comes from the dev half, so scoring test also scores dev.
    halves = [half] if half != "test" or not contrast else ["dev", "test"]
    data = {h: {name: load_eval_pairs(name, limit, h) for name in EVAL_SETS} for h in halves}
    if half in ("test", "all") and outside:  # pairs written outside the project: test only
        for name in OUTSIDE_SETS:
            data[half][name] = load_outside_pairs(name, limit)

    model_spec = config.run_models(out_dir).feedback
    if backend is None:
        backend = load_backend(model_spec, batch_size=cfg.batch_size, device=cfg.device)

    results: dict = {"feedback_model": spec_name(model_spec), "half": half, "fewshot": len(fewshot),
                     "pairs": {name: len(rows) for name, rows in data[half].items()}, "variants": {}}
    cache = {} if cache is None else cache  # token log-probs by (half, set, context, demos, principles)
    for variant in chosen:
        if variant.method == "contrast":
            entry = _contrast_variant(backend, variant, data, half, principles, all_demos, config.seed, cache)
        else:
            entry = _choice_variant(backend, variant, data[half], principles, fewshot, cfg, config.seed)
        for name in data[half]:
            log(f"{variant.name} on {half} {name}: accuracy {entry[name]['accuracy']:.3f}, "
                 f"ECE {entry[name]['ece']:.3f}, position bias {entry[name]['position_bias']:.3f}")
        results["variants"][variant.name] = entry
        write_json(Path(out_dir) / STAGE_DIR / f"results-{half}.json", results)  # after each variant
    print(table(results))
    return results


def _choice_variant(backend, variant: Variant, data: dict, principles: dict, fewshot, cfg, seed: int) -> dict:
    """Multiple choice or chain of thought on one half; one principle a pair."""

    entry: dict = {}
    start = time.time()
    for name, pairs in data.items():
        picked = [sample_principles(principles[name], 1, seed, row["id"])[0] for row in pairs]
        items = [(r["prompt"], p, r["a"], r["b"]) for r, p in zip(pairs, picked, strict=True)]
        judged = feedback.judge(backend, variant.method, items, fewshot=fewshot if variant.fewshot else (),
                                both_orders=variant.both_orders, cot_max_new_tokens=cfg.cot_max_new_tokens,
                                cot_min=cfg.cot_min, cot_max=cfg.cot_max)
        entry[name] = _summary(pairs, [j.p_a for j in judged])
    entry["seconds"] = round(time.time() - start, 1)
    return entry


def _contrast_variant(backend, variant: Variant, data: dict, half: str, principles: dict, all_demos: dict,
                      seed: int, cache: dict) -> dict:
    """A contrast variant: per-member score differences on every half needed, T from dev, P(A), metrics."""

    demos = {kind: items[:variant.demos] for kind, items in all_demos.items()}
    diffs: dict = {}  # (half, set) -> [member][pair] s_A - s_B
    seconds = {h: 0.0 for h in data}
    tokens = {h: 0 for h in data}
    tokens_cached = {h: 0 for h in data}  # each distinct system prompt + demonstrations read once
    for h, sets in data.items():
        for name, pairs in sets.items():
            draws = [sample_principles(principles[name], variant.ensemble, seed, r["id"]) for r in pairs]
            members = []
            for k in range(variant.ensemble if h == half else 1):  # T needs only member 0 of dev
                picked = [d[k] for d in draws]
                key = (h, name, variant.context, variant.demos, tuple(p.id for p in picked))
                flat = [(r["prompt"], p, x) for r, p in zip(pairs, picked, strict=True) for x in (r["a"], r["b"])]
                if key not in cache:
                    start = time.time()
                    sequences = feedback.contrast_sequences(backend, flat, context=variant.context, demos=demos)
                    logprobs = feedback.score_contrast_sequences(backend, sequences)
                    spent = time.time() - start
                    prefixes = feedback.contrast_prefixes(backend, flat, context=variant.context, demos=demos)
                    cache[key] = (logprobs, spent, feedback.tokens_read(backend, sequences),
                                  feedback.tokens_read(backend, sequences, prefixes))
                logprobs, spent, read, read_cached = cache[key]
                seconds[h] += spent
                tokens[h] += _tokens_kept(read, logprobs, variant.max_tokens)
                tokens_cached[h] += _tokens_kept(read_cached, logprobs, variant.max_tokens)
                scores = [feedback.contrast_score(f, v, variant.reduce, variant.max_tokens) for f, v in logprobs]
                members.append([scores[2 * i] - scores[2 * i + 1] for i in range(len(pairs))])
            diffs[(h, name)] = members

    def signed(h: str, name: str, fold=None) -> list[float]:  # s_better - s_worse of member 0, for fitting T
        rows = data[h][name]
        return [d * (1 if r["chosen_is_a"] else -1) for i, (d, r) in enumerate(zip(diffs[(h, name)][0], rows,
                                                                                      strict=True))
                if fold is None or i % 2 != fold]

    entry: dict = {}
    dev_half = "dev" if "dev" in data else half  # with --half all, the dev rows of it
    dev_diffs = [d for name in EVAL_SETS
                 for d, r in zip(signed(dev_half, name), data[dev_half][name], strict=True) if r["split"] == "dev"]
    t_dev = feedback.fit_temperature(dev_diffs) if dev_diffs else 1.0
    for name in data[half]:
        rows = data[half][name]
        if half == "test" or name in OUTSIDE_SETS:
            p_a = ensemble_p_a(diffs[(half, name)], t_dev) if rows else []
        else:  # two-fold: T fitted on one fold (both sets pooled) labels the other
            p_a = [0.0] * len(rows)
            for fold in (0, 1):
                fit_on = [d for n in EVAL_SETS for d in signed(half, n, fold)]
                t = feedback.fit_temperature(fit_on) if fit_on else 1.0
                fold_p = ensemble_p_a(diffs[(half, name)], t) if rows else []
                for i in range(fold, len(rows), 2):
                    p_a[i] = fold_p[i]
        entry[name] = _summary(rows, p_a)
    n_pairs = sum(len(rows) for rows in data[half].values())
    entry["temperature_dev"] = round(t_dev, 5)
    entry["tokens_per_comparison"] = round(tokens[half] / max(1, n_pairs), 1)
    entry["tokens_per_comparison_prefix_cached"] = round(tokens_cached[half] / max(1, n_pairs), 1)
    entry["seconds"] = round(seconds[half], 1)
    return entry


def _tokens_kept(read: int, logprobs: list, max_tokens: int | None) -> int:
    """Tokens read, less the response tokens past ``max_tokens`` (a first-N scorer need not read them)."""
    if max_tokens is None:
        return read
    return read - sum(max(0, len(f) - max_tokens) + max(0, len(v) - max_tokens) for f, v in logprobs)


def table(results: dict) -> str:
    """The results as a Markdown table: harmless (and its parts), helpful, cost."""
    def fmt(x) -> str:
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"

    first = next(iter(results["variants"].values()), {})
    parts = sorted(first.get("harmless", {}).get("parts", {}))
    outside = [name for name in OUTSIDE_SETS if name in first]
    part_cols = "".join(f" {p} acc |" for p in parts) + "".join(f" {name} (outside) acc |" for name in outside)
    lines = [f"label-eval on the {results['half']} half, feedback model {results['feedback_model']}, pairs "
             + ", ".join(f"{k} {v}" for k, v in results.get("pairs", {}).items()),
             f"| variant | harmless acc |{part_cols} ECE | pos. bias | helpful acc | ECE | pos. bias | T (dev) "
             f"| tokens/cmp | with prefix cache | s |",
             "|---" * (11 + len(parts) + len(outside)) + "|"]
    for name, entry in results["variants"].items():
        h, g = entry.get("harmless", {}), entry.get("helpful", {})
        part_vals = "".join(f" {fmt(h.get('parts', {}).get(p, {}).get('accuracy'))} |" for p in parts)
        part_vals += "".join(f" {fmt(entry.get(o, {}).get('accuracy'))} |" for o in outside)
        tokens = [entry.get(k, "-") for k in ("tokens_per_comparison", "tokens_per_comparison_prefix_cached")]
        lines.append(f"| {name} | {fmt(h.get('accuracy'))} |{part_vals} {fmt(h.get('ece'))} | "
                     f"{fmt(h.get('position_bias'))} | {fmt(g.get('accuracy'))} | {fmt(g.get('ece'))} | "
                     f"{fmt(g.get('position_bias'))} | {fmt(entry.get('temperature_dev'))} | "
                     f"{tokens[0]} | {tokens[1]} | {entry['seconds']:.0f} |")
    return "\n".join(lines)
