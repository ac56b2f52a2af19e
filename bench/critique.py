"""Stage 1 throughput: the shared-prefix decoder vs. transformers' generate, on stage 1's own chats.

Workload: the first ``--prompts`` red-team train prompts of the config, run through the stage's
own chunk code (``critique_revise._revise_chunk``: initial response, then per round a critique
and a revision, each chat after the run's few-shot context), with the config's token budgets
and batch size. Both sides use the same loaded model in this one process: the old path
(``HFBackend(prefix_attention=False)``: ``model.generate`` with a copy of the prefix cache per
row) and the new one (``prefix_decode.PrefixDecoder``). Greedy by default, so both write the
same tokens: the script checks every text matches and prints tokens/s of each and the ratio.
The sides alternate ``--repeats`` times; the ratio uses each side's best run (the machine is
shared, so a slow run is usually a disturbed one); every run is printed.

    .venv/bin/python bench/critique.py                      # 32 prompts, 1 round, greedy
    .venv/bin/python bench/critique.py --rounds 2 --repeats 1
    .venv/bin/python bench/critique.py --temperature 0.7    # sampled: token counts differ, no text check
    .venv/bin/python bench/critique.py --threads 1          # steadier when other jobs share the cores
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch

from constitutional.backends.base import SamplingParams
from constitutional.backends.hf import HFBackend
from constitutional.config import load_config
from constitutional.constitution import load_constitution, sample_principles
from constitutional.models import resolve_model
from constitutional.prompt_sources import load_prompts
from constitutional.prompts import critique_chat, load_fewshot, pick_fewshot
from constitutional.stages.critique_revise import _Plan, _revise_chunk

ROOT = Path(__file__).resolve().parents[1]


def run_stage(backend, plans, cfg, seed: int) -> tuple[list, int, float]:
    """Stage 1's chunks on ``backend``: (rows, tokens generated, seconds)."""
    tokens = 0

    def on_batch(chats: int, batch_tokens: int) -> None:
        nonlocal tokens
        tokens += batch_tokens

    if backend.decoder is not None:
        backend.decoder.store = None  # nothing kept from an earlier run
    rows = []
    start = time.perf_counter()
    for i in range(0, len(plans), cfg.batch_size):
        rows += _revise_chunk(plans[i:i + cfg.batch_size], cfg, seed, backend, on_batch)
    return rows, tokens, time.perf_counter() - start


def texts(rows) -> list[str]:
    return [t for r in rows for t in [r.initial_response] + [x for rd in r.rounds for x in (rd.critique, rd.revision)]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "smollm2-cpu.yaml"))
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each side, alternating")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    config = load_config(args.config, ["critique_revise.target_filter=false"])  # decoding only, as measured
    cfg = dataclasses.replace(config.critique_revise, rounds=args.rounds, temperature=args.temperature)
    constitution = load_constitution(config.constitution)
    fewshot = pick_fewshot(load_fewshot(cfg.fewshot_file), cfg.fewshot, config.seed, "run")
    plans = [_Plan(p, sample_principles(constitution.sl_principles, cfg.rounds, config.seed, p.id), fewshot)
             for p in load_prompts(cfg.prompts, cfg.split, args.prompts)]

    new = HFBackend(resolve_model(cfg.model), batch_size=cfg.batch_size, device="cpu")
    old = HFBackend(resolve_model(cfg.model), batch_size=cfg.batch_size, device="cpu", model_obj=new.model,
                    tokenizer=new.tokenizer, prefix_attention=False)
    if new.decoder is None:
        raise SystemExit("the shared-prefix decoder does not support this model; nothing to compare")
    shortest = new.count_tokens(critique_chat("x", "y", plans[0].principles[0], fewshot, cfg.system_prompt))
    print(f"model {cfg.model}, {len(plans)} prompts, {cfg.rounds} round(s), batch {cfg.batch_size}, "
          f"budgets {cfg.max_new_tokens}/{cfg.critique_max_new_tokens} tokens, temperature {cfg.temperature}, "
          f"{cfg.fewshot}-shot context (a critique chat with a one-word prompt and response: {shortest} tokens), "
          f"torch threads {torch.get_num_threads()}", flush=True)
    new.generate([[{"role": "user", "content": "Hi"}]] * 2, SamplingParams(max_new_tokens=2, temperature=0))  # warm-up
    best: dict[str, float] = {}
    outputs: dict[str, list[str]] = {}
    for repeat in range(args.repeats):
        for name, backend in (("transformers generate", old), ("shared-prefix decoder", new)):
            rows, tokens, seconds = run_stage(backend, plans, cfg, config.seed)
            rate = tokens / seconds
            best[name] = max(best.get(name, 0.0), rate)
            outputs.setdefault(name, texts(rows))
            print(f"run {repeat + 1}, {name:22s}: {tokens} tokens in {seconds:6.1f} s = {rate:6.1f} tok/s", flush=True)
    old_rate, new_rate = best["transformers generate"], best["shared-prefix decoder"]
    print(f"best: transformers generate {old_rate:.1f} tok/s, shared-prefix decoder {new_rate:.1f} tok/s")
    print(f"ratio (shared-prefix / transformers tokens per second): {new_rate / old_rate:.2f}x")
    if cfg.temperature == 0:
        a, b = outputs["transformers generate"], outputs["shared-prefix decoder"]
        same = sum(x == y for x, y in zip(a, b, strict=True))
        print(f"greedy texts identical: {same}/{len(a)}" + ("" if same == len(a) else "  <-- MISMATCH"))


if __name__ == "__main__":
    main()
