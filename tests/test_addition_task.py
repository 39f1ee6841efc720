"""A second task (tests/addition_task.py) through the same interface and the same loop (train.main(task=...)),
with no change to pmd.py or memory.py."""
import glob
import json
import random

import pytest
import torch

import config
import train
import warmup
from addition_task import AdditionTask, scratchpad
from conftest import GS, PPS, STEPS, TINY, quiet
from memory import Memory
from model import encode
from verify import Problem

TASK = AdditionTask()
METHODS = ("grpo", "sdpo", "pmd")
DEFAULTS = {k: getattr(config, k) for k in config.CONFIG_KEYS}


def test_interface_matches_the_builtin_task():
    """train / heldout are verify.Problem lists with unique pids; references pass and fit max_completion."""
    assert TASK.train and TASK.heldout and all(isinstance(p, Problem) for p in TASK.train + TASK.heldout)
    pids = [p.pid for p in TASK.train + TASK.heldout]
    assert len(set(pids)) == len(pids)
    for p in TASK.train + TASK.heldout:
        assert TASK.verify(p, TASK.solve(p)) == (1, "ok") and TASK.strategy(p, TASK.solve(p)) == TASK.families[p.family]
        assert len(encode(p.solution)) <= TASK.max_completion and p.group == p.family[0]


def test_groups_share_their_first_step():
    """Every family of a group shares the first step, and a group's families have distinct plans."""
    for g in {p.group for p in TASK.train}:
        plans = [plan for fam, plan in TASK.families.items() if fam[0] == g]
        assert len({plan[0] for plan in plans}) == 1 and len(set(plans)) == len(plans) >= 2


def test_faithful_wrong_carry_plan_is_zero_with_strategy():
    """A faithful scratchpad that drops or invents a carry gets 0, 'wrong carry', and the plan it followed."""
    p = next(p for p in TASK.train if TASK.families[p.family] == ("add", "adc"))
    a, b = TASK.operands(p)
    text = scratchpad(a, b, ("add", "add"))
    assert TASK.verify(p, text) == (0, "wrong carry") and TASK.strategy(p, text) == ("add", "add")


def test_unfaithful_column_is_zero_without_strategy():
    """A wrong column sum gets 0, feedback naming the column, and no strategy."""
    p = TASK.train[0]
    cols = p.solution.split("|")
    lhs, s = cols[1].split("=")
    text = "|".join([cols[0], f"{lhs}={int(s) + 1}"] + cols[2:])
    reward, feedback = TASK.verify(p, text)
    assert reward == 0 and "col 2" in feedback and TASK.strategy(p, text) is None


def test_fuzz_never_raises():
    """Random and mutated strings get a well-formed verdict; a strategy means the text is that plan's scratchpad."""
    rng = random.Random(7)
    pieces = list("0123456789+=|\n") + ["+1", "||", "", "\x00", "é", "٣"]
    for n in range(2000):
        p = rng.choice(TASK.train)
        text = list(p.solution) if n % 2 else []
        for _ in range(rng.randint(1, 6)):
            i = rng.randint(0, len(text))
            text[i : i + rng.randint(0, 2)] = [rng.choice(pieces)]
        text = "".join(text)
        reward, feedback = TASK.verify(p, text)
        strategy = TASK.strategy(p, text)
        assert reward in (0, 1) and isinstance(feedback, str) and feedback and (reward == 1) == (feedback == "ok")
        if strategy is not None:
            assert text == scratchpad(*TASK.operands(p), strategy)


def test_warmup_helpers():
    """warmup_group uses no RL family id; attempts get verdicts consistent with their strategies."""
    rng = random.Random(0)
    for _ in range(20):
        probs = TASK.warmup_group(rng)
        assert probs and not {p.family for p in probs} & set(TASK.families)
        for p in probs:
            text = TASK.attempt(p, rng)
            assert (TASK.verify(p, text)[0] == 1) == (TASK.strategy(p, text) == TASK.strategy(p, p.solution))


@pytest.fixture(scope="module")
def add_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("addition")
    task = AdditionTask(n_train=4, n_heldout=2)
    for m in METHODS:
        quiet(train.main, TINY + [f"--method={m}", f"--out_dir={root / m}", f"--cache_dir={root / 'cache'}"], task)
    return root, task


@pytest.mark.parametrize("method", METHODS)
def test_each_method_runs_on_the_addition_task(add_runs, method):
    """train.main(task=AdditionTask) runs every method: checkpoint, memory of addition problems, metrics."""
    root, task = add_runs
    out = root / method
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == STEPS
    mem = Memory.load(str(out / "memory.json"))
    train_pids = {p.pid for p in task.train}
    pids = {e["pid"] for es in mem.experience.values() for e in es}
    assert mem.step == STEPS and pids and pids <= train_pids and set(mem.groups) <= set(task.families)
    recs = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in recs] == [0, 2, 3] and recs[-1]["rollouts"] == STEPS * PPS * GS


class DocumentedInterface:
    """Exactly the interface verify.py's docstring lists, no more: attempt(problem, rng, p_right, p_lucky) takes no
    p_slip."""

    def __init__(self, inner):
        self.inner, self.train, self.heldout, self.unseen = inner, inner.train, inner.heldout, inner.unseen
        self.max_completion = inner.max_completion

    def verify(self, problem, completion):
        return self.inner.verify(problem, completion)

    def strategy(self, problem, completion):
        return self.inner.strategy(problem, completion)

    def warmup_group(self, rng):
        return self.inner.warmup_group(rng)

    def solve(self, problem):
        return self.inner.solve(problem)

    def attempt(self, problem, rng, p_right, p_lucky):
        return self.inner.attempt(problem, rng, p_right, p_lucky)


def test_loop_needs_only_the_documented_interface(tmp_path):
    """A task with exactly the documented methods and signatures runs through train.main."""
    task = DocumentedInterface(AdditionTask(digits=(2,), n_train=4, n_heldout=2))
    quiet(train.main, TINY + ["--steps=1", f"--out_dir={tmp_path / 'out'}", f"--cache_dir={tmp_path / 'cache'}"], task)
    assert Memory.load(str(tmp_path / "out" / "memory.json")).step == 1


def test_warmup_cache_distinguishes_task_settings(tmp_path):
    """Two tasks of the same class and completion length whose problems differ (another seed) get different warm-up
    checkpoints: only the problems tell them apart. The same task again loads its own."""
    c = config.parse_args(TINY + ["--warmup_steps=1", f"--cache_dir={tmp_path}"])
    tasks = [AdditionTask(digits=(2,), n_train=4, n_heldout=2, seed=s) for s in (0, 1)]
    assert tasks[0].max_completion == tasks[1].max_completion and [p.pid for p in tasks[0].train] != [
        p.pid for p in tasks[1].train]
    for task in tasks:
        _, printed = quiet(warmup.warmup, c, task, "cpu")
        assert "warm-up: loaded" not in printed
    assert len(glob.glob(str(tmp_path / "warmup-*.pt"))) == 2
    _, printed = quiet(warmup.warmup, c, AdditionTask(digits=(2,), n_train=4, n_heldout=2, seed=1), "cpu")
    assert "warm-up: loaded" in printed and len(glob.glob(str(tmp_path / "warmup-*.pt"))) == 2
