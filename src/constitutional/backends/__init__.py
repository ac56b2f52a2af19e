"""Backends: where completions and log-probabilities come from (see ``base.Backend``).

``load_backend(spec)`` is how every stage gets one: a model spec (the embedded default, a
local directory or a hub id) becomes the in-process transformers backend (``hf.py``).
"""

from __future__ import annotations


def load_backend(spec, *, batch_size: int = 16, device: str = "auto", name: str | None = None):
    """The backend for a model spec, loaded and ready to generate and score."""
    from constitutional.backends.hf import HFBackend
    from constitutional.models import resolve_model

    return HFBackend(resolve_model(spec), batch_size=batch_size, device=device, name=name or str(spec))


def same_model(spec_a, spec_b) -> bool:
    """Whether two specs name the same model (so one loaded backend can serve both)."""
    from constitutional.models import resolve_model

    return resolve_model(spec_a) == resolve_model(spec_b)
