"""The held-out prompts that evaluation measures on are disjoint from everything training reads."""

import re

import pytest

from constitutional.feedback import load_label_fewshot
from constitutional.prompt_sources import BUILTIN, load_prompts
from constitutional.prompts import load_fewshot


def norm(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower())


def training_texts() -> dict[str, set[str]]:
    """Every prompt text a training stage can read by default: the train split of every built-in set
    and the few-shot examples shown to the model in stages 1 and 3."""
    texts = {f"{source}:train": {norm(p.prompt) for p in load_prompts(source, "train")} for source in BUILTIN}
    texts["fewshot:critique_revision"] = {norm(ex.prompt) for ex in load_fewshot()}
    texts["fewshot:labels"] = {norm(ex.prompt) for ex in load_label_fewshot()}
    return texts


@pytest.mark.parametrize("source", sorted(BUILTIN))
def test_held_out_split_is_disjoint_from_every_train_split_by_id_and_text(source):
    heldout = load_prompts(source, "heldout")
    assert len(heldout) >= 40
    heldout_ids = {p.id for p in heldout}
    for other in BUILTIN:
        train_ids = {p.id for p in load_prompts(other, "train")}
        assert not heldout_ids & train_ids, (source, other)
    heldout_texts = {norm(p.prompt) for p in heldout}
    assert len(heldout_texts) == len(heldout)  # no duplicate prompt inside the split either
    for name, texts in training_texts().items():
        assert not heldout_texts & texts, f"{source} held-out prompts also in {name}: {heldout_texts & texts}"


def test_splits_cover_each_set_exactly_once():
    for source in BUILTIN:
        everything = load_prompts(source, "all")
        train, heldout = load_prompts(source, "train"), load_prompts(source, "heldout")
        assert len(train) + len(heldout) == len(everything)
        assert {p.id for p in train} | {p.id for p in heldout} == {p.id for p in everything}
