"""pmd.step: rollout -> verify -> memory -> teacher -> losses -> optimizer on a tiny model, for the cases the loop
relies on."""
import pytest
import torch

import pmd
from bench import Clock
from conftest import tiny_run
from memory import Memory
from model import encode
from pmd import Rollout, step
from verify import HiddenProcedures

TASK = HiddenProcedures(n_groups=1, families_per_group=2, n_train=2, n_heldout=1)
PROBLEMS = TASK.train[:2]


def known():
    """A memory of every training problem's reference trace."""
    mem = Memory()
    mem.update([Rollout(p, TASK.solve(p), [], [], 1, "ok", TASK.strategy(p, TASK.solve(p))) for p in TASK.train])
    return mem


def run(memory, **settings):
    r = tiny_run(TASK, memory, **settings)
    loss, norm, stats, finite = step(r, PROBLEMS)
    return r, loss, stats


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
    _, loss, stats = run(mem, method=method)
    assert mem.step == 1 and 1 <= sum(map(len, mem.experience.values())) <= 2 * len(PROBLEMS)
    assert torch.isfinite(loss) and 0 <= stats["reward"] <= 1


def test_transient_memory_holds_the_current_batch_only():
    """PMD-Transient: whatever the memory held before, after a step it holds this batch's rollouts and nothing else."""
    mem = Memory()
    other = HiddenProcedures(n_groups=2, families_per_group=2, n_train=2, n_heldout=1, seed=5).train[-1]
    mem.update([Rollout(other, other.solution, [], [], 1, "ok", None)])
    run(mem, transient=True)
    assert set(mem.groups) == {p.family for p in PROBLEMS} and mem.step == 2
    assert sum(map(len, mem.experience.values())) <= 2 * len(PROBLEMS)


def test_a_frozen_policy_only_feeds_the_memory():
    """The paper's frozen policy: its weights and the optimizer never move, and the memory still gets the rollouts."""
    mem = Memory()
    r = tiny_run(TASK, mem, policy_frozen=True)
    before = [p.detach().clone() for p in r.model.parameters()]
    loss, _, stats, finite = step(r, PROBLEMS)
    assert loss.item() == 0 and finite and 0 <= stats["reward"] <= 1 and r.opt.state_dict()["state"] == {}
    assert all(torch.equal(a, b) for a, b in zip(before, r.model.parameters()))
    assert mem.step == 1 and set(mem.groups) == {p.family for p in PROBLEMS}


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


def test_reflect_model_writes_the_verdicts_in_a_phase_of_its_own():
    """reflect=model: the teacher's weights write the step's verdicts, in a phase of their own, counted in the stats."""
    times = {}
    r = tiny_run(TASK, reflect="model")
    r.clock = Clock(times, "cpu")
    _, _, stats, _ = step(r, PROBLEMS)
    assert "reflect" in times
    assert stats["reflect_written"] == stats["reflect_agree"] + stats["reflect_flipped"] + stats["reflect_invented"]


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
