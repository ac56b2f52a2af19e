"""What the RL algorithms of stage 5 share: the prompt schedule, prompt encoding, the metrics log and the
TRL callback that writes it, step checkpoints and their tidying, the reward plot. (What sft and pm share
with them, LoRA, trainer defaults and resume, is in ``constitutional/training.py``.)"""

from __future__ import annotations

import copy
import json
import math
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from constitutional import progress
from constitutional.distributed import is_main
from constitutional.errors import CaiError
from constitutional.models import save_model_dir
from constitutional.prompt_sources import PromptRow
from constitutional.training import last_trainer_checkpoint

# reward_fn(prompts as chats, responses as text) -> one reward per response
RewardFn = Callable[[list[list[dict]], list[str]], list[float]]


def step_prompts(red_team: list[PromptRow], helpful: list[PromptRow], step: int, per_step: int,
                 helpful_share: float, seed: int) -> list[PromptRow]:
    """The prompts of RL step ``step`` (1-based): ``round(per_step * helpful_share)`` helpful ones,
    the rest red-team. Each pool is walked in a seeded order, reshuffled on every pass, so the
    schedule is a pure function of the step and a resumed run sees the same prompts.

    >>> red = [PromptRow(f"r{i}", "x") for i in range(3)]
    >>> help = [PromptRow(f"h{i}", "y") for i in range(2)]
    >>> [p.id[0] for p in step_prompts(red, help, 1, 4, 0.25, 0)]
    ['r', 'r', 'r', 'h']
    >>> len({p.id for p in step_prompts(red, help, 1, 3, 0.0, 0)})  # one pass covers the pool
    3
    """
    n_helpful = round(per_step * helpful_share) if helpful else 0

    def take(pool: list[PromptRow], count: int, salt: str) -> list[PromptRow]:
        out = []
        for k in range((step - 1) * count, step * count):
            epoch, i = divmod(k, len(pool))
            order = list(range(len(pool)))
            random.Random(f"{seed}:{salt}:{epoch}").shuffle(order)
            out.append(pool[order[i]])
        return out

    return take(red_team, per_step - n_helpful, "red") + (take(helpful, n_helpful, "helpful") if n_helpful else [])


def as_chat(prompt: PromptRow) -> list[dict]:
    return [{"role": "user", "content": prompt.prompt}]


def encode_prompt(tokenizer, prompt: PromptRow) -> list[int]:
    text = tokenizer.apply_chat_template(as_chat(prompt), tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class MetricsLog:
    """``rl/metrics.jsonl``, a row a step, plus the same scalars in TensorBoard if asked for."""

    def __init__(self, stage_dir: Path, tensorboard: bool):
        stage_dir.mkdir(parents=True, exist_ok=True)
        self.path = stage_dir / "metrics.jsonl"
        self.writer = None
        if tensorboard and is_main():
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise CaiError("rl.tensorboard needs the tensorboard package: "
                               "pip install 'constitutional[tensorboard]'") from None
            self.writer = SummaryWriter(log_dir=str(stage_dir / "tensorboard"))

    def keep_steps_up_to(self, step: int) -> None:
        """Drop rows after ``step`` (written after the checkpoint a resumed run starts from)."""
        if not self.path.exists() or not is_main():
            return
        rows = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line torn by the kill
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
                rows.append(row)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        tmp.replace(self.path)

    def write(self, row: dict) -> None:
        if not is_main():  # several processes: the main one writes the metrics
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, int | float):
                    self.writer.add_scalar(f"rl/{key}", value, row["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def save_snapshot(model, tokenizer, dest: Path) -> Path:
    """A plain transformers directory of the policy (a LoRA policy is saved merged, from a copy)."""

    if hasattr(model, "merge_and_unload"):
        model = copy.deepcopy(model).merge_and_unload()
    return save_model_dir(model, tokenizer, dest)


def save_checkpoint(model, tokenizer, checkpoints: Path, step: int, extra=None) -> Path:
    """``checkpoints/step-N/``: the policy as a plain model directory, plus ``extra(tmp_dir)`` files.

    Written beside its final name and moved into place. Only the newest checkpoint keeps
    ``optimizer.safetensors`` (the older ones stay as snapshots for plots and evaluation).
    """
    dest = checkpoints / f"step-{step}"
    tmp = save_snapshot(model, tokenizer, checkpoints / f"step-{step}.partial")
    if not is_main():  # several processes: the main one saved the snapshot and finishes the checkpoint
        return dest
    if extra:
        extra(tmp)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.replace(dest)
    for older in checkpoints.glob("step-*"):
        if older != dest and (older / "optimizer.safetensors").exists():
            (older / "optimizer.safetensors").unlink()
    return dest


def tidy_checkpoints(stage_dir: Path, final_step: int | None) -> None:
    """When the stage is done: drop the optimizer state (``optimizer.safetensors``, the value head,
    TRL's ``trainer/`` checkpoints) and the step snapshot that holds the same weights as ``rl/model``.
    The other ``checkpoints/step-N`` stay, as plain models for the evaluation against RL step."""
    shutil.rmtree(stage_dir / "trainer", ignore_errors=True)
    for d in (stage_dir / "checkpoints").glob("step-*"):
        if final_step is not None and d.name == f"step-{final_step}":
            shutil.rmtree(d)
            continue
        for name in ("optimizer.safetensors", "value_head.safetensors", "state.json"):
            (d / name).unlink(missing_ok=True)


def last_checkpoint(checkpoints: Path, need: str) -> Path | None:
    """The newest complete ``step-N`` directory (one holding ``need``), or None."""
    found = [d for d in checkpoints.glob("step-*") if d.name[5:].isdigit() and (d / need).is_file()]
    return max(found, key=lambda d: int(d.name[5:]), default=None)


def plot_metrics(rows: list[dict], path: Path) -> None:
    """Reward and KL per step (PPO, RLOO), or loss and implicit reward margin per step (DPO)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dpo = "reward_margin" in rows[0]
    top_key, top_label, title = (("loss", "DPO loss", "DPO on the AI labels") if dpo else
                                 ("reward", "reward (normalised)", "RL against the AI feedback reward"))
    bottom_key, bottom_label = (("reward_margin", "chosen - rejected implicit reward") if dpo else
                                ("kl", "KL to SL-CAI, per token"))
    steps = [r["step"] for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 5), sharex=True)
    top.plot(steps, [math.nan if r.get(top_key) is None else r[top_key] for r in rows], marker=".")
    top.set_ylabel(top_label)
    top.set_title(title)
    bottom.plot(steps, [math.nan if r.get(bottom_key) is None else r[bottom_key] for r in rows], marker=".",
                color="tab:red")
    bottom.set_ylabel(bottom_label)
    bottom.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def trainer_resume_point(stage_dir: Path, metrics_log: MetricsLog) -> tuple[str | None, int]:
    """A TRL trainer's last checkpoint under ``rl/trainer/`` (None: start afresh) and its step; metric rows
    written after that step are dropped, since the resumed run writes them again."""
    last, done = last_trainer_checkpoint(stage_dir / "trainer")
    metrics_log.keep_steps_up_to(done)
    return last, done


def metrics_callback(metrics_log: MetricsLog, on_step, tokenizer, stage_dir: Path, row_of: Callable[[dict], dict]):
    """A TRL callback that writes ``row_of(logs)`` (plus the step and its seconds) to the metrics log at each
    logged step, calls ``on_step``, and saves ``rl/checkpoints/step-N`` whenever the trainer saves."""

    from transformers import TrainerCallback

    class Log(TrainerCallback):
        step_start = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self.step_start = time.time()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs:
                return
            row = {"step": state.global_step, **row_of(logs), "seconds": round(time.time() - self.step_start, 3)}
            metrics_log.write(row)
            if on_step:
                on_step(state.global_step, row)

        def on_save(self, args, state, control, model=None, **kwargs):
            save_checkpoint(model, tokenizer, stage_dir / "checkpoints", state.global_step)

    return Log()


def train_from(trainer, last: str | None, done: int, lora: bool) -> tuple[object, int | None]:
    """Train a TRL trainer, from its last checkpoint if there is one; the final policy (a LoRA adapter
    merged in) and the step it resumed from (None: a fresh start)."""

    progress.quiet_trainer(trainer)
    trainer.train(resume_from_checkpoint=last)
    final = trainer.model
    if lora:
        final = final.merge_and_unload()
    return final, (done or None)
