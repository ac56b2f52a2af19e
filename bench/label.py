"""Labelling throughput: the batched labeller vs. the usual LLM-judge loop.

Baseline: one comparison at a time, the feedback model reads the paper's multiple-choice
question in its chat template and ``model.generate`` writes one answer token (the usual
LLM-as-judge loop). Measured: the configured labelling method (default: the default config's),
batched, through ``feedback.py`` as ``cai label`` runs it. Same model, same comparisons
(the shipped harmless eval pairs), one process, one after the other; the ratio is printed.

    .venv/bin/python bench/label.py
    .venv/bin/python bench/label.py --pairs 48 --method multiple_choice
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
from constitutional.models import resolve_model
from constitutional.stages.label import judge_settings
from constitutional.stages.label_eval import load_eval_pairs

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "smollm2-cpu.yaml"))
    parser.add_argument("--pairs", type=int, default=48)
    parser.add_argument("--method", help="override label.method")
    args = parser.parse_args()

    config = load_config(args.config, [f"label.method={args.method}"] if args.method else [])
    cfg = config.label
    model = cfg.feedback_model or config.critique_revise.model
    backend = HFBackend(resolve_model(model), batch_size=cfg.batch_size, device="cpu")
    principles = [p for p in load_constitution(config.constitution).feedback_principles if p.kind == "harmless"]
    pairs = load_eval_pairs("harmless", args.pairs)
    picked = [sample_principles(principles, 1, config.seed, r["id"])[0] for r in pairs]
    tok = backend.tokenizer

    # Baseline: the usual judge loop, one comparison at a time, one generated answer token.
    answer_ids = [tok.convert_tokens_to_ids(t) for t in ("A", "B")]
    start = time.perf_counter()
    loop_answers = []
    with torch.inference_mode():
        for row, principle in zip(pairs, picked, strict=True):
            question = feedback.mc_body(row["prompt"], principle.text, row["a"], row["b"])
            chat = [{"role": "user", "content": question + "\nAnswer with (A) or (B)."},
                    {"role": "assistant", "content": "The answer is: ("}]
            ids = tok(backend.render(chat), add_special_tokens=False, return_tensors="pt")
            out = backend.model.generate(**ids, max_new_tokens=1, do_sample=False, pad_token_id=tok.pad_token_id,
                                         output_scores=True, return_dict_in_generate=True)
            scores = out.scores[0][0, answer_ids]
            loop_answers.append("A" if scores[0] >= scores[1] else "B")
    loop_seconds = time.perf_counter() - start

    # The labeller as `cai label` runs it.
    start = time.perf_counter()
    shots = feedback.load_label_fewshot(cfg.fewshot_file)[:cfg.fewshot] if cfg.method == "multiple_choice" else []
    items = [(r["prompt"], p, r["a"], r["b"]) for r, p in zip(pairs, picked, strict=True)]
    judged = feedback.judge(backend, cfg.method, items, **judge_settings(cfg, shots, cfg.contrast_temperature or 1.0))
    batch_seconds = time.perf_counter() - start

    def accuracy(picks_a):
        return sum(pa == r["chosen_is_a"] for pa, r in zip(picks_a, pairs, strict=True)) / len(pairs)

    n = len(pairs)
    print(f"feedback model {model}, {n} comparisons, torch threads {torch.get_num_threads()}")
    print(f"judge loop (generate 1 token, one at a time): {loop_seconds:.1f} s = {n / loop_seconds:.2f} cmp/s, "
          f"accuracy {accuracy([a == 'A' for a in loop_answers]):.3f}, picked A {loop_answers.count('A') / n:.2f}")
    print(f"batched {cfg.method}: {batch_seconds:.1f} s = {n / batch_seconds:.2f} cmp/s, "
          f"accuracy {accuracy([j.p_a > 0.5 for j in judged]):.3f}")
    print(f"ratio (batched / loop comparisons per second): {loop_seconds / batch_seconds:.2f}x")


if __name__ == "__main__":
    main()
