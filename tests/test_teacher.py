"""pmd.py's teacher: the context each method shows it (teacher_contexts) and its weights (make_teacher, ema_update)."""
import random

import torch

from conftest import problem, rollout
from memory import Memory, experience_line
from model import GPT, GPTConfig
from pmd import ema_update, make_teacher, teacher_contexts
from warmup import plain_pool, warmup_example
from verify import HiddenProcedures

G = 3
X, Y = ("rev", "inc", "swp"), ("rev", "mir", "rol")


def group(fam, rewards):
    """G rollouts of one problem with the given rewards (distinct completions)."""
    p = problem(fam, "abcde")
    return [rollout(p, r, X if r else Y, completion=f"{i}|{'good' if r else 'bad'}\n") for i, r in enumerate(rewards)]


def line(r, reward=None):
    reward = r.reward if reward is None else reward
    return experience_line(r.problem.prompt, r.completion, reward, "" if reward else r.feedback) + "\n"


def test_grpo_has_no_teacher_context():
    """GRPO shows the teacher nothing: every context is None."""
    assert teacher_contexts("grpo", group("A10", [1, 0, 1]), G) == [None] * G


def test_sdpo_shows_the_first_successful_sibling_other_than_itself():
    """A sample's context holds the first successful sibling of its group, never the sample itself."""
    rolls = group("A10", [0, 1, 1])
    ctx = teacher_contexts("sdpo", rolls, G)
    assert ctx[1] == line(rolls[2])  # the first success other than itself
    assert ctx[2] == line(rolls[1])
    assert rolls[1].completion not in ctx[1] and rolls[2].completion not in ctx[2]


def test_sdpo_failed_sample_gets_the_demo_and_never_its_own_trace():
    """A failed sample's context is the first success alone: its own failed trace is not shown (a teacher shown it
    raises the failed plan's probability)."""
    rolls = group("A10", [0, 1, 1])
    ctx = teacher_contexts("sdpo", rolls, G)
    assert ctx[0] == line(rolls[1]) and rolls[0].completion.strip() not in ctx[0]


def test_sdpo_lone_success_is_masked():
    """The only success of its group has no demonstration to be shown: masked (None); its failed siblings are not."""
    rolls = group("A10", [0, 1, 0])
    ctx = teacher_contexts("sdpo", rolls, G)
    assert ctx[1] is None
    assert ctx[0] == ctx[2] == line(rolls[1])


def test_sdpo_groups_are_independent():
    """Demonstrations come from the sample's own group only."""
    rolls = group("A10", [1, 1, 0]) + group("B10", [0, 0, 1])
    ctx = teacher_contexts("sdpo", rolls, G)
    assert all("A10:" in c for c in ctx[:3]) and all("B10:" not in c for c in ctx[:3])
    assert ctx[3] == ctx[4] == line(rolls[5]) and ctx[5] is None


def test_sdpo_group_without_success_is_masked():
    """A group with no success has no demonstration: every sample is masked out, as in SDPO without feedback."""
    assert teacher_contexts("sdpo", group("A10", [0, 0, 0]), G) == [None] * G


def test_rft_has_no_teacher_context():
    """The replay control imitates the memory's successes: the teacher is shown nothing."""
    assert teacher_contexts("rft", group("A10", [1, 0, 1]), G) == [None] * G


def test_pmd_contexts_are_the_memory_render():
    """PMD's context is memory.render for the sample's problem and levels; an empty render masks the sample."""
    mem = Memory()
    mem.update([rollout(problem("A10", s), 1, X) for s in "ab"] + [rollout(problem("A11", s), 1, Y) for s in "ab"])
    rolls = group("A10", [0, 1, 0]) + group("A12", [0, 0, 0]) + group("B10", [1, 0, 0])
    for levels in (("experience", "insight", "pattern"), ("pattern",), ("insight",)):
        ctx = teacher_contexts("pmd", rolls, G, mem, levels)
        assert ctx == [mem.render(r.problem, levels) or None for r in rolls]
        assert ctx[0] and ctx[6] is None  # group B: nothing to show
    # unseen A12: its group's pattern
    assert teacher_contexts("pmd", rolls, G, mem, ("pattern",))[3] == "#A12 via rev,?,? 2\n"
    assert teacher_contexts("pmd", rolls, G, mem, ("insight",))[3] is None


def tiny():
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=8))


def test_teacher_modes():
    """live is the student itself; ema and frozen are detached copies with the student's weights."""
    model = tiny()
    assert make_teacher(model, "live") is model
    for mode in ("ema", "frozen"):
        t = make_teacher(model, mode)
        assert t is not model and not t.training and not any(p.requires_grad for p in t.parameters())
        assert all(torch.equal(a, b) for a, b in zip(t.parameters(), model.parameters()))


def test_ema_update_moves_teacher_by_rate():
    """ema_update(rate) moves every teacher weight the fraction rate of the way to the student's."""
    model, teacher = tiny(), make_teacher(tiny(), "ema")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    before = [p.clone() for p in teacher.parameters()]
    ema_update(teacher, model, 0.25)
    for b, t, s in zip(before, teacher.parameters(), model.parameters()):
        torch.testing.assert_close(t, b + 0.25 * (s - b))
    ema_update(teacher, model, 1.0)
    assert all(torch.equal(t, s) for t, s in zip(teacher.parameters(), model.parameters()))


def test_plain_warmup_examples_bind_an_id_to_one_plan():
    """Half the no-context warm-up examples come from a fixed pool of families whose ids recur, always with the same
    plan (an id two pool groups draw keeps one plan; a fresh family never borrows a pooled id), so the warm-up teaches
    that an id sets its plan. No example is ever an RL or unseen family's."""
    task = HiddenProcedures(n_train=4, n_heldout=2)
    rng, plans = random.Random(0), {}
    for _ in range(4000):
        ctx, prompt, completion = warmup_example(task, rng, {}, p_plain=1.0)
        assert ctx == ""
        plans.setdefault(prompt.split(":")[0], []).append(completion.split("|")[0])
    assert not set(plans) & set(task.families)
    pool = plain_pool(task)
    assert len(pool) >= 300  # distinct families, most of the 64 groups' 384
    seen = [f for f in pool if f in plans]
    assert len(seen) >= 0.9 * len(pool) and all(len(set(plans[f])) == 1 for f in seen)
    assert all(len({p.solution.split("|")[0] for p in ps}) == 1 for ps in pool.values())
