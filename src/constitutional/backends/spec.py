"""The spec of a model behind an OpenAI-compatible HTTP server, and how a mapping becomes one.

Configs (``config.py``) take it as any generation or scoring model field; ``backends.load_backend`` turns
it into an :class:`~constitutional.backends.openai.OpenAIBackend`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from constitutional.typed import build, require


@dataclass
class ServerSpec:
    """A model behind an OpenAI-compatible HTTP server (vLLM above all); see ``backends/openai.py``.

    Any generation or labelling model field (``ModelSpec``) takes one as a mapping, e.g.
    ``{backend: openai, base_urls: [http://127.0.0.1:8000/v1], model: smollm2-135m-instruct}``.
    Training stages need local weights and refuse it.

    backend: must be ``openai``.
    base_urls: server URLs ending in ``/v1``; each request goes to the one with the fewest requests in flight.
    model: the model name the servers serve (vLLM's ``--served-model-name``); also written into rows.
    tokenizer: where the tokenizer and chat template come from, so chats are rendered here exactly as
        the in-process backend renders them (a local directory, an embedded model's name or a hub id;
        None: ``model``).
    api_key_env: name of the environment variable that holds the API key (None: send no key). The key
        itself is never logged or written to any file.
    max_in_flight: requests sent at once, over all base_urls.
    timeout: seconds to wait for one response before retrying it.
    retries: retries of a request after a timeout, a connection error, HTTP 5xx, 408 or 429; other 4xx
        answers fail at once.
    backoff: seconds before the first retry, doubled after each, at most 30.
    prompt_format: ``tokens`` (token ids, exactly the in-process tokens: vLLM, llama.cpp) or ``text`` (the
        rendered text, for servers that take only strings; they may tokenise it differently).
    """

    backend: str = "openai"
    base_urls: list[str] = field(default_factory=list)
    model: str = ""
    tokenizer: str | None = None
    api_key_env: str | None = None
    max_in_flight: int = 32
    timeout: float = 600.0
    retries: int = 6
    backoff: float = 1.0
    prompt_format: str = "tokens"

    def check(self, key: str) -> None:
        require(self.backend == "openai", f"{key}.backend", "must be openai (the only server backend)")
        require(bool(self.base_urls), f"{key}.base_urls", "needs at least one URL, e.g. http://127.0.0.1:8000/v1")
        for url in self.base_urls:
            require(url.startswith(("http://", "https://")), f"{key}.base_urls",
                     f"{url!r} is not an http:// or https:// URL")
        require(bool(self.model), f"{key}.model", "needs the name the server serves the model under")
        require(self.api_key_env is None or self.api_key_env.isidentifier(), f"{key}.api_key_env",
                 "must be the name of an environment variable (not the key itself)")
        require(self.max_in_flight >= 1, f"{key}.max_in_flight", "must be at least 1")
        require(self.timeout > 0, f"{key}.timeout", "must be more than 0")
        require(self.retries >= 0 and self.backoff >= 0, f"{key}.retries", "retries and backoff must be 0 or more")
        require(self.prompt_format in ("tokens", "text"), f"{key}.prompt_format", "must be tokens or text")


def as_server_spec(spec):
    """``spec`` as a :class:`ServerSpec` if it names a server (a ServerSpec or a mapping), else None."""
    if isinstance(spec, ServerSpec):
        return spec
    if isinstance(spec, dict):
        server = build(ServerSpec, spec, "model.")
        server.check("model")
        return server
    return None
