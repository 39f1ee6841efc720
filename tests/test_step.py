"""pmd.step: rollout -> verify -> memory -> teacher -> losses -> optimizer on a tiny model, for the cases the loop
relies on."""
import inspect
import json
import random

import pytest
import torch

import pmd
from bench import Clock
from conftest import tiny_run
from memory import Memory, counted
from model import completion_logits, encode
from pmd import Rollout, step
from test_reflection import evidence, evidence_of
from verify import HiddenProcedures
from warmup import REFLECTION, sft_loss, warmup_example

TASK = HiddenProcedures(n_groups=1, families_per_group=2, n_train=2, n_heldout=1)
PROBLEMS = TASK.train[:2]


def known():
    """A memory of every training problem's reference trace."""
    mem = Memory()
    mem.update([Rollout(p, TASK.solve(p), [], [], 1, "ok", TASK.strategy(p, TASK.solve(p))) for p in TASK.train])
    return mem


def spy(monkeypatch, module, name):
    """Wrap module.name: the list of its calls, each (arguments by name, result)."""
    calls, real = [], getattr(module, name)

    def wrapper(*a, **k):
        out = real(*a, **k)
        calls.append((inspect.signature(real).bind(*a, **k).arguments, out))
        return out

    monkeypatch.setattr(module, name, wrapper)
    return calls


def run(memory, teacher_noise=0.0, **settings):
    """One pmd.step of a tiny run; the run keeps the step's verified rollouts (r.rolls). teacher_noise perturbs the
    EMA teacher's token embeddings (seeded), so that its distributions are not the student's."""
    r = tiny_run(TASK, memory, **settings)
    with torch.no_grad():
        r.teacher.wte.weight.add_(teacher_noise * torch.randn(r.teacher.wte.weight.shape,
                                                              generator=torch.Generator().manual_seed(1)))
    with pytest.MonkeyPatch.context() as mp:
        verified = spy(mp, pmd, "verify")
        loss, norm, stats, finite = step(r, PROBLEMS)
    (_, r.rolls), = verified
    return r, loss, stats


def batch(r, temperature=1.0):
    """The tiny run's rollouts of PROBLEMS, verified, with one pass per group of 2 (every GRPO advantage is nonzero,
    and SDPO's failed sample has a demonstration)."""
    rolls = pmd.verify(TASK, pmd.rollout(r.model, TASK, PROBLEMS, 2, temperature, torch.Generator().manual_seed(0)))
    for i, x in enumerate(rolls):
        x.reward = int(i % 2 == 0)
    return rolls


def student_logprobs(r, rolls):
    """(log-prob of each completion token under the student, scored as the losses score it, mask)."""
    prompts = [encode(x.problem.prompt) for x in rolls]
    logits, targets = completion_logits(r.student, prompts, [x.tokens for x in rolls], "cpu")
    return pmd.token_logprobs(logits, targets), (targets >= 0).float()


def grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return [p.grad.clone() for p in model.parameters()]


def test_all_masked_step_still_backpropagates():
    """With nothing for the teacher to read, the loss is zero but still a graph: backward works, gradients are zero."""
    r, loss, stats = run(Memory(), memory_steps=0)
    assert loss.item() == 0 and stats["teacher_frac"] == 0
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in r.model.parameters())


def test_pmd_step_distils_towards_a_teacher_with_memory():
    """With a memory of the problems' reference traces, every rollout has a context and the loss has a gradient."""
    r, loss, stats = run(known(), memory_steps=0)
    assert stats["teacher_frac"] == 1 and loss.item() > 0 and stats["distill"] == pytest.approx(loss.item(), rel=1e-5)
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in r.model.parameters())


@pytest.mark.parametrize("method", ["grpo", "sdpo", "pmd"])
def test_step_updates_the_memory_for_every_method(method):
    """Every method feeds its rollouts to the memory (one update, G experiences or fewer per problem)."""
    mem = Memory()
    r, loss, stats = run(mem, method=method)
    assert mem.step == 1 and 1 <= sum(map(len, mem.experience.values())) <= 2 * len(PROBLEMS)
    assert torch.isfinite(loss) and stats["reward"] == sum(x.reward for x in r.rolls) / len(r.rolls)


def test_transient_memory_holds_the_current_batch_only():
    """PMD-Transient: whatever the memory held before, after a step it holds this batch's rollouts and nothing else."""
    mem = Memory()
    other = HiddenProcedures(n_groups=2, families_per_group=2, n_train=2, n_heldout=1, seed=5).train[-1]
    mem.update([Rollout(other, other.solution, [], [], 1, "ok", None)])
    run(mem, transient=True)
    assert set(mem.groups) == {p.family for p in PROBLEMS} and mem.step == 2
    assert sum(map(len, mem.experience.values())) <= 2 * len(PROBLEMS)


def test_a_frozen_policy_only_feeds_the_memory(monkeypatch):
    """The paper's frozen policy: its weights and the optimizer never move, and the memory still gets the rollouts
    (here three references and a garbage line: the step's reward is their mean, 0.75)."""
    mem = Memory()
    r = tiny_run(TASK, mem, policy_frozen=True)
    texts = [TASK.solve(PROBLEMS[0]), "rev|x\n", TASK.solve(PROBLEMS[1]), TASK.solve(PROBLEMS[1])]
    rolls = [Rollout(PROBLEMS[i // 2], y, encode(y), [-1.0] * len(y)) for i, y in enumerate(texts)]
    monkeypatch.setattr(pmd, "rollout", lambda *a, **k: rolls)
    before = [p.detach().clone() for p in r.model.parameters()]
    loss, _, stats, finite = step(r, PROBLEMS)
    assert loss.item() == 0 and finite and stats["reward"] == 0.75 and r.opt.state_dict()["state"] == {}
    assert all(torch.equal(a, b) for a, b in zip(before, r.model.parameters()))
    assert mem.step == 1 and set(mem.groups) == {p.family for p in PROBLEMS}
    assert sorted(e["reward"] for es in mem.experience.values() for e in es) == [0, 1, 1]  # one copy of a repeat


def test_a_masked_rollout_longer_than_every_kept_one(monkeypatch):
    """Only the problem the memory knows gets a context; the other problem's longer rollouts are masked out."""
    first = TASK.train[0]
    unknown = next(p for p in TASK.train if p.family != first.family)
    short, long = TASK.solve(first), TASK.solve(unknown) + "zzzz"
    rolls = [Rollout(p, y, encode(y), [-1.0] * len(encode(y)), 0, "wrong", None)
             for p, y in ((first, short), (first, short), (unknown, long), (unknown, long))]
    monkeypatch.setattr(pmd, "rollout", lambda *a, **k: rolls)
    monkeypatch.setattr(pmd, "teacher_contexts", lambda *a: [mem.render(r.problem) or None for r in rolls])
    mem = Memory()
    mem.update([Rollout(first, short, [], [], 1, "ok", TASK.strategy(first, short))])
    _, loss, stats = run(mem, memory_steps=0)
    assert stats["teacher_frac"] == 0.5 and torch.isfinite(loss) and loss.item() > 0


def test_clock_charges_every_phase_of_a_step():
    """After the memory update the teacher has contexts to read, so every phase of pmd.step reaches the clock."""
    times = {}
    r = tiny_run(TASK)
    r.clock = Clock(times, "cpu")
    step(r, PROBLEMS)
    assert set(times) == {"rollout", "verify", "memory", "student", "teacher", "optimizer"}


def test_reflect_model_writes_the_verdicts_in_a_phase_of_its_own(monkeypatch):
    """reflect=model: the teacher's weights write the step's verdicts, in a phase of their own, counted in the stats;
    the memory takes the verdicts they wrote, not the counting rule's (here a reflector whose verdicts the rule would
    never draw: an untrained student's garbage has no faithful trace)."""
    times, calls = {}, []
    r = tiny_run(TASK, reflect="model")
    r.clock = Clock(times, "cpu")
    verified, real = spy(monkeypatch, pmd, "verify"), pmd.reflection

    def reflector(model, rollouts, G):
        _, counts = real(model, rollouts, G)
        verdicts = [(rollouts[0].problem, ("mir", "mir"), True), (rollouts[-1].problem, ("rev", "rol"), False)]
        calls.append((model, rollouts, G, verdicts, counts))
        return verdicts, counts

    monkeypatch.setattr(pmd, "reflection", reflector)
    _, _, stats, _ = step(r, PROBLEMS)
    (model, rollouts, G, verdicts, counts), = calls
    assert model is r.teacher and model is not r.model and G == 2 and rollouts == verified[0][1]
    assert "reflect" in times and {k: v for k, v in stats.items() if k.startswith("reflect_")} == {
        f"reflect_{k}": v for k, v in counts.items()}
    assert stats["reflect_written"] == stats["reflect_agree"] + stats["reflect_flipped"] + stats["reflect_invented"]
    assert evidence(r.memory) == evidence_of(verdicts) and not counted(rollouts)


def test_memory_successes_are_the_families_passing_trajectories():
    """The replay control's buffer: every passing trajectory the memory keeps for the batch's families, split back into
    the prompt it answered and its completion (newline included); failures and other families are left out."""
    p, q = TASK.train[0], next(p for p in TASK.train if p.family != TASK.train[0].family)
    mem = Memory()
    mem.update([Rollout(p, TASK.solve(p), [], [], 1, "ok", None), Rollout(p, "rev|x\n", [], [], 0, "bad steps", None),
                Rollout(q, TASK.solve(q), [], [], 1, "ok", None)])
    assert pmd.memory_successes(mem, [p]) == [("", p.prompt, TASK.solve(p))]
    assert pmd.memory_successes(mem, [q, p, p]) == [("", q.prompt, TASK.solve(q)), ("", p.prompt, TASK.solve(p))]


def test_rft_step_imitates_the_memory_successes():
    """method rft: no teacher; with successes in the memory the loss is their cross-entropy (> 0, with a gradient),
    without any it is zero."""
    _, loss, stats = run(Memory(), method="rft", memory_steps=0)
    assert loss.item() == 0 and stats["imitated"] == 0 and "teacher_frac" not in stats
    r, loss, stats = run(known(), method="rft", memory_steps=0)
    assert stats["imitated"] == sum(p.family in {q.family for q in PROBLEMS} for p in TASK.train) and loss.item() > 0
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in r.model.parameters())


def test_several_updates_make_grpo_weigh_its_ratio_to_the_sampler():
    """updates > 1: GRPO's loss is PPO's clipped surrogate on the ratio to the sampler. With every sampler log-prob
    lowered by 1 the ratio is e: a positive advantage counts 1.2 times (clipped), a negative one e times."""
    r = tiny_run(TASK, method="grpo")
    rolls = pmd.verify(TASK, pmd.rollout(r.model, TASK, PROBLEMS, 2, 1.0, torch.Generator().manual_seed(0)))
    for i, x in enumerate(rolls):  # one pass per group: every advantage is nonzero
        x.reward, x.logp_old = int(i % 2 == 0), [lp - 1.0 for lp in x.logp_old]
    losses = {}
    for n in (1, 2):
        r.c.updates = n
        losses[n] = pmd.losses(r, rolls, [None] * len(rolls), PROBLEMS)[0].item()
    adv = pmd.grpo_advantages(torch.tensor([float(x.reward) for x in rolls]), 2)
    lengths = torch.tensor([float(len(x.tokens)) for x in rolls])
    weight = torch.where(adv > 0, torch.tensor(1.2), torch.tensor(1.0).exp())
    assert losses[2] == pytest.approx(-(weight * adv * lengths).sum().item() / lengths.sum().item(), abs=1e-3)
    assert abs(losses[1] - losses[2]) > 0.1  # one update: advantage x log-prob, no ratio


# -- the sampler's log-probs: the policy's own, at any temperature ---------------------------------------------


@pytest.mark.parametrize("method, settings", [("grpo", dict(updates=3)), ("sdpo", dict(is_clip=2.0)),
                                              ("pmd", dict(is_clip=2.0))])
def test_the_first_updates_ratio_to_the_sampler_is_one_at_any_temperature(method, settings):
    """Rollouts sampled at temperature 0.7 carry the untempered log-prob of each token (Rollout.logp_old): the student
    scoring them (completion_logits, token_logprobs) gives the same up to float rounding (the KV-cached sampler
    against the full forward), so at the first update PPO's ratio (GRPO, several updates) and the IS weight (is_clip)
    are 1: the clipped surrogate's gradient is the plain one's, and is_clip leaves the distillation as it is."""
    r = tiny_run(TASK, known(), method=method, temperature=0.7, memory_steps=0, **settings)
    with torch.no_grad():  # a sharper policy than the 0.02-std init: tempering moves its log-probs further
        r.model.wte.weight.mul_(20)
    r.teacher = pmd.make_teacher(r.model, "ema")
    rolls = batch(r, temperature=0.7)
    logp, mask = student_logprobs(r, rolls)
    ratio = (logp - pmd.sampler_logprobs(rolls, mask)).exp()
    assert mask.sum() >= 4 and (ratio - 1).abs()[mask.bool()].max() < 1e-4
    contexts = pmd.teacher_contexts(method, rolls, 2, r.memory, r.levels)
    loss, stats = pmd.losses(r, rolls, contexts, PROBLEMS)
    if method == "grpo":  # the surrogate at ratio 1: -(mean advantage); its gradient: one update's
        adv = pmd.grpo_advantages(torch.tensor([float(x.reward) for x in rolls]), 2)
        assert loss.item() == pytest.approx(-(adv[:, None] * mask).sum().item() / mask.sum().item(), abs=1e-5)
        with_ratio = grads(r.model, loss)
        r.c.updates = 1
        plain = grads(r.model, pmd.losses(r, rolls, contexts, PROBLEMS)[0])
        assert all(torch.allclose(a, b, rtol=1e-3, atol=1e-7) for a, b in zip(with_ratio, plain))
    else:  # the IS weight min(ratio, is_clip) is 1 at every token
        r.c.is_clip = 0.0
        assert 0 < stats["teacher_frac"] and stats["distill"] > 0
        assert stats["distill"] == pytest.approx(pmd.losses(r, rolls, contexts, PROBLEMS)[1]["distill"], rel=1e-5)


# -- the losses' settings, through pmd.step and pmd.losses -----------------------------------------------------


@pytest.mark.parametrize("settings", [dict(alpha=0.5), dict(alpha=1.0), dict(topk=8), dict(sampled_token=True),
                                      dict(is_clip=0.5)])
def test_distillation_settings_reach_the_loss_through_step(monkeypatch, settings):
    """alpha, topk, sampled_token and is_clip as pmd.step hands them to distill_loss, with the sampler's log-probs:
    the step's distillation (and its loss) is that call's, and differs from the default's on the same rollouts. At the
    first update the IS weight is 1, so is_clip=0.5 halves the default loss. The teacher is perturbed: a teacher close
    to the student makes the reverse KL (alpha=1) the forward one to second order."""
    default = run(known(), teacher_noise=1.0, memory_steps=0)[2]["distill"]
    calls = spy(monkeypatch, pmd, "distill_loss")
    r, loss, stats = run(known(), teacher_noise=1.0, memory_steps=0, **settings)
    (args, out), = calls
    want = dict(dict(alpha=0.0, topk=0, sampled_token=False, is_clip=0.0), **settings)
    assert {k: args[k] for k in want} == want
    kept = args["mask"].bool()
    torch.testing.assert_close(args["logp_old"][kept], pmd.sampler_logprobs(r.rolls, args["mask"])[kept])
    assert stats["distill"] == out.item() == pytest.approx(loss.item(), rel=1e-6)
    assert stats["distill"] != pytest.approx(default, rel=0.05)
    if "is_clip" in settings:
        assert stats["distill"] == pytest.approx(0.5 * default, rel=1e-4)


@pytest.mark.parametrize("method, updates", [("sdpo", 1), ("pmd", 1), ("pmd", 2)])
def test_pg_weight_adds_the_grpo_term_to_the_distillation(method, updates):
    """pg_weight > 0: SDPO's and PMD's loss is the distillation plus pg_weight times GRPO's term on the same rollouts
    (PPO's ratio to the sampler with several updates); the distillation itself is unchanged."""
    r = tiny_run(TASK, known(), method=method, memory_steps=0, updates=updates)
    rolls = batch(r)
    contexts = pmd.teacher_contexts(method, rolls, 2, r.memory, r.levels)
    base, base_stats = pmd.losses(r, rolls, contexts, PROBLEMS)
    r.c.pg_weight = 0.5
    loss, stats = pmd.losses(r, rolls, contexts, PROBLEMS)
    logp, mask = student_logprobs(r, rolls)
    adv = pmd.grpo_advantages(torch.tensor([float(x.reward) for x in rolls]), 2, r.c.adv_std)
    pg = pmd.pg_loss(logp, adv, mask, pmd.sampler_logprobs(rolls, mask) if updates > 1 else None)
    assert stats["distill"] == pytest.approx(base_stats["distill"], rel=1e-6)
    assert loss.item() == pytest.approx(base.item() + 0.5 * pg.item(), rel=1e-5, abs=1e-7)
    g_loss, g_base, g_pg = grads(r.model, loss), grads(r.model, base), grads(r.model, pg)
    assert max(g.abs().max().item() for g in g_pg) > 1e-3  # the GRPO term does push the weights
    assert all(torch.allclose(a, b + 0.5 * c, rtol=1e-4, atol=1e-7) for a, b, c in zip(g_loss, g_base, g_pg))


@pytest.mark.parametrize("reflect", ["count", "model"])
def test_replay_adds_its_weight_times_the_warmup_examples_cross_entropy(reflect):
    """replay=n: n warm-up examples drawn from the run's problem RNG (with reflect=model, some teach reflection, as
    the warm-up's do), their cross-entropy (sft_loss) times replay_weight added to the method's loss; replay_weight=0
    leaves the method's loss as it is, and still draws them."""
    r = tiny_run(TASK, method="grpo", reflect=reflect)
    rolls, contexts = batch(r), [None] * 4
    plain = pmd.losses(r, rolls, contexts, PROBLEMS)[0].item()
    mix = dict(p_reflect=REFLECTION, group_size=2) if reflect == "model" else {}
    for weight in (0.5, 0.0):
        r.c.replay, r.c.replay_weight = 3, weight
        rng = random.Random()
        rng.setstate(r.rng.getstate())
        examples = [warmup_example(TASK, rng, r.mem_settings, p_plain=0, **mix) for _ in range(3)]
        loss = pmd.losses(r, rolls, contexts, PROBLEMS)[0].item()
        assert r.rng.getstate() == rng.getstate()
        assert loss == pytest.approx(plain + weight * sft_loss(r.student, examples, "cpu").item(), rel=1e-5)
    assert sft_loss(r.student, examples, "cpu").item() > 1  # an untrained model's cross-entropy: not negligible


def test_memory_steps_freeze_the_memory_after_that_many_steps():
    """memory_steps=2: the first two steps' rollouts update the memory (and, with reflect=model, are reflected on);
    from then on it stays as it is, while the policy goes on training."""
    r = tiny_run(TASK, reflect="model", memory_steps=2)
    states, reflected = [], []
    for _ in range(4):
        _, _, stats, _ = step(r, PROBLEMS)
        states.append(json.dumps(r.memory.state()))
        reflected.append("reflect_written" in stats)
    assert r.memory.step == 2 and states[1] == states[2] == states[3] != states[0]
    assert reflected == [True, True, False, False]
    assert {int(s["step"]) for s in r.opt.state_dict()["state"].values()} == {4}


# -- optimize: the learning-rate ramp, the gradient clip, the EMA teacher ---------------------------------------


def test_optimize_ramps_the_learning_rate_clips_the_gradient_and_moves_the_ema_teacher():
    """lr * min(1, (step + 1) / lr_warmup) at each update (a fresh Adam's first update moves each weight by its lr);
    the gradient clipped to grad_clip in norm (the norm returned is the one before the clip) and left alone below it;
    the EMA teacher moved ema_rate of the way to the updated student."""
    r = tiny_run(TASK, lr=1e-2, lr_warmup=4, grad_clip=0.5, ema_rate=0.25)
    params = list(r.model.parameters())
    for s, scale in enumerate((100.0, 100.0, 1e-6, 100.0, 100.0, 100.0)):
        r.step = s
        loss = scale * sum((p.float() ** 2).sum() for p in params)
        raw = torch.autograd.grad(loss, params, retain_graph=True)
        raw_norm = torch.sqrt(sum((g**2).sum() for g in raw))
        student, teacher = [p.detach().clone() for p in params], [p.clone() for p in r.teacher.parameters()]
        *_, norm, finite = pmd.optimize(r, loss)  # (loss,) norm, finite
        lr = 1e-2 * min(1.0, (s + 1) / 4)
        assert finite and r.opt.param_groups[0]["lr"] == pytest.approx(lr) and norm.item() == pytest.approx(
            raw_norm.item(), rel=1e-5)
        factor = min(1.0, 0.5 / raw_norm.item())  # the clip: 0.5 / norm when above it
        assert raw_norm > 0.5 if scale > 1 else raw_norm < 0.5
        for p, g in zip(params, raw):
            torch.testing.assert_close(p.grad, g * factor, rtol=1e-4, atol=1e-9)
        for t, s0, p in zip(r.teacher.parameters(), teacher, params):
            torch.testing.assert_close(t, s0 + 0.25 * (p.detach() - s0), rtol=1e-5, atol=1e-7)
        if s == 0:  # a fresh Adam moves every weight with a gradient by the step's lr
            moved = torch.cat([(p.detach() - b).abs().flatten() for p, b in zip(params, student)])
            assert moved.max().item() == pytest.approx(lr, rel=1e-3)
    r.c.lr_warmup, r.step = 0, 0  # no ramp
    pmd.optimize(r, sum((p**2).sum() for p in params))
    assert r.opt.param_groups[0]["lr"] == 1e-2
