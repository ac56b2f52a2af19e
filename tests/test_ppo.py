"""PPO maths against values computed by hand."""

import math

import pytest
import torch

from constitutional import ppo


def test_gae_matches_hand_computation():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 0.7]])
    mask = torch.ones(1, 3)
    gamma, lam = 0.9, 0.8
    # t=2: delta = 1 - 0.7 = 0.3;                   A2 = 0.3
    # t=1: delta = 0 + 0.9*0.7 - 0.6 = 0.03;         A1 = 0.03 + 0.72*0.3 = 0.246
    # t=0: delta = 0 + 0.9*0.6 - 0.5 = 0.04;         A0 = 0.04 + 0.72*0.246 = 0.21712
    adv, ret = ppo.gae(rewards, values, mask, gamma, lam)
    assert adv[0].tolist() == pytest.approx([0.21712, 0.246, 0.3])
    assert ret[0].tolist() == pytest.approx([0.71712, 0.846, 1.0])


def test_gae_ignores_padding():
    """A padded copy of a short response gets the same advantages on its real tokens."""
    short, _ = ppo.gae(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.2, 0.4]]), torch.ones(1, 2), 1.0, 0.95)
    padded, ret = ppo.gae(torch.tensor([[0.0, 1.0, 5.0]]), torch.tensor([[0.2, 0.4, 9.0]]),
                          torch.tensor([[1, 1, 0]]), 1.0, 0.95)
    assert padded[0, :2].tolist() == pytest.approx(short[0].tolist())
    assert padded[0, 2].item() == 0 and ret[0, 2].item() == 0


def test_kl_rewards_put_the_score_on_the_last_real_token():
    logp = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-2.0, -1.0, -1.0], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    r = ppo.kl_penalised_rewards(torch.tensor([2.0, -1.0]), logp, ref, mask, kl_coef=0.5)
    assert r.tolist() == [[-0.5, 0.0, 2.0], [-1.0, 0.0, 0.0]]


def test_clipped_policy_loss_by_hand():
    adv = torch.tensor([[1.0, -1.0, 2.0]])
    logp_old = torch.zeros(1, 3)
    logp_new = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))  # ratios 1.5, 0.5, 1.1
    loss, frac = ppo.policy_loss(logp_new, logp_old, adv, torch.ones(1, 3), clip=0.2)
    # token 1: min(1.5*1, 1.2*1) = 1.2; token 2: min(0.5*-1, 0.8*-1) = -0.8; token 3: min(2.2, 2.2) = 2.2
    assert loss.item() == pytest.approx(-(1.2 - 0.8 + 2.2) / 3)
    assert frac.item() == pytest.approx(2 / 3)


def test_clipped_value_loss_by_hand():
    v_old = torch.tensor([[0.0, 0.0]])
    v_new = torch.tensor([[1.0, 0.1]])
    returns = torch.tensor([[1.0, 1.0]])
    loss = ppo.value_loss(v_new, v_old, returns, torch.ones(1, 2), clip=0.2)
    # token 1: max((1-1)^2, (0.2-1)^2) = 0.64; token 2: max((0.1-1)^2, (0.1-1)^2) = 0.81
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.81) / 2)


def test_whiten_zero_mean_unit_variance_on_real_tokens():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    w = ppo.masked_whiten(x, mask)
    assert ppo.masked_mean(w, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert ppo.masked_mean(w**2, mask).item() == pytest.approx(1.0, abs=1e-5)
    assert w[0, 3].item() == 0
    assert math.isfinite(ppo.masked_whiten(torch.zeros(1, 2), torch.ones(1, 2)).sum().item())
