"""Backends: where completions and log-probabilities come from (see ``base.Backend``).

``load_backend(spec)`` is how every stage gets one: a model spec (the embedded default, a
local directory or a hub id) becomes the in-process transformers backend (``hf.py``); a server
spec (``spec.ServerSpec``: ``{backend: openai, base_urls: [...], model: NAME}``) becomes the
HTTP backend of ``openai.py``.
"""

from __future__ import annotations

from constitutional.backends.openai import OpenAIBackend
from constitutional.backends.spec import ServerSpec, as_server_spec
from constitutional.models import resolve_model

__all__ = ["ServerSpec", "as_server_spec", "load_backend", "same_model", "spec_name"]


def load_backend(spec, *, batch_size: int = 16, device: str = "auto", name: str | None = None):
    """The backend for a model spec, loaded and ready to generate and score.

    ``batch_size`` and ``device`` apply to the in-process backend; a server batches by itself
    (up to the spec's ``max_in_flight`` requests at once).
    """
    server = as_server_spec(spec)
    if server is not None:
        return OpenAIBackend(server, name=name)
    from constitutional.backends.hf import HFBackend  # torch and transformers: only when a model is loaded

    return HFBackend(resolve_model(spec), batch_size=batch_size, device=device, name=name or str(spec))


def same_model(spec_a, spec_b) -> bool:
    """Whether two specs name the same model (so one loaded backend can serve both)."""
    server_a, server_b = as_server_spec(spec_a), as_server_spec(spec_b)
    if server_a is not None or server_b is not None:
        return (server_a is not None and server_b is not None and server_a.model == server_b.model
                and sorted(server_a.base_urls) == sorted(server_b.base_urls))
    return resolve_model(spec_a) == resolve_model(spec_b)


def spec_name(spec) -> str:
    """How rows, summaries and resume settings name a model: the spec itself, or a server's model name.

    >>> spec_name("smollm2-135m-instruct")
    'smollm2-135m-instruct'
    >>> spec_name({"backend": "openai", "base_urls": ["http://127.0.0.1:8000/v1"], "model": "m"})
    'm'
    """
    server = as_server_spec(spec)
    return server.model if server is not None else str(spec)
