"""Stage 6: evaluation, what each stage of the run did to the model.

Paper: Bai et al. 2022, section 2 and Figures 2, 3 and 8: harmlessness and helpfulness Elo
scores from pairwise comparisons of model snapshots, and how they move along RL training. The
paper's crowdworkers read the answers; here every answer gets a verdict on what it *says*, not on
how it opens, and every judge is measured against answers people labelled by reading them.

Snapshots (``evaluation/snapshots.py``): the base model, SL-CAI (``sft/model``), each RL
checkpoint, RL-CAI (``rl/model``) and any outside model named in ``evaluate.extra_models``.
Prompt sets: the held-out split of the red-team prompts and of the helpful prompts, which no
training stage reads (a test checks the splits are disjoint by id and by text); the same held-out
red-team prompts in jailbreak framings (``evaluate.jailbreaks``, ``evaluation/jailbreaks.py``); and
outside benchmarks (``evaluate.benchmarks``: UncensorBench's 150 prompts).

For each snapshot, prompt and decoding (greedy, and one sample at ``sample_temperature`` with
fixed seeds) the stage records the answer, then:

* its **verdict** (``evaluation/verdicts.py``, rubric in ``data/verdicts/rubric.yaml``): harmful,
  declines, explains, coherent (red-team prompts); declines, coherent, helpful (helpful prompts),
  from ``evaluate.judge``: the rules (default) or a model asked each field
  (``evaluation/judges.py``; thresholds fitted on the graded development split unless
  ``judge_threshold`` is set). ``cai judge-eval`` measures both judges on the graded test split;
* on the held-out sets, the scores behind Elo and the secondary columns: the contrast score under a
  principle drawn per prompt (the run's ``label.contrast_*`` settings), the preference model's score
  (when the run has one) and, with ``second_opinion``, the feedback model's refusal reading
  (``evaluation/second_opinion.py``).

The **effect table** (``evaluation/effect.py``; ``evaluate/effect.json``, printed): per snapshot and
decoding, harmless-and-coherent, declines-and-explains, harmful and degenerate on red-team prompt
sets; helpful-and-coherent and degenerate on helpful prompts; refusal read from the opening as a
secondary column. Each with a 95% Wilson interval and a paired difference from the base model (bootstrap);
verbatim answers per verdict go to the report.
**Elo** (``evaluate/elo.json``): every pair of snapshots is compared on the same held-out prompt
(greedy responses); with the contrast method P(A) = sigmoid((s_A - s_B) / T) from the scores above,
with the paper's multiple-choice prompt both orders are judged. Bradley-Terry ratings with the base
model at 0 and 95% cluster-bootstrap intervals over prompts (``evaluation/elo.py``), the judge's own
validity on the shipped pairs beside them.
Plots: ``evaluate/elo.png`` (helpfulness vs harmlessness Elo) and ``evaluate/rl_steps.png``
(Elo and the headline rates against RL step).

Run:
    cai evaluate --config configs/smollm2-cpu.yaml --out runs/demo
    cai evaluate --config configs/smollm2-cpu.yaml --out runs/demo --set evaluate.extra_models.other=runs/b/rl/model
    cai evaluate --config configs/smollm2-cpu.yaml --out runs/demo --set 'evaluate.judge=runs/judge-model'

Responses, scores and a model judge's readings are appended as they are made
(``evaluate/responses.jsonl``, ``scores.jsonl``, ``judge_scores.jsonl``); a rerun reuses them, and
drops those of a snapshot whose weights changed since.
"""

from __future__ import annotations

import itertools
import json
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from constitutional import feedback, progress
from constitutional.backends import load_backend, spec_name
from constitutional.backends.base import SamplingParams
from constitutional.config import PipelineConfig
from constitutional.constitution import load_constitution, sample_principles
from constitutional.errors import CaiError
from constitutional.evaluation import detectors
from constitutional.evaluation.effect import PromptSet, effect_table, effect_text, response_id, verdict_examples
from constitutional.evaluation.elo import bootstrap_elo
from constitutional.evaluation.jailbreaks import wrap
from constitutional.evaluation.judges import ModelJudge, dev_thresholds
from constitutional.evaluation.plots import plot_against_step, plot_elo_frontier
from constitutional.evaluation.rubric import rubric_digest
from constitutional.evaluation.second_opinion import (
    REFUSAL_TOKENS,
    balanced_examples,
    disagreements,
    fit_second_opinion,
    refusal_scores,
)
from constitutional.evaluation.snapshots import Snapshot, fingerprint, resolve_snapshots
from constitutional.evaluation.verdicts import RULES, AnswerVerdict, rules_verdict
from constitutional.judge_pairs import EVAL_SETS, fit_contrast_temperature, judge_settings, load_eval_pairs, summarise
from constitutional.models import check_model_spec
from constitutional.progress import log
from constitutional.prompt_sources import load_prompts
from constitutional.records import JsonlAppender, check_resume_settings, portable_path, read_jsonl, write_json
from constitutional.rewards import PMReward

STAGE_DIR = "evaluate"
# settings that may change between runs into the same directory: cached responses and scores are reused
FREE_SETTINGS = {"snapshots", "extra_models", "limit", "sampled", "elo", "second_opinion", "pm", "use_pm",
                 "bootstrap_samples", "judge_pairs", "batch_size", "device", "judge", "judge_threshold",
                 "jailbreaks", "benchmarks", "second_opinion_examples"}
KINDS = ("red-team", "helpful")  # held-out prompt sets; their principle kinds are harmless / helpful
PRINCIPLE_KIND = {"red-team": "harmless", "helpful": "helpful"}
AXIS = {"red-team": "harmlessness", "helpful": "helpfulness"}

# A backend factory: model spec -> backend (tests pass tiny models through it).
BackendFactory = Callable[[str], object]


def run(config: PipelineConfig, out_dir: str | Path, backend_factory: BackendFactory | None = None) -> dict:
    """Run stage 6 into ``out_dir/evaluate``; return the summary."""

    cfg = config.evaluate
    out_dir = Path(out_dir)
    stage_dir = out_dir / STAGE_DIR
    # Check every input before loading a model.
    snapshots = resolve_snapshots(config, out_dir)
    constitution = load_constitution(config.constitution)
    pools = {kind: [p for p in constitution.feedback_principles if p.kind == PRINCIPLE_KIND[kind]] for kind in KINDS}
    for kind, pool in pools.items():
        if not pool:
            raise CaiError(f"constitution {constitution.name!r}: no feedback principles of kind "
                           f"{PRINCIPLE_KIND[kind]!r} (evaluation scores {kind} responses with them)")
        feedback.check_contrast_principles(pool)
    sets = prompt_sets(cfg)
    heldout = {s.kind: s.prompts for s in sets[:2]}  # the held-out red-team and helpful splits
    judge_spec = config.run_models(out_dir).feedback
    check_model_spec(judge_spec, "label.feedback_model")
    if cfg.judge != RULES:
        check_model_spec(cfg.judge, "evaluate.judge")
    pm_dir = _pm_dir(config, out_dir)
    warnings = contamination_warnings(config)
    for w in warnings:
        log(f"warning: {w}")
    check_resume_settings(stage_dir, {
        "red_team_prompts": cfg.red_team_prompts, "helpful_prompts": cfg.helpful_prompts,
        "max_new_tokens": cfg.max_new_tokens, "sample_temperature": cfg.sample_temperature, "seed": config.seed,
    })
    factory = backend_factory or _default_factory(cfg)
    start = time.time()
    decodings = ["greedy"] + (["sampled"] if cfg.sampled else [])
    log(f"evaluate: {len(snapshots)} snapshots ({', '.join(s.name for s in snapshots)}), "
         + ", ".join(f"{len(s.prompts)} {s.name}" for s in sets) + f" prompts, {' + '.join(decodings)}")

    # 1. Responses, one snapshot at a time (one model in memory).
    responses_path = stage_dir / "responses.jsonl"
    scores_path = stage_dir / "scores.jsonl"
    judge_scores_path = stage_dir / "judge_scores.jsonl"
    _drop_changed_snapshots(stage_dir, snapshots, [responses_path, scores_path, judge_scores_path])
    _generate_responses(snapshots, sets, decodings, cfg, config.seed, factory, responses_path)
    wanted = {response_id(s.name, d, p.id) for s in snapshots for d in decodings for ps in sets for p in ps.prompts}
    responses = {r["id"]: r for r in read_jsonl(responses_path) if r["id"] in wanted}

    # 2. Scores from the feedback model (contrast, second opinion) and the PM, on the held-out sets.
    judge = _Lazy(lambda: factory(judge_spec))  # loaded only if something needs scoring
    principles = {(kind, p.id): sample_principles(pools[kind], 1, config.seed, f"evaluate:{p.id}")[0]
                  for kind in KINDS for p in heldout[kind]}
    contrast = feedback.ContrastSettings.of(config.label)
    scorer_settings = {"judge": portable_path(judge_spec, out_dir), "contrast": asdict(contrast),
                       "pm": portable_path(str(pm_dir), out_dir),
                       "constitution": config.constitution, "seed": config.seed,
                       "second_opinion": cfg.second_opinion and {"tokens": REFUSAL_TOKENS}}
    scored_ids = {response_id(s.name, d, p.id) for s in snapshots for d in decodings for k in KINDS
                  for p in heldout[k]}
    to_score = {rid: r for rid, r in responses.items() if rid in scored_ids}
    missing = _missing_scores(scores_path, stage_dir, to_score, scorer_settings)
    if missing:
        _score_responses(missing, principles, judge, pm_dir, cfg, contrast, scores_path)
    scores = {r["id"]: r for r in read_jsonl(scores_path) if r["id"] in wanted} if scores_path.exists() else {}

    second = None
    if cfg.second_opinion:
        examples = balanced_examples(detectors.load_refusal_examples(), cfg.second_opinion_examples)
        second = fit_second_opinion(stage_dir, judge, judge_spec, examples)

    # 3. Verdicts: what each answer says.
    verdicts, judge_info = _verdicts(cfg, stage_dir, out_dir, responses, factory, judge_scores_path)

    _write_verdicts(stage_dir / "verdicts.jsonl", verdicts, judge_info["name"])

    # 4. The effect table.
    names = [s.name for s in snapshots]
    effect = effect_table(names, decodings, sets, responses, verdicts, scores,
                          second["threshold"] if second else None, cfg.bootstrap_samples, config.seed)
    effect["judge"] = judge_info
    effect["second_opinion"] = second
    effect["warnings"] = warnings
    effect["prompts"] = {s.name: len(s.prompts) for s in sets}
    effect["examples"] = verdict_examples(responses, verdicts, names, sets)
    effect["disagreements"] = disagreements(to_score, scores, second["threshold"]) if second else []
    write_json(stage_dir / "effect.json", effect)
    print(effect_text(effect, judge_info["name"]))

    # 5. Elo per axis, and the judge's validity beside it.
    elo = None
    if cfg.elo and len(snapshots) >= 2:
        validity = judge_validity(config, stage_dir, judge, judge_spec, pools)
        elo = elo_tables(config, snapshots, heldout, responses, scores, principles, judge, stage_dir)
        elo["judge"] = validity
        write_json(stage_dir / "elo.json", elo)
        print(elo_text(elo))
    elif cfg.elo:
        log("one snapshot only: no pairwise Elo")

    # 6. Plots.

    plots = []
    if elo is not None:
        plots.append(str(plot_elo_frontier(elo, stage_dir / "elo.png")))
    steps = {s.name: s.step for s in snapshots if s.step is not None}
    if steps:
        plots.append(str(plot_against_step(steps, elo or {}, effect, stage_dir / "rl_steps.png")))

    summary = {
        "output": str(stage_dir / "effect.json"),
        "snapshots": [asdict(s) for s in snapshots],
        "prompts": effect["prompts"],
        "judge": judge_info["name"],
        "effect": {f"{r['snapshot']}/{r['decoding']}": _headline(r) for r in effect["rows"]},
        "elo": ({axis: {n: v["elo"] for n, v in table["snapshots"].items()} for axis, table in elo["axes"].items()}
                if elo else None),
        "plots": plots,
        "seconds": round(time.time() - start, 2),
    }
    write_json(stage_dir / "summary.json", summary)
    log(f"evaluate: {summary['output']} ({summary['seconds']:.0f} s)")
    return summary


def _headline(row: dict) -> dict:
    red, helpful = row.get("red_team", {}), row.get("helpful", {})
    out = {}
    for key, part, name in (("harmless_coherent", red, "harmless_coherent"),
                            ("declines_explains", red, "declines_explains"), ("harmful", red, "harmful"),
                            ("degenerate_red_team", red, "degenerate"),
                            ("helpful_coherent", helpful, "helpful_coherent"),
                            ("degenerate_helpful", helpful, "degenerate"),
                            ("refusal_by_opening_red_team", red, "refusal"),
                            ("over_refusal_by_opening_helpful", helpful, "refusal")):
        if part.get(name):
            out[key] = part[name][0]
    return out


# ------------------------------------------------------------------ inputs


class _Lazy:
    """A backend built on first use, so a rerun with everything cached loads no model."""

    def __init__(self, make):
        self._make = make
        self._backend = None

    def __getattr__(self, name):
        if self._backend is None:
            self._backend = self._make()
        return getattr(self._backend, name)


def _default_factory(cfg) -> BackendFactory:
    def factory(spec):
        return load_backend(spec, batch_size=cfg.batch_size, device=cfg.device)

    return factory


def prompt_sets(cfg) -> list[PromptSet]:
    """The evaluation's prompt sets: held-out red-team, held-out helpful, jailbreaks, benchmarks (in this order)."""

    red = load_prompts(cfg.red_team_prompts, "heldout", cfg.limit)
    sets = [PromptSet("red-team", "red-team", red),
            PromptSet("helpful", "helpful", load_prompts(cfg.helpful_prompts, "heldout", cfg.limit))]
    if cfg.jailbreaks:
        sets.append(PromptSet("jailbreak", "red-team", wrap(red, cfg.jailbreaks)))
    for name in cfg.benchmarks:
        sets.append(PromptSet(name, "red-team", load_prompts(name, "all", cfg.limit)))
    return sets


def _pm_dir(config: PipelineConfig, out_dir: Path) -> Path | None:
    cfg = config.evaluate
    if not cfg.use_pm:
        return None
    path = Path(config.run_models(out_dir).evaluate_pm)
    if cfg.pm and not (path / "config.json").is_file():  # named: it must be there; this run's: if it is
        raise CaiError(f"evaluate.pm: preference model directory {path} "
                       f"{'does not exist' if not path.exists() else 'has no config.json'}")
    return path if (path / "config.json").is_file() else None


def contamination_warnings(config: PipelineConfig) -> list[str]:
    """Training stages configured to read prompts that evaluation measures on."""
    cfg = config.evaluate
    sources = {cfg.red_team_prompts, cfg.helpful_prompts}
    out = []
    reads = [("critique_revise", config.critique_revise.prompts, config.critique_revise.split),
             ("label", config.label.prompts, config.label.split)]
    if config.label.helpful_prompts:
        reads.append(("label (helpful)", config.label.helpful_prompts, config.label.split))
    for stage, source, split in reads:
        if source in sources and split in ("heldout", "all"):
            out.append(f"{stage} reads the {split!r} split of {source!r}, which evaluation holds out: "
                       f"its figures are not measured on unseen prompts")
    trained = {config.critique_revise.prompts, config.label.prompts, config.label.helpful_prompts,
               config.rl.prompts, config.rl.helpful_prompts}
    for name in cfg.benchmarks:
        if name in trained:
            out.append(f"a training stage reads the benchmark {name!r}, which evaluation uses as an outside test")
    return out


# ------------------------------------------------------------------ responses


def _drop_changed_snapshots(stage_dir: Path, snapshots: list[Snapshot], files: list[Path]) -> None:
    """Forget the cached rows of snapshots whose weights changed since they were made."""
    path = stage_dir / "snapshots.json"
    before = json.loads(path.read_text()) if path.is_file() else {}
    now = {s.name: {"spec": portable_path(s.spec, stage_dir.parent), "fingerprint": fingerprint(s.spec)}
           for s in snapshots}
    changed = {name for name, entry in now.items() if name in before and before[name] != entry}
    if changed:
        log(f"weights changed since the last evaluation: {', '.join(sorted(changed))}; their rows are redone")
        for f in files:
            _rewrite_without(f, lambda row: row["id"].split("|", 1)[0] in changed)
    write_json(path, {**{k: v for k, v in before.items() if k not in now}, **now})


def _rewrite_without(path: Path, drop) -> None:
    if not path.exists():
        return
    JsonlAppender(path).close()  # cut a torn last line first
    rows = [r for r in read_jsonl(path) if not drop(r)]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)


def _generate_responses(snapshots, sets: list[PromptSet], decodings, cfg, seed: int, factory, path: Path) -> None:
    writer = JsonlAppender(path)
    todo = {s.name: [(d, ps, p) for d in decodings for ps in sets for p in ps.prompts
                     if response_id(s.name, d, p.id) not in writer.done_ids] for s in snapshots}
    total = sum(len(v) for v in todo.values())
    if not total:
        return
    bar = progress.bar(total, "evaluate: responses", "resp")
    with writer:
        for snap in snapshots:
            items = todo[snap.name]
            if not items:
                continue
            backend = factory(snap.spec)
            for decoding in decodings:
                chunk_items = [(ps, p) for d, ps, p in items if d == decoding]
                # Same seed for every snapshot, so sampled responses differ only by the model.
                params = SamplingParams(max_new_tokens=cfg.max_new_tokens, seed=zlib.crc32(f"{seed}:eval".encode()),
                                        temperature=0.0 if decoding == "greedy" else cfg.sample_temperature)
                step = max(cfg.batch_size, 1)
                for i in range(0, len(chunk_items), step):
                    chunk = chunk_items[i:i + step]
                    done = backend.generate([[{"role": "user", "content": p.prompt}] for _, p in chunk], params)
                    for (ps, p), c in zip(chunk, done, strict=True):
                        writer.append({"id": response_id(snap.name, decoding, p.id), "snapshot": snap.name,
                                       "decoding": decoding, "set": ps.name, "kind": ps.kind, "prompt_id": p.id,
                                       "prompt": p.prompt, "response": c.text, "tokens": c.tokens,
                                       "finished": c.finished})
                    bar.update(len(chunk))
            del backend
    bar.close()


# ------------------------------------------------------------------ scores


def _missing_scores(path: Path, stage_dir: Path, responses: dict, settings: dict) -> list[dict]:
    """Responses that have no score row under the current scorer settings."""
    settings_path = stage_dir / "scorer.json"
    if settings_path.is_file() and json.loads(settings_path.read_text()) != settings and path.exists():
        log("scorer settings changed: scores are recomputed")
        path.unlink()
    write_json(settings_path, settings)
    done = JsonlAppender(path).done_ids
    return [r for rid, r in responses.items() if rid not in done]


def _score_responses(rows: list[dict], principles: dict, judge, pm_dir: Path | None, cfg, contrast,
                     path: Path) -> None:
    """Contrast score (the run's contrast settings, as in stage 3), second opinion and PM score of each response."""
    pm = None
    if pm_dir is not None:
        pm = PMReward(pm_dir, cfg.device, batch_size=cfg.batch_size)
    bar = progress.bar(len(rows), "evaluate: scores", "resp")
    # Chunks group the responses scored under the same principle (its system prompts and demonstration
    # are read once for all of them) and, within it, all snapshots' responses to the same prompt.
    rows = sorted(rows, key=lambda r: (r["kind"], principles[(r["kind"], r["prompt_id"])].id, r["prompt_id"], r["id"]))
    chunk_size = 128
    with JsonlAppender(path) as writer:
        for i in range(0, len(rows), chunk_size):
            chunk = rows[i:i + chunk_size]
            scored = [r for r in chunk if r["response"].strip()]
            items = [(r["prompt"], principles[(r["kind"], r["prompt_id"])], r["response"]) for r in scored]
            by_principle = dict(zip((r["id"] for r in scored), contrast.scores(judge, items), strict=True))
            refusal = {}
            if cfg.second_opinion:
                refusal = dict(zip((r["id"] for r in scored),
                                   refusal_scores(judge, [(r["prompt"], r["response"]) for r in scored]), strict=True))
            pm_scores = {}
            if pm is not None:
                values = pm([[{"role": "user", "content": r["prompt"]}] for r in chunk], [r["response"] for r in chunk])
                pm_scores = dict(zip((r["id"] for r in chunk), values, strict=True))
            for r in chunk:
                writer.append({"id": r["id"], "principle_id": principles[(r["kind"], r["prompt_id"])].id,
                               "contrast": _round(by_principle.get(r["id"])),
                               "refusal_score": _round(refusal.get(r["id"])), "pm": _round(pm_scores.get(r["id"]))})
            bar.update(len(chunk))
    bar.close()


def _round(x: float | None) -> float | None:
    return None if x is None else round(float(x), 6)


# ------------------------------------------------------------------ verdicts


def _verdicts(cfg, stage_dir: Path, out_dir: Path, responses: dict, factory, path: Path
              ) -> tuple[dict[str, AnswerVerdict], dict]:
    """Each answer's verdict from ``evaluate.judge``, and a description of the judge for effect.json."""
    if cfg.judge == RULES:
        return ({rid: rules_verdict(r["prompt"], r["response"], r["kind"]) for rid, r in responses.items()},
                {"name": RULES})

    backend = _Lazy(lambda: factory(cfg.judge))
    judge = ModelJudge(backend, spec_name(cfg.judge), batch_size=cfg.batch_size)
    settings = {"judge": portable_path(spec_name(cfg.judge), out_dir), "rubric": rubric_digest()}
    settings_path = stage_dir / "judge.json"
    if settings_path.is_file() and json.loads(settings_path.read_text()) != settings and path.exists():
        log("judge or rubric changed: the judge's readings are redone")
        path.unlink()
    write_json(settings_path, settings)
    writer = JsonlAppender(path)
    todo = [r for rid, r in responses.items() if rid not in writer.done_ids]
    if todo:
        bar = progress.bar(len(todo), "evaluate: judge", "resp")
        with writer:
            for i in range(0, len(todo), 256):
                chunk = todo[i:i + 256]
                probs = judge.probabilities([(r["prompt"], r["response"], r["kind"]) for r in chunk])
                for r, p in zip(chunk, probs, strict=True):
                    writer.append({"id": r["id"], "p_yes": p})
                bar.update(len(chunk))
        bar.close()
    p_yes = {r["id"]: r["p_yes"] for r in read_jsonl(path)}
    if cfg.judge_threshold is not None:
        thresholds = {f: cfg.judge_threshold for f in ("harmful", "declines", "explains", "coherent", "helpful")}
        fitted = None
    else:
        fitted = _cached(stage_dir / "judge_thresholds.json", settings, lambda: dev_thresholds(judge))
        thresholds = fitted["thresholds"]
    judge.thresholds = thresholds
    verdicts = {rid: judge.decide(p_yes[rid], r["kind"]) for rid, r in responses.items() if rid in p_yes}
    return verdicts, {"name": judge.name, "thresholds": thresholds,
                      "fitted_on": "graded development split" if fitted else "evaluate.judge_threshold"}


def _write_verdicts(path: Path, verdicts: dict[str, AnswerVerdict], judge: str) -> None:
    """Every answer's verdict, for the report and for anyone auditing the table (rewritten each run)."""
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for rid in sorted(verdicts):
            f.write(json.dumps({"id": rid, "judge": judge, **verdicts[rid].as_dict()}, ensure_ascii=False) + "\n")
    tmp.replace(path)


def _cached(path: Path, key: dict, make) -> dict:
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            return cached
    result = {"key": key, **make()}
    write_json(path, result)
    return result


# ------------------------------------------------------------------ Elo


def elo_tables(config: PipelineConfig, snapshots: list[Snapshot], prompts, responses: dict, scores: dict,
               principles: dict, judge, stage_dir: Path) -> dict:
    """Pairwise judgements of greedy responses on each axis, and Bradley-Terry Elo with intervals."""

    cfg = config.label
    method = judge_method(cfg)
    names = [s.name for s in snapshots]
    temperature = None
    if method == "contrast":
        temperature = cfg.contrast_temperature or _fit_contrast_temperature(config, judge)
    axes = {}
    cache_path = stage_dir / "comparisons.jsonl"
    writer = JsonlAppender(cache_path)
    with writer:
        for kind in KINDS:
            comparisons = []
            pending = []
            for p in prompts[kind]:
                for (i, a), (j, b) in itertools.combinations(enumerate(names), 2):
                    ra = responses.get(response_id(a, "greedy", p.id))
                    rb = responses.get(response_id(b, "greedy", p.id))
                    if ra is None or rb is None:
                        continue
                    if ra["response"].strip() == rb["response"].strip():
                        comparisons.append((i, j, 0.5, p.id))
                    elif method == "contrast":
                        sa, sb = scores.get(ra["id"], {}).get("contrast"), scores.get(rb["id"], {}).get("contrast")
                        if sa is None or sb is None:  # an empty response loses to any other
                            p_a = 0.5 if sa is None and sb is None else (0.0 if sa is None else 1.0)
                        else:
                            p_a = feedback.contrast_p_a(sa, sb, temperature)
                        comparisons.append((i, j, p_a, p.id))
                    else:
                        key = f"{method}|{ra['id']}|{rb['id']}"
                        pending.append((key, i, j, p, ra["response"], rb["response"]))
            todo = [x for x in pending if x[0] not in writer.done_ids]
            if todo:
                items = [(p.prompt, principles[(kind, p.id)], a, b) for _, _, _, p, a, b in todo]
                judged = _judge_both_orders(judge, method, items, cfg)
                for (key, *_), p_a in zip(todo, judged, strict=True):
                    writer.append({"id": key, "p_a": round(p_a, 6)})
            if pending:
                cached = {r["id"]: r["p_a"] for r in read_jsonl(cache_path)}
                comparisons += [(i, j, cached[key], p.id) for key, i, j, p, _, _ in pending]
            fit = bootstrap_elo(comparisons, len(names), anchor=0, samples=config.evaluate.bootstrap_samples,
                                seed=config.seed)
            axes[AXIS[kind]] = {
                "prompts": len(prompts[kind]), "comparisons": len(comparisons),
                "snapshots": {n: {"elo": fit["elo"][k], "low": fit["low"][k], "high": fit["high"][k]}
                              for k, n in enumerate(names)},
            }
    return {"snapshots": names, "method": method, "contrast_temperature": temperature, "anchor": names[0],
            "axes": axes}


def _judge_both_orders(judge, method: str, items, cfg) -> list[float]:
    """P(A) per item; for methods with an order, the mean over (A, B) and (B, A)."""

    fewshot = feedback.load_label_fewshot(cfg.fewshot_file)[:cfg.fewshot] if method == "multiple_choice" else []
    settings = judge_settings(cfg, fewshot, 1.0)
    if method == "multiple_choice":
        settings["both_orders"] = True
        return [j.p_a for j in feedback.judge(judge, method, items, **settings)]
    forward = feedback.judge(judge, method, items, **settings)
    backward = feedback.judge(judge, method, [(p, pr, b, a) for p, pr, a, b in items], **settings)
    return [(f.p_a + 1 - b.p_a) / 2 for f, b in zip(forward, backward, strict=True)]


def judge_method(cfg) -> str:
    """The stage-3 method as a judge: ``rlcd`` samples its pairs instead of judging, so it judges by contrast."""
    return "contrast" if cfg.method == "rlcd" else cfg.method


def _fit_contrast_temperature(config: PipelineConfig, judge) -> float:
    constitution = load_constitution(config.constitution)
    pools = {kind: [p for p in constitution.feedback_principles if p.kind == kind] for kind in ("harmless", "helpful")}
    return fit_contrast_temperature(judge, pools, config.seed, config.label)


def judge_validity(config: PipelineConfig, stage_dir: Path, judge, judge_spec: str, pools) -> dict:
    """The judge's accuracy on the test half of the shipped pairs (never used for choosing settings).

    A judge within 0.1 of chance (0.5) on an axis gets a warning: its Elo on that axis says little.
    """

    cfg = config.label
    path = stage_dir / "judge_validity.json"
    method = judge_method(cfg)
    key = {"judge": judge_spec, "method": method, "reduce": cfg.contrast_reduce, "fewshot": cfg.fewshot,
           "both_orders": cfg.both_orders, "constitution": config.constitution, "seed": config.seed,
           "pairs": config.evaluate.judge_pairs, "half": "test", "context": cfg.contrast_context,
           "contrast_fewshot": cfg.contrast_fewshot, "contrast_max_tokens": cfg.contrast_max_tokens}
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            return cached
    fewshot = feedback.load_label_fewshot(cfg.fewshot_file)[:cfg.fewshot] if method == "multiple_choice" else []
    result: dict = {"key": key, "method": method, "model": judge_spec, "sets": {}, "warnings": []}
    for name in EVAL_SETS:
        pairs = load_eval_pairs(name, config.evaluate.judge_pairs, half="test")
        pool = [p for p in load_constitution(config.constitution).feedback_principles if p.kind == name]
        items = [(r["prompt"], sample_principles(pool, 1, config.seed, r["id"])[0], r["a"], r["b"]) for r in pairs]
        judged = feedback.judge(judge, method, items, **judge_settings(cfg, fewshot, 1.0))
        stats = summarise([j.p_a for j in judged], [r["chosen_is_a"] for r in pairs])
        axis = "harmlessness" if name == "harmless" else "helpfulness"
        result["sets"][axis] = {"pairs": name, "n": stats["n"], "accuracy": stats["accuracy"],
                                "position_bias": stats["position_bias"]}
        if abs(stats["accuracy"] - 0.5) <= 0.1:
            result["warnings"].append(f"the judge agrees with the known better answer on only "
                                      f"{stats['accuracy']:.0%} of the shipped {name} test pairs (chance is 50%): "
                                      f"its {axis} Elo says little")
    write_json(path, result)
    return result


def elo_text(elo: dict) -> str:
    judge = elo.get("judge", {})
    lines = [f"Elo (Bradley-Terry, base = 0, 95% bootstrap intervals over prompts); judge: {judge.get('model')} "
             f"({elo['method']})"]
    for axis, table in elo["axes"].items():
        validity = judge.get("sets", {}).get(axis, {})
        lines.append(f"{axis}: {table['comparisons']} comparisons on {table['prompts']} prompts; judge accuracy on "
                     f"the shipped {validity.get('pairs', '?')} pairs: {validity.get('accuracy', float('nan')):.2f}")
        lines.append("| snapshot | Elo | 95% interval |")
        lines.append("|---|---|---|")
        for name, v in table["snapshots"].items():
            lines.append(f"| {name} | {v['elo']:.0f} | [{v['low']:.0f}, {v['high']:.0f}] |")
    for w in judge.get("warnings", []):
        lines.append(f"WARNING: {w}")
    return "\n".join(lines)
