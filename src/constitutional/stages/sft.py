"""Stage 2: supervised fine-tuning on the revisions (the SL-CAI model).

Paper: Bai et al. 2022, section 3.1. The *helpful* model is fine-tuned on (red-team prompt ->
final revision) pairs from stage 1, mixed with the helpful model's own answers to ordinary
requests so that it keeps its helpfulness. Rows that stage 1 flagged ``degenerate`` are left
out.

How: TRL's ``SFTTrainer`` on conversational prompt-completion rows, so the loss falls on the
assistant's tokens only. Full fine-tuning, or LoRA (PEFT) merged into the weights before
saving, so ``sft/model/`` is always a plain transformers directory (safetensors). Float32,
CPU-friendly settings; checkpoints every ``save_steps`` in ``sft/checkpoints/`` and a rerun
resumes from the last one. Before and after training, the mean negative log-likelihood per
token of held-out revisions and held-out helpfulness answers is measured, so a user sees
what SFT changed.

Run:
    cai sft --config configs/smollm2-cpu.yaml --out runs/demo
    cai sft --out runs/lora --set sft.revisions=runs/demo/critique_revise/revisions.jsonl --set sft.lora=true

Reads ``critique_revise/revisions.jsonl``; writes ``sft/helpful_samples.jsonl`` (appended as
it is generated, resumable), ``sft/checkpoints/``, ``sft/model/``, ``sft/metrics.json`` and,
with LoRA, the unmerged ``sft/adapter/``. A rerun resumes from the last checkpoint; raising
``epochs`` or ``max_steps`` continues training, other setting changes are refused (see
``records.check_resume_settings``): use a new ``--out``.
"""

from __future__ import annotations

import math
import time
import zlib
from dataclasses import asdict
from pathlib import Path

from constitutional import feedback, progress
from constitutional.backends import load_backend, same_model
from constitutional.backends.base import SamplingParams
from constitutional.config import PipelineConfig
from constitutional.constitution import load_constitution, sample_principles
from constitutional.distributed import is_main, main_first
from constitutional.errors import CaiError
from constitutional.feedback import ContrastSettings
from constitutional.models import resolve_model, save_model_dir
from constitutional.progress import log
from constitutional.prompt_sources import load_prompts
from constitutional.records import JsonlAppender, check_resume_settings, iter_jsonl, write_json
from constitutional.training import drop_checkpoints, last_trainer_checkpoint, lora_config, trainer_defaults

STAGE_DIR = "sft"
# settings that may change between runs into the same directory: the stage takes up where it stopped
FREE_SETTINGS = {"epochs", "max_steps", "save_steps", "tensorboard", "generate_batch_size", "device"}


# ----------------------------------------------------------------- data (pure)


def load_revision_chats(path: Path) -> tuple[list[dict], int]:
    """Usable (id, messages) rows of a revisions file, and how many were degenerate.

    Every row needs ``messages``: a list of role/content messages ending with the assistant's
    revision. Errors name the file and line number.
    """
    if not path.is_file():
        raise CaiError(f"revisions file {path}: no such file (run `cai critique-revise` first)")
    rows, degenerate = [], 0
    for lineno, row in enumerate(iter_jsonl(path), 1):
        messages = row.get("messages")
        check_messages(messages, path, lineno)
        if row.get("degenerate"):
            degenerate += 1
            continue
        rows.append({"id": str(row.get("id", f"row-{lineno}")), "messages": messages})
    if not rows and not degenerate:
        raise CaiError(f"revisions file {path}: empty")
    if not rows:
        raise CaiError(f"revisions file {path}: all {degenerate} rows are flagged degenerate; nothing to train on")
    return rows, degenerate


def load_chat_file(path: Path) -> list[dict]:
    """A user-supplied JSONL of chats in TRL's conversational format (``messages``)."""
    if not path.is_file():
        raise CaiError(f"helpful data {path}: no such file")
    rows = []
    for lineno, row in enumerate(iter_jsonl(path), 1):
        check_messages(row.get("messages"), path, lineno)
        rows.append({"id": str(row.get("id", f"{path.stem}-{lineno}")), "messages": row["messages"]})
    if not rows:
        raise CaiError(f"helpful data {path}: empty")
    return rows


def check_messages(messages, path: Path, lineno: int) -> None:
    if not isinstance(messages, list) or len(messages) < 2:
        raise CaiError(f"{path}: line {lineno}: needs 'messages', a list of at least a user and an assistant turn")
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                or not isinstance(m.get("content"), str):
            raise CaiError(f"{path}: line {lineno}: each message needs a role (system/user/assistant) and content")
    if messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
        raise CaiError(f"{path}: line {lineno}: the last message must be a non-empty assistant turn")


def is_heldout(row_id: str, fraction: float, seed: int) -> bool:
    """A fixed, seed-dependent choice of held-out rows (about ``fraction`` of them).

    >>> is_heldout("rt-0001", 0.0, 0)
    False
    >>> sum(is_heldout(f"id-{i}", 0.2, 0) for i in range(1000)) in range(150, 250)
    True
    """
    return (zlib.crc32(f"{seed}:{row_id}".encode()) % 10_000) < fraction * 10_000


def split_rows(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, heldout); with a positive fraction and two or more rows, at least one is held out."""
    held = [r for r in rows if is_heldout(r["id"], fraction, seed)]
    if fraction > 0 and not held and len(rows) >= 2:
        held = [rows[-1]]
    held_ids = {r["id"] for r in held}
    return [r for r in rows if r["id"] not in held_ids], held


def helpful_count(n_revisions: int, fraction: float) -> int:
    """Helpfulness examples needed so that they are ``fraction`` of the mix.

    >>> helpful_count(30, 0.5)
    30
    >>> helpful_count(30, 0.25)
    10
    >>> helpful_count(30, 0.0)
    0
    """
    return math.ceil(n_revisions * fraction / (1 - fraction) - 1e-9)


def to_prompt_completion(messages: list[dict]) -> dict:
    """TRL's conversational prompt-completion row: the loss falls on the completion only."""
    return {"prompt": messages[:-1], "completion": messages[-1:]}


def mean_nll(backend, rows: list[dict]) -> float | None:
    """Mean negative log-likelihood per token of each row's final assistant turn.

    The assistant turn is scored as the chat template renders it after the prompt (its
    end-of-turn token included), the same tokens SFT trains on.
    """
    if not rows:
        return None
    pairs = []
    for row in rows:
        prompt = backend.render(row["messages"][:-1], add_generation_prompt=True)
        full = backend.render(row["messages"], add_generation_prompt=False)
        if not full.startswith(prompt):
            raise CaiError("the chat template does not render the prompt as a prefix of the chat")
        pairs.append((prompt, full[len(prompt):]))
    scored = backend.logprobs(pairs)
    total = sum(s.total for s in scored)
    count = sum(len(s.logprobs) for s in scored)
    return -total / count


# ----------------------------------------------------------------- the stage


def run(config: PipelineConfig, out_dir: str | Path, callbacks: list | None = None) -> dict:
    """Run stage 2 into ``out_dir/sft``; return the metrics (also saved as ``metrics.json``).

    ``callbacks`` are extra ``transformers.TrainerCallback`` objects (tests use one to
    simulate a crash after a checkpoint).
    """
    cfg = config.sft
    out_dir = Path(out_dir)
    stage_dir = out_dir / STAGE_DIR
    revisions_path = Path(cfg.revisions) if cfg.revisions else out_dir / "critique_revise" / "revisions.jsonl"
    # Check every input before loading a model.
    revisions, degenerate = load_revision_chats(revisions_path)
    rev_train, rev_held = split_rows(revisions, cfg.heldout_fraction, config.seed)
    user_helpful = load_chat_file(Path(cfg.helpful_data)) if cfg.helpful_data else None
    if cfg.tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise CaiError("sft.tensorboard: install the tensorboard package "
                           "(pip install 'constitutional[tensorboard]')") from None
    model_spec = config.run_models(out_dir).sft_base
    if not isinstance(model_spec, str):
        raise CaiError("sft.model: critique_revise.model is a model server, and SFT trains local weights; "
                       "set sft.model to the helpful model's directory or name")
    helpful_principles = None
    if cfg.helpful_candidates > 1 and user_helpful is None:
        constitution = load_constitution(config.constitution)
        helpful_principles = [p for p in constitution.feedback_principles if p.kind == "helpful"]
        if not helpful_principles:
            raise CaiError(f"sft.helpful_candidates: constitution {constitution.name!r} has no feedback principles "
                           f"of kind 'helpful' to choose helpfulness samples with")
        feedback.check_contrast_principles(helpful_principles)
    check_resume_settings(stage_dir, {**asdict(cfg), "model": model_spec, "seed": config.seed},
                          free=FREE_SETTINGS)
    n_helpful = helpful_count(len(rev_train), cfg.helpful_fraction)
    log(f"sft: {len(rev_train)} revisions to train on, {len(rev_held)} held out, "
         f"{degenerate} degenerate left out; {n_helpful} helpfulness examples to mix in")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from constitutional.backends.hf import HFBackend, pick_device

    start = time.time()
    model_path = resolve_model(model_spec)
    device = pick_device(cfg.device)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    # The backend gets its own tokenizer: it switches it to left padding, which training must not see.
    backend = HFBackend(model_path, model_obj=model, tokenizer=AutoTokenizer.from_pretrained(model_path),
                        batch_size=cfg.generate_batch_size, device=device, name=model_spec)

    if user_helpful is not None:
        helpful = user_helpful
        helpful_source = str(cfg.helpful_data)
    else:
        scorer, principles = None, None
        if cfg.helpful_candidates > 1:
            feedback_spec = config.run_models(out_dir).sft_scorer
            scorer = backend if same_model(feedback_spec, model_spec) else load_backend(
                feedback_spec, batch_size=cfg.generate_batch_size, device=device)
            principles = helpful_principles
        with main_first(cpu=device == "cpu"):  # several processes: the main one generates and writes
            helpful = _helpful_samples(cfg, config.seed, backend, stage_dir, n_helpful, scorer, principles,
                                       ContrastSettings.of(config.label))
        helpful_source = str(stage_dir / "helpful_samples.jsonl")
    help_train, help_held = split_rows(helpful, cfg.heldout_fraction, config.seed)
    help_train = help_train[:n_helpful]

    nll_before = {"revisions": mean_nll(backend, rev_held), "helpful": mean_nll(backend, help_held)}
    log(f"held-out NLL before: revisions {_fmt(nll_before['revisions'])}, "
         f"helpful {_fmt(nll_before['helpful'])}")

    trainer = _trainer(cfg, config.seed, model, tokenizer, rev_train + help_train, stage_dir, device,
                       callbacks or [])
    checkpoint_dir = stage_dir / "checkpoints"
    last, step = last_trainer_checkpoint(checkpoint_dir)
    resumed_from = step if last else None
    train_start = time.time()
    result = trainer.train(resume_from_checkpoint=last)
    train_seconds = time.time() - train_start

    trained = trainer.model
    if cfg.lora:
        if is_main():
            trained.save_pretrained(stage_dir / "adapter", safe_serialization=True)  # small; for reuse
        trained = trained.merge_and_unload()
    trained.eval()
    final_dir = save_model_dir(trained, tokenizer, stage_dir / "model")
    if not config.keep_optimizer_state and is_main():
        drop_checkpoints(checkpoint_dir)

    after_backend = HFBackend(str(final_dir), model_obj=trained, tokenizer=backend.tokenizer,
                              batch_size=cfg.generate_batch_size, device=device, name=str(final_dir))
    nll_after = {"revisions": mean_nll(after_backend, rev_held), "helpful": mean_nll(after_backend, help_held)}
    log(f"held-out NLL after: revisions {_fmt(nll_after['revisions'])}, helpful {_fmt(nll_after['helpful'])}")

    history = trainer.state.log_history
    metrics = {
        "output": str(final_dir),
        "base_model": model_spec,
        "revisions": str(revisions_path),
        "helpful_source": helpful_source,
        "train_examples": {"revisions": len(rev_train), "helpful": len(help_train)},
        "heldout_examples": {"revisions": len(rev_held), "helpful": len(help_held)},
        "degenerate_left_out": degenerate,
        "nll_before": nll_before,
        "nll_after": nll_after,
        "loss_curve": [{"step": h["step"], "loss": h["loss"]} for h in history if "loss" in h],
        "steps": trainer.state.global_step,
        "resumed_from_step": resumed_from,
        "train_loss": result.training_loss,
        "train_seconds": round(train_seconds, 2),
        "seconds": round(time.time() - start, 2),
        "lora": cfg.lora,
    }
    write_json(stage_dir / "metrics.json", metrics)
    log(f"sft: model saved to {final_dir} after {metrics['steps']} steps in {train_seconds:.0f} s")
    return metrics


def _helpful_samples(cfg, seed: int, backend, stage_dir: Path, needed: int, scorer=None,
                     principles: list | None = None, contrast: ContrastSettings | None = None) -> list[dict]:
    """The helpful model's own answers to ``needed`` (+ held-out share) helpful train prompts.

    With ``helpful_candidates: k > 1``, k answers are sampled per prompt and ``scorer`` (the
    feedback model) keeps the one that best follows a helpful principle drawn for the prompt.
    """

    prompts = load_prompts(cfg.helpful_prompts, "train")
    # enough prompts that after holding some out, `needed` remain for training
    want = min(len(prompts), math.ceil(needed / (1 - cfg.heldout_fraction)) + 1) if needed else 0
    if needed and want < needed:
        log(f"only {len(prompts)} helpful prompts; mixing in fewer than {needed}")
    prompts = prompts[:want]
    path = stage_dir / "helpful_samples.jsonl"
    writer = JsonlAppender(path)
    todo = [p for p in prompts if p.id not in writer.done_ids]
    k = cfg.helpful_candidates
    if todo:
        bar = progress.bar(len(todo) * k, "sft: helpful samples", "chat")
        with writer:
            for i in range(0, len(todo), cfg.generate_batch_size):
                chunk = todo[i:i + cfg.generate_batch_size]
                params = SamplingParams(max_new_tokens=cfg.helpful_max_new_tokens,
                                        temperature=cfg.helpful_temperature, top_p=0.95,
                                        seed=zlib.crc32(f"{seed}:{chunk[0].id}".encode()) & 0x7FFFFFFF)
                out = backend.generate([[{"role": "user", "content": p.prompt}] for p in chunk for _ in range(k)],
                                       params, lambda n, _t: bar.update(n))
                texts = [c.text for c in out]
                chosen, candidates = texts[::k], [None] * len(chunk)
                if k > 1:
                    drawn = [sample_principles(principles, 1, seed, f"helpful-select:{p.id}")[0] for p in chunk]
                    items = [(p.prompt, drawn[j], t) for j, p in enumerate(chunk)
                             for t in texts[j * k:(j + 1) * k] if t.strip()]
                    scores = iter((contrast or ContrastSettings()).scores(scorer, items))
                    for j in range(len(chunk)):
                        cands = [{"text": t, "score": round(next(scores), 6) if t.strip() else None}
                                 for t in texts[j * k:(j + 1) * k]]
                        scored = [c for c in cands if c["score"] is not None]
                        chosen[j] = max(scored, key=lambda c: c["score"])["text"] if scored else ""
                        candidates[j] = {"principle_id": drawn[j].id, "candidates": cands}
                for p, text, cands in zip(chunk, chosen, candidates, strict=True):
                    if not text.strip():
                        continue  # an empty answer teaches nothing; it is simply not written
                    row = {"id": p.id, "messages": [{"role": "user", "content": p.prompt},
                                                    {"role": "assistant", "content": text}],
                           "model": backend.name}
                    if cands:
                        row["selection"] = cands
                    writer.append(row)
        bar.close()
    wanted = {p.id for p in prompts}
    return [{"id": r["id"], "messages": r["messages"]} for r in iter_jsonl(path) if r["id"] in wanted]


def _trainer(cfg, seed: int, model, tokenizer, rows: list[dict], stage_dir: Path, device: str, callbacks):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    dataset = Dataset.from_list([to_prompt_completion(r["messages"]) for r in rows])
    args = SFTConfig(
        output_dir=str(stage_dir / "checkpoints"),
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps if cfg.max_steps is not None else -1,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=0.1,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        max_length=cfg.max_length,
        completion_only_loss=True,
        save_steps=cfg.save_steps,
        save_total_limit=cfg.keep_checkpoints,
        **trainer_defaults(device, seed),  # TensorBoard, when asked for, is added below with our own log dir
    )
    callbacks = [progress.trainer_bar("sft: training"), *callbacks]
    if cfg.tensorboard:
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback

        callbacks.append(TensorBoardCallback(SummaryWriter(log_dir=str(stage_dir / "tensorboard"))))
    peft_config = None
    if cfg.lora:
        peft_config = lora_config(cfg)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=callbacks)
    return progress.quiet_trainer(trainer)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
