"""Batched decoding that keeps one copy of a shared prompt prefix: the engine behind ``HFBackend.generate``.

Stage 1 sends batches of chats that all start with the same few-shot exchanges (about 600
tokens on the demo) and differ only in their last few hundred. ``model.generate`` with a
per-row copy of the prefix's KV cache makes every decoding step of every row read and copy
that prefix again: on the embedded model, a batch of 32 spent most of each step concatenating
caches. This module decodes instead with

* one copy of the prefix's keys and values (batch 1), attended by the queries of every row at
  once (one matmul per layer), and each row's own tokens in a preallocated per-row buffer; the
  two softmax parts are merged exactly (the "cascade" or "bifurcated" attention trick), through
  a custom attention function registered with ``transformers.AttentionInterface``, so the model's
  own layers, norms and rotary embeddings do the rest;
* packed prefill: each row's new tokens are fed back to back as one sequence, with no padding;
* finished rows dropped from the batch as they stop;
* reuse across calls: the keys and values of the last call's rows (prompt and generated
  tokens) are kept, and a new chat that extends one of them (stage 1's revision request
  extends its critique chat) only computes the tokens after the longest match.

Greedy outputs equal those of ``model.generate`` up to floating-point rounding (the same
maths in another order); sampling is reproducible for a given seed but does not draw the
same numbers as ``model.generate`` (finished rows no longer consume random numbers).
Architectures whose attention this does not reproduce (sliding windows, soft-capping, other
model types) are reported by :func:`unsupported_reason` and the backend falls back to
``model.generate``.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

ATTENTION_NAME = "cai_shared_prefix"
# Model types whose attention layers call the attention interface with the current tokens' keys
# and values after rotary embeddings, with no extra terms (tested on tiny random models of each).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# Generation settings that model.generate would take from the model's generation_config and
# this decoder does not apply; a model that sets any of them falls back to model.generate.
_UNSUPPORTED_GENERATION = {
    "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
    "bad_words_ids": None, "suppress_tokens": None, "begin_suppress_tokens": None, "sequence_bias": None,
    "min_p": None, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "min_length": 0,
    "forced_bos_token_id": None, "forced_eos_token_id": None, "exponential_decay_length_penalty": None,
    "num_beams": 1, "guidance_scale": None, "watermarking_config": None, "renormalize_logits": False,
}
_SCORES_BYTES = 1 << 27  # attention scores computed per chunk of rows: about 128 MiB at most
_PREFILL_TOKENS = 2048  # tokens per prefill forward pass


def unsupported_reason(model) -> str | None:
    """Why this decoder cannot run ``model`` exactly, or None if it can."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES or hasattr(model, "peft_config"):
        return f"model type {model_type!r} ({type(model).__name__})"
    if getattr(config, "sliding_window", None) is not None or any(
            t != "full_attention" for t in getattr(config, "layer_types", None) or ()):
        return "sliding-window attention"
    gen = getattr(model, "generation_config", None)
    for name, neutral in _UNSUPPORTED_GENERATION.items():
        value = getattr(gen, name, None)
        if value is not None and value != neutral:
            return f"generation_config.{name}={value!r}"
    return None


def attention_bias(allowed: torch.Tensor, group: int, dtype=torch.float32) -> torch.Tensor:
    """The additive mask of :func:`prefix_suffix_attention` from a bool one.

    allowed: (rows, q_len, kv_len), True where a query may see a key. Returns (rows, 1, group *
    q_len, kv_len): 0 where allowed, -inf where not, repeated for the ``group`` query heads that
    share a kv head.

    >>> attention_bias(torch.tensor([[[True, False]]]), 2)[0, 0].tolist()
    [[0.0, -inf], [0.0, -inf]]
    """
    rows, q_len, kv_len = allowed.shape
    bias = torch.zeros((rows, 1, group, q_len, kv_len), dtype=dtype, device=allowed.device)
    bias.masked_fill_(~allowed[:, None, None], float("-inf"))
    return bias.view(rows, 1, group * q_len, kv_len)


def prefix_suffix_attention(query: torch.Tensor, prefix_key: torch.Tensor | None, prefix_value: torch.Tensor | None,
                            key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor,
                            scaling: float) -> torch.Tensor:
    """Softmax attention of each row's queries over a prefix shared by all rows, then the row's own keys.

    query: (rows, heads, q_len, dim); prefix_key, prefix_value: (kv_heads, prefix_len, dim), one
    copy for all rows (or None); key, value: (rows, kv_heads, kv_len, dim); bias: the
    :func:`attention_bias` of which of its row's keys each query may see (every query sees the
    whole prefix, and must see at least one of its row's keys). Heads are grouped as in
    grouped-query attention: head h reads kv head h // (heads / kv_heads).
    Returns (rows, heads, q_len, dim), equal to softmax attention over [prefix keys; row keys]:
    the two parts' outputs are averaged with weights exp(part's log-sum-exp - total log-sum-exp),
    which for two parts is a sigmoid of the difference of their log-sum-exps. Exact.
    """
    rows, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    q = query.reshape(rows, kv_heads, group * q_len, dim)  # head h -> (h // group, h % group)
    out, lse = _attention_with_lse(q, key, value, bias, scaling)  # (rows, kv_heads, group * q_len, dim / -)
    if prefix_key is not None and prefix_key.shape[1] > 0:
        # every row's queries against the one prefix copy, as one sequence of rows * group * q_len queries
        qp = q.transpose(0, 1).reshape(1, kv_heads, rows * group * q_len, dim)
        pout, plse = _attention_with_lse(qp, prefix_key[None], prefix_value[None], None, scaling)
        pout = pout[0].view(kv_heads, rows, group * q_len, dim).transpose(0, 1)
        plse = plse[0].view(kv_heads, rows, group * q_len).transpose(0, 1)
        out = torch.lerp(pout, out, torch.sigmoid(lse - plse).to(out.dtype)[..., None])
    return out.view(rows, kv_heads, group, q_len, dim).reshape(rows, heads, q_len, dim)


_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _attention_with_lse(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor | None,
                        scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output (batch, heads, q_len, dim) and the log-sum-exp of each query's scores (batch, heads, q_len).

    ``bias``: additive mask (batch, 1, q_len, kv_len) or None. On CPU this is torch's fused
    flash-attention kernel (the one ``scaled_dot_product_attention`` runs there, which also
    returns the log-sum-exp); elsewhere the same maths written out.
    """
    if _FLASH_CPU is not None and query.device.type == "cpu":
        out, lse = _FLASH_CPU(query, key, value, 0.0, False, attn_mask=bias, scale=scaling)
        return out, lse.float()
    return attention_with_lse_reference(query, key, value, bias, scaling)


def attention_with_lse_reference(query, key, value, bias, scaling):
    """:func:`_attention_with_lse` written out (any device; also the tests' reference)."""
    scores = (query @ key.transpose(-1, -2)).float() * scaling
    if bias is not None:
        scores = scores + bias
    lse = torch.logsumexp(scores, dim=-1)
    out = (scores - lse[..., None]).exp().to(value.dtype) @ value
    return out, lse


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, kv_rows=None, **kwargs):
    """The attention function registered as ``cai_shared_prefix``: defers to the pass's ``KVRows``."""
    if kv_rows is None:
        raise RuntimeError(f"{ATTENTION_NAME} attention needs kv_rows (it only runs inside prefix_decode)")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    return kv_rows.attend(module.layer_idx, query, key, value, scaling), None


_registered = False


@contextmanager
def _shared_prefix_attention(model):
    """Switch ``model`` to this module's attention function for the duration of the block."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(ATTENTION_NAME, _attention)
        _registered = True
    config = model.config
    saved = config._attn_implementation
    config._attn_implementation = ATTENTION_NAME
    try:
        yield
    finally:
        config._attn_implementation = saved


class KVRows:
    """Per-row key/value buffers of one batch and the layout of the tokens of one forward pass.

    ``k``/``v``: (layers, rows, kv_heads, capacity, dim); row ``b``'s token ``i`` after the shared
    prefix lives in slot ``i``. A forward pass feeds tokens packed in one sequence: token ``j``
    belongs to row ``rows[j]`` (relative to ``first_row``) and slot ``slots[j]``, and sits in
    column ``cols[j]`` of the padded (rows, width) query block its attention is computed in.
    """

    def __init__(self, layers: int, n_rows: int, kv_heads: int, capacity: int, dim: int, dtype, device,
                 prefix_k: torch.Tensor | None = None, prefix_v: torch.Tensor | None = None):
        # zeros, not empty: slots past a row's end are masked, but 0 * (a NaN left in memory) is still NaN
        self.k = torch.zeros((layers, n_rows, kv_heads, capacity, dim), dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.prefix_k, self.prefix_v = prefix_k, prefix_v  # (layers, kv_heads, prefix_len, dim) or None

    def plan(self, rows: list[int], slots: list[int]) -> None:
        """Lay out the next forward pass: token j of it is row ``rows[j]``'s slot ``slots[j]``.

        Tokens of a row must be consecutive and in slot order, rows in ascending order.
        """
        device = self.k.device
        self.first_row = rows[0]
        self.n_rows = rows[-1] - rows[0] + 1
        cols, count, previous = [], 0, None
        for r in rows:
            count = count + 1 if r == previous else 0
            cols.append(count)
            previous = r
        self.width = max(cols) + 1
        self.dense = self.width == 1 and len(rows) == self.n_rows  # one token for every row
        self.rows = torch.tensor([r - self.first_row for r in rows], device=device)
        self.slots = torch.tensor(slots, device=device)
        self.cols = torch.tensor(cols, device=device)
        # slot of each query in the padded block (0 for padding: it then sees one key and stays finite)
        qslot = torch.zeros((self.n_rows, self.width), dtype=torch.long, device=device)
        qslot[self.rows, self.cols] = self.slots
        self.kv_len = int(max(slots)) + 1
        self.allowed = torch.arange(self.kv_len, device=device) <= qslot[..., None]  # (n_rows, width, kv_len)
        self.bias = None  # built by the first layer, which knows the number of query heads per kv head

    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scaling: float) -> torch.Tensor:
        """Store this pass's keys/values of ``layer`` and return its attention output.

        query: (1, heads, tokens, dim); key, value: (1, kv_heads, tokens, dim). Returns (1, tokens, heads, dim).
        """
        lo, hi = self.first_row, self.first_row + self.n_rows
        kb, vb = self.k[layer, lo:hi], self.v[layer, lo:hi]
        kb[self.rows, :, self.slots] = key[0].transpose(0, 1)
        vb[self.rows, :, self.slots] = value[0].transpose(0, 1)
        q = query[0].transpose(0, 1)  # (tokens, heads, dim)
        heads, dim = q.shape[1], q.shape[2]
        if self.dense:
            block = q.unsqueeze(2)  # (rows, heads, 1, dim)
        else:
            block = q.new_zeros((self.n_rows, heads, self.width, dim))
            block[self.rows, :, self.cols] = q
        pk = self.prefix_k[layer] if self.prefix_k is not None else None
        pv = self.prefix_v[layer] if self.prefix_v is not None else None
        if self.bias is None:
            self.bias = attention_bias(self.allowed, heads // key.shape[1], query.dtype)
        n_prefix = pk.shape[1] if pk is not None else 0
        step = max(1, _SCORES_BYTES // (4 * heads * self.width * (self.kv_len + n_prefix)))
        if step >= self.n_rows:
            out = prefix_suffix_attention(block, pk, pv, kb[:, :, :self.kv_len], vb[:, :, :self.kv_len], self.bias,
                                          scaling)
        else:  # in chunks of rows, to bound the memory of the mask and the kernel's buffers
            out = torch.empty_like(block)
            for r in range(0, self.n_rows, step):
                out[r:r + step] = prefix_suffix_attention(
                    block[r:r + step], pk, pv, kb[r:r + step, :, :self.kv_len], vb[r:r + step, :, :self.kv_len],
                    self.bias[r:r + step], scaling)
        picked = out.squeeze(2) if self.dense else out[self.rows, :, self.cols]  # (tokens, heads, dim)
        return picked.unsqueeze(0)

    def keep(self, index: list[int]) -> None:
        """Keep only the rows in ``index`` (in that order), freeing the others' buffers."""
        idx = torch.tensor(index, device=self.k.device)
        self.k = self.k.index_select(1, idx)
        self.v = self.v.index_select(1, idx)


@dataclass
class _StoredRow:
    ids: list[int]  # every token whose keys/values are held, the shared prefix included
    k: torch.Tensor  # (layers, kv_heads, len(ids) - prefix_len, dim)
    v: torch.Tensor


@dataclass
class RowStore:
    """The keys and values of the last call's rows, after the shared prefix they were computed on."""

    prefix: list[int]
    prefix_k: torch.Tensor | None  # (layers, kv_heads, prefix_len, dim)
    prefix_v: torch.Tensor | None
    weights_version: int
    rows: list[_StoredRow] = field(default_factory=list)
    index: dict[tuple, list[int]] = field(default_factory=dict)
    bytes: int = 0

    KEY = 4  # tokens after the prefix that index a row

    def add(self, row: _StoredRow, budget: int) -> None:
        size = row.k.numel() * row.k.element_size() * 2
        if len(row.ids) - len(self.prefix) < self.KEY or self.bytes + size > budget:
            return
        self.bytes += size
        self.index.setdefault(tuple(row.ids[len(self.prefix):len(self.prefix) + self.KEY]), []).append(len(self.rows))
        self.rows.append(row)

    def match(self, ids: list[int]) -> tuple[int, _StoredRow | None]:
        """The stored row sharing the most tokens with ``ids`` after the prefix, and how many it shares
        (at most ``len(ids) - len(prefix) - 1``: the last token is always computed, for its logits)."""
        n_prefix = len(self.prefix)
        best, best_row = 0, None
        for i in self.index.get(tuple(ids[n_prefix:n_prefix + self.KEY]), ()):
            row = self.rows[i]
            limit = min(len(row.ids), len(ids) - 1)
            n = n_prefix
            while n < limit and row.ids[n] == ids[n]:
                n += 1
            if n - n_prefix > best:
                best, best_row = n - n_prefix, row
        return best, best_row


def top_p_nucleus(logits: torch.Tensor, top_p: float, k: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's nucleus of ``logits`` (rows, vocab): the most probable tokens while the mass ranked
    above each is below ``top_p``, as transformers' ``TopPLogitsWarper`` keeps them.

    Returns (ids, probs), both (rows, n): token ids by descending probability and their
    probabilities, 0 past the row's nucleus. The warper sorts the whole vocabulary of every row
    at every step (about 140 ms for 32 rows of SmolLM2's 49,152 tokens on one core here, as long
    as the model's forward pass); a nucleus is almost always among the few dozen most probable
    tokens, so this reads the ``k`` largest logits and looks further only while some row's nucleus
    does not end inside them.

    >>> ids, probs = top_p_nucleus(torch.tensor([[0.0, 3.0, 2.0, -1.0]]), 0.8, k=2)
    >>> ids.tolist(), [round(p, 3) for p in probs[0].tolist()]
    ([[1, 2, 0, 3]], [0.696, 0.256, 0.0, 0.0])
    """
    vocab = logits.shape[-1]
    log_total = torch.logsumexp(logits, dim=-1, keepdim=True)
    while True:
        values, ids = logits.topk(min(k, vocab), dim=-1)  # descending
        probs = (values - log_total).exp()
        keep = probs.cumsum(-1) - probs < top_p  # mass ranked above each token < top_p
        if k >= vocab or not keep[:, -1].any():
            return ids, probs.masked_fill(~keep, 0.0)
        k *= 4


def sample_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """One token a row, drawn from its :func:`top_p_nucleus` (rows,). Same distribution as the
    warper followed by ``torch.multinomial`` over the whole vocabulary, not the same draws."""
    ids, probs = top_p_nucleus(logits, top_p)
    return ids.gather(-1, torch.multinomial(probs, num_samples=1)).squeeze(1)


def weights_version(model) -> int:
    """A number that changes whenever a parameter is modified in place (an optimiser step, a load):
    stored keys/values are only valid for the weights that computed them."""
    return sum(p._version for p in model.parameters())


def common_prefix_length(seqs: list[list[int]]) -> int:
    """Tokens every sequence starts with, leaving at least one token of the shortest.

    >>> common_prefix_length([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]])
    2
    >>> common_prefix_length([[1, 2], [1, 2]])
    1
    """
    shortest = min(len(s) for s in seqs)
    first = seqs[0]
    n = 0
    while n < shortest - 1 and all(s[n] == first[n] for s in seqs):
        n += 1
    return n


def prefix_groups(seqs: list[list[int]], limits: list[int], min_shared: int) -> list[tuple[int, list[int]]]:
    """Split sequences into groups that each share a prefix computed once: [(prefix length, indices)].

    ``limits[i]``: the longest prefix sequence ``i`` may share (positions whose logits are needed
    must stay outside it). The sequences are sorted, so those sharing a prefix lie side by side, and
    cut into runs that maximise the tokens saved, sum over runs of (run size - 1) x prefix length:
    contrast scoring's sequences share a persona (system prompt and demonstrations, a few hundred
    tokens) and, within it, a request; whether the long shared persona or the shorter groups of one
    request save more is decided by that count. Runs that would share fewer than ``min_shared``
    tokens get prefix length 0.

    >>> prefix_groups([[1, 2, 3, 9], [5, 6], [1, 2, 3, 8]], [3, 1, 3], 2)
    [(3, [0, 2]), (0, [1])]
    """
    order = sorted(range(len(seqs)), key=lambda i: seqs[i])
    n = len(order)

    def lcp(a: list[int], b: list[int]) -> int:
        k, m = 0, min(len(a), len(b))
        while k < m and a[k] == b[k]:
            k += 1
        return k

    adjacent = [lcp(seqs[order[k]], seqs[order[k + 1]]) for k in range(n - 1)]
    # best[j]: most tokens saved by cutting order[:j] into runs; cut[j]: where the last run starts
    best, cut = [0] * (n + 1), [0] * (n + 1)
    for j in range(1, n + 1):
        shared = limits[order[j - 1]]
        best[j], cut[j] = best[j - 1], j - 1  # order[j - 1] alone
        for i in range(j - 2, -1, -1):  # the run order[i:j]
            shared = min(shared, adjacent[i], limits[order[i]])
            if shared < min_shared:
                break
            if best[i] + (j - i - 1) * shared > best[j]:
                best[j], cut[j] = best[i] + (j - i - 1) * shared, i
    runs, j = [], n
    while j > 0:
        i = cut[j]
        members = order[i:j]
        shared = min([limits[m] for m in members] + adjacent[i:j - 1]) if len(members) > 1 else 0
        runs.append((shared if shared >= min_shared else 0, sorted(members)))
        j = i
    runs.reverse()
    alone = [m for length, members in runs if length == 0 for m in members]
    return [r for r in runs if r[0] > 0] + ([(0, sorted(alone))] if alone else [])


class PrefixDecoder:
    """Greedy or sampled decoding of many prompts (token ids) with one model, as described above.

    ``stop_ids``: tokens that end a row; ``min_shared_prefix``: shortest common prefix worth its
    own single copy; ``reuse_bytes``: memory kept for the last call's keys/values (0: no reuse).
    """

    def __init__(self, model, stop_ids: list[int], min_shared_prefix: int = 32, reuse_bytes: int = 1 << 30):
        self.model = model
        self.stop_ids = list(stop_ids)
        self.min_shared_prefix = min_shared_prefix
        self.reuse_bytes = reuse_bytes
        self.store: RowStore | None = None
        # tokens of the last call: computed in prefill, taken from the store instead, shared prefix length
        self.stats = {"prefilled": 0, "reused": 0, "prefix": 0}
        config = model.config
        self.layers = config.num_hidden_layers
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    # ------------------------------------------------------------------ passes

    def _forward(self, kv: KVRows, ids: list[int], positions: list[int], rows: list[int], slots: list[int],
                 keep: list[int] | None) -> torch.Tensor:
        """One forward pass of packed tokens; the logits at the ``keep`` positions (all if None)."""
        device = kv.k.device
        kv.plan(rows, slots)
        out = self.model(input_ids=torch.tensor([ids], device=device),
                         position_ids=torch.tensor([positions], device=device), use_cache=False,
                         logits_to_keep=0 if keep is None else torch.tensor(keep, device=device), kv_rows=kv)
        return out.logits[0].float()  # (kept tokens, vocab)

    def _prefill(self, kv: KVRows, todo: list[tuple[int, list[int], int]], n_prefix: int) -> torch.Tensor:
        """Feed each row's tokens, in chunks of at most ``_PREFILL_TOKENS``; the logits after each row's last.

        todo: (row, tokens, first slot) per row, rows in ascending order. Returns (rows, vocab).
        """
        flat = [(row, tok, slot + i) for row, tokens, slot in todo for i, tok in enumerate(tokens)]
        last = {row: slot + len(tokens) - 1 for row, tokens, slot in todo}
        logits: dict[int, torch.Tensor] = {}
        for start in range(0, len(flat), _PREFILL_TOKENS):
            chunk = flat[start:start + _PREFILL_TOKENS]
            keep = [j for j, (row, _, slot) in enumerate(chunk) if slot == last[row]]
            out = self._forward(kv, [t for _, t, _ in chunk], [n_prefix + s for _, _, s in chunk],
                                [r for r, _, _ in chunk], [s for _, _, s in chunk], keep)
            for j, i in enumerate(keep):
                logits[chunk[i][0]] = out[j]
        return torch.stack([logits[row] for row, _, _ in todo])

    def _prefix(self, encoded: list[list[int]]):
        """The shared prefix of this call, its keys/values and the store of reusable rows for it."""
        n = common_prefix_length(encoded) if len(encoded) > 1 else 0
        store = self.store
        if store is not None and store.weights_version != weights_version(self.model):
            store = None
        if store is not None:
            p = len(store.prefix)
            if (p <= n and encoded[0][:p] == store.prefix
                    and (p >= self.min_shared_prefix or n < self.min_shared_prefix)):
                return store.prefix, store.prefix_k, store.prefix_v, store
        if n < self.min_shared_prefix:
            return [], None, None, None
        prefix = encoded[0][:n]
        param = next(self.model.parameters())
        kv = KVRows(self.layers, 1, self.kv_heads, n, self.head_dim, param.dtype, param.device)
        self._prefill(kv, [(0, prefix, 0)], 0)
        return prefix, kv.k[:, 0], kv.v[:, 0], None

    # ----------------------------------------------------------------- scoring

    def score(self, encoded: list[list[int]], starts: list[int], tokens_per_pass: int = 1024) -> list[list[float]]:
        """log P(token | tokens before it) for ``encoded[i][starts[i]:]``, each ``starts[i] >= 1``.

        The sequences are grouped by :func:`prefix_groups`; each group's prefix is run once (one
        row) and its rows' remaining tokens are fed packed, ``tokens_per_pass`` at a time, attending
        to that one copy. Only the positions that predict a scored token are projected on the
        vocabulary, and the log-softmax is read off without a normalised copy of the logits.
        """
        results: list[list[float]] = [[] for _ in encoded]
        param = next(self.model.parameters())
        limits = [s - 1 for s in starts]  # position starts[i] - 1 predicts the first scored token
        groups = prefix_groups(encoded, limits, self.min_shared_prefix)
        self.stats = {"prefilled": sum(len(encoded[m]) - n for n, members in groups for m in members),
                      "reused": 0, "prefix": sum(n for n, _ in groups)}
        with _shared_prefix_attention(self.model):
            for n_prefix, members in groups:
                prefix_k = prefix_v = None
                if n_prefix:
                    kv = KVRows(self.layers, 1, self.kv_heads, n_prefix, self.head_dim, param.dtype, param.device)
                    self._forward(kv, encoded[members[0]][:n_prefix], list(range(n_prefix)), [0] * n_prefix,
                                  list(range(n_prefix)), [n_prefix - 1])
                    prefix_k, prefix_v = kv.k[:, 0], kv.v[:, 0]
                # rows in passes of about tokens_per_pass tokens (one row may exceed it alone)
                passes, current, size = [], [], 0
                for m in sorted(members, key=lambda m: -len(encoded[m])):
                    rest = len(encoded[m]) - n_prefix
                    if current and size + rest > tokens_per_pass:
                        passes.append(current)
                        current, size = [], 0
                    current.append(m)
                    size += rest
                if current:
                    passes.append(current)
                for rows in passes:
                    tails = [encoded[m][n_prefix:] for m in rows]
                    kv = KVRows(self.layers, len(rows), self.kv_heads, max(len(t) for t in tails), self.head_dim,
                                param.dtype, param.device, prefix_k, prefix_v)
                    ids, positions, row_of, slots, keep, targets = [], [], [], [], [], []
                    for b, (m, tail) in enumerate(zip(rows, tails, strict=True)):
                        first = starts[m] - 1 - n_prefix  # slot whose logits predict the first scored token
                        for slot, tok in enumerate(tail):
                            if first <= slot < len(tail) - 1:
                                keep.append(len(ids))
                                targets.append(tail[slot + 1])
                            ids.append(tok)
                            positions.append(n_prefix + slot)
                            row_of.append(b)
                            slots.append(slot)
                    logits = self._forward(kv, ids, positions, row_of, slots, keep)  # (kept, vocab)
                    target = torch.tensor(targets, device=logits.device)
                    logp = (logits.gather(-1, target[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)).tolist()
                    at = 0
                    for m in rows:
                        count = len(encoded[m]) - starts[m]
                        results[m] = logp[at:at + count]
                        at += count
        return results

    # -------------------------------------------------------------- generation

    def generate(self, encoded: list[list[int]], batches: list[list[int]], max_new_tokens: int,
                 pick, on_batch=None) -> list[list[int]]:
        """Generated token ids for each prompt (stop token included when one came).

        batches: indices into ``encoded``, one list per batch; ``pick(logits, step) -> ids`` chooses
        the next token of each row (step 0 is the first generated token); ``on_batch(index, rows,
        generated)`` is called before (generated None) and after each batch.
        """
        with _shared_prefix_attention(self.model):
            prefix, prefix_k, prefix_v, old = self._prefix(encoded)
            self.stats = {"prefilled": 0, "reused": 0, "prefix": len(prefix)}
            version = weights_version(self.model)
            new_store = RowStore(prefix, prefix_k, prefix_v, version) if self.reuse_bytes > 0 else None
            results: list[list[int]] = [[] for _ in encoded]
            for batch_index, rows in enumerate(batches):
                if on_batch is not None:
                    on_batch(batch_index, rows, None)
                seqs = [encoded[i] for i in rows]
                generated = self._batch(seqs, prefix, prefix_k, prefix_v, old, new_store, max_new_tokens, pick)
                for i, ids in zip(rows, generated, strict=True):
                    results[i] = ids
                if on_batch is not None:
                    on_batch(batch_index, rows, generated)
        self.store = new_store
        return results

    def _batch(self, seqs, prefix, prefix_k, prefix_v, old: RowStore | None, new_store: RowStore | None,
               max_new_tokens: int, pick) -> list[list[int]]:
        n_prefix = len(prefix)
        param = next(self.model.parameters())
        lengths = [len(s) - n_prefix for s in seqs]  # tokens of each row in its buffer before generating
        kv = KVRows(self.layers, len(seqs), self.kv_heads, max(lengths) + max_new_tokens, self.head_dim,
                    param.dtype, param.device, prefix_k, prefix_v)
        todo = []
        for b, s in enumerate(seqs):
            reused, row = old.match(s) if old is not None else (0, None)
            if reused:
                kv.k[:, b, :, :reused] = row.k[:, :, :reused]
                kv.v[:, b, :, :reused] = row.v[:, :, :reused]
            todo.append((b, s[n_prefix + reused:], reused))
            self.stats["prefilled"] += len(s) - n_prefix - reused
            self.stats["reused"] += reused
        next_ids = pick(self._prefill(kv, todo, n_prefix), 0).tolist()

        generated = [[t] for t in next_ids]
        live = list(range(len(seqs)))  # the original row of each buffer row
        running = [t not in self.stop_ids for t in next_ids]
        fed = list(lengths)  # tokens in each buffer row = the slot of its next token
        for step in range(1, max_new_tokens):
            if not any(running):
                break
            stopped = len(running) - sum(running)
            if stopped and stopped * 8 >= len(running):  # drop finished rows once they are an eighth
                keep = [j for j, go in enumerate(running) if go]
                self._store_rows(kv, [j for j, go in enumerate(running) if not go], live, seqs, generated, fed,
                                 new_store)
                kv.keep(keep)
                live = [live[j] for j in keep]
                fed = [fed[j] for j in keep]
                next_ids = [next_ids[j] for j in keep]
                running = [True] * len(keep)
            logits = self._forward(kv, next_ids, [n_prefix + f for f in fed], list(range(len(live))), fed, None)
            fed = [f + 1 for f in fed]
            next_ids = pick(logits, step).tolist()
            for j, t in enumerate(next_ids):
                if running[j]:
                    generated[live[j]].append(t)
                    running[j] = t not in self.stop_ids
        self._store_rows(kv, list(range(len(live))), live, seqs, generated, fed, new_store)
        return generated

    def _store_rows(self, kv: KVRows, buffer_rows: list[int], live: list[int], seqs, generated, fed,
                    store: RowStore | None) -> None:
        """Keep the keys/values of these rows (their prompt and every generated token but the last,
        which was never fed) for the next call."""
        if store is None:
            return
        n_prefix = len(store.prefix)
        for j in buffer_rows:
            b = live[j]
            ids = seqs[b] + generated[b][:-1]
            n = len(ids) - n_prefix
            if n > fed[j]:  # a finished row was fed more (ignored) tokens than it kept; never fewer
                raise AssertionError("row buffer shorter than its tokens")
            store.add(_StoredRow(ids, kv.k[:, j, :, :n].clone(), kv.v[:, j, :, :n].clone()), self.reuse_bytes)
