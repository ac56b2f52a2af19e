"""Backends: where completions and log-probabilities come from (see ``base.Backend``).

``load_backend(spec)`` is how every stage gets one: a model spec (the embedded default, a
local directory or a hub id) becomes the in-process transformers backend (``hf.py``); a server
spec (``config.ServerSpec``: ``{backend: openai, base_urls: [...], model: NAME}``) becomes the
HTTP backend of ``openai.py``.
"""

from __future__ import annotations


def load_backend(spec, *, batch_size: int = 16, device: str = "auto", name: str | None = None):
    """The backend for a model spec, loaded and ready to generate and score.

    ``batch_size`` and ``device`` apply to the in-process backend; a server batches by itself
    (up to the spec's ``max_in_flight`` requests at once).
    """
    server = as_server_spec(spec)
    if server is not None:
        from constitutional.backends.openai import OpenAIBackend

        return OpenAIBackend(server, name=name)
    from constitutional.backends.hf import HFBackend
    from constitutional.models import resolve_model

    return HFBackend(resolve_model(spec), batch_size=batch_size, device=device, name=name or str(spec))


def as_server_spec(spec):
    """``spec`` as a ``config.ServerSpec`` if it names a server (a ServerSpec or a mapping), else None."""
    from constitutional.config import ServerSpec, _build

    if isinstance(spec, ServerSpec):
        return spec
    if isinstance(spec, dict):
        server = _build(ServerSpec, spec, "model.")
        server.check("model")
        return server
    return None


def same_model(spec_a, spec_b) -> bool:
    """Whether two specs name the same model (so one loaded backend can serve both)."""
    from constitutional.models import resolve_model

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
