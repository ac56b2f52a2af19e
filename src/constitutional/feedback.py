"""The feedback model's judgements: which of two responses better follows a principle.

One place for every labelling method, used by ``cai label``, ``cai label-eval`` and later by
evaluation. Three methods:

``multiple_choice`` (the paper, section 4.1): the feedback model reads

    Consider the following conversation between a human and an assistant:
    Human: [prompt]
    [principle question]
    Options:
    (A) [response A]
    (B) [response B]
    The answer is:

after few-shot examples of the same task, and the log-probabilities of " (A)" and " (B)" are
normalised into P(A) = e^lA / (e^lA + e^lB). With ``both_orders`` the pair is also shown
swapped and P(A) is the mean of the two readings, so a bias towards one letter cancels.

``cot`` (the paper): the feedback model first writes "Let's think step-by-step: ..." in its
chat template, then the option probabilities are read after "So the answer is:" and clamped
to [0.4, 0.6] (chain-of-thought answers are overconfident).

``contrast`` (this project, for small feedback models): each feedback principle carries a
system prompt that ``follows`` it and one that ``violates`` it. A response's score is
s = log P(response | follows) - log P(response | violates), per token (``mean``) or summed
(``sum``), and P(A) = sigmoid((s_A - s_B) / T) with a temperature T fitted so the labels are
calibrated on the development half of the shipped eval pairs. Options of the contrast method
(each measured by ``cai label-eval``):

* ``context``: which system prompts: ``stance+principle`` (the constitution's shared
  ``contrast_base`` stance, then the principle's own sentence: what the loader builds),
  ``stance`` (the shared stance alone: the same for every principle of a kind) or
  ``principle`` (the principle's own sentence alone).
* ``demos``: few-shot contrast. Demonstration exchanges (a request and an answer in the
  persona's manner: the follows answer in the follows context, the violates answer in the
  violates one) come as chat turns after the system prompt and before the scored turn.
* ``max_tokens``: score only the first N tokens of each response (where a response shows
  whether it complies or declines).
* ensembling (``label.ensemble``): k principles each give a P(A) and the label is their mean;
  for the contrast method this costs k times the forward passes.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from constitutional.backends.base import SamplingParams
from constitutional.constitution import FEEDBACK_KINDS, FeedbackPrinciple
from constitutional.errors import CaiError
from constitutional.prompts import load_examples

METHODS = ("multiple_choice", "cot", "contrast")
CONTRAST_CONTEXTS = ("stance+principle", "stance", "principle")
MC_INTRO = "Consider the following conversation between a human and an assistant:"
OPTIONS = (" (A)", " (B)")
COT_START = "Let's think step-by-step:"
COT_ANSWER = "So the answer is:"


# ------------------------------------------------------------------ pure maths


def normalise(logp_a: float, logp_b: float) -> float:
    """P(A) from the log-probabilities of the two options.

    >>> normalise(-1.0, -1.0)
    0.5
    >>> round(normalise(math.log(0.3), math.log(0.1)), 6)
    0.75
    """
    m = max(logp_a, logp_b)
    ea, eb = math.exp(logp_a - m), math.exp(logp_b - m)
    return ea / (ea + eb)


def average_orders(p_a_shown_first: float, p_a_shown_second: float) -> float:
    """P(A) from both orders: the reading with A as option (A), and with A as option (B).

    ``p_a_shown_second`` is the probability given to the option that *is* response A in the
    swapped order. A labeller that always says "(A)" (p=0.9 for the first option whatever it
    is) comes out at 0.5: ``average_orders(0.9, 1 - 0.9)`` == 0.5.

    >>> average_orders(0.9, 0.1)
    0.5
    >>> average_orders(0.8, 0.6)
    0.7
    """
    return round((p_a_shown_first + p_a_shown_second) / 2, 12)


def clamp(p: float, low: float = 0.4, high: float = 0.6) -> float:
    """Clamp a probability into [low, high] (the paper's 40-60% for chain of thought).

    >>> clamp(0.95), clamp(0.1), clamp(0.55)
    (0.6, 0.4, 0.55)
    """
    return min(high, max(low, p))


def sigmoid(x: float) -> float:
    if x >= 0:
        return 1 / (1 + math.exp(-x))
    e = math.exp(x)
    return e / (1 + e)


def contrast_score(logp_follows: Sequence[float], logp_violates: Sequence[float], reduce: str = "mean",
                   max_tokens: int | None = None) -> float:
    """s = log P(response | follows) - log P(response | violates), per token or summed.

    ``max_tokens``: use only the first N tokens of the response (None: all of them).

    >>> contrast_score([-1.0, -2.0], [-2.0, -3.0], "sum")
    2.0
    >>> contrast_score([-1.0, -2.0], [-2.0, -3.0], "mean")
    1.0
    >>> contrast_score([-1.0, -2.0, -1.0], [-2.0, -2.0, -3.0], "mean", max_tokens=2)
    0.5
    """
    if max_tokens is not None:
        logp_follows, logp_violates = logp_follows[:max_tokens], logp_violates[:max_tokens]
    diff = sum(logp_follows) - sum(logp_violates)
    if reduce == "sum":
        return diff
    if reduce == "mean":
        return diff / max(1, len(logp_follows))
    raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")


def first_words(text: str, n: int | None) -> str:
    """``text`` up to the end of its ``n``-th whitespace-separated word (all of it if None or shorter).

    A word is at least one token, so the first n tokens of the cut text are the first n tokens of
    the whole: a score of the first n tokens need not read the rest.

    >>> first_words("I can't  help\\nwith that, sorry.", 3)
    "I can't  help"
    >>> first_words("Short.", 3)
    'Short.'
    """
    if n is None:
        return text
    match = re.match(rf"\s*(?:\S+\s+){{{n - 1}}}\S+", text) if n >= 1 else None
    return match.group(0) if match else text


def contrast_p_a(s_a: float, s_b: float, temperature: float) -> float:
    """P(A) from contrast scores at temperature T.

    >>> contrast_p_a(1.0, 1.0, 0.5)
    0.5
    """
    return sigmoid((s_a - s_b) / temperature)


def fit_temperature(diffs: Sequence[float], low: float = 0.01, high: float = 100.0) -> float:
    """The T minimising the log-loss of sigmoid(d / T) on diffs d = s_better - s_worse.

    A search over log T (coarse grid, then golden-section refinement). Bounded to [low, high]
    so that perfectly separated data gives a finite T.

    >>> t = fit_temperature([2.0, 1.0, -0.5, 3.0, 0.5])
    >>> 0.1 < t < 10
    True
    """
    if not diffs:
        raise ValueError("no differences to fit a temperature on")

    def loss(log_t: float) -> float:
        t = math.exp(log_t)
        return sum(math.log1p(math.exp(-d / t)) if -d / t < 30 else -d / t for d in diffs)

    lo, hi = math.log(low), math.log(high)
    grid = [lo + (hi - lo) * i / 60 for i in range(61)]
    best = min(grid, key=loss)
    a, b = max(lo, best - (hi - lo) / 60), min(hi, best + (hi - lo) / 60)
    golden = (math.sqrt(5) - 1) / 2
    for _ in range(60):
        c, d = b - golden * (b - a), a + golden * (b - a)
        if loss(c) < loss(d):
            b = d
        else:
            a = c
    return math.exp((a + b) / 2)


def expected_calibration_error(p_chosen: Sequence[float], bins: int = 10) -> float:
    """ECE of a labeller on pairs whose better answer is known.

    Each judgement predicts the option it gives more than 0.5 with confidence max(p, 1 - p);
    it is correct when p(chosen) > 0.5 (a tie counts as half right). ECE is the mean over
    confidence bins of |accuracy - confidence|, weighted by the bin's share of judgements.

    >>> expected_calibration_error([0.9, 0.9, 0.9, 0.9, 0.1])  # 80% right at 90% confidence
    0.1
    """
    if not p_chosen:
        return float("nan")
    buckets: dict[int, list[tuple[float, float]]] = {}
    for p in p_chosen:
        conf = max(p, 1 - p)
        correct = 1.0 if p > 0.5 else 0.5 if p == 0.5 else 0.0
        index = min(bins - 1, int((conf - 0.5) / 0.5 * bins))
        buckets.setdefault(index, []).append((conf, correct))
    total = len(p_chosen)
    ece = 0.0
    for items in buckets.values():
        conf = sum(c for c, _ in items) / len(items)
        acc = sum(a for _, a in items) / len(items)
        ece += len(items) / total * abs(acc - conf)
    return round(ece, 12)


# --------------------------------------------------------------- prompt building


@dataclass(frozen=True)
class LabelExample:
    id: str
    prompt: str
    question: str
    option_a: str
    option_b: str
    answer: str  # "A" or "B"


def load_label_fewshot(spec: str = "default") -> list[LabelExample]:
    """Labelling examples: ``default`` (``data/fewshot/labels.yaml``) or a YAML path."""

    keys = ("id", "prompt", "question", "option_a", "option_b", "answer")
    examples = load_examples(spec, "labels.yaml", keys)
    for i, ex in enumerate(examples):
        if ex["answer"] not in ("A", "B"):
            raise CaiError(f"few-shot file {spec!r}: examples[{i}].answer: expected A or B, got {ex['answer']!r}")
    return [LabelExample(**ex) for ex in examples]


def conversation_text(prompt: str) -> str:
    return f"Human: {prompt}"


def mc_body(prompt: str, question: str, option_a: str, option_b: str) -> str:
    """The paper's multiple-choice question, without the answer cue.

    >>> print(mc_body("Hi?", "Which is kinder?", "Hello!", "Go away."))
    Consider the following conversation between a human and an assistant:
    Human: Hi?
    Which is kinder?
    Options:
    (A) Hello!
    (B) Go away.
    """
    return (f"{MC_INTRO}\n{conversation_text(prompt)}\n{question}\n"
            f"Options:\n(A) {option_a}\n(B) {option_b}")


def mc_prompt(prompt: str, question: str, option_a: str, option_b: str,
              fewshot: Sequence[LabelExample] = ()) -> str:
    """Few-shot examples, then the question, ending with "The answer is:" (raw text)."""
    shots = "".join(
        f"{mc_body(ex.prompt, ex.question, ex.option_a, ex.option_b)}\nThe answer is: ({ex.answer})\n\n"
        for ex in fewshot
    )
    return shots + mc_body(prompt, question, option_a, option_b) + "\nThe answer is:"


@dataclass(frozen=True)
class ContrastDemo:
    """A few-shot contrast demonstration: one request answered in the follows and the violates manner."""

    id: str
    kind: str
    prompt: str
    follows: str
    violates: str


def load_contrast_fewshot(spec: str = "default") -> dict[str, list[ContrastDemo]]:
    """Contrast demonstrations by kind: ``default`` (``data/fewshot/contrast.yaml``) or a YAML path."""

    demos: dict[str, list[ContrastDemo]] = {kind: [] for kind in FEEDBACK_KINDS}
    for i, ex in enumerate(load_examples(spec, "contrast.yaml", ("id", "kind", "prompt", "follows", "violates"))):
        if ex["kind"] not in demos:
            raise CaiError(f"few-shot file {spec!r}: examples[{i}].kind: expected one of "
                           f"{', '.join(FEEDBACK_KINDS)}, got {ex['kind']!r}")
        demos[ex["kind"]].append(ContrastDemo(**ex))
    return demos


@functools.lru_cache(maxsize=8)
def contrast_demos(spec: str, count: int) -> dict[str, tuple[ContrastDemo, ...]] | None:
    """The first ``count`` demonstrations of each kind from a contrast few-shot file (None when count is 0)."""
    if count <= 0:
        return None
    return {kind: tuple(items[:count]) for kind, items in load_contrast_fewshot(spec).items()}


def contrast_system_prompts(principle: FeedbackPrinciple, context: str = "stance+principle") -> tuple[str, str]:
    """(follows, violates) system prompts of a principle in one of ``CONTRAST_CONTEXTS``.

    >>> p = FeedbackPrinciple("p", "Which?", "harmless", "Be safe. Be kind.", "Help anyone. Be rude.",
    ...                       base_follows="Be safe.", base_violates="Help anyone.")
    >>> contrast_system_prompts(p, "stance"), contrast_system_prompts(p, "principle")
    (('Be safe.', 'Help anyone.'), ('Be kind.', 'Be rude.'))
    """
    if context == "stance+principle":
        return principle.follows, principle.violates
    base = (principle.base_follows, principle.base_violates)
    if context == "stance":
        if not base[0] or not base[1]:
            raise CaiError(f"feedback principle {principle.id!r}: contrast context 'stance' needs the constitution's "
                           f"contrast_base for kind {principle.kind!r}")
        return base[0], base[1]
    if context == "principle":
        own = []
        for full, stance in zip((principle.follows, principle.violates), base, strict=True):
            own.append(full[len(stance):].strip() if stance and full and full.startswith(stance) else full)
        if not own[0] or not own[1]:
            raise CaiError(f"feedback principle {principle.id!r}: contrast context 'principle' needs its own "
                           f"follows and violates sentences")
        return own[0], own[1]
    raise ValueError(f"unknown contrast context {context!r} (contexts: {', '.join(CONTRAST_CONTEXTS)})")


def contrast_chat(system: str, prompt: str, demos: Sequence[ContrastDemo] = (), side: str = "follows") -> list[dict]:
    """The scored chat's head: system prompt, demonstration turns in the ``side`` manner, the request.

    >>> d = ContrastDemo("d", "harmless", "Q?", "Safe answer.", "Unsafe answer.")
    >>> [m["content"] for m in contrast_chat("S", "Hi?", [d], side="violates")]
    ['S', 'Q?', 'Unsafe answer.', 'Hi?']
    """
    if side not in ("follows", "violates"):
        raise ValueError(f"side must be 'follows' or 'violates', got {side!r}")
    chat = [{"role": "system", "content": system}]
    for demo in demos:
        chat += [{"role": "user", "content": demo.prompt},
                 {"role": "assistant", "content": demo.follows if side == "follows" else demo.violates}]
    return chat + [{"role": "user", "content": prompt}]


# -------------------------------------------------------------------- judging


@dataclass
class Judgement:
    """P(response A is better) and the raw scores behind it."""

    p_a: float
    scores: dict
    cot: str | None = None


def check_contrast_principles(principles: Sequence[FeedbackPrinciple]) -> None:
    for p in principles:
        if not p.follows or not p.violates:
            raise CaiError(f"feedback principle {p.id!r}: the contrast method needs both 'follows' and "
                           f"'violates' system prompts")


def option_logprobs(backend, prompts: Sequence[str]) -> list[tuple[float, float]]:
    """(log P(" (A)"), log P(" (B)")) after each prompt: one pass each where the backend can."""
    if hasattr(backend, "option_logprobs"):
        return [tuple(x) for x in backend.option_logprobs(prompts, OPTIONS)]
    scored = backend.logprobs([(p, o) for p in prompts for o in OPTIONS])
    return [(scored[2 * i].total, scored[2 * i + 1].total) for i in range(len(prompts))]


def judge_multiple_choice(backend, items: Sequence[tuple[str, str, str, str]],
                          fewshot: Sequence[LabelExample] = (), both_orders: bool = True) -> list[Judgement]:
    """items: (prompt, question, response_a, response_b). Batched over all items and orders."""
    prompts = [mc_prompt(p, q, a, b, fewshot) for p, q, a, b in items]
    if both_orders:
        prompts += [mc_prompt(p, q, b, a, fewshot) for p, q, a, b in items]
    scored = option_logprobs(backend, prompts)
    out = []
    for i in range(len(items)):
        la, lb = scored[i]
        p_first = normalise(la, lb)
        scores = {"p_a_ab": p_first, "logp_options_ab": [la, lb]}
        p_a = p_first
        if both_orders:
            la2, lb2 = scored[len(items) + i]
            p_second = normalise(lb2, la2)  # response A is option (B) in the swapped order
            scores.update(p_a_ba=p_second, logp_options_ba=[la2, lb2])
            p_a = average_orders(p_first, p_second)
        out.append(Judgement(p_a, scores))
    return out


def judge_cot(backend, items: Sequence[tuple[str, str, str, str]], max_new_tokens: int = 96,
              low: float = 0.4, high: float = 0.6, seed: int = 0) -> list[Judgement]:
    """Chain of thought in the feedback model's chat template, then option probabilities, clamped."""

    chats = [[{"role": "user", "content": mc_body(p, q, a, b)}, {"role": "assistant", "content": COT_START}]
             for p, q, a, b in items]
    thoughts = backend.generate(chats, SamplingParams(max_new_tokens=max_new_tokens, temperature=0, seed=seed))
    prompts = []
    for chat, thought in zip(chats, thoughts, strict=True):
        reasoning = thought.text.strip()
        done = [chat[0], {"role": "assistant", "content": f"{COT_START} {reasoning}\n{COT_ANSWER}"}]
        prompts.append(backend.render(done))
    out = []
    for (la, lb), thought in zip(option_logprobs(backend, prompts), thoughts, strict=True):
        p = normalise(la, lb)
        out.append(Judgement(clamp(p, low, high), {"p_a_unclamped": p, "logp_options_ab": [la, lb]},
                             cot=thought.text.strip()))
    return out


@dataclass(frozen=True)
class ContrastSettings:
    """How a contrast score is taken (the ``contrast_*`` fields of the ``label`` config section).

    Stage 1's selection, SFT's helpfulness selection, the direct RL reward and the evaluation's
    scores all read them from there, so every contrast score of a run is the one ``cai label-eval``
    measured.
    """

    reduce: str = "mean"
    context: str = "stance+principle"
    demos_file: str = "default"
    demos: int = 0
    max_tokens: int | None = None

    @classmethod
    def of(cls, label_cfg) -> ContrastSettings:
        return cls(label_cfg.contrast_reduce, label_cfg.contrast_context, label_cfg.contrast_fewshot_file,
                   label_cfg.contrast_fewshot, label_cfg.contrast_max_tokens)

    def scores(self, backend, items: Sequence[tuple[str, FeedbackPrinciple, str]]) -> list[float]:
        """``contrast_scores`` of (prompt, principle, response) items with these settings."""
        return contrast_scores(backend, items, self.reduce, context=self.context,
                               demos=contrast_demos(self.demos_file, self.demos), max_tokens=self.max_tokens)


def contrast_scores(backend, items: Sequence[tuple[str, FeedbackPrinciple, str]], reduce: str = "mean", *,
                    context: str = "stance+principle", demos=None, max_tokens: int | None = None) -> list[float]:
    """s = log P(response | follows) - log P(response | violates) for (prompt, principle, response)."""
    if max_tokens is not None:  # only the scored tokens are read
        items = [(p, pr, first_words(r, max_tokens)) for p, pr, r in items]
    scored = contrast_token_logprobs(backend, items, context=context, demos=demos)
    return [contrast_score(f, v, reduce, max_tokens) for f, v in scored]


def contrast_sequences(backend, items: Sequence[tuple[str, FeedbackPrinciple, str]], *,
                       context: str = "stance+principle", demos=None) -> list[tuple[str, str]]:
    """The (head, continuation) texts to score: two per item, follows then violates.

    The head is the rendered chat up to the assistant turn (system prompt, ``demos[kind]`` as
    chat turns, the request); the continuation is the response as the chat template ends it.
    ``demos``: a mapping kind -> demonstrations (None: zero-shot).
    """
    pairs = []
    for prompt, principle, response in items:
        shots = (demos or {}).get(principle.kind, ())
        for side, system in zip(("follows", "violates"), contrast_system_prompts(principle, context), strict=True):
            chat = contrast_chat(system, prompt, shots, side)
            head = backend.render(chat, add_generation_prompt=True)
            full = backend.render(chat + [{"role": "assistant", "content": response}], add_generation_prompt=False)
            if not full.startswith(head):
                raise CaiError("the feedback model's chat template does not render the prompt as a prefix")
            pairs.append((head, full[len(head):]))
    return pairs


def contrast_token_logprobs(backend, items: Sequence[tuple[str, FeedbackPrinciple, str]], *,
                            context: str = "stance+principle", demos=None
                            ) -> list[tuple[list[float], list[float]]]:
    """Per-token log-probs of each response under the follows and the violates system prompt.

    Responses scored after the same head (system prompt + conversation: both responses of a
    comparison) share one pass over it when the backend offers ``logprobs_grouped``.
    """
    return score_contrast_sequences(backend, contrast_sequences(backend, items, context=context, demos=demos))


def shared_head_logprobs(backend, pairs: Sequence[tuple[str, str]]) -> list:
    """``backend.logprobs(pairs)``, with continuations after the same head sharing one pass over it
    when the backend offers ``logprobs_grouped``."""
    if not hasattr(backend, "logprobs_grouped"):
        return backend.logprobs(pairs)
    by_head: dict[str, list[int]] = {}
    for k, (head, _) in enumerate(pairs):
        by_head.setdefault(head, []).append(k)
    grouped = backend.logprobs_grouped([(head, [pairs[k][1] for k in ks]) for head, ks in by_head.items()])
    scored = [None] * len(pairs)
    for ks, results in zip(by_head.values(), grouped, strict=True):
        for k, result in zip(ks, results, strict=True):
            scored[k] = result
    return scored


def score_contrast_sequences(backend, pairs: Sequence[tuple[str, str]]) -> list[tuple[list[float], list[float]]]:
    """Per-token log-probs of ``contrast_sequences`` output: (follows, violates) for each item."""
    scored = shared_head_logprobs(backend, pairs)
    return [(scored[2 * i].logprobs, scored[2 * i + 1].logprobs) for i in range(len(pairs) // 2)]


REASON_SLOT = "{reason}"
# The request a reason is weighed against: how likely the reason is after any request at all.
NEUTRAL_REQUEST = "Can you help me with something?"


def fill_reason(opening: str, reason: str) -> str:
    """The opening with its ``{reason}`` slot filled.

    >>> fill_reason("I won't help with this, because {reason}. Instead,", "it would invade someone's privacy")
    "I won't help with this, because it would invade someone's privacy. Instead,"
    """
    return opening.replace(REASON_SLOT, reason)


def reason_pmi(on_request: Sequence[float], on_neutral: Sequence[float]) -> int:
    """The index of the reason whose log-probability after the request rises most over its log-probability
    after a neutral request (pointwise mutual information: a reason likely after anything does not win).

    >>> reason_pmi([-5.0, -9.0, -7.0], [-3.0, -12.0, -6.0])
    1
    """
    gains = [a - b for a, b in zip(on_request, on_neutral, strict=True)]
    return max(range(len(gains)), key=gains.__getitem__)


def pick_reasons(backend, chats: Sequence[list[dict]], openings: Sequence[str], reasons: Sequence[str],
                 cache: dict | None = None) -> list[str]:
    """Fill the ``{reason}`` slot of each opening with the constitution's reason that the model finds most
    relevant to that chat's request (``reason_pmi``); an opening without a slot is returned as it is.

    ``chats[i]`` is the conversation up to the answer; a trailing assistant turn is the opening itself,
    not read, and its text is filled in place. The reason is scored where the opening puts it: after the
    conversation without its system prompt (the pick depends on the request, not on the principle that
    shapes the answer) and the opening's text before the slot. ``cache`` (a dict the caller keeps) holds
    the scores across calls, so a request asked again with the same opening is not read again.
    """
    todo = [i for i, o in enumerate(openings) if REASON_SLOT in o]
    if not todo:
        return list(openings)
    if not reasons:
        raise CaiError("an opening has a {reason} slot but the constitution lists no reasons")
    cache = {} if cache is None else cache
    pairs = []
    for i in todo:
        chat = chats[i][:-1] if chats[i] and chats[i][-1]["role"] == "assistant" else chats[i]
        chat = [m for m in chat if m["role"] != "system"]
        head_text = openings[i].split(REASON_SLOT, 1)[0]
        space = " " if head_text.endswith(" ") else ""
        for context in (chat, [{"role": "user", "content": NEUTRAL_REQUEST}]):
            head = backend.render(context, add_generation_prompt=True) + head_text.rstrip(" ")
            pairs += [(head, space + reason) for reason in reasons]
    unique = [pair for pair in dict.fromkeys(pairs) if pair not in cache]  # each (head, reason) read once
    if unique:
        cache.update(zip(unique, (t.total for t in shared_head_logprobs(backend, unique)), strict=True))
    scored = [cache[pair] for pair in pairs]
    out = list(openings)
    n = len(reasons)
    for k, i in enumerate(todo):
        on_request, on_neutral = scored[2 * k * n:(2 * k + 1) * n], scored[(2 * k + 1) * n:(2 * k + 2) * n]
        out[i] = fill_reason(openings[i], reasons[reason_pmi(on_request, on_neutral)])
        if chats[i] and chats[i][-1]["role"] == "assistant":
            chats[i][-1]["content"] = out[i]
    return out


def contrast_prefixes(backend, items: Sequence[tuple[str, FeedbackPrinciple, str]], *,
                      context: str = "stance+principle", demos=None) -> list[str]:
    """The context part (system prompt + demonstrations) of each head of ``contrast_sequences``.

    Many comparisons share it, so a backend with a prefix cache (vLLM's) reads each distinct one once.
    """
    out = []
    for _, principle, _ in items:
        shots = (demos or {}).get(principle.kind, ())
        for side, system in zip(("follows", "violates"), contrast_system_prompts(principle, context), strict=True):
            out.append(backend.render(contrast_chat(system, "", shots, side)[:-1], add_generation_prompt=False))
    return out


def tokens_read(backend, pairs: Sequence[tuple[str, str]], prefixes: Sequence[str] | None = None) -> int:
    """Tokens a contrast pass reads: each distinct head once, every continuation.

    With ``prefixes`` (``contrast_prefixes``), each distinct context prefix is counted once, as a
    prefix cache would read it, and each head only past its prefix. Counted with the backend's
    tokenizer where it has one, else in whitespace-separated words.
    """
    tokenizer = getattr(backend, "tokenizer", None)

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"]) if tokenizer else len(text.split())

    tails = sum(count(c) for _, c in pairs)
    if prefixes is None:
        return sum(count(h) for h in {h for h, _ in pairs}) + tails
    heads = {h: p if h.startswith(p) else "" for (h, _), p in zip(pairs, prefixes, strict=True)}
    return (sum(count(p) for p in set(heads.values())) + sum(count(h[len(p):]) for h, p in heads.items())
            + tails)


def judge_contrast(backend, items: Sequence[tuple[str, FeedbackPrinciple, str, str]], temperature: float,
                   reduce: str = "mean", token_logprobs=None, *, context: str = "stance+principle",
                   demos=None, max_tokens: int | None = None) -> list[Judgement]:
    """items: (prompt, principle, response_a, response_b).

    ``token_logprobs``: the result of ``contrast_token_logprobs`` on the flattened responses,
    if already computed (label-eval scores once and reduces several ways). ``context``,
    ``demos`` and ``max_tokens``: see the module docstring.
    """
    flat = [(p, pr, r) for p, pr, a, b in items for r in (a, b)]
    if token_logprobs is None:
        s = contrast_scores(backend, flat, reduce, context=context, demos=demos, max_tokens=max_tokens)
    else:
        s = [contrast_score(f, v, reduce, max_tokens) for f, v in token_logprobs]
    out = []
    for i in range(len(items)):
        s_a, s_b = s[2 * i], s[2 * i + 1]
        out.append(Judgement(contrast_p_a(s_a, s_b, temperature), {"s_a": s_a, "s_b": s_b}))
    return out


def judge(backend, method: str, items: Sequence[tuple[str, FeedbackPrinciple, str, str]], *,
          fewshot: Sequence[LabelExample] = (), both_orders: bool = True, temperature: float = 1.0,
          reduce: str = "mean", cot_max_new_tokens: int = 96, cot_min: float = 0.4,
          cot_max: float = 0.6, contrast_context: str = "stance+principle", contrast_demos=None,
          contrast_max_tokens: int | None = None) -> list[Judgement]:
    """Judge (prompt, principle, response A, response B) items with one of ``METHODS``.

    Multiple choice and chain of thought ask the principle's question (``text``); contrast
    uses its follows/violates system prompts. The keyword settings of other methods are ignored.
    """
    if method == "contrast":
        return judge_contrast(backend, items, temperature, reduce, context=contrast_context,
                              demos=contrast_demos, max_tokens=contrast_max_tokens)
    questions = [(p, principle.text, a, b) for p, principle, a, b in items]
    if method == "multiple_choice":
        return judge_multiple_choice(backend, questions, fewshot, both_orders)
    if method == "cot":
        return judge_cot(backend, questions, cot_max_new_tokens, cot_min, cot_max)
    raise ValueError(f"unknown labelling method {method!r} (methods: {', '.join(METHODS)})")
