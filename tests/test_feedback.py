"""Labelling maths and prompt logic with scripted fake backends; option tokens on real tokenizers."""

import math

import pytest

from constitutional import feedback
from constitutional.backends.base import Completion, TokenLogprobs
from constitutional.constitution import FeedbackPrinciple, load_constitution
from constitutional.errors import CaiError

PRINCIPLE = FeedbackPrinciple("less-harmful", "Which response is less harmful?", "harmless",
                              follows="FOLLOWS: be safe.", violates="VIOLATES: help with anything.")


class LetterBiasedJudge:
    """Says "(A)" with probability 0.9 whatever the options are (the measured failure of a 135M model)."""

    name = "biased"

    def logprobs(self, pairs):
        return [TokenLogprobs([c], [math.log(0.9) if c == " (A)" else math.log(0.1)]) for _, c in pairs]


class ContentJudge:
    """Prefers the option that contains SAFE, in either position, with probability 0.8."""

    name = "content"

    def logprobs(self, pairs):
        out = []
        for prompt, cont in pairs:
            body = prompt.rsplit("Options:", 1)[1]
            a_text, b_text = body.split("(B)")
            safe_is_a = "SAFE" in a_text
            good = (cont == " (A)") == safe_is_a
            out.append(TokenLogprobs([cont], [math.log(0.8 if good else 0.2)]))
        return out


class ContrastFake:
    """log P per token: -0.5 for a SAFE response under the follows prompt, -1.0 otherwise."""

    name = "contrast"

    def render(self, chat, add_generation_prompt=True):
        text = "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in chat)
        return text + ("<assistant>" if add_generation_prompt and chat[-1]["role"] != "assistant" else "")

    def logprobs(self, pairs):
        out = []
        for prompt, cont in pairs:
            words = cont.split()
            lp = -0.5 if ("FOLLOWS" in prompt and "SAFE" in cont) else -1.0
            out.append(TokenLogprobs(words, [lp] * len(words)))
        return out


def test_normalise_and_both_orders_cancel_a_letter_bias():
    items = [("How do I pick a lock?", PRINCIPLE.text, "Sure, here's how.", "SAFE: call a locksmith.")]
    one = feedback.judge_multiple_choice(LetterBiasedJudge(), items, both_orders=False)[0]
    both = feedback.judge_multiple_choice(LetterBiasedJudge(), items, both_orders=True)[0]
    assert one.p_a == pytest.approx(0.9)
    assert both.p_a == pytest.approx(0.5)  # always-"(A)" carries no preference
    assert both.scores["p_a_ab"] == pytest.approx(0.9) and both.scores["p_a_ba"] == pytest.approx(0.1)


def test_both_orders_keep_a_content_preference():
    items = [("q", PRINCIPLE.text, "Sure, here's how.", "SAFE: call a locksmith."),
             ("q", PRINCIPLE.text, "SAFE: call a locksmith.", "Sure, here's how.")]
    judged = feedback.judge_multiple_choice(ContentJudge(), items, both_orders=True)
    assert judged[0].p_a == pytest.approx(0.2) and judged[1].p_a == pytest.approx(0.8)


def test_mc_prompt_has_the_paper_wording_and_fewshot_answers():
    shots = feedback.load_label_fewshot()
    assert len(shots) >= 4 and {s.answer for s in shots} == {"A", "B"}
    text = feedback.mc_prompt("Hi?", "Which is kinder?", "Hello!", "Go away.", shots[:2])
    assert text.count(feedback.MC_INTRO) == 3
    assert text.endswith("Which is kinder?\nOptions:\n(A) Hello!\n(B) Go away.\nThe answer is:")
    assert f"The answer is: ({shots[0].answer})" in text


def test_cot_clamps_to_bounds():
    class CotJudge(LetterBiasedJudge):
        def render(self, chat, add_generation_prompt=True):
            return " ".join(m["content"] for m in chat)

        def generate(self, chats, params, progress=None):
            assert all(c[-1]["content"] == feedback.COT_START for c in chats)
            return [Completion("Option A is safer.", 4, True) for _ in chats]

    judged = feedback.judge_cot(CotJudge(), [("q", "Which?", "a", "b")], low=0.4, high=0.6)[0]
    assert judged.p_a == 0.6 and judged.scores["p_a_unclamped"] == pytest.approx(0.9)
    assert judged.cot == "Option A is safer."
    assert feedback.clamp(0.1) == 0.4 and feedback.clamp(0.5) == 0.5


def test_contrast_score_prefers_the_response_that_follows_the_principle():
    items = [("How do I pick a lock?", PRINCIPLE, "SAFE ask a locksmith please", "here is exactly how")]
    s = feedback.contrast_scores(ContrastFake(), [(p, pr, r) for p, pr, a, b in items for r in (a, b)], "mean")
    assert s[0] == pytest.approx(0.5) and s[1] == pytest.approx(0.0)
    summed = feedback.contrast_scores(ContrastFake(), [(items[0][0], PRINCIPLE, items[0][2])], "sum")
    assert summed[0] == pytest.approx(0.5 * 5)
    judged = feedback.judge_contrast(ContrastFake(), items, temperature=0.25)[0]
    assert judged.p_a == pytest.approx(1 / (1 + math.exp(-2.0)))


def test_fitted_temperature_is_calibrated():
    """Diffs drawn so that sigmoid(d / 2) is the true probability: the fit recovers T near 2."""
    import random

    rng = random.Random(0)
    diffs = []
    for _ in range(4000):
        d = rng.uniform(-6, 6)
        diffs.append(d if rng.random() < 1 / (1 + math.exp(-d / 2)) else -d)
    assert feedback.fit_temperature(diffs) == pytest.approx(2.0, rel=0.15)
    assert feedback.fit_temperature([5.0, 6.0, 7.0]) == pytest.approx(0.01, rel=0.1)  # separable: bounded


def test_ece():
    assert feedback.expected_calibration_error([0.9] * 9 + [0.1]) == pytest.approx(0.0)
    assert feedback.expected_calibration_error([0.6] * 10) == pytest.approx(0.4)


def test_contrast_needs_both_system_prompts():
    from constitutional.errors import CaiError

    with pytest.raises(CaiError, match="'bare'.*follows"):
        feedback.check_contrast_principles([FeedbackPrinciple("bare", "Which?")])
    feedback.check_contrast_principles(load_constitution("default").feedback_principles)


def test_option_tokens_on_the_tiny_tokenizer(tiny_backend):
    prompt = feedback.mc_prompt("Hi?", "Which is kinder?", "Hello!", "Go away.")
    shared, firsts = tiny_backend.option_tokens(prompt, feedback.OPTIONS)
    tok = tiny_backend.tokenizer
    assert "A" in tok.decode([firsts[0]]) and "B" in tok.decode([firsts[1]])
    assert "(" in tok.decode(shared + [firsts[0]])


def test_bad_label_fewshot_file(tmp_path):
    from constitutional.errors import CaiError

    path = tmp_path / "labels.yaml"
    path.write_text("examples:\n  - {id: x, prompt: p, question: q, option_a: a, option_b: b, answer: C}\n")
    with pytest.raises(CaiError, match=r"examples\[0\].answer: expected A or B"):
        feedback.load_label_fewshot(str(path))
    path.write_text("examples:\n  - {id: x, prompt: p, question: q, option_a: a, answer: A}\n")
    with pytest.raises(CaiError, match=r"examples\[0\].option_b: expected a non-empty string"):
        feedback.load_label_fewshot(str(path))


def test_judge_dispatches_each_method_with_its_settings():
    items = [("How do I pick a lock?", PRINCIPLE, "SAFE ask a locksmith please", "here is exactly how")]
    contrast = feedback.judge(ContrastFake(), "contrast", items, temperature=0.25)[0]
    assert contrast.p_a == pytest.approx(1 / (1 + math.exp(-2.0)))
    mc = feedback.judge(LetterBiasedJudge(), "multiple_choice", items, both_orders=False)[0]
    assert mc.p_a == pytest.approx(0.9)
    with pytest.raises(ValueError, match="unknown labelling method"):
        feedback.judge(ContrastFake(), "vote", items)


def test_contrast_scores_the_same_with_the_shared_head_pass(tiny_backend):
    class PlainBackend:  # only the Backend protocol's logprobs: one pass per (head, response)
        def render(self, chat, add_generation_prompt=True):
            return tiny_backend.render(chat, add_generation_prompt)

        def logprobs(self, pairs):
            return tiny_backend.logprobs(pairs)

    principles = [FeedbackPrinciple("p1", "Which is safer?", "harmless", "You are safe and kind.",
                                    "You help with anything."),
                  FeedbackPrinciple("p2", "Which is kinder?", "harmless", "You are gentle.", "You are rude.")]
    items = [("How do I bake bread?", principles[0], "Mix flour and water.", "I can't help."),
             ("Hurt him?", principles[1], "No, stay calm and safe.", "Sure, here is how."),
             ("How do I bake bread?", principles[0], "Knead it.", "Bake it at home, then wait.")]
    shared = feedback.judge_contrast(tiny_backend, items, temperature=0.1)
    plain = feedback.judge_contrast(PlainBackend(), items, temperature=0.1)
    for a, b in zip(shared, plain, strict=True):
        assert a.scores["s_a"] == pytest.approx(b.scores["s_a"], abs=1e-4)
        assert a.scores["s_b"] == pytest.approx(b.scores["s_b"], abs=1e-4)
        assert a.p_a == pytest.approx(b.p_a, abs=1e-3)


def test_contrast_contexts_split_the_stance_from_the_principle():
    constitution = load_constitution("default")
    for p in constitution.feedback_principles:
        stance = feedback.contrast_system_prompts(p, "stance")
        own = feedback.contrast_system_prompts(p, "principle")
        assert stance == (p.base_follows, p.base_violates)
        assert feedback.contrast_system_prompts(p, "stance+principle") == (f"{stance[0]} {own[0]}",
                                                                           f"{stance[1]} {own[1]}")
    bare = FeedbackPrinciple("bare", "Which?", "harmless", "Be safe.", "Help anyone.")  # no shared stance
    assert feedback.contrast_system_prompts(bare, "principle") == ("Be safe.", "Help anyone.")
    from constitutional.errors import CaiError

    with pytest.raises(CaiError, match="'bare'.*contrast_base"):
        feedback.contrast_system_prompts(bare, "stance")
    with pytest.raises(ValueError, match="unknown contrast context"):
        feedback.contrast_system_prompts(bare, "both")


def test_fewshot_contrast_context_is_a_prefix_of_the_scored_text(tiny_backend):
    demos = feedback.load_contrast_fewshot()
    assert {k: len(v) >= 2 for k, v in demos.items()} == {"harmless": True, "helpful": True}
    principle = load_constitution("default").feedback_principles[0]
    shots = {"harmless": demos["harmless"][:2]}
    (f_head, f_cont), (v_head, v_cont) = feedback.contrast_sequences(
        tiny_backend, [("Hurt him?", principle, "No, stay calm.")], context="stance", demos=shots)
    for head, side, system in ((f_head, "follows", principle.base_follows),
                               (v_head, "violates", principle.base_violates)):
        chat = feedback.contrast_chat(system, "Hurt him?", shots["harmless"], side)
        assert [m["role"] for m in chat] == ["system", "user", "assistant", "user", "assistant", "user"]
        assert head == tiny_backend.render(chat, add_generation_prompt=True)
        full = tiny_backend.render(chat + [{"role": "assistant", "content": "No, stay calm."}], False)
        assert full.startswith(head) and full[len(head):] == f_cont == v_cont
        answer = getattr(shots["harmless"][0], side)
        assert head.index(system) < head.index(answer) < head.index("Hurt him?")
    assert feedback.contrast_demos("default", 0) is None
    assert [len(v) for v in feedback.contrast_demos("default", 1).values()] == [1, 1]


def test_stance_and_first_tokens_scores_match_a_hand_computation(tiny_backend):
    principle = load_constitution("default").feedback_principles[0]
    prompt, response = "How do I bake bread?", "Mix flour and water, then knead it."
    by_hand = []
    for system in (principle.base_follows, principle.base_violates):
        chat = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
        head = tiny_backend.render(chat)
        full = tiny_backend.render(chat + [{"role": "assistant", "content": response}], add_generation_prompt=False)
        by_hand.append(tiny_backend.logprobs([(head, full[len(head):])])[0].logprobs)
    f, v = by_hand
    mean_all = (sum(f) - sum(v)) / len(f)
    first4 = (sum(f[:4]) - sum(v[:4])) / 4
    got = feedback.contrast_scores(tiny_backend, [(prompt, principle, response)], context="stance")[0]
    got4 = feedback.contrast_scores(tiny_backend, [(prompt, principle, response)], context="stance", max_tokens=4)[0]
    assert got == pytest.approx(mean_all, abs=1e-4) and got4 == pytest.approx(first4, abs=1e-4)
    assert got != pytest.approx(got4, abs=1e-6)
    judged = feedback.judge(tiny_backend, "contrast", [(prompt, principle, response, "No.")], temperature=0.5,
                            contrast_context="stance", contrast_max_tokens=4)[0]
    assert judged.scores["s_a"] == pytest.approx(first4, abs=1e-4)


def test_bad_contrast_fewshot_file(tmp_path):
    from constitutional.errors import CaiError

    path = tmp_path / "contrast.yaml"
    path.write_text("examples:\n  - {id: x, kind: rude, prompt: p, follows: a, violates: b}\n")
    with pytest.raises(CaiError, match=r"examples\[0\].kind: expected one of harmless, helpful"):
        feedback.load_contrast_fewshot(str(path))


def test_tokens_read_counts_a_shared_context_prefix_once(tiny_backend):
    principle = load_constitution("default").feedback_principles[0]
    demos = feedback.contrast_demos("default", 2)
    items = [(f"Question number {i}?", principle, "An answer.") for i in range(3)]
    pairs = feedback.contrast_sequences(tiny_backend, items, context="stance", demos=demos)
    prefixes = feedback.contrast_prefixes(tiny_backend, items, context="stance", demos=demos)
    assert all(head.startswith(prefix) for (head, _), prefix in zip(pairs, prefixes, strict=True))
    assert len(set(prefixes)) == 2  # one follows and one violates context for every comparison
    plain = feedback.tokens_read(tiny_backend, pairs)
    cached = feedback.tokens_read(tiny_backend, pairs, prefixes)
    per_side = [len(tiny_backend.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in set(prefixes)]
    assert abs((plain - cached) - 2 * sum(per_side)) <= 2 * len(pairs)  # 2 of 3 copies saved, up to boundary merges


class ReasonFake:
    """Per-token log P of a reason: -1 after a request that shares a word with it, else -2; "generic"
    is likely after anything (-0.5 per token), so only its gain over a neutral request can count."""

    name = "reasons"

    def render(self, chat, add_generation_prompt=True):
        return "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in chat) + "<assistant>"

    def logprobs(self, pairs):
        out = []
        for head, cont in pairs:
            request = head.split("<user>")[-1].split("</user>")[0].lower()
            words = cont.split()
            lp = -0.5 if "generic" in cont else (-1.0 if set(request.split()) & set(words) else -2.0)
            out.append(TokenLogprobs(words, [lp] * len(words)))
        return out


def test_pick_reasons_fills_each_slot_with_the_reason_the_request_makes_likelier():
    reasons = ["a generic reason", "it invades privacy", "it is a crime"]
    chats = [[{"role": "system", "content": "Be safe."}, {"role": "user", "content": "break my neighbours privacy"},
              {"role": "assistant", "content": "No, because {reason}."}],
             [{"role": "user", "content": "help me commit a crime"}],
             [{"role": "user", "content": "anything"}]]
    openings = ["No, because {reason}.", "I won't: {reason}. Instead,", "No."]
    filled = feedback.pick_reasons(ReasonFake(), chats, openings, reasons)
    assert filled == ["No, because it invades privacy.", "I won't: it is a crime. Instead,", "No."]
    assert chats[0][-1]["content"] == filled[0]  # the open assistant turn now holds the filled opening
    assert chats[1][-1]["role"] == "user"  # a chat without an open turn is not touched
    assert feedback.pick_reasons(ReasonFake(), chats[2:], ["No."], []) == ["No."]  # no slot, no reasons needed
    with pytest.raises(CaiError, match="lists no reasons"):
        feedback.pick_reasons(ReasonFake(), chats[:1], ["No, because {reason}."], [])


def test_pick_reasons_reads_the_request_not_the_system_prompt_and_reuses_its_cache():
    class Counting(ReasonFake):
        def __init__(self):
            self.read = []

        def logprobs(self, pairs):
            self.read += [head for head, _ in pairs]
            return super().logprobs(pairs)

    reasons = ["a generic reason", "it invades privacy", "it is a crime"]
    chats = [[{"role": "system", "content": system}, {"role": "user", "content": "break my neighbours privacy"},
              {"role": "assistant", "content": "No, because {reason}."}] for system in ("Be safe.", "Be kind.")]
    backend, cache = Counting(), {}
    filled = feedback.pick_reasons(backend, chats, ["No, because {reason}."] * 2, reasons, cache)
    assert filled == ["No, because it invades privacy."] * 2
    assert not any("Be safe" in head or "Be kind" in head for head in backend.read)
    assert len(backend.read) == 2 * len(reasons)  # one request head and the neutral one, each reason once
    again = [[{"role": "user", "content": "break my neighbours privacy"}]]
    assert feedback.pick_reasons(backend, again, ["No, because {reason}."], reasons, cache) == filled[:1]
    assert len(backend.read) == 2 * len(reasons)  # all from the cache
