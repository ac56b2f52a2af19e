"""Chat rendering and tokenising helpers shared by every backend that tokenises locally.

A server backend must show the model exactly the tokens the in-process backend would, so both
render chats with these functions (the model's own chat template, or a plain transcript for a
base model without one) and split prompt/continuation tokens the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

from constitutional.backends.base import Chat

_NAMES = {"system": "System", "user": "Human", "assistant": "Assistant"}


def render_chat(tokenizer, chat: Chat, add_generation_prompt: bool = True) -> str:
    """The chat as the model sees it. A chat that ends with an assistant turn and
    ``add_generation_prompt=True`` is left open, so generation continues that turn.

    Without a chat template (a base model), a plain transcript:

    >>> class Bare: chat_template = None
    >>> render_chat(Bare(), [{"role": "user", "content": "Hi"}])
    'Human: Hi\\n\\nAssistant:'
    >>> render_chat(Bare(), [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hel"}])
    'Human: Hi\\n\\nAssistant: Hel'
    """
    open_turn = add_generation_prompt and chat and chat[-1]["role"] == "assistant"
    if tokenizer.chat_template:
        if open_turn:
            return tokenizer.apply_chat_template(chat, tokenize=False, continue_final_message=True)
        return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=add_generation_prompt)
    if open_turn:
        head = "".join(f"{_NAMES[m['role']]}: {m['content']}\n\n" for m in chat[:-1])
        return head + f"Assistant: {chat[-1]['content']}"
    text = "".join(f"{_NAMES[m['role']]}: {m['content']}\n\n" for m in chat)
    return text + ("Assistant:" if add_generation_prompt else "")


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of already-rendered text: no special tokens added (the template has them)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def continuation_ids(tokenizer, prompt: str, head: list[int], continuation: str) -> list[int]:
    """The tokens that tokenising ``prompt + continuation`` adds after ``head`` (the prompt's
    tokens), or the continuation tokenised alone if the boundary merged."""
    full = encode(tokenizer, prompt + continuation)
    if full[:len(head)] != head:  # the boundary merged: tokenise the parts apart
        full = head + encode(tokenizer, continuation)
    if len(full) == len(head):
        raise ValueError(f"empty continuation after prompt: {continuation!r}")
    return full[len(head):]


def option_tokens(tokenizer, prompt: str, options: Sequence[str]) -> tuple[list[int], list[int]]:
    """Where options part ways after ``prompt``: (shared token ids, first differing id of each).

    " (A)" and " (B)" usually tokenise as [" (", "A", ")"] and [" (", "B", ")"]: the shared " ("
    goes after the prompt and the next-token log-probabilities of "A" and "B" are read there.
    """
    head = encode(tokenizer, prompt)
    tails = []
    for option in options:
        full = encode(tokenizer, prompt + option)
        if full[:len(head)] != head:
            full = head + encode(tokenizer, option)
        tails.append(full[len(head):])
    shared = 0
    while all(len(t) > shared for t in tails) and len({t[shared] for t in tails}) == 1:
        shared += 1
    if any(len(t) <= shared for t in tails) or len({t[shared] for t in tails}) != len(tails):
        raise ValueError(f"options {list(options)!r} do not differ in one token after the prompt")
    return tails[0][:shared], [t[shared] for t in tails]


def stop_token_ids(generation_config, tokenizer) -> list[int]:
    """The ids that end a reply: the generation config's eos ids plus the tokenizer's eos."""
    ids = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


class LocalTemplate:
    """What a backend that holds the model's tokenizer (``self.tokenizer``) does with it: render a chat, encode
    rendered text and count a chat's tokens, all through the functions above. Both backends inherit it, so the
    server is given exactly the tokens the in-process model reads."""

    tokenizer = None

    def render(self, chat: Chat, add_generation_prompt: bool = True) -> str:
        return render_chat(self.tokenizer, chat, add_generation_prompt)

    def _encode(self, text: str) -> list[int]:
        return encode(self.tokenizer, text)

    def count_tokens(self, chat: Chat) -> int:
        return len(self._encode(self.render(chat)))
