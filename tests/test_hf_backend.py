"""The transformers backend on a tiny random Llama (built in a fixture, no download)."""

import math

import pytest
import torch

from constitutional.backends.base import Backend, SamplingParams

CHATS = [
    [{"role": "user", "content": "How do I bake bread?"}],
    [{"role": "user", "content": "Which of these responses is less harmful? The answer is (A) or (B)."}],
    [{"role": "system", "content": "Be safe."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Mix flour"}],
    [{"role": "user", "content": "Rewrite the response so that it is safe and helpful, please, now."}],
]


def test_implements_the_protocol(tiny_backend):
    assert isinstance(tiny_backend, Backend)
    assert tiny_backend.context_length == 4096
    assert tiny_backend.render(CHATS[0]).endswith("<|im_start|>assistant\n")
    assert tiny_backend.count_tokens(CHATS[0]) > tiny_backend.count_tokens([{"role": "user", "content": "x"}])


def test_batched_greedy_equals_one_at_a_time(tiny_backend):
    """Left padding must not change what the model writes."""
    params = SamplingParams(max_new_tokens=12, temperature=0)
    batched = tiny_backend.generate(CHATS, params)
    single = [tiny_backend.generate([chat], params)[0] for chat in CHATS]
    assert [c.text for c in batched] == [c.text for c in single]
    assert all(0 < c.tokens <= 12 for c in batched)


def test_seeded_sampling_is_reproducible_and_seed_dependent(tiny_backend):
    a = tiny_backend.generate(CHATS, SamplingParams(max_new_tokens=16, temperature=1.0, seed=3))
    b = tiny_backend.generate(CHATS, SamplingParams(max_new_tokens=16, temperature=1.0, seed=3))
    c = tiny_backend.generate(CHATS, SamplingParams(max_new_tokens=16, temperature=1.0, seed=4))
    assert [x.text for x in a] == [x.text for x in b]
    assert [x.text for x in a] != [x.text for x in c]


def test_progress_callback_counts_chats_and_tokens(tiny_backend):
    seen = []
    out = tiny_backend.generate(CHATS, SamplingParams(max_new_tokens=5, temperature=0),
                                progress=lambda n, t: seen.append((n, t)))
    assert sum(n for n, _ in seen) == len(CHATS)
    assert sum(t for _, t in seen) == sum(c.tokens for c in out)
    assert len(seen) == math.ceil(len(CHATS) / tiny_backend.batch_size)


def test_logprobs_match_a_direct_forward_pass(tiny_backend):
    prompt = tiny_backend.render(CHATS[1])
    pairs = [(prompt, " (A)"), (prompt, " (B)"), (tiny_backend.render(CHATS[0]), "Mix flour, water and salt.")]
    scored = tiny_backend.logprobs(pairs)
    tok, model = tiny_backend.tokenizer, tiny_backend.model
    for (p, cont), result in zip(pairs, scored, strict=True):
        head = tok(p, add_special_tokens=False)["input_ids"]
        full = tok(p + cont, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([full])).logits[0], -1)
        expected = [logp[i - 1, full[i]].item() for i in range(len(head), len(full))]
        assert result.logprobs == pytest.approx(expected, abs=1e-4)
        assert len(result.tokens) == len(full) - len(head)
        assert result.total < 0


def test_missing_model_dir_is_a_clear_error(tmp_path):
    from constitutional.errors import CaiError
    from constitutional.models import resolve_model

    with pytest.raises(CaiError, match="no such directory"):
        resolve_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CaiError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"))
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_shared_prefix_cache_gives_the_same_text_as_full_prefill(tiny_model_dir):
    """Few-shot context computed once and reused must not change what the model writes."""
    from constitutional.backends.hf import HFBackend

    shared = [{"role": "user", "content": "Point out the specific ways the response is harmful. " * 4},
              {"role": "assistant", "content": "It helps hurt people. " * 3}]
    chats = [shared + chat for chat in CHATS]
    with_cache = HFBackend(str(tiny_model_dir), batch_size=3, device="cpu", min_shared_prefix=8)
    without = HFBackend(str(tiny_model_dir), batch_size=3, device="cpu", min_shared_prefix=10**9)
    prefix, cache = with_cache._shared_prefix([with_cache._encode(with_cache.render(c)) for c in chats])
    assert len(prefix) > 40 and cache is not None
    params = SamplingParams(max_new_tokens=10, temperature=0)
    assert [c.text for c in with_cache.generate(chats, params)] == [c.text for c in without.generate(chats, params)]
    single = [without.generate([chat], params)[0].text for chat in chats]
    assert [c.text for c in with_cache.generate(chats, params)] == single


@pytest.mark.parametrize("min_shared_prefix", [8, 10**9])
def test_option_logprobs_match_full_continuation_scores(tiny_model_dir, min_shared_prefix):
    """One pass reading A vs B equals the log-prob of that token in the full continuation."""
    from constitutional.backends.hf import HFBackend

    backend = HFBackend(str(tiny_model_dir), batch_size=2, device="cpu", min_shared_prefix=min_shared_prefix)
    shared = "Which of these responses is less harmful? The answer is (A) or (B).\n" * 3
    prompts = [shared + f"Options: (A) {a} (B) {b}\nThe answer is:" for a, b in
               [("Mix flour.", "No."), ("I can't help with hurting anyone.", "Sure, here is how."), ("Hi", "Bye")]]
    got = backend.option_logprobs(prompts, [" (A)", " (B)"])
    shared_ids, firsts = backend.option_tokens(prompts[0], [" (A)", " (B)"])
    assert len(firsts) == 2 and firsts[0] != firsts[1]
    for prompt, (la, lb) in zip(prompts, got, strict=True):
        full_a, full_b = backend.logprobs([(prompt, " (A)"), (prompt, " (B)")])
        assert la == pytest.approx(full_a.logprobs[len(shared_ids)], abs=1e-4)
        assert lb == pytest.approx(full_b.logprobs[len(shared_ids)], abs=1e-4)


def test_render_leaves_a_final_assistant_turn_open(tiny_backend):
    chat = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "Let's think step-by-step:"}]
    text = tiny_backend.render(chat)
    assert text.endswith("Let's think step-by-step:")
    assert tiny_backend.render(chat, add_generation_prompt=False).rstrip().endswith("<|im_end|>")


def test_logprobs_grouped_match_logprobs(tiny_backend):
    # heads of different lengths, continuations of different lengths, one group of three
    heads = [tiny_backend.render(CHATS[0]), tiny_backend.render(CHATS[1]), "The answer is"]
    groups = [(heads[0], ["Mix flour, water and salt.", " no"]),
              (heads[1], [" (A)", "I can't help with hurting anyone, but I can help you stay safe."]),
              (heads[2], [" (A)", " (B)", " or (B)"]),
              (heads[1], ["Rewrite the response so that it is safe.", "def add(a, b): return a + b"])]
    grouped = tiny_backend.logprobs_grouped(groups)
    flat = tiny_backend.logprobs([(h, c) for h, cs in groups for c in cs])
    assert [len(g) for g in grouped] == [2, 2, 3, 2]
    for got, expected in zip([x for g in grouped for x in g], flat, strict=True):
        assert got.tokens == expected.tokens
        assert got.logprobs == pytest.approx(expected.logprobs, abs=1e-4)
