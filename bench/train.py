"""SFT training throughput on the embedded model, as a fraction of this machine's fp32 matmul peak.

In one run: (1) the fp32 matmul peak, from square ``torch.mm`` products; (2) SFT steps with the
same TRL settings stage 2 uses (float32, full fine-tuning, loss on completions), on chats made
of red-team prompts and the shipped few-shot revisions (about 1,100 tokens per step of 8).
Achieved FLOP/s counts 6 x parameters x tokens per second (forward + backward), the usual
estimate; attention FLOPs are left out, so the fraction is a slight underestimate.

    .venv/bin/python bench/train.py
    .venv/bin/python bench/train.py --steps 8 --batch-size 8
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import SFTConfig, SFTTrainer

from constitutional.models import resolve_model
from constitutional.prompt_sources import load_prompts
from constitutional.prompts import load_fewshot


def matmul_peak(n: int = 2048, repeats: int = 10) -> float:
    """Best fp32 GFLOP/s of an n x n matmul on this machine."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * n**3 / (time.perf_counter() - start) / 1e9)
    return best


class StepTimer(TrainerCallback):
    def __init__(self):
        self.starts, self.ends = [], []

    def on_step_begin(self, args, state, control, **kwargs):
        self.starts.append(time.perf_counter())

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())


class TokenCounter:
    """Wraps the data collator to count real (unpadded) and padded tokens per batch."""

    def __init__(self, collator):
        self.collator, self.real, self.padded = collator, [], []

    def __call__(self, examples):
        batch = self.collator(examples)
        self.real.append(int(batch["attention_mask"].sum()) if "attention_mask" in batch
                         else int(batch["input_ids"].numel()))
        self.padded.append(int(batch["input_ids"].numel()))
        return batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=6, help="timed steps (after one warm-up step)")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    peak = matmul_peak()
    path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    params = sum(p.numel() for p in model.parameters())
    revisions = [ex.revision for ex in load_fewshot()]
    prompts = load_prompts("red-team", "train")
    n = (args.steps + 1) * args.batch_size
    rows = [{"prompt": [{"role": "user", "content": prompts[i % len(prompts)].prompt}],
             "completion": [{"role": "assistant", "content": revisions[i % len(revisions)]}]} for i in range(n)]
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(output_dir=out, max_steps=args.steps + 1, per_device_train_batch_size=args.batch_size,
                           learning_rate=1e-5, use_cpu=True, bf16=False, fp16=False, report_to="none",
                           save_strategy="no", logging_steps=1000, completion_only_loss=True, max_length=512,
                           disable_tqdm=True)
        trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                             processing_class=tokenizer, callbacks=[timer])
        counter = TokenCounter(trainer.data_collator)
        trainer.data_collator = counter
        trainer.train()
    step_seconds = [e - s for s, e in zip(timer.starts, timer.ends, strict=True)][1:]  # drop warm-up
    real = counter.real[1:len(step_seconds) + 1]
    padded = counter.padded[1:len(step_seconds) + 1]
    seconds = sum(step_seconds)
    tokens_per_s = sum(real) / seconds
    padded_per_s = sum(padded) / seconds
    achieved = 6 * params * tokens_per_s / 1e9
    achieved_padded = 6 * params * padded_per_s / 1e9
    print(f"model {args.model}: {params / 1e6:.1f}M parameters, torch threads {torch.get_num_threads()}")
    print(f"fp32 matmul peak (2048^3 torch.mm): {peak:.1f} GFLOP/s")
    print(f"SFT: {len(step_seconds)} steps of {args.batch_size} chats, {sum(real) / len(real):.0f} real tokens "
          f"({sum(padded) / len(padded):.0f} with padding) a step, {seconds / len(step_seconds):.2f} s a step")
    print(f"SFT throughput: {tokens_per_s:.1f} tokens/s ({padded_per_s:.1f} counting padding)")
    print(f"achieved: {achieved:.1f} GFLOP/s = {achieved / peak:.1%} of peak "
          f"({achieved_padded / peak:.1%} counting padding tokens)")


if __name__ == "__main__":
    main()
