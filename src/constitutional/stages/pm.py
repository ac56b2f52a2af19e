"""Stage 4: a preference model (PM) trained on the feedback model's soft labels.

Paper: Bai et al. 2022, section 4.1: the PM is trained on AI-labelled harmlessness comparisons
(mixed with helpfulness comparisons), with the feedback model's probabilities as soft targets.
A sequence-classification head with one output on the base model gives each (prompt, response)
a reward r; for a pair labelled P(chosen) = p the loss is the cross-entropy against p:

    L = -[ p log sigmoid(r_c - r_r) + (1 - p) log sigmoid(r_r - r_c) ]

which is the usual -log sigmoid(r_c - r_r) where p = 1 (rows without ``p_chosen``), and whose
minimum over r_c - r_r is at logit(p): a label of 0.5 pulls the two rewards together.

How: TRL's ``RewardTrainer`` with its loss replaced (TRL's collator forwards a float column
named ``margin`` with each pair; this stage puts ``p_chosen`` in it). Train/held-out split by
prompt, so no prompt is on both sides. Checkpoints and resume as in stage 2.

Run:
    cai train-pm --config configs/smollm2-cpu.yaml --out runs/demo
    cai score --pm runs/demo/pm/model --in rows.jsonl --out scored.jsonl

Writes ``pm/model/`` (safetensors), ``pm/metrics.json`` (held-out accuracy, calibration error,
reward mean/std for RL's normalisation, accuracy on the shipped eval pairs) and
``pm/calibration.png``.
"""

from __future__ import annotations

import math
import time
import zlib
from dataclasses import asdict
from pathlib import Path

from constitutional import progress
from constitutional.config import PipelineConfig
from constitutional.distributed import is_main
from constitutional.errors import CaiError
from constitutional.judge_pairs import EVAL_SETS, load_eval_pairs
from constitutional.models import check_model_spec, resolve_model, save_model_dir
from constitutional.progress import log
from constitutional.records import check_resume_settings, load_comparisons, write_json
from constitutional.rewards import PreferenceModel
from constitutional.training import drop_checkpoints, last_trainer_checkpoint, lora_config, trainer_defaults

STAGE_DIR = "pm"
# settings that may change between runs into the same directory: the stage takes up where it stopped
FREE_SETTINGS = {"epochs", "max_steps", "save_steps", "device"}


# ------------------------------------------------------------------ the loss


def soft_preference_loss(r_chosen, r_rejected, p_chosen):
    """Mean cross-entropy of sigmoid(r_c - r_r) against soft targets p (tensors of shape (batch,)).

    >>> import torch
    >>> round(soft_preference_loss(torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0.9])).item(), 4)
    0.6931
    """
    import torch.nn.functional as F

    diff = r_chosen - r_rejected
    return -(p_chosen * F.logsigmoid(diff) + (1 - p_chosen) * F.logsigmoid(-diff)).mean()


def _trainer_class():
    import torch
    from trl import RewardTrainer

    class SoftLabelRewardTrainer(RewardTrainer):
        """RewardTrainer whose loss is the soft cross-entropy; ``margin`` carries p_chosen."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            p = inputs.pop("margin", None)
            inputs["use_cache"] = False
            outputs = model(**inputs)
            r_chosen, r_rejected = torch.chunk(outputs.logits.squeeze(-1), chunks=2)
            if p is None:
                p = torch.ones_like(r_chosen)
            loss = soft_preference_loss(r_chosen, r_rejected, p.to(r_chosen.dtype))
            mode = "train" if model.training else "eval"
            with torch.no_grad():
                self._metrics[mode]["accuracy"].append((r_chosen > r_rejected).float().mean().item())
                self._metrics[mode]["margin"].append((r_chosen - r_rejected).mean().item())
            return (loss, outputs) if return_outputs else loss

    return SoftLabelRewardTrainer


# ------------------------------------------------------------------ data


def split_by_prompt(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, heldout): every pair of a prompt lands on the same side."""
    def held(key: str) -> bool:
        return (zlib.crc32(f"{seed}:{key}".encode()) % 10_000) < fraction * 10_000

    heldout = [r for r in rows if held(r["key"])]
    if fraction > 0 and not heldout and len({r["key"] for r in rows}) >= 2:
        last = rows[-1]["key"]
        heldout = [r for r in rows if r["key"] == last]
    held_keys = {r["key"] for r in heldout}
    return [r for r in rows if r["key"] not in held_keys], heldout


def calibration_bins(p_pred: list[float], p_label: list[float], bins: int = 10) -> list[dict]:
    """Bins of predicted P(chosen); each with the mean prediction and the mean label ("observed")."""
    out = []
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        idx = [i for i, p in enumerate(p_pred) if lo <= p < hi or (b == bins - 1 and p == 1.0)]
        if idx:
            out.append({"low": lo, "high": hi, "n": len(idx),
                        "predicted": sum(p_pred[i] for i in idx) / len(idx),
                        "observed": sum(p_label[i] for i in idx) / len(idx)})
    return out


def calibration_error(bins: list[dict]) -> float:
    """Mean |predicted - observed| over bins, weighted by each bin's share of pairs.

    >>> calibration_error([{"n": 1, "predicted": 0.7, "observed": 0.6}])
    0.1
    """
    total = sum(b["n"] for b in bins)
    return round(sum(b["n"] / total * abs(b["predicted"] - b["observed"]) for b in bins), 10) if total else float("nan")


# ------------------------------------------------------------------ the stage


def run(config: PipelineConfig, out_dir: str | Path, callbacks: list | None = None) -> dict:
    cfg = config.pm
    out_dir = Path(out_dir)
    stage_dir = out_dir / STAGE_DIR
    comparisons_path = Path(cfg.comparisons) if cfg.comparisons else out_dir / "label" / "comparisons.jsonl"
    # Check every input before loading a model.
    rows = load_comparisons(comparisons_path)
    extra = load_comparisons(Path(cfg.helpful_data)) if cfg.helpful_data else []
    base = config.run_models(out_dir).pm_base
    check_model_spec(base, "pm.base")
    check_resume_settings(stage_dir, {**asdict(cfg), "base": base, "seed": config.seed},
                          free=FREE_SETTINGS)
    train, heldout = split_by_prompt(rows, cfg.heldout_fraction, config.seed)
    if extra:
        extra_train, extra_held = split_by_prompt(extra, cfg.heldout_fraction, config.seed)
        cap = math.floor(len(train) * cfg.helpful_fraction / (1 - cfg.helpful_fraction))
        train, heldout = train + extra_train[:cap], heldout + extra_held
    if not train:
        raise CaiError(f"{comparisons_path}: no comparisons left to train on after holding out prompts")
    log(f"train-pm: {len(train)} training pairs, {len(heldout)} held out (split by prompt)")

    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, set_seed
    from trl import RewardConfig

    from constitutional.backends.hf import pick_device

    start = time.time()
    path = resolve_model(base)
    device = pick_device(cfg.device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    set_seed(config.seed)  # the new reward head is initialised here, before the Trainer seeds anything
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    dataset = Dataset.from_list([{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"],
                                  "margin": r["p_chosen"]} for r in train])
    args = RewardConfig(
        output_dir=str(stage_dir / "checkpoints"), num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps if cfg.max_steps is not None else -1, learning_rate=cfg.learning_rate,
        lr_scheduler_type="cosine", warmup_steps=0.1, per_device_train_batch_size=cfg.batch_size,
        max_length=cfg.max_length, save_steps=cfg.save_steps, save_total_limit=cfg.keep_checkpoints,
        center_rewards_coefficient=None, **trainer_defaults(device, config.seed),
    )
    peft_config = None
    if cfg.lora:
        # the new reward head trains in full (modules_to_save), the body through the adapter
        peft_config = lora_config(cfg, task_type="SEQ_CLS")
    trainer = _trainer_class()(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                               callbacks=[progress.trainer_bar("train-pm"), *(callbacks or [])],
                               peft_config=peft_config)
    progress.quiet_trainer(trainer)
    checkpoints = stage_dir / "checkpoints"
    last, _ = last_trainer_checkpoint(checkpoints)
    result = trainer.train(resume_from_checkpoint=last)

    trained = trainer.model
    if cfg.lora:
        trained = trained.merge_and_unload()
    final_dir = save_model_dir(trained, tokenizer, stage_dir / "model")
    if not config.keep_optimizer_state and is_main():
        drop_checkpoints(checkpoints)

    pm = PreferenceModel(final_dir, device=device)
    metrics = _evaluate(pm, train, heldout)
    metrics.update({
        "output": str(final_dir),
        "base": base,
        "comparisons": str(comparisons_path),
        "train_pairs": len(train),
        "heldout_pairs": len(heldout),
        "steps": trainer.state.global_step,
        "resumed_from_step": int(last.rsplit("-", 1)[1]) if last else None,
        "train_loss": result.training_loss,
        "loss_curve": [{"step": h["step"], "loss": h["loss"]} for h in trainer.state.log_history if "loss" in h],
        "seconds": round(time.time() - start, 2),
    })
    write_json(stage_dir / "metrics.json", metrics)
    if is_main():
        _plot_calibration(metrics["calibration_bins"], stage_dir / "calibration.png")
    log(f"train-pm: held-out accuracy {metrics['heldout_accuracy']}, calibration error "
         f"{metrics['heldout_calibration_error']}, eval pairs {metrics['eval_pairs_accuracy']}")
    return metrics


def _evaluate(pm: PreferenceModel, train: list[dict], heldout: list[dict]) -> dict:
    def pair_scores(rows):
        chats = [r["prompt"] + r["chosen"] for r in rows] + [r["prompt"] + r["rejected"] for r in rows]
        s = pm.score_messages(chats) if chats else []
        return s[:len(rows)], s[len(rows):]

    hc, hr = pair_scores(heldout)
    tc, tr = pair_scores(train)
    p_pred = [1 / (1 + math.exp(-(c - r))) for c, r in zip(hc, hr, strict=True)]
    bins = calibration_bins(p_pred, [r["p_chosen"] for r in heldout])
    everything = hc + hr + tc + tr
    mean = sum(everything) / len(everything)
    std = math.sqrt(sum((x - mean) ** 2 for x in everything) / max(1, len(everything) - 1))
    eval_acc = {}
    for name in EVAL_SETS:
        pairs = load_eval_pairs(name)
        c = pm.score([r["prompt"] for r in pairs], [r["chosen"] for r in pairs])
        r = pm.score([r["prompt"] for r in pairs], [r["rejected"] for r in pairs])
        eval_acc[name] = round(sum(x > y for x, y in zip(c, r, strict=True)) / len(pairs), 4)
    return {
        "heldout_accuracy": round(sum(c > r for c, r in zip(hc, hr, strict=True)) / len(hc), 4) if hc else None,
        "train_accuracy": round(sum(c > r for c, r in zip(tc, tr, strict=True)) / len(tc), 4) if tc else None,
        "heldout_calibration_error": calibration_error(bins) if bins else None,
        "calibration_bins": bins,
        "reward_mean": mean,
        "reward_std": std,
        "eval_pairs_accuracy": eval_acc,
    }


def _plot_calibration(bins: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
    if bins:
        ax.plot([b["predicted"] for b in bins], [b["observed"] for b in bins], marker="o", label="preference model")
        for b in bins:
            ax.annotate(str(b["n"]), (b["predicted"], b["observed"]), textcoords="offset points", xytext=(4, -10),
                        fontsize=7)
    ax.set_xlabel("predicted P(chosen)")
    ax.set_ylabel("label P(chosen) (mean in bin)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title("PM calibration on held-out comparisons")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
