"""Stage 1: critique and revision, the data of supervised Constitutional AI (SL-CAI).

Paper: Bai et al. 2022, section 3.1. For each red-team prompt the helpful model writes an
initial response. Then, for each of ``rounds`` rounds, a principle is drawn at random from the
constitution's SL principles; the model is shown few-shot examples of the whole exchange, the
prompt, its current response and the principle's critique request, and writes a critique;
then it gets the revision request and writes a revision, which becomes the current response.
The final revision is the SFT target of stage 2. Every round is kept in the row.

Beyond the paper: a revision that is empty, mostly a copy of the critique, meta-commentary
about "the assistant's response", a copy of a few-shot example, or the response it was meant
to revise with nothing changed is *degenerate*. It is
recorded in its round, the next round critiques the last usable response instead, and a row
whose rounds all were degenerate is flagged (``degenerate``) so that stage 2 leaves it out.
Each round is a fresh context (few-shot examples, prompt, latest usable response), which
keeps the context short for small models. The few-shot examples (``fewshot`` of them, drawn
once per run from the seed) are the same for every prompt, as in the paper; the backend then
computes their shared prefix once per call instead of once per chat.

Constitution-guided selection (beyond the paper, for small models whose single revision is
often noise): with ``candidates: k`` each round samples k revisions, and with
``follows_candidates: m`` m more answers from the model under the round's scoring principle's
``follows`` system prompt (context distillation), each continuing one of the constitution's
``openings`` for the principle's kind when it lists some (``follows_openings``); the feedback
model scores every candidate and the current response under that principle (the contrast method:
log P(response | follows) - log P(response | violates), per token) and the best one becomes the
current response. The
current response wins ties, and a round where it stays best records ``kept-current``.
``initial_candidates: k`` does the same for the first response. The round's scoring principle is
the feedback principle its SL principle names (``feedback:`` in the constitution), else a
harmless one drawn at random. Every candidate, its source and its score is kept in the row.

Target filter (``target_filter``, beyond the paper; issue: a small model's candidates often decline and
then comply, or loop, and it learns both): every candidate of a prompt is read by the rules judge and
the target is the best that a reader would accept, a decline with a reason first, trimmed to at most
``target_sentences`` whole sentences (``evaluation/targets.py``). A prompt with none that declines with
a reason gets ``filter_candidates`` more answers under the follows prompt; if nothing passes even then,
the row is flagged ``no-clean-target`` and stage 2 leaves it out. The row's ``target`` records every candidate's
reading.

Run:
    cai critique-revise --config configs/smollm2-cpu.yaml --out runs/demo
    cai critique-revise --out runs/x --set critique_revise.limit=8 --set critique_revise.rounds=1

Writes ``critique_revise/revisions.jsonl`` (one row a prompt, appended as each batch finishes;
a rerun skips the ids already there) and ``critique_revise/summary.json``.
"""

from __future__ import annotations

import time
import zlib
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from constitutional import feedback, progress
from constitutional.backends import load_backend, same_model, spec_name
from constitutional.backends.base import Backend, SamplingParams
from constitutional.config import PipelineConfig
from constitutional.constitution import FeedbackPrinciple, Principle, load_constitution, sample_principles
from constitutional.errors import CaiError
from constitutional.evaluation.targets import TIERS, choose_target
from constitutional.feedback import ContrastSettings, pick_reasons
from constitutional.models import check_model_spec
from constitutional.progress import log
from constitutional.prompt_sources import PromptRow, load_prompts
from constitutional.prompts import (
    FewShotExample,
    clean_generation,
    critique_chat,
    degenerate_reason,
    join_opening,
    load_fewshot,
    pick_fewshot,
    response_chat,
    revision_chat,
)
from constitutional.records import (
    JsonlAppender,
    RevisionRow,
    Round,
    check_resume_settings,
    read_jsonl,
    write_json,
)

STAGE_DIR = "critique_revise"
# settings that may change between runs into the same directory: the stage takes up where it stopped
FREE_SETTINGS = {"limit", "batch_size", "device"}
OUTPUT = "revisions.jsonl"


@dataclass
class _Plan:
    """What one prompt will go through: its principles (one per round) and few-shot examples, and
    with selection, the feedback principle that scores each round's candidates and the initial ones."""

    row: PromptRow
    principles: list[Principle]
    fewshot: list[FewShotExample]
    scorers: list[FeedbackPrinciple] | None = None
    initial_scorer: FeedbackPrinciple | None = None


def selecting(cfg) -> bool:
    """Whether a stage-1 config asks for constitution-guided selection."""
    return cfg.candidates > 1 or cfg.initial_candidates > 1 or cfg.follows_candidates > 0


def scoring_principles(constitution, principles: list[Principle], seed: int, key: str
                       ) -> tuple[list[FeedbackPrinciple], FeedbackPrinciple]:
    """The feedback principle that scores each round's candidates (the one the SL principle names,
    else a harmless one drawn for the round), and the one that scores initial candidates."""
    by_id = {p.id: p for p in constitution.feedback_principles}
    harmless = [p for p in constitution.feedback_principles if p.kind == "harmless"]
    drawn = sample_principles(harmless, len(principles) + 1, seed, f"select:{key}")
    rounds = [by_id[p.feedback] if p.feedback else drawn[r] for r, p in enumerate(principles)]
    return rounds, drawn[-1]


def pick_best(scores: list[float | None]) -> int:
    """Index of the highest score (None: not eligible); the earliest wins ties, so the current
    response (listed first) is kept unless a candidate beats it.

    >>> pick_best([0.1, 0.3, None, 0.3])
    1
    >>> pick_best([0.5, 0.2])
    0
    """
    best = 0
    for i, score in enumerate(scores):
        if score is not None and (scores[best] is None or score > scores[best]):
            best = i
    return best


def run(config: PipelineConfig, out_dir: str | Path, backend: Backend | None = None,
        scorer_backend=None) -> dict:
    """Run stage 1 into ``out_dir/critique_revise``; return the summary (also saved as JSON).

    ``backend`` defaults to the in-process transformers backend on ``critique_revise.model``;
    ``scorer_backend`` (selection only) to ``critique_revise.feedback_model``, else ``backend``.
    """
    cfg = config.critique_revise
    stage_dir = Path(out_dir) / STAGE_DIR
    out_path = stage_dir / OUTPUT
    # Check every input before loading a model.
    constitution = load_constitution(config.constitution)
    constitution.require_sl()
    select = selecting(cfg)
    if select or (cfg.target_filter and cfg.filter_candidates):
        if not any(p.kind == "harmless" for p in constitution.feedback_principles):
            raise CaiError(f"constitution {constitution.name!r}: selection (critique_revise.candidates) and the "
                           f"target filter's resampling use feedback principles of kind 'harmless', and it has none")
        feedback.check_contrast_principles(constitution.feedback_principles)
        if cfg.feedback_model:
            check_model_spec(cfg.feedback_model, "critique_revise.feedback_model")
    pool = load_fewshot(cfg.fewshot_file)
    prompts = load_prompts(cfg.prompts, cfg.split, cfg.limit)
    check_resume_settings(stage_dir, {**asdict(cfg), "model": spec_name(cfg.model), "seed": config.seed,
                                      "constitution": config.constitution},
                          free=FREE_SETTINGS)
    writer = JsonlAppender(out_path)
    if writer.repaired_bytes:
        log(f"cut a torn last line ({writer.repaired_bytes} bytes) from {out_path}")
    todo = [p for p in prompts if p.id not in writer.done_ids]

    def announce() -> None:
        log(f"critique-revise: {len(prompts)} prompts, {len(prompts) - len(todo)} already done, "
             f"{len(todo)} to do, {cfg.rounds} rounds")

    # One few-shot context for the whole run, as in the paper: every critique and revision chat
    # then starts with the same tokens, which the backend computes once per call.
    fewshot = pick_fewshot(pool, cfg.fewshot, config.seed, "run")
    plans = []
    for p in todo:
        principles = sample_principles(constitution.sl_principles, cfg.rounds, config.seed, p.id)
        plan = _Plan(p, principles, fewshot)
        if select or cfg.target_filter:
            plan.scorers, plan.initial_scorer = scoring_principles(constitution, principles, config.seed, p.id)
        plans.append(plan)
    tokens = 0
    skipped: list[str] = []
    start = time.time()
    if not plans:
        announce()
    if plans:
        if backend is None:
            backend = load_backend(cfg.model, batch_size=cfg.batch_size, device=cfg.device)
        scorer = None
        if select:
            if scorer_backend is not None:
                scorer = scorer_backend
            else:
                spec = config.run_models(out_dir).stage1_feedback
                scorer = backend if same_model(spec, cfg.model) else load_backend(
                    spec, batch_size=cfg.batch_size, device=cfg.device)
        start = time.time()  # tokens/s counts generation, not model loading
        fits = []
        for plan in plans:
            (fits if _fits_context(plan, cfg, backend) else skipped).append(plan)
        skipped = [plan.row.id for plan in skipped]
        if skipped and not fits and not out_path.exists():
            raise CaiError(f"critique-revise: none of the {len(skipped)} prompts fits the model's context "
                           f"({backend.context_length} tokens) with its principle, few-shot examples and "
                           f"{2 * cfg.max_new_tokens + cfg.critique_max_new_tokens} new tokens (a principle or "
                           f"few-shot file far too long?)")
        announce()  # after the context check: a run that cannot start says only why
        if skipped:
            log(f"skipping {len(skipped)} prompts longer than the model's context "
                 f"({backend.context_length} tokens): {', '.join(skipped[:5])}"
                 + (" ..." if len(skipped) > 5 else ""))
        # One tick per generated text: the initial response(s), then a critique and the revision(s) a round.
        per_prompt = 1 + 2 * cfg.rounds
        if select:
            per_prompt = (cfg.initial_candidates + cfg.rounds * (1 + cfg.candidates)
                          + (cfg.rounds + 1) * cfg.follows_candidates)
        bar = progress.bar(len(fits) * per_prompt, "critique-revise", "gen")

        def on_batch(chats: int, batch_tokens: int) -> None:
            nonlocal tokens
            tokens += batch_tokens
            bar.set_postfix_str(f"{tokens / max(time.time() - start, 1e-9):.1f} tok/s", refresh=False)
            bar.update(chats)

        with writer:
            for i in range(0, len(fits), cfg.batch_size):
                chunk = fits[i:i + cfg.batch_size]
                for row in _revise_chunk(chunk, cfg, config.seed, backend, on_batch, scorer,
                                         ContrastSettings.of(config.label), constitution.openings,
                                         constitution.reasons):
                    writer.append(row.to_dict())
        bar.close()

    seconds = time.time() - start
    summary = _summarise(out_path, prompts, len(todo) - len(skipped), skipped, tokens, seconds,
                         backend.name if backend is not None else spec_name(cfg.model), constitution.sources)
    write_json(stage_dir / "summary.json", summary)
    log(f"critique-revise: {summary['rows']} rows in {out_path} "
         f"({summary['degenerate_rows']} flagged degenerate); {tokens} tokens in {seconds:.0f} s")
    return summary


def _fits_context(plan: _Plan, cfg, backend: Backend) -> bool:
    """Whether the longest chat of this prompt (the last revision request) fits the context."""
    budget = 2 * cfg.max_new_tokens + cfg.critique_max_new_tokens
    longest = max(
        backend.count_tokens(revision_chat(plan.row.prompt, "", p, "", plan.fewshot, cfg.system_prompt))
        for p in plan.principles
    )
    return longest + budget <= backend.context_length


def _call_seed(seed: int, key: str, step: str) -> int:
    """A sampling seed that depends on the run seed, the chunk and the call, not on timing."""
    return zlib.crc32(f"{seed}:{key}:{step}".encode()) & 0x7FFFFFFF


def _score(scorer, contrast: ContrastSettings, items: list[tuple[str, FeedbackPrinciple, str]]) -> list[float]:
    return contrast.scores(scorer, items) if items else []


def _select(scorer, contrast: ContrastSettings, sets: list[tuple[str, FeedbackPrinciple, list[dict]]]) -> list[int]:
    """Score every eligible candidate of every set in one batched call; the index of each set's best.

    A candidate is a dict with ``text`` and ``source`` (and ``degenerate``: a reason, or None);
    degenerate and empty ones are not eligible. ``score`` is filled in place.
    """
    flat = [(k, i) for k, (_, _, cands) in enumerate(sets) for i, c in enumerate(cands)
            if not c.get("degenerate") and c["text"].strip()]
    scores = _score(scorer, contrast, [(sets[k][0], sets[k][1], sets[k][2][i]["text"]) for k, i in flat])
    for (k, i), value in zip(flat, scores, strict=True):
        sets[k][2][i]["score"] = round(value, 6)
    return [pick_best([c.get("score") for c in cands]) for _, _, cands in sets]


def _revise_chunk(chunk: list[_Plan], cfg, seed: int, backend: Backend, on_batch, scorer=None,
                  contrast: ContrastSettings | None = None, openings: dict | None = None,
                  reasons: tuple[str, ...] = ()) -> list[RevisionRow]:
    key = chunk[0].row.id
    select = scorer is not None
    contrast = contrast or ContrastSettings()
    openings = openings or {}
    reason_scores: dict = {}  # pick_reasons' scores, shared by the chunk's calls of follows_answers

    def params(budget: int, step: str) -> SamplingParams:
        return SamplingParams(max_new_tokens=budget, temperature=cfg.temperature, top_p=cfg.top_p,
                              seed=_call_seed(seed, key, step))

    def follows_answers(principles: list[FeedbackPrinciple], step: str, m: int | None = None,
                        rows: list[int] | None = None) -> list[list[str]]:
        """``m`` answers (default ``follows_candidates``) per prompt of ``rows`` (default: all), sampled
        under the scoring principle's follows prompt; the i-th continues the constitution's i-th opening
        for the principle's kind, if it lists any, its ``{reason}`` slot filled for the request."""
        m = (cfg.follows_candidates if select else 0) if m is None else m
        rows = list(range(len(chunk))) if rows is None else rows
        if not m or not rows:
            return [[] for _ in rows]
        chats, starts = [], []
        for k, j in enumerate(rows):
            p = chunk[j]
            kind_openings = openings.get(principles[k].kind, ()) if cfg.follows_openings else ()
            for i in range(m):
                chat = [{"role": "system", "content": principles[k].follows}, {"role": "user", "content": p.row.prompt}]
                start = kind_openings[i % len(kind_openings)] if kind_openings else ""
                if start:
                    chat.append({"role": "assistant", "content": start})
                chats.append(chat)
                starts.append(start)
        starts = pick_reasons(scorer if scorer is not None else backend, chats, starts, reasons, reason_scores)
        done = backend.generate(chats, params(cfg.max_new_tokens, step), on_batch)
        out = [join_opening(start, clean_generation(c.text) if not start else c.text)
               for start, c in zip(starts, done, strict=True)]
        return [out[k * m:(k + 1) * m] for k in range(len(rows))]

    sys_prompt = cfg.system_prompt
    examples = [[text for ex in p.fewshot for text in (ex.revision, ex.critique, ex.response)] for p in chunk]
    k0 = cfg.initial_candidates if select else 1
    initial = backend.generate([response_chat(p.row.prompt, sys_prompt) for p in chunk for _ in range(k0)],
                               params(cfg.max_new_tokens, "initial"), on_batch)
    initial_text = [clean_generation(c.text) for c in initial]
    initial_sets: list[list[dict] | None] = [None] * len(chunk)
    if select and (k0 > 1 or cfg.follows_candidates):
        extra = follows_answers([p.initial_scorer for p in chunk], "initial-follows")
        sets = []
        for j, p in enumerate(chunk):
            cands = [{"text": t, "source": "sample", "score": None} for t in initial_text[j * k0:(j + 1) * k0]]
            cands += [{"text": t, "source": "follows", "score": None} for t in extra[j]]
            for c in cands:
                c["degenerate"] = degenerate_reason(c["text"], "", examples[j])
            sets.append((p.row.prompt, p.initial_scorer, cands))
        best = _select(scorer, contrast, sets)
        initial_sets = [cands for _, _, cands in sets]
        initial_text = [cands[b]["text"] for (_, _, cands), b in zip(sets, best, strict=True)]
    else:
        initial_text = initial_text[::k0]
    current = list(initial_text)
    rounds: list[list[Round]] = [[] for _ in chunk]
    for r in range(cfg.rounds):
        critique_chats = [
            critique_chat(p.row.prompt, current[j], p.principles[r], p.fewshot, sys_prompt)
            for j, p in enumerate(chunk)
        ]
        critiques = [clean_generation(c.text) for c in backend.generate(
            critique_chats, params(cfg.critique_max_new_tokens, f"critique-{r}"), on_batch)]
        k = cfg.candidates if select else 1
        revision_chats = [
            revision_chat(p.row.prompt, current[j], p.principles[r], critiques[j], p.fewshot, sys_prompt)
            for j, p in enumerate(chunk) for _ in range(k)
        ]
        revisions = [clean_generation(c.text) for c in backend.generate(
            revision_chats, params(cfg.max_new_tokens, f"revision-{r}"), on_batch)]
        if not select:
            for j, p in enumerate(chunk):
                reason = degenerate_reason(revisions[j], critiques[j], examples[j], previous=current[j])
                principle = p.principles[r]
                rounds[j].append(Round(principle.id, principle.critique_request, critiques[j],
                                       principle.revision_request, revisions[j], reason))
                if reason is None:
                    current[j] = revisions[j]
            continue
        extra = follows_answers([p.scorers[r] for p in chunk], f"follows-{r}")
        sets = []
        for j, p in enumerate(chunk):
            cands = [{"text": current[j], "source": "current", "score": None, "degenerate": None}]
            for text in revisions[j * k:(j + 1) * k]:
                cands.append({"text": text, "source": "revision", "score": None,
                              "degenerate": degenerate_reason(text, critiques[j], examples[j], previous=current[j])})
            for text in extra[j]:
                cands.append({"text": text, "source": "follows", "score": None,
                              "degenerate": degenerate_reason(text, "", examples[j], previous=current[j])})
            sets.append((p.row.prompt, p.scorers[r], cands))
        best = _select(scorer, contrast, sets)
        for j, p in enumerate(chunk):
            cands, b = sets[j][2], best[j]
            principle = p.principles[r]
            if cands[b]["source"] == "current":
                # nothing new beat the current response: record the best new candidate, if any
                new = [c for c in cands[1:] if c.get("score") is not None]
                shown = max(new, key=lambda c: c["score"])["text"] if new else cands[1]["text"]
                reason = "kept-current" if new else (cands[1]["degenerate"] or "kept-current")
            else:
                shown, reason = cands[b]["text"], None
                current[j] = shown
            rounds[j].append(Round(principle.id, principle.critique_request, critiques[j],
                                   principle.revision_request, shown, reason, candidates=cands, selected=b))

    targets: list[dict | None] = [None] * len(chunk)
    if cfg.target_filter:
        targets = _filter_targets(chunk, cfg, initial_text, initial_sets, rounds, current, examples,
                                  follows_answers, scorer, contrast)

    rows = []
    for j, p in enumerate(chunk):
        usable = [rd for rd in rounds[j] if rd.degenerate is None]
        if select:
            # usable when the final response won a real comparison: a round or the initial draw
            # scored at least one new candidate against it
            final = current[j]
            compared = initial_sets[j] is not None or any(
                c.get("score") is not None for rd in rounds[j] for c in (rd.candidates or [])[1:])
            degenerate = None if (usable or compared) else rounds[j][-1].degenerate
        else:
            final = usable[-1].revision if usable else rounds[j][-1].revision
            degenerate = None if usable else rounds[j][-1].degenerate
        if targets[j] is not None:
            if targets[j]["kept"] is None:
                degenerate = "no-clean-target"  # kept for the audit trail; stage 2 leaves it out
            else:
                final, degenerate = targets[j]["text"], None
        rows.append(RevisionRow(
            id=p.row.id,
            prompt=p.row.prompt,
            initial_response=initial_text[j],
            rounds=rounds[j],
            messages=[{"role": "user", "content": p.row.prompt},
                      {"role": "assistant", "content": final}],
            model=backend.name,
            principle_ids=[rd.principle_id for rd in rounds[j]],
            category=p.row.category,
            degenerate=degenerate,
            initial_candidates=initial_sets[j],
            target=targets[j],
        ))
    return rows


def _filter_targets(chunk: list[_Plan], cfg, initial_text, initial_sets, rounds, current, examples,
                    follows_answers, scorer, contrast) -> list[dict]:
    """The target filter (``target_filter``): each prompt's candidates read by the rules judge, the best
    kept (``evaluation/targets.py``); for prompts none of whose candidates declines with a reason,
    ``filter_candidates`` more answers under the follows prompt, then the same choice. One record per prompt
    for its row."""

    pools: list[list[dict]] = []
    for j in range(len(chunk)):
        if initial_sets[j] is not None:
            pool = [{**c, "source": f"initial-{c['source']}"} for c in initial_sets[j]]
        else:
            pool = [{"text": initial_text[j], "source": "initial", "score": None, "degenerate": None}]
        for r, rd in enumerate(rounds[j]):
            if rd.candidates:
                pool += [{**c, "source": f"round-{r + 1}-{c['source']}"} for c in rd.candidates[1:]]
            else:
                pool.append({"text": rd.revision, "source": f"round-{r + 1}-revision", "score": None,
                             "degenerate": rd.degenerate})
        if not any(c["text"] == current[j] for c in pool):
            pool.append({"text": current[j], "source": "final", "score": None, "degenerate": None})
        pools.append(pool)
    choices = [choose_target(p.row.prompt, pool, "red-team", cfg.target_sentences) for p, pool in zip(chunk, pools,
                                                                                                       strict=True)]
    # resample where nothing passes, and where nothing declines with a reason (a bare "I can't help with that")
    failed = [j for j, c in enumerate(choices) if c.tier != TIERS[0]]
    resampled = dict.fromkeys(range(len(chunk)), 0)
    if failed and cfg.filter_candidates:
        extra = follows_answers([chunk[j].initial_scorer for j in failed], "filter-follows", cfg.filter_candidates,
                                failed)
        new = []
        for j, texts in zip(failed, extra, strict=True):
            cands = [{"text": t, "source": "filter-follows", "score": None,
                      "degenerate": degenerate_reason(t, "", examples[j])} for t in texts]
            new.append((chunk[j].row.prompt, chunk[j].initial_scorer, cands))
            resampled[j] = len(texts)
        if scorer is not None:
            _select(scorer, contrast, new)  # fills each candidate's score
        for j, (_, _, cands) in zip(failed, new, strict=True):
            pools[j] += cands
            choices[j] = choose_target(chunk[j].row.prompt, pools[j], "red-team", cfg.target_sentences)
    records = []
    for j, choice in enumerate(choices):
        record = choice.record([c["source"] for c in pools[j]])
        record["text"] = choice.text
        record["resampled"] = resampled[j]
        records.append(record)
    return records


def _summarise(out_path: Path, prompts: list[PromptRow], written_now: int, skipped: list[str],
               tokens: int, seconds: float, model: str, sources: tuple[str, ...]) -> dict:
    rows = read_jsonl(out_path) if out_path.exists() else []
    wanted = {p.id for p in prompts}
    rows = [r for r in rows if r["id"] in wanted]
    round_reasons = Counter(rd["degenerate"] for r in rows for rd in r["rounds"] if rd["degenerate"])
    return {
        "output": str(out_path),
        "prompts": len(prompts),
        "rows": len(rows),
        "written_this_run": written_now,
        "skipped_too_long": skipped,
        "degenerate_rows": sum(1 for r in rows if r.get("degenerate")),
        "rounds": sum(len(r["rounds"]) for r in rows),
        "degenerate_rounds": dict(round_reasons),
        "principle_use": dict(Counter(pid for r in rows for pid in r["principle_ids"])),
        # with the target filter: how many targets in each tier, trimmed, resampled, or none passing
        "targets": _target_counts(rows),
        "tokens_generated_this_run": tokens,
        "seconds_this_run": round(seconds, 2),
        "tokens_per_second": round(tokens / seconds, 2) if seconds > 0 else None,
        "model": model,
        "constitution": list(sources),
    }


def _target_counts(rows: list[dict]) -> dict | None:
    filtered = [r["target"] for r in rows if r.get("target")]
    if not filtered:
        return None
    kept = [t["kept"] for t in filtered if t["kept"]]
    return {**Counter(k["tier"] for k in kept), "no-clean-target": len(filtered) - len(kept),
            "trimmed": sum(1 for k in kept if k["trimmed"]),
            "resampled_rows": sum(1 for t in filtered if t.get("resampled"))}
