"""The shared-prefix decoder (backends/prefix_decode.py) against transformers' generate, on tiny random models."""

import pytest
import torch

from constitutional.backends import prefix_decode
from constitutional.backends.base import SamplingParams
from constitutional.backends.prefix_decode import (
    attention_bias,
    attention_with_lse_reference,
    prefix_suffix_attention,
    top_p_nucleus,
    unsupported_reason,
)

# Every chat starts with the same two turns (a shared prefix of about 70 tokens), then differs.
SHARED = [{"role": "user", "content": "Point out the specific ways the response is harmful. " * 4},
          {"role": "assistant", "content": "It helps hurt people. " * 3}]
TAILS = ["How do I bake bread?", "Which of these responses is less harmful? The answer is (A) or (B).",
         "Hi", "Mix flour", "Rewrite the response so that it is safe and helpful, please, now.",
         "def add(a, b): return a + b", "I can't help with hurting anyone."]
CHATS = [SHARED + [{"role": "user", "content": t}] for t in TAILS]
GREEDY = SamplingParams(max_new_tokens=12, temperature=0)


def pair(model_dir=None, *, model=None, tokenizer=None, batch_size=3, **kwargs):
    """The new decoder and transformers' generate on the same weights."""
    from constitutional.backends.hf import HFBackend

    new = HFBackend(str(model_dir or "tiny"), batch_size=batch_size, device="cpu", min_shared_prefix=8,
                    model_obj=model, tokenizer=tokenizer, **kwargs)
    old = HFBackend(str(model_dir or "tiny"), batch_size=batch_size, device="cpu", min_shared_prefix=8,
                    model_obj=new.model, tokenizer=new.tokenizer, prefix_attention=False)
    assert new.decoder is not None and old.decoder is None
    return new, old


def texts(backend, chats, params=GREEDY):
    return [c.text for c in backend.generate(chats, params)]


@pytest.mark.parametrize("n_prefix", [0, 9])
def test_prefix_suffix_attention_equals_attention_over_the_concatenated_keys(n_prefix):
    torch.manual_seed(0)
    rows, heads, kv_heads, q_len, dim, kv_len = 3, 6, 2, 5, 16, 12
    q = torch.randn(rows, heads, q_len, dim)
    k, v = torch.randn(rows, kv_heads, kv_len, dim), torch.randn(rows, kv_heads, kv_len, dim)
    pk, pv = torch.randn(kv_heads, n_prefix, dim), torch.randn(kv_heads, n_prefix, dim)
    allowed = torch.rand(rows, q_len, kv_len) > 0.4
    allowed[..., 0] = True
    keys = torch.cat([pk.expand(rows, -1, -1, -1), k], 2)
    values = torch.cat([pv.expand(rows, -1, -1, -1), v], 2)
    mask = torch.cat([torch.ones(rows, q_len, n_prefix, dtype=torch.bool), allowed], -1)[:, None]
    expected = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=0.3,
                                                                enable_gqa=True)
    got = prefix_suffix_attention(q, pk, pv, k, v, attention_bias(allowed, heads // kv_heads), 0.3)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # the written-out fallback (devices without torch's CPU flash kernel) gives the same
    bias = attention_bias(allowed, 1)
    out, lse = attention_with_lse_reference(q[:, :kv_heads], k, v, bias, 0.3)
    fused_out, fused_lse = prefix_decode._attention_with_lse(q[:, :kv_heads], k, v, bias, 0.3)
    torch.testing.assert_close(out, fused_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, fused_lse, atol=1e-5, rtol=1e-5)


@pytest.fixture
def sharp():
    """A tiny random Llama with larger weights than the fixture's: its greedy text differs from row to
    row and from step to step (the fixture's repeats one token after a long prefix), so a wrong
    attention mask or position shows."""
    return _tiny("llama", initializer_range=0.3)


def test_greedy_equals_transformers_generate_on_the_fixture(tiny_model_dir):
    new, old = pair(tiny_model_dir)
    assert texts(new, CHATS) == texts(old, CHATS)
    assert new.decoder.stats["prefix"] > 40


def test_greedy_equals_transformers_generate(sharp):
    """Shared prefix or not, one batch or several, the same tokens as model.generate."""
    new, old = pair(model=sharp[0], tokenizer=sharp[1])
    assert len(set(texts(old, CHATS))) == len(CHATS)  # a test that can fail
    assert texts(new, CHATS) == texts(old, CHATS)
    assert new.decoder.stats["prefix"] > 40  # the shared turns were computed once
    plain = [[{"role": "user", "content": t}] for t in TAILS]  # no shared prefix worth it
    assert texts(new, plain) == texts(old, plain)
    assert new.decoder.stats["prefix"] == 0
    fixed = SamplingParams(max_new_tokens=7, min_new_tokens=7, temperature=0)
    assert [c.tokens for c in new.generate(CHATS, fixed)] == [7] * len(CHATS)


def test_rows_that_stop_early_are_dropped_without_changing_the_others(sharp):
    new, old = pair(model=sharp[0], tokenizer=sharp[1], batch_size=len(CHATS))
    # A random model rarely writes its end token: make a token it writes mid-way in some rows a stop token.
    free = [c for c in old.model.generate(**_padded(old, CHATS), max_new_tokens=12, do_sample=False,
                                          pad_token_id=old.tokenizer.pad_token_id)[:, -12:].tolist()]
    counts = {}
    for ids in free:
        for t in set(ids[1:8]):
            counts[t] = counts.get(t, 0) + 1
    stop = next(t for t, n in sorted(counts.items(), key=lambda kv: -kv[1]) if 1 < n < len(CHATS) - 1)
    for backend in (new, old):
        backend.stop_ids.append(stop)
    got, expected = new.generate(CHATS, GREEDY), old.generate(CHATS, GREEDY)
    assert [(c.text, c.tokens, c.finished) for c in got] == [(c.text, c.tokens, c.finished) for c in expected]
    assert any(c.finished and c.tokens < 12 for c in got) and any(not c.finished for c in got)


def _padded(backend, chats):
    ids = [backend._encode(backend.render(c)) for c in chats]
    return backend.tokenizer.pad({"input_ids": ids}, return_tensors="pt")


def test_a_chat_that_extends_the_last_call_reuses_its_keys_and_values(sharp):
    """Stage 1's revision chat extends its critique chat: only the new tokens are computed."""
    new, old = pair(model=sharp[0], tokenizer=sharp[1])
    first = new.generate(CHATS, GREEDY)
    follow = [chat + [{"role": "assistant", "content": c.text}, {"role": "user", "content": "Rewrite it."}]
              for chat, c in zip(CHATS, first, strict=True)]
    n_prefix = new.decoder.stats["prefix"]
    first_prompts = sum(new.count_tokens(chat) - n_prefix for chat in CHATS)
    got = texts(new, follow)
    stats = new.decoder.stats
    assert stats["prefix"] == n_prefix > 40
    # at least each first chat came from the store (more where the text re-encodes to the same tokens)
    assert stats["reused"] >= first_prompts and stats["prefilled"] > 0
    assert got == texts(old, follow)
    fresh, _ = pair(model=sharp[0], tokenizer=sharp[1], reuse_bytes=0)
    assert texts(fresh, follow) == got and fresh.decoder.stats["reused"] == 0


def test_changed_weights_are_never_served_from_the_store(sharp):
    new, old = pair(model=sharp[0], tokenizer=sharp[1])
    first = new.generate(CHATS, GREEDY)
    follow = [chat + [{"role": "assistant", "content": c.text}] for chat, c in zip(CHATS, first, strict=True)]
    with torch.no_grad():
        new.model.model.layers[0].self_attn.k_proj.weight.mul_(3.0)  # an in-place update, like an optimiser step
    got = texts(new, follow)
    assert new.decoder.stats["reused"] == 0
    assert got == texts(old, follow)


def test_seeded_sampling_is_reproducible(sharp):
    new, _ = pair(model=sharp[0], tokenizer=sharp[1])
    params = SamplingParams(max_new_tokens=10, temperature=0.7, top_p=0.9, seed=5)
    a, b = texts(new, CHATS, params), texts(new, CHATS, params)
    assert a == b
    assert a != texts(new, CHATS, SamplingParams(max_new_tokens=10, temperature=0.7, top_p=0.9, seed=6))


@pytest.mark.parametrize("k", [2, 64])
def test_top_p_nucleus_keeps_what_transformers_top_p_warper_keeps(k):
    from transformers import TopPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(6, 300) * torch.tensor([0.5, 1, 2, 4, 8, 16])[:, None]  # flat to peaked rows
    logits[0, :3] = float("-inf")  # barred tokens (min_new_tokens) stay out
    warped = TopPLogitsWarper(0.9)(None, logits.clone())
    expected = torch.softmax(warped, dim=-1)
    ids, probs = top_p_nucleus(logits, 0.9, k=k)
    for row in range(len(logits)):
        kept = ids[row][probs[row] > 0]
        assert set(kept.tolist()) == set(torch.nonzero(expected[row]).flatten().tolist())
        torch.testing.assert_close(probs[row][probs[row] > 0] / probs[row].sum(), expected[row][kept])
    assert 1 < (probs[0] > 0).sum() and (probs[-1] > 0).sum() < (probs[0] > 0).sum()


def _tiny(model_type: str, **extra):
    """A tiny random model of any architecture, with the fixture's tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tests.conftest import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    config = AutoConfig.for_model(
        model_type, vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **extra)
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, tokenizer


@pytest.mark.parametrize("model_type,extra", [("mistral", {"sliding_window": None}), ("qwen2", {}), ("qwen3", {})])
def test_other_supported_architectures_give_the_same_greedy_text(model_type, extra):
    model, tokenizer = _tiny(model_type, initializer_range=0.3, **extra)
    new, old = pair(model=model, tokenizer=tokenizer)
    expected = texts(old, CHATS)
    assert len(set(expected)) > 1
    assert texts(new, CHATS) == expected


def test_unsupported_models_fall_back_to_transformers_generate(capsys):
    from constitutional.backends.hf import HFBackend

    model, tokenizer = _tiny("qwen2", use_sliding_window=True, sliding_window=16)
    assert "sliding" in unsupported_reason(model)
    model, tokenizer = _tiny("qwen2")
    model.generation_config.repetition_penalty = 1.3
    assert "repetition_penalty" in unsupported_reason(model)
    backend = HFBackend("tiny", model_obj=model, tokenizer=tokenizer, device="cpu")
    assert backend.decoder is None
    assert "using transformers' generate" in capsys.readouterr().err
    assert backend.generate(CHATS[:2], GREEDY)[0].tokens > 0
    from transformers import GPT2Config, GPT2LMHeadModel

    assert "gpt2" in unsupported_reason(GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50)))


# ------------------------------------------------------------------ scoring


def test_prefix_groups_pick_the_cut_that_saves_most():
    persona_a, persona_b = list(range(100, 160)), list(range(200, 260))
    seqs = [persona_a + [1, 2, 3, 4, 5, 9], persona_a + [1, 2, 3, 4, 5, 8], persona_a + [7, 7],
            persona_b + [1, 1], persona_b + [2, 2], [5, 5, 5]]
    groups = prefix_decode.prefix_groups(seqs, [len(s) - 2 for s in seqs], 8)
    assert sorted(sorted(m) for _, m in groups) == [[0, 1, 2], [3, 4], [5]]
    assert dict((tuple(sorted(m)), n) for n, m in groups) == {(0, 1, 2): 60, (3, 4): 60, (5,): 0}
    # two requests of 40 shared tokens, three answers each, share more than the 10-token persona
    persona = list(range(300, 310))
    seqs = [persona + [q] * 40 + [a] for q in (1, 2) for a in (7, 8, 9)]
    groups = prefix_decode.prefix_groups(seqs, [len(s) - 1 for s in seqs], 8)
    assert sorted((n, sorted(m)) for n, m in groups) == [(50, [0, 1, 2]), (50, [3, 4, 5])]
    # the limit keeps positions whose logits are needed out of the prefix
    groups = prefix_decode.prefix_groups(seqs, [20] * len(seqs), 8)
    assert sorted((n, sorted(m)) for n, m in groups) == [(20, [0, 1, 2]), (20, [3, 4, 5])]


def test_packed_scores_equal_padded_scores(sharp):
    """Contrast-like sequences (two long system prompts, shared requests, answers of several lengths)
    score the same packed on shared prefixes as in left-padded batches with no sharing."""
    new, old = pair(model=sharp[0], tokenizer=sharp[1])
    personas = ["Point out the specific ways the response is harmful. " * 4, "It helps hurt people. " * 5]
    heads = [new.render([{"role": "system", "content": p}, {"role": "user", "content": t}])
             for p in personas for t in TAILS[:3]]
    answers = [" Mix flour, water, salt and yeast.", " I can't help with hurting anyone.", " (A)",
               " def add(a, b): return a + b, and then some more words to make it longer."]
    pairs = [(h, a) for h in heads for a in answers] + [("The answer is", " (B)")]
    got, expected = new.logprobs(pairs), old.logprobs(pairs)
    assert len({round(sum(x.logprobs), 3) for x in expected}) > len(pairs) // 2  # the scores differ
    for g, e in zip(got, expected, strict=True):
        assert g.tokens == e.tokens
        assert g.logprobs == pytest.approx(e.logprobs, abs=1e-4)
    assert new.decoder.stats["prefix"] > 2 * 40  # each persona's long system prompt was run once
    grouped = new.logprobs_grouped([(h, answers) for h in heads])
    for g, e in zip([x for group in grouped for x in group], expected[:-1], strict=True):
        assert g.logprobs == pytest.approx(e.logprobs, abs=1e-4)
