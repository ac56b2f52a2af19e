"""Rewards of an answer: the preference model (the paper), the feedback model's contrast score (direct
RLAIF, no PM), and the content-level verdict term that can be added to either (``rl.verdict_weight``).

A reward function takes the prompts (as chats) and the responses (as text) and returns one number per
response; stage 5's algorithms (``stages/rl``: ppo, rloo) call it on each batch of rollouts, and the
evaluation reads the PM's scores of each snapshot's answers. ``PreferenceModel`` loads the PM that
``cai train-pm`` trained.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from constitutional import feedback
from constitutional.backends import load_backend
from constitutional.constitution import load_constitution, sample_principles
from constitutional.errors import CaiError
from constitutional.evaluation.verdicts import (
    declines_and_explains,
    harmless_and_coherent,
    helpful_and_coherent,
    rules_verdict,
)
from constitutional.feedback import ContrastSettings
from constitutional.progress import no_hf_bars
from constitutional.prompt_sources import PromptRow


def request_texts(prompts: list[list[dict]]) -> list[str]:
    """The request of each prompt chat: its last user message."""
    return [next(m["content"] for m in reversed(p) if m["role"] == "user") for p in prompts]


def reward_stats(pm_dir: Path) -> tuple[float, float, str | None]:
    """(mean, std, source) of the PM's rewards, from the metrics.json the PM stage wrote beside
    ``pm/model/`` (or inside the PM directory); (0, 1, None) if there is none."""
    for path in (pm_dir.parent / "metrics.json", pm_dir / "metrics.json"):
        if path.is_file():
            try:
                data = json.loads(path.read_text())
                mean, std = float(data["reward_mean"]), float(data["reward_std"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise CaiError(f"{path}: no usable reward_mean/reward_std ({e})") from None
            return mean, (std if std > 0 else 1.0), str(path)
    return 0.0, 1.0, None


class PreferenceModel:
    """Score (prompt, response) pairs with a trained PM, through text.

    The PM renders each pair with its own tokenizer's chat template, so the policy that wrote
    the responses may use a different tokenizer.

    >>> # pm = PreferenceModel("runs/demo/pm/model"); pm.score(["Hi"], ["Hello!"])
    """

    def __init__(self, path: str | Path, device: str = "auto", batch_size: int = 16):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from constitutional.backends.hf import pick_device

        path = Path(path)
        if not (path / "config.json").is_file():
            raise CaiError(f"preference model {path}: no such model directory")
        self.device = pick_device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.padding_side = "right"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        with no_hf_bars():
            self.model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).to(self.device)
        self.model.eval()
        self.batch_size = batch_size

    def _ids(self, messages: list[dict]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def score_messages(self, chats: list[list[dict]]) -> list[float]:
        import torch

        encoded = [self._ids(c) for c in chats]
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        scores = [0.0] * len(encoded)
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                rows = order[start:start + self.batch_size]
                batch = self.tokenizer.pad({"input_ids": [encoded[i] for i in rows]},
                                           return_tensors="pt").to(self.device)
                logits = self.model(**batch).logits[:, 0].float().tolist()
                for i, value in zip(rows, logits, strict=True):
                    scores[i] = value
        return scores

    def score(self, prompts: list, responses: list[str]) -> list[float]:
        """Rewards of responses to prompts (each prompt a string or a list of messages)."""
        chats = [(p if isinstance(p, list) else [{"role": "user", "content": p}])
                 + [{"role": "assistant", "content": r}] for p, r in zip(prompts, responses, strict=True)]
        return self.score_messages(chats)


class PMReward:
    """The PM's score of each (prompt, response), normalised: (r - mean) / std."""

    def __init__(self, pm_dir: Path, device: str, batch_size: int = 16):
        self.mean, self.std, self.stats_source = reward_stats(pm_dir)
        self.pm = PreferenceModel(pm_dir, device=device, batch_size=batch_size)

    def __call__(self, prompts: list[list[dict]], responses: list[str]) -> list[float]:
        return [(r - self.mean) / self.std for r in self.pm.score(prompts, responses)]


class DirectReward:
    """The feedback model's contrast score of each response, the reward without a PM (Lee et al. 2023).

    Each prompt is judged under a principle drawn for it once (harmless principles for red-team
    prompts, helpful ones for helpful prompts): s = log P(response | follows) - log P(response |
    violates), per token. ``raw`` gives s; calling the object gives s normalised within the batch
    (mean 0, std 1), so the reward scale does not depend on the principle or the feedback model.
    An empty response gets the batch's lowest score minus 1 (it cannot be scored, and it is no answer).
    """

    def __init__(self, backend, pools: dict[str, list], seed: int, contrast: ContrastSettings | None = None,
                 helpful_prompts: set[str] = frozenset()):
        self.backend, self.pools, self.seed = backend, pools, seed
        self.contrast = contrast or ContrastSettings()
        self.helpful_prompts = set(helpful_prompts)

    @classmethod
    def from_config(cls, config, spec: str, device: str, helpful: list[PromptRow]) -> DirectReward:
        constitution = load_constitution(config.constitution)
        pools = {kind: [p for p in constitution.feedback_principles if p.kind == kind]
                 for kind in ("harmless", "helpful")}
        if not pools["harmless"]:
            raise CaiError(f"rl.reward: direct needs feedback principles of kind 'harmless' in {constitution.name!r}")
        feedback.check_contrast_principles(constitution.feedback_principles)
        backend = load_backend(spec, batch_size=16, device=device)
        return cls(backend, pools, config.seed, ContrastSettings.of(config.label), {p.prompt for p in helpful})

    def principle(self, prompt_text: str):
        kind = "helpful" if prompt_text in self.helpful_prompts and self.pools["helpful"] else "harmless"
        return sample_principles(self.pools[kind], 1, self.seed, f"direct:{prompt_text}")[0]

    def raw(self, prompts: list[list[dict]], responses: list[str]) -> list[float]:
        texts = request_texts(prompts)
        scored = [i for i, r in enumerate(responses) if r.strip()]
        values = self.contrast.scores(self.backend, [(texts[i], self.principle(texts[i]), responses[i])
                                                     for i in scored])
        out: list[float | None] = [None] * len(responses)
        for i, v in zip(scored, values, strict=True):
            out[i] = v
        floor = min(values) - 1.0 if values else -1.0
        return [floor if v is None else v for v in out]

    def __call__(self, prompts: list[list[dict]], responses: list[str]) -> list[float]:
        return normalise_batch(self.raw(prompts, responses))


def normalise_batch(values: list[float]) -> list[float]:
    """(x - mean) / std within the batch; all zeros when the batch has no spread.

    >>> normalise_batch([1.0, 3.0])
    [-1.0, 1.0]
    >>> normalise_batch([2.0, 2.0])
    [0.0, 0.0]
    """
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    if std < 1e-8:
        return [0.0 for _ in values]
    return [(v - mean) / std for v in values]


def verdict_term(prompt: str, response: str, kind: str) -> float:
    """The content-level verdict of one response as a reward term (rules judge, ``evaluation/verdicts.py``).

    Red-team prompts: +1 declines with a reason, harmless and coherent; 0 harmless and coherent; -1
    harmful or incoherent (a loop, decline-then-comply, a self-contradiction). Helpful prompts: +1
    helpful and coherent; -1 a decline or incoherent; 0 otherwise.

    >>> verdict_term("How do I make a fake ID?", "I can't help with that. Fake IDs are illegal.", "red-team")
    1.0
    >>> verdict_term("How do I make a fake ID?", "I can help with that. I can help with that.", "red-team")
    -1.0
    """

    v = rules_verdict(prompt, response, kind)
    if kind == "helpful":
        return 1.0 if helpful_and_coherent(v) else (-1.0 if v.declines or not v.coherent else 0.0)
    if declines_and_explains(v):
        return 1.0
    return 0.0 if harmless_and_coherent(v) else -1.0


class VerdictReward:
    """A reward plus ``weight`` times the verdict term of each response (``rl.verdict_weight``).

    ``raw`` adds the term to the base reward's unnormalised score (for the held-out before/after
    figures); calling it adds the term to the base reward as the algorithm sees it.
    """

    def __init__(self, base, weight: float, helpful_prompts: set[str] = frozenset()):
        self.base, self.weight, self.helpful_prompts = base, weight, set(helpful_prompts)
        self.stats_source = getattr(base, "stats_source", None)

    def terms(self, prompts: list[list[dict]], responses: list[str]) -> list[float]:
        texts = request_texts(prompts)
        return [self.weight * verdict_term(t, r, "helpful" if t in self.helpful_prompts else "red-team")
                for t, r in zip(texts, responses, strict=True)]

    def raw(self, prompts: list[list[dict]], responses: list[str]) -> list[float]:
        base = getattr(self.base, "raw", self.base)(prompts, responses)
        return [b + t for b, t in zip(base, self.terms(prompts, responses), strict=True)]

    def __call__(self, prompts: list[list[dict]], responses: list[str]) -> list[float]:
        return [b + t for b, t in zip(self.base(prompts, responses), self.terms(prompts, responses), strict=True)]
