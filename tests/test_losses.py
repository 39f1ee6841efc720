"""pmd.py losses: the divergence family, distill_loss (full, top-k, sampled token, masking, IS clip), GRPO."""
import pytest
import torch
import torch.nn.functional as F

from model import GPT, GPTConfig, encode
from pmd import distill_loss, divergence, grpo_advantages, pg_loss, token_logprobs, topk_with_tail
from warmup import sft_loss

B, L, V = 3, 5, 256


def logits(seed, scale=2.0):
    return torch.randn(B, L, V, generator=torch.Generator().manual_seed(seed)) * scale


def targets_and_mask(lengths=(5, 3, 1)):
    g = torch.Generator().manual_seed(99)
    t = torch.randint(0, V, (B, L), generator=g)
    mask = torch.zeros(B, L)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        t[i, n:] = -1
    return t, mask


def kl(lp, lq):
    """KL(p || q) from log-probabilities, written out term by term."""
    return torch.where(lp.exp() > 0, lp.exp() * (lp - lq), torch.zeros_like(lp)).sum(-1)


def sgd_step(x, loss, lr):
    (g,) = torch.autograd.grad(loss, x)
    return (x - lr * g).detach()


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
def test_divergence_is_zero_when_teacher_equals_student(alpha):
    """D(p, p) = 0 for every alpha."""
    ls = F.log_softmax(logits(0), -1)
    assert divergence(ls, ls.clone(), alpha).abs().max() < 1e-5


@pytest.mark.parametrize("alpha", [0.3, 0.5])
def test_divergence_is_positive_between_different_distributions(alpha):
    """D(p, q) > 0 when p != q (the interpolated divergences are proper)."""
    ls, lt = F.log_softmax(logits(0), -1), F.log_softmax(logits(1), -1)
    assert (divergence(ls, lt, alpha) > 1e-3).all()


def test_alpha_endpoints_are_forward_and_reverse_kl():
    """alpha=0 is KL(teacher||student), alpha=1 is KL(student||teacher), and they differ."""
    ls, lt = F.log_softmax(logits(0), -1), F.log_softmax(logits(1), -1)
    torch.testing.assert_close(divergence(ls, lt, 0.0), kl(lt, ls))
    torch.testing.assert_close(divergence(ls, lt, 1.0), kl(ls, lt))
    torch.testing.assert_close(divergence(ls, lt, 0.0), F.kl_div(ls, lt, log_target=True, reduction="none").sum(-1))
    assert (divergence(ls, lt, 0.0) - divergence(ls, lt, 1.0)).abs().max() > 1e-2


def test_generalised_jsd_matches_its_definition():
    """0 < alpha < 1: alpha KL(t||M) + (1-alpha) KL(s||M) with M = (1-alpha) p_s + alpha p_t."""
    ls, lt = F.log_softmax(logits(0), -1), F.log_softmax(logits(1), -1)
    for a in (0.3, 0.5):
        lm = ((1 - a) * ls.exp() + a * lt.exp()).log()
        torch.testing.assert_close(divergence(ls, lt, a), a * kl(lt, lm) + (1 - a) * kl(ls, lm))


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_distill_gradient_step_moves_student_towards_teacher(alpha):
    """One gradient step on the student's logits lowers the divergence at every unmasked position."""
    s, t = logits(0).requires_grad_(), logits(1)
    tg, m = targets_and_mask()
    s2 = sgd_step(s, distill_loss(s, t, tg, m, alpha=alpha), lr=1.0)
    ls, ls2, lt = (F.log_softmax(x, -1) for x in (s.detach(), s2, t))
    before, after = divergence(ls, lt, alpha), divergence(ls2, lt, alpha)
    assert (after < before)[m.bool()].all()
    assert torch.equal(after[~m.bool()], before[~m.bool()])  # masked positions get no gradient


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_topk_gradient_step_moves_student_towards_teacher(alpha):
    """With top-k plus a tail bucket, a gradient step lowers the top-k divergence."""
    s, t = logits(0).requires_grad_(), logits(1)
    tg, m = targets_and_mask()
    s2 = sgd_step(s, distill_loss(s, t, tg, m, alpha=alpha, topk=8), lr=0.5)
    lt = F.log_softmax(t, -1)
    d = lambda x: divergence(*topk_with_tail(F.log_softmax(x, -1), lt, 8), alpha)
    assert (d(s2) < d(s.detach()))[m.bool()].all()


def test_topk_with_tail_is_a_distribution():
    """The top-k probabilities plus the tail bucket sum to one for student and teacher."""
    ls, lt = F.log_softmax(logits(0), -1), F.log_softmax(logits(1), -1)
    a, b = topk_with_tail(ls, lt, 5)
    assert a.shape[-1] == b.shape[-1] == 6
    torch.testing.assert_close(a.exp().sum(-1), torch.ones(B, L))
    torch.testing.assert_close(b.exp().sum(-1), torch.ones(B, L))


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_topk_with_the_whole_vocabulary_equals_the_full_divergence(alpha):
    """k = vocabulary size gives the full-distribution loss."""
    s, t = logits(0), logits(1)
    tg, m = targets_and_mask()
    torch.testing.assert_close(distill_loss(s, t, tg, m, alpha=alpha, topk=V), distill_loss(s, t, tg, m, alpha=alpha),
                               atol=1e-4, rtol=1e-4)


def test_sampled_token_step_moves_logp_towards_teacher():
    """The sampled-token estimator moves log p_s(y) towards log p_t(y), at every unmasked position."""
    s, t = logits(0).requires_grad_(), logits(1)
    tg, m = targets_and_mask()
    s2 = sgd_step(s, distill_loss(s, t, tg, m, sampled_token=True), lr=0.5)
    lt_y = token_logprobs(t, tg)
    gap_before, gap_after = token_logprobs(s.detach(), tg) - lt_y, token_logprobs(s2, tg) - lt_y
    on = m.bool()
    assert (gap_after.abs() < gap_before.abs())[on].all()
    assert (gap_before[on] > 0).any() and (gap_before[on] < 0).any()  # both directions are exercised


def test_sampled_token_loss_is_zero_gradient_when_teacher_agrees():
    """If teacher and student give the sampled token the same log-prob, the estimator has no gradient."""
    s = logits(0).requires_grad_()
    tg, m = targets_and_mask()
    (g,) = torch.autograd.grad(distill_loss(s, s.detach().clone(), tg, m, sampled_token=True), s)
    assert g.abs().max() == 0


@pytest.mark.parametrize("kw", [dict(alpha=0.0), dict(alpha=0.5), dict(alpha=1.0, topk=4), dict(sampled_token=True)])
def test_masked_positions_do_not_contribute(kw):
    """Changing the logits of masked positions changes neither the loss nor the other gradients."""
    s, t = logits(0), logits(1)
    tg, m = targets_and_mask()
    s_other, t_other = s.clone(), t.clone()
    s_other[~m.bool()] = logits(7)[~m.bool()]
    t_other[~m.bool()] = logits(8)[~m.bool()]
    torch.testing.assert_close(distill_loss(s, t, tg, m, **kw), distill_loss(s_other, t_other, tg, m, **kw))
    x = s.clone().requires_grad_()
    (g,) = torch.autograd.grad(distill_loss(x, t, tg, m, **kw), x)
    assert g[~m.bool()].abs().max() == 0 and g[m.bool()].abs().max() > 0


def test_loss_is_a_token_mean_over_unmasked_positions():
    """The full loss is the mean of the per-position divergence over the mask."""
    s, t = logits(0), logits(1)
    tg, m = targets_and_mask()
    per = divergence(F.log_softmax(s, -1), F.log_softmax(t, -1), 0.0)
    torch.testing.assert_close(distill_loss(s, t, tg, m, alpha=0.0), per[m.bool()].mean())


def test_is_clip_caps_the_weight():
    """is_clip multiplies by min(p_s/p_old, clip): a tiny p_old gives weight clip, a p_old = p_s gives weight 1."""
    s, t = logits(0), logits(1)
    tg, m = targets_and_mask()
    base = distill_loss(s, t, tg, m, alpha=0.0)
    tiny_old = torch.full((B, L), -50.0)
    torch.testing.assert_close(distill_loss(s, t, tg, m, alpha=0.0, logp_old=tiny_old, is_clip=2.0), 2.0 * base)
    same_old = token_logprobs(s, tg)
    torch.testing.assert_close(distill_loss(s, t, tg, m, alpha=0.0, logp_old=same_old, is_clip=2.0), base)
    half_old = same_old + torch.log(torch.tensor(2.0))  # p_s / p_old = 1/2, under the clip
    torch.testing.assert_close(distill_loss(s, t, tg, m, alpha=0.0, logp_old=half_old, is_clip=2.0), 0.5 * base)


def test_is_clip_weight_is_detached():
    """The clipped weight scales the gradient but is not differentiated through."""
    s, t = logits(0), logits(1)
    tg, m = targets_and_mask()
    x, y = s.clone().requires_grad_(), s.clone().requires_grad_()
    tiny_old = torch.full((B, L), -50.0)
    (g_clip,) = torch.autograd.grad(distill_loss(x, t, tg, m, alpha=0.0, logp_old=tiny_old, is_clip=3.0), x)
    (g_base,) = torch.autograd.grad(distill_loss(y, t, tg, m, alpha=0.0), y)
    torch.testing.assert_close(g_clip, 3.0 * g_base)


# -- GRPO ---------------------------------------------------------------------------------------------------


def test_grpo_advantages_are_zero_mean_per_group():
    """Advantages are r - mean(r) within each group of G, so every group sums to zero."""
    r = torch.tensor([1.0, 0, 0, 1, 1, 1, 0, 1, 0, 0, 0, 0])
    a = grpo_advantages(r, 4)
    torch.testing.assert_close(a.view(3, 4).sum(1), torch.zeros(3))
    torch.testing.assert_close(a[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]))
    assert torch.equal(a[8:], torch.zeros(4))  # equal rewards: no signal


def test_grpo_std_norm_scales_to_unit_std():
    """std_norm divides by the group's std: unit std per mixed group, same signs, and zeros stay zero (no NaN)."""
    r = torch.tensor([1.0, 0, 0, 0, 1, 1, 0, 1, 1, 1, 1, 1])
    a, an = grpo_advantages(r, 4), grpo_advantages(r, 4, std_norm=True)
    torch.testing.assert_close(an.view(3, 4)[:2].std(1), torch.ones(2), atol=1e-3, rtol=1e-3)
    assert torch.equal(torch.sign(a), torch.sign(an)) and torch.isfinite(an).all()
    assert torch.equal(an[8:], torch.zeros(4))


def test_pg_loss_raises_logprob_of_positive_advantage_tokens():
    """A gradient step on pg_loss raises log p of tokens with positive advantage and lowers it for negative."""
    s = logits(0).requires_grad_()
    tg, m = targets_and_mask((4, 4, 4))
    adv = torch.tensor([1.0, -1.0, 0.0])
    s2 = sgd_step(s, pg_loss(token_logprobs(s, tg), adv, m), lr=1.0)
    delta = token_logprobs(s2, tg) - token_logprobs(s.detach(), tg)
    assert (delta[0, :4] > 0).all() and (delta[1, :4] < 0).all() and delta[2].abs().max() == 0


def test_token_logprobs_ignores_minus_one():
    """token_logprobs is log_softmax at the target, and 0 at ignored (-1) targets."""
    s = logits(0)
    tg, _ = targets_and_mask()
    lp = token_logprobs(s, tg)
    i, j = 0, 2
    torch.testing.assert_close(lp[i, j], F.log_softmax(s[i, j], -1)[tg[i, j]])
    assert torch.equal(lp[tg < 0], torch.zeros(int((tg < 0).sum())))


def test_pg_loss_is_a_mean_over_informative_rollouts_only():
    """A rollout with zero advantage (its group all passed or all failed) adds nothing and does not dilute the others:
    the loss equals the token mean over the rollouts with a nonzero advantage."""
    s = logits(0)
    tg, m = targets_and_mask((4, 4, 4))
    lp = token_logprobs(s, tg)
    adv = torch.tensor([1.0, -1.0, 0.0])
    want = -(adv[:2, None] * lp[:2] * m[:2]).sum() / m[:2].sum()
    torch.testing.assert_close(pg_loss(lp, adv, m), want)
    assert pg_loss(lp, torch.zeros(3), m).item() == 0


def test_clipped_pg_loss_matches_the_plain_one_at_the_sampler_and_stops_past_the_clip():
    """Several updates per batch: at the sampler's own log-probs (ratio 1) the clipped loss's gradient is the plain
    one's; once a token's ratio is past 1 + clip with a positive advantage (or below 1 - clip with a negative
    one), its gradient is zero, so a batch cannot push a token arbitrarily far."""
    s = logits(0)
    tg, m = targets_and_mask((4, 4, 4))
    adv = torch.tensor([1.0, -1.0, 0.5])
    grads = []
    for old in (None, token_logprobs(s, tg).detach()):
        x = s.clone().requires_grad_(True)
        loss = pg_loss(token_logprobs(x, tg), adv, m, old)
        loss.backward()
        grads.append((loss.detach(), x.grad))
    torch.testing.assert_close(grads[0][1], grads[1][1])
    torch.testing.assert_close(grads[1][0], -(adv[:, None] * m).sum() / m.sum())  # the surrogate at ratio 1: -mean(adv)
    x = s.clone().requires_grad_(True)
    lp = token_logprobs(x, tg)
    # ratio e^0.5 for rollout 0 (adv > 0), e^-0.5 for 1 (adv < 0)
    old = lp.detach() - torch.tensor([0.5, -0.5, 0.0])[:, None]
    pg_loss(lp, adv, m, old).backward()
    assert x.grad[:2].abs().sum() == 0 and x.grad[2].abs().sum() > 0  # rollout 2 (ratio 1) still learns


# -- sft_loss: the warm-up's, replay's and rft's cross-entropy ----------------------------------------------


def test_sft_loss_is_the_mean_cross_entropy_of_the_completion_tokens_alone():
    """sft_loss: each completion token's cross-entropy given everything before it (context, prompt, the completion so
    far), averaged over all the batch's completion tokens; context and prompt tokens are read, never scored."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(64, 1, 2, 16))
    with torch.no_grad():
        model.wte.weight.mul_(20)  # a sharp model: tokens' losses differ, so what is averaged shows
    examples = [("=A1:ab>rev|ba 1\n", "A1:ab>", "rev|ba\n"), ("", "B22:abc>", "x\n"),
                ("#C3 ok rol 2\n", "C3:a>", "rol|a\n")]
    scored, everything = [], []
    with torch.no_grad():
        for ctx, prompt, completion in examples:
            seq, k = encode(ctx + prompt + completion), len(encode(ctx + prompt))
            nll = -F.log_softmax(model(torch.tensor([seq]))[0, :-1], -1).gather(1, torch.tensor(seq[1:])[:, None])[:, 0]
            scored += nll[k - 1 :].tolist()  # the positions that predict a completion token
            everything += nll.tolist()
        got = sft_loss(model, examples, "cpu").item()
    assert got == pytest.approx(sum(scored) / len(scored), rel=1e-5)
    assert got != pytest.approx(sum(everything) / len(everything), rel=1e-3)  # the prefix is not scored
    per_example = [sum(scored[:7]) / 7, sum(scored[7:9]) / 2, sum(scored[9:]) / 6]
    assert len(scored) == 15 and got != pytest.approx(sum(per_example) / 3, rel=1e-3)  # a token mean
