"""Backends: where completions and log-probabilities come from (see ``base.Backend``)."""
