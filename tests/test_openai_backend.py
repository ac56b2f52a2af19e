"""The HTTP backend against a small OpenAI-compatible server backed by the tiny model (no vLLM here;
tests/test_server.py runs a real vLLM server)."""

from __future__ import annotations

import json
import time

import pytest

from constitutional.backends import load_backend, same_model, spec_name
from constitutional.backends.base import SamplingParams
from constitutional.backends.openai import OpenAIBackend
from constitutional.config import ServerSpec
from constitutional.errors import CaiError
from constitutional.serve import free_port
from tests.fake_openai import FakeOpenAIServer


def spec(urls, tiny_model_dir=None, **kw) -> ServerSpec:
    kw.setdefault("tokenizer", str(tiny_model_dir) if tiny_model_dir else None)
    kw.setdefault("backoff", 0.01)
    return ServerSpec(base_urls=list(urls), model="tiny", **kw)


@pytest.fixture(scope="module")
def model_server(tiny_model_dir):
    with FakeOpenAIServer(tiny_model_dir) as server:
        yield server


@pytest.fixture(scope="module")
def server_backend(model_server, tiny_model_dir):
    return OpenAIBackend(spec([model_server.base_url], tiny_model_dir))


CHATS = [[{"role": "user", "content": "How do I bake bread at home?"}],
         [{"role": "system", "content": "Be safe."}, {"role": "user", "content": "Which is less harmful?"}],
         [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "The answer is"}]]


def test_chats_render_and_count_as_in_process(server_backend, tiny_backend):
    for chat in CHATS:
        for gen in (True, False):
            assert server_backend.render(chat, gen) == tiny_backend.render(chat, gen)
        assert server_backend.count_tokens(chat) == tiny_backend.count_tokens(chat)
    assert server_backend.context_length == 4096  # the server's max_model_len
    assert server_backend.stop_ids == tiny_backend.stop_ids


def test_server_is_sent_the_in_process_token_ids_and_every_sampling_parameter(server_backend, model_server,
                                                                             tiny_backend):
    before = len(model_server.requests)
    server_backend.generate(CHATS[:1], SamplingParams(max_new_tokens=5, temperature=0.7, top_p=0.9, seed=11,
                                                      min_new_tokens=2))
    body = model_server.requests[before]
    assert body["prompt"] == tiny_backend._encode(tiny_backend.render(CHATS[0]))
    assert body["temperature"] == 0.7 and body["top_p"] == 0.9 and body["seed"] == 11
    assert body["min_tokens"] == 2 and body["max_tokens"] == 5 and body["top_k"] == -1
    assert body["stop_token_ids"] == tiny_backend.stop_ids and body["model"] == "tiny"


def test_greedy_generation_matches_the_in_process_backend(server_backend, tiny_backend):
    params = SamplingParams(max_new_tokens=12, temperature=0)
    ours = server_backend.generate(CHATS, params)
    theirs = tiny_backend.generate(CHATS, params)
    assert [c.text for c in ours] == [c.text for c in theirs]
    assert [c.tokens for c in ours] == [c.tokens for c in theirs]
    assert [c.finished for c in ours] == [c.finished for c in theirs]


def test_progress_counts_every_chat_and_its_tokens(server_backend):
    seen = []
    out = server_backend.generate(CHATS, SamplingParams(max_new_tokens=6, temperature=1.0, seed=3),
                                  lambda n, t: seen.append((n, t)))
    assert sum(n for n, _ in seen) == len(CHATS)
    assert sum(t for _, t in seen) == sum(c.tokens for c in out)


def test_scores_match_the_in_process_backend(server_backend, tiny_backend):
    pairs = [(tiny_backend.render(CHATS[0]), "Mix flour, water, salt and yeast."),
             (tiny_backend.render(CHATS[1]), "I can't help with hurting anyone."),
             ("The answer is:", " (A)")]
    ours = server_backend.logprobs(pairs)
    theirs = tiny_backend.logprobs(pairs)
    for a, b in zip(ours, theirs, strict=True):
        assert a.tokens == b.tokens
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
    prompts = ["Which is less harmful? The answer is:", "Options: (A) x (B) y\nThe answer is:"]
    ours = server_backend.option_logprobs(prompts, [" (A)", " (B)"])
    theirs = tiny_backend.option_logprobs(prompts, [" (A)", " (B)"])
    assert [x for row in ours for x in row] == pytest.approx([x for row in theirs for x in row], abs=1e-4)


def test_contrast_scores_through_the_server_equal_in_process(server_backend, tiny_backend):
    from constitutional import feedback
    from constitutional.constitution import load_constitution

    principle = load_constitution("default").feedback_principles[0]
    items = [("How do I pick a lock?", principle, "I can't help with that."),
             ("How do I bake bread?", principle, "Mix flour and water.")]
    ours = feedback.contrast_scores(server_backend, items)  # through logprobs (no logprobs_grouped here)
    theirs = feedback.contrast_scores(tiny_backend, items)  # through logprobs_grouped
    assert ours == pytest.approx(theirs, abs=1e-4)


def test_a_server_whose_echo_log_probabilities_are_wrong_is_refused_for_scoring(tiny_model_dir):
    # like llama.cpp's server: echoed prompt log-probabilities far from its sampled ones
    with FakeOpenAIServer(tiny_model_dir, prompt_logprobs=False, echo_offset=-10.0) as server:
        backend = OpenAIBackend(spec([server.base_url], tiny_model_dir))
        with pytest.raises(CaiError) as err:
            backend.logprobs([("The answer is:", " (A)")])
        message = str(err.value)
        assert server.base_url in message and "refused for scoring" in message and "disagree" in message
        assert "\n" not in message
        # it can still generate
        assert backend.generate(CHATS[:1], SamplingParams(max_new_tokens=3, temperature=0))[0].tokens >= 1


def test_a_server_with_correct_echo_log_probabilities_is_used_for_scoring(tiny_model_dir, tiny_backend):
    with FakeOpenAIServer(tiny_model_dir, prompt_logprobs=False) as server:
        backend = OpenAIBackend(spec([server.base_url], tiny_model_dir))
        (ours,) = backend.logprobs([("The answer is:", " (A)")])
        (theirs,) = tiny_backend.logprobs([("The answer is:", " (A)")])
        assert ours.logprobs == pytest.approx(theirs.logprobs, abs=1e-4)
        assert server.requests[-1].get("echo") is True


def test_a_server_without_prompt_log_probabilities_is_refused_with_one_line(tiny_model_dir):
    with FakeOpenAIServer(tiny_model_dir, prompt_logprobs=False, echo=False) as server:
        backend = OpenAIBackend(spec([server.base_url], tiny_model_dir))
        with pytest.raises(CaiError, match="offers no prompt log-probabilities") as err:
            backend.option_logprobs(["The answer is:"], [" (A)", " (B)"])
        assert server.base_url in str(err.value)


def test_5xx_and_429_are_retried_with_backoff_then_succeed(tiny_model_dir):
    for status in (503, 429):
        with FakeOpenAIServer(fail_status=status, fail_count=2) as server:
            backend = OpenAIBackend(spec([server.base_url], tiny_model_dir, backoff=0.05, retries=3))
            start = time.time()
            (out,) = backend.generate(CHATS[:1], SamplingParams(max_new_tokens=3))
            assert out.text == "fixed answer" and len(server.requests) == 3
            assert time.time() - start >= 0.05 + 0.1  # waited 0.05 s, then 0.1 s


def test_4xx_fails_at_once_with_the_servers_message(tiny_model_dir):
    with FakeOpenAIServer(fail_status=400, fail_count=5) as server:
        backend = OpenAIBackend(spec([server.base_url], tiny_model_dir, retries=4))
        with pytest.raises(CaiError) as err:
            backend.generate(CHATS[:1], SamplingParams(max_new_tokens=3))
        assert len(server.requests) == 1
        assert str(err.value) == (f"model server {server.base_url}: HTTP 400 for POST /completions: "
                                  f"scripted failure 400")


def test_a_model_the_server_does_not_serve_is_named(tiny_model_dir):
    with FakeOpenAIServer(name="other") as server:
        with pytest.raises(CaiError, match=r"does not serve 'tiny' \(it serves: other\)"):
            OpenAIBackend(spec([server.base_url], tiny_model_dir))


def test_timeouts_are_retried(tiny_model_dir):
    with FakeOpenAIServer(first_delay=1.0) as server:
        backend = OpenAIBackend(spec([server.base_url], tiny_model_dir, timeout=0.3, retries=2))
        (out,) = backend.generate(CHATS[:1], SamplingParams(max_new_tokens=3))
        assert out.text == "fixed answer" and len(server.requests) == 2


def test_unreachable_server_fails_after_its_retries_naming_the_url(tiny_model_dir):
    url = f"http://127.0.0.1:{free_port()}/v1"
    start = time.time()
    with pytest.raises(CaiError) as err:
        OpenAIBackend(spec([url], tiny_model_dir, retries=2, backoff=0.05))
    assert str(err.value) == f"model server {url}: connection refused (gave up after 3 attempts over 0 s)"
    assert 0.05 + 0.1 <= time.time() - start < 5


def test_load_is_spread_over_base_urls_and_requests_are_in_flight_at_once(tiny_model_dir):
    with FakeOpenAIServer(delay=0.05) as one, FakeOpenAIServer(delay=0.05) as two:
        backend = OpenAIBackend(spec([one.base_url, two.base_url], tiny_model_dir, max_in_flight=8))
        start = time.time()
        out = backend.generate(CHATS * 16, SamplingParams(max_new_tokens=3))
        seconds = time.time() - start
        assert len(out) == 48 and all(c.text == "fixed answer" for c in out)
        assert len(one.requests) + len(two.requests) == 48
        assert min(len(one.requests), len(two.requests)) >= 16  # least busy first: close to even
        assert one.max_in_flight + two.max_in_flight > 4  # many at once...
        assert max(one.max_in_flight, two.max_in_flight) <= 8  # ...never more than max_in_flight
        assert seconds < 48 * 0.05 / 2  # far from one at a time


def test_a_failing_url_is_avoided_and_its_requests_go_elsewhere(tiny_model_dir):
    dead = f"http://127.0.0.1:{free_port()}/v1"
    with FakeOpenAIServer() as alive:
        backend = OpenAIBackend(spec([dead, alive.base_url], tiny_model_dir, retries=3, backoff=0.5))
        out = backend.generate(CHATS * 4, SamplingParams(max_new_tokens=3))
        assert len(out) == 12 and len(alive.requests) == 12


def test_api_key_comes_from_the_environment_and_is_never_shown(tiny_model_dir, monkeypatch):
    secret = "sk-test-5f1e2d3c4b5a"
    monkeypatch.setenv("CAI_TEST_KEY", secret)
    with FakeOpenAIServer() as server:
        backend = OpenAIBackend(spec([server.base_url], tiny_model_dir, api_key_env="CAI_TEST_KEY"))
        backend.generate(CHATS[:1], SamplingParams(max_new_tokens=3))
        assert server.headers[-1]["Authorization"] == f"Bearer {secret}"
        assert secret not in repr(backend) and secret not in repr(backend.spec)
    monkeypatch.delenv("CAI_TEST_KEY")
    with pytest.raises(CaiError, match="environment variable CAI_TEST_KEY") as err:
        OpenAIBackend(spec([server.base_url], tiny_model_dir, api_key_env="CAI_TEST_KEY"))
    assert secret not in str(err.value)


def test_load_backend_and_same_model_take_server_specs(model_server, tiny_model_dir):
    raw = {"backend": "openai", "base_urls": [model_server.base_url], "model": "tiny",
           "tokenizer": str(tiny_model_dir)}
    backend = load_backend(raw)
    assert isinstance(backend, OpenAIBackend) and backend.name == "tiny" == spec_name(raw)
    assert same_model(raw, spec([model_server.base_url], tiny_model_dir))
    assert not same_model(raw, str(tiny_model_dir))
    with pytest.raises(CaiError, match="'model.bogus': unknown"):
        load_backend({**raw, "bogus": 1})


# ------------------------------------------------------------------ stages through the server


def _stage_config(tmp_path, server_url: str, tiny_model_dir, **server):
    import yaml

    model = {"backend": "openai", "base_urls": [server_url], "model": "tiny", "tokenizer": str(tiny_model_dir),
             "backoff": 0.01, **server}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({
        "critique_revise": {"model": model, "limit": 3, "rounds": 1, "max_new_tokens": 8,
                            "critique_max_new_tokens": 6, "batch_size": 2},
        "label": {"policy": model, "feedback_model": model, "limit": 3, "max_new_tokens": 8,
                  "method": "contrast", "contrast_temperature": 0.5},
    }))
    return path


def test_critique_revise_and_label_through_a_server_with_an_api_key(tmp_path, tiny_model_dir, model_server,
                                                                     monkeypatch):
    from constitutional.cli import main
    from constitutional.records import read_jsonl

    secret = "sk-never-written-9a8b7c"
    monkeypatch.setenv("CAI_TEST_KEY", secret)
    config = _stage_config(tmp_path, model_server.base_url, tiny_model_dir, api_key_env="CAI_TEST_KEY")
    out = tmp_path / "run"
    assert main(["run", str(config), "--out", str(out), "--stages", "critique_revise,label"]) == 0
    rows = read_jsonl(out / "critique_revise" / "revisions.jsonl")
    assert len(rows) == 3 and all(r["model"] == "tiny" and r["rounds"][0]["critique"] is not None for r in rows)
    labels = read_jsonl(out / "label" / "comparisons.jsonl")
    assert labels and all(r["feedback_model"] == "tiny" and r["policy"] == "tiny" for r in labels)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["critique_revise"]["model"]["api_key_env"] == "CAI_TEST_KEY"
    for path in out.rglob("*"):
        if path.is_file():
            assert secret not in path.read_text(errors="replace"), path


def test_unreachable_server_stage_exits_2_with_one_line_naming_the_url_and_keeps_rows(tmp_path, tiny_model_dir,
                                                                                        capsys):
    from constitutional.cli import main

    url = f"http://127.0.0.1:{free_port()}/v1"
    config = _stage_config(tmp_path, url, tiny_model_dir, retries=2)
    out = tmp_path / "run"
    written = out / "critique_revise" / "revisions.jsonl"
    written.parent.mkdir(parents=True)
    earlier = json.dumps({"id": "rt-earlier", "prompt": "p", "messages": []}) + "\n"
    written.write_text(earlier)
    capsys.readouterr()
    assert main(["critique-revise", "--config", str(config), "--out", str(out)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("cai: error:")]
    assert err == [f"cai: error: critique_revise.model: model server {url} is unreachable (connection refused)"]
    assert written.read_text() == earlier


@pytest.mark.integration
def test_both_backends_give_the_embedded_model_the_same_token_ids(monkeypatch):
    """Rendering and encoding live in backends/template.py alone: with the embedded tokenizer, the ids the
    server is sent equal the ids the in-process model reads, for generation and for scored continuations."""
    from constitutional.backends.hf import HFBackend
    from constitutional.models import resolve_model

    model_dir = resolve_model("smollm2-135m-instruct")
    local = HFBackend(model_dir, batch_size=4)
    chats = [[{"role": "system", "content": "Be safe."}, {"role": "user", "content": "Can I mix bleach and vinegar?"}],
             [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello. How can I help?"},
              {"role": "user", "content": "Name a colour."}],
             [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "I'd say"}]]
    seen_local: list[list[int]] = []
    generate = local._generate_prefix
    monkeypatch.setattr(local, "_generate_prefix",
                        lambda encoded, *a, **k: seen_local.extend(encoded) or generate(encoded, *a, **k))
    score = local.decoder.score
    monkeypatch.setattr(local.decoder, "score", lambda ids, heads: seen_local.extend(ids) or score(ids, heads))
    params = SamplingParams(max_new_tokens=2, temperature=0)
    pairs = [(local.render(chats[0]), "No, never mix them."), (local.render(chats[2]), " blue.")]
    with FakeOpenAIServer(model_dir, name="smol") as server:
        remote = OpenAIBackend(ServerSpec(base_urls=[server.base_url], model="smol", tokenizer=model_dir))
        remote.generate(chats, params)
        remote.logprobs(pairs)
        local.generate(chats, params)
        local.logprobs(pairs)
        sent = [body["prompt"] for body in server.requests]
    assert len(seen_local) == len(chats) + len(pairs)  # three chats generated, two continuations scored
    assert seen_local[:3] == [local._encode(local.render(c)) for c in chats]
    assert all(ids in sent for ids in seen_local)  # the server was sent exactly these ids
    assert local.render(chats[2]).endswith("I'd say")  # an open assistant turn is continued, not closed
