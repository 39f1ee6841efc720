"""pmd.step: one rollout -> memory -> teacher -> loss step on a tiny model, for the cases the loop relies on."""
from types import SimpleNamespace

import pytest
import torch

from memory import Memory
from model import GPT, GPTConfig
from pmd import Rollout, make_teacher, step
from verify import HiddenProcedures

TASK = HiddenProcedures(n_groups=1, families_per_group=2, n_train=2, n_heldout=1)
PROBLEMS = TASK.train[:2]


def cfg(**kw):
    base = dict(group_size=2, temperature=1.0, update_memory=True, method="pmd", memory_levels="experience,insight,pattern",
                pg_weight=0.0, adv_std=False, alpha=0.0, topk=0, sampled_token=False, is_clip=0.0)
    return SimpleNamespace(**{**base, **kw})


def tiny():
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=256, n_layer=1, n_head=2, n_embd=16))


def run(c, memory):
    model = tiny()
    loss, stats = step(model, make_teacher(model, "ema"), TASK, memory, PROBLEMS, c, torch.Generator().manual_seed(0), "cpu")
    loss.backward()
    return model, loss, stats


def test_all_masked_step_still_backpropagates():
    """With nothing for the teacher to read, the loss is zero but still a graph: backward works, gradients are zero."""
    model, loss, stats = run(cfg(update_memory=False), Memory())
    assert loss.item() == 0 and stats["teacher_frac"] == 0
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in model.parameters())


def test_pmd_step_distils_towards_a_teacher_with_memory():
    """With a memory of the problems' reference traces, every rollout has a context and the loss has a gradient."""
    mem = Memory()
    mem.update([Rollout(p, TASK.solve(p), [], [], 1, "ok", TASK.strategy(p, TASK.solve(p))) for p in TASK.train])
    model, loss, stats = run(cfg(update_memory=False), mem)
    assert stats["teacher_frac"] == 1 and loss.item() > 0 and stats["distill"] == pytest.approx(loss.item(), rel=1e-5)
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in model.parameters())


@pytest.mark.parametrize("method", ["grpo", "sdpo", "pmd"])
def test_step_updates_the_memory_for_every_method(method):
    """Every method feeds its rollouts to the memory (one update, G experiences or fewer per problem)."""
    mem = Memory()
    _, loss, stats = run(cfg(method=method), mem)
    assert mem.step == 1 and 1 <= sum(map(len, mem.experience.values())) <= 2 * len(PROBLEMS)
    assert torch.isfinite(loss) and 0 <= stats["reward"] <= 1
