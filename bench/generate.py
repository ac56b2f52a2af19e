"""Generation throughput: the batched transformers backend vs. a one-at-a-time generate loop.

Both sides use the same model, the same 32 red-team chats and the same ``max_new_tokens``,
greedy, with ``min_new_tokens = max_new_tokens`` so that both generate exactly the same number
of tokens; both run in this one process, one after the other, and the ratio is printed.

    .venv/bin/python bench/generate.py                        # embedded SmolLM2-135M-Instruct
    .venv/bin/python bench/generate.py --chats 32 --max-new-tokens 64 --batch-size 32
    .venv/bin/python bench/generate.py --model path/to/model  # any local transformers model
"""

from __future__ import annotations

import argparse
import time

import torch

from constitutional.backends.base import SamplingParams
from constitutional.backends.hf import HFBackend
from constitutional.models import resolve_model
from constitutional.prompt_sources import load_prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--chats", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    backend = HFBackend(resolve_model(args.model), batch_size=args.batch_size, device="cpu")
    chats = [[{"role": "user", "content": p.prompt}] for p in load_prompts("red-team", "train", args.chats)]
    n = args.max_new_tokens
    backend.generate(chats[:2], SamplingParams(max_new_tokens=4, temperature=0))  # warm-up

    # Baseline: the usual loop, one request at a time through model.generate.
    tok, model = backend.tokenizer, backend.model
    start = time.perf_counter()
    loop_tokens = 0
    with torch.inference_mode():
        for chat in chats:
            ids = tok(backend.render(chat), add_special_tokens=False, return_tensors="pt")
            out = model.generate(**ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
            loop_tokens += out.shape[1] - ids["input_ids"].shape[1]
    loop_seconds = time.perf_counter() - start

    # The backend: sorted by length, left-padded batches.
    start = time.perf_counter()
    out = backend.generate(chats, SamplingParams(max_new_tokens=n, min_new_tokens=n, temperature=0))
    batch_seconds = time.perf_counter() - start
    batch_tokens = sum(c.tokens for c in out)

    print(f"model {args.model}, {len(chats)} chats, {n} new tokens each, torch threads {torch.get_num_threads()}")
    print(f"one-at-a-time model.generate: {loop_tokens} tokens in {loop_seconds:.1f} s = "
          f"{loop_tokens / loop_seconds:.1f} tok/s")
    print(f"HFBackend (batch {args.batch_size}):       {batch_tokens} tokens in {batch_seconds:.1f} s = "
          f"{batch_tokens / batch_seconds:.1f} tok/s")
    print(f"ratio (batched / loop tokens per second): "
          f"{(batch_tokens / batch_seconds) / (loop_tokens / loop_seconds):.2f}x")


if __name__ == "__main__":
    main()
