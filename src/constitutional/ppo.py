"""PPO for stage 5 (RL from AI feedback): the equations as pure tensor functions, then one step
of the training loop (rollouts, a value head, several epochs over minibatches) built on them.

TRL no longer ships PPO, so the toolkit carries its own, compact one. The paper (Bai et al.
2022, section 4) trains the SL-CAI policy with PPO against the preference model, with a KL
penalty towards the SL-CAI model; ``stages/rl/ppo.py`` runs it (``cai rl``).

One step (``ppo_step``):

1. rollout: the policy samples one response per prompt; the reward function scores it; the
   policy (with its value head) and the frozen reference give per-token log-probs and values;
2. rewards: the per-token KL penalty with the score at the last token (below); advantages and
   value targets by GAE; advantages whitened over the batch;
3. update: ``ppo_epochs`` passes over the batch in shuffled minibatches, each a gradient step on
   the clipped policy loss plus ``vf_coef`` times the clipped value loss.

The value head is a linear map of the policy's last hidden state (a shared trunk, as in
Ziegler et al. 2019), so one forward pass gives both log-probs and values. Dropout is off
throughout (the model stays in eval mode), so the ratio starts at exactly 1. Log-probs use
the sampling temperature, the distribution the responses were drawn from.

Shapes: B responses, T response tokens (right-padded); ``mask`` (B, T) is 1 on real tokens.

Rewards (Ziegler et al. 2019; Stiennon et al. 2020; the paper's RL stage): a per-token KL
penalty against the frozen SL-CAI reference, with the preference model's score added at each
response's last token:

    r_t = -beta * (log pi(a_t | s_t) - log pi_ref(a_t | s_t)) + [t = last] * score

Generalised advantage estimation (Schulman et al. 2016), with V = 0 after the last token:

    delta_t = r_t + gamma * V_{t+1} - V_t
    A_t     = delta_t + gamma * lambda * A_{t+1}
    R_t     = A_t + V_t                      (the value target)

Clipped policy loss (Schulman et al. 2017), ratio rho_t = exp(log pi_new - log pi_old):

    L_pi = -mean_t min(rho_t * A_t, clip(rho_t, 1 - eps, 1 + eps) * A_t)

Clipped value loss:

    V_clip = V_old + clip(V_new - V_old, -eps_v, eps_v)
    L_V    = 0.5 * mean_t max((V_new - R_t)^2, (V_clip - R_t)^2)

All means are over real tokens only (``masked_mean``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch


@dataclass(frozen=True)
class PpoSettings:
    """What one PPO step needs (the ``rl`` config section documents each field); ``of(section)`` takes them
    from any object that has these attributes."""

    max_new_tokens: int
    min_new_tokens: int
    temperature: float
    top_p: float
    kl_coef: float
    ppo_epochs: int
    minibatch_size: int
    clip_range: float
    value_clip: float
    vf_coef: float
    gamma: float
    lam: float
    whiten_advantages: bool
    max_grad_norm: float

    @classmethod
    def of(cls, section) -> PpoSettings:
        return cls(**{f.name: getattr(section, f.name) for f in fields(cls)})


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over positions where mask is 1.

    >>> masked_mean(torch.tensor([[1.0, 3.0, 100.0]]), torch.tensor([[1, 1, 0]])).item()
    2.0
    """
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over real tokens; padded positions come out 0."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask.to(x.dtype)


def kl_penalised_rewards(scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor,
                         mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards (B, T): -kl_coef * (logp - ref_logp), plus each score at its last real token.

    >>> r = kl_penalised_rewards(torch.tensor([1.0]), torch.tensor([[-1.0, -2.0, 0.0]]),
    ...                          torch.tensor([[-1.5, -2.0, 0.0]]), torch.tensor([[1, 1, 0]]), 0.1)
    >>> [round(v, 4) + 0.0 for v in r[0].tolist()]  # + 0.0 turns -0.0 into 0.0
    [-0.05, 1.0, 0.0]
    """
    m = mask.to(logp.dtype)
    rewards = -kl_coef * (logp - ref_logp) * m
    last = (mask.long().sum(dim=1) - 1).clamp(min=0)  # (B,) index of each response's last real token
    rewards[torch.arange(rewards.shape[0]), last] += scores.to(rewards.dtype)
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and value targets (both (B, T)) by generalised advantage estimation.

    Padded positions get advantage 0 and do not feed back into real ones.
    """
    m = mask.to(rewards.dtype)
    batch, length = rewards.shape
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros(batch, dtype=rewards.dtype, device=rewards.device)
    next_adv = torch.zeros_like(next_value)
    for t in reversed(range(length)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = (delta + gamma * lam * next_adv) * m[:, t]
        advantages[:, t] = adv
        # a padded position passes on nothing: the next real token sees V = 0 and A = 0 after the end
        next_value = values[:, t] * m[:, t]
        next_adv = adv
    return advantages, (advantages + values) * m


def policy_loss(logp_new: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, clip: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipped surrogate loss and the share of real tokens whose ratio was clipped."""
    ratio = torch.exp(logp_new - logp_old)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - clip, 1 + clip) * advantages
    loss = masked_mean(-torch.minimum(unclipped, clipped), mask)
    clip_fraction = masked_mean(((ratio - 1).abs() > clip).to(logp_new.dtype), mask)
    return loss, clip_fraction


def value_loss(values_new: torch.Tensor, values_old: torch.Tensor, returns: torch.Tensor,
               mask: torch.Tensor, clip: float = 0.2) -> torch.Tensor:
    """The clipped value loss, 0.5 * max of the squared errors of the new and the clipped values."""
    clipped = values_old + torch.clamp(values_new - values_old, -clip, clip)
    return 0.5 * masked_mean(torch.maximum((values_new - returns) ** 2, (clipped - returns) ** 2), mask)


# ------------------------------------------------------------------ the model side


class ValueHead(torch.nn.Module):
    """V(s_t) from the policy's last hidden state: (B, T, H) -> (B, T). Starts at exactly 0."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden).squeeze(-1)


@dataclass
class Batch:
    """Prompt-response pairs as tensors: queries left-padded (B, Q), responses right-padded (B, T)."""

    query_ids: torch.Tensor
    query_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor

    @classmethod
    def from_lists(cls, queries: list[list[int]], responses: list[list[int]], pad_id: int) -> Batch:
        q_len = max(len(q) for q in queries)
        t_len = max(len(r) for r in responses)
        query_ids = torch.tensor([[pad_id] * (q_len - len(q)) + q for q in queries])
        query_mask = torch.tensor([[0] * (q_len - len(q)) + [1] * len(q) for q in queries])
        response_ids = torch.tensor([r + [pad_id] * (t_len - len(r)) for r in responses])
        response_mask = torch.tensor([[1] * len(r) + [0] * (t_len - len(r)) for r in responses])
        return cls(query_ids, query_mask, response_ids, response_mask)

    def select(self, rows: torch.Tensor) -> Batch:
        """The given rows, with the padding columns that no selected row needs cut off."""
        qm, rm = self.query_mask[rows], self.response_mask[rows]
        q_keep = int(qm.sum(1).max())
        t_keep = int(rm.sum(1).max())
        return Batch(self.query_ids[rows][:, -q_keep:], qm[:, -q_keep:],
                     self.response_ids[rows][:, :t_keep], rm[:, :t_keep])

    def to(self, device) -> Batch:
        return Batch(*(t.to(device) for t in (self.query_ids, self.query_mask, self.response_ids, self.response_mask)))


def forward(model, value_head: ValueHead | None, batch: Batch, temperature: float = 1.0,
            with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Log-probs (B, T) of the response tokens, values (B, T) and entropies (B, T) in one pass.

    Queries are left-padded, so position ids come from the attention mask, as in generation;
    the logits at the T positions before each response token are the only ones computed.
    """
    input_ids = torch.cat([batch.query_ids, batch.response_ids], dim=1)
    mask = torch.cat([batch.query_mask, batch.response_mask], dim=1)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    t_len = batch.response_ids.shape[1]
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, logits_to_keep=t_len + 1,
                output_hidden_states=value_head is not None, use_cache=False)
    logits = out.logits[:, :-1].float() / temperature  # (B, T, V): position Q-1+t predicts response token t
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, batch.response_ids.unsqueeze(-1)).squeeze(-1)
    values = value_head(out.hidden_states[-1][:, -(t_len + 1):-1].float()) if value_head is not None else None
    entropy = -(logp_all.exp() * logp_all).sum(-1) if with_entropy else None
    return logp, values, entropy


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


@torch.no_grad()
def sample(model, tokenizer, queries: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
           top_p: float = 1.0, greedy: bool = False, batch_size: int = 32, min_new_tokens: int = 0
           ) -> list[list[int]]:
    """Response token ids for each query, cut after the first stop token (which is kept)."""
    stop = model.generation_config.eos_token_id if model.generation_config is not None else None
    stop = {stop} if isinstance(stop, int) else set(stop or [tokenizer.eos_token_id])
    pad_id = _pad_id(tokenizer)
    device = next(model.parameters()).device
    out: list[list[int]] = []
    for start in range(0, len(queries), batch_size):
        chunk = queries[start:start + batch_size]
        b = Batch.from_lists(chunk, [[pad_id]] * len(chunk), pad_id).to(device)
        kwargs = {"do_sample": False} if greedy else {"do_sample": True, "temperature": temperature, "top_p": top_p,
                                                      "top_k": 0}
        generated = model.generate(input_ids=b.query_ids, attention_mask=b.query_mask, max_new_tokens=max_new_tokens,
                                   min_new_tokens=min_new_tokens, pad_token_id=pad_id, **kwargs)
        for row in generated[:, b.query_ids.shape[1]:].tolist():
            ends = [i for i, t in enumerate(row) if t in stop]
            out.append(row[:ends[0] + 1] if ends else row)
    return out


def ppo_step(policy, value_head: ValueHead, ref_model, optimizer: torch.optim.Optimizer, tokenizer,
             queries: list[list[int]], score: Callable[[list[list[int]]], list[float]],
             settings: PpoSettings) -> dict:
    """One PPO step on these queries (token ids); returns its metrics (``reward``: the mean score).

    ``score`` maps the responses (token ids) to rewards. ``ref_model`` None means the policy is a
    PEFT model whose adapter, switched off, is the reference.
    """
    s = settings
    device = next(policy.parameters()).device
    pad_id = _pad_id(tokenizer)

    # 1. rollout
    responses = sample(policy, tokenizer, queries, s.max_new_tokens, s.temperature, s.top_p,
                       min_new_tokens=s.min_new_tokens)
    scores = torch.tensor(score(responses), dtype=torch.float32, device=device)
    batch = Batch.from_lists(queries, responses, pad_id).to(device)
    mask = batch.response_mask
    with torch.no_grad():
        old_logp, old_values, _ = forward(policy, value_head, batch, s.temperature)
        if ref_model is None:
            with policy.disable_adapter():
                ref_logp, _, _ = forward(policy, None, batch, s.temperature)
        else:
            ref_logp, _, _ = forward(ref_model, None, batch, s.temperature)

        # 2. rewards, advantages, value targets
        rewards = kl_penalised_rewards(scores, old_logp, ref_logp, mask, s.kl_coef)
        advantages, returns = gae(rewards, old_values, mask, s.gamma, s.lam)
        if s.whiten_advantages and int(mask.sum()) > 1:
            advantages = masked_whiten(advantages, mask)
        log_ratio_ref = (old_logp - ref_logp) * mask

    # 3. update: epochs over shuffled minibatches
    params = [p for group in optimizer.param_groups for p in group["params"]]
    n = len(queries)
    stats: dict[str, list[float]] = {"policy_loss": [], "value_loss": [], "clip_fraction": [], "approx_kl": [],
                                     "entropy": []}
    for _ in range(s.ppo_epochs):
        for rows in torch.randperm(n).split(s.minibatch_size):
            sub = batch.select(rows)
            m = sub.response_mask
            t_keep = m.shape[1]
            logp, values, entropy = forward(policy, value_head, sub, s.temperature, with_entropy=True)
            old = old_logp[rows][:, :t_keep]
            p_loss, clip_fraction = policy_loss(logp, old, advantages[rows][:, :t_keep], m, s.clip_range)
            v_loss = value_loss(values, old_values[rows][:, :t_keep], returns[rows][:, :t_keep], m, s.value_clip)
            loss = p_loss + s.vf_coef * v_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
            optimizer.step()
            with torch.no_grad():
                stats["policy_loss"].append(p_loss.item())
                stats["value_loss"].append(v_loss.item())
                stats["clip_fraction"].append(clip_fraction.item())
                stats["approx_kl"].append(masked_mean(0.5 * (logp - old) ** 2, m).item())
                stats["entropy"].append(masked_mean(entropy, m).item())

    lengths = mask.sum(1).float()
    metrics = {
        "reward": scores.mean().item(),
        "kl": (log_ratio_ref.sum() / mask.sum()).item(),  # per token, as TRL's RLOO reports it
        "kl_sequence": log_ratio_ref.sum(1).mean().item(),
        "response_length": lengths.mean().item(),
        **{k: sum(v) / len(v) for k, v in stats.items()},
    }
    return metrics


# ------------------------------------------------------------------ optimizer state as safetensors


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """The optimizer's state as flat named tensors (for safetensors) plus its param groups (for JSON)."""
    state = optimizer.state_dict()
    tensors = {}
    for index, entry in state["state"].items():
        for name, value in entry.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{index}.{name}"] = t.detach().cpu().contiguous()
    return tensors, state["param_groups"]


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                           param_groups: list[dict]) -> None:
    """Inverse of ``optimizer_tensors``."""
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})
