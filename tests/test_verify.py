"""The built-in task (verify.HiddenProcedures): verdicts on right, wrong, unfaithful and garbage completions,
and the properties of its family table."""
import itertools
import random
import subprocess
import sys

import pytest

from conftest import REPO, subprocess_env
from model import encode
from verify import OPS, HiddenProcedures, run_plan, trace

TASK = HiddenProcedures()  # the default table: 3 groups x 4 families, 32 + 8 inputs each


def inp(p):
    return p.prompt.split(":", 1)[1][:-1]


def other_plan(task, p):
    """A plan whose faithful trace ends on a different string than the family's plan, on this input."""
    want = run_plan(task.families[p.family], inp(p))[-1]
    return next(plan for plan in itertools.product(task.ops, repeat=task.plan_len) if run_plan(plan, inp(p))[-1] != want)


def test_reference_solutions_pass_and_name_the_family_plan():
    """Every reference completion gets (1, 'ok') and its strategy is the family's hidden plan."""
    for p in TASK.train + TASK.heldout:
        assert TASK.verify(p, TASK.solve(p)) == (1, "ok")
        assert TASK.strategy(p, TASK.solve(p)) == TASK.families[p.family]


def test_faithful_trace_of_a_wrong_plan_is_a_wrong_plan():
    """A faithful trace of a plan with the wrong answer gets 0, 'wrong plan', and its plan as strategy."""
    for p in TASK.train[::17]:
        plan = other_plan(TASK, p)
        assert TASK.verify(p, trace(plan, inp(p))) == (0, "wrong plan")
        assert TASK.strategy(p, trace(plan, inp(p))) == plan


@pytest.mark.parametrize("k", [1, 2, 3])
def test_unfaithful_trace_names_the_wrong_step(k):
    """A wrong intermediate string at step k gets 0, feedback naming step k, and no strategy."""
    p = TASK.train[0]
    plan, steps = TASK.families[p.family], run_plan(TASK.families[p.family], inp(p))
    steps[k - 1] = "".join("b" if c == "a" else "a" for c in steps[k - 1])  # differs in every letter
    text = ",".join(plan) + "|" + "|".join(steps) + "\n"
    reward, feedback = TASK.verify(p, text)
    assert reward == 0 and f"step {k}" in feedback
    assert TASK.strategy(p, text) is None


def test_right_answer_for_the_wrong_input_fails():
    """Another input's reference trace (same family) is not accepted."""
    p, q = TASK.train[0], next(q for q in TASK.train[1:] if q.family == TASK.train[0].family)
    assert TASK.verify(p, q.solution)[0] == 0


GARBAGE = {
    "empty": "",
    "newline only": "\n",
    "no trailing newline": TASK.train[0].solution[:-1],
    "random bytes": bytes(random.Random(1).randrange(256) for _ in range(64)).decode("utf-8", errors="replace") + "\n",
    "unknown ops": "foo,bar,baz|abcde|abcde|abcde\n",
    "too few steps": "rev,rev,rev|abcde|edcba\n",
    "too many steps": "rev,rev|abcde|edcba|abcde\n",
    "no plan": "|abcde|abcde|abcde\n",
    "over-long": "rev,rev,rev|" + "a" * 100_000 + "|b|c\n",
    "over-long plan": ",".join(["rev"] * 10_000) + "|a\n",
    "pipe spam": "|" * 5000 + "\n",
    "comma spam": "," * 5000 + "\n",
    "nul bytes": "\x00" * 40 + "\n",
    "non-ascii": "rév,inc,swp|ábcdé|x|y\n",
    "two newlines": TASK.train[0].solution + "\n",
    "not a string": None,
}


@pytest.mark.parametrize("name", list(GARBAGE))
def test_garbage_gets_zero_and_feedback(name):
    """Malformed completions get reward 0, a non-empty feedback string and no strategy, without raising."""
    p = TASK.train[0]
    reward, feedback = TASK.verify(p, GARBAGE[name])
    assert reward == 0 and isinstance(feedback, str) and feedback and feedback != "ok"
    assert TASK.strategy(p, GARBAGE[name]) is None


def _mutate(rng, s, pieces):
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(s) + 1)
        kind = rng.randrange(3)
        if kind == 0:
            s = s[:i] + rng.choice(pieces) + s[i:]
        elif kind == 1:
            s = s[:i] + s[i + rng.randint(1, 3):]
        else:
            s = s[:i] + rng.choice(pieces) + s[i + 1:]
    return s


def test_fuzz_random_strings_never_raise_and_verdicts_are_consistent():
    """Thousands of random and mutated strings: verdicts are well-formed; a strategy means a faithful trace of it."""
    rng = random.Random(1234)
    pieces = list("abcdefghijkl|,\n>:") + list(OPS) + ["", "\x00", "\ufffd", "é", "|||", "\n\n"]
    rewards = set()
    for n in range(3000):
        p = rng.choice(TASK.train)
        if n % 2:
            text = _mutate(rng, TASK.solve(p), pieces)
        else:
            text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 40)))
        reward, feedback = TASK.verify(p, text)
        strategy = TASK.strategy(p, text)
        assert reward in (0, 1) and isinstance(feedback, str) and feedback
        assert (reward == 1) == (feedback == "ok")
        if strategy is not None:  # faithful: the text is exactly the trace of its plan
            assert text == trace(strategy, inp(p)) and feedback in ("ok", "wrong plan")
        else:
            assert reward == 0
        rewards.add(reward)
    assert rewards == {0, 1}  # the mutations do reach both verdicts


def _table(task):
    return sorted(task.families.items()), [p.pid for p in task.train], [p.pid for p in task.heldout], [p.pid for p in task.unseen]


def test_family_table_is_deterministic_per_seed():
    """The same task seed gives the same table and problems; another seed gives another table."""
    assert _table(HiddenProcedures(seed=0)) == _table(HiddenProcedures(seed=0))
    assert HiddenProcedures(seed=0).families != HiddenProcedures(seed=1).families


def test_family_table_does_not_depend_on_string_hashing():
    """Two processes with different PYTHONHASHSEED build the same table."""
    code = ("import hashlib, verify; t = verify.HiddenProcedures(); "
            "print(hashlib.sha1(repr((sorted(t.families.items()), t.train, t.heldout, t.unseen)).encode()).hexdigest())")
    outs = {subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                           env=dict(subprocess_env(), PYTHONHASHSEED=str(h))).stdout for h in (1, 2)}
    assert len(outs) == 1


def test_train_and_heldout_are_disjoint():
    """No input is both a training and a held-out problem, and pids are unique."""
    train, held = [p.pid for p in TASK.train], [p.pid for p in TASK.heldout]
    assert len(set(train)) == len(train) == 12 * 32 and len(set(held)) == len(held) == 12 * 8
    assert not set(train) & set(held)


def test_families_of_a_group_share_their_first_op():
    """Every family's group is its id's letter, and a group's plans all start with the same op (distinct per group)."""
    firsts = {}
    for fam, plan in TASK.families.items():
        firsts.setdefault(fam[0], set()).add(plan[0])
    assert all(len(ops) == 1 for ops in firsts.values()) and len(firsts) == 3
    assert len({next(iter(ops)) for ops in firsts.values()}) == 3
    assert all(p.group == p.family[0] for p in TASK.train + TASK.heldout)


def test_family_plans_are_unambiguous_on_the_task_inputs():
    """No other plan reproduces a family's outputs on all of that family's inputs."""
    inputs = {}
    for p in TASK.train + TASK.heldout + TASK.unseen:
        inputs.setdefault(p.family, []).append(inp(p))
    for fam, plan in TASK.families.items():
        want = [run_plan(plan, s)[-1] for s in inputs[fam]]
        twins = [q for q in itertools.product(TASK.ops, repeat=TASK.plan_len)
                 if q != plan and [run_plan(q, s)[-1] for s in inputs[fam]] == want]
        assert not twins, (fam, plan, twins)


def test_max_completion_fits_every_reference_completion():
    """The sampler's token limit leaves room for every reference completion."""
    assert max(len(encode(p.solution)) for p in TASK.train + TASK.heldout) <= TASK.max_completion


def test_bad_task_settings_raise_value_error():
    """Out-of-range knobs are refused with a ValueError."""
    for kw in (dict(plan_len=0), dict(n_ops=1), dict(n_groups=0), dict(input_len=1), dict(n_train=0), dict(n_unseen=-1)):
        with pytest.raises(ValueError):
            HiddenProcedures(**kw)


def test_unseen_families_are_new_families_of_the_rl_groups():
    """Unseen families are never RL families (ids and problems disjoint), n_unseen of them per RL group, each sharing
    its group's first op, with n_heldout inputs each; their references pass."""
    rl = {p.family for p in TASK.train}
    unseen = {p.family for p in TASK.unseen}
    assert unseen and not unseen & rl and {p.family for p in TASK.heldout} == rl
    assert sorted(f[0] for f in unseen) == sorted("ABC" * 2) and len(TASK.unseen) == len(unseen) * 8
    first = {TASK.families[f][0] for f in rl if f[0] == "A"}
    assert {TASK.families[f][0] for f in unseen if f[0] == "A"} == first
    assert all(TASK.verify(p, TASK.solve(p)) == (1, "ok") for p in TASK.unseen)


def test_unseen_families_leave_the_rl_table_as_it_is():
    """The unseen families are drawn after the RL families: with or without them, the RL problems are the same."""
    with_, without = HiddenProcedures(), HiddenProcedures(n_unseen=0)
    assert (with_.train, with_.heldout) == (without.train, without.heldout) and not without.unseen


def test_a_group_with_too_few_plans_repeats_plans_instead_of_losing_families():
    """plan_len 1: one plan starts with each op, so every family of a group shares it; none is dropped."""
    t = HiddenProcedures(plan_len=1)
    assert len({p.family for p in t.train}) == 12 and len({p.family for p in t.unseen}) == 6
    assert all(len({plan for f, plan in t.families.items() if f[0] == g}) == 1 for g in "ABC")
