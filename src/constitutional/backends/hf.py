"""In-process transformers backend: batched sampling and scoring on CPU or GPU.

Generation sorts the chats by prompt length, left-pads them into batches of ``batch_size``
and calls ``model.generate`` once per batch, so similar lengths share a batch and little
compute goes to padding. When all chats of a call start with the same tokens (the few-shot
examples of stage 1, a shared system prompt), that prefix is run through the model once and
its KV cache is copied into every batch, so the shared context costs one prefill, not one
per chat. The model is loaded once per backend (once per stage).

By default generation runs on ``prefix_decode.PrefixDecoder`` instead of ``model.generate``: one
copy of the shared prefix's keys and values attended by all rows at once, packed prefill,
finished rows dropped, and the last call's keys and values reused by chats that extend it
(stage 1's revision chats extend its critique chats). It gives the same greedy outputs;
``prefix_attention=False`` (or a model it does not support) uses ``model.generate`` as before.
Scoring (``logprobs``, ``logprobs_grouped``) runs on the same decoder: a context shared by many
scored sequences (a contrast persona and its demonstration) is computed once, the rest packed.

Seeds: with ``SamplingParams.seed`` set, batch ``i`` of a call is sampled after
``torch.manual_seed(seed + i)``, so the same inputs give the same outputs on the same machine.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence

import torch

from constitutional.backends import template
from constitutional.backends.base import Chat, Completion, ProgressFn, SamplingParams, TokenLogprobs
from constitutional.backends.prefix_decode import PrefixDecoder, sample_top_p, unsupported_reason
from constitutional.errors import CaiError
from constitutional.progress import log, no_hf_bars

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(device: str = "auto") -> str:
    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


class HFBackend(template.LocalTemplate):
    """A transformers causal LM behind the :class:`~constitutional.backends.base.Backend` protocol.

    ``model`` is a local directory or hub id (resolve specs with ``models.resolve_model``);
    pass an already loaded ``model_obj``/``tokenizer`` to share weights with a trainer.
    ``min_shared_prefix``: shortest common token prefix of a call's prompts that is computed once.
    ``prefix_attention``: generate with ``PrefixDecoder`` (False: ``model.generate``);
    ``reuse_bytes``: memory it may keep for the last call's keys and values (0: no reuse).
    """

    def __init__(self, model: str, *, batch_size: int = 16, device: str = "auto",
                 dtype: str = "float32", model_obj=None, tokenizer=None, name: str | None = None,
                 min_shared_prefix: int = 32, prefix_attention: bool = True, reuse_bytes: int = 1 << 30):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = pick_device(device)
        self.batch_size = batch_size
        self.min_shared_prefix = min_shared_prefix
        self.name = name or str(model)
        try:
            with no_hf_bars():
                self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(model)
                self.model = model_obj or AutoModelForCausalLM.from_pretrained(model, dtype=_DTYPES[dtype])
        except OSError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CaiError(f"model {model!r}: could not load: {first}") from None
        self.model.to(self.device).eval()
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.context_length = int(getattr(self.model.config, "max_position_embeddings", 2048))
        self.stop_ids = template.stop_token_ids(self.model.generation_config, self.tokenizer)
        self.decoder: PrefixDecoder | None = None
        if prefix_attention:
            reason = unsupported_reason(self.model)
            if reason is None:
                self.decoder = PrefixDecoder(self.model, self.stop_ids, min_shared_prefix, reuse_bytes)
            else:
                log(f"shared-prefix decoding does not support {reason}; using transformers' generate")

    # ------------------------------------------------------------ generation
    # (rendering, encoding and counting a chat: template.LocalTemplate)

    @torch.inference_mode()
    def generate(self, chats: Sequence[Chat], params: SamplingParams,
                 progress: ProgressFn | None = None) -> list[Completion]:
        from transformers import GenerationConfig

        encoded = [self._encode(self.render(chat)) for chat in chats]
        order = sorted(range(len(chats)), key=lambda i: -len(encoded[i]))
        if self.decoder is not None:
            return self._generate_prefix(encoded, order, params, progress)
        sampling = params.temperature > 0
        config = GenerationConfig(
            max_new_tokens=params.max_new_tokens,
            min_new_tokens=params.min_new_tokens or None,
            do_sample=sampling,
            temperature=params.temperature if sampling else None,
            top_p=params.top_p if sampling else None,
            top_k=0 if sampling else None,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.stop_ids,
        )
        prefix, prefix_cache = self._shared_prefix(encoded)
        results: list[Completion | None] = [None] * len(chats)
        for batch_index, start in enumerate(range(0, len(order), self.batch_size)):
            rows = order[start:start + self.batch_size]
            batch, cache = self._batch_after_prefix([encoded[i] for i in rows], prefix, prefix_cache)
            kwargs = {cache_keyword(self.model): cache} if cache is not None else {}
            if params.seed is not None:
                torch.manual_seed(params.seed + batch_index)
            out = self.model.generate(**batch, **kwargs, generation_config=config)
            new = out[:, batch["input_ids"].shape[1]:].tolist()
            for row, ids in zip(rows, new, strict=True):
                results[row] = self._completion(ids)
            if progress is not None:
                progress(len(rows), sum(results[row].tokens for row in rows))
        return results  # type: ignore[return-value]

    def _generate_prefix(self, encoded: list[list[int]], order: list[int], params: SamplingParams,
                         progress: ProgressFn | None) -> list[Completion]:
        """``generate`` on the shared-prefix decoder: same batches, seeds and stopping rules."""
        sampling = params.temperature > 0

        def pick(logits: torch.Tensor, step: int) -> torch.Tensor:
            """The next token of each row from its logits (rows, vocab), ``step`` tokens into generation,
            processed as model.generate does: stop tokens barred before min_new_tokens, temperature, top-p."""
            if step < params.min_new_tokens:
                logits[:, self.stop_ids] = float("-inf")
            if not sampling:
                return logits.argmax(-1)
            if params.temperature != 1.0:
                logits = logits / params.temperature
            if params.top_p < 1.0:
                return sample_top_p(logits, params.top_p)
            return torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1).squeeze(1)

        results: list[Completion | None] = [None] * len(encoded)

        def on_batch(index: int, rows: list[int], generated: list[list[int]] | None) -> None:
            if generated is None:
                if params.seed is not None:
                    torch.manual_seed(params.seed + index)
                return
            for row, ids in zip(rows, generated, strict=True):
                results[row] = self._completion(ids)
            if progress is not None:
                progress(len(rows), sum(results[row].tokens for row in rows))

        batches = [order[start:start + self.batch_size] for start in range(0, len(order), self.batch_size)]
        self.decoder.generate(encoded, batches, params.max_new_tokens, pick, on_batch)
        return results  # type: ignore[return-value]

    def _completion(self, ids: list[int]) -> Completion:
        n, finished = _cut_at_stop(ids, self.stop_ids)
        text = self.tokenizer.decode(ids[:n], skip_special_tokens=True).strip()
        return Completion(text=text, tokens=n, finished=finished)

    def _shared_prefix(self, encoded: list[list[int]]):
        """The token prefix all prompts share (few-shot examples, system prompt) and its KV cache.

        Computing it once instead of once per chat is most of the prefill when the shared
        context is long. Returns ([], None) when there is nothing worth sharing.
        """
        if len(encoded) < 2:
            return [], None
        shortest = min(len(e) for e in encoded)
        n = 0
        first = encoded[0]
        while n < shortest - 1 and all(e[n] == first[n] for e in encoded):
            n += 1
        if n < self.min_shared_prefix:
            return [], None
        prefix = first[:n]
        out = self.model(input_ids=torch.tensor([prefix], device=self.device), use_cache=True,
                         logits_to_keep=1)
        return prefix, output_cache(out)

    def _batch_after_prefix(self, rows: list[list[int]], prefix: list[int], prefix_cache):
        """The padded batch, and a copy of the prefix's KV cache repeated for each row (or None)."""
        batch = self._pad_after_prefix(rows, len(prefix))
        if prefix_cache is None:
            return batch, None
        cache = copy.deepcopy(prefix_cache)
        cache.batch_repeat_interleave(len(rows))
        return batch, cache

    def _pad_after_prefix(self, rows: list[list[int]], n_prefix: int) -> dict:
        """Left-pad each row's part after the shared prefix: [prefix][pad ...][suffix].

        Padding sits between the prefix and the suffix and is masked out; generate derives
        position ids from the attention mask, so every token keeps its unpadded position.
        """
        pad = self.tokenizer.pad_token_id
        width = max(len(r) for r in rows)
        ids, mask = [], []
        for r in rows:
            gap = width - len(r)
            ids.append(r[:n_prefix] + [pad] * gap + r[n_prefix:])
            mask.append([1] * n_prefix + [0] * gap + [1] * (len(r) - n_prefix))
        return {"input_ids": torch.tensor(ids, device=self.device),
                "attention_mask": torch.tensor(mask, device=self.device)}

    # --------------------------------------------------------------- scoring

    def option_tokens(self, prompt: str, options: Sequence[str]) -> tuple[list[int], list[int]]:
        """Where options part ways after ``prompt`` (``template.option_tokens``): the shared " (" of " (A)"
        and " (B)" is appended to the prompt and the next-token distribution is read at "A" vs "B"."""
        return template.option_tokens(self.tokenizer, prompt, options)

    @torch.inference_mode()
    def option_logprobs(self, prompts: Sequence[str], options: Sequence[str]) -> list[list[float]]:
        """For each prompt: the log-probability of each option's first distinguishing token.

        One forward pass per prompt scores every option (vs one pass per option with
        ``logprobs``). Prompts that share a long token prefix (few-shot examples) compute it
        once, as in ``generate``.
        """
        encoded, wanted = [], []
        for prompt in prompts:
            shared, firsts = self.option_tokens(prompt, options)
            encoded.append(self._encode(prompt) + shared)
            wanted.append(firsts)
        prefix, prefix_cache = self._shared_prefix(encoded)
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        results: list[list[float] | None] = [None] * len(encoded)
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            batch, cache = self._batch_after_prefix([encoded[i] for i in rows], prefix, prefix_cache)
            kwargs = {}
            if cache is not None:
                mask = batch["attention_mask"]
                kwargs = {cache_keyword(self.model): cache,
                          "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)[:, len(prefix):]}
                inputs = batch["input_ids"][:, len(prefix):]
            else:
                inputs = batch["input_ids"]
            logits = self.model(input_ids=inputs, attention_mask=batch["attention_mask"], use_cache=True,
                                logits_to_keep=1, **kwargs).logits[:, -1].float()  # (batch, vocab)
            logp = torch.log_softmax(logits, dim=-1)
            for j, row in enumerate(rows):
                results[row] = [logp[j, t].item() for t in wanted[row]]
        return results  # type: ignore[return-value]

    @torch.inference_mode()
    def logprobs(self, pairs: Sequence[tuple[str, str]]) -> list[TokenLogprobs]:
        """Token log-probs of each continuation after its prompt, batched by length.

        The prompt is tokenised alone and the continuation's tokens are those that the
        tokenisation of ``prompt + continuation`` adds after it, so merges across the
        boundary follow the model's own tokenizer whenever the prompt's tokens survive.
        """
        items = []
        for prompt, continuation in pairs:
            head = self._encode(prompt)
            items.append((head + template.continuation_ids(self.tokenizer, prompt, head, continuation), len(head)))
        if self.decoder is not None:
            return self._score_packed(items)
        order = sorted(range(len(items)), key=lambda i: -len(items[i][0]))
        results: list[TokenLogprobs | None] = [None] * len(items)
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            batch = self.tokenizer.pad({"input_ids": [items[i][0] for i in rows]},
                                       return_tensors="pt").to(self.device)
            # Rows are left-padded, so every continuation sits at the end of its row: only the
            # last `keep` positions need the vocabulary projection (the prompts' logits are unused).
            keep = max(len(items[i][0]) - items[i][1] for i in rows) + 1
            logits = self.model(**batch, logits_to_keep=keep).logits  # (batch, keep, vocab)
            token_logp = token_logprobs(logits[:, :-1], batch["input_ids"][:, -keep + 1:])  # (batch, keep - 1)
            for j, row in enumerate(rows):
                ids, n_head = items[row]
                # kept position k predicts the token at kept position k + 1; the continuation is the
                # last len(ids) - n_head tokens of the row
                span = token_logp[j, keep - 1 - (len(ids) - n_head):].tolist()
                toks = self.tokenizer.convert_ids_to_tokens(ids[n_head:])
                results[row] = TokenLogprobs(tokens=toks, logprobs=span)
        return results  # type: ignore[return-value]

    def _score_packed(self, items: list[tuple[list[int], int]]) -> list[TokenLogprobs]:
        """(token ids, head length) -> the log-probs of the tokens after the head, on the shared-prefix
        decoder: prefixes shared by many sequences (a contrast persona, a request) are run once,
        the rest packed without padding."""
        scored = self.decoder.score([ids for ids, _ in items], [n for _, n in items])
        return [TokenLogprobs(tokens=self.tokenizer.convert_ids_to_tokens(ids[n:]), logprobs=values)
                for (ids, n), values in zip(items, scored, strict=True)]

    @torch.inference_mode()
    def logprobs_grouped(self, groups: Sequence[tuple[str, Sequence[str]]]) -> list[list[TokenLogprobs]]:
        """``logprobs`` of each continuation in each (prompt, continuations) group.

        On the shared-prefix decoder (the default) every sequence goes through ``_score_packed``,
        which runs each prefix shared by several sequences once. Otherwise (``prefix_attention=False``
        or an unsupported model) each prompt is run once and its KV cache copied to each continuation.

        The contrast labeller scores both responses of a comparison after the same system prompt
        and conversation, so this reads that shared head once instead of twice. Heads are
        left-padded and continuations right-padded, so no padding falls inside a row and the
        usual position ids keep every token's distance to the others.
        """
        encoded = []
        for prompt, continuations in groups:
            head = self._encode(prompt)
            encoded.append((head, [template.continuation_ids(self.tokenizer, prompt, head, c) for c in continuations]))
        if self.decoder is not None:
            flat = self._score_packed([(head + tail, len(head)) for head, tails in encoded for tail in tails])
            out, at = [], 0
            for _, tails in encoded:
                out.append(flat[at:at + len(tails)])
                at += len(tails)
            return out
        results: list[list[TokenLogprobs]] = [[] for _ in groups]
        # batch groups with the same number of continuations, longest first
        by_count: dict[int, list[int]] = {}
        for i, (_, tails) in enumerate(encoded):
            by_count.setdefault(len(tails), []).append(i)
        pad = self.tokenizer.pad_token_id
        for count, members in by_count.items():
            if count == 0:
                continue
            # the continuations are most of the tokens: sort by their length to waste little padding
            members.sort(key=lambda i: (-max(len(t) for t in encoded[i][1]), -len(encoded[i][0])))
            per_batch = max(1, self.batch_size // count)
            for start in range(0, len(members), per_batch):
                rows = members[start:start + per_batch]
                heads = self.tokenizer.pad({"input_ids": [encoded[i][0] for i in rows]},
                                           return_tensors="pt").to(self.device)
                out = self.model(**heads, use_cache=True, logits_to_keep=1)
                first = torch.log_softmax(out.logits[:, -1].float(), dim=-1).repeat_interleave(count, 0)
                cache = output_cache(out)
                cache.batch_repeat_interleave(count)
                tails = [t for i in rows for t in encoded[i][1]]
                width = max(len(t) for t in tails)
                tail_ids = torch.tensor([t + [pad] * (width - len(t)) for t in tails], device=self.device)
                tail_mask = torch.tensor([[1] * len(t) + [0] * (width - len(t)) for t in tails], device=self.device)
                mask = torch.cat([heads["attention_mask"].repeat_interleave(count, 0), tail_mask], dim=1)
                logits = self.model(input_ids=tail_ids, attention_mask=mask, **{cache_keyword(self.model): cache},
                                    use_cache=False).logits  # (rows * count, width, vocab)
                # token 0 is predicted by the head's last position, token c > 0 by tail position c - 1
                rest = token_logprobs(logits[:, :-1], tail_ids[:, 1:])
                head0 = first.gather(-1, tail_ids[:, :1]).squeeze(-1)
                for j, tail in enumerate(tails):
                    values = [head0[j].item()] + rest[j, :len(tail) - 1].tolist()
                    results[rows[j // count]].append(
                        TokenLogprobs(tokens=self.tokenizer.convert_ids_to_tokens(tail), logprobs=values))
        return results


def token_logprobs(logits, targets, rows_at_once: int = 4):
    """log softmax(logits)[target] for each position, in float32: ``logits`` (batch, positions, vocab),
    ``targets`` (batch, positions). The normalised copy of the logits is made a few rows at a time, so
    scoring 32 rows of 96 tokens over a 49k vocabulary needs about 75 MB for it instead of 600 MB."""
    out = torch.empty(targets.shape, dtype=torch.float32, device=logits.device)
    for start in range(0, logits.shape[0], rows_at_once):
        part = logits[start:start + rows_at_once].float()
        out[start:start + rows_at_once] = torch.log_softmax(part, dim=-1).gather(
            -1, targets[start:start + rows_at_once].unsqueeze(-1)).squeeze(-1)
    return out


def cache_keyword(model) -> str:
    """The keyword a model's ``forward`` (and so ``generate``) takes a KV cache by: ``cache`` in
    recent transformers, which deprecates the old ``past_key_values`` (removed from ``forward`` in
    5.40), else ``past_key_values``."""

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def output_cache(out):
    """The KV cache of a forward pass's output, under either transformers name."""
    return out["cache"] if "cache" in out else out.past_key_values


def _cut_at_stop(ids: list[int], stop_ids: list[int]) -> tuple[int, bool]:
    """Tokens up to and including the first stop token, and whether one was found.

    >>> _cut_at_stop([5, 6, 2, 0, 0], [2])
    (3, True)
    >>> _cut_at_stop([5, 6, 7], [2])
    (3, False)
    """
    for i, tok in enumerate(ids):
        if tok in stop_ids:
            return i + 1, True
    return len(ids), False

