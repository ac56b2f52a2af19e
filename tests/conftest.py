"""Shared fixtures: a tiny random Llama with its own tokenizer (no download), a fake backend."""

from __future__ import annotations

from pathlib import Path

import pytest

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "How do I bake bread at home? Mix flour, water, salt and yeast, then knead and wait.",
    "I can't help with hurting anyone, but I can help you stay safe and calm.",
    "Point out the specific ways the assistant's last response is harmful or illegal.",
    "Rewrite the response so that it is safe and helpful. Reply with the response only.",
    "The answer is (A) or (B). Which of these responses is less harmful?",
    "def add(a, b): return a + b  # Python code, numbers 0 1 2 3 4 5 6 7 8 9",
]


def build_tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")
    fast.chat_template = CHATML
    return fast


def build_tiny_llama(path: Path, max_positions: int = 4096, seed: int = 0) -> Path:
    """Save a 2-layer random Llama and its tokenizer to ``path``; return the path."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_backend(tiny_model_dir):
    from constitutional.backends.hf import HFBackend

    return HFBackend(str(tiny_model_dir), batch_size=4, device="cpu")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch, request):
    """Unit tests get an empty cache; integration tests share the real one (the model is big)."""
    if "integration" not in request.keywords:
        monkeypatch.setenv("CAI_CACHE_DIR", str(tmp_path / "cache"))


_DEFAULT_THREADS: list[int] = []


def pytest_configure(config):
    """Unit tests run tiny models, whose matmuls are too small to share between threads: with
    two threads on a busy machine each op waits for the other core (measured: a tiny-model
    evaluation took 79 s with torch's default threads, 5 s with one). So the session runs on one
    thread (fixtures of any scope included), and integration tests get torch's default back,
    since the embedded model's matmuls do gain from every core."""
    import torch

    _DEFAULT_THREADS.append(torch.get_num_threads())
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _all_threads_for_integration_tests(request):
    import torch

    if "integration" not in request.keywords:
        yield
        return
    torch.set_num_threads(_DEFAULT_THREADS[0])
    yield
    torch.set_num_threads(1)
