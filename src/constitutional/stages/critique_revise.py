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

Run:
    cai critique-revise --config configs/smollm2-cpu.yaml --out runs/demo
    cai critique-revise --out runs/x --set critique_revise.limit=8 --set critique_revise.rounds=1

Writes ``critique_revise/revisions.jsonl`` (one row a prompt, appended as each batch finishes;
a rerun skips the ids already there) and ``critique_revise/summary.json``.
"""

from __future__ import annotations

import sys
import time
import zlib
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm

from constitutional.backends import spec_name
from constitutional.backends.base import Backend, SamplingParams
from constitutional.config import PipelineConfig
from constitutional.constitution import Principle, load_constitution, sample_principles
from constitutional.datasets import PromptRow, load_prompts
from constitutional.prompts import (
    FewShotExample,
    clean_generation,
    critique_chat,
    degenerate_reason,
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
OUTPUT = "revisions.jsonl"


@dataclass
class _Plan:
    """What one prompt will go through: its principles (one per round) and few-shot examples."""

    row: PromptRow
    principles: list[Principle]
    fewshot: list[FewShotExample]


def run(config: PipelineConfig, out_dir: str | Path, backend: Backend | None = None) -> dict:
    """Run stage 1 into ``out_dir/critique_revise``; return the summary (also saved as JSON).

    ``backend`` defaults to the in-process transformers backend on ``critique_revise.model``.
    """
    cfg = config.critique_revise
    stage_dir = Path(out_dir) / STAGE_DIR
    out_path = stage_dir / OUTPUT
    # Check every input before loading a model.
    constitution = load_constitution(config.constitution)
    constitution.require_sl()
    pool = load_fewshot(cfg.fewshot_file)
    prompts = load_prompts(cfg.prompts, cfg.split, cfg.limit)
    check_resume_settings(stage_dir, {**asdict(cfg), "model": spec_name(cfg.model), "seed": config.seed,
                                      "constitution": config.constitution},
                          free={"limit", "batch_size", "device"})
    writer = JsonlAppender(out_path)
    if writer.repaired_bytes:
        _log(f"cut a torn last line ({writer.repaired_bytes} bytes) from {out_path}")
    todo = [p for p in prompts if p.id not in writer.done_ids]
    _log(f"critique-revise: {len(prompts)} prompts, {len(prompts) - len(todo)} already done, "
         f"{len(todo)} to do, {cfg.rounds} rounds")

    # One few-shot context for the whole run, as in the paper: every critique and revision chat
    # then starts with the same tokens, which the backend computes once per call.
    fewshot = pick_fewshot(pool, cfg.fewshot, config.seed, "run")
    plans = [
        _Plan(p, sample_principles(constitution.sl_principles, cfg.rounds, config.seed, p.id), fewshot)
        for p in todo
    ]
    tokens = 0
    skipped: list[str] = []
    start = time.time()
    if plans:
        if backend is None:
            from constitutional.backends import load_backend

            backend = load_backend(cfg.model, batch_size=cfg.batch_size, device=cfg.device)
        start = time.time()  # tokens/s counts generation, not model loading
        fits = []
        for plan in plans:
            (fits if _fits_context(plan, cfg, backend) else skipped).append(plan)
        skipped = [plan.row.id for plan in skipped]
        if skipped:
            _log(f"skipping {len(skipped)} prompts longer than the model's context "
                 f"({backend.context_length} tokens): {', '.join(skipped[:5])}"
                 + (" ..." if len(skipped) > 5 else ""))
        # One tick per generated text: the initial response, then a critique and a revision a round.
        bar = tqdm(total=len(fits) * (1 + 2 * cfg.rounds), desc="critique-revise", unit="gen",
                   file=sys.stderr, dynamic_ncols=True)

        def on_batch(chats: int, batch_tokens: int) -> None:
            nonlocal tokens
            tokens += batch_tokens
            bar.set_postfix_str(f"{tokens / max(time.time() - start, 1e-9):.1f} tok/s", refresh=False)
            bar.update(chats)

        with writer:
            for i in range(0, len(fits), cfg.batch_size):
                chunk = fits[i:i + cfg.batch_size]
                for row in _revise_chunk(chunk, cfg, config.seed, backend, on_batch):
                    writer.append(row.to_dict())
        bar.close()

    seconds = time.time() - start
    summary = _summarise(out_path, prompts, len(todo) - len(skipped), skipped, tokens, seconds,
                         backend.name if backend is not None else spec_name(cfg.model), constitution.sources)
    write_json(stage_dir / "summary.json", summary)
    _log(f"critique-revise: {summary['rows']} rows in {out_path} "
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


def _revise_chunk(chunk: list[_Plan], cfg, seed: int, backend: Backend, on_batch) -> list[RevisionRow]:
    key = chunk[0].row.id

    def params(budget: int, step: str) -> SamplingParams:
        return SamplingParams(max_new_tokens=budget, temperature=cfg.temperature, top_p=cfg.top_p,
                              seed=_call_seed(seed, key, step))

    sys_prompt = cfg.system_prompt
    initial = backend.generate([response_chat(p.row.prompt, sys_prompt) for p in chunk],
                               params(cfg.max_new_tokens, "initial"), on_batch)
    initial_text = [clean_generation(c.text) for c in initial]
    current = list(initial_text)
    rounds: list[list[Round]] = [[] for _ in chunk]
    for r in range(cfg.rounds):
        critique_chats = [
            critique_chat(p.row.prompt, current[j], p.principles[r], p.fewshot, sys_prompt)
            for j, p in enumerate(chunk)
        ]
        critiques = [clean_generation(c.text) for c in backend.generate(
            critique_chats, params(cfg.critique_max_new_tokens, f"critique-{r}"), on_batch)]
        revision_chats = [
            revision_chat(p.row.prompt, current[j], p.principles[r], critiques[j], p.fewshot, sys_prompt)
            for j, p in enumerate(chunk)
        ]
        revisions = [clean_generation(c.text) for c in backend.generate(
            revision_chats, params(cfg.max_new_tokens, f"revision-{r}"), on_batch)]
        for j, p in enumerate(chunk):
            examples = [text for ex in p.fewshot for text in (ex.revision, ex.critique, ex.response)]
            reason = degenerate_reason(revisions[j], critiques[j], examples, previous=current[j])
            principle = p.principles[r]
            rounds[j].append(Round(principle.id, principle.critique_request, critiques[j],
                                   principle.revision_request, revisions[j], reason))
            if reason is None:
                current[j] = revisions[j]

    rows = []
    for j, p in enumerate(chunk):
        usable = [rd for rd in rounds[j] if rd.degenerate is None]
        final = usable[-1].revision if usable else rounds[j][-1].revision
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
            degenerate=None if usable else rounds[j][-1].degenerate,
        ))
    return rows


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
        "tokens_generated_this_run": tokens,
        "seconds_this_run": round(seconds, 2),
        "tokens_per_second": round(tokens / seconds, 2) if seconds > 0 else None,
        "model": model,
        "constitution": list(sources),
    }


def _log(message: str) -> None:
    print(f"[cai] {message}", file=sys.stderr, flush=True)
