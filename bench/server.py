"""Throughput through a vLLM server (its CPU build) vs. the in-process transformers backend.

Two workloads, each run on both backends with the same model, the same inputs and the same
settings, one after the other (never at once: they would share the CPU), in one run; ratios printed:

* stage 1, critique-revise: ``critique_revise.run`` as ``cai critique-revise`` runs it, on the
  default config's red-team prompts (sampled; the two sides write different texts, so the figure
  compared is generated tokens per second, and prompts per second beside it);
* contrast labelling: ``feedback.judge_contrast`` on the shipped harmless eval pairs (comparisons
  per second), and how far the two sides' P(A) differ.

The server is started here (``serve.start_server``: its environment is built into the cache on
first use) and stopped at the end; its start-up time is printed, not counted.

    .venv/bin/python bench/server.py
    .venv/bin/python bench/server.py --prompts 16 --pairs 48
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from constitutional import feedback, serve
from constitutional.backends import load_backend
from constitutional.config import ServerSpec, load_config
from constitutional.constitution import load_constitution, sample_principles
from constitutional.models import resolve_model
from constitutional.stages import critique_revise
from constitutional.stages.label_eval import load_eval_pairs

ROOT = Path(__file__).resolve().parents[1]


def stage_1(config, backend, out: Path) -> tuple[float, dict]:
    start = time.perf_counter()
    summary = critique_revise.run(config, out, backend=backend)
    return time.perf_counter() - start, summary


def contrast(backend, items, temperature: float) -> tuple[float, list[float]]:
    start = time.perf_counter()
    judged = feedback.judge_contrast(backend, items, temperature)
    return time.perf_counter() - start, [j.p_a for j in judged]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "smollm2-cpu.yaml"))
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, help="stage 1 prompts (default: the config's limit)")
    parser.add_argument("--pairs", type=int, default=48, help="harmless eval pairs to label")
    parser.add_argument("--max-in-flight", type=int, default=32)
    args = parser.parse_args()

    overrides = [f"critique_revise.model={args.model}"] + ([f"critique_revise.limit={args.prompts}"]
                                                           if args.prompts else [])
    config = load_config(args.config, overrides)
    cfg = config.critique_revise
    pool = [p for p in load_constitution(config.constitution).feedback_principles if p.kind == "harmless"]
    pairs = load_eval_pairs("harmless", args.pairs)
    items = [(r["prompt"], sample_principles(pool, 1, config.seed, r["id"])[0], r["a"], r["b"]) for r in pairs]
    temperature = config.label.contrast_temperature or 0.1
    work = Path(tempfile.mkdtemp(prefix="cai-bench-server-"))
    results = {}

    # In-process first; its model is freed before the server starts.
    local = load_backend(args.model, batch_size=cfg.batch_size, device="cpu")
    results["hf_stage1"] = stage_1(config, local, work / "hf")
    results["hf_contrast"] = contrast(local, items, temperature)
    del local

    log = work / "vllm.log"
    start = time.perf_counter()
    proc, url = serve.start_server(resolve_model(args.model), args.model, log_path=log)
    try:
        ready = serve.wait_ready(url, proc, log_path=log)
        spec = ServerSpec(base_urls=[url], model=args.model, max_in_flight=args.max_in_flight)
        server = load_backend(spec)
        results["vllm_stage1"] = stage_1(config, server, work / "vllm")
        results["vllm_contrast"] = contrast(server, items, temperature)
        server.close()
    finally:
        serve.stop_server(proc)
    print(f"model {args.model}; in-process torch threads {torch.get_num_threads()}, cores {os.cpu_count()}; "
          f"vLLM {serve.VLLM_REQUIREMENT} ready in {ready:.0f} s ({time.perf_counter() - start:.0f} s with "
          f"start-up), max_in_flight {args.max_in_flight}")

    rates = {}
    for side in ("hf", "vllm"):
        seconds, summary = results[f"{side}_stage1"]
        tokens = summary["tokens_generated_this_run"]
        rates[side] = tokens / seconds
        print(f"stage 1 {side:>4}: {summary['rows']} prompts x {cfg.rounds} rounds, {tokens} tokens in {seconds:.1f} s "
              f"= {tokens / seconds:.0f} tokens/s, {summary['rows'] / seconds:.3f} prompts/s")
    print(f"stage 1 ratio (vLLM / in-process tokens per second): {rates['vllm'] / rates['hf']:.2f}x")

    (hf_s, hf_p), (vl_s, vl_p) = results["hf_contrast"], results["vllm_contrast"]
    n = len(items)
    gap = max(abs(a - b) for a, b in zip(hf_p, vl_p, strict=True))
    print(f"contrast   hf: {n} comparisons in {hf_s:.1f} s = {n / hf_s:.2f} cmp/s")
    print(f"contrast vllm: {n} comparisons in {vl_s:.1f} s = {n / vl_s:.2f} cmp/s (largest P(A) gap {gap:.4f})")
    print(f"contrast ratio (vLLM / in-process comparisons per second): {hf_s / vl_s:.2f}x")


if __name__ == "__main__":
    main()
