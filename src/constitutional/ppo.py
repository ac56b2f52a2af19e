"""PPO maths for stage 5 (RL from AI feedback), as pure tensor functions.

TRL no longer ships PPO, so the toolkit carries its own. This module holds the equations;
the training loop (rollouts, value head, epochs over minibatches) builds on them.

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

import torch


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
