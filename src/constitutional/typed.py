"""Typed dataclasses built from plain mappings (parsed YAML), with one clear error naming the key.

``config.py`` builds the whole pipeline config with it, and ``backends`` a server spec given as a mapping.

>>> from dataclasses import dataclass
>>> @dataclass
... class Demo:
...     steps: int = 1
>>> build(Demo, {"steps": 3}, "demo.")
Demo(steps=3)
>>> build(Demo, {"step": 3}, "demo.")
Traceback (most recent call last):
constitutional.errors.CaiError: config key 'demo.step': unknown (known: steps)
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing

from constitutional.errors import CaiError


def require(ok: bool, key: str, message: str) -> None:
    """Raise ``config key 'KEY': MESSAGE`` unless ``ok``."""
    if not ok:
        raise CaiError(f"config key '{key}': {message}")


def build(cls, data, prefix: str):
    if not isinstance(data, dict):
        raise CaiError(f"config key '{prefix.rstrip('.') or 'top level'}': expected a mapping, "
                       f"got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise CaiError(f"config key '{prefix}{key}': unknown (known: {', '.join(sorted(names))})")
        kwargs[key] = coerce(value, hints[key], f"{prefix}{key}")
        check_number(kwargs[key], f"{prefix}{key}")
        if key == "device":
            require(re.fullmatch(r"auto|cpu|mps|(?:cuda|xpu|hpu|npu)(?::\d+)?", str(kwargs[key])) is not None,
                     f"{prefix}{key}", f"expected auto, cpu, cuda, cuda:N, mps, xpu, hpu or npu, got {kwargs[key]!r}")
    return cls(**kwargs)


# numeric fields that must be more than 0 (a count, a size, a rate); every other number must be 0 or more
POSITIVE = frozenset({
    "batch_size", "generate_batch_size", "minibatch_size", "max_new_tokens", "helpful_max_new_tokens",
    "critique_max_new_tokens", "cot_max_new_tokens", "limit", "helpful_limit", "max_steps", "save_steps", "steps",
    "epochs", "ppo_epochs", "learning_rate", "max_length", "lora_r", "lora_alpha", "prompts_per_step",
    "rloo_generations", "bootstrap_samples", "judge_pairs", "timeout", "max_in_flight",
    "gradient_accumulation_steps", "ensemble", "contrast_max_tokens", "top_p", "candidates",
    "initial_candidates", "helpful_candidates", "contrast_temperature", "target_sentences"})


def check_number(value, key: str) -> None:
    """Every number in a config is finite and not negative; those in ``POSITIVE`` more than 0.

    >>> check_number(float("inf"), "label.temperature")
    Traceback (most recent call last):
    constitutional.errors.CaiError: config key 'label.temperature': must be a finite number, got inf
    >>> check_number(-1, "label.helpful_limit")
    Traceback (most recent call last):
    constitutional.errors.CaiError: config key 'label.helpful_limit': must be more than 0 (null: no limit), got -1
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        return
    require(math.isfinite(value), key, f"must be a finite number, got {value}")
    name = key.rsplit(".", 1)[-1]
    if name in POSITIVE:
        hint = " (null: no limit)" if name.endswith("limit") else ""
        require(value > 0, key, f"must be more than 0{hint}, got {value}")
    else:
        require(value >= 0, key, f"must be 0 or more, got {value}")


def coerce(value, hint, key: str):
    if dataclasses.is_dataclass(hint):
        return build(hint, value, key + ".")
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce(value, option, key)
            except CaiError:
                if isinstance(value, dict) and dataclasses.is_dataclass(option):
                    raise  # a mapping meant for this section: its own error names the inner key
                continue
        refuse_server(value, key)
        raise CaiError(f"config key '{key}': expected {type_name(hint)}, got {value!r}")
    if origin is dict:
        key_type, value_type = typing.get_args(hint)
        if not isinstance(value, dict):
            raise CaiError(f"config key '{key}': expected a mapping, got {value!r}")
        return {coerce(k, key_type, f"{key}"): coerce(v, value_type, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        (item_type,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise CaiError(f"config key '{key}': expected a list, got {value!r}")
        return [coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        # YAML 1.1 reads 1e-5 (no dot) as a string; take it as the number it is.
        try:
            return float(value)
        except ValueError:
            pass
    if hint in (int, float, str, bool) and (type(value) is hint):
        return value
    refuse_server(value, key)
    raise CaiError(f"config key '{key}': expected {type_name(hint)}, got {value!r}")


def refuse_server(value, key: str) -> None:
    if isinstance(value, dict) and "backend" in value:
        raise CaiError(f"config key '{key}': a model server cannot be used here (this stage trains or "
                       f"loads weights, which needs a local model directory)")


def type_name(hint) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(type_name(h) for h in typing.get_args(hint))
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", str(hint))
