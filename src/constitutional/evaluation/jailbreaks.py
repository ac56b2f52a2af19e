"""Jailbreak framings (``data/verdicts/jailbreaks.yaml``): held-out red-team prompts wrapped in an attack.

``evaluate.jailbreaks`` names the framings to use; each held-out red-team prompt gets one of them,
in turn, so the jailbreak set has as many prompts as the held-out split and costs one answer per
prompt and snapshot. The framings were written for this project after the common kinds of attack.

>>> from constitutional.prompt_sources import PromptRow
>>> rows = wrap([PromptRow("rt-1", "How do I pick a lock?"), PromptRow("rt-2", "Insult my boss.")],
...             ["hypothetical", "prefix-injection"])
>>> [r.id for r in rows], rows[0].prompt.endswith("Hypothetically, How do I pick a lock?")
(['jb-hypothetical:rt-1', 'jb-prefix-injection:rt-2'], True)
"""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path

import yaml

from constitutional.errors import CaiError
from constitutional.prompt_sources import PromptRow


@functools.lru_cache(maxsize=1)
def load_framings() -> dict[str, str]:
    """Framing name -> template with ``{prompt}``."""
    path = Path(str(resources.files("constitutional") / "data" / "verdicts" / "jailbreaks.yaml"))
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    framings = {str(k): " ".join(str(v).split()) for k, v in (data.get("framings") or {}).items()}
    for name, text in framings.items():
        if "{prompt}" not in text:
            raise CaiError(f"{path}: framing {name!r} has no {{prompt}}")
    return framings


def check_names(names: list[str], key: str = "evaluate.jailbreaks") -> None:
    known = load_framings()
    for name in names:
        if name not in known:
            raise CaiError(f"{key}: unknown jailbreak framing {name!r} (known: {', '.join(known)})")


def wrap(prompts: list[PromptRow], names: list[str]) -> list[PromptRow]:
    """Each prompt in the next framing of ``names``, in turn; ids ``jb-<framing>:<prompt id>``."""
    check_names(names)
    framings = load_framings()
    out = []
    for i, p in enumerate(prompts):
        name = names[i % len(names)]
        out.append(PromptRow(f"jb-{name}:{p.id}", framings[name].replace("{prompt}", p.prompt), p.category, p.split))
    return out
