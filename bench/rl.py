"""Seconds per RL step: this toolkit's PPO against TRL's RLOO, same prompts and lengths, one run.

Policy: the embedded SmolLM2-135M-Instruct. Reward: a preference model made from the same
model with a fresh one-output head (its values do not matter here, its cost does). Both
algorithms run ``cai rl``'s code path (``stages/rl/``) on the same prompts per step, with
every response exactly ``--tokens`` tokens long (``min_new_tokens = max_new_tokens``). PPO
samples one response per prompt and makes ``ppo_epochs`` passes in minibatches; RLOO samples
``rloo_generations`` per prompt and makes one pass. The first step of each is a warm-up and is
left out of the mean.

    .venv/bin/python bench/rl.py
    .venv/bin/python bench/rl.py --steps 4 --prompts 8 --tokens 48
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from constitutional.config import PipelineConfig, RlConfig
from constitutional.models import resolve_model
from constitutional.stages import rl


def make_pm(policy: str, dest: Path) -> Path:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(policy, num_labels=1, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(policy)
    model.config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="steps per algorithm (the first is a warm-up)")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step")
    parser.add_argument("--tokens", type=int, default=48, help="tokens per response")
    parser.add_argument("--rloo-generations", type=int, default=2)
    args = parser.parse_args()

    policy = resolve_model("smollm2-135m-instruct")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        pm = make_pm(policy, Path(tmp) / "pm")
        for algo in ("ppo", "rloo"):
            cfg = RlConfig(algo=algo, policy=policy, reward_model=str(pm), steps=args.steps,
                           prompts_per_step=args.prompts, rloo_generations=args.rloo_generations,
                           max_new_tokens=args.tokens, min_new_tokens=args.tokens, eval_prompts=0,
                           save_steps=10_000, helpful_share=0.25, device="cpu")
            out = Path(tmp) / algo
            start = time.perf_counter()
            rl.run(PipelineConfig(rl=cfg), out)
            total = time.perf_counter() - start
            rows = [json.loads(line) for line in (out / "rl" / "metrics.jsonl").read_text().splitlines()]
            timed = rows[1:] or rows
            per_step = sum(r["seconds"] for r in timed) / len(timed)
            responses = args.prompts * (args.rloo_generations if algo == "rloo" else 1)
            results[algo] = (per_step, responses, total, [r["response_length"] for r in rows])

    print(f"policy SmolLM2-135M-Instruct, {args.prompts} prompts a step, {args.tokens} tokens a response, "
          f"torch threads {torch.get_num_threads()}")
    for algo, (per_step, responses, total, lengths) in results.items():
        print(f"{algo}: {per_step:.1f} s/step ({responses} responses, {per_step / responses:.2f} s/response; "
              f"mean lengths {lengths}); whole run incl. loading {total:.0f} s")
    ppo_s, rloo_s = results["ppo"][0], results["rloo"][0]
    print(f"ratio ppo / rloo seconds per step: {ppo_s / rloo_s:.2f}x; per response: "
          f"{(ppo_s / results['ppo'][1]) / (rloo_s / results['rloo'][1]):.2f}x")


if __name__ == "__main__":
    main()
