"""Labelling throughput against this CPU's prefill limit: the contrast labeller, old and new scoring path.

The contrast method must read, per comparison, each response under a follows and a violates
context (system prompt, demonstrations, request). How fast it can possibly go is set by how fast
the CPU can run tokens through the model (prefill, compute-bound) and by how many tokens it must
read: with each context computed once for all the comparisons that share it (a prefix cache), that
is the requests and the responses, plus each distinct context once.

In one run, on the same loaded model and the same comparisons (the shipped harmless eval pairs,
a principle drawn per pair, the config's contrast settings):

* the prefill limit: tokens per second of plain forward passes over long unpadded sequences;
* the old path: ``HFBackend(prefix_attention=False)``, each comparison's head (context + request)
  run once and its KV cache copied to both responses, rows left-padded;
* the new path (the default): ``prefix_decode.PrefixDecoder.score``, each shared context run once
  for all the comparisons that use it, rows packed without padding.

Printed: comparisons per second of each path and their ratio, the tokens the method must read per
comparison, and the share of the prefill limit the new path reaches.

    .venv/bin/python bench/label.py
    .venv/bin/python bench/label.py --pairs 96
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from constitutional import feedback
from constitutional.backends.hf import HFBackend
from constitutional.config import load_config
from constitutional.constitution import load_constitution, sample_principles
from constitutional.judge_pairs import judge_settings
from constitutional.models import resolve_model
from constitutional.stages.label_eval import load_eval_pairs

ROOT = Path(__file__).resolve().parents[1]


def prefill_rate(backend: HFBackend, rows: int = 8, length: int = 512, repeats: int = 2) -> float:
    """Tokens per second of forward passes over ``rows`` unpadded sequences of ``length`` tokens (best of a few)."""
    ids = torch.randint(100, 1000, (rows, length))
    best = float("inf")
    with torch.inference_mode():
        backend.model(input_ids=ids[:1, :64])  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            backend.model(input_ids=ids, logits_to_keep=1)
            best = min(best, time.perf_counter() - start)
    return rows * length / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "smollm2-cpu.yaml"))
    parser.add_argument("--pairs", type=int, default=48)
    args = parser.parse_args()

    config = load_config(args.config, ["label.method=contrast", "label.target_filter=false"])
    cfg = config.label
    model = cfg.feedback_model or config.critique_revise.model
    new = HFBackend(resolve_model(model), batch_size=cfg.batch_size, device="cpu")
    old = HFBackend(resolve_model(model), batch_size=cfg.batch_size, device="cpu", model_obj=new.model,
                    tokenizer=new.tokenizer, prefix_attention=False)
    principles = [p for p in load_constitution(config.constitution).feedback_principles if p.kind == "harmless"]
    pairs = load_eval_pairs("harmless", args.pairs)
    items = [(r["prompt"], sample_principles(principles, 1, config.seed, r["id"])[0], r["a"], r["b"]) for r in pairs]
    settings = judge_settings(cfg, [], cfg.contrast_temperature or 1.0)
    n = len(items)

    limit = prefill_rate(new)
    flat = [(p, pr, r) for p, pr, a, b in items for r in (a, b)]
    demos = settings["contrast_demos"]
    sequences = feedback.contrast_sequences(new, flat, context=cfg.contrast_context, demos=demos)
    prefixes = feedback.contrast_prefixes(new, flat, context=cfg.contrast_context, demos=demos)
    per_head = feedback.tokens_read(new, sequences) / n
    must_read = feedback.tokens_read(new, sequences, prefixes) / n

    timings, judged = {}, {}
    for name, backend in (("old", old), ("new", new)):
        start = time.perf_counter()
        judged[name] = feedback.judge(backend, "contrast", items, **settings)
        timings[name] = time.perf_counter() - start
    gap = max(abs(a.p_a - b.p_a) for a, b in zip(judged["old"], judged["new"], strict=True))
    accuracy = sum((j.p_a > 0.5) == r["chosen_is_a"] for j, r in zip(judged["new"], pairs, strict=True)) / n

    print(f"feedback model {model}, {n} harmless comparisons, contrast ({cfg.contrast_context}, "
          f"{cfg.contrast_fewshot} demonstration(s)), torch threads {torch.get_num_threads()}")
    print(f"prefill limit: {limit:.0f} tokens/s (8 x 512 tokens, one forward pass)")
    print(f"tokens per comparison: {per_head:.0f} with each head read once, {must_read:.0f} with each context "
          f"read once (what the method must read)")
    for name in ("old", "new"):
        print(f"{name} path: {timings[name]:.1f} s = {n / timings[name]:.2f} cmp/s")
    print(f"ratio new / old: {timings['old'] / timings['new']:.2f}x; largest P(A) difference {gap:.1e}; "
          f"accuracy {accuracy:.3f}")
    print(f"prefill-limited rate: {limit / must_read:.2f} cmp/s; the new path reaches "
          f"{n / timings['new'] / (limit / must_read):.0%} of it")


if __name__ == "__main__":
    main()
