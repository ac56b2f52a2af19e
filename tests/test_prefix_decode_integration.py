"""The shared-prefix decoder on the embedded SmolLM2-135M-Instruct with stage 1's real few-shot chats."""

import pytest

from constitutional.backends.base import SamplingParams
from constitutional.config import load_config
from constitutional.constitution import load_constitution, sample_principles
from constitutional.prompt_sources import load_prompts
from constitutional.prompts import critique_chat, load_fewshot, pick_fewshot, response_chat, revision_chat

pytestmark = pytest.mark.integration


def test_greedy_critiques_and_revisions_equal_transformers_generate():
    """Critique chats share the demo's 2-shot context (about 600 tokens); the revision chats then
    extend them, so the second call also reads the first call's keys and values from the store."""
    from constitutional.backends.hf import HFBackend
    from constitutional.models import resolve_model

    config = load_config("configs/smollm2-cpu.yaml")
    cfg = config.critique_revise
    fewshot = pick_fewshot(load_fewshot(cfg.fewshot_file), cfg.fewshot, config.seed, "run")
    principles = load_constitution(config.constitution).sl_principles
    prompts = [p.prompt for p in load_prompts(cfg.prompts, cfg.split, 4)]
    new = HFBackend(resolve_model(cfg.model), batch_size=4, device="cpu")
    old = HFBackend(resolve_model(cfg.model), batch_size=4, device="cpu", model_obj=new.model,
                    tokenizer=new.tokenizer, prefix_attention=False)
    assert new.decoder is not None
    greedy = SamplingParams(max_new_tokens=24, temperature=0)

    initial = [c.text for c in old.generate([response_chat(p) for p in prompts], greedy)]
    assert [c.text for c in new.generate([response_chat(p) for p in prompts], greedy)] == initial
    picked = [sample_principles(principles, 1, config.seed, p)[0] for p in prompts]
    critique_chats = [critique_chat(p, r, pr, fewshot) for p, r, pr in zip(prompts, initial, picked, strict=True)]
    critiques = [c.text for c in new.generate(critique_chats, greedy)]
    assert new.decoder.stats["prefix"] > 500  # the few-shot context, computed once
    assert critiques == [c.text for c in old.generate(critique_chats, greedy)]

    revision_chats = [revision_chat(p, r, pr, c, fewshot)
                      for p, r, pr, c in zip(prompts, initial, picked, critiques, strict=True)]
    revisions = [c.text for c in new.generate(revision_chats, greedy)]
    assert new.decoder.stats["reused"] > new.decoder.stats["prefilled"]  # most of each chat came from the store
    assert revisions == [c.text for c in old.generate(revision_chats, greedy)]
    assert all(revisions)
