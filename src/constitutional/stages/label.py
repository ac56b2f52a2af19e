"""Stage 3: AI feedback labels (RLAIF), the paper's replacement for human harmlessness labels.

Paper: Bai et al. 2022, section 4.1. For each prompt the policy (the SL-CAI model) writes two
responses; a feedback model judges which one better follows a principle drawn at random from
the constitution's feedback principles, and its probability becomes a soft label. With
``ensemble: k`` it judges under k principles and the probabilities are averaged. Red-team
prompts are judged with ``harmless`` principles; ``helpful_prompts`` (optional) with
``helpful`` ones. The methods (``multiple_choice``, ``cot``, ``contrast``) are described in
``feedback.py``; ``cai label-eval`` measures which one to trust for a feedback model.

Run:
    cai label --config configs/smollm2-cpu.yaml --out runs/demo
    cai label --out runs/mc --set label.policy=runs/demo/sft/model --set label.method=multiple_choice

``method: rlcd`` (Yang et al. 2023, "RLCD: Reinforcement Learning from Contrastive
Distillation") does not judge i.i.d. pairs: the policy answers each prompt twice, once under the
drawn principle's ``follows`` system prompt and once under its ``violates`` one, and the
``follows`` answer is preferred with ``p_chosen = rlcd_p_chosen``; with ``rlcd_rescore: true``
the pair is judged by the contrast method instead (the preferred side may then flip). Rows carry
the system prompts their responses were sampled under (``system_prompts``).

Writes ``label/comparisons.jsonl``: TRL's conversational preference format (``prompt``,
``chosen``, ``rejected``) plus ``p_chosen`` (in [0.5, 1]), both responses, P(A), the raw
scores, the principles and the method. Rows are appended as each batch finishes; a rerun
skips the ids already written. Pairs whose two responses are identical carry no preference
and are skipped (counted in ``label/summary.json``).
"""

from __future__ import annotations

import time
import zlib
from dataclasses import asdict
from pathlib import Path

from constitutional import feedback, progress
from constitutional.backends import load_backend, same_model, spec_name
from constitutional.backends.base import SamplingParams
from constitutional.config import PipelineConfig
from constitutional.constitution import load_constitution, sample_principles
from constitutional.errors import CaiError
from constitutional.evaluation.targets import choose_target
from constitutional.judge_pairs import fit_contrast_temperature, judge_settings
from constitutional.models import check_model_spec
from constitutional.progress import log
from constitutional.prompt_sources import load_prompts
from constitutional.prompts import join_opening
from constitutional.records import JsonlAppender, check_resume_settings, read_jsonl, write_json

STAGE_DIR = "label"
# settings that may change between runs into the same directory: the stage takes up where it stopped
FREE_SETTINGS = {"limit", "helpful_limit", "batch_size", "device"}
OUTPUT = "comparisons.jsonl"


def run(config: PipelineConfig, out_dir: str | Path, policy_backend=None, feedback_backend=None) -> dict:
    cfg = config.label
    out_dir = Path(out_dir)
    stage_dir = out_dir / STAGE_DIR
    # Check every input before loading a model.
    constitution = load_constitution(config.constitution)
    pools = {kind: [p for p in constitution.feedback_principles if p.kind == kind] for kind in ("harmless", "helpful")}
    if not constitution.feedback_principles:
        raise CaiError(f"constitution {constitution.name!r}: the feedback principle list is empty")
    if not pools["harmless"]:
        raise CaiError(f"constitution {constitution.name!r}: no feedback principles of kind 'harmless'")
    if cfg.helpful_prompts and not pools["helpful"]:
        raise CaiError(f"label.helpful_prompts is set but constitution {constitution.name!r} has no "
                       f"feedback principles of kind 'helpful'")
    if cfg.method in ("contrast", "rlcd"):
        feedback.check_contrast_principles(constitution.feedback_principles)
    policy_spec = config.run_models(out_dir).label_policy
    check_model_spec(policy_spec, "label.policy")
    feedback_spec = config.run_models(out_dir).feedback
    check_model_spec(feedback_spec, "label.feedback_model")
    fewshot = feedback.load_label_fewshot(cfg.fewshot_file)[:cfg.fewshot] if cfg.method == "multiple_choice" else []
    tasks = [(p, "harmless") for p in load_prompts(cfg.prompts, cfg.split, cfg.limit)]
    if cfg.helpful_prompts:
        tasks += [(p, "helpful") for p in load_prompts(cfg.helpful_prompts, cfg.split, cfg.helpful_limit)]
    check_resume_settings(stage_dir, {**asdict(cfg), "policy": spec_name(policy_spec),
                                      "feedback_model": spec_name(feedback_spec),
                                      "seed": config.seed, "constitution": config.constitution},
                          free=FREE_SETTINGS)
    writer = JsonlAppender(stage_dir / OUTPUT)
    todo = [(p, kind) for p, kind in tasks if p.id not in writer.done_ids]
    log(f"label: {len(tasks)} prompts, {len(tasks) - len(todo)} already labelled, {len(todo)} to do; "
         f"method {cfg.method}, {cfg.ensemble} principle(s) a comparison")

    start = time.time()
    identical = 0
    filtered = 0
    written = 0
    temperature = cfg.contrast_temperature
    if todo:
        if policy_backend is None:
            policy_backend = load_backend(policy_spec, batch_size=cfg.batch_size, device=cfg.device)
        if feedback_backend is None:
            if same_model(feedback_spec, policy_spec):
                feedback_backend = policy_backend
            else:
                feedback_backend = load_backend(feedback_spec, batch_size=cfg.batch_size, device=cfg.device)
        if (cfg.method == "contrast" or (cfg.method == "rlcd" and cfg.rlcd_rescore)) and temperature is None:
            temperature = fit_contrast_temperature(feedback_backend, pools, config.seed, cfg)
            log(f"contrast temperature fitted on the dev half of the shipped eval pairs: {temperature:.4f}")

        bar = progress.bar(len(todo), "label", "cmp")
        with writer:
            for i in range(0, len(todo), cfg.batch_size):
                chunk = todo[i:i + cfg.batch_size]
                seed = zlib.crc32(f"{config.seed}:{chunk[0][0].id}".encode()) & 0x7FFFFFFF
                drawn = [sample_principles(pools[kind], cfg.ensemble, config.seed, p.id) for p, kind in chunk]
                starts = [""] * (2 * len(chunk))
                if cfg.method == "rlcd":
                    chats = rlcd_chats([p.prompt for p, _ in chunk], [ps[0] for ps in drawn])
                    if cfg.rlcd_openings:
                        starts = rlcd_openings(chunk, drawn, constitution.openings, chats,
                                               constitution.violates_openings)
                        starts = feedback.pick_reasons(feedback_backend, chats, starts, constitution.reasons)
                else:
                    chats = [[{"role": "user", "content": p.prompt}] for p, _ in chunk for _ in range(2)]
                responses = policy_backend.generate(chats, SamplingParams(
                    max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, seed=seed))
                pairs = []
                texts = [join_opening(start, r.text) if start else r.text for start, r in zip(starts, responses,
                                                                                              strict=True)]
                targets: list[dict | None] = [None] * len(chunk)
                if cfg.target_filter:
                    targets = _filter_chosen(chunk, cfg, texts, chats, starts, policy_backend, seed)
                for j, (p, kind) in enumerate(chunk):
                    a, b = texts[2 * j], texts[2 * j + 1]
                    if targets[j] is not None:
                        if targets[j]["kept"] is None:
                            filtered += 1
                            continue
                        a = targets[j]["text"]
                    if a.strip() == b.strip():
                        identical += 1
                        continue
                    pairs.append((p, kind, a, b, drawn[j]))
                if cfg.method == "rlcd":
                    opened = {p.id: (starts[2 * j], starts[2 * j + 1]) for j, (p, _) in enumerate(chunk)}
                    read = {p.id: targets[j] for j, (p, _) in enumerate(chunk)}
                    judged = _rlcd_rows(pairs, cfg, feedback_backend, temperature, policy_spec, feedback_spec,
                                        opened, read)
                else:
                    judged = _judge(pairs, cfg, feedback_backend, fewshot, temperature, policy_spec, feedback_spec)
                for row in judged:
                    writer.append(row)
                    written += 1
                bar.update(len(chunk))
                bar.set_postfix_str(f"{(i + len(chunk)) / max(time.time() - start, 1e-9):.2f} cmp/s", refresh=False)
        bar.close()
    seconds = time.time() - start
    rows = read_jsonl(stage_dir / OUTPUT) if (stage_dir / OUTPUT).exists() else []
    summary = {
        "output": str(stage_dir / OUTPUT),
        "rows": len(rows),
        "written_this_run": written,
        "identical_pairs_skipped": identical,
        "filtered_prompts_skipped": filtered,  # target filter: no follows answer a reader would accept
        "method": cfg.method,
        "contrast_temperature": temperature,
        "mean_p_chosen": round(sum(r["p_chosen"] for r in rows) / len(rows), 4) if rows else None,
        "share_a_chosen": round(sum(1 for r in rows if r["p_a"] >= 0.5) / len(rows), 4) if rows else None,
        "seconds_this_run": round(seconds, 2),
        "comparisons_per_second": round(len(todo) / seconds, 3) if todo and seconds > 0 else None,
        "policy": spec_name(policy_spec),
        "feedback_model": spec_name(feedback_spec),
    }
    write_json(stage_dir / "summary.json", summary)
    log(f"label: {summary['rows']} comparisons in {summary['output']}")
    return summary


def _judge(pairs, cfg, backend, fewshot, temperature, policy_spec, feedback_spec) -> list[dict]:
    """Label each (prompt, kind, response A, response B, principles) pair; one row each."""

    if not pairs:
        return []
    p_sum = [0.0] * len(pairs)
    scores: list[list[dict]] = [[] for _ in pairs]
    cots: list[list[str]] = [[] for _ in pairs]
    for k in range(cfg.ensemble):  # one batched pass per ensemble member
        items = [(p.prompt, ps[k], a, b) for p, _, a, b, ps in pairs]
        judged = feedback.judge(backend, cfg.method, items, **judge_settings(cfg, fewshot, temperature))
        for j, judgement in enumerate(judged):
            p_sum[j] += judgement.p_a
            scores[j].append(judgement.scores)
            if judgement.cot is not None:
                cots[j].append(judgement.cot)
    rows = []
    for j, (p, kind, a, b, ps) in enumerate(pairs):
        p_a = p_sum[j] / cfg.ensemble
        rows.append({
            **preference_fields(p, a, b, p_a),
            "scores": scores[j],
            "principle_ids": [x.id for x in ps],
            "method": cfg.method,
            "cot": "\n---\n".join(cots[j]) if cots[j] else None,
            "kind": kind,
            "category": p.category,
            "policy": spec_name(policy_spec),
            "feedback_model": spec_name(feedback_spec),
        })
    return rows


def rlcd_chats(prompts: list[str], principles: list) -> list[list[dict]]:
    """Two chats per prompt: under the principle's ``follows`` system prompt, then its ``violates`` one.

    >>> from constitutional.constitution import FeedbackPrinciple
    >>> p = FeedbackPrinciple("x", "q?", follows="Be safe.", violates="Be reckless.")
    >>> [c[0]["content"] for c in rlcd_chats(["Hi"], [p])]
    ['Be safe.', 'Be reckless.']
    """
    return [[{"role": "system", "content": system}, {"role": "user", "content": prompt}]
            for prompt, principle in zip(prompts, principles, strict=True)
            for system in (principle.follows, principle.violates)]


def rlcd_openings(chunk, drawn, openings: dict, chats: list[list[dict]], violates_openings: dict | None = None
                  ) -> list[str]:
    """Start each ``follows`` answer with one of the constitution's ``openings`` for its kind, and each
    ``violates`` answer with one of its ``violates_openings`` (chosen by prompt id), appended to the
    chat as an open assistant turn; a kind with none starts empty. Returns the opening of every chat
    (``""`` for none), in chat order (follows, violates, follows, ...)."""
    starts = []
    for j, (p, _) in enumerate(chunk):
        pick = zlib.crc32(p.id.encode())
        for side, table in ((0, openings), (1, violates_openings or {})):
            kind_openings = table.get(drawn[j][0].kind, ())
            start = kind_openings[pick % len(kind_openings)] if kind_openings else ""
            if start:
                chats[2 * j + side].append({"role": "assistant", "content": start})
            starts.append(start)
    return starts


def preference_fields(p, a: str, b: str, p_a: float) -> dict:
    """The TRL preference fields of a comparison of answers ``a`` and ``b`` to prompt row ``p``, with P(A) = ``p_a``:
    the likelier answer is ``chosen``, ``p_chosen`` is its probability."""
    a_wins = p_a >= 0.5
    return {
        "id": p.id,
        "prompt": [{"role": "user", "content": p.prompt}],
        "chosen": [{"role": "assistant", "content": a if a_wins else b}],
        "rejected": [{"role": "assistant", "content": b if a_wins else a}],
        "p_chosen": round(max(p_a, 1 - p_a), 6),
        "response_a": a,
        "response_b": b,
        "p_a": round(p_a, 6),
    }


def _rlcd_rows(pairs, cfg, backend, temperature, policy_spec: str, feedback_spec: str,
               opened: dict | None = None, targets: dict | None = None) -> list[dict]:
    """RLCD comparisons: response A was sampled under ``follows``, B under ``violates``; A is
    preferred with ``rlcd_p_chosen``, or the contrast method judges the pair (``rlcd_rescore``)."""

    if not pairs:
        return []
    if cfg.rlcd_rescore:
        items = [(p.prompt, ps[0], a, b) for p, _, a, b, ps in pairs]
        judged = feedback.judge(backend, "contrast", items, **judge_settings(cfg, [], temperature))
        p_as = [j.p_a for j in judged]
        scores = [[j.scores] for j in judged]
    else:
        p_as = [cfg.rlcd_p_chosen] * len(pairs)
        scores = [[{"p_a_fixed": cfg.rlcd_p_chosen}] for _ in pairs]
    rows = []
    for (p, kind, a, b, ps), p_a, score in zip(pairs, p_as, scores, strict=True):
        rows.append({
            **preference_fields(p, a, b, p_a),
            "scores": score,
            "principle_ids": [ps[0].id],
            "method": "rlcd",
            "system_prompts": {"response_a": ps[0].follows, "response_b": ps[0].violates},
            # how the follows / violates answers were made to begin (None: as the model began them)
            "opening": ((opened or {}).get(p.id) or ("", ""))[0] or None,
            "violates_opening": ((opened or {}).get(p.id) or ("", ""))[1] or None,
            "rescored": cfg.rlcd_rescore,
            # with the target filter: how the follows answer was read (evaluation/targets.py)
            "target": (targets or {}).get(p.id),
            "cot": None,
            "kind": kind,
            "category": p.category,
            "policy": policy_spec,
            "feedback_model": feedback_spec if cfg.rlcd_rescore else None,
        })
    return rows


def _filter_chosen(chunk, cfg, texts: list[str], chats: list, starts: list[str], backend, seed: int) -> list[dict]:
    """The target filter on RLCD's follows answers (``texts[2 j]``): each read by the rules judge; a prompt
    whose answer fails gets ``filter_candidates`` more under the same follows prompt and opening. One
    record per prompt (``kept`` None: no pair)."""

    def choose(j: int, candidates: list[str]):
        p, kind = chunk[j]  # the principles' kind: harmless ones judge red-team prompts
        prompt_kind = "helpful" if kind == "helpful" else "red-team"
        return choose_target(p.prompt, [{"text": t} for t in candidates], prompt_kind, cfg.target_sentences)

    pools = [[texts[2 * j]] for j in range(len(chunk))]
    choices = [choose(j, pools[j]) for j in range(len(chunk))]
    failed = [j for j, c in enumerate(choices) if c.index is None]
    if failed and cfg.filter_candidates:
        k = cfg.filter_candidates
        again = backend.generate([chats[2 * j] for j in failed for _ in range(k)], SamplingParams(
            max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, seed=seed + 1))
        for n, j in enumerate(failed):
            start = starts[2 * j]
            pools[j] += [join_opening(start, r.text) if start else r.text for r in again[n * k:(n + 1) * k]]
            choices[j] = choose(j, pools[j])
    records = []
    for j, choice in enumerate(choices):
        record = choice.record(["follows"] + ["filter-follows"] * (len(pools[j]) - 1))
        record["text"] = choice.text
        records.append(record)
    return records
