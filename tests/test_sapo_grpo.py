"""GRPO math of SAPO: advantages, clipped objective, k3 KL, token log-probs, against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from training.grpo import grpo_loss, group_advantages, kl_k3, token_logprobs

D = torch.float64


def test_group_advantages_hand_values():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 4.0, 6.0, 8.0], dtype=D)
    a = group_advantages(r, 4, eps=0.0)
    # group 1: mean .25, sample std sqrt((.75^2 + 3 * .25^2) / 3) = .5
    # group 2: mean 5, sample std sqrt((9 + 1 + 1 + 9) / 3) = sqrt(20 / 3)
    s2 = math.sqrt(20 / 3)
    expected = [1.5, -0.5, -0.5, -0.5, -3 / s2, -1 / s2, 1 / s2, 3 / s2]
    assert torch.allclose(a, torch.tensor(expected, dtype=D), rtol=0, atol=1e-15)
    # eps in the denominator, and centring only (Dr. GRPO)
    assert torch.allclose(group_advantages(r[:4], 4, eps=0.5), torch.tensor([0.75, -0.25, -0.25, -0.25], dtype=D))
    assert torch.allclose(group_advantages(r[:4], 4, scale=False), torch.tensor([0.75, -0.25, -0.25, -0.25], dtype=D))


def test_group_advantages_equal_rewards_are_zero_and_bad_shapes_raise():
    assert torch.equal(group_advantages(torch.full((3,), 0.7, dtype=D), 3), torch.zeros(3, dtype=D))
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(torch.zeros(5), 2)


def _case():
    # Two completions, three positions; the last token of completion 2 is padding.
    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -2.0, -3.0]], dtype=D)
    ratios = torch.tensor([[1.5, 0.5, 1.0], [1.5, 0.5, 1.0]], dtype=D)
    logp = (old + ratios.log()).clone().requires_grad_(True)
    adv = torch.tensor([1.0, -1.0], dtype=D)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=D)
    return logp, old, adv, mask


def test_clipped_objective_token_level_hand_values():
    logp, old, adv, mask = _case()
    loss, st = grpo_loss(logp, old, adv, mask, epsilon=0.2)
    # A = +1: min(1.5, 1.2) = 1.2 (clipped), min(.5, .8) = .5, 1.0
    # A = -1: min(-1.5, -1.2) = -1.5, min(-.5, -.8) = -.8 (clipped); third token masked
    per_token = [-1.2, -0.5, -1.0, 1.5, 0.8]
    assert loss.item() == pytest.approx(sum(per_token) / 5, abs=1e-15)
    assert st["tokens"].item() == 5
    assert st["clipped_sum"].item() == 2
    assert st["kl_sum"].item() == 0
    loss.backward()
    # d loss / d logp = -A * ratio / N where the unclipped term is the minimum, 0 where clipped or masked.
    expected = torch.tensor([[0.0, -0.5 / 5, -1.0 / 5], [1.5 / 5, 0.0, 0.0]], dtype=D)
    assert torch.allclose(logp.grad, expected, atol=1e-15)


def test_epsilon_high_and_sequence_loss_and_global_token_count():
    logp, old, adv, mask = _case()
    loss, st = grpo_loss(logp, old, adv, mask, epsilon=0.2, epsilon_high=0.6)
    # A = +1 ratio 1.5 is now inside [0.8, 1.6]: 1.5 instead of 1.2
    assert loss.item() == pytest.approx((-1.5 - 0.5 - 1.0 + 1.5 + 0.8) / 5, abs=1e-15)
    assert st["clipped_sum"].item() == 1
    seq, _ = grpo_loss(logp, old, adv, mask, epsilon=0.2, loss_type="sequence")
    assert seq.item() == pytest.approx(((-1.2 - 0.5 - 1.0) / 3 + (1.5 + 0.8) / 2) / 2, abs=1e-15)
    # num_tokens: the global batch's token count replaces the local one (gradient accumulation / DDP)
    glob, _ = grpo_loss(logp, old, adv, mask, epsilon=0.2, num_tokens=10)
    assert glob.item() == pytest.approx((-1.2 - 0.5 - 1.0 + 1.5 + 0.8) / 10, abs=1e-15)


def test_kl_k3_and_beta_term():
    logp, old, adv, mask = _case()
    ref = torch.tensor([[-0.9, -2.5, -0.5], [-1.2, -2.0, -9.0]], dtype=D)
    lp = logp.detach()
    k3 = kl_k3(lp, ref)
    for i in range(2):
        for j in range(3):
            d = ref[i, j].item() - lp[i, j].item()
            assert k3[i, j].item() == pytest.approx(math.exp(d) - d - 1, abs=1e-14)
    assert (k3 >= 0).all()
    assert kl_k3(lp, lp).abs().max().item() == 0.0
    beta = 0.1
    loss, st = grpo_loss(logp, old, adv, mask, epsilon=0.2, beta=beta, ref_logp=ref)
    kl_masked = (k3 * mask).sum().item()
    assert st["kl_sum"].item() == pytest.approx(kl_masked, abs=1e-14)
    assert loss.item() == pytest.approx((-1.2 - 0.5 - 1.0 + 1.5 + 0.8 + beta * kl_masked) / 5, abs=1e-14)
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(logp, old, adv, mask, beta=0.1)


def test_on_policy_ratio_is_one_and_gradient_is_advantage_weighted():
    torch.manual_seed(0)
    logp = torch.randn(4, 5, dtype=D).requires_grad_(True)
    adv = torch.tensor([1.0, -1.0, 0.5, 0.0], dtype=D)
    mask = torch.ones(4, 5, dtype=D)
    loss, st = grpo_loss(logp, logp.detach(), adv, mask)
    assert st["clipped_sum"].item() == 0 and st["ratio_sum"].item() == pytest.approx(20.0)
    loss.backward()
    assert torch.allclose(logp.grad, -adv.unsqueeze(1).expand(4, 5) / 20)


def test_token_logprobs_equals_log_softmax():
    torch.manual_seed(1)
    logits = torch.randn(3, 4, 11, dtype=D)
    targets = torch.randint(0, 11, (3, 4))
    expected = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(token_logprobs(logits, targets), expected, atol=1e-14)
    assert token_logprobs(logits.float(), targets).dtype == torch.float32


def test_sampling_logits_are_transformers_warpers_and_bad_values_raise():
    """Temperature then top-p, as generate's TemperatureLogitsWarper and TopPLogitsWarper; the nucleus is
    renormalised by token_logprobs, and a token outside it is -inf."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    from training.grpo import sampling_logits

    torch.manual_seed(0)
    logits = torch.randn(3, 5, 50, dtype=torch.float64) * 3
    flat = logits.reshape(-1, 50)
    want = TopPLogitsWarper(0.7)(None, TemperatureLogitsWarper(0.8)(None, flat.clone())).reshape(3, 5, 50)
    got = sampling_logits(logits, 0.8, 0.7)
    assert torch.equal(torch.isinf(got), torch.isinf(want)) and torch.isinf(got).any()
    assert torch.allclose(got[~torch.isinf(got)], want[~torch.isinf(want)], atol=0, rtol=1e-15)
    targets = torch.randint(0, 50, (3, 5))
    lp = token_logprobs(logits, targets, temperature=0.8, top_p=0.7)
    ref = torch.log_softmax(want, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    assert torch.equal(torch.isinf(lp), torch.isinf(ref)) and torch.allclose(lp[~lp.isinf()], ref[~ref.isinf()])
    assert torch.equal(sampling_logits(logits, 1.0, 1.0), logits)
    for t, p in ((0.0, 1.0), (1.0, 0.0), (1.0, 1.5)):
        with pytest.raises(ValueError, match="temperature" if t == 0 else "top_p"):
            sampling_logits(logits, t, p)
